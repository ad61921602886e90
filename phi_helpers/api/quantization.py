"""Weight-only quantization: int8 / int4 weights through transformers' own ``quantization_config``.

    model, processor = load_model(quantize="int8")   # about half the memory of bf16, a quarter of fp32

Only the language model's ``nn.Linear`` weights are quantized (int8: the output head ``lm_head`` too);
activations, the KV cache, the embeddings, the CLIP vision tower and the image projection stay in the
model's dtype (``SKIP_MODULES``; docs/quantization.md has the measurements behind that choice).

Which library does the work:

==========  ===========================================  =============================================
quantize    CPU                                          CUDA GPU
==========  ===========================================  =============================================
"int8"      torchao ``Int8WeightOnlyConfig``             bitsandbytes LLM.int8() if installed, else torchao
"int4"      not available (no int4 CPU kernels in        bitsandbytes NF4 (``pip install bitsandbytes``)
            torchao 0.18 for this PyTorch): use int8
==========  ===========================================  =============================================

Apple GPUs (MPS) have neither backend: use ``dtype="fp16"`` there. Every refusal is a
``QuantizationUnavailableError`` that says what to install or what to use instead; torchao must be
``TORCHAO_MIN_VERSION`` (0.18) or newer (``torchao_missing`` says what is wrong, ``torchao_version`` which is
installed).

On CPU, torchao's int8 matmul converts the whole weight to bf16 on every call, which makes decoding slower
than fp32. ``use_fused_int8_kernel`` (called by ``load_model``) lets the quantized layers multiply with
PyTorch's fused int8 CPU kernel instead when few rows come in (decoding), keeping torchao's tensors, so
saving and reloading are unchanged.

A folder saved from a quantized model holds its weights quantized and says so in config.json
(``quantization_config``): ``saved_quantization`` checks that they can be loaded here, and
``load_model`` loads them as they are. ``weights_bytes`` counts what quantized weights really take
(``model.get_memory_footprint()`` counts a torchao int8 weight at its bf16 size).
"""

import importlib.metadata
import importlib.util
import json
import sys

import torch
from packaging.version import Version
from torch import nn
from transformers import BitsAndBytesConfig, TorchAoConfig

from ..errors import InvalidArgumentError, QuantizationBackendMissingError, QuantizationUnavailableError

QUANTIZE_CHOICES = ("int8", "int4")
# Module paths (prefixes) that keep the model's dtype, per format: always the vision tower and the image
# projection (8 % of the parameters; every image token passes through them); with 4 bits also the output
# head, as the usual NF4 recipe does. int8 with per-row scales quantizes lm_head: on CPU it made decoding
# 1.06-1.19x faster at no measured cost in agreement (docs/quantization.md).
VISION_PREFIX = "model.vision_embed_tokens"
SKIP_MODULES = {"int8": [VISION_PREFIX], "int4": [VISION_PREFIX, "lm_head"]}
# Bytes per quantized weight, scales included: int8 has one scale per output row (negligible),
# NF4 one absmax per 64 weights (+ double quantization: about 0.13 bit).
BITS_PER_WEIGHT = {"int8": 8.0, "int4": 4.13}
# The oldest torchao that works: from 0.18 on, Int8WeightOnlyConfig makes the Int8Tensor weights (with
# act_pre_scale) that use_fused_int8_kernel looks for; 0.15-0.17 make AffineQuantizedTensor weights by default,
# so int8 would lose the fused kernel (and weights_bytes its true size) without a word.
TORCHAO_MIN_VERSION = "0.18"
_INSTALL_TORCHAO = (f'pip install "torchao>={TORCHAO_MIN_VERSION}"  (the extra "quantize"; in the repository: '
                    'pip install -e ".[quantize]")')
# Up to this many rows (tokens x batch) the fused int8 kernel beats torchao's convert-then-multiply on CPU;
# above it (prefill) torchao's path is faster (benchmarks/bench_quantization.py, docs/quantization.md).
FUSED_INT8_MAX_ROWS = 32


def quantization_config(quantize, device: str, dtype: torch.dtype):
    """Return ``(transformers quantization config or None, description)`` for ``quantize`` on ``device``.

    ``quantize``: ``None`` (no quantization), ``"int8"`` or ``"int4"``. Raises
    ``QuantizationUnavailableError`` (or its subclass ``QuantizationBackendMissingError``) when it cannot
    run here, before anything is downloaded.
    """
    name = check_quantize(quantize)
    if name is None:
        return None, "not quantized"
    kind = device.split(":")[0]
    if kind == "mps":
        raise _no_mps_kernels(f"quantize={name!r} is")
    if kind == "cuda" and _installed("bitsandbytes"):
        return _bitsandbytes(name, dtype), f"{name} weights (bitsandbytes)"
    if name == "int4":
        where = "a CUDA GPU" if kind == "cuda" else "CPU"
        raise (QuantizationBackendMissingError if kind == "cuda" else QuantizationUnavailableError)(
            f"quantize='int4' on {where} is not available: it needs bitsandbytes on a CUDA GPU "
            "(`pip install bitsandbytes`). "
            + ("On CPU use quantize='int8' (torchao), about a quarter of the fp32 weights' memory."
               if kind == "cpu" else "Or use quantize='int8', which torchao can do.")
        )
    missing = torchao_missing("quantize='int8'")
    if missing is not None:
        raise QuantizationBackendMissingError(
            missing + (", or `pip install bitsandbytes` on this CUDA machine." if kind == "cuda" else ".") + _restart_note()
        )
    from torchao.quantization import Int8WeightOnlyConfig  # an optional extra: imported only when asked for

    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=SKIP_MODULES["int8"])
    return config, "int8 weights (torchao)"


def saved_quantization(quantization: dict, quantize, device: str) -> tuple[str, str]:
    """Check that the quantized weights of a saved folder (config.json's ``quantization_config``) can be
    loaded on ``device``; return ``(format name, note of load_model's printed line)``, e.g.
    ``("int8", "int8 weights (torchao, saved quantized)")``.

    The weights are loaded as they are stored: ``quantize`` (what the caller asked for) may be ``None`` or
    the same format, not another one (transformers cannot quantize quantized weights again). A missing
    backend raises ``QuantizationBackendMissingError`` with the pip command (transformers' own error is an
    untyped ValueError that names no command).
    """
    name = quantize_name(quantization)
    asked = check_quantize(quantize)
    if asked is not None and asked != name:
        raise InvalidArgumentError(
            f"This checkpoint holds {name} weights (config.json's quantization_config), so quantize={asked!r} cannot "
            f"apply: leave quantize out (or pass {name!r}), or load the original, unquantized checkpoint with "
            f"quantize={asked!r}."
        )
    method = str(quantization.get("quant_method"))
    kind = device.split(":")[0]
    if kind == "mps":
        raise _no_mps_kernels(f"This checkpoint holds {name} weights ({method}), which is")
    holds = f"This checkpoint holds {name} weights quantized with {method} (config.json's quantization_config)"
    if method == "bitsandbytes" and not _installed("bitsandbytes"):
        if kind != "cuda":  # as for quantize='int4' here: installing bitsandbytes alone would not do
            raise QuantizationUnavailableError(
                f"{holds}; loading them needs a CUDA GPU with bitsandbytes (`pip install bitsandbytes`), not {kind}. "
                "On CPU load the original, unquantized checkpoint with quantize='int8' (torchao)."
            )
        raise QuantizationBackendMissingError(f"{holds}; loading them needs bitsandbytes: pip install bitsandbytes."
                                              + _restart_note())
    missing = torchao_missing(f"{holds}; loading them") if method == "torchao" else None
    if missing is not None:
        raise QuantizationBackendMissingError(missing + "." + _restart_note())
    return name, f"{name} weights ({method}, saved quantized)"


def quantize_name(quantization: dict) -> str:
    """"int8" / "int4" for a ``quantization_config`` (as a dict), else its ``quant_method``."""
    if quantization.get("load_in_4bit"):
        return "int4"
    if quantization.get("load_in_8bit"):
        return "int8"
    quant_type = json.dumps(quantization.get("quant_type", ""))  # torchao: {"default": {"_type": "Int8WeightOnlyConfig"...
    return "int4" if "Int4" in quant_type else "int8" if "Int8" in quant_type else str(quantization.get("quant_method"))


def _no_mps_kernels(what: str) -> QuantizationUnavailableError:
    return QuantizationUnavailableError(
        f"{what} not available on Apple GPUs (MPS): neither torchao nor bitsandbytes has MPS kernels. Use "
        "dtype='fp16' (half the memory of fp32), or device='cpu' with quantize='int8'."
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor`` really holds. A torchao tensor subclass (``Int8Tensor``...) reports the element
    size of the dtype it computes in, so ``numel() * element_size()`` (and transformers'
    ``get_memory_footprint``) would count an int8 weight as bf16: its inner tensors (int8 data, scales)
    are counted instead."""
    names = getattr(tensor, "tensor_data_names", None)
    if names is None:
        return tensor.numel() * tensor.element_size()
    inner = (getattr(tensor, name, None) for name in (*names, *getattr(tensor, "optional_tensor_data_names", ())))
    return sum(tensor_bytes(part) for part in inner if part is not None)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters as they are stored: quantized weights at their real size.

    >>> weights_bytes(nn.Linear(4, 2))  # 8 weights + 2 biases, 4 bytes each
    40
    """
    return sum(tensor_bytes(parameter) for parameter in model.parameters())


class FusedInt8Linear(nn.Linear):
    """An ``nn.Linear`` holding a torchao int8 weight (per-row scales) that multiplies with
    ``torch._weight_int8pack_mm`` (PyTorch's fused CPU kernel: int8 weights read once, no bf16 copy) when
    the input is bf16/fp16 on the CPU and has at most ``FUSED_INT8_MAX_ROWS`` rows; otherwise torchao's
    own path. The parameters are the same objects, so ``state_dict`` and ``save_pretrained`` do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or rows > FUSED_INT8_MAX_ROWS:
            return super().forward(x)
        weight = self.weight
        scale = weight.scale.reshape(-1).to(x.dtype)  # (out_features,)
        y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), weight.qdata, scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_fused_int8_kernel(model: nn.Module) -> int:
    """Let every CPU ``nn.Linear`` with a torchao per-row int8 weight (weight-only) use ``FusedInt8Linear``.

    Returns how many layers now do. A model without torchao weights is left as it is (returns 0)."""
    if "torchao" not in sys.modules:  # no torchao tensor can exist without it
        return 0
    from torchao.quantization import Int8Tensor

    swapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and isinstance(weight, Int8Tensor)
            and weight.device.type == "cpu"
            and weight.act_quant_kwargs is None  # weight-only
            and weight.act_pre_scale is None
            and tuple(weight.block_size) == (1, module.in_features)  # one scale per output row
        ):
            module.__class__ = FusedInt8Linear  # same parameters and buffers, another forward
            swapped += 1
    return swapped


def check_quantize(quantize) -> str | None:
    """``None``/"none" -> None; "int8"/"int4" (any case) -> itself; anything else: InvalidArgumentError (a ValueError)."""
    if quantize is None:
        return None
    name = str(quantize).strip().lower()
    if name == "none":
        return None
    if name not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"Unknown quantize {quantize!r}. Choose None, 'int8' or 'int4'.")
    return name


def _bitsandbytes(name: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """LLM.int8() or NF4 (with double quantization), computing in ``dtype``."""
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES["int8"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_MODULES["int4"],
    )


def torchao_version() -> str | None:
    """The version of the installed torchao ("0.18.0"), None when torchao is not installed."""
    if not _installed("torchao"):
        return None
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:  # importable without pip's record (a source checkout)
        return importlib.import_module("torchao").__version__


def torchao_missing(what: str) -> str | None:
    """None when torchao ``TORCHAO_MIN_VERSION`` or newer is installed; else a sentence saying that
    ``what`` needs it, which version is installed (if any) and the pip command, without a final period:

    "quantize='int8' needs torchao 0.18 or newer, but torchao 0.17.0 is installed: pip install -U ..."
    """
    version = torchao_version()
    if version is None:
        return f"{what} needs torchao, which is not installed: {_INSTALL_TORCHAO}"
    if Version(version) < Version(TORCHAO_MIN_VERSION):
        return (f"{what} needs torchao {TORCHAO_MIN_VERSION} or newer, but torchao {version} is installed: "
                f'pip install -U "torchao>={TORCHAO_MIN_VERSION}"')
    return None


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _restart_note() -> str:
    """In a notebook (an IPython shell runs in this process), the kernel must be restarted after a pip install:
    transformers notes which libraries are installed once, when it is imported. A command or script that is
    run again after the install needs no note."""
    ipython = sys.modules.get("IPython")
    in_a_shell = ipython is not None and ipython.get_ipython() is not None
    return " Then restart the kernel (Kernel > Restart Kernel)." if in_a_shell else ""


__all__ = [
    "quantization_config", "check_quantize", "use_fused_int8_kernel", "FusedInt8Linear", "saved_quantization",
    "quantize_name", "tensor_bytes", "weights_bytes", "torchao_version", "torchao_missing", "QUANTIZE_CHOICES",
    "SKIP_MODULES", "VISION_PREFIX", "BITS_PER_WEIGHT", "TORCHAO_MIN_VERSION",
]
