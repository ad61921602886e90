"""Metrics (CER, per-field exact match) and the ``eval`` command on the shipped set in data/eval."""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import xgrammar
from PIL import Image

import phi_helpers  # noqa: F401  (registers the native classes)
from cli_runner import run
from phi_helpers.api.generation import Generation
from phi_helpers.cli import tasks
from phi_helpers.api.images import load_image
from phi_helpers.api.constrained import compile_schema
from phi_helpers.api.metrics import character_error_rate, field_matches, levenshtein, normalise_value
from phi_helpers.api.report import format_table
from phi_helpers.cli.evaluate import (
    evaluate, format_report, read_manifest, report_cut_off, report_failures, score_entry, summarise,
)
from phi_helpers.errors import ManifestError

pytestmark = pytest.mark.usefixtures("tiny_model")  # tests/conftest.py: the CLI loads the cached tiny model

EVAL_SET = Path(__file__).resolve().parents[1] / "data" / "eval"
needs_eval_set = pytest.mark.skipif(not (EVAL_SET / "manifest.jsonl").exists(), reason="data/eval is not generated")


# ----------------------------------------------------------------------------------------------
# Character error rate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("Saturday", "Sunday", 3),
        ("ab", "ba", 2),  # a swap is two edits (no transpositions)
    ],
)
def test_levenshtein_known_pairs(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_character_error_rate():
    assert character_error_rate("kitten", "sitting") == pytest.approx(3 / 7)  # distance / reference length
    assert character_error_rate("sitting", "kitten") == pytest.approx(3 / 6)
    assert character_error_rate("The quick fox.", "The quick fox.") == 0.0
    assert character_error_rate("The quick\n  fox. ", "The quick fox.") == 0.0  # whitespace runs are one space
    assert character_error_rate("the quick fox.", "The quick fox.") == pytest.approx(1 / 14)  # case counts
    assert character_error_rate("", "abcd") == 1.0
    assert character_error_rate("abcdefgh", "abcd") == 1.0  # 4 insertions / 4 characters
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("x", "") == 1.0


def test_text_is_compared_in_canonical_unicode_form():
    """An accent typed as a combining character (NFD, as macOS file names and some OCR output have it) is
    the same character as the precomposed one; compatibility forms (full width, ligatures) are other
    characters on the page."""
    nfd = unicodedata.normalize("NFD", "Café Zoë")
    assert nfd != "Café Zoë" and field_matches({"merchant": nfd}, {"merchant": "CAFÉ ZOË"}) == {"merchant": True}
    assert character_error_rate(unicodedata.normalize("NFD", "é"), "é") == 0.0
    assert character_error_rate(nfd, "Café Zoë") == 0.0
    assert character_error_rate("Total １２", "Total 12") == pytest.approx(2 / 8)  # full-width digits stay distinct
    assert character_error_rate("ﬁne", "fine") == pytest.approx(2 / 4)  # so does the ligature "ﬁ" (U+FB01)
    line = score_entry({"id": "a", "image": "a.png", "image_name": "a.png", "task": "ocr", "expected": "é"},
                       {"answer": unicodedata.normalize("NFD", "é")})
    assert (line["cer"], line["edits"], line["reference_chars"]) == (0.0, 0, 1)


def test_the_mean_item_cer_is_taken_before_rounding():
    lines = [score_entry({"id": name, "image": name, "image_name": name, "task": "ocr", "expected": "abc"}, {"answer": answer})
             for name, answer in (("a", "abd"), ("b", ""))]
    assert [line["cer"] for line in lines] == [0.3333, 1.0]
    assert summarise(lines)["ocr"]["mean_item_cer"] == 0.6667  # (1/3 + 1) / 2, not (0.3333 + 1) / 2 = 0.6666


@pytest.mark.parametrize("answer, cer", [("hello", 1.0), ("", 0.0), (" \n ", 0.0)])
def test_an_empty_reference_scores_the_same_for_the_item_and_the_summary(answer, cer):
    entry = {"id": "blank", "image": "blank.png", "image_name": "blank.png", "task": "ocr", "expected": ""}
    line = score_entry(entry, {"answer": answer})
    assert line["cer"] == cer and summarise([line])["ocr"]["cer"] == cer
    right = score_entry({**entry, "expected": "abc"}, {"answer": "abc"})
    assert summarise([line, right])["ocr"]["cer"] == round(line["edits"] / 3, 4)  # all edits / all characters


# ----------------------------------------------------------------------------------------------
# Per-field exact match
# ----------------------------------------------------------------------------------------------


def test_field_matches_normalises_strings_and_numbers():
    expected = {"merchant": "Cafe Lumen", "total": 27.17, "quantity": 2, "date": "2024-06-07", "paid": True}
    answer = {"merchant": "  CAFE   lumen ", "total": 27.170, "quantity": 2.0, "date": "2024-06-08", "paid": True}
    assert field_matches(answer, expected) == {"merchant": True, "total": True, "quantity": True, "date": False, "paid": True}


def test_field_matches_is_strict_about_types_and_missing_fields():
    expected = {"total": 40.42, "sex": "M", "paid": True, "note": None}
    assert field_matches({"total": "40.42", "paid": 1, "note": None}, expected) == {
        "total": False,  # a string is not the number
        "sex": False,  # missing
        "paid": False,  # 1 is not true
        "note": True,
    }
    assert field_matches(None, expected) == dict.fromkeys(expected, False)  # no JSON at all
    assert field_matches(["a list"], expected) == dict.fromkeys(expected, False)


def test_field_matches_compares_lists_and_objects_element_by_element():
    items = [{"name": "Espresso", "amount": 4.2}, {"name": "Oat latte", "amount": 3.6}]
    assert field_matches({"items": [{"name": "espresso", "amount": 4.20}, {"name": "OAT LATTE", "amount": 3.6}]}, {"items": items}) == {"items": True}
    assert field_matches({"items": items[:1]}, {"items": items}) == {"items": False}
    assert field_matches({"items": items[::-1]}, {"items": items}) == {"items": False}  # order matters
    assert normalise_value({"a": [" X  y ", 1]}) == {"a": ["x y", 1.0]}


def test_extra_keys_are_ignored_at_the_top_level_only():
    """As metrics.py says: a top-level field is scored on its own, a nested value as a whole."""
    expected = {"address": {"city": "Lyon"}, "items": [{"name": "tea"}]}
    answer = {"address": {"city": "LYON"}, "items": [{"name": "Tea"}], "note": "not asked for"}
    assert field_matches(answer, expected) == {"address": True, "items": True}
    answer = {"address": {"city": "Lyon", "zip": "69001"}, "items": [{"name": "tea", "amount": 2}]}
    assert field_matches(answer, expected) == {"address": False, "items": False}
    assert field_matches({"address": {}, "items": [{}]}, expected) == {"address": False, "items": False}


def test_numbers_match_by_exact_value_and_no_answer_is_empty_text():
    """Rounding to 6 decimals took a dose of 4e-7 for 1e-7 and two 17-digit account numbers for one."""
    assert field_matches({"x": 12.50, "n": 3.0}, {"x": 12.5, "n": 3}) == {"x": True, "n": True}
    assert field_matches({"dose": 4e-7}, {"dose": 1e-7}) == {"dose": False}
    assert field_matches({"acct": 12345678901234567}, {"acct": 12345678901234568}) == {"acct": False}
    assert character_error_rate(None, "None") == 1.0 and character_error_rate(None, "") == 0.0


def test_summary_per_field_and_overall():
    scored = [
        {"task": "ocr", "cer": 0.5, "edits": 5, "reference_chars": 10},
        {"task": "ocr", "cer": 0.0, "edits": 0, "reference_chars": 30},
        {"task": "extract", "schema": "receipt", "fields": {"total": True, "date": False}, "valid": True},
        {"task": "extract", "schema": "receipt", "fields": {"total": True, "date": True}, "valid": False},
        {"task": "extract", "schema": "passport", "fields": {"sex": False}, "valid": True},
    ]
    summary = summarise(scored)
    assert summary["ocr"] == {"items": 2, "cer": 0.125, "mean_item_cer": 0.25}  # 5 edits / 40 chars; mean of 0.5, 0
    extract = summary["extract"]
    assert extract["fields"] == {
        "receipt.total": {"correct": 2, "total": 2, "accuracy": 1.0},
        "receipt.date": {"correct": 1, "total": 2, "accuracy": 0.5},
        "passport.sex": {"correct": 0, "total": 1, "accuracy": 0.0},
    }
    assert extract["exact_match"] == 0.6 and (extract["fields_correct"], extract["fields_total"]) == (3, 5)
    assert extract["valid_answers"] == 2 and extract["all_fields_right"] == 1


def test_a_share_of_nothing_is_null_and_shown_as_n_a():
    """An item scored on no field: no exact match to give (not 0.0), and not all fields right."""
    line = {"id": "x", "task": "extract", "schema": "s", "fields": {}, "valid": False, "answer": None, "error": "boom"}
    extract = summarise([line])["extract"]
    assert extract["exact_match"] is None and extract["all_fields_right"] == 0 and extract["fields_total"] == 0
    text = format_report(report_of([line]))
    assert "overall        0      0  n/a" in text.splitlines() and "extract: exact match n/a over 0 fields" in text


def report_of(lines: list[dict]) -> dict:
    """A report as evaluate returns it, for ``lines`` (report lines, as score_entry makes them)."""
    return {"model": "tiny", "device": "cpu", "dtype": "float32", "constrained": True, "items_evaluated": len(lines),
            "total_seconds": 1.0, "summary": summarise(lines), "items": lines}


def test_each_row_says_what_went_wrong_with_an_extraction():
    entry = {"id": "r", "image": "r.png", "image_name": "r.png", "task": "extract", "schema": Path("total.json"),
             "schema_name": "total", "expected": {"total": 4.5}}
    records = {
        "right": {"answer": {"total": 4.5}, "valid": True},
        "not the schema": {"answer": {"total": "4.5"}, "valid": False, "errors": ["total: '4.5' is not of type 'number'"]},
        "no JSON": {"answer": None, "valid": False, "errors": ["no JSON object in the answer"]},
        "failed": {"source": "r.png", "error": "Could not read 'r.png' as an image"},
        "ocr failed": {"source": "r.png", "error": "Could not read 'r.png' as an image"},
    }
    lines = [score_entry({**entry, "id": name}, record) for name, record in records.items()]
    lines[-1] = score_entry({**entry, "id": "ocr failed", "task": "ocr", "expected": "x"}, records["ocr failed"])
    rows = format_report(report_of(lines)).split("\n\n")[0].splitlines()[2:]
    assert [row.split("  ")[-1].strip() for row in rows] == [
        "1/1 fields", "0/1 fields, does not follow the schema", "0/1 fields, invalid JSON", "0/1 fields (error)",
        "CER 1.000 (error)",
    ]


def test_manifest_text_cannot_break_the_table_or_the_terminal(capsys):
    """Ids and field names come from the manifest: an escape sequence or a line break is shown, not obeyed."""
    entry = {"id": "red\x1b[31m\nfake row", "image": "a\nb.png", "image_name": "a\nb.png", "task": "extract",
             "schema": Path("s.json"), "schema_name": "s", "expected": {"to\ttal\x07": 1}}
    line = score_entry(entry, {"error": "Could not read 'a\nb.png'"})
    text = format_report(report_of([line]))
    assert "\x1b" not in text and "\x07" not in text and "\t" not in text
    assert "red\\x1b[31m\\x0afake row  extract" in text and "s.to\\x09tal\\x07" in text
    assert len(text.split("\n\n")[0].splitlines()) == 3  # header, rule, one row
    report_failures([line], None)
    failed = capsys.readouterr().err.splitlines()[0]
    assert failed == "failed: red\\x1b[31m\\x0afake row (a\\x0ab.png): Could not read 'a\\x0ab.png'"


def test_format_table_aligns_columns():
    table = format_table([["receipt.total", 3, 3, "1.000"], ["sex", 10, 12, "0.833"]], ["field", "correct", "total", "exact"])
    lines = table.splitlines()
    assert lines[0] == "field          correct  total  exact"
    assert lines[1] == "-------------  -------  -----  -----"
    assert lines[2] == "receipt.total        3      3  1.000"
    assert lines[3] == "sex                 10     12  0.833"


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------


@needs_eval_set
def test_shipped_manifest_reads_and_limits():
    entries = read_manifest(EVAL_SET)
    assert {entry["task"] for entry in entries} == {"ocr", "extract"}
    assert all(entry["image"].is_file() for entry in entries)
    assert all(entry["schema"].is_file() for entry in entries if entry["task"] == "extract")
    assert [entry["id"] for entry in read_manifest(EVAL_SET, limit=2)] == [entry["id"] for entry in entries[:2]]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"image": "a.png", "task": "ocr", "expected": "x"}', "{oops"], "line 2 is not valid JSON"),
        (['{"image": "a.png", "task": "ocr"}'], "line 1 lacks expected"),
        (['{"image": "a.png", "task": "caption", "expected": "x"}'], "task must be one of ocr, extract"),
        (['{"image": "a.png", "task": "extract", "expected": {"a": 1}}'], "needs a schema"),
        (["", "  "], "has no items"),
        (['{"image": "a.png", "task": "extract", "schema": "s.json", "expected": {"total": NaN}}'], "line 1 has the number NaN"),
        (["", '{"image": "a.png", "task": "ocr", "expected": "x", "rank": -Infinity}'], "line 2 has the number -Infinity"),
        (['{"image": "a.png", "task": "extract", "schema": "s.json", "expected": {"a": [1e999]}}'], "line 1 has the number 1e999"),
        (['{"image": "a.png", "task": "ocr", "expected": "x", "id": ' + "[" * 100_000 + "]" * 100_000 + "}"],
         "line 1 is nested too deeply"),
        (['{"image": "a.png", "task": "ocr", "expected": "x", "n": ' + "9" * 5000 + "}"], "line 1 is not valid JSON"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path, lines, message):
    picture(tmp_path / "a.png")
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_an_empty_expected_object_is_refused(tmp_path):
    picture(tmp_path / "a.png")
    (tmp_path / "s.json").write_text('{"type": "object", "properties": {"total": {"type": "number"}}}')
    message = manifest_error(tmp_path, ['{"image": "a.png", "task": "ocr", "expected": "x"}',
                                        '{"id": "b", "image": "a.png", "task": "extract", "schema": "s.json", "expected": {}}'])
    assert message.startswith(f"{tmp_path / 'manifest.jsonl'}, line 2: the expected answer is {{}}, which names no field")
    assert "\n" not in message


RECEIPT = {"type": "object", "required": ["total"], "properties": {
    "total": {"type": "number"}, "subtotal": {"type": "number"},
    "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}}}},
}}


@pytest.mark.parametrize("expected, problem", [
    ({"total": 1, "subtotl": 1}, "(root): the key 'subtotl' is not a property the schema declares (did you mean 'subtotal'?)"),
    ({"total": 1, "items": [{"name": "tea", "amout": 2}]},
     "items/0: the key 'amout' is not a property the schema declares (did you mean 'amount'?)"),
    ({"total": 1, "vendor": "ACME"}, "(root): the key 'vendor' is not a property the schema declares)"),
])
def test_an_expected_key_the_schema_does_not_declare_is_refused(tmp_path, expected, problem):
    """Constrained decoding writes no property that an object's "properties" leave out (without
    "additionalProperties"), so an expected answer with one could never be matched."""
    picture(tmp_path / "a.png")
    (tmp_path / "receipt.schema.json").write_text(json.dumps(RECEIPT))
    message = manifest_error(tmp_path, [json.dumps({"image": "a.png", "task": "extract", "schema": "receipt.schema.json",
                                                    "expected": expected})])
    assert message.startswith(f"{tmp_path / 'manifest.jsonl'}, line 1: the expected answer does not follow its schema")
    assert f"({problem};" in message or f"({problem}" in message


OPEN_OR_CLOSED = [  # (schema, whether an answer may have the key "extra" in the object at "where")
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}, True),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "integer"}}, True),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": "object"}}}, True),  # "o": any object
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": "object", "properties": {"b": {"type": "integer"}}}}}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": ["object", "null"], "properties": {"b": {"type": "integer"}}}}}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"$ref": "#/$defs/b"}},
      "$defs": {"b": {"type": "object", "properties": {"b": {"type": "integer"}}}}}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"anyOf": [
        {"type": "object", "properties": {"b": {"type": "integer"}}}, {"type": "null"}]}}}, False),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "o": {"type": "array", "items": {
        "type": "object", "properties": {"b": {"type": "integer"}}}}}}, False),
]


@pytest.mark.parametrize("schema, open_", OPEN_OR_CLOSED)
def test_unknown_keys_are_refused_exactly_where_the_grammar_refuses_them(tmp_path, processor, schema, open_):
    """The rule of _check_expected is the grammar's: compile the schema and try the answer with an extra key."""
    nested = "o" in schema["properties"]
    inner = {"b": 1, "extra": 2}
    value = [inner] if schema["properties"].get("o", {}).get("type") == "array" else inner
    answer = {"a": 1, "o": value} if nested else {"a": 1, "extra": 2}
    grammar = compile_schema(processor.tokenizer, schema, 32064, [32007])
    assert xgrammar.GrammarMatcher(grammar).accept_string(json.dumps(answer, separators=(",", ":"))) is open_
    picture(tmp_path / "a.png")
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "task": "extract", "schema": "s.json",
                                                         "expected": answer}) + "\n")
    if open_:
        assert read_manifest(tmp_path)[0]["expected"] == answer
    else:
        # a branch of anyOf is named as a whole: no branch allows the object
        with pytest.raises(ManifestError, match="the key 'extra' is not a property the schema declares|not valid under any"):
            read_manifest(tmp_path)


def test_schemas_that_share_a_file_name_keep_their_own_rows(tmp_path):
    """Before, receipt.schema.json in two folders (or receipt.v2.schema.json) were all "receipt": one row."""
    picture(tmp_path / "a.png")
    paths = ["schemas/receipt.schema.json", "other/receipt.schema.json", "receipt.v2.schema.json",
             "schemas/passport.schema.json", "r.json", "r.schema.json", "./schemas/../other/receipt.schema.json"]
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text('{"type": "object", "properties": {"total": {"type": "number"}}}')
    (tmp_path / "manifest.jsonl").write_text("".join(
        json.dumps({"id": str(number), "image": "a.png", "task": "extract", "schema": path, "expected": {"total": 1}}) + "\n"
        for number, path in enumerate(paths)))
    entries = read_manifest(tmp_path)
    lines = [score_entry(entry, {"answer": {"total": number % 2}, "valid": True}) for number, entry in enumerate(entries)]
    names = ["schemas/receipt", "other/receipt", "receipt.v2", "passport", "r.json", "r.schema.json", "other/receipt"]
    assert list(summarise(lines)["extract"]["fields"]) == [f"{name}.total" for name in names[:-1]]
    assert summarise(lines)["extract"]["fields"]["other/receipt.total"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert [line["schema"] for line in lines] == names


def test_a_manifest_that_is_not_utf8_names_the_line(tmp_path):
    picture(tmp_path / "a.png")
    line = '{"image": "a.png", "task": "ocr", "expected": "%s"}\n'
    (tmp_path / "manifest.jsonl").write_bytes((line % "plain" + line % "café").encode("latin-1"))
    with pytest.raises(ManifestError, match="manifest.jsonl, line 2 is not UTF-8 text .*byte 0xe9.*Save manifest.jsonl as UTF-8"):
        read_manifest(tmp_path)


def test_only_line_breaks_end_a_manifest_line(tmp_path):
    text = "line\u2028separator\x85next\x0cpage\x1cfile"  # str.splitlines() would cut the line at each of these
    picture(tmp_path / "a.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "task": "ocr", "expected": text}, ensure_ascii=False) + "\r\n")
    assert read_manifest(tmp_path)[0]["expected"] == text


def test_a_missing_schema_names_the_manifest_line_and_field(tmp_path):
    picture(tmp_path / "a.png")
    message = manifest_error(tmp_path, ['{"image": "a.png", "task": "ocr", "expected": "x"}',
                                        '{"image": "a.png", "task": "extract", "schema": "s.json", "expected": {}}'])
    assert message.startswith(f"{tmp_path / 'manifest.jsonl'}, line 2: no schema file at '{tmp_path / 's.json'}'")
    assert 'Check the "schema" field' in message and "--schema" not in message


def test_data_naming_the_manifest_file_suggests_its_folder(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "task": "ocr", "expected": "x"}\n')
    with pytest.raises(ManifestError, match=f"--data takes the folder that holds manifest.jsonl, not a file: .* Try --data '{tmp_path}'"):
        read_manifest(tmp_path / "manifest.jsonl")


def picture(path: Path, colour: str = "white") -> Path:
    """A small PNG at ``path``: an image the manifest can name."""
    Image.new("RGB", (64, 32), colour).save(path)
    return path


def manifest_error(folder: Path, lines: list[str]) -> str:
    """The message of the ManifestError that read_manifest raises for a manifest of ``lines`` in ``folder``."""
    (folder / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ManifestError) as caught:
        read_manifest(folder)
    return str(caught.value)


@pytest.fixture
def data(tmp_path) -> Path:
    """An empty folder for an evaluation set, inside tmp_path (so that a report can be written beside it)."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def test_a_manifest_with_a_byte_order_mark_reads(tmp_path):
    picture(tmp_path / "a.png")
    line = '{"image": "a.png", "task": "ocr", "expected": "x"}\r\n'
    other = '{"id": "b", "image": "a.png", "task": "ocr", "expected": "y"}\r\n'
    (tmp_path / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf" + (line + other).encode())  # as Windows editors save UTF-8
    assert [entry["expected"] for entry in read_manifest(tmp_path)] == ["x", "y"]
    (tmp_path / "manifest.jsonl").write_bytes((line + "\ufeff" + other).encode())  # only at the start of the file
    with pytest.raises(ManifestError, match="line 2 is not valid JSON"):
        read_manifest(tmp_path)


def test_a_missing_image_names_the_manifest_line_and_field(capsys, data, tiny_model):
    picture(data / "a.png")
    message = manifest_error(data, ['{"image": "a.png", "task": "ocr", "expected": "x"}',
                                    '{"image": "scans/gone.png", "task": "ocr", "expected": "x"}'])
    assert message.startswith(f"{data / 'manifest.jsonl'}, line 2: no image file at '{data / 'scans' / 'gone.png'}'")
    assert 'Check the "image" field' in message and f"relative to the folder of manifest.jsonl, '{data}'" in message
    assert "current directory" not in message
    code, out, err = run(capsys, "eval", "--data", data)
    assert code == 1 and out == "" and err == f"error: {message}\n" and tiny_model.calls == 0  # before the model loads


@pytest.mark.parametrize("name", ["scan.pdf", "SCAN.PDF"])
def test_a_pdf_image_is_refused_before_the_model_loads(capsys, data, tiny_model, name):
    (data / name).write_bytes(b"%PDF-1.4\n")
    message = manifest_error(data, [json.dumps({"image": name, "task": "ocr", "expected": "x"})])
    assert message.startswith(f"{data / 'manifest.jsonl'}, line 1: the image '{data / name}' is a PDF")
    assert "Render the page to PNG" in message and "phi-helpers predict" in message and "re-save it" not in message
    code, out, err = run(capsys, "eval", "--data", data)
    assert code == 1 and err == f"error: {message}\n" and tiny_model.calls == 0



def test_a_schema_that_cannot_be_enforced_names_its_file_before_the_model_loads(capsys, data, tiny_model):
    picture(data / "a.png")
    (data / "odd.schema.json").write_text('{"type": "object", "properties": {"tab": {"type": "string", "pattern": "^a\\\\tb$"}}}')
    (data / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "task": "extract", "schema": "odd.schema.json",
                                                     "expected": {"tab": "a\tb"}}) + "\n")
    code, out, err = run(capsys, "eval", "--data", data)
    assert code == 1 and out == "" and tiny_model.calls == 0
    assert err.startswith(f"error: The schema file '{data / 'odd.schema.json'}': ") and "not valid JSON" in err
    assert run(capsys, "eval", "--data", data, "--no-constrain", "--max-new-tokens", "4")[0] == 0 and tiny_model.calls == 1


def test_cut_off_extractions_suggest_raising_max_new_tokens(capsys, monkeypatch, tmp_path, cli_model_and_processor):
    (tmp_path / "total.schema.json").write_text('{"type": "object", "properties": {"total": {"type": "number"}}}')
    lines = [{"image": "cut.png", "task": "extract", "schema": "total.schema.json", "expected": {"total": 4.5}},
             {"image": "whole.png", "task": "extract", "schema": "total.schema.json", "expected": {"total": 4.5}},
             {"image": "text.png", "task": "ocr", "expected": "hello"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = {picture(tmp_path / "cut.png", "white").name: '{"total": 4', picture(tmp_path / "whole.png", "black").name:
               '{"total": 4.5}', picture(tmp_path / "text.png", "red").name: "hello"}
    by_pixels = {load_image(tmp_path / name).tobytes(): text for name, text in answers.items()}

    def answer(model, processor, prompts, images, max_new_tokens=512, schema=None):
        return [Generation(by_pixels[group[0].tobytes()], 10, max_new_tokens, 0.1, 0.2, len(prompts)) for group in images]

    monkeypatch.setattr(tasks, "generate_batch", answer)
    report = evaluate(*cli_model_and_processor, read_manifest(tmp_path), max_new_tokens=4)
    assert [line.get("valid") for line in report["items"]] == [False, True, None]
    capsys.readouterr()
    report_cut_off(report["items"], 4)
    assert capsys.readouterr().err == ('warning: 1 of 2 extraction answers were cut off by --max-new-tokens (4) and scored '
                                       'as wrong ("invalid JSON" above); raise --max-new-tokens to score them whole\n')
    report_cut_off(report["items"][1:], 4)  # nothing cut off: nothing said
    assert capsys.readouterr().err == ""
    by_pixels[load_image(tmp_path / "whole.png").tobytes()] = '{"total": "4.5"}'  # complete, but not the schema's
    unconstrained = evaluate(*cli_model_and_processor, read_manifest(tmp_path), max_new_tokens=4, constrain=False)
    assert [line.get("valid") for line in unconstrained["items"]] == [False, False, None]
    report_cut_off(unconstrained["items"], 4)  # the parser's errors say where the text ran out; a wrong type is no cut-off
    assert capsys.readouterr().err.startswith("warning: 1 of 2 extraction answers were cut off")


# ----------------------------------------------------------------------------------------------
# The eval command
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def oracle(monkeypatch):
    """generate_batch answers every eval image with its expected answer (recognised by its pixels)."""
    expected = {}
    for entry in read_manifest(EVAL_SET):
        answer = entry["expected"] if entry["task"] == "ocr" else json.dumps(entry["expected"])
        expected[load_image(entry["image"]).tobytes()] = answer

    def answer(model, processor, prompts, images, max_new_tokens=512, schema=None):
        return [Generation(expected[group[0].tobytes()], 100, 20, 0.1, 0.5, len(prompts)) for group in images]

    monkeypatch.setattr(tasks, "generate_batch", answer)


@needs_eval_set
def test_perfect_answers_score_cer_0_and_exact_match_1(capsys, tmp_path, oracle):
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "eval", "--data", EVAL_SET, "--output", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    entries = read_manifest(EVAL_SET)
    assert report["items_evaluated"] == len(entries)
    assert report["summary"]["ocr"]["cer"] == 0.0 and report["summary"]["ocr"]["mean_item_cer"] == 0.0
    extract = report["summary"]["extract"]
    assert extract["exact_match"] == 1.0 and extract["valid_answers"] == extract["items"]
    assert all(field["accuracy"] == 1.0 for field in extract["fields"].values())
    assert "receipt.total" in extract["fields"] and "passport.surname" in extract["fields"]
    assert [item["id"] for item in report["items"]] == [entry["id"] for entry in entries]
    # the printed table: one row per item, one per field, the summary
    assert "line_01      ocr      CER 0.000" in out
    assert "overall" in out and "character error rate 0.000" in out and "exact match 1.000" in out


@needs_eval_set
def test_wrong_answers_lower_the_scores(capsys, monkeypatch, tmp_path):
    def answer(model, processor, prompts, images, max_new_tokens=512, schema=None):
        text = '{"merchant": "Northwind Hardware", "date": "2024-11-02", "currency": "USD", "total": 1}'
        return [Generation(text if "JSON" in prompts[0] else "The quick brown fox", 1, 1, 0.1, 0.1, 1) for _ in prompts]

    monkeypatch.setattr(tasks, "generate_batch", answer)
    report_path = tmp_path / "report.json"
    assert run(capsys, "eval", "--data", EVAL_SET, "--limit", "4", "--output", report_path)[0] == 0
    report = json.loads(report_path.read_text())
    assert report["items"][0]["cer"] == pytest.approx(character_error_rate("The quick brown fox", report["items"][0]["expected"]), abs=1e-4)
    receipt = report["items"][3]
    assert receipt["valid"] is True  # schema-valid, but only 3 of 7 fields right
    assert receipt["fields"] == {"merchant": True, "date": True, "currency": True, "items": False, "subtotal": False, "tax": False, "total": False}
    assert report["summary"]["extract"]["exact_match"] == pytest.approx(3 / 7, abs=1e-4)


@needs_eval_set
def test_eval_runs_end_to_end_on_the_tiny_model(capsys, tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "eval", "--data", EVAL_SET, "--limit", "4", "--max-new-tokens", "4", "--output", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert [item["task"] for item in report["items"]] == ["ocr", "ocr", "ocr", "extract"]
    assert report["summary"]["ocr"]["cer"] > 0  # random tokens are not the text
    receipt = report["items"][3]  # constrained, but 4 tokens cannot close the receipt's object
    assert report["constrained"] is True and "extraction: constrained decoding" in out
    assert receipt["valid"] is False and len(receipt["raw"]) == 1 and not any(receipt["fields"].values())
    report_cut_off(report["items"], 4)  # what the report holds for an answer the real model ran out of tokens on
    assert capsys.readouterr().err.startswith("warning: 1 of 1 extraction answers were cut off by --max-new-tokens (4)")
    assert report["model"] and report["device"] == "cpu"
    assert "receipt.total" in out and "Traceback" not in err


@needs_eval_set
def test_eval_scores_the_unconstrained_path_too(capsys, tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "eval", "--data", EVAL_SET, "--limit", "4", "--max-new-tokens", "4", "--no-constrain",
                         "--output", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    receipt = report["items"][3]  # random words: invalid, retried once
    assert report["constrained"] is False and "prompt and one retry (--no-constrain)" in out
    assert receipt["valid"] is False and len(receipt["raw"]) == 2


def test_eval_bad_data_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run(capsys, "eval", "--data", tmp_path / "nowhere")
    assert code == 1 and out == "" and err.strip().splitlines()[-1].startswith("error: No folder at")
    picture(tmp_path / "a.png")
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "task": "extract", "schema": "s.json", "expected": {}}\n')
    code, _, err = run(capsys, "eval", "--data", tmp_path)
    assert code == 1 and "line 1: no schema file" in err.strip().splitlines()[-1] and "--schema" not in err
    code, _, err = run(capsys, "eval", "--data", tmp_path / "manifest.jsonl")
    assert code == 1 and f"Try --data '{tmp_path}'" in err.strip().splitlines()[-1]
    code, _, err = run(capsys, "eval", "--data", tmp_path, "--limit", "0")
    assert code == 2 and "expected a number >= 1" in err


def test_eval_scores_an_unreadable_image_as_wrong_and_exits_1(capsys, monkeypatch, tmp_path, data):
    picture(data / "blank.png")
    (data / "broken.png").write_bytes(b"not an image")
    (data / "manifest.jsonl").write_text('{"id": "broken", "image": "broken.png", "task": "ocr", "expected": "hello"}\n'
                                         '{"id": "blank", "image": "blank.png", "task": "ocr", "expected": "hello"}\n')
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "eval", "--data", data, "--output", report_path, "--max-new-tokens", "2")
    assert code == 1
    item = json.loads(report_path.read_text())["items"][0]
    assert item["cer"] == 1.0 and "Could not read" in item["error"] and "(error)" in out
    assert f"failed: broken (broken.png): Could not read '{data / 'broken.png'}'" in err  # the image as the manifest names it
    assert err.strip().splitlines()[-1] == (f'error: 1 of 2 items failed and was scored as wrong (their items in {report_path} '
                                            'have an "error"); fix them and run the same command again')
    code, _, err = run(capsys, "eval", "--data", data, "--max-new-tokens", "2")
    assert code == 1 and "error: 1 of 2 items failed and was scored as wrong (the reasons are above)" in err


def test_eval_report_is_strict_json_when_the_answer_is_not(capsys, monkeypatch, tmp_path):
    Image.new("RGB", (64, 32), "white").save(tmp_path / "receipt.png")
    (tmp_path / "total.schema.json").write_text('{"type": "object", "properties": {"total": {"type": "number"}}}')
    (tmp_path / "manifest.jsonl").write_text(
        '{"image": "receipt.png", "task": "extract", "schema": "total.schema.json", "expected": {"total": 4.5}}\n'
    )
    monkeypatch.setattr(tasks, "generate_batch", lambda *args, **kwargs: [Generation('{"total": NaN}', 1, 1, 0.1, 0.1, 1)])
    report_path = tmp_path / "report.json"
    code, _, err = run(capsys, "eval", "--data", tmp_path, "--no-constrain", "--output", report_path)
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    item = json.loads(report_path.read_text(), parse_constant=refuse)["items"][0]
    assert item["answer"] == {"total": "NaN"} and item["fields"] == {"total": False} and item["valid"] is False  # NaN: no JSON number


def test_the_report_never_replaces_the_set_or_results(capsys, monkeypatch, tmp_path):
    def load():
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", lambda *args, **kwargs: load())
    Image.new("RGB", (64, 32), "white").save(tmp_path / "blank.png")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "blank", "image": "blank.png", "task": "ocr", "expected": "hello"}\n')
    results = tmp_path / "results.json"  # predict's JSON lines under a .json name
    results.write_text('{"source": "blank.png", "task": "ocr", "answer": "hello"}\n')
    notes = tmp_path / "README.md"
    notes.write_text("How this set was made.\n")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-results.json"
    elsewhere.write_text(results.read_text())
    answer = tmp_path.parent / f"{tmp_path.name}-answer.json"  # predict --format json: one record, indented
    answer.write_text(json.dumps({"source": "blank.png", "task": "ocr", "answer": "hello", "request": {}}, indent=2))
    for output, message in ((manifest, "is a file of the evaluation set"), (tmp_path / "blank.png", "is a file of the"),
                            (notes, "is a file of the evaluation set"), (results, "is a file of the evaluation set"),
                            (elsewhere, "holds results of phi-helpers predict"),
                            (answer, "holds results of phi-helpers predict")):
        before = output.read_bytes()
        code, _, err = run(capsys, "eval", "--data", tmp_path, "--output", output)
        assert code == 1 and message in err and output.read_bytes() == before


def test_reports_from_two_copies_of_a_set_are_equal(capsys, monkeypatch, tmp_path):
    """The report names each image as the manifest does (relative to --data), not by an absolute path."""
    first = tmp_path / "checkout-1"
    (first / "data" / "scans").mkdir(parents=True)
    picture(first / "data" / "scans" / "a.png")
    (first / "data" / "scans" / "broken.png").write_bytes(b"not an image")
    (first / "data" / "manifest.jsonl").write_text('{"id": "a", "image": "scans/a.png", "task": "ocr", "expected": "hi"}\n'
                                                   '{"id": "b", "image": "scans/broken.png", "task": "ocr", "expected": "hi"}\n')
    second = tmp_path / "checkout-2"
    shutil.copytree(first, second)
    monkeypatch.setattr(tasks, "generate_batch", lambda *args, **kwargs: [Generation("hi", 1, 1, 0.1, 0.1, 1)])
    reports = []
    for checkout in (first, second):
        monkeypatch.chdir(checkout)
        assert run(capsys, "eval", "--data", "data", "--output", "report.json")[0] == 1  # broken.png failed
        report = json.loads((checkout / "report.json").read_text())
        assert [item["image"] for item in report["items"]] == ["scans/a.png", "scans/broken.png"]
        reports.append({key: value for key, value in report.items() if key != "total_seconds"})
    assert reports[0] == reports[1]


def test_an_output_folder_suggests_a_report_file(capsys, tmp_path, tiny_model):
    picture(tmp_path / "a.png")
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "task": "ocr", "expected": "x"}\n')
    code, out, err = run(capsys, "eval", "--data", tmp_path, "--output", tmp_path)
    assert code == 1 and tiny_model.calls == 0
    assert err == f"error: --output '{tmp_path}' is a folder; give a file name inside it, e.g. '{tmp_path / 'report.json'}'.\n"


def test_every_bad_manifest_line_is_named_at_once(tmp_path):
    Image.new("RGB", (64, 32), "white").save(tmp_path / "ok.png")
    (tmp_path / "manifest.jsonl").write_text(
        '{"image": "gone.png", "task": "ocr", "expected": "a"}\n'
        '{"image": "ok.png", "task": "ocr", "expected": "b"}\n'
        '{"image": "ok.png", "task": "ocr"\n'
    )
    with pytest.raises(ManifestError) as error:
        read_manifest(tmp_path)
    message = str(error.value)
    assert message.startswith("2 items of") and "line 1: no image file" in message and "line 3 is not valid JSON" in message
