"""What the command line writes: one record per item, JSON Lines appended and flushed, resume.

* records: ``item_fields``, ``error_record`` and ``model_info`` make the fields every line shares;
* ``JsonlWriter`` appends one line per result and flushes it at once; ``done_keys`` reads back which
  items an earlier run already finished, so that a re-run can skip them;
* ``check_output_path`` fails before the model loads; ``write_atomically`` never leaves half a file.
"""

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from ..errors import CommandLineError, PhiHelpersError
from .inputs import Item

def item_fields(item: Item) -> dict:
    """``{"source": ...}`` plus ``"page"`` for a PDF page: the start of every output line."""
    return {"source": item.source} if item.page is None else {"source": item.source, "page": item.page}


def error_record(item: Item, error: Exception) -> dict:
    """The output line of a failed item."""
    return {**item_fields(item), "error": error_message(error)}


def error_message(error: BaseException) -> str:
    """A one-line message: our own errors speak for themselves, others get their type name in front."""
    text = " ".join(str(error).split())
    if isinstance(error, (PhiHelpersError, OSError, ValueError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def model_info(model, processor) -> dict:
    """Which model ran and how: recorded in every result."""
    return {
        "model": getattr(model, "name_or_path", None) or model.config.name_or_path,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "quantize": quantize_name(model),
        "num_crops": getattr(processor.image_processor, "num_crops", None),
    }


def quantize_name(model) -> str | None:
    """"int8" / "int4" for a model loaded with ``quantize=``, None for a model in plain dtype."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict()
    if config.get("load_in_4bit"):
        return "int4"
    if config.get("load_in_8bit"):
        return "int8"
    quant_type = json.dumps(config.get("quant_type", ""))  # torchao: {"default": {"_type": "Int8WeightOnlyConfig"...
    return "int4" if "Int4" in quant_type else "int8" if "Int8" in quant_type else str(config.get("quant_method"))


def done_keys(path) -> set[tuple[str, int | None]]:
    """Keys ``(source, page)`` of the items that an existing JSONL file has finished successfully.

    Lines with an ``"error"`` do not count (those items are retried), nor do lines that do not parse
    (e.g. the last line of a run that was killed while writing it).
    """
    path = Path(path)
    if not path.exists():
        return set()
    keys = set()
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "source" in record and "error" not in record:
                keys.add((record["source"], record.get("page")))
    return keys


class JsonlWriter:
    """Append JSON lines to a file, flushing each one to disk as soon as it is written.

    The file is opened in append mode: nothing already in it is ever lost. If its last line was cut
    off by an interrupted run, a newline is added first so that the new lines stay parseable.

        with JsonlWriter("results.jsonl") as out:
            out.write({"source": "a.png", "answer": "..."})
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> "JsonlWriter":
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
        return self

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc_info) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def progress_bar(total: int, description: str):
    """A tqdm progress bar on stderr (stdout stays clean for results)."""
    return tqdm(total=total, desc=description, unit="image", file=sys.stderr)


def check_output_path(path: Path) -> None:
    """Fail early (before loading the model) if ``path`` cannot be written."""
    if path.is_dir():
        raise CommandLineError(f"--output '{path}' is a folder; give a file name inside it, e.g. '{path / 'results.jsonl'}'.")
    folder = path.parent
    if not folder.is_dir():
        raise CommandLineError(f"Cannot write '{path}': the folder '{folder}' does not exist. Create it first.")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CommandLineError(f"Cannot write '{path}': permission denied.")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it to ``path``.

    The rename is atomic: ``path`` holds either its old content or the complete new one, never a
    half-written file, even if the program is interrupted.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
