"""What this machine has (devices, memory) and what Phi-3(.5)-vision needs of it.

``load_model`` decides by these facts and ``environment_report`` shows them, so both follow one rule:

* ``pick_attention``: flash_attention_2 where flash-attn is installed, on an Ampere or newer CUDA GPU in
  half precision; else sdpa. ``mps_available``: whether PyTorch can use the Apple GPU.
* ``memory_estimate`` / ``memory_need``: computed, not looked up. They count the parameters of the model
  built from its config (on the meta device: no memory, no download), multiply them by the bytes per
  weight of each dtype and quantization, and add the KV cache and activations for a number of crops and
  a prompt. Figures are in GiB (2**30 bytes), the unit ``nvidia-smi`` and most tools use.

      from phi_helpers.api.hardware import memory_estimate
      memory_estimate(num_crops=16, prompt_tokens=64, new_tokens=512)["activations_gib"]

* ``memory_verdict`` compares what running needs, weights + activations, with the memory *available*
  (``available_memory``: free RAM, or free memory on the GPU), not the total: "fits" leaves
  ``HEADROOM_GIB`` for what the estimate does not count (Python and its libraries, the CUDA context,
  allocator slack, the notebook), "tight" leaves less, "does not fit" means the estimate alone is larger.
"""

import functools
import json
import os

import torch
from transformers.utils import is_flash_attn_2_available

from ..errors import FlashAttentionUnavailableError, InvalidArgumentError, check_whole_number
from ..models.phi3_v import Phi3VConfig, Phi3VForCausalLM
from ..models.phi3_v.image_processing_phi3_v import check_num_crops, max_image_tokens
from ..models.phi3_v.modeling_phi3_v import HALF_DTYPES, check_flash_attention
from ..models.phi3_v.processing_phi3_v import VENDORED_CHECKPOINT
from .choices import ATTENTIONS, BATCH_MAX_NEW_TOKENS
from .quantization import BITS_PER_WEIGHT, SKIP_MODULES, VISION_PREFIX

GIB = 2**30  # bytes in a GiB, the unit of every memory figure here
# The request the activations are computed for unless told otherwise: one image of NUM_CROPS crops, a
# question of PROMPT_TOKENS text tokens, an answer of NEW_TOKENS tokens (the command line's longest).
NUM_CROPS, PROMPT_TOKENS, NEW_TOKENS = 4, 64, BATCH_MAX_NEW_TOKENS
# Memory that running needs beyond weights + activations: Python, torch and transformers (about 1 GiB of
# the process), the CUDA context (0.3-0.5 GiB), allocator slack. With it the docs' rules come out: fp32 on
# CPU wants about 20 GB free (README), bf16 a GPU of 12 GB, int8 an 8 GB GPU (notebook 00).
HEADROOM_GIB = 2.0
# Bytes of the activations per compute dtype (the dtype of the unquantized parameters; fp16 as bf16).
_ACTIVATION_BYTES = {"bfloat16": 2, "float32": 4}
# Weight formats of the table: (name, quantize or None, bytes of every parameter it does not quantize).
WEIGHT_FORMATS = (
    ("float32", None, 4),
    ("bfloat16", None, 2),
    ("float16", None, 2),
    ("int8 + bf16", "int8", 2),
    ("int8 + fp32", "int8", 4),
    ("int4 + bf16", "int4", 2),
)


def memory_estimate(
    config=None, num_crops: int = NUM_CROPS, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS
) -> dict:
    """Weights and activation memory of Phi-3(.5)-vision, computed from its config.

    Args:
        config: a ``Phi3VConfig`` (default: Phi-3-vision-128k-instruct's config.json, shipped with
            phi_helpers; Phi-3.5-vision has the same sizes).
        num_crops, prompt_tokens, new_tokens: one image cut into at most ``num_crops`` tiles, a question
            of ``prompt_tokens`` text tokens, an answer of ``new_tokens`` tokens.

    Returns a dict: ``model_parameters``; ``parameter_groups`` (``decoder_linear``: the Linear layers of
    the language model's decoder, which ``quantize=`` stores in 8/4 bits; ``lm_head``: the output head,
    8 bits with int8; ``vision``: CLIP tower + projection; ``other``: embeddings, norms); ``weights_gib``
    per weight format (``"int8 + bf16"``: what int8 quantizes in int8, the other parameters in bf16);
    ``sequence_tokens``; ``activations_gib`` per compute dtype: KV cache + CLIP hidden states + the
    largest MLP intermediate; ``need_gib`` per weight format: its weights + the activations in its
    compute dtype, what running needs (``memory_verdict`` compares it with the free memory).
    """
    config = config or _default_config()
    num_crops, prompt_tokens, new_tokens = _check_request(num_crops, prompt_tokens, new_tokens)
    groups = parameter_groups(config)
    weights = {name: _weights_gib(groups, quantize, other_bytes) for name, quantize, other_bytes in WEIGHT_FORMATS}
    activations = {
        dtype: _activations_gib(config, num_crops, prompt_tokens, new_tokens, size) for dtype, size in _ACTIVATION_BYTES.items()
    }
    compute = {size: dtype for dtype, size in _ACTIVATION_BYTES.items()}
    return {
        "model_parameters": sum(groups.values()),
        "parameter_groups": groups,
        "weights_gib": {name: round(gib, 1) for name, gib in weights.items()},
        "num_crops": num_crops,
        "sequence_tokens": max_image_tokens(num_crops) + prompt_tokens + new_tokens,
        "activations_gib": {dtype: round(gib, 2) for dtype, gib in activations.items()},
        "need_gib": {
            name: round(weights[name] + activations[compute[other_bytes]], 1) for name, _, other_bytes in WEIGHT_FORMATS
        },
    }


def memory_need(
    config=None, dtype: torch.dtype = torch.float32, quantize: str | None = None, num_crops: int = NUM_CROPS,
    prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS,
) -> dict:
    """``weights_gib``, ``activations_gib`` and their sum ``need_gib`` (not rounded: a tiny model's are
    a few MiB) for the model loaded in ``dtype`` with ``quantize`` (None, "int8", "int4"), for the request
    of ``memory_estimate``: what ``load_model`` compares with the available memory before it loads."""
    config = config or _default_config()
    num_crops, prompt_tokens, new_tokens = _check_request(num_crops, prompt_tokens, new_tokens)
    weights = _weights_gib(parameter_groups(config), quantize, dtype.itemsize)
    activations = _activations_gib(config, num_crops, prompt_tokens, new_tokens, dtype.itemsize)
    return {"weights_gib": weights, "activations_gib": activations, "need_gib": weights + activations}


def _check_request(num_crops, prompt_tokens, new_tokens) -> tuple[int, int, int]:
    """The request of a memory estimate as ints, or InvalidArgumentError saying what each must be."""
    return (
        check_num_crops(num_crops),
        check_whole_number(prompt_tokens, "prompt_tokens"),
        check_whole_number(new_tokens, "new_tokens", minimum=1),
    )


def memory_verdict(need_gib: float, available_gib: float) -> str:
    """"fits", "tight" or "does not fit": ``need_gib`` (weights + activations) against ``available_gib``.

    "fits" leaves at least ``HEADROOM_GIB`` for what the estimate does not count; "tight" leaves less
    (it may run with nothing else open); "does not fit": the estimate alone is larger.

    >>> memory_verdict(16.5, 10.0), memory_verdict(8.3, 10.0), memory_verdict(5.9, 10.0)
    ('does not fit', 'tight', 'fits')
    """
    if need_gib + HEADROOM_GIB <= available_gib:
        return "fits"
    return "tight" if need_gib <= available_gib else "does not fit"


def available_memory(device: str = "cpu") -> tuple[float | None, str]:
    """``(GiB, what it is)``: the memory ``device`` can still give, None if unknown. A CUDA GPU: its free
    memory (``"cuda:1"``: GPU 1; ``"cuda"``: GPU 0, as ``load_model`` reports it); otherwise the RAM the
    system can give (Apple GPUs share it)."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return gpu_free_bytes(index) / GIB, f"free on GPU {index}"
    available = available_ram_bytes()
    return (available / GIB if available else None), "of RAM available"


def mps_available() -> bool:
    """Whether PyTorch can use the Apple GPU (MPS) on this machine."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_attention(attn: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Return ``(attention implementation, reason)``. flash_attention_2 needs flash-attn, fp16/bf16 and a
    CUDA GPU of the Ampere generation or newer (compute capability 8.0+; ``device`` names which GPU).

    The one rule for it: ``load_model`` asks it, and ``environment_report`` shows its answer for GPU 0."""
    name = str(attn).strip().lower()
    if name not in ATTENTIONS:
        raise InvalidArgumentError(f"Unknown attention {attn!r}. Choose one of {', '.join(map(repr, ATTENTIONS))}.")
    on_cuda = device.startswith("cuda")
    if name == "flash_attention_2":
        check_flash_attention(is_flash_attn_2_available(), on_cuda, dtype)
        older = _older_than_ampere(device)
        if older:
            raise FlashAttentionUnavailableError(
                f"attn='flash_attention_2' needs an NVIDIA GPU of the Ampere generation or newer (compute capability "
                f"8.0+: A100, RTX 30xx/40xx, L4, H100...), but {older}; flash-attn 2 would fail when the model runs. "
                "Use attn='sdpa' (PyTorch's built-in fast attention): the same model, its answers equal up to rounding."
            )
        return name, "asked for"
    if name != "auto":
        return name, "asked for"
    if not on_cuda:
        return "sdpa", "flash-attn needs a CUDA GPU"
    if dtype not in HALF_DTYPES:
        return "sdpa", "flash-attn needs fp16/bf16"
    if not is_flash_attn_2_available():
        return "sdpa", "flash-attn not installed"
    if _older_than_ampere(device):
        return "sdpa", "GPU older than Ampere (flash-attn 2 needs compute capability 8.0+)"
    return "flash_attention_2", "flash-attn installed"


def _older_than_ampere(device: str) -> str | None:
    """How the CUDA GPU ``device`` ("cuda" is GPU 0, "cuda:1" GPU 1) falls short if it is older than Ampere
    (T4, V100, RTX 20xx: compute capability below 8.0, which flash-attn 2 does not support); else None.
    flash-attn's own availability check looks only at the package and CUDA, not at the GPU."""
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= (8, 0):
        return None
    return f"{device} ({torch.cuda.get_device_name(index)}) has compute capability {major}.{minor}"


def _weights_gib(groups: dict, quantize: str | None, other_bytes: int) -> float:
    """GiB of the weights when ``quantize`` stores its modules in ``BITS_PER_WEIGHT`` bits and every
    other parameter takes ``other_bytes``."""
    quantized = 0
    if quantize is not None:
        quantized = groups["decoder_linear"] + (0 if "lm_head" in SKIP_MODULES[quantize] else groups["lm_head"])
    total = sum(groups.values())
    return (quantized * BITS_PER_WEIGHT.get(quantize, 0) / 8 + (total - quantized) * other_bytes) / GIB


def _activations_gib(config, num_crops: int, prompt_tokens: int, new_tokens: int, size: int) -> float:
    prompt = max_image_tokens(num_crops) + prompt_tokens
    return _activation_bytes(config, num_crops, prompt, prompt + new_tokens, size) / GIB


def parameter_groups(config) -> dict:
    """Parameter counts ``{"decoder_linear", "lm_head", "vision", "other"}`` of the model built on the meta device."""
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    groups = {"decoder_linear": 0, "lm_head": 0, "vision": 0, "other": 0}
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for name, parameter in model.named_parameters():
        if name.startswith(VISION_PREFIX):
            groups["vision"] += parameter.numel()
        elif name.startswith("lm_head."):
            groups["lm_head"] += parameter.numel()
        elif name in linear_weights:
            groups["decoder_linear"] += parameter.numel()
        else:
            groups["other"] += parameter.numel()
    return groups


def _activation_bytes(config, num_crops: int, prompt: int, sequence: int, size: int) -> int:
    """KV cache for ``sequence`` tokens + two CLIP hidden states (a layer's input and output: the vision
    tower runs its layers one by one and keeps no other) + the larger of the CLIP and the prefill MLP
    intermediates, in ``size`` bytes."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv_cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * sequence
    vision = config.vision_config
    tiles = num_crops + 1  # local tiles (zero-padded to num_crops) + the global image
    positions = (vision.image_size // vision.patch_size) ** 2 + 1  # 576 patches + CLS
    clip_states = 2 * tiles * positions * vision.hidden_size
    mlp = max(tiles * positions * vision.intermediate_size, prompt * 3 * config.intermediate_size)  # gate_up + act
    return (kv_cache + clip_states + mlp) * size


@functools.cache
def _default_config() -> Phi3VConfig:
    return Phi3VConfig(**json.loads((VENDORED_CHECKPOINT / "config.json").read_text()))


def available_ram_bytes() -> int | None:
    """RAM the system can give a new program without swapping (Linux's MemAvailable: free memory plus
    caches it can drop; psutil reads the same on macOS and Windows); None if unknown."""
    try:
        import psutil  # a dependency of accelerate, which phi_helpers requires; not of phi_helpers itself
    except ImportError:
        return None
    try:
        return psutil.virtual_memory().available
    except (OSError, RuntimeError):
        return None


def gpu_free_bytes(index: int) -> int:
    """Free memory of CUDA GPU ``index`` (other programs' memory excluded); its total if the driver
    cannot say."""
    try:
        return torch.cuda.mem_get_info(index)[0]
    except (RuntimeError, AssertionError):  # AssertionError: a PyTorch without CUDA
        return torch.cuda.get_device_properties(index).total_memory


def total_ram_bytes() -> int | None:
    """Total RAM from /proc/meminfo (Linux), sysconf (macOS and other Unix) or psutil (Windows); None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file gives kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil  # (see available_ram_bytes)

        return psutil.virtual_memory().total
    except (ImportError, OSError, RuntimeError):
        return None


__all__ = [
    "GIB", "HEADROOM_GIB", "available_memory", "memory_estimate", "memory_need", "memory_verdict", "mps_available",
    "pick_attention",
]
