"""Time and measure the attention implementations on the machine you are on (tutorial notebook 05).

    from phi_helpers.tutorial.profiling import compare_attention, attention_table
    rows = compare_attention(image="images/chart.png", question="Describe this chart.")
    print(attention_table(rows))

For each option ("eager", "sdpa", "flash_attention_2") ``compare_attention`` loads the model with
``load_model(attn=option)``, asks one question greedily, and records:

* ``first_token_s``: seconds from the call to the first new token (image encoding + prompt "prefill");
* ``total_s``: seconds for the whole answer;
* ``tokens_per_s``: decoding speed after the first token (new tokens - 1) / (total - first token);
* ``peak_memory_gib``: the memory high-water mark, measured the way the device allows (``memory_note``
  says how): CUDA ``torch.cuda.max_memory_allocated`` (reset before each option), Apple MPS
  ``torch.mps.driver_allocated_memory`` after generation (current, not peak), CPU the process's peak
  resident memory from ``resource.getrusage`` (cumulative: it never goes down, so an option measured
  after a bigger one shows the bigger one's peak).

Options that cannot run here (flash_attention_2 without flash-attn, without a CUDA GPU, or on one older than Ampere) become rows
with ``available=False`` and the reason, not errors. Rows keep the greedy ``answer`` too, so you can
check that the implementations compute the same thing.
"""

import gc
import io
import sys
import time
from contextlib import redirect_stdout

import torch
from transformers.generation.streamers import BaseStreamer

from ..api.choices import ATTENTIONS
from ..api.generation import ask
from ..api.hardware import GIB, mps_available, pick_attention
from ..api.loading import load_model, pick_device, pick_dtype
from ..api.quantization import check_quantize
from ..api.report import format_table as _table
from ..errors import FlashAttentionUnavailableError, InvalidArgumentError

# The choices of load_model(attn=...) but "auto": eager (the plain reference, slowest) first, then the others.
ATTENTION_OPTIONS = ("eager", *(name for name in ATTENTIONS if name not in ("auto", "eager")))


def compare_attention(
    model_id=None,
    image=None,
    question: str = "Describe this image in two sentences.",
    max_new_tokens: int = 16,
    options=None,
    device: str = "auto",
    dtype="auto",
    num_crops: int | None = None,
    quantize: str | None = None,
    warmup: bool = True,
    verbose: bool = True,
) -> list[dict]:
    """Load the model once per attention option, time one greedy answer, return one dict per option.

    Args:
        model_id: what ``load_model`` gets (``None``: ``$PHI_HELPERS_MODEL``, else the default model).
        image: anything ``load_image`` accepts, or ``None`` for a text-only question.
        question: the question asked with every option (greedy decoding, so answers are comparable).
        max_new_tokens: the longest answer; keep it small, the model is loaded once per option.
        options: attention implementations to try, a list or one name (default: eager, sdpa, flash_attention_2).
        device, dtype: passed to ``load_model`` (``"auto"`` picks for this machine, as in notebook 00).
        num_crops: passed to ``load_model``; more crops = more image tokens = more attention work.
        quantize: passed to ``load_model`` (``"int8"`` on a 16 GB laptop, as in notebook 00).
        warmup: run a 2-token answer first, so one-off start-up costs are not counted as speed.
        verbose: print one progress line per option.

    Each row has ``attention``, ``available``, ``reason`` (why not available, else ``None``),
    ``device``, ``dtype``, ``load_s``, ``first_token_s``, ``total_s``, ``new_tokens``,
    ``tokens_per_s``, ``peak_memory_gib``, ``memory_note`` and ``answer``.
    """
    options = [options] if isinstance(options, str) else list(ATTENTION_OPTIONS if options is None else options)
    device_name, _ = pick_device(device)
    torch_dtype, _ = pick_dtype(dtype, device_name, quantized=check_quantize(quantize) is not None)
    rows = []
    for option in options:
        row = _empty_row(option, device_name, torch_dtype)
        try:
            pick_attention(option, device_name, torch_dtype)  # raises if it cannot run here
        except (FlashAttentionUnavailableError, InvalidArgumentError) as error:
            # why, in its first sentence; a wrong argument keeps its whole message (an unknown name: the valid ones)
            row["reason"] = str(error) if isinstance(error, InvalidArgumentError) else _first_sentence(str(error))
            rows.append(row)
            _progress(verbose, f"{option}: not available: {row['reason']}")
            continue
        _progress(verbose, f"{option}: loading the model and timing one answer ...")
        load_kwargs = {"device": device, "dtype": dtype, "attn": option, "num_crops": num_crops, "quantize": quantize}
        if model_id is not None:
            load_kwargs["model_id"] = model_id
        row.update(_measure(load_kwargs, image, question, max_new_tokens, warmup))
        rows.append(row)
        if verbose and row["available"]:
            _progress(verbose, f"{option}: {row['new_tokens']} tokens in {row['total_s']:.2f} s")
    return rows


def attention_table(rows: list[dict]) -> str:
    """The rows of ``compare_attention`` as an aligned text table (unavailable options say why), with
    the device and how memory was measured underneath."""
    header = ("attention", "load s", "first token s", "total s", "new tokens", "tokens/s", "peak memory")
    lines = []
    notes = []
    for row in rows:
        if not row["available"]:
            lines.append((row["attention"], f"not available: {row['reason']}"))
            continue
        lines.append((
            row["attention"],
            f"{row['load_s']:.1f}",
            f"{row['first_token_s']:.2f}",
            f"{row['total_s']:.2f}",
            str(row["new_tokens"]),
            "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}",
            "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB",
        ))
        if row["memory_note"] and row["memory_note"] not in notes:
            notes.append(row["memory_note"])
    text = [_table(lines, header)]
    devices = sorted({f"{row['device']}, {row['dtype']}" for row in rows})
    text.append("")
    text.append(f"Measured on: {'; '.join(devices)}.")
    text += [f"Memory: {note}." for note in notes]
    return "\n".join(text)


# --------------------------------------------------------------------------- measuring one option


class _TokenTimer(BaseStreamer):
    """A generate() streamer that only notes *when* tokens arrive (the first ``put`` is the prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if isinstance(value, torch.Tensor) and value.is_cuda:
            torch.cuda.synchronize(value.device)  # the token is really computed now
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _measure(load_kwargs, image, question, max_new_tokens, warmup) -> dict:
    """``load_model(**load_kwargs)``, optionally warm up, time one greedy answer; free the model again."""
    images = None if image is None else [image]
    model = None
    try:
        started = time.perf_counter()
        with redirect_stdout(io.StringIO()) as captured:  # keep only load_model's summary line
            model, processor = load_model(**load_kwargs)
        load_s = time.perf_counter() - started
        loaded_line = captured.getvalue().strip().splitlines()[-1:]
        if loaded_line:
            print("   ", loaded_line[0], flush=True)
        if warmup:
            ask(model, processor, question, images=images, max_new_tokens=2)
        _reset_peak_memory(str(model.device))
        timer = _TokenTimer()
        answer = ask(model, processor, question, images=images, max_new_tokens=max_new_tokens, streamer=timer)
        total_s = time.perf_counter() - timer.start
        peak, note = _peak_memory(model.device)
    except torch.cuda.OutOfMemoryError:  # also torch.OutOfMemoryError in recent PyTorch
        return {"available": False, "reason": "ran out of memory on this device"}
    finally:
        del model
        _free_memory()
    new_tokens = len(timer.times)
    first = (timer.times[0] - timer.start) if timer.times else total_s
    decode_s = total_s - first
    return {
        "available": True,
        "load_s": load_s,
        "first_token_s": first,
        "total_s": total_s,
        "new_tokens": new_tokens,
        "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "peak_memory_gib": peak,
        "memory_note": note,
        "answer": answer,
    }


def _empty_row(option: str, device: str, dtype: torch.dtype) -> dict:
    return {
        "attention": option, "available": False, "reason": None, "device": device,
        "dtype": str(dtype).removeprefix("torch."), "load_s": None, "first_token_s": None, "total_s": None,
        "new_tokens": 0, "tokens_per_s": None, "peak_memory_gib": None, "memory_note": None, "answer": None,
    }


def _reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(GiB, how it was measured) for the device the model is on."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "CUDA torch.cuda.max_memory_allocated (peak)"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / GIB, "MPS torch.mps.driver_allocated_memory (after generation)"
    try:
        import resource
    except ImportError:  # Windows
        return None, "not measured on this system (no resource module)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB
    return peak_bytes / GIB, "CPU process peak RSS from resource.getrusage (cumulative over the whole process)"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if mps_available():
        torch.mps.empty_cache()


def _first_sentence(text: str) -> str:
    """The first sentence of an error message (up to '. ' or a newline)."""
    first = text.split("\n")[0]
    cut = first.find(". ")
    return first if cut == -1 else first[: cut + 1]


def _progress(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


__all__ = ["compare_attention", "attention_table", "ATTENTION_OPTIONS"]
