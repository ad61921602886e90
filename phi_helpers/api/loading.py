"""Load Phi-3-vision / Phi-3.5-vision with sensible settings for the machine you are on.

    from phi_helpers import load_model
    model, processor = load_model()     # prints one line saying what it chose and why

Three choices are made for you, each by a small function you can call yourself:

* ``pick_device``: the first available of CUDA GPU, Apple GPU (MPS), CPU;
* ``pick_dtype``: bfloat16 on GPUs that support it, float16 on older GPUs and MPS, float32 on CPU
  (bfloat16 on CPU for a quantized model);
* ``pick_attention``: flash_attention_2 when flash-attn is installed (CUDA, half precision), else sdpa.

The weights go straight from the checkpoint files to the chosen device (``device_map``): on a GPU
machine the host RAM holds one tensor at a time, not the whole model. ``quantize="int8"`` (or
``"int4"`` on CUDA) stores the language model's weights in 8 (4) bits; see ``phi_helpers.api.quantization``.

Which checkpoint: the ``model_id`` you pass; without one, the environment variable
``PHI_HELPERS_MODEL`` (a hub id or a local folder), so notebooks can switch models without edits; else
Phi-3.5-vision-instruct. ``"tiny"`` (as argument or variable) builds a tiny *random* model once, for CI
and offline dry runs; its answers are meaningless.
"""

import contextlib
import ctypes
import gc
import json
import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoProcessor
from transformers.utils import is_flash_attn_2_available

from .. import testing
from ..errors import DeviceUnavailableError, InvalidArgumentError, ModelLoadError, check_whole_number
from ..models.phi3_v.modeling_phi3_v import HALF_DTYPES as _HALF, Phi3VForCausalLM, check_flash_attention
from .choices import ATTENTIONS as _ATTENTIONS, DEFAULT_MODEL_ID, DEVICES as _DEVICES, DTYPES as _DTYPES
from .quantization import check_quantize, quantization_config, use_fused_int8_kernel

_DTYPE_CHOICES = "Choose 'auto', 'bf16', 'fp16' or 'fp32' (or 'bfloat16', 'float16', 'float32', or a torch dtype)."
_TINY_DIR_NAME = "tiny-phi-3.5-vision"
_TINY_FILES = (
    "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"
)
_COMPLETE_MARKER = ".phi_helpers_complete"


def load_model(
    model_id=None,
    device: str = "auto",
    dtype="auto",
    attn: str = "auto",
    num_crops: int | None = None,
    quantize: str | None = None,
):
    """Load the model and its processor; return ``(model, processor)``.

    Args:
        model_id: a Hugging Face hub id, a local folder, or "tiny". ``None``: ``$PHI_HELPERS_MODEL`` if
            set, else "microsoft/Phi-3.5-vision-instruct". An explicit ``model_id`` always wins.
        device: "auto", "cuda" (or "cuda:1"...), "mps" or "cpu". The weights are loaded straight onto it.
        dtype: "auto", "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32", or a torch dtype.
        attn: "auto", "sdpa", "eager" or "flash_attention_2".
        num_crops: image crops of 336x336 pixels (more = finer detail, more tokens). ``None`` keeps the
            checkpoint's value (4 for Phi-3.5-vision, 16 for Phi-3-vision).
        quantize: ``None``, "int8" (CPU: torchao; CUDA: bitsandbytes or torchao) or "int4" (CUDA with
            bitsandbytes). Weight-only, language model only; see ``phi_helpers.api.quantization``.

    All choices are checked before anything is downloaded. Prints one line saying what was chosen.
    """
    device, device_reason = pick_device(device)
    dtype, dtype_reason = pick_dtype(dtype, device, quantized=check_quantize(quantize) is not None)
    attn, attn_reason = pick_attention(attn, device, dtype)
    quantization, quantization_note = quantization_config(quantize, device, dtype)
    if num_crops is not None:
        check_whole_number(num_crops, "num_crops", minimum=1, hint=" (None: the checkpoint's value)")
    source, label = _resolve_source(model_id)
    if Path(source).is_dir():
        check_checkpoint_files(Path(source))
        hub_kwargs = {}
    else:
        hub_kwargs = _hub_access(source)

    processor_kwargs = {**hub_kwargs} if num_crops is None else {**hub_kwargs, "num_crops": num_crops}
    processor = _from_pretrained(AutoProcessor, source, **processor_kwargs)
    model_kwargs = {"dtype": dtype, "attn_implementation": attn, "device_map": device, **hub_kwargs}
    if quantization is not None:
        model_kwargs["quantization_config"] = quantization
    with _held_load_report() as load_reports:
        model, info = _from_pretrained(
            AutoModelForCausalLM, source, output_loading_info=True, ignore_mismatched_sizes=True, **model_kwargs
        )
    _check_loaded(model.eval(), info, label)
    for report in load_reports:  # nothing missing or reshaped: transformers' own report (unexpected keys...)
        logging.getLogger(report.name).handle(report)
    use_fused_int8_kernel(model)  # int8 weights on CPU: PyTorch's fused kernel while decoding
    return_freed_memory()

    used_attn = getattr(model.config, "_attn_implementation", attn)
    quantized = f" | {quantization_note}" if quantization is not None else ""
    print(
        f"Loaded {label} on {device} ({device_reason}) | {_dtype_name(dtype)} ({dtype_reason}) | "
        f"attention: {used_attn} ({attn_reason}){quantized} | num_crops={processor.image_processor.num_crops}"
    )
    return model, processor


def return_freed_memory() -> None:
    """Give the memory freed while loading back to the operating system (Linux).

    glibc keeps freed heap memory for reuse, so after loading the process stays as large as its loading
    peak: with ``quantize="int8"`` that peak holds each weight in full precision before it is quantized
    (0.50 GiB of the process's own memory instead of 0.17 GiB for the mid-size model in
    benchmarks/bench_quantization.py). ``malloc_trim(0)`` returns the free pages. Elsewhere (macOS,
    Windows, other C libraries) there is nothing to do.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): no malloc_trim
            pass


def pick_device(device: str = "auto") -> tuple[str, str]:
    """Return ``(device, reason)``. "auto" picks CUDA, then MPS, then CPU."""
    name = str(device).strip().lower()
    kind = name.split(":")[0]
    if kind not in _DEVICES or (":" in name and (kind != "cuda" or not name.split(":")[1].isdigit())):
        raise InvalidArgumentError(f"Unknown device {device!r}. Choose one of {', '.join(map(repr, _DEVICES))} (or 'cuda:N').")
    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda", _gpu_name()
        if _mps_available():
            return "mps", "Apple GPU"
        return "cpu", "no GPU found"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device='cuda' was asked for, but PyTorch sees no CUDA GPU. Use device='auto' or 'cpu', or "
                "install a CUDA build of PyTorch on a machine with an NVIDIA GPU "
                f"(this PyTorch is {torch.__version__})."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device={device!r} was asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist "
                f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})."
            )
        return name, _gpu_name(index)
    if kind == "mps" and not _mps_available():
        raise DeviceUnavailableError(
            "device='mps' was asked for, but the Apple GPU backend (MPS) is not available: it needs a Mac with "
            "Apple silicon and a recent PyTorch. Use device='auto' or 'cpu'."
        )
    return kind, "asked for"


def pick_dtype(dtype="auto", device: str = "cpu", quantized: bool = False) -> tuple[torch.dtype, str]:
    """Return ``(torch dtype, reason)`` for ``device``. "auto": bf16 / fp16 on GPUs, fp32 on CPU, bf16 on
    CPU for a quantized model (its other weights would otherwise take as much memory as the int8 ones)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, *_HALF):
            raise InvalidArgumentError(f"dtype {dtype} is not supported. {_DTYPE_CHOICES}")
        return dtype, "asked for"
    name = str(dtype).strip().lower()
    if name in _DTYPES:
        return _DTYPES[name], "asked for"
    if name != "auto":
        raise InvalidArgumentError(f"Unknown dtype {dtype!r}. {_DTYPE_CHOICES}")
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "GPU supports bf16"
        return torch.float16, "GPU has no native bf16"
    if device == "mps":
        return torch.float16, "half precision on Apple GPU"
    if quantized:
        return torch.bfloat16, "quantized model: the other weights in bf16"
    return torch.float32, "CPU default; dtype='bf16' halves the memory"


def pick_attention(attn: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Return ``(attention implementation, reason)``. flash_attention_2 needs flash-attn, CUDA and fp16/bf16."""
    name = str(attn).strip().lower()
    if name not in _ATTENTIONS:
        raise InvalidArgumentError(f"Unknown attention {attn!r}. Choose one of {', '.join(map(repr, _ATTENTIONS))}.")
    on_cuda = device.startswith("cuda")
    if name == "flash_attention_2":
        check_flash_attention(is_flash_attn_2_available(), on_cuda, dtype)
        return name, "asked for"
    if name != "auto":
        return name, "asked for"
    if not on_cuda:
        return "sdpa", "flash-attn needs a CUDA GPU"
    if dtype not in _HALF:
        return "sdpa", "flash-attn needs fp16/bf16"
    if not is_flash_attn_2_available():
        return "sdpa", "flash-attn not installed"
    return "flash_attention_2", "flash-attn installed"


def _gpu_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def requested_model_id(model_id=None) -> str:
    """The model ``load_model(model_id)`` loads: ``model_id`` itself; ``None``: ``$PHI_HELPERS_MODEL``
    if set, else ``DEFAULT_MODEL_ID``. (The command line records it in each request.)"""
    if model_id is not None:
        if not isinstance(model_id, (str, os.PathLike)) or not os.fspath(model_id).strip():
            raise InvalidArgumentError(
                f"model_id must be a hub id (e.g. '{DEFAULT_MODEL_ID}'), a folder or 'tiny'; got {model_id!r}."
            )
        return os.fspath(model_id)
    return os.environ.get("PHI_HELPERS_MODEL", "").strip() or DEFAULT_MODEL_ID


def _resolve_source(model_id) -> tuple[str, str]:
    """Return ``(what to pass to from_pretrained, how to name it)`` for ``requested_model_id(model_id)``."""
    source = requested_model_id(model_id)
    from_env = model_id is None and source != DEFAULT_MODEL_ID
    if source.strip().lower() == "tiny":
        return str(_tiny_checkpoint()), "tiny random Phi-3.5-vision" + (" (PHI_HELPERS_MODEL=tiny)" if from_env else "")
    return _check_source(source, local=isinstance(model_id, os.PathLike)), source + (" (from PHI_HELPERS_MODEL)" if from_env else "")


def _check_source(source: str, local: bool = False) -> str:
    """A source that is not a hub id (``owner/name``) must be an existing folder: the hub's own error for
    it is confusing, and looking it up would send a local folder's name to the hub. ``local``: a Path."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    hub_id = not local and source.count("/") == 1 and not source.startswith((".", "/", "~", "\\")) and not os.path.isabs(source)
    if not hub_id:
        raise ModelLoadError(
            f"No model folder at '{path}'. Check the path (relative paths start from '{Path.cwd()}'), or pass a "
            f"hub id such as '{DEFAULT_MODEL_ID}' (owner/name)."
        )
    return source


HUB_PROBE_SECONDS = 10


def _hub_access(repo_id: str) -> dict:
    """One quick request to the hub before loading ``repo_id`` from it (the hub's own lookups retry each
    file for about 20 s when the network is down: minutes in all). Returns extra ``from_pretrained``
    arguments: ``local_files_only`` when the hub cannot be reached and the Hugging Face cache holds
    the model. Raises ModelLoadError when the hub says there is no such model, or cannot be reached
    and the cache does not hold it. Nothing is asked with ``HF_HUB_OFFLINE=1``."""
    if huggingface_hub.is_offline_mode():
        return {}
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_PROBE_SECONDS)
        return {}
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"There is no model '{repo_id}' on the Hugging Face hub, or it is private (then log in first: "
            f"hf auth login). Check the id (e.g. '{DEFAULT_MODEL_ID}')."
        ) from None
    except HfHubHTTPError:  # the hub answered (a gated model, server trouble): from_pretrained says what
        return {}
    except Exception as error:  # noqa: BLE001  (no answer: the HTTP client's own connection and timeout errors)
        reason = " ".join(str(error).split()) or type(error).__name__
    if huggingface_hub.try_to_load_from_cache(repo_id, "config.json") is not None:
        print(f"huggingface.co cannot be reached ({reason}): loading '{repo_id}' from the Hugging Face cache.")
        return {"local_files_only": True}
    raise ModelLoadError(
        f"huggingface.co cannot be reached ({reason}) to download '{repo_id}', and the Hugging Face cache does "
        "not hold it. Check your internet connection (or proxy), or pass a local folder. For an offline dry run "
        "set PHI_HELPERS_MODEL=tiny."
    )

def check_checkpoint_files(folder: Path) -> None:
    """Raise ModelLoadError naming the file if a local checkpoint folder is visibly broken.

    Every ``*.json`` file must parse; ``config.json`` must exist; every weights shard named by
    ``model.safetensors.index.json`` must exist; every safetensors file must hold as many bytes as
    its header announces (a download or copy that stopped early is truncated). Cheap: only the
    headers of the weights are read.
    """
    if not (folder / "config.json").is_file():
        raise _broken_file_error(folder / "config.json", "it is missing")
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise _broken_file_error(path, f"it is not valid JSON ({error})") from None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "phi3_v":
        raise ModelLoadError(
            f"'{folder}' holds {f'a {model_type!r} model' if model_type else 'no model_type'} (config.json), not Phi-3-vision or Phi-3.5-vision "
            f"(model_type 'phi3_v'). Pass a folder holding one of those, or a hub id such as '{DEFAULT_MODEL_ID}'."
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({folder / name for name in weight_map.values()})
    else:
        shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        _check_safetensors(shard)


def _check_safetensors(path: Path) -> None:
    """The safetensors layout: 8 bytes of header length N, N bytes of JSON header, then the data,
    whose extent is the largest ``data_offsets`` end in the header."""
    if not path.is_file():
        raise _broken_file_error(path, "it is missing (model.safetensors.index.json lists it)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > size - 8:
                raise ValueError(f"its header announces {header_size:,} bytes but the file has {size:,}")
            header = json.loads(file.read(header_size))
        data_size = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as error:
        raise _broken_file_error(path, f"its header cannot be read ({error})") from None
    if size < 8 + header_size + data_size:
        raise _broken_file_error(path, f"it is truncated: {size:,} bytes instead of {8 + header_size + data_size:,}")


def _broken_file_error(path: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(
        f"The checkpoint file '{path}' is unusable: {problem}. Copy or download the checkpoint again "
        "(for a hub model: delete it from the Hugging Face cache and load it once more)."
    )


def _check_loaded(model, info: dict, label: str) -> None:
    """Raise ModelLoadError if ``model`` is not Phi-3(.5)-vision or its checkpoint lacks weights (they
    would be random: the model would answer with random words and nothing would say why)."""
    if not isinstance(model, Phi3VForCausalLM):
        raise ModelLoadError(
            f"'{label}' is a {model.config.model_type!r} model, not Phi-3-vision or Phi-3.5-vision. Pass one of "
            f"those (e.g. '{DEFAULT_MODEL_ID}') or a folder holding one."
        )
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelLoadError(
            f"The checkpoint '{label}' lacks {len(missing)} of the model's weights ({shown}); they would be "
            "random. Download or copy the checkpoint again (all its model-*.safetensors files)."
        )
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = ", ".join(f"{key} {list(found)} instead of {list(expected)}" for key, found, expected in mismatched[:3])
        raise ModelLoadError(
            f"The checkpoint '{label}' holds {len(mismatched)} weight(s) of another shape than its config.json "
            f"describes ({shown}{', ...' if len(mismatched) > 3 else ''}). The weights and config.json come from "
            "different models, or a file was edited: download or copy the checkpoint again."
        )


@contextlib.contextmanager
def _held_load_report():
    """Hold back transformers' LOAD REPORT table (logged by ``from_pretrained``) while loading: a missing
    or reshaped weight gets our one-line error instead; the caller logs the held reports otherwise."""
    held = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        yield held
    except BaseException:  # transformers' own error may point to its report ("look at the above report")
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def _from_pretrained(auto_class, source: str, **kwargs):
    """``auto_class.from_pretrained`` with download/lookup failures turned into a short ModelLoadError."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"Could not load '{source}': {error}\nCheck the model id (e.g. '{DEFAULT_MODEL_ID}') or folder, your "
            "internet connection and free disk space. For an offline dry run set PHI_HELPERS_MODEL=tiny."
        ) from None


def _tiny_checkpoint() -> Path:
    """Path of the cached tiny random checkpoint, built on first use (and rebuilt if incomplete).

    Lives in ``$PHI_HELPERS_CACHE/tiny-phi-3.5-vision`` (default cache: ``~/.cache/phi_helpers``).
    """
    _print_tiny_notice()
    cache = Path(os.environ.get("PHI_HELPERS_CACHE") or "~/.cache/phi_helpers").expanduser()
    target = cache / _TINY_DIR_NAME
    if _is_complete(target):
        return target
    building = cache / f".{_TINY_DIR_NAME}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    testing.make_tiny_checkpoint(building, variant="phi-3.5-vision")
    (building / _COMPLETE_MARKER).write_text("complete\n")
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target)  # left over from an interrupted build
    try:
        building.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(building, ignore_errors=True)
        if not _is_complete(target):
            raise
    return target


def _is_complete(folder: Path) -> bool:
    """True if a tiny checkpoint folder was written to the end (marker file and all files present)."""
    return (folder / _COMPLETE_MARKER).is_file() and all((folder / name).is_file() for name in _TINY_FILES)


def _print_tiny_notice() -> None:
    """A notice nobody can miss: the tiny model is random and its answers mean nothing."""
    lines = [
        "tiny: using a TINY RANDOM model, not Phi-3.5-vision.",
        "Its answers are MEANINGLESS. This mode is for CI and offline dry runs.",
        "Unset PHI_HELPERS_MODEL (or pass a real model id) to load the real model.",
    ]
    width = max(len(line) for line in lines) + 4
    border = "!" * (width + 2)
    print("\n".join([border, *(f"!! {line:<{width - 3}}!!" for line in lines), border]))


__all__ = ["load_model", "requested_model_id", "pick_device", "pick_dtype", "pick_attention"]
