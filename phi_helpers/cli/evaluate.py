"""``phi-helpers eval --data data/eval``: run the model on a labelled set and score it.

Transcriptions are scored by character error rate, extractions by per-field exact match; both are
defined in ``phi_helpers.api.metrics``.
"""

import codecs
import difflib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from ..api.constrained import closed_schema
from ..api.metrics import character_error_rate, error_rate, field_matches, levenshtein, normalise_text
from ..api.report import format_table
from ..api.structured import load_schema, schema_validator
from ..errors import CommandLineError, ManifestError, SchemaError, refuse_other_encodings
from .inputs import Item, counted, is_multi_page_tiff, is_pdf, terminal_safe
from .outputs import (
    Progress, check_output_path, check_replaceable, holds_records, json_safe, model_info, print_result, write_atomically,
)
from .tasks import BATCH_MAX_NEW_TOKENS, BATCH_SIZE, predict_items, read_schema

MANIFEST = "manifest.jsonl"
MAX_MANIFEST_PROBLEMS = 10  # read_manifest names this many malformed lines at most
MAX_REPORT_BYTES = 256 << 20  # a larger file in the set's folder is not taken for an earlier report
EVAL_TASKS = ("ocr", "extract")
MANIFEST_FIELDS = ("id", "image", "task", "expected", "schema")  # a line with any other field is refused
REQUIRED_FIELDS = ("image", "task", "expected")

# ----------------------------------------------------------------------------------------------
# The labelled set
# ----------------------------------------------------------------------------------------------


def read_manifest(data_dir, limit: int | None = None) -> list[dict]:
    """The items of ``DIR/manifest.jsonl`` (the first ``limit`` of them), checked, with their files' paths.

    Each returned dict has ``id``, ``task``, ``expected``, ``image`` (a Path: ``data_dir`` / the manifest's
    path), ``image_name`` (the manifest's path, relative to ``data_dir``: what the report shows) and, for
    extract items, ``schema`` (a Path) and ``schema_name`` (its name in the report: ``_schema_names``).
    Paths are relative to ``data_dir`` and must stay inside it (no absolute paths, no ``..`` or symbolic
    link that leads out); the images and schema files must exist, and an image must not be a document of
    several pages (a PDF, a multi-page TIFF): an item scores one image. The manifest is UTF-8 text, with
    or without a byte order mark (a UTF-16 or UTF-32 one is refused at once); only ``\n``, ``\r\n`` and
    ``\r`` end a line. A line may hold only the ``MANIFEST_FIELDS``, and no object in it a key twice.
    Raises ManifestError naming the line of every malformed item (up to ``MAX_MANIFEST_PROBLEMS``), so
    that one run shows what to fix.
    """
    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST
    if data_dir.is_file():
        raise ManifestError(
            f"--data takes the folder that holds {MANIFEST}, not a file: '{data_dir}' is a file. "
            f"Try --data '{data_dir.parent}'."
        )
    if not data_dir.is_dir():
        raise ManifestError(f"No folder at '{data_dir}'. --data must be a folder that contains {MANIFEST}.")
    if not manifest.is_file():
        raise ManifestError(f"No {MANIFEST} in '{data_dir}'. --data must be a folder that contains {MANIFEST}.")
    entries, problems = [], []
    lines_of_ids = {}  # id -> the line that gave it first
    schemas = {}  # schema path -> the schema, read once for all the lines that name it
    text = manifest.read_bytes()
    refuse_other_encodings(text, str(manifest), ManifestError)  # else every line would be "not UTF-8" or "not JSON"
    text = text.removeprefix(codecs.BOM_UTF8)  # Windows editors may start UTF-8 with a BOM
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{manifest}, line {number}"
        try:
            line = _decode(raw, where)
            if line.strip():
                entry = _check_entry(line, data_dir, where, schemas)
                first = lines_of_ids.setdefault(entry["id"], number)
                if first != number:
                    raise ManifestError(
                        f"{where}: the id {entry['id']!r} is also the id of line {first} (without \"id\", an item's id "
                        "is its image's name); an item counted twice weighs double in the scores. Give each item "
                        "its own \"id\", or remove the repeated line."
                    )
                entries.append(entry)
        except ManifestError as error:
            problems.append(str(error))
        if limit is not None and len(entries) + len(problems) == limit:
            break
    if len(problems) == 1:
        raise ManifestError(problems[0])
    if problems:
        more = f" (and {len(problems) - MAX_MANIFEST_PROBLEMS} more)" if len(problems) > MAX_MANIFEST_PROBLEMS else ""
        raise ManifestError(f"{len(problems)} items of {manifest} cannot be used{more}: "
                            + " | ".join(problems[:MAX_MANIFEST_PROBLEMS]))
    if not entries:
        raise ManifestError(f"{manifest} has no items.")
    names = _schema_names({entry["schema"] for entry in entries if "schema" in entry}, data_dir)
    for entry in entries:
        if "schema" in entry:
            entry["schema_name"] = names[entry["schema"]]
    return entries


def _schema_names(paths: set[Path], data_dir: Path) -> dict[Path, str]:
    """The name of each schema file in the report, before its fields (``receipt.total``): the start of its
    file name (``schemas/receipt.schema.json``: ``receipt``) where no other of ``paths`` starts the same;
    else its path in ``data_dir`` without ``.schema.json`` or ``.json`` (``schemas/receipt`` and
    ``other/receipt``, or ``receipt`` and ``receipt.v2``); else (``r.json`` beside ``r.schema.json``) its
    whole path. Two schemas never share a name, so their fields never share a row of the field table.
    (``paths``: the schemas of the items read; with ``--limit``, a name may be shorter than in a whole run.)"""
    relative = {path: Path(os.path.normpath(path.relative_to(data_dir))).as_posix() for path in paths}

    def start(name: str) -> str:
        return Path(name).name.split(".")[0]

    def without_suffix(name: str) -> str:
        return re.sub(r"(\.schema)?\.json$", "", name)

    distinct, names = set(relative.values()), {}
    for name in distinct:
        for rule in (start, without_suffix, str):  # the first rule that gives this schema a name of its own
            if [rule(other) for other in distinct].count(rule(name)) == 1:
                names[name] = rule(name)
                break
    return {path: names[name] for path, name in relative.items()}


def _decode(raw: bytes, where: str) -> str:
    """One line of the manifest as text; ManifestError if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(
            f"{where} is not UTF-8 text (it has the byte 0x{raw[error.start]:02x} at position {error.start + 1}). "
            f"Save {MANIFEST} as UTF-8."
        ) from None


def _parse(line: str, where: str):
    """The JSON value on one manifest line. Unlike Python's json, refuses ``NaN``, ``Infinity`` and
    numbers too large for a float (``1e999``), which strict JSON does not have, and an object with a key
    twice (Python's json would keep the last value without a word)."""

    def refuse(text: str):
        raise ManifestError(f"{where} has the number {text}, which is not finite; JSON allows only finite numbers.")

    def finite(text: str) -> float:
        value = float(text)
        return value if math.isfinite(value) else refuse(text)

    def no_repeated_key(pairs: list[tuple]) -> dict:
        value = {}
        for key, item in pairs:
            if key in value:
                raise ManifestError(f"{where} has the key {key!r} twice in one object; JSON readers keep only the "
                                    "last value. Remove the one you did not mean.")
            value[key] = item
        return value

    try:
        return json.loads(line, parse_constant=refuse, parse_float=finite, object_pairs_hook=no_repeated_key)
    except RecursionError:
        raise ManifestError(f"{where} is nested too deeply to read.") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where} is not valid JSON: {error.msg} (column {error.colno}).") from None
    except ManifestError:
        raise
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise ManifestError(f"{where} is not valid JSON: {error}.") from None


def _check_entry(line: str, data_dir: Path, where: str, schemas: dict) -> dict:
    """One manifest line, parsed and checked; paths made relative to the manifest's folder. ``schemas``:
    the schemas read so far, by path (many lines share one), filled as new ones are read."""
    entry = _parse(line, where)
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} must be a JSON object.")
    unknown = [key for key in entry if key not in MANIFEST_FIELDS]
    if unknown:  # a misspelt field would be left out without a word
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key.lower(), MANIFEST_FIELDS, n=1)
            named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ManifestError(f"{where} has the unknown field(s) {', '.join(named)}; a manifest line has only the fields "
                            f"{', '.join(MANIFEST_FIELDS)}. Fix the name, or remove the field.")
    missing = [key for key in REQUIRED_FIELDS if key not in entry]
    if missing:
        raise ManifestError(f"{where} lacks {', '.join(missing)}.")
    if entry["task"] not in EVAL_TASKS:
        raise ManifestError(f"{where}: task must be one of {', '.join(EVAL_TASKS)}, not {entry['task']!r}.")
    if entry["task"] == "ocr" and not isinstance(entry["expected"], str):
        raise ManifestError(f"{where}: an ocr item's expected answer must be a string.")
    if entry["task"] == "extract":
        if not isinstance(entry["expected"], dict):
            raise ManifestError(f"{where}: an extract item's expected answer must be a JSON object.")
        if "schema" not in entry:
            raise ManifestError(f"{where}: an extract item needs a schema.")
    checked = dict(entry, image=_existing(data_dir, entry["image"], "image", where), image_name=entry["image"])
    checked.setdefault("id", Path(entry["image"]).stem)
    if is_pdf(checked["image"]):
        raise ManifestError(
            f"{where}: the image '{checked['image']}' is a PDF; eval scores one image per item. Render the page to "
            "PNG first (e.g. pdftoppm -png -r 144), or use phi-helpers predict --image FILE.pdf for PDFs."
        )
    if is_multi_page_tiff(checked["image"]):
        raise ManifestError(
            f"{where}: the image '{checked['image']}' is a TIFF of several pages; eval scores one image per item. "
            "Save the page you mean as its own file (e.g. tiffsplit, or in Python: "
            "phi_helpers.api.images.load_page('FILE.tif', N).save('page.png')), "
            "or use phi-helpers predict --image FILE.tif for every page."
        )
    if "id" in entry and not (isinstance(entry["id"], str) and entry["id"].strip()):
        raise ManifestError(f"{where}: \"id\" must be a non-empty string, not {entry['id']!r} (or leave it out: "
                            "the id is then the image's name).")
    if "schema" in entry:
        checked["schema"] = _existing(data_dir, entry["schema"], "schema", where)
        _check_expected(entry["expected"], checked["schema"], where, schemas)
    if entry["task"] == "extract" and not entry["expected"]:  # a schema without "required" allows {}
        raise ManifestError(f"{where}: the expected answer is {{}}, which names no field to score (the item would "
                            "count as all fields right whatever the answer). Write the fields the image shows into "
                            "\"expected\", or leave the line out.")
    return checked


def _check_expected(expected: dict, schema_path: Path, where: str, schemas: dict) -> None:
    """Refuse a gold answer that its own schema does not allow (a misspelt key, a number written as text):
    no answer that follows the schema could ever match it. A key that the schema does not declare is
    refused where constrained decoding would never write it (``closed_schema``)."""
    if schema_path not in schemas:
        try:
            schemas[schema_path] = load_schema(schema_path)
        except SchemaError as error:
            raise ManifestError(f"{where}: {error}") from None
    problems = _schema_problems(expected, closed_schema(schemas[schema_path]))
    if problems:
        raise ManifestError(
            f"{where}: the expected answer does not follow its schema '{schema_path.name}' ({'; '.join(problems)}); "
            "an answer that follows the schema could never match it. Fix the \"expected\" field of this line."
        )


def _schema_problems(expected: dict, schema: dict) -> list[str]:
    """What in ``expected`` breaks ``schema``, sorted, each with its place (``items/0: ...``); a key the
    schema does not declare is named with the closest one it does."""
    problems = []
    for error in schema_validator(schema).iter_errors(expected):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        if error.validator == "additionalProperties" and error.validator_value is False:
            declared = list(error.schema.get("properties", {}))
            for key in (key for key in error.instance if key not in declared):
                close = difflib.get_close_matches(key, declared, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}: the key {key!r} is not a property the schema declares{hint}")
        else:
            problems.append(f"{where}: {error.message}")
    return sorted(problems)


def _existing(data_dir: Path, relative, field: str, where: str) -> Path:
    """``_inside``, refused unless a file is there: the message names the file, the line and the field."""
    path = _inside(data_dir, relative, field, where)
    if not path.is_file():
        raise ManifestError(
            f"{where}: no {field} file at '{path}'. Check the \"{field}\" field of this line "
            f"(paths are relative to the folder of {MANIFEST}, '{data_dir}')."
        )
    return path


def _inside(data_dir: Path, relative, field: str, where: str) -> Path:
    """``data_dir / relative``, refused unless it is a relative path that stays inside ``data_dir``
    once ``..`` and symbolic links are resolved."""
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: {field} must be a file name (a non-empty string), not {relative!r}.")
    if "\0" in relative:  # no file name holds one; Path.resolve would fail with "embedded null byte"
        raise ManifestError(f"{where}: the {field} path {relative!r} contains a NUL character (\\u0000), which no "
                            f"file name can hold. Fix the \"{field}\" field of this line.")
    path = data_dir / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(data_dir.resolve()):
        raise ManifestError(
            f"{where}: the {field} path {relative!r} leads outside the data folder '{data_dir}'. Paths in the "
            "manifest are relative to its folder and must stay inside it; copy the file into the folder."
        )
    return path


# ----------------------------------------------------------------------------------------------
# Running and scoring
# ----------------------------------------------------------------------------------------------


def evaluate(
    model, processor, entries: list[dict], batch_size: int = BATCH_SIZE, max_new_tokens: int = BATCH_MAX_NEW_TOKENS,
    progress=None, constrain: bool = True,
) -> dict:
    """Run the model on every entry, score the answers, and return the report (a JSON-ready dict).

    Entries with the same task and schema that follow each other run together, ``batch_size`` at a
    time. ``progress``, if given, is called with the number of entries finished after each batch.
    ``constrain``: extractions use constrained decoding (default) or the prompt-and-retry path.
    """
    schemas = {entry["schema"]: load_schema(entry["schema"]) for entry in entries if "schema" in entry}
    start = time.perf_counter()
    scored = []
    for group in _batches(entries, batch_size):
        task, schema_path = group[0]["task"], group[0].get("schema")
        items = [Item(str(entry["image"])) for entry in group]
        records = predict_items(
            model, processor, items, task, schema=schemas.get(schema_path), max_new_tokens=max_new_tokens,
            constrain=constrain,
        )
        scored.extend(score_entry(entry, record) for entry, record in zip(group, records))
        if progress:
            progress(len(group))
    return {
        **model_info(model, processor),
        "constrained": constrain,
        "items_evaluated": len(scored),
        "total_seconds": round(time.perf_counter() - start, 3),
        "summary": summarise(scored),
        "items": scored,
    }


def _batches(entries: list[dict], size: int):
    """Consecutive runs of entries with the same task and schema, at most ``size`` long."""
    batch = []
    for entry in entries:
        if batch and (len(batch) == size or _kind(entry) != _kind(batch[0])):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def _kind(entry: dict) -> tuple:
    return entry["task"], entry.get("schema")


def score_entry(entry: dict, record: dict) -> dict:
    """The report line of one item: its answer and its score. A failed item scores as an empty answer.

    Numbers JSON cannot hold in an extracted answer (``NaN``, ``1e999``) are written as text
    (``"NaN"``, ``"Infinity"``) after scoring, so that the report stays strict JSON.
    """
    line = {"id": entry["id"], "image": entry["image_name"], "task": entry["task"]}
    if "error" in record:
        line["error"] = record["error"]
    if entry["task"] == "ocr":
        answer = record.get("answer") or ""
        line.update(answer=answer, expected=entry["expected"], cer=round(character_error_rate(answer, entry["expected"]), 4))
        line["edits"] = levenshtein(normalise_text(answer), normalise_text(entry["expected"]))
        line["reference_chars"] = len(normalise_text(entry["expected"]))
    else:
        answer = record.get("answer")
        line.update(
            answer=json_safe(answer),
            expected=entry["expected"],
            schema=entry["schema_name"],
            fields=field_matches(answer, entry["expected"]),
            valid=record.get("valid", False),
            errors=record.get("errors", []),
            raw=record.get("raw", []),
        )
    return line


def summarise(scored: list[dict]) -> dict:
    """Totals over the items: CER for ocr, per-field and overall exact match for extract.

    The ocr CER is all edits / all reference characters (``error_rate``: references that are all
    empty give 0.0 without edits, 1.0 with any, as an item's CER does); ``mean_item_cer`` is the mean
    of the items' CERs before they are rounded for the report. A share of nothing (no field scored)
    is None (null in the report, "n/a" in the text), not 0.
    """
    summary = {}
    ocr = [line for line in scored if line["task"] == "ocr"]
    if ocr:
        edits = sum(line["edits"] for line in ocr)
        chars = sum(line["reference_chars"] for line in ocr)
        summary["ocr"] = {
            "items": len(ocr),
            "cer": round(error_rate(edits, chars), 4),
            "mean_item_cer": round(sum(error_rate(line["edits"], line["reference_chars"]) for line in ocr) / len(ocr), 4),
        }
    extract = [line for line in scored if line["task"] == "extract"]
    if extract:
        fields: dict[str, dict] = {}
        for line in extract:
            for field, right in line["fields"].items():
                counts = fields.setdefault(f"{line['schema']}.{field}", {"correct": 0, "total": 0})
                counts["correct"] += right
                counts["total"] += 1
        for counts in fields.values():
            counts["accuracy"] = _share(counts["correct"], counts["total"])
        correct = sum(counts["correct"] for counts in fields.values())
        total = sum(counts["total"] for counts in fields.values())
        summary["extract"] = {
            "items": len(extract),
            "valid_answers": sum(bool(line["valid"]) for line in extract),
            "all_fields_right": sum(bool(line["fields"]) and all(line["fields"].values()) for line in extract),
            "exact_match": _share(correct, total),
            "fields_correct": correct,
            "fields_total": total,
            "fields": fields,
        }
    return summary


def _share(part: int, whole: int) -> float | None:
    """``part / whole`` rounded to 4 places; None when ``whole`` is 0 (nothing was scored: no share to give)."""
    return round(part / whole, 4) if whole else None


# ----------------------------------------------------------------------------------------------
# The report as text
# ----------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """The report as the text printed by ``eval``: one table of items, one of fields, a summary."""
    item_rows = [[_cell(line["id"]), line["task"], _item_score(line)] for line in report["items"]]
    parts = [format_table(item_rows, ["item", "task", "score"])]
    extract = report["summary"].get("extract")
    if extract:
        field_rows = [[_cell(name), c["correct"], c["total"], _shown(c["accuracy"])] for name, c in extract["fields"].items()]
        field_rows.append(["overall", extract["fields_correct"], extract["fields_total"], _shown(extract["exact_match"])])
        parts.append(format_table(field_rows, ["field", "correct", "total", "exact match"]))
    parts.append(_summary_lines(report))
    return "\n\n".join(parts)


def _cell(text: str) -> str:
    """Text from the manifest (an id, a field's name) as a table cell or in a one-line message: control
    characters as ``\\xNN`` (``terminal_safe``), and so tabs and line breaks, which would break the table's
    columns and rows."""
    return terminal_safe(text, one_line=True)


def _shown(share: float | None) -> str:
    """A share of the summary as text: ``0.833``, or ``n/a`` for None (nothing was scored)."""
    return "n/a" if share is None else f"{share:.3f}"


def _item_score(line: dict) -> str:
    """The score of one report line, and what went wrong: the item failed (``(error)``), or its
    extraction is no JSON (cut off, or unconstrained text) or JSON that does not follow the schema."""
    if "error" in line:
        problem = " (error)"
    elif line["task"] == "extract" and not line["valid"]:
        problem = ", invalid JSON" if line["answer"] is None else ", does not follow the schema"
    else:
        problem = ""
    if line["task"] == "ocr":
        return f"CER {line['cer']:.3f}" + problem
    return f"{sum(line['fields'].values())}/{len(line['fields'])} fields" + problem


def _summary_lines(report: dict) -> str:
    lines = [f"model: {report['model']} on {report['device']} ({report['dtype']}), "
             f"{counted(report['items_evaluated'], 'item')} in {report['total_seconds']:.1f} s"]
    if "extract" in report["summary"]:
        lines.append("extraction: " + ("constrained decoding" if report.get("constrained", True) else "prompt and one retry (--no-constrain)"))
    ocr, extract = report["summary"].get("ocr"), report["summary"].get("extract")
    if ocr:
        lines.append(f"ocr: character error rate {ocr['cer']:.3f} over {counted(ocr['items'], 'item')} (lower is better)")
    if extract:
        lines.append(
            f"extract: exact match {_shown(extract['exact_match'])} over {counted(extract['fields_total'], 'field')} of "
            f"{counted(extract['items'], 'item')}; {extract['valid_answers']} of {counted(extract['items'], 'answer')} valid (higher is better)"
        )
    failed = sum("error" in line for line in report["items"])
    if failed:
        lines.append(f"{counted(failed, 'item')} could not be run and {'counts' if failed == 1 else 'count'} as wrong: each one's error is on stderr (\"failed: ...\") "
                     "and in its item's \"error\" (the report file with --output)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The eval command
# ----------------------------------------------------------------------------------------------


def run_eval_command(args, load) -> int:
    """``phi-helpers eval``: check the set, load the model with ``load()``, run, write the report, print it.

    The report file and what stderr has to say come first, the tables on stdout last: a reader of stdout
    that goes away (``| head``) or a full disk behind it cannot lose the report or the ``failed:`` lines."""
    if sys.stdout is None and not args.output:
        raise CommandLineError("Standard output is closed, so the report would be printed to nowhere: write it to "
                               "a file with --output FILE (or give the command a standard output).")
    entries = read_manifest(args.data, args.limit)
    for schema in sorted({entry["schema"] for entry in entries if "schema" in entry}):
        read_schema(schema, args.constrain)  # a broken or unsupported schema fails now, not after loading the model
    if args.output:
        check_report_path(Path(args.output), Path(args.data))
    model, processor = load()
    with Progress(len(entries), "eval") as progress:
        report = evaluate(
            model, processor, entries, args.batch_size, args.max_new_tokens, progress=progress.update,
            constrain=args.constrain,
        )
    report["data"] = str(args.data)
    if args.output:
        write_atomically(Path(args.output), json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        print(terminal_safe(f"wrote {args.output}"), file=sys.stderr)
    report_cut_off(report["items"], args.max_new_tokens)
    code = report_failures(report["items"], args.output)
    print_result(format_report(report))
    return code


def check_report_path(path: Path, data_dir: Path) -> None:
    """``check_output_path`` for the report, which replaces the file: inside the set's folder
    ``data_dir`` it may replace only an earlier report (never the manifest, an image, a schema, notes),
    and nowhere a file of results (JSON lines of ``phi-helpers predict``) or a file that is not text
    (``check_replaceable``: a PDF or an image named by a slip)."""
    if path.is_dir():  # before check_output_path, whose example is a file of results
        raise CommandLineError(f"--output '{path}' is a folder; give a file name inside it, e.g. '{path / 'report.json'}'.")
    check_output_path(path)
    keys = _json_object_keys(path)  # an earlier report's ("items", "summary"), or one answer's ("source", "task")
    inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(data_dir))
    if inside and path.exists() and not {"items", "summary"} <= keys:
        raise CommandLineError(f"--output '{path}' is a file of the evaluation set in '{data_dir}'; the report would "
                               "replace it. Give the report a new file name, e.g. --output report.json.")
    if holds_records(path) or {"source", "task"} <= keys:
        raise CommandLineError(f"--output '{path}' holds results of phi-helpers predict; the report would replace "
                               "them. Give the report another file name, e.g. report.json.")
    check_replaceable(path, "the report")


def _json_object_keys(path: Path) -> set:
    """The keys of the JSON object in file ``path`` (at most ``MAX_REPORT_BYTES`` read); empty for anything else."""
    try:
        with open(path, "rb") as file:
            value = json.loads(file.read(MAX_REPORT_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return set()
    return set(value) if isinstance(value, dict) else set()


def report_failures(items: list[dict], output) -> int:
    """Say on stderr which items could not be run, and return the exit code: 1 if any failed."""
    failed = [line for line in items if "error" in line]
    for line in failed:
        print(_cell(f"failed: {line['id']} ({line['image']}): {line['error']}"), file=sys.stderr)  # one line each
    if not failed:
        return 0
    where = f'their items in {output} have an "error"' if output else "the reasons are above"
    print(terminal_safe(f"error: {len(failed)} of {counted(len(items), 'item')} failed and {'was' if len(failed) == 1 else 'were'} "
                        f"scored as wrong ({where}); fix them and run the same command again"), file=sys.stderr)
    return 1


def report_cut_off(items: list[dict], max_new_tokens: int) -> None:
    """Say on stderr how many extraction answers ``--max-new-tokens`` cut off, if any: they are scored
    as wrong (the exit code does not change), and a larger ``--max-new-tokens`` lets them finish."""
    cut = [line for line in items if _was_cut_off(line)]
    if cut:
        extract = [line for line in items if line["task"] == "extract"]
        print(f"warning: {len(cut)} of {len(extract)} extraction answers were cut off by --max-new-tokens "
              f"({max_new_tokens}) and scored as wrong (\"invalid JSON\" above); raise --max-new-tokens to score "
              "them whole", file=sys.stderr)


def _was_cut_off(line: dict) -> bool:
    """Whether a report line is an extraction whose answer ``max_new_tokens`` cut off (its ``errors`` say so)."""
    return line["task"] == "extract" and line["valid"] is False and any("max_new_tokens" in error for error in line["errors"])
