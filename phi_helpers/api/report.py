"""What is this machine, and can it run Phi-3(.5)-vision? One call answers both.

    from phi_helpers import environment_report
    info = environment_report()      # prints a table and returns the same facts as a dict

The facts and the rules behind the verdicts (memory estimate, "fits" / "tight" / "does not fit", the
attention ``load_model`` picks) live in ``phi_helpers.api.hardware``; this module collects and prints them.

``format_table`` is the package's one text-table printer (this report, ``phi-helpers eval``, the
attention comparison of notebook 05).
"""

import importlib.util
import os
import platform
import sys
import textwrap
from pathlib import Path

import torch
import transformers

from ..errors import InvalidArgumentError
from ..versions import TESTED_VERSIONS, package_version
from . import hardware, quantization
from .hardware import (
    GIB, HEADROOM_GIB, NEW_TOKENS, PROMPT_TOKENS, WEIGHT_FORMATS, memory_estimate, memory_verdict, mps_available,
    pick_attention,
)
from .loading import checkpoint_num_crops

NEEDS_CUDA = "needs a CUDA GPU"  # the verdict of a weight format that cannot load here (int4 without CUDA)


def environment_report(
    print_report: bool = True, num_crops: int | None = None, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS
) -> dict:
    """Collect versions, devices and memory facts; print them as a table unless ``print_report=False``.

    ``num_crops``, ``prompt_tokens`` and ``new_tokens`` describe the request the activation memory is
    computed for: one image, a question of ``prompt_tokens`` text tokens, an answer of ``new_tokens``.
    ``num_crops=None``: the checkpoint's, of the model ``load_model()`` would load (``$PHI_HELPERS_MODEL``,
    else Phi-3.5-vision: 4; Phi-3-vision uses 16).

    Returns a dict with the keys shown in the table (``python``, ``torch``, ``cuda_available``,
    ``gpu_name``, ``gpu_memory_gib``, ``gpu_free_gib``, ``bf16_supported``, ``ram_available_gib``,
    ``weights_gib``, ``activations_gib``, ``need_gib`` ...), ``torchao`` (its version, None if not
    installed) and ``torchao_missing`` (None, or what is wrong and the pip command: quantize="int8" needs
    torchao ``TORCHAO_MIN_VERSION`` or newer, except on a CUDA GPU with bitsandbytes), ``bitsandbytes_installed``,
    ``attention`` and ``attention_reason`` (what
    ``load_model(attn="auto")`` picks on GPU 0, and why; None without a CUDA GPU; ``flash_attn_available``:
    it picks flash_attention_2), ``fits`` (per weight format: "fits", "tight"
    or "does not fit" in the free GPU memory, or the available RAM without a GPU; ``NEEDS_CUDA`` for int4
    without one) and ``warnings``, a list
    of messages (printed below the table), e.g. when Python, torch or transformers is not the tested version.
    """
    if not isinstance(print_report, bool):
        raise InvalidArgumentError(f"print_report must be True or False, got {print_report!r}.")
    if num_crops is None:
        num_crops = checkpoint_num_crops()
    memory = memory_estimate(num_crops=num_crops, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    report = {**_software(), **_devices(), **_host(), **memory}
    available, _ = _memory_for_the_model(report)
    report["fits"] = {
        name: memory_verdict(need, available) if available else None for name, need in report["need_gib"].items()
    }
    if not report["cuda_available"]:  # int4 needs bitsandbytes on a CUDA GPU (quantization_config refuses it)
        report["fits"].update({name: NEEDS_CUDA for name, quantize, _ in WEIGHT_FORMATS if quantize == "int4"})
    report["warnings"] = _version_warnings(report)
    if print_report:
        print(_format(report))
    return report


def _software() -> dict:
    """Versions and install locations of Python and the libraries phi_helpers needs."""
    package_dir = Path(__file__).resolve().parents[1]  # phi_helpers/
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "phi_helpers": package_version(),
        "phi_helpers_path": str(package_dir),
        "torchao": quantization.torchao_version(),
        "torchao_missing": quantization.torchao_missing("quantize='int8'"),
        "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
    }


def _version_warnings(report: dict) -> list[str]:
    """One message for Python, and per library (torch, transformers), whose version is not the tested one."""
    messages = []
    if ".".join(report["python"].split(".")[:2]) != TESTED_VERSIONS["python"]:
        messages.append(
            f"Python {report['python']} runs this, but the lock is resolved for Python {TESTED_VERSIONS['python']}: "
            "some pinned versions may be missing or behave differently here. If something fails, use Python "
            f"{TESTED_VERSIONS['python']} (in a clone of the repository: rm -rf .venv, then "
            f"PYTHON=python{TESTED_VERSIONS['python']} ./run.sh lab)."
        )
    for name in ("torch", "transformers"):
        installed, tested = report[name].split("+")[0], TESTED_VERSIONS[name]  # "2.13.0+cpu" is 2.13.0
        if installed != tested:
            messages.append(
                f"{name} {report[name]} is installed, but phi_helpers is tested with {name} {tested}. "
                f'If something fails, install the tested version: pip install "{name}=={tested}" (in a clone of '
                "the repository, ./run.sh lab sets up .venv with every locked version, or pip install -r "
                "requirements.txt)."
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
        "gpu_free_gib": round(hardware.gpu_free_bytes(0) / GIB, 1) if cuda else None,
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
    ram, available = hardware.total_ram_bytes(), hardware.available_ram_bytes()
    return {
        "cpu_count": cpus,
        "ram_gib": round(ram / GIB, 1) if ram else None,
        "ram_available_gib": round(available / GIB, 1) if available else None,
    }


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
        ("torchao", report["torchao_missing"] or report["torchao"]),
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
    """Whether weight format ``name`` fits, with the two numbers behind the verdict; for int8 without a
    usable torchao, that it needs torchao (the torchao row says how to install it)."""
    memory, where = _memory_for_the_model(report)
    verdict = report["fits"][name]
    notes = []
    if verdict == NEEDS_CUDA:
        notes.append(NEEDS_CUDA)
    elif verdict is not None:
        free = "free" if where == "GPU" else "available"
        if name.startswith("int8") and report["mps_available"] and not report["cuda_available"]:
            where += " with device='cpu'"  # quantized weights have no Apple GPU (MPS) kernels
        notes.append(f"{verdict} in {where}: needs {report['need_gib'][name]} GiB with activations, {memory} {free}")
    if name.startswith("int8") and _int8_needs_torchao(report):
        notes.append("needs torchao, see its row")
    return f"  ({'; '.join(notes)})" if notes else ""


def _int8_needs_torchao(report: dict) -> bool:
    """quantize='int8' cannot load here until torchao is installed (or upgraded): it needs torchao except on a
    CUDA GPU with bitsandbytes (``quantization_config``)."""
    return report["torchao_missing"] is not None and not (report["cuda_available"] and report["bitsandbytes_installed"])


__all__ = ["NEEDS_CUDA", "environment_report", "format_table"]
