"""Load Phi-3-vision / Phi-3.5-vision with sensible settings for the machine you are on.

    from phi_helpers import load_model
    model, processor = load_model()     # prints one line saying what it chose and why

Three choices are made for you, each by a small function you can call yourself:

* ``pick_device``: the first available of CUDA GPU, Apple GPU (MPS), CPU;
* ``pick_dtype``: bfloat16 on GPUs that support it, float16 on older GPUs and MPS, float32 on CPU
  (bfloat16 on CPU for a quantized model);
* ``pick_attention``: flash_attention_2 when flash-attn is installed (CUDA GPU of the Ampere generation
  or newer, half precision), else sdpa. It lives in ``phi_helpers.api.hardware``, with the machine
  facts ``environment_report`` shows, so the report shows the same choice.

Before loading, a local folder is checked for the files a checkpoint needs (``check_checkpoint_files``),
and one line warns when the model would not fit into the memory available (weights + activations,
``phi_helpers.api.hardware.memory_need``): an out-of-memory crash kills a notebook kernel without a word.
A folder saved from a quantized model (config.json's ``quantization_config``) loads its weights as
they are stored.

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
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import httpx, validate_repo_id  # httpx: the hub's HTTP client (httpx2 since hub 2.0)
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoProcessor

from .. import testing
from ..errors import (
    ConfigurationError, DeviceUnavailableError, InvalidArgumentError, ModelLoadError, PhiHelpersError,
    check_whole_number, expand_home,
)
from ..models.phi3_v.configuration_phi3_v import Phi3VConfig
from ..models.phi3_v.modeling_phi3_v import HALF_DTYPES as _HALF, Phi3VForCausalLM
from ..models.phi3_v.processing_phi3_v import VENDORED_CHECKPOINT
from .choices import DEFAULT_MODEL_ID, is_tiny_model, DEVICES as _DEVICES, DTYPE_SHORT_NAMES, DTYPES as _DTYPES, HUB_NUM_CROPS
from .quantization import QUANTIZE_CHOICES, check_quantize, quantization_config, saved_quantization, use_fused_int8_kernel
from .hardware import NUM_CROPS, available_memory, memory_need, mps_available, pick_attention

_DTYPE_CHOICES = "Choose 'auto', 'bf16', 'fp16' or 'fp32' (or 'bfloat16', 'float16', 'float32', or a torch dtype)."
_TINY_DIR_NAME = "tiny-phi-3.5-vision"
_COMPLETE_MARKER = ".phi_helpers_complete"  # written last: the build (_tiny_build), then the files written
# What a checkpoint folder must hold besides config.json, the weights and the image processor's settings
# (preprocessor_config.json in the hub's checkpoints; processor_config.json in a folder saved with
# transformers 5): without tokenizer.json transformers falls back to converting a slow tokenizer and asks
# for sentencepiece, which does not help. (tokenizer_config.json is not needed: the defaults load.)
_TOKENIZER_FILE = "tokenizer.json"
# What a folder saved with model.save_pretrained alone lacks, and the remedy for it.
_SAVE_PROCESSOR_TOO = ("If you saved this folder with model.save_pretrained(folder), save the processor into it too: "
                       "processor.save_pretrained(folder). Otherwise copy or download the checkpoint again")


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
        attn: "auto", "sdpa", "eager" or "flash_attention_2". "auto": flash_attention_2 where flash-attn is
            installed, on an Ampere or newer CUDA GPU in half precision, else sdpa. "eager" sets the language
            model; the vision tower keeps sdpa (the same numbers in fp32, faster) unless flash_attention_2 is used.
        num_crops: image crops of 336x336 pixels (more = finer detail, more tokens). ``None`` keeps the
            checkpoint's value (4 for Phi-3.5-vision, 16 for Phi-3-vision).
        quantize: ``None``, "int8" (CPU: torchao; CUDA: bitsandbytes or torchao) or "int4" (CUDA with
            bitsandbytes). Weight-only, language model only; see ``phi_helpers.api.quantization``.
            A folder saved from a quantized model loads quantized without it.

    All choices are checked before anything is downloaded. Prints one line saying what was chosen, and
    a warning line before loading when the model would not fit into the memory available.
    """
    plan = _plan_load(model_id, device, dtype, attn, num_crops, quantize)
    _warn_if_short_of_memory(plan)
    model, processor = _load(plan)
    print(_summary_line(plan, model, processor))
    return model, processor


@dataclasses.dataclass
class _LoadPlan:
    """What ``load_model`` decides before it loads anything; each choice with the reason it prints."""

    source: str  # what from_pretrained gets: a local folder or a hub id
    label: str  # how the summary line names it
    local: bool  # source is a local folder (else a hub id)
    model_config: Phi3VConfig | None  # the local folder's config; None: the hub's (read when loading)
    device: str
    device_reason: str
    dtype: torch.dtype
    dtype_reason: str
    dtype_asked: bool  # the caller named a dtype (not "auto")
    attn: str
    attn_reason: str
    num_crops: int | None  # asked for; None keeps the checkpoint's own
    crops: int | None  # what the processor will use, if known before loading (for the memory estimate)
    quantization: object  # the quantization_config for from_pretrained, or None
    quantized_as: str | None  # "int8" or "int4" when the weights are (or will be) quantized
    quantization_note: str | None  # how, for the summary line
    stored_quantized: bool  # a folder saved from a quantized model: its weights load as they are stored


def _plan_load(model_id, device, dtype, attn, num_crops, quantize) -> _LoadPlan:
    """Check every argument of ``load_model`` and decide the source, device, dtype, attention and
    quantization; a local folder's files are checked here, nothing is downloaded."""
    device, device_reason = pick_device(device)
    asked_quantize = check_quantize(quantize)
    if num_crops is not None:
        num_crops = check_whole_number(num_crops, "num_crops", minimum=1, hint=" (None: the checkpoint's value)")
    source, label = _resolve_source(model_id)
    local = Path(source).is_dir()
    config, model_config = None, None
    if local:
        check_checkpoint_files(Path(source), check_num_crops=num_crops is None)
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        model_config = _phi3v_config(config)
    saved = config.get("quantization_config") if config else None  # a folder saved from a quantized model
    dtype_asked = check_dtype(dtype) is not None
    dtype, dtype_reason = pick_dtype(dtype, device, quantized=asked_quantize is not None or saved is not None)
    attn, attn_reason = pick_attention(attn, device, dtype)
    if saved is not None:  # loaded as stored: a second quantization_config would only draw a warning
        quantization, (quantized_as, quantization_note) = None, saved_quantization(saved, asked_quantize, device)
    else:
        quantization, quantization_note = quantization_config(asked_quantize, device, dtype)
        quantized_as = asked_quantize
    crops = num_crops or _checkpoint_crops(source, local)
    return _LoadPlan(
        source=source, label=label, local=local, model_config=model_config, device=device, device_reason=device_reason,
        dtype=dtype, dtype_reason=dtype_reason, dtype_asked=dtype_asked, attn=attn, attn_reason=attn_reason, num_crops=num_crops, crops=crops,
        quantization=quantization, quantized_as=quantized_as, quantization_note=quantization_note,
        stored_quantized=saved is not None,
    )


def _load(plan: _LoadPlan) -> tuple:
    """``(model, processor)`` loaded as ``plan`` says (from the hub: after one quick probe of it); raises
    ModelLoadError if the weights are not a complete Phi-3(.5)-vision."""
    hub_kwargs = {} if plan.local else _hub_access(plan.source)
    processor_kwargs = {**hub_kwargs} if plan.num_crops is None else {**hub_kwargs, "num_crops": plan.num_crops}
    processor = _from_pretrained(AutoProcessor, plan.source, **processor_kwargs)
    model_kwargs = {"dtype": plan.dtype, "attn_implementation": plan.attn, "device_map": plan.device, **hub_kwargs}
    if plan.quantization is not None:
        model_kwargs["quantization_config"] = plan.quantization
    with _held_load_report() as load_reports:
        model, info = _from_pretrained(
            AutoModelForCausalLM, plan.source, output_loading_info=True, ignore_mismatched_sizes=True, **model_kwargs
        )
    _check_loaded(model.eval(), info, plan.label)
    for report in load_reports:  # nothing missing or reshaped: transformers' own report (unexpected keys...)
        logging.getLogger(report.name).handle(report)
    use_fused_int8_kernel(model)  # int8 weights on CPU: PyTorch's fused kernel while decoding
    return_freed_memory()
    return model, processor


def _summary_line(plan: _LoadPlan, model, processor) -> str:
    """The line ``load_model`` prints: what was loaded, where, how, and why."""
    used_attn = getattr(model.config, "_attn_implementation", plan.attn)
    quantized = f" | {plan.quantization_note}" if plan.quantized_as is not None else ""
    return (
        f"Loaded {plan.label} on {plan.device} ({plan.device_reason}) | {_dtype_name(plan.dtype)} ({plan.dtype_reason}) | "
        f"attention: {used_attn} ({plan.attn_reason}){quantized} | num_crops={processor.image_processor.num_crops}"
    )


def _warn_if_short_of_memory(plan: _LoadPlan) -> None:
    """Print one line when the weights + activations (``memory_need``; a local folder's config, else the real
    model's sizes) exceed the memory ``plan.device`` has available, naming the options that need less
    (``_smaller_options``). A warning, not a refusal: swap, or memory other programs are about to free, may
    still let it load."""
    available, where = available_memory(plan.device)
    quantize = plan.quantized_as
    if available is None or (quantize is not None and quantize not in QUANTIZE_CHOICES):
        return
    num_crops = plan.crops or NUM_CROPS
    need = memory_need(plan.model_config, plan.dtype, quantize, num_crops)
    if need["need_gib"] <= available:
        return
    smaller = []
    for option_dtype, option_quantize in _smaller_options(plan):
        option_need = memory_need(plan.model_config, option_dtype, option_quantize, num_crops)["need_gib"]
        if option_need < need["need_gib"]:
            smaller.append(_option_text(plan, option_dtype, option_quantize, option_need))
    if plan.device == "mps" and not plan.stored_quantized:  # int8 runs on a Mac's CPU (not its GPU), in the same RAM
        cpu_dtype = pick_dtype("auto", "cpu", quantized=True)[0]
        int8_need = memory_need(plan.model_config, cpu_dtype, "int8", num_crops)["need_gib"]
        if int8_need < need["need_gib"]:
            smaller.append(f"load_model(device='cpu', quantize='int8') (command line: --device cpu --quantize int8; "
                           f"about {_gib(int8_need)}; slower: the CPU instead of the Apple GPU)")
    fix = f"Use {' or '.join(smaller)}" if smaller else "Close other programs or use a machine with more memory"
    print(
        f"Warning: the model needs about {_gib(need['need_gib'])} ({_gib(need['weights_gib'])} of weights in "
        f"{_dtype_name(plan.dtype)}{f' with {quantize}' if quantize else ''} + {_gib(need['activations_gib'], 2)} of "
        f"activations at num_crops={num_crops}), but {plan.device} has only {_gib(available)} {where}: loading may run "
        f"out of memory. {fix}."
    )


def _smaller_options(plan: _LoadPlan) -> list[tuple[torch.dtype, str | None]]:
    """``(dtype, quantize)`` pairs that may need less memory than ``plan``: its own weights in half precision,
    then int8 and int4 weights in half precision where they run, unless the weights are stored quantized."""
    half = plan.dtype if plan.dtype in _HALF else pick_dtype("auto", plan.device, quantized=True)[0]
    options = [(half, plan.quantized_as)]
    if not plan.stored_quantized and plan.device != "mps":
        options.append((half, "int8"))
    if not plan.stored_quantized and plan.device.startswith("cuda"):
        options.append((half, "int4"))
    return [option for option in dict.fromkeys(options) if option != (plan.dtype, plan.quantized_as)]


def _option_text(plan: _LoadPlan, dtype: torch.dtype, quantize: str | None, need_gib: float) -> str:
    """How to ask ``load_model`` (and the command line) for ``dtype`` and ``quantize`` instead of ``plan``'s,
    e.g. "load_model(quantize='int8') (command line: --quantize int8; about 4.8 GiB)". "auto" gives a
    quantized model half precision by itself, so a dtype the caller named (fp32) must go: ``dtype='bf16'``
    or leaving dtype out both do that."""
    arguments, flags = [], []
    if quantize is not None and not plan.stored_quantized:
        arguments.append(f"quantize='{quantize}'")
        flags.append(f"--quantize {quantize}")
    short = {_DTYPES[name]: name for name in DTYPE_SHORT_NAMES if name in _DTYPES}[dtype]
    if dtype != plan.dtype and (plan.dtype_asked or quantize is None):
        arguments.append(f"dtype='{short}'")
        flags.append(f"--dtype {short}")
    call, command, about = f"load_model({', '.join(arguments)})", " ".join(flags), f"about {_gib(need_gib)}"
    if dtype != plan.dtype and plan.dtype_asked and quantize is not None:
        return f"{call} or leave dtype out (command line: {command}, or leave --dtype out; {about})"
    return f"{call} (command line: {command}; {about})"


def checkpoint_num_crops(model_id=None) -> int:
    """The ``num_crops`` that ``load_model(model_id)`` gets from its checkpoint: a local folder's own, an
    official checkpoint's (4 for Phi-3.5-vision, 16 for Phi-3-vision); ``NUM_CROPS`` (4) for another hub id,
    or when the folder cannot be read (``load_model`` says why)."""
    try:
        if is_tiny_model(requested_model_id(model_id)):  # a Phi-3.5-vision (not built here: no banner)
            return HUB_NUM_CROPS[DEFAULT_MODEL_ID.lower()]
        source, _ = _resolve_source(model_id)
        return _checkpoint_crops(source, Path(source).is_dir()) or NUM_CROPS
    except (PhiHelpersError, OSError, ValueError):
        return NUM_CROPS


def _checkpoint_crops(source: str, local: bool) -> int | None:
    """The checkpoint's own num_crops: a local folder's, or an official checkpoint's; None if unknown."""
    return _image_processor_settings(Path(source))[1].get("num_crops") if local else HUB_NUM_CROPS.get(source.lower())


def planned_memory_gib(model_id=None, device="auto", dtype="auto", num_crops=None, quantize=None) -> float | None:
    """GiB that ``load_model`` with these arguments needs to run (weights + activations, ``memory_need``),
    computed before anything loads; ``None`` when the arguments do not plan here (``load_model`` says why)."""
    try:
        plan = _plan_load(model_id, device, dtype, "auto", num_crops, quantize)
    except PhiHelpersError:
        return None
    return memory_need(plan.model_config, plan.dtype, plan.quantized_as, plan.crops or NUM_CROPS)["need_gib"]


def _gib(gib: float, digits: int = 1) -> str:
    """A memory size for a message: "15.4 GiB", or "26 MiB" below a tenth of a GiB (tiny test models)."""
    return f"{gib:.{digits}f} GiB" if gib >= 0.1 else f"{gib * 1024:.0f} MiB"


def _phi3v_config(config: dict) -> Phi3VConfig | None:
    """The ``Phi3VConfig`` of a local folder's config.json, built before anything is loaded, so that a
    config this package refuses (``ConfigurationError``) is refused first. None for other faults: they are
    left to transformers, whose error says what is wrong when it loads."""
    try:
        return Phi3VConfig(**config)
    except ConfigurationError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


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


def check_device(device) -> str:
    """The device name ``device`` spells, in lower case ("CUDA:1" -> "cuda:1"); InvalidArgumentError (a
    ValueError) for one ``load_model`` does not know. Whether it is there is ``pick_device``'s question."""
    name = str(device).strip().lower()
    kind = name.split(":")[0]
    if kind not in _DEVICES or (":" in name and (kind != "cuda" or not name.split(":")[1].isdigit())):
        raise InvalidArgumentError(f"Unknown device {device!r}. Choose one of {', '.join(map(repr, _DEVICES))} (or 'cuda:N').")
    return name


def check_dtype(dtype) -> torch.dtype | None:
    """The torch dtype ``dtype`` names ("bf16", "BFloat16", torch.bfloat16...), None for "auto";
    InvalidArgumentError (a ValueError) for one ``load_model`` does not know."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, *_HALF):
            raise InvalidArgumentError(f"dtype {dtype} is not supported. {_DTYPE_CHOICES}")
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise InvalidArgumentError(f"Unknown dtype {dtype!r}. {_DTYPE_CHOICES}")
    return _DTYPES[name]


def pick_device(device: str = "auto") -> tuple[str, str]:
    """Return ``(device, reason)``. "auto" picks CUDA, then MPS, then CPU."""
    name = check_device(device)
    kind = name.split(":")[0]
    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda", _gpu_name()
        if mps_available():
            return "mps", "Apple GPU"
        return "cpu", "no GPU found"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device={device!r} was asked for, but PyTorch sees no CUDA GPU. Use device='auto' or 'cpu', or "
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
    if kind == "mps" and not mps_available():
        raise DeviceUnavailableError(
            "device='mps' was asked for, but the Apple GPU backend (MPS) is not available: it needs a Mac with "
            "Apple silicon and a recent PyTorch. Use device='auto' or 'cpu'."
        )
    return kind, "asked for"


def pick_dtype(dtype="auto", device: str = "cpu", quantized: bool = False) -> tuple[torch.dtype, str]:
    """Return ``(torch dtype, reason)`` for ``device``. "auto": bf16 / fp16 on GPUs, fp32 on CPU, bf16 on
    CPU for a quantized model (its other weights would otherwise take as much memory as the int8 ones)."""
    asked = check_dtype(dtype)
    if asked is not None:
        return asked, "asked for"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "GPU supports bf16"
        return torch.float16, "GPU has no native bf16"
    if device == "mps":
        return torch.float16, "half precision on Apple GPU"
    if quantized:
        return torch.bfloat16, "quantized model: the other weights in bf16"
    return torch.float32, "CPU default; dtype='bf16' halves the memory"


def _gpu_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index)


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
    if is_tiny_model(source):
        return str(_tiny_checkpoint()), "tiny random Phi-3.5-vision" + (" (PHI_HELPERS_MODEL=tiny)" if from_env else "")
    return _check_source(source, local=isinstance(model_id, os.PathLike)), source + (" (from PHI_HELPERS_MODEL)" if from_env else "")


def _check_source(source: str, local: bool = False) -> str:
    """A source that is not a hub id (``owner/name``) must be an existing folder: the hub's own error for
    it is confusing, and looking it up would send a local folder's name to the hub. ``local``: a Path.
    A hub id must follow the hub's rules for names (checked here, before any request)."""
    path = expand_home(source, "model folder", ModelLoadError)
    if path.is_dir():
        return str(path)
    hub_id = not local and source.count("/") == 1 and not source.startswith((".", "/", "~", "\\")) and not os.path.isabs(source)
    if not hub_id:
        raise ModelLoadError(
            f"No model folder at '{path}'. Check the path (relative paths start from '{Path.cwd()}'), or pass a "
            f"hub id such as '{DEFAULT_MODEL_ID}' (owner/name)."
        )
    try:  # the hub's own rules for names (no spaces, no '..'); its error would name no remedy
        validate_repo_id(source)
    except HFValidationError as error:
        raise ModelLoadError(
            f"'{source}' is not a valid hub id: {str(error).rstrip('.')}. Check the id (e.g. '{DEFAULT_MODEL_ID}') "
            f"or pass a local folder.{_no_folder_either(source)}"
        ) from None
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
            f"hf auth login). Check the id (e.g. '{DEFAULT_MODEL_ID}').{_no_folder_either(repo_id)}"
        ) from None
    except HfHubHTTPError:  # the hub answered (a gated model, server trouble): from_pretrained says what
        return {}
    except (httpx.TransportError, OSError) as error:  # no answer: no network, a timeout, a proxy or TLS failure
        reason = " ".join(str(error).split()) or type(error).__name__
    if huggingface_hub.try_to_load_from_cache(repo_id, "config.json") is not None:
        print(f"huggingface.co cannot be reached ({reason}): loading '{repo_id}' from the Hugging Face cache.")
        return {"local_files_only": True}
    raise ModelLoadError(
        f"huggingface.co cannot be reached ({reason}) to download '{repo_id}', and the Hugging Face cache does "
        "not hold it. Check your internet connection (or proxy), or pass a local folder. For an offline dry run "
        f"set PHI_HELPERS_MODEL=tiny.{_no_folder_either(repo_id)}"
    )


def _no_folder_either(repo_id: str) -> str:
    """An owner/name that is not a folder went to the hub; 'models/phi35' may have meant a folder, so the
    hub's answer also says there is none (not for the default model, which nobody typed)."""
    if repo_id == DEFAULT_MODEL_ID:
        return ""
    return f" There is no folder '{repo_id}' here either (relative paths start from '{Path.cwd()}')."


def check_model_source(model_id, num_crops=None) -> None:
    """Refuse, without loading anything, a model that ``load_model(model_id, num_crops=num_crops)`` would
    refuse before it loads: a path that is neither a folder nor a hub id, an invalid hub id, a local folder
    with missing or broken files (``ModelLoadError`` names the file). A hub id is not looked up, and the tiny
    model is not built: for a caller that loads elsewhere (the Ray engine's replicas)."""
    source = requested_model_id(model_id)
    if is_tiny_model(source):
        return
    source = _check_source(source, local=isinstance(model_id, os.PathLike))
    if Path(source).is_dir():
        check_checkpoint_files(Path(source), check_num_crops=num_crops is None)


def check_checkpoint_files(folder: Path, check_num_crops: bool = True) -> None:
    """Raise ModelLoadError naming the file if a local checkpoint folder is visibly broken.

    Every ``*.json`` file must parse; ``config.json`` and ``tokenizer.json`` must exist, and the image
    processor's settings (``preprocessor_config.json``, or the ``image_processor`` part of
    ``processor_config.json`` that ``save_pretrained`` writes), with a valid
    ``num_crops`` unless ``check_num_crops`` is False (``load_model(num_crops=...)`` replaces it); the
    weights must exist (``model.safetensors``, the shards ``model.safetensors.index.json`` names, or
    PyTorch ``.bin`` files), and every safetensors file must hold as many bytes as its header announces (a
    download or copy that stopped early is truncated). Cheap: only the headers of the weights are read.
    transformers' own errors for these cases name no file, or send a local folder's user to the hub.
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
    if not (folder / _TOKENIZER_FILE).is_file():
        raise _broken_file_error(folder / _TOKENIZER_FILE, "it is missing", _SAVE_PROCESSOR_TOO)
    path, settings = _image_processor_settings(folder)
    if check_num_crops and "num_crops" in settings:
        try:
            check_whole_number(settings["num_crops"], "num_crops", minimum=1)
        except InvalidArgumentError:
            raise _broken_file_error(
                path, f"its num_crops is {settings['num_crops']!r}, not a whole number of at least 1 (Phi-3.5-vision's "
                "is 4, Phi-3-vision's 16; load_model(num_crops=...) overrides it)"
            ) from None
    for shard in _weight_files(folder):
        _check_safetensors(shard)


def _image_processor_settings(folder: Path) -> tuple[Path, dict]:
    """``(file, settings)`` of the image processor, where transformers looks: the ``image_processor`` part
    of processor_config.json (written by ``save_pretrained``), else preprocessor_config.json (the hub's)."""
    processor = folder / "processor_config.json"
    if processor.is_file():
        settings = json.loads(processor.read_text(encoding="utf-8"))
        if isinstance(settings, dict) and isinstance(settings.get("image_processor"), dict):
            return processor, settings["image_processor"]
    preprocessor = folder / "preprocessor_config.json"
    if not preprocessor.is_file():
        processor_part = "holds no image_processor settings" if processor.is_file() else "is missing too"
        raise _broken_file_error(preprocessor, f"it is missing, and processor_config.json {processor_part}", _SAVE_PROCESSOR_TOO)
    settings = json.loads(preprocessor.read_text(encoding="utf-8"))
    return preprocessor, settings if isinstance(settings, dict) else {}


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will read from ``folder`` (none for a PyTorch .bin checkpoint);
    raises ModelLoadError when there are no weights it can read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    if (folder / "model.safetensors").is_file():
        return sorted(folder.glob("*.safetensors"))
    if any(folder.glob("pytorch_model*.bin")):
        return []
    parts = sorted(path.name for path in folder.glob("*.safetensors"))
    if parts:  # shards without the index that lists them: transformers looks for model.safetensors only
        raise _broken_file_error(
            index, f"it is missing, and the weights are split into files ({', '.join(parts[:2])}"
            f"{', ...' if len(parts) > 2 else ''}) that only it lists"
        )
    raise _broken_file_error(folder / "model.safetensors", "it is missing (and no other weights file is there)")


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


def _broken_file_error(path: Path, problem: str, remedy: str = "Copy or download the checkpoint again") -> ModelLoadError:
    """The error for a broken file of a local folder; the hub's cache is mentioned only for a folder in it
    (``.../models--owner--name/snapshots/...``), the only case where it helps."""
    in_hub_cache = any(part.startswith("models--") for part in path.parts)
    return ModelLoadError(
        f"The checkpoint file '{path}' is unusable: {problem}. {remedy}"
        + (" (delete it from the Hugging Face cache and load it once more)." if in_hub_cache else ".")
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
    """``auto_class.from_pretrained`` with download/lookup failures turned into a short ModelLoadError; for
    a local folder without advice about the hub and the network, which were never asked."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        if Path(source).is_dir():
            raise ModelLoadError(
                f"Could not load the folder '{source}': {_without_hub_advice(str(error))}\nCheck that it holds the "
                "whole checkpoint (config.json, the weights, tokenizer.json and preprocessor_config.json or "
                "processor_config.json), or copy or download it again."
            ) from None
        raise ModelLoadError(
            f"Could not load '{source}': {error}\nCheck the model id (e.g. '{DEFAULT_MODEL_ID}') or folder, your "
            "internet connection and free disk space. For an offline dry run set PHI_HELPERS_MODEL=tiny."
        ) from None


def _without_hub_advice(text: str) -> str:
    """transformers' error text without its sentences about huggingface.co and the network ("If you were
    trying to load it from 'https://huggingface.co/models', ..."): a local folder was read."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    kept = [sentence for sentence in sentences if "huggingface.co" not in sentence and "internet" not in sentence.lower()]
    return " ".join(kept).replace("Otherwise, make sure", "Make sure")


def _tiny_checkpoint() -> Path:
    """Path of the cached tiny random checkpoint, built on first use, and built again when it is incomplete
    or was built by another version of ``make_tiny_checkpoint`` (its marker file names the build).

    Lives in ``$PHI_HELPERS_CACHE/tiny-phi-3.5-vision`` (default cache: ``$XDG_CACHE_HOME/phi_helpers`` where
    that variable is set, else ``~/.cache/phi_helpers``). Two processes may build at once: each builds into a
    folder of its own and renames it into place.
    """
    _print_tiny_notice()
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "phi_helpers"
    cache = Path(os.environ.get("PHI_HELPERS_CACHE") or default).expanduser()
    target = cache / _TINY_DIR_NAME
    build = _tiny_build()
    if _is_current(target, build):
        return target
    if target.exists():
        print(f"tiny: rebuilding the cached tiny checkpoint in {target}: it is incomplete or was built by "
              "another version of phi_helpers.")
    try:
        return _build_tiny_checkpoint(cache, target, build)
    except OSError as error:  # a cache folder this user may not write (a shared course image), a full disk
        raise ModelLoadError(
            f"The tiny test model could not be written to {cache} ({error.strerror or error}). Set "
            "PHI_HELPERS_CACHE to a folder you may write to (e.g. PHI_HELPERS_CACHE=/tmp/phi_helpers)."
        ) from error


def _build_tiny_checkpoint(cache: Path, target: Path, build: str) -> Path:
    """Build the tiny checkpoint in a folder of this process's own, then rename it to ``target``."""
    building = cache / f".{_TINY_DIR_NAME}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    testing.make_tiny_checkpoint(building, variant="phi-3.5-vision")
    files = sorted(path.name for path in building.iterdir())
    (building / _COMPLETE_MARKER).write_text("\n".join([build, *files]) + "\n", encoding="utf-8")
    if target.exists() and not _is_current(target, build):
        # Renamed aside first (atomic: of two processes, one moves it), then deleted.
        stale = cache / f".{_TINY_DIR_NAME}.stale-{os.getpid()}"
        shutil.rmtree(stale, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        building.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(building, ignore_errors=True)
        if not _is_current(target, build):
            raise
    return target


def _tiny_build() -> str:
    """What the tiny checkpoint is built from: a short hash of ``make_tiny_checkpoint``'s module (its code,
    sizes and file layout) and of the vendored files it reads. Any change to them rebuilds the cached copy."""
    digest = hashlib.sha256()
    for path in [Path(testing.checkpoints.__file__), *sorted(VENDORED_CHECKPOINT.iterdir())]:
        digest.update(path.read_bytes())
    return f"make_tiny_checkpoint {digest.hexdigest()[:12]}"


def _is_current(folder: Path, build: str) -> bool:
    """True if ``folder`` holds a tiny checkpoint that ``build`` wrote to the end: its marker file names
    ``build`` on the first line, then the files written, and they are all there."""
    marker = folder / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[:1] == [build] and all((folder / name).is_file() for name in lines[1:])


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


__all__ = ["load_model", "requested_model_id", "pick_device", "pick_dtype", "check_device", "check_dtype"]
