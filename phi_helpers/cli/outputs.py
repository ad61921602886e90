"""What the command line writes: one record per item, JSON Lines appended and flushed, resume.

* records: ``item_fields``, ``error_record`` and ``model_info`` make the fields every line shares,
  ``make_record`` puts them in order (both engines of ``phi-helpers predict`` build their lines there);
  the request itself (``tasks.request_fields``: task, prompt, schema, model, generation settings) is stored
  in every line under ``"request"`` so that a re-run knows which question a line answers;
* ``JsonlWriter`` appends one line per result and flushes it at once; ``repair_jsonl`` moves the torn
  line of a killed run aside; ``plan_resume`` reads back which items an earlier run already answered
  for the same request, so that a re-run skips exactly those; ``latest_records`` gives a reader each
  item's last line, matched the same way;
* ``check_output_path`` fails before the model loads; ``write_atomically`` never leaves half a file;
  ``print_result`` prints an answer or a report and names standard output when writing it fails;
* ``Progress`` shows a run's progress and its ``failed:`` lines on stderr (a bar on a terminal, a
  plain line now and then in a log); ``terminate_as_interrupt`` stops a run on SIGTERM or SIGHUP as
  Ctrl-C does.

File names that are not valid UTF-8 (possible on Linux) are written losslessly: ``"source"`` shows
the undecodable bytes as ``\\xNN`` escapes, and ``"source_b64"`` holds the exact bytes of the name
in base64 (``os.fsdecode(base64.b64decode(record["source_b64"]))`` gives the path back); in place of
``"path"``, ``"path_b64"`` holds the absolute path's bytes the same way.

A URL is written without the user name and password it may hold (``https://***@host/a.png``), as
every message shows it: a results file can be shared without the credentials.
"""

import base64
import codecs
import contextlib
import hashlib
import json
import math
import os
import secrets
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import huggingface_hub
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: runs on one output are not locked against each other
    fcntl = None

from ..api import quantization
from ..api.choices import TINY_MODEL, is_tiny_model
from ..api.images import PDF_SIGNATURE, shown_url
from ..errors import (
    CommandLineError, ContextLengthError, InvalidArgumentError, ModelLoadError, OutputBusyError, PhiHelpersError, expand_home,
    utf8_text,
)
from .inputs import Item, counted, file_identity, is_url, terminal_safe

TORN_SUFFIX = ".torn"  # lines of --output that did not parse as records are kept in OUTPUT.torn
TASKS = ("caption", "ocr", "vqa", "extract")  # the tasks of phi-helpers predict: every record names one in "task"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def model_key(model: str) -> str:
    """A local model folder by its absolute path (``./m`` and ``/home/me/m`` are one model, ``m`` in two
    folders two); a hub id as it is; ``"tiny"`` (any case) as ``"tiny"``, even where a folder of that
    name is in the working folder (``load_model`` loads the tiny random model then, not the folder)."""
    if is_tiny_model(model):
        return TINY_MODEL
    path = expand_home(model, "model folder", ModelLoadError)
    return str(path.resolve()) if path.is_dir() else model


# Request fields compared only when both lines know them: a line written before one was recorded (or a run that
# cannot read it now: a hub cache since removed) keeps its answers, as before.
MODEL_FILES = "model_files"  # the model's config and weights (model_files)
MODEL_SETTINGS = "model_settings"  # its processor, tokenizer, chat template and generation settings (model_settings)
PROMPT_SHA256 = "prompt_sha256"  # the whole instruction sent with each image, built-in wording included
KNOWN_WHEN_BOTH_SAY = (MODEL_FILES, MODEL_SETTINGS, PROMPT_SHA256)
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.index.json")  # what a saved model's folder holds
# ...and the files in it that change an answer: the image processor's settings (num_crops), the tokenizer and
# its chat template (the prompt), the generation settings (stop tokens, repetition_penalty)
MODEL_SETTINGS_FILES = (
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def model_files(model: str) -> str | None:
    """A cheap fingerprint of the model's files, read without loading or downloading anything: for a local
    folder, the SHA-256 (16 hex digits) of the names, sizes and modification times (ns) of its
    ``config.json``, weights and weight index (``MODEL_FILE_PATTERNS``); for a hub id, the commit of its
    snapshot in the Hugging Face cache (the one ``from_pretrained`` uses offline); None when neither can
    be read (a hub id not downloaded yet, ``"tiny"``)."""
    if is_tiny_model(model):
        return None
    path = expand_home(model, "model folder", ModelLoadError)
    if path.is_dir():
        files = sorted({file for pattern in MODEL_FILE_PATTERNS for file in path.glob(pattern) if file.is_file()})
        stamps = [[file.name, status.st_size, status.st_mtime_ns] for file in files for status in [file.stat()]]
        return hashlib.sha256(canonical_json(stamps).encode()).hexdigest()[:16] if stamps else None
    if model.count("/") != 1:
        return None
    try:
        cached = huggingface_hub.try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid hub id (loading the model says why)
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None  # .../snapshots/<commit>/config.json


def model_settings(model: str) -> str | None:
    """The SHA-256 (16 hex digits) of the names and contents of a local model folder's files that change an
    answer besides the weights (``MODEL_SETTINGS_FILES``: processor, tokenizer, chat template, generation
    settings; small files, read whole, so that a file saved again unchanged, or another file, redoes nothing);
    None for a hub id (its snapshot's commit, ``model_files``, covers every file) and the tiny model."""
    if is_tiny_model(model):
        return None
    path = expand_home(model, "model folder", ModelLoadError)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for name in MODEL_SETTINGS_FILES:
        with contextlib.suppress(OSError):
            content = (path / name).read_bytes()
            digest.update(f"{name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()[:16]


def canonical_json(value) -> str:
    """One spelling per JSON value (sorted keys, no spaces): equal values give equal text and hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_differences(stored, request: dict) -> list[str]:
    """The names of the request fields in which a stored ``"request"`` differs from ``request``.

    The ``KNOWN_WHEN_BOTH_SAY`` fields count only when both know them: a line written before one was recorded
    (or a run that cannot read it now: a hub cache since removed) keeps its answers, as before.
    """
    if not isinstance(stored, dict):
        return ["request"]  # a line written before requests were recorded
    if isinstance(stored.get("model"), str):  # lines written before folders were recorded by absolute path
        with contextlib.suppress(ModelLoadError):  # an edited line's "~nouser/m": not this request's model
            stored = {**stored, "model": model_key(stored["model"])}
    for key in KNOWN_WHEN_BOTH_SAY:
        if stored.get(key) is None or request.get(key) is None:
            stored, request = {**stored, key: None}, {**request, key: None}
    differences = {key for key in stored.keys() | request.keys() if stored.get(key) != request.get(key)}
    if differences & _WORDED_BY:  # the instruction differs because of them: they say why
        differences.discard(PROMPT_SHA256)
    return sorted(differences)


_WORDED_BY = {"task", "prompt", "schema_sha256", "constrained"}  # the request fields the instruction is made of


# How ResumePlan.summary names a request field that differs (the others by their own name).
DIFFERENCE_NAMES = {
    MODEL_FILES: "the model's files (config.json or weights saved over since)",
    MODEL_SETTINGS: "the model folder's settings (processor, tokenizer, chat template or generation settings saved over since)",
    PROMPT_SHA256: "the instruction sent with each image (a new built-in wording, or the schema's properties in "
                   "another order)",
    "request": "the request itself, which phi-helpers before 30 Nov 2026 did not record, so what those lines answer "
               "is unknown; their lines stay in the file",
}


def item_fields(item: Item) -> dict:
    """``{"source": ...}`` (a URL without its password) plus ``"page"`` for a page of a PDF or TIFF, and a
    local file's absolute ``"path"`` and ``"modified"`` time (ns) when it was collected: the start of
    every output line.

    A name that is not valid UTF-8 gets ``"source_b64"``, its exact bytes, and ``"path_b64"`` in place of
    ``"path"`` (see the module docs): a re-run from another folder finds the file by it, as by ``"path"``.
    """
    source = shown_url(item.source) if is_url(item.source) else item.source  # no password in any record
    fields = {"source": printable(source)}
    if fields["source"] != source:
        fields["source_b64"] = _b64(source)
    if item.page is not None:
        fields["page"] = item.page
    if item.path is not None:
        if printable(item.path) == item.path:
            fields["path"] = item.path
        else:
            fields["path_b64"] = _b64(item.path)
        fields["modified"] = item.modified  # so that a re-run sees the file was saved over, whatever its name
    return fields


def _b64(name: str) -> str:
    """A file name's exact bytes in base64 (``_from_b64`` reads it back)."""
    return base64.b64encode(_fs_bytes(name)).decode("ascii")


def _from_b64(text) -> str | None:
    """The file name that ``_b64`` wrote as ``text``; None if ``text`` is not base64 text (an edited line)."""
    try:
        return os.fsdecode(base64.b64decode(text, validate=True))
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return None


def record_key(record: dict) -> tuple[str, int | None]:
    """The ``Item.key`` of the item an output line is about (the inverse of ``item_fields``)."""
    source = record["source"]
    if "source_b64" in record:
        source = _from_b64(record["source_b64"])
    return source, record.get("page")


def record_path(record: dict) -> str | None:
    """The absolute path a line recorded for its file: ``"path"``, or ``"path_b64"`` for a name that is not
    UTF-8; None for a URL (or a file that could not be seen)."""
    if "path_b64" in record:
        return _from_b64(record["path_b64"])
    return record["path"] if isinstance(record.get("path"), str) else None


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
    """``value`` with every string made ``printable`` and every number JSON cannot hold (``NaN``,
    ``Infinity``: Python's json reads them from an answer) written as text (``"NaN"``), recursively:
    safe to write as strict UTF-8 JSON."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {printable(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def error_record(item: Item, error: Exception) -> dict:
    """The output line of a failed item."""
    return {**item_fields(item), "error": error_message(error)}


def error_message(error: BaseException) -> str:
    """A one-line message: our own errors speak for themselves, others get their type name in front. A prompt
    too long for the context gets the command line's advice (its options), not the Python API's."""
    if isinstance(error, ContextLengthError) and error.facts:
        error = ContextLengthError(f"{error.facts} {CONTEXT_ADVICE}")
    text = printable(" ".join(str(error).split()))
    if isinstance(error, (PhiHelpersError, OSError, ValueError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


CONTEXT_ADVICE = ("Lower --max-new-tokens, shorten --prompt, or use a lower --num-crops (an image's tokens depend on its "
                  "shape and num_crops, not on its size in pixels).")


def model_info(model, processor) -> dict:
    """Which model ran and how: recorded in every result."""
    return {
        "model": getattr(model, "name_or_path", None) or model.config.name_or_path,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "quantize": model_quantization(model),
        "num_crops": getattr(processor.image_processor, "num_crops", None),
    }


def model_quantization(model) -> str | None:
    """"int8" / "int4" for a model loaded with ``quantize=`` (or from a folder saved quantized), None for a
    model in plain dtype."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    return quantization.quantize_name(config if isinstance(config, dict) else config.to_dict())


ITEM_KEYS = ("source", "source_b64", "page", "path", "path_b64", "modified")
RESULT_KEYS = ("prompt", "answer", "valid", "errors", "raw", "attempts", "constrained", "image_size")


def make_record(result: dict, task: str, schema: str | None, info: dict, request: dict) -> dict:
    """An output record in a fixed, readable order: where from, what task, the answer, then how it was made.

    ``result`` is what ``predict`` / ``predict_items`` returned for one image, ``schema`` the path of
    the JSON Schema as the user gave it (extract only), ``info`` is ``model_info``, ``request`` is
    ``tasks.request_fields`` (what a re-run compares to decide whether the line is still wanted). Both
    engines of ``phi-helpers predict`` (in-process and Ray) build their lines here.
    """
    record = {key: result[key] for key in ITEM_KEYS if key in result}
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
    return [record for _, _, record in _lines(path) if record is not None]


RESUME_FIELDS = ("request", "error", "valid", "constrained", "modified")  # what a re-run reads of an item's last line


def last_records(path) -> dict:
    """The ``RESUME_FIELDS`` of each item's last record in the JSONL file ``path``, by ``resume_key``
    (read line by line: the memory it takes grows with the items, not with the file or the answers)."""
    return _last_by_item(path, lambda record: {name: record[name] for name in RESUME_FIELDS if name in record})


def latest_records(path) -> list[dict]:
    """The last record of each item in the results file ``path``, in the order those lines were
    written: what a re-run of ``phi-helpers predict`` sees as each item's answer.

    Items are matched as a re-run matches them (the file, however the runs spelled it, plus the page),
    so call it from the folder the runs were made in: a line's relative ``"source"`` is read from there
    (lines written before 1 Dec 2026 have no ``"path"``). Torn lines are left out. A PDF gives one
    record per page, so key the answers by source and page::

        from phi_helpers.cli.outputs import latest_records
        answers = {(r["source"], r.get("page")): r.get("answer") for r in latest_records("results.jsonl")}

    A path that is no file, and a file with no ``predict`` record but a line of another program, raise
    ``InvalidArgumentError``; an empty file, or one whose only line was torn, gives ``[]``.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidArgumentError(f"latest_records needs the path of a results file (a str or a Path), got {path!r}.")
    path = expand_home(path, "results file")
    if path.is_dir():
        raise InvalidArgumentError(f"'{path}' is a folder: pass the results file in it (the --output of a phi-helpers "
                                   "predict run, e.g. results.jsonl).")
    if not path.is_file():
        raise InvalidArgumentError(f"No results file at '{path}'. Pass the --output of a phi-helpers predict run "
                                   f"(relative paths start from '{Path.cwd()}').")
    last = _last_by_item(path, lambda record: record)
    if not last and any(record is None and not _looks_like_a_record(line) for _, line, record in _lines(path)):
        with open(path, "rb") as file:
            utf8_text(file.read(4), f"'{path}'")  # a results file saved as UTF-16 says so
        raise InvalidArgumentError(f"'{path}' holds no phi-helpers predict record: none of its lines is one. Pass "
                                   "the --output of a phi-helpers predict run.")
    return list(last.values())


def _last_by_item(path, keep) -> dict:
    """``keep(record)`` of each item's last record in the JSONL file ``path``, by ``resume_key``, in the
    order of those last lines."""
    last = {}
    for _, _, record in _lines(path):
        if record is not None:
            source, page = record_key(record)
            key = _record_identity(record, source), page
            last.pop(key, None)  # to the end: the order of the last lines
            last[key] = keep(record)
    return last


def _record_identity(record: dict, source: str) -> tuple | str:
    """The ``file_identity`` of the file a line is about: its ``"source"``, from the folder the command
    runs in now, unless its absolute ``"path"`` names another file that is there and the source's file
    does not have the recorded modification time.

    A project folder that was moved (``mv proj proj2``) leaves no file at the recorded paths, and one
    copied with its times (``cp -a proj proj3``) has the recorded times: in both, the same command run
    in the new folder finds the same files by their relative sources, still done. Another folder's file
    of the same name has another time: the line stays with its own path. Should the source name another
    file all the same, ``plan_resume`` compares its modification time again.
    """
    here = file_identity(source)
    path = record_path(record)
    there = file_identity(path) if path is not None else here
    if isinstance(there, str) or there == here:  # nothing at the recorded path, or the same file
        return here
    try:
        return here if os.stat(source).st_mtime_ns == record.get("modified") else there
    except OSError:
        return there


def resume_key(source: str, page: int | None) -> tuple:
    """What an item is for resuming: the file itself, however its path is spelled (relative, absolute,
    a link), and the page; a URL by its text."""
    return file_identity(source), page


def _lines(path):
    """``(number, line, record or None)`` for each non-blank line of the file ``path`` (none if it is missing)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip(b"\r\n")  # \r: a line a Windows editor saved
            if line.strip():
                yield number, line, _parse_line(line)


def _parse_line(line: bytes) -> dict | None:
    """The record on one line, or None if the line is not a record: a JSON object of ours
    (``_is_ours``) whose ``"source"`` is a string, whose ``"page"`` (if any) a whole number and whose
    ``"source_b64"`` and ``"path_b64"`` (if any) base64 text."""
    record = _json_value(line)
    if not (_is_ours(record) and isinstance(record.get("source"), str)):
        return None
    page = record.get("page")
    if not (page is None or type(page) is int):
        return None
    if any(name in record and _from_b64(record[name]) is None for name in ("source_b64", "path_b64")):
        return None
    return record


def _json_value(line: bytes):
    """The JSON value on a line, or ``NOT_JSON`` if it does not parse."""
    try:
        return json.loads(line.removeprefix(BOM).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return NOT_JSON


NOT_JSON = object()  # what _json_value returns for a line that does not parse


def _is_ours(value) -> bool:
    """Whether a JSON value is a line ``phi-helpers predict`` wrote (maybe edited since): an object whose
    ``"task"`` is one of ``TASKS``, as ``make_record`` makes every line, answers and errors alike.

    A ``"source"`` string alone is not enough: other programs' JSON lines have one too (a corpus with
    ``{"source": "wiki", "text": ...}``), and such a file must be refused, not repaired and appended to.
    """
    return isinstance(value, dict) and isinstance(value.get("task"), str) and value["task"] in TASKS


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark an editor may put before the first line
RECORD_START = b'{"source": '  # how every line JsonlWriter writes begins (item_fields come first)
MAX_RECORD_BYTES = 1 << 20  # a longer first line is not a record: holds_records stops reading there


def _looks_like_a_record(line: bytes) -> bool:
    """Whether a line that is not a record was meant to be one: it begins like every line
    ``JsonlWriter`` writes, and it is either not JSON (cut off by a kill or a full disk, broken by an
    edit) or one of our lines whose fields an edit broke (``_is_ours``). A line that parses as other
    JSON belongs to someone else's file. A line of NUL bytes only is what a crash or power loss leaves
    where the last lines were not on disk yet (XFS, ext4): torn too."""
    if not line.strip(b"\0 \t\r"):
        return True
    line = line.removeprefix(BOM)
    if not (line.startswith(RECORD_START) or RECORD_START.startswith(line)):
        return False
    value = _json_value(line)
    return value is NOT_JSON or _is_ours(value)


def repair_jsonl(path) -> int:
    """Move the lines of ``path`` that are not records (the torn last line of a killed run, a line cut
    by a full disk, a line broken by an edit) to ``path`` + ``.torn``, and return how many were moved.

    ``CommandLineError`` if ``path`` holds something else than lines this command line wrote (notes,
    an image, another program's JSON): appending to it, or moving its lines aside, would spoil it.
    The torn lines are appended to the side file and flushed to disk first; only then is ``path``
    replaced (atomically) by its records, so nothing is lost even if this is interrupted. Blank lines
    are dropped.
    """
    path = Path(path)
    torn = []
    for number, line, record in _lines(path):
        if record is None and not _looks_like_a_record(line):
            raise CommandLineError(
                f"--output '{path}' holds something other than phi-helpers results (line {number}: "
                f"{printable(line[:60].decode('utf-8', 'backslashreplace'))!r}); results are appended as JSON "
                "lines, so give a new file name (e.g. results.jsonl) or move this file away."
            )
        if record is None:
            torn.append(line)
    if not torn:
        return 0
    good = [line for _, line, record in _lines(path) if record is not None]
    # The side file holds answers too: it gets the results file's permissions and group (not the umask's).
    with os.fdopen(os.open(torn_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as side:
        _keep_owner_and_mode(side.fileno(), os.stat(path))
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
    changed: int = 0  # redone: their file was modified after their last line's run collected it
    differences: set = field(default_factory=set)  # which request fields differ, over those items

    def summary(self, total: int, path) -> list[str]:
        """Lines for stderr that say what is skipped and why, and what is run again and why."""
        lines = []
        if self.done:
            lines.append(f"{self.done} of {counted(total, 'item')} {'is' if self.done == 1 else 'are'} already done for this request in {path}; skipping them.")
        if self.failed:
            lines.append(f"{self.failed} of {counted(total, 'item')} failed in an earlier run of this request; retrying them.")
        if self.changed:
            lines.append(f"{self.changed} of {counted(total, 'item')} {'was' if self.changed == 1 else 'were'} modified since their last line in {path}; running them again.")
        if self.other_request:
            lines.append(
                f"{self.other_request} of {counted(total, 'item')} in {path} {'answers' if self.other_request == 1 else 'answer'} another request (it differs in: "
                f"{', '.join(DIFFERENCE_NAMES.get(name, name) for name in sorted(self.differences))}); running them "
                "again for this one."
            )
        return lines


def plan_resume(items: list[Item], path, request: dict) -> ResumePlan:
    """Split ``items`` by the last line each has in the JSONL file ``path`` (see ``ResumePlan``)."""
    last = last_records(path)
    plan = ResumePlan(todo=[])
    for item in items:
        record = last.get(resume_key(*item.key))
        if record is None:
            plan.todo.append(item)
            continue
        differences = request_differences(record.get("request"), request)
        if None not in (record.get("modified"), item.modified) and record["modified"] != item.modified:
            plan.changed += 1
        elif differences:
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
        print(terminal_safe(f"warning: {counted(torn, 'line')} of {path} did not parse as records (e.g. cut off when a run was "
                            f"killed or the disk was full, or broken by an edit); moved {'it' if torn == 1 else 'them'} to {torn_path(path)}"),
              file=sys.stderr)
    plan = plan_resume(items, path, request)
    for line in plan.summary(len(items), path):
        print(terminal_safe(line), file=sys.stderr)
    return plan


RETRY = ("run the same command again to retry them (a file that cannot be read as an image stays failed: fix, "
         "convert or remove it first)")


def failure_line(record: dict) -> str:
    """The line a run shows (on stderr) for an item that failed: ``failed: SOURCE (page N): ERROR``."""
    page = f" (page {record['page']})" if "page" in record else ""
    return terminal_safe(f"failed: {record['source']}{page}: {record['error']}", one_line=True)  # grep '^failed:'


def finish_run(total: int, failed: int, output, retry: str = RETRY) -> int:
    """Say how a many-item run ended (on stderr) and return its exit code: 1 if any item failed.
    ``retry`` says how to run the failed items again."""
    print(terminal_safe(f"{total - failed:,} of {counted(total, 'item')} done; results in {output}"), file=sys.stderr)
    if failed:
        records = f"its record in {output} has" if failed == 1 else f"their records in {output} have"
        print(terminal_safe(f'error: {failed:,} of {counted(total, "item")} failed ({records} an "error"); {retry}'),
              file=sys.stderr)
        return 1
    return 0


def nothing_left(output, items, max_new_tokens: int) -> int:
    """A re-run whose items are all done already (either engine): say so, and return the exit code of the
    answers in ``output`` (``check_answers``)."""
    print("Nothing left to do.", file=sys.stderr)
    return check_answers(output, items, max_new_tokens)


def check_answers(path, items: list[Item], max_new_tokens: int) -> int:
    """Say (on stderr) how many of ``items`` have, as their last line in ``path``, an extraction that
    does not follow the schema (``"valid": false``); return 1 if any, else 0 (always 0 for the other
    tasks, whose records have no ``"valid"``).

    A re-run of the same request skips those items (greedy decoding would give the same answer), so
    the exit code says, run after run, that the file holds answers that are not usable as they are.
    """
    last = last_records(path)
    records = [last.get(resume_key(*item.key), {}) for item in items]
    records = [record for record in records if record]
    invalid = [record for record in records if record.get("valid") is False]
    if invalid:
        print(terminal_safe(f'error: {len(invalid)} of {counted(len(records), "answer")} in {path} '
                            f'{"does" if len(invalid) == 1 else "do"} not follow the schema ("valid": false; "errors" says why, '
                            f'"raw" has the text); {schema_advice(invalid, max_new_tokens)}.'), file=sys.stderr)
    return int(bool(invalid))


def schema_advice(invalid: list[dict], max_new_tokens: int) -> str:
    """How to get answers that follow the schema, for these records of invalid extractions: a constrained
    answer fails only when it is cut off; an unconstrained one may be any text."""
    advice = []
    if any(record.get("constrained") for record in invalid):
        advice.append(f"a constrained answer fails only when --max-new-tokens ({max_new_tokens}) cuts it off: "
                      "raise --max-new-tokens")
    if not all(record.get("constrained") for record in invalid):
        advice.append("answers made with --no-constrain are checked only after generation: leave out --no-constrain "
                      "to have them constrained to the schema")
    return "; ".join(advice)


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
        self.written = 0  # lines written by this writer

    def __enter__(self) -> "JsonlWriter":
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8", newline="\n")  # JSON Lines end in \n, on Windows too
        if needs_newline:
            self._file.write("\n")
        return self

    def write(self, record: dict) -> None:
        """Append one line and flush it to disk. ``CommandLineError`` if the disk is full (or the file too
        large), or if the file was removed or replaced since it was opened: the lines would be lost."""
        try:
            self._file.write(json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise self._write_error(error) from None
        self.written += 1
        if not _is_file_at(self._file.fileno(), self.path):
            raise CommandLineError(
                f"--output '{self.path}' was removed or replaced while this run was writing it: the "
                f"{self.written} result(s) this run wrote went to the old file, no longer at that path. Stopped; run the "
                "same command again to redo them (and keep the file in place while a run writes it)."
            )

    def _write_error(self, error: OSError) -> CommandLineError:
        return CommandLineError(
            f"Could not write '{self.path}': {error.strerror or error}. The results written before are kept (a "
            "line cut off now is moved aside on the next run); make room (free disk space, or raise the file-size "
            "limit) and run the same command again: it goes on from there."
        )

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self._file.close()  # flushes again what a failed write left in the buffer
        except OSError as error:
            if exc_type is None:  # else the error that stopped the run (the same one, said once) goes on
                raise self._write_error(error) from None


class OutputLock:
    """An exclusive lock on a JSON-lines output, held for a whole run, so that two runs never write (or
    repair) one file at once: the second stops at once with ``OutputBusyError``. The lock is
    ``flock`` on the file itself; ``follow`` moves it to the file now at the path after ``repair_jsonl``
    replaced it. A file this lock created and nothing wrote is removed again. (No lock where ``fcntl``
    does not exist, on Windows.)

        with OutputLock(path) as lock:
            plan = resume(path, items, request)
            lock.follow()
            ...
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        self._created = not os.path.exists(self.path)  # a dangling link too: the file it names is made now
        self.follow()
        return self

    def follow(self) -> None:
        """Hold the lock on the file that is at the path now."""
        while fcntl is not None and not (self._fd is not None and _is_file_at(self._fd, self.path)):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"Another phi-helpers run is writing '{self.path}' now. Wait for it to end (then run this "
                    "command again: it goes on from there), or give this run another --output."
                ) from None
            old, self._fd = self._fd, fd
            if old is not None:
                os.close(old)

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        if self._created and os.fstat(self._fd).st_size == 0:
            # The file the path leads to, not the path: a symbolic link the user made to a file that did
            # not exist yet (--output lnk/out.jsonl -> real/out.jsonl) stays; the empty file made through it goes.
            target = os.path.realpath(self.path)
            if _is_file_at(self._fd, Path(target)):
                with contextlib.suppress(OSError):
                    os.remove(target)
        os.close(self._fd)


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` (not replaced or removed since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


PROGRESS_SECONDS = 30  # without a terminal, Progress writes a line this often (and one at the end)


def _in_a_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (whose output area draws a bar's updates in place)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """A run's progress on stderr (stdout stays clean for results), and a ``failed:`` line per failed item.

    On a terminal and in a notebook (a Jupyter kernel draws the bar in place): a tqdm bar, the ``failed:``
    lines printed above it. Anywhere else (a log file, cron, a container, a pipe), where the bar's carriage
    returns would glue the whole run onto one line:
    no bar, but a line such as ``caption: 120/10000 done, 3 failed, 0:02:00`` every ``PROGRESS_SECONDS``
    and one at the end, and each ``failed:`` line on a line of its own (``grep '^failed:'`` finds them).

        with Progress(len(items), "caption") as progress:
            progress.failed(failure_line(record))   # an item that failed (counted)
            progress.update(len(batch))             # items done, failed ones included
    """

    def __init__(self, total: int | None, description: str):
        self.total, self.description = total, description
        self.done = self.failures = 0
        self.started = self.shown = time.monotonic()
        live = sys.stderr.isatty() or _in_a_notebook()
        self.bar = tqdm(total=total, desc=description, unit="image", file=sys.stderr) if live else None

    def update(self, count: int = 1) -> None:
        """``count`` more items done."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif time.monotonic() - self.shown >= PROGRESS_SECONDS:
            self._show()

    def failed(self, line: str) -> None:
        """Show the ``failed:`` line of an item that failed, on a line of its own, and count it."""
        self.failures += 1
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _show(self) -> None:
        self.shown = time.monotonic()
        total = "" if self.total is None else f"/{self.total}"
        failed = f", {self.failures} failed" if self.failures else ""
        elapsed = timedelta(seconds=round(self.shown - self.started))
        print(f"{self.description}: {self.done}{total} done{failed}, {elapsed}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._show()


SYSTEM_FOLDERS = ("/dev", "/proc", "/sys")  # their files are streams or views of the system, not files to write
SHARED_MEMORY = "/dev/shm"  # ... except this folder of ordinary (memory-backed) files


def check_output_path(path: Path, inputs=()) -> None:
    """Fail early (before loading the model) if ``path`` cannot be written, or if writing it would
    destroy an input: ``path`` must be a regular file (or not exist yet) in a writable folder, reached
    by no link through ``/dev`` or ``/proc`` (``/dev/stdout`` is whatever stdout is, maybe a file of
    the user's), and not one of the files ``inputs`` (paths; URLs are left out)."""
    if str(path) == "-":
        raise CommandLineError("--output - is not standard output here: leave --output out to print the answer.")
    if path.is_dir():
        raise CommandLineError(f"--output '{path}' is a folder; give a file name inside it, e.g. '{path / 'results.jsonl'}'.")
    hops = _link_hops(path)
    if any(_in_system_folder(hop) for hop in hops) or (path.exists() and not path.is_file()):
        raise CommandLineError(
            f"--output '{path}' is not a regular file (a device, pipe, socket or standard output): results are read "
            "back to resume and replaced atomically, which needs a file. Give a file name (without --output the "
            "answer is printed, and the shell's > or >> can put it in a file)."
        )
    target = Path(os.path.realpath(path))  # a symbolic link: the file it points to is written
    if not target.parent.is_dir():
        raise CommandLineError(f"Cannot write '{path}': the folder '{target.parent}' does not exist. Create it first.")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        if _read_only(target.parent):  # os.access says no for it too, but no permission would help
            raise CommandLineError(f"Cannot write '{path}': the filesystem that holds '{target.parent}' is read-only "
                                   "(mounted read-only). Choose an --output on a filesystem you can write to.")
        raise CommandLineError(f"Cannot write '{path}': permission denied. Choose a folder you can write to, or "
                               "change the file's permissions.")
    if target.exists():
        for source in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(source, target):
                    raise CommandLineError(f"--output '{path}' is the input '{source}'; writing it would destroy it. "
                                           "Give another file name.")


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` is on a filesystem mounted read-only (False where the system cannot say)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs on Windows
        return False


def input_files(items: list[Item], *paths) -> set[str]:
    """The files a run reads: the items' (URLs left out) and ``paths`` (a schema...; None skipped), for
    ``check_output_path``."""
    return {item.source for item in items if not is_url(item.source)} | {str(path) for path in paths if path}


def _link_hops(path: Path, limit: int = 40) -> list[str]:
    """Every path the resolution of ``path`` passes through, component by component, each symbolic link
    followed (``lnk/1`` with ``lnk`` -> ``/dev/fd`` passes ``/dev/fd``, ``/proc/self``, ``/proc/PID/fd/1``);
    ``CommandLineError`` for a loop, or more than ``limit`` links."""
    hops, current, parts, links = [], "/", list(Path(os.path.abspath(path)).parts[1:]), 0
    while parts:
        candidate = os.path.normpath(os.path.join(current, parts.pop(0)))  # current has no links: ".." is safe
        hops.append(candidate)
        if os.path.islink(candidate):
            links += 1
            if links > limit:
                raise CommandLineError(f"--output '{path}' is a loop of symbolic links. Give a file name.")
            target = Path(os.readlink(candidate))
            current = "/" if target.is_absolute() else current
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
        else:
            current = candidate
    return hops


def _in_system_folder(path: str) -> bool:
    """Whether ``path`` is inside ``/dev`` (but not ``/dev/shm``, memory-backed files), ``/proc`` or ``/sys``."""
    inside = any(path.startswith(folder + "/") for folder in SYSTEM_FOLDERS)
    return inside and not (path == SHARED_MEMORY or path.startswith(SHARED_MEMORY + "/"))


def appends_lines(path: Path) -> bool:
    """Whether results go to ``path`` as JSON lines, appended: its name ends in ``.jsonl`` or it holds
    lines of results already (a single image's answer then becomes one more line, never replacing them)."""
    return path.suffix.lower() == ".jsonl" or holds_records(path)


def holds_records(path: Path) -> bool:
    """Whether ``path`` is a regular file of results: it holds a record, and nothing before its first
    record that ``JsonlWriter`` could not have written (reading stops there: an image is not read through)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            while line := file.readline(MAX_RECORD_BYTES):
                line = line.rstrip(b"\r\n")
                if _parse_line(line) is not None:
                    return True
                if line.strip() and not _looks_like_a_record(line):
                    return False
    except OSError:
        return False
    return False


TEXT_PROBE_BYTES = 8192  # how much of an existing --output check_replaceable reads to tell text from a document


def check_replaceable(path: Path, what: str = "the answer") -> None:
    """Fail early (before loading the model) if ``path`` exists and holds something other than text.

    A single answer and an eval report replace their ``--output``: a tab-completion slip
    (``--output scan.png``, ``--output contract.pdf``) must not turn a picture or a document into
    text. Only the first ``TEXT_PROBE_BYTES`` are read (an image is not read through): text is UTF-16
    with its byte order mark, or has no NUL byte and is not a PDF (``_is_text``). ``what``
    names what would replace the file in the message.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(TEXT_PROBE_BYTES)
    except OSError:  # nothing there yet (check_output_path has said whether it can be written)
        return
    if not _is_text(head):
        raise CommandLineError(
            f"--output '{path}' holds something other than text (an image, a PDF or another binary file); {what} "
            "would replace it. Choose another --output (a new file name), or move this file away first."
        )


def _is_text(head: bytes) -> bool:
    """Whether the first bytes of a file are text: UTF-16 with its byte order mark (Windows' "Unicode"),
    or no NUL byte (images and office documents have some in their first bytes) and not the start of
    a PDF (some PDFs are all ASCII). Text in any 8-bit encoding (UTF-8, Latin-1...) counts."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    return b"\0" not in head and not head.startswith(PDF_SIGNATURE)



def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it to ``path``.

    The rename is atomic: ``path`` holds either its old content or the complete new one, never a
    half-written file, even if the program is interrupted. A file that existed keeps its permissions
    and its group (a new one gets the usual ones, as ``open`` would make it); a symbolic link stays a
    link to the new content.
    """
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:  # Windows would write \r\n
            if target.exists():
                _keep_owner_and_mode(file.fileno(), target.stat())
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def print_result(text: str) -> None:
    """Print ``text`` (an answer, a report) on standard output and flush it at once, so that a failed write is
    reported as one to standard output (a full disk behind ``> file``, ``> /dev/full``). A reader that went
    away (``| head``: ``BrokenPipeError``) is left to the command line, which stops quietly."""
    with _writing_stdout():
        print(text, flush=True)


def flush_stdout() -> None:
    """Flush standard output, if it is open at all (``>&-`` closes it: ``sys.stdout`` is None), as
    ``print_result`` does."""
    with _writing_stdout():
        if sys.stdout is not None:
            sys.stdout.flush()


@contextlib.contextmanager
def _writing_stdout():
    """A failed write to standard output as a ``CommandLineError`` that says it was standard output."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise CommandLineError(
            f"Could not write to standard output: {error.strerror or error}. The result was not printed in full; "
            "make room where standard output goes, or write the result to a file with --output FILE."
        ) from None


def _keep_owner_and_mode(handle: int, original: os.stat_result) -> None:
    """Give the open file ``handle`` the group and permission bits of ``original`` (the file it stands in
    for or sits beside); the group only where this user may set it (a group they belong to). Windows has
    neither (``os.fchmod`` only from Python 3.13, for the read-only flag): the file keeps the folder's."""
    if hasattr(os, "fchown"):
        with contextlib.suppress(PermissionError):
            os.fchown(handle, -1, original.st_gid)
    if hasattr(os, "fchmod") and os.name != "nt":
        os.fchmod(handle, stat.S_IMODE(original.st_mode))


# Signals that stop a run as Ctrl-C (SIGINT) does: SIGTERM (timeout, kill, docker stop, a scheduler's cancel)
# and SIGHUP (the terminal closed, an ssh connection dropped). Windows has neither SIGHUP nor its use.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside: ``STOP_SIGNALS`` (SIGTERM, SIGHUP) stop the command as Ctrl-C does: ``KeyboardInterrupt``,
    whose ``stopping_signal`` is the signal, so that the run cleans up and says what it kept instead of
    dying without a word (and leaving the empty output file its lock made). A signal set to be ignored
    (``nohup`` ignores SIGHUP) stays ignored. Outside the main thread (where Python cannot set handlers)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stopping_signal(interrupt: KeyboardInterrupt) -> signal.Signals:
    """The signal that raised ``interrupt``: the one ``terminate_as_interrupt`` names in it, else SIGINT (Ctrl-C)."""
    name = interrupt.args[0] if interrupt.args else None
    return signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGINT
