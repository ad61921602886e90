"""What is this machine, and can it run Phi-3(.5)-vision? One call answers both.

    from phi_helpers import environment_report
    info = environment_report()      # prints a table and returns the same facts as a dict

Memory figures are in GiB (2**30 bytes), the unit ``nvidia-smi`` and most tools use for GPU memory.
They are computed, not looked up: ``memory_estimate`` counts the parameters of the model built from
its config (on the meta device: no memory, no download), multiplies them by the bytes per weight of
each dtype and quantization, and adds the KV cache and activations for a number of crops and a prompt.

    from phi_helpers.api.report import memory_estimate
    memory_estimate(num_crops=16, prompt_tokens=64, new_tokens=512)["activations_gib"]

Whether a format fits (``memory_verdict``) compares what running needs, weights + activations, with
the memory *available* (free RAM, or free memory on the GPU), not the total: "fits" leaves
``HEADROOM_GIB`` for what the estimate does not count (Python and its libraries, the CUDA context,
allocator slack, the notebook), "tight" leaves less, "does not fit" means the estimate alone is larger.
``load_model`` warns with the same numbers before it loads (``memory_need``, ``available_memory``).

``format_table`` is the package's one text-table printer (this report, ``phi-helpers eval``, the
attention comparison of notebook 05).

The machine facts ``load_model`` decides by live here too, so that the report and ``load_model`` follow
one rule: ``mps_available`` and ``pick_attention`` (flash_attention_2 where flash-attn is installed, on an
Ampere or newer CUDA GPU in half precision, else sdpa).
"""

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

import torch
import transformers
from transformers.utils import is_flash_attn_2_available

from ..errors import FlashAttentionUnavailableError, InvalidArgumentError
from ..models.phi3_v import Phi3VConfig, Phi3VForCausalLM
from ..models.phi3_v.image_processing_phi3_v import max_image_tokens
from ..models.phi3_v.modeling_phi3_v import HALF_DTYPES, check_flash_attention
from ..models.phi3_v.processing_phi3_v import VENDORED_CHECKPOINT
from ..versions import TESTED_VERSIONS
from .choices import ATTENTIONS
from .quantization import BITS_PER_WEIGHT, SKIP_MODULES, VISION_PREFIX

GIB = 2**30  # bytes in a GiB, the unit of every memory figure here
# The request the activations are computed for unless told otherwise: one image of NUM_CROPS crops, a
# question of PROMPT_TOKENS text tokens, an answer of NEW_TOKENS tokens.
NUM_CROPS, PROMPT_TOKENS, NEW_TOKENS = 4, 64, 512
# Memory that running needs beyond weights + activations: Python, torch and transformers (about 1 GiB of
# the process), the CUDA context (0.3-0.5 GiB), allocator slack. With it the docs' rules come out: fp32 on
# CPU wants about 20 GB free (README), bf16 a GPU of 12 GB, int8 an 8 GB GPU (notebook 00).
HEADROOM_GIB = 2.0
# Bytes of the activations per compute dtype (the dtype of the unquantized parameters; fp16 as bf16).
_ACTIVATION_BYTES = {"bfloat16": 2, "float32": 4}
NEEDS_CUDA = "needs a CUDA GPU"  # the verdict of a weight format that cannot load here (int4 without CUDA)
# Weight formats of the table: (name, quantize or None, bytes of every parameter it does not quantize).
_WEIGHT_FORMATS = (
    ("float32", None, 4),
    ("bfloat16", None, 2),
    ("float16", None, 2),
    ("int8 + bf16", "int8", 2),
    ("int8 + fp32", "int8", 4),
    ("int4 + bf16", "int4", 2),
)


def environment_report(
    print_report: bool = True, num_crops: int = NUM_CROPS, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS
) -> dict:
    """Collect versions, devices and memory facts; print them as a table unless ``print_report=False``.

    ``num_crops``, ``prompt_tokens`` and ``new_tokens`` describe the request the activation memory is
    computed for: one image, a question of ``prompt_tokens`` text tokens, an answer of ``new_tokens``.

    Returns a dict with the keys shown in the table (``python``, ``torch``, ``cuda_available``,
    ``gpu_name``, ``gpu_memory_gib``, ``gpu_free_gib``, ``bf16_supported``, ``ram_available_gib``,
    ``weights_gib``, ``activations_gib``, ``need_gib`` ...), ``attention`` and ``attention_reason`` (what
    ``load_model(attn="auto")`` picks on GPU 0, and why; None without a CUDA GPU; ``flash_attn_available``:
    it picks flash_attention_2), ``fits`` (per weight format: "fits", "tight"
    or "does not fit" in the free GPU memory, or the available RAM without a GPU; ``NEEDS_CUDA`` for int4
    without one) and ``warnings``, a list
    of messages (printed below the table), e.g. when Python, torch or transformers is not the tested version.
    """
    memory = memory_estimate(num_crops=num_crops, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    report = {**_software(), **_devices(), **_host(), **memory}
    available, _ = _memory_for_the_model(report)
    report["fits"] = {
        name: memory_verdict(need, available) if available else None for name, need in report["need_gib"].items()
    }
    if not report["cuda_available"]:  # int4 needs bitsandbytes on a CUDA GPU (quantization_config refuses it)
        report["fits"].update({name: NEEDS_CUDA for name, quantize, _ in _WEIGHT_FORMATS if quantize == "int4"})
    report["warnings"] = _version_warnings(report)
    if print_report:
        print(_format(report))
    return report


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
    groups = parameter_groups(config)
    weights = {name: _weights_gib(groups, quantize, other_bytes) for name, quantize, other_bytes in _WEIGHT_FORMATS}
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
            name: round(weights[name] + activations[compute[other_bytes]], 1) for name, _, other_bytes in _WEIGHT_FORMATS
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
    weights = _weights_gib(parameter_groups(config), quantize, dtype.itemsize)
    activations = _activations_gib(config, num_crops, prompt_tokens, new_tokens, dtype.itemsize)
    return {"weights_gib": weights, "activations_gib": activations, "need_gib": weights + activations}


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
        return _gpu_free_bytes(index) / GIB, f"free on GPU {index}"
    available = _available_ram_bytes()
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
                "Use attn='sdpa' (PyTorch's built-in fast attention), which gives the same answers."
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


def _software() -> dict:
    """Versions and install locations of Python and the libraries phi_helpers needs."""
    package_dir = Path(__file__).resolve().parents[1]  # phi_helpers/
    try:
        version = importlib.metadata.version("phi_helpers")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed (imported from the source folder)"
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "phi_helpers": version,
        "phi_helpers_path": str(package_dir),
    }


def _version_warnings(report: dict) -> list[str]:
    """One message for Python, and per library (torch, transformers), whose version is not the tested one."""
    messages = []
    if ".".join(report["python"].split(".")[:2]) != TESTED_VERSIONS["python"]:
        messages.append(
            f"Python {report['python']} runs this, but the lock is resolved for Python {TESTED_VERSIONS['python']}: "
            "some pinned versions may be missing or behave differently here. If something fails, use Python "
            f"{TESTED_VERSIONS['python']} (with run.sh: rm -rf .venv, then PYTHON=python{TESTED_VERSIONS['python']} ./run.sh lab)."
        )
    for name in ("torch", "transformers"):
        installed, tested = report[name].split("+")[0], TESTED_VERSIONS[name]  # "2.13.0+cpu" is 2.13.0
        if installed != tested:
            messages.append(
                f"{name} {report[name]} is installed, but phi_helpers is tested with {name} {tested}. "
                "If something fails, use the tested versions: ./run.sh lab (or ./run.sh test) sets up .venv "
                "from the lock, or run pip install -r requirements.txt in your environment."
            )
    return messages


def _devices() -> dict:
    """CUDA GPU (name, memory, bf16), Apple MPS, and the attention ``load_model`` picks on GPU 0."""
    cuda = torch.cuda.is_available()
    properties = torch.cuda.get_device_properties(0) if cuda else None
    bf16 = bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    attention, attention_reason = None, None
    if cuda:  # what load_model(attn="auto") picks on GPU 0, in the half precision it loads in there (pick_dtype)
        attention, attention_reason = pick_attention("auto", "cuda", torch.bfloat16 if bf16 else torch.float16)
    return {
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_name": properties.name if cuda else None,
        "gpu_memory_gib": round(properties.total_memory / GIB, 1) if cuda else None,
        "gpu_free_gib": round(_gpu_free_bytes(0) / GIB, 1) if cuda else None,
        "bf16_supported": bf16,
        "mps_available": mps_available(),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "flash_attn_available": attention == "flash_attention_2",
        "attention": attention,
        "attention_reason": attention_reason,
    }


def _host() -> dict:
    """Usable CPU cores, total and available RAM of this machine."""
    if hasattr(os, "sched_getaffinity"):  # cores this process may use (containers often limit it)
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count()
    ram, available = _total_ram_bytes(), _available_ram_bytes()
    return {
        "cpu_count": cpus,
        "ram_gib": round(ram / GIB, 1) if ram else None,
        "ram_available_gib": round(available / GIB, 1) if available else None,
    }


def _available_ram_bytes() -> int | None:
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


def _gpu_free_bytes(index: int) -> int:
    """Free memory of CUDA GPU ``index`` (other programs' memory excluded); its total if the driver
    cannot say."""
    try:
        return torch.cuda.mem_get_info(index)[0]
    except (RuntimeError, AssertionError):  # AssertionError: a PyTorch without CUDA
        return torch.cuda.get_device_properties(index).total_memory


def _total_ram_bytes() -> int | None:
    """Total RAM from /proc/meminfo (Linux) or sysconf (macOS and other Unix); None if unknown."""
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
        return None


def _format(report: dict) -> str:
    """The report as an aligned two-column text table."""
    yes_no = {True: "yes", False: "no"}
    gpu = f"{report['gpu_name']} ({report['gpu_memory_gib']} GiB, {report['gpu_free_gib']} free)" if report["cuda_available"] else "none"
    if report["cuda_available"]:  # pick_attention's answer: the attention load_model takes, and why
        flash = (
            f"available (load_model picks {report['attention']})" if report["flash_attn_available"]
            else f"not used, load_model picks {report['attention']}: {report['attention_reason']}"
        )
    else:
        flash = "installed, but needs a CUDA GPU" if report["flash_attn_installed"] else "not installed (optional, CUDA only)"
    rows = [
        ("Python", f"{report['python']} ({report['python_executable']})"),
        ("torch", report["torch"]),
        ("transformers", report["transformers"]),
        ("phi_helpers", f"{report['phi_helpers']} ({report['phi_helpers_path']})"),
        ("CUDA available", f"yes (CUDA {report['cuda_version']})" if report["cuda_available"] else "no"),
        ("GPU", gpu + (f", {report['gpu_count']} GPUs" if report["gpu_count"] > 1 else "")),
        ("bf16 on GPU (native)", yes_no[report["bf16_supported"]]),
        ("Apple MPS", yes_no[report["mps_available"]]),
        ("flash-attn", flash),
        ("CPU cores", str(report["cpu_count"])),
        ("RAM", _ram(report)),
    ]
    for dtype, gib in report["weights_gib"].items():
        rows.append((f"weights in {dtype}", f"{gib} GiB{_fits(report, dtype)}"))
    request = f"num_crops={report['num_crops']}, {report['sequence_tokens']} tokens"
    for dtype, gib in report["activations_gib"].items():
        rows.append((f"activations in {dtype}", f"{gib} GiB (KV cache + activations, {request})"))
    lines = ["phi_helpers environment report", "=" * 30, format_table(rows)]
    groups = report["parameter_groups"]
    note = (
        f"Phi-3(.5)-vision has {report['model_parameters']:,} parameters: {groups['decoder_linear']:,} in the language "
        f"model's Linear layers (quantize='int8'/'int4' stores these in 8/4 bits; int8 also the {groups['lm_head']:,} "
        f"of lm_head), {groups['vision']:,} in the vision "
        "tower and projection. The activations (KV cache, image tokens) come on top of the weights, for one image "
        "and one answer; long chats and many images need more. 'fits': weights + activations leave "
        f"{HEADROOM_GIB:g} GiB of the free memory for Python, the libraries and the CUDA context; 'tight': less; "
        "'does not fit': the estimate alone is larger."
    )
    lines += ["", textwrap.fill(note, width=90, initial_indent="Note: ", subsequent_indent="      ")]
    for warning in report["warnings"]:
        lines.append(textwrap.fill(warning, width=90, initial_indent="Warning: ", subsequent_indent="         "))
    return "\n".join(lines)


def format_table(rows: list, header: list[str] | None = None) -> str:
    """Rows of cells as aligned columns, two spaces apart; a dashed line under the ``header`` if any.

    Numeric columns (every cell an int or float) are right-aligned, the others left-aligned. A row
    with fewer cells than the others ends with a cell that spans the remaining columns (a note such
    as "not available: ..."); it does not widen the columns.

    >>> print(format_table([["a", 1], ["bcd", 10]], ["name", "n"]))
    name   n
    ----  --
    a      1
    bcd   10
    """
    rows = [list(row) for row in rows]
    columns = max([len(header or [])] + [len(row) for row in rows])
    full = [row for row in rows if len(row) == columns]
    numeric = [bool(full) and all(_is_number(row[c]) for row in full) for c in range(columns)]
    table = ([list(header)] if header else []) + full
    widths = [max(len(str(row[c])) for row in table) for c in range(columns)]

    def line(row: list) -> str:
        cells = [
            str(cell).rjust(width) if is_number else str(cell).ljust(width)
            for cell, width, is_number in zip(row[:-1], widths, numeric)
        ]
        last = str(row[-1])
        if len(row) == columns:
            last = last.rjust(widths[-1]) if numeric[-1] else last
        return "  ".join([*cells, last]).rstrip()

    lines = [line(row) for row in rows]
    if header:
        lines = [line(list(header)), "  ".join("-" * width for width in widths)] + lines
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ram(report: dict) -> str:
    if not report["ram_gib"]:
        return "unknown"
    available = f", {report['ram_available_gib']} available" if report["ram_available_gib"] else ""
    return f"{report['ram_gib']} GiB{available}"


def _memory_for_the_model(report: dict) -> tuple[float | None, str]:
    """``(GiB, where)`` the model would use: the free memory of GPU 0 (what ``load_model`` picks), else
    the available RAM (the total where that is unknown)."""
    if report["cuda_available"]:
        return report["gpu_free_gib"], "GPU"
    return report["ram_available_gib"] or report["ram_gib"], "RAM"


def _fits(report: dict, name: str) -> str:
    """Whether weight format ``name`` fits, with the two numbers behind the verdict."""
    memory, where = _memory_for_the_model(report)
    if report["fits"][name] in (None, NEEDS_CUDA):
        return f"  ({NEEDS_CUDA})" if report["fits"][name] else ""
    free = "free" if where == "GPU" else "available"
    if name.startswith("int8") and report["mps_available"] and not report["cuda_available"]:
        where += " with device='cpu'"  # quantized weights have no Apple GPU (MPS) kernels
    return f"  ({report['fits'][name]} in {where}: needs {report['need_gib'][name]} GiB with activations, {memory} {free})"


__all__ = [
    "environment_report", "memory_estimate", "memory_need", "memory_verdict", "available_memory", "format_table",
    "mps_available", "pick_attention",
]
