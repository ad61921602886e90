"""What the command line writes: one record per item, JSON Lines appended and flushed, resume.

* records: ``item_fields``, ``error_record`` and ``model_info`` make the fields every line shares,
  ``make_record`` puts them in order (both engines of ``phi-helpers predict`` build their lines there);
  ``request_fields`` is the request itself (task, prompt, schema, model, generation settings), stored
  in every line under ``"request"`` so that a re-run knows which question a line answers;
* ``JsonlWriter`` appends one line per result and flushes it at once; ``repair_jsonl`` moves the torn
  line of a killed run aside; ``plan_resume`` reads back which items an earlier run already answered
  for the same request, so that a re-run skips exactly those;
* ``check_output_path`` fails before the model loads; ``write_atomically`` never leaves half a file.

File names that are not valid UTF-8 (possible on Linux) are written losslessly: ``"source"`` shows
the undecodable bytes as ``\\xNN`` escapes, and ``"source_b64"`` holds the exact bytes of the name
in base64 (``os.fsdecode(base64.b64decode(record["source_b64"]))`` gives the path back).
"""

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import CommandLineError, PhiHelpersError
from .inputs import Item

TORN_SUFFIX = ".torn"  # lines of --output that did not parse are kept in OUTPUT.torn


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def request_fields(args, schema: dict | None, model: str) -> dict:
    """The request a record answers: everything that changes the answer, in one flat JSON object.

    A re-run skips an item only if its last line was answered for an equal request. To make a new
    option part of the request, add one key here; give it the value ``None`` when the option is not
    used, so that the lines written before the key existed still count as the same request (a key
    missing from an old line reads as ``None``). The schema enters by the SHA-256 of its canonical
    JSON, so editing the schema file redoes the items while renaming it does not.
    """
    return {
        "task": args.task,
        "prompt": args.prompt,
        "schema_sha256": None if schema is None else hashlib.sha256(canonical_json(schema).encode()).hexdigest(),
        "model": model,
        "dtype": args.dtype,
        "num_crops": args.num_crops,
        "max_new_tokens": args.max_new_tokens,
        "constrained": args.constrain if args.task == "extract" else None,
        "quantize": None if args.quantize == "none" else args.quantize,
    }


def canonical_json(value) -> str:
    """One spelling per JSON value (sorted keys, no spaces): equal values give equal text and hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_differences(stored, request: dict) -> list[str]:
    """The names of the request fields in which a stored ``"request"`` differs from ``request``."""
    if not isinstance(stored, dict):
        return ["request"]  # a line written before requests were recorded
    return sorted(key for key in stored.keys() | request.keys() if stored.get(key) != request.get(key))


def item_fields(item: Item) -> dict:
    """``{"source": ...}`` plus ``"page"`` for a PDF page: the start of every output line.

    A name that is not valid UTF-8 also gets ``"source_b64"``, its exact bytes (see the module docs).
    """
    fields = {"source": printable(item.source)}
    if fields["source"] != item.source:
        fields["source_b64"] = base64.b64encode(_fs_bytes(item.source)).decode("ascii")
    if item.page is not None:
        fields["page"] = item.page
    return fields


def record_key(record: dict) -> tuple[str, int | None]:
    """The ``Item.key`` of the item an output line is about (the inverse of ``item_fields``)."""
    source = record["source"]
    if isinstance(record.get("source_b64"), str):
        source = os.fsdecode(base64.b64decode(record["source_b64"]))
    return source, record.get("page")


def printable(text: str) -> str:
    """``text`` if it is valid Unicode; else the bytes that could not be decoded as ``\\xNN`` escapes.

    Python hands out undecodable file-name bytes as lone surrogates, which no UTF-8 file can hold.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _fs_bytes(text).decode("utf-8", "backslashreplace")


def _fs_bytes(text: str) -> bytes:
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace")


def json_safe(value):
    """``value`` with every string made ``printable`` (recursively): safe to write as UTF-8 JSON."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def error_record(item: Item, error: Exception) -> dict:
    """The output line of a failed item."""
    return {**item_fields(item), "error": error_message(error)}


def error_message(error: BaseException) -> str:
    """A one-line message: our own errors speak for themselves, others get their type name in front."""
    text = printable(" ".join(str(error).split()))
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


RESULT_KEYS = ("prompt", "answer", "valid", "errors", "raw", "attempts", "constrained", "image_size")


def make_record(result: dict, task: str, schema: str | None, info: dict, request: dict) -> dict:
    """An output record in a fixed, readable order: where from, what task, the answer, then how it was made.

    ``result`` is what ``predict`` / ``predict_items`` returned for one image, ``schema`` the path of
    the JSON Schema as the user gave it (extract only), ``info`` is ``model_info``, ``request`` is
    ``request_fields`` (what a re-run compares to decide whether the line is still wanted). Both
    engines of ``phi-helpers predict`` (in-process and Ray) build their lines here.
    """
    record = {key: result[key] for key in ("source", "source_b64", "page") if key in result}
    record["task"] = task
    if schema:
        record["schema"] = schema
    record["request"] = request
    if "error" in result:
        return {**record, "error": result["error"]}
    record.update((key, result[key]) for key in RESULT_KEYS if key in result)
    record.update(info)
    record.update((key, value) for key, value in result.items() if key not in record)
    return record


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def read_records(path) -> list[dict]:
    """The records (JSON objects) of a JSONL file, in order; lines that do not parse are left out."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
    return records


def _parse_line(line: bytes) -> dict | None:
    """The record on one line, or None if the line is not a JSON object with a ``"source"``."""
    record = _json_value(line)
    return record if isinstance(record, dict) and isinstance(record.get("source"), str) else None


_TORN = object()  # what _json_value returns for a line that is not JSON


def _json_value(line: bytes):
    """The JSON value on one line, or ``_TORN`` if the line is not UTF-8 JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _TORN


def repair_jsonl(path) -> int:
    """Move the lines of ``path`` that are not JSON (the torn last line of a killed run, a line cut
    by a full disk) to ``path`` + ``.torn``, and return how many were moved.

    The torn lines are appended to the side file and flushed to disk first; only then is ``path``
    replaced (atomically) by its valid lines, so nothing is lost even if this is interrupted.
    Blank lines are dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    good, torn = [], []
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            (torn if _json_value(line) is _TORN else good).append(line)
    if not torn:
        return 0
    with open(torn_path(path), "ab") as side:
        side.write(b"".join(line + b"\n" for line in torn))
        side.flush()
        os.fsync(side.fileno())
    write_atomically(path, "".join(line.decode("utf-8") + "\n" for line in good))
    return len(torn)


def torn_path(path) -> Path:
    """Where ``repair_jsonl`` keeps the lines it took out of ``path``."""
    path = Path(path)
    return path.with_name(path.name + TORN_SUFFIX)


@dataclass
class ResumePlan:
    """What a re-run does with each item, given the last line per item in the output file."""

    todo: list  # the items to run now, in input order
    done: int = 0  # skipped: their last line answers this very request
    failed: int = 0  # retried: their last line is an error for this request
    other_request: int = 0  # redone: their last line answers another request
    differences: set = field(default_factory=set)  # which request fields differ, over those items

    def summary(self, total: int, path) -> list[str]:
        """Lines for stderr that say what is skipped and why, and what is run again and why."""
        lines = []
        if self.done:
            lines.append(f"{self.done} of {total} items are already done for this request in {path}; skipping them.")
        if self.failed:
            lines.append(f"{self.failed} of {total} items failed in an earlier run of this request; retrying them.")
        if self.other_request:
            lines.append(
                f"{self.other_request} of {total} items in {path} answer another request (it differs in: "
                f"{', '.join(sorted(self.differences))}); running them again for this one."
            )
        return lines


def plan_resume(items: list[Item], path, request: dict) -> ResumePlan:
    """Split ``items`` by the last line each has in the JSONL file ``path`` (see ``ResumePlan``)."""
    last = {}
    for record in read_records(path):
        last[record_key(record)] = record
    plan = ResumePlan(todo=[])
    for item in items:
        record = last.get(item.key)
        if record is None:
            plan.todo.append(item)
            continue
        differences = request_differences(record.get("request"), request)
        if differences:
            plan.other_request += 1
            plan.differences.update(differences)
        elif "error" in record:
            plan.failed += 1
        else:
            plan.done += 1
            continue
        plan.todo.append(item)
    return plan


def resume(path, items: list[Item], request: dict) -> ResumePlan:
    """Make the JSONL output ``path`` ready for a (re-)run of ``request`` over ``items``: move its torn
    lines aside (``repair_jsonl``), decide per item (``plan_resume``), say both on stderr."""
    torn = repair_jsonl(path)
    if torn:
        print(f"warning: {torn} line(s) of {path} did not parse (e.g. cut off when a run was killed or the "
              f"disk was full); moved them to {torn_path(path)}", file=sys.stderr)
    plan = plan_resume(items, path, request)
    for line in plan.summary(len(items), path):
        print(line, file=sys.stderr)
    return plan


def finish_run(total: int, failed: int, output) -> int:
    """Say how a many-item run ended (on stderr) and return its exit code: 1 if any item failed."""
    print(f"{total - failed} of {total} items done; results in {output}", file=sys.stderr)
    if failed:
        print(f'error: {failed} of {total} items failed (their records in {output} have an "error"); '
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class JsonlWriter:
    """Append JSON lines to a file, flushing each one to disk as soon as it is written.

    The file is opened in append mode: nothing already in it is ever lost. If its last line was cut
    off by an interrupted run, a newline is added first so that the new lines stay parseable (the
    command line moves such a line aside first, with ``repair_jsonl``). Strings are made
    ``printable``, so a record can always be written.

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
        self._file.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
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
