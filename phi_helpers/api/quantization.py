"""Weight-only quantization: int8 / int4 weights through transformers' own ``quantization_config``.

    model, processor = load_model(quantize="int8")   # about half the memory of bf16, a quarter of fp32

Only the language model's ``nn.Linear`` weights are quantized; activations, the KV cache, the embeddings,
``lm_head``, the CLIP vision tower and the image projection stay in the model's dtype
(``SKIP_MODULES``; docs/quantization.md has the measurements behind that choice).

Which library does the work:

==========  ===========================================  =============================================
quantize    CPU                                          CUDA GPU
==========  ===========================================  =============================================
"int8"      torchao ``Int8WeightOnlyConfig``             bitsandbytes LLM.int8() if installed, else torchao
"int4"      not available (no int4 CPU kernels in        bitsandbytes NF4 (``pip install bitsandbytes``)
            torchao 0.18 for this PyTorch): use int8
==========  ===========================================  =============================================

Apple GPUs (MPS) have neither backend: use ``dtype="fp16"`` there. Every refusal is a
``QuantizationUnavailableError`` that says what to install or what to use instead.
"""

import importlib.util

import torch
from transformers import BitsAndBytesConfig, TorchAoConfig

from ..errors import InvalidArgumentError, QuantizationBackendMissingError, QuantizationUnavailableError

QUANTIZE_CHOICES = ("int8", "int4")
# Module paths (prefixes) that keep the model's dtype: the vision tower and the image projection
# (about 8 % of the parameters), and the output head.
SKIP_MODULES = ["model.vision_embed_tokens", "lm_head"]
# Bytes per quantized weight, scales included: int8 has one scale per output row (negligible),
# NF4 one absmax per 64 weights (+ double quantization: about 0.13 bit).
BITS_PER_WEIGHT = {"int8": 8.0, "int4": 4.13}
_INSTALL_TORCHAO = "pip install 'phi_helpers[quantize]'  (installs torchao)"


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
        raise QuantizationUnavailableError(
            f"quantize={name!r} is not available on Apple GPUs (MPS): neither torchao nor bitsandbytes has MPS "
            "kernels. Use dtype='fp16' (half the memory of fp32), or device='cpu' with quantize='int8'."
        )
    if kind == "cuda" and _installed("bitsandbytes"):
        return _bitsandbytes(name, dtype), f"{name} weights (bitsandbytes)"
    if name == "int4":
        where = "a CUDA GPU" if kind == "cuda" else "CPU"
        raise (QuantizationBackendMissingError if kind == "cuda" else QuantizationUnavailableError)(
            f"quantize='int4' on {where} is not available: it needs bitsandbytes on a CUDA GPU "
            "(`pip install bitsandbytes`). "
            + ("On CPU use quantize='int8' (torchao), a quarter of the fp32 weights' memory."
               if kind == "cpu" else "Or use quantize='int8', which torchao can do.")
        )
    if not _installed("torchao"):
        raise QuantizationBackendMissingError(
            f"quantize='int8' needs torchao: {_INSTALL_TORCHAO}"
            + (", or `pip install bitsandbytes` on this CUDA machine." if kind == "cuda" else ".")
            + " Then restart the Python kernel."
        )
    from torchao.quantization import Int8WeightOnlyConfig  # an optional extra: imported only when asked for

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=SKIP_MODULES), "int8 weights (torchao)"


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
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_MODULES,
    )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


__all__ = ["quantization_config", "check_quantize", "QUANTIZE_CHOICES", "SKIP_MODULES", "BITS_PER_WEIGHT"]
