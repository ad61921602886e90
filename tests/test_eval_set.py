"""The synthetic evaluation set in data/eval/ (written by scripts/make_eval_set.py)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from phi_helpers.cli.evaluate import evaluate, read_manifest
from phi_helpers.tutorial.mrz import check_fields, parse_td3

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "data" / "eval"


def load_script(name: str):
    """Import scripts/<name>.py by path (scripts/ is not a package)."""
    if f"_scripts_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[f"_scripts_{name}"]


def manifest() -> list[dict]:
    lines = (EVAL / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def validator(schema_path: str) -> Draft202012Validator:
    schema = json.loads((EVAL / schema_path).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return Draft202012Validator(schema)


def test_manifest_has_three_items_of_each_kind():
    entries = manifest()
    kinds = [e["image"].split("/")[0] for e in entries]
    assert sorted(kinds) == sorted(["lines"] * 3 + ["receipts"] * 3 + ["passports"] * 3)
    assert len({e["id"] for e in entries}) == len(entries)
    assert len({e["image"] for e in entries}) == len(entries)


@pytest.mark.parametrize("entry", manifest(), ids=lambda e: e["id"])
def test_manifest_entry_image_exists_opens_and_answer_matches_task(entry):
    path = EVAL / entry["image"]
    assert path.stat().st_size < 60 * 1024
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 32
        img.convert("RGB").load()
    if entry["task"] == "ocr":
        assert set(entry) == {"id", "image", "task", "expected"}
        assert isinstance(entry["expected"], str) and entry["expected"].strip() == entry["expected"] != ""
    else:
        assert entry["task"] == "extract"
        errors = list(validator(entry["schema"]).iter_errors(entry["expected"]))
        assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("entry", [e for e in manifest() if e.get("schema") == "schemas/receipt.schema.json"],
                         ids=lambda e: e["id"])
def test_receipt_answers_add_up(entry):
    answer = entry["expected"]
    cents = lambda x: Decimal(str(x))  # noqa: E731  (exact decimal of the JSON number)
    assert sum(cents(i["amount"]) for i in answer["items"]) == cents(answer["subtotal"])
    for item in answer["items"]:
        assert cents(item["unit_price"]) * item["quantity"] == cents(item["amount"])
    assert cents(answer["subtotal"]) + cents(answer["tax"]) == cents(answer["total"])


def test_passport_answers_agree_with_their_mrz():
    script = load_script("make_eval_set")
    by_image = {e["image"]: e for e in manifest()}
    for i, person in enumerate(script.PASSPORTS, start=1):
        mrz = parse_td3(person.mrz_lines())
        assert mrz["valid"], (person, mrz["checks"])
        expected = by_image[f"passports/passport_{i:02d}.png"]["expected"]
        report = check_fields(expected, mrz)
        assert len(report) == 7 and all(r["match"] for r in report.values()), report


@pytest.mark.parametrize(
    "schema, field, bad",
    [
        ("receipt", "date", "07/06/2024"),
        ("receipt", "currency", "$"),
        ("receipt", "total", "27.17"),
        ("receipt", "total", None),        # None: the field is removed
        ("passport", "sex", "female"),
        ("passport", "date_of_birth", "30 JAN 1995"),
        ("passport", "passport_number", "B7T0W2Y61X"),
        ("passport", "surname", None),
        ("receipt", "merchant", "N" * 61),
        ("receipt", "total", 100000.01),
        ("passport", "given_names", "A" * 61),
    ],
)
def test_schemas_reject_wrong_answers(schema, field, bad):
    entry = next(e for e in manifest() if e.get("schema") == f"schemas/{schema}.schema.json")
    answer = copy.deepcopy(entry["expected"])
    if bad is None:
        del answer[field]
    else:
        answer[field] = bad
    assert not validator(entry["schema"]).is_valid(answer)


UNBOUNDED_REPEAT = re.compile(r"(?<!\\)[*+]|\{\d*,\}")  # x*, x+, x{2,}: a pattern that lets a string grow


def open_ends(schema, place: str = "(root)") -> list[str]:
    """Places in ``schema`` where constrained decoding could write on until max_new_tokens: a string
    without maxLength, enum, const or an anchored pattern without open repeats; a number or integer
    without both a lower and an upper bound; an array without maxItems."""
    found = []
    if not any(key in schema for key in ("enum", "const")):
        kind = schema.get("type")
        pattern = schema.get("pattern", "")
        if kind == "string" and "maxLength" not in schema and not (
                pattern.startswith("^") and pattern.endswith("$") and not UNBOUNDED_REPEAT.search(pattern)):
            found.append(f"{place}: a string needs maxLength (or an enum, or an anchored pattern of bounded length)")
        if kind in ("number", "integer") and not (
                {"minimum", "exclusiveMinimum"} & schema.keys() and {"maximum", "exclusiveMaximum"} & schema.keys()):
            found.append(f"{place}: a number needs both a minimum and a maximum")
        if kind == "array" and "maxItems" not in schema:
            found.append(f"{place}: an array needs maxItems")
    for name, sub in schema.get("properties", {}).items():
        found += open_ends(sub, f"{place}/properties/{name}")
    if isinstance(schema.get("items"), dict):
        found += open_ends(schema["items"], f"{place}/items")
    for keyword in ("anyOf", "prefixItems"):
        for i, sub in enumerate(schema.get(keyword, [])):
            found += open_ends(sub, f"{place}/{keyword}/{i}")
    for name, sub in schema.get("$defs", {}).items():
        found += open_ends(sub, f"{place}/$defs/{name}")
    return found


@pytest.mark.parametrize("schema, places", [
    ({"type": "object", "properties": {"name": {"type": "string", "minLength": 1}}}, ["(root)/properties/name"]),
    ({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]+$"}}}, ["(root)/properties/id"]),
    ({"type": "object", "properties": {"total": {"type": "number", "minimum": 0}}}, ["(root)/properties/total"]),
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}, ["(root)/properties/n"]),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}}}},
     ["(root)/properties/tags"]),
    ({"type": "object", "properties": {"rows": {"type": "array", "maxItems": 3, "items": {"type": "string"}}}},
     ["(root)/properties/rows/items"]),
    ({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{1,9}$"},
                                       "sex": {"enum": ["M", "F"]},
                                       "total": {"type": "number", "minimum": 0, "maximum": 10}}}, []),
])
def test_open_ends_finds_every_unbounded_value(schema, places):
    assert [found.split(":")[0] for found in open_ends(schema)] == places


@pytest.mark.parametrize("name", sorted(path.name for path in (EVAL / "schemas").glob("*.json")))
def test_shipped_schemas_bound_every_string_number_and_array(name):
    """As docs/structured-output.md asks ("What it does not fix"); before, the merchant, item names,
    surname and given names had no maxLength and every amount only "minimum": 0 (a random model wrote
    the merchant until max_new_tokens, and a tax of 263467777777777777)."""
    assert open_ends(json.loads((EVAL / "schemas" / name).read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize("item", ["receipt_03", "passport_03"])
def test_a_constrained_extraction_with_a_shipped_schema_ends_within_200_tokens(cli_model_and_processor, item):
    """The tiny random model (seeded: the same weights every run) on one eval item of each schema, as
    ``phi-helpers eval`` runs it. Random tokens are the worst case of an open value: before the bounds,
    5 of the 6 extraction answers were cut off at 200 tokens (these two by the merchant and the surname);
    bounded, all six end valid (``phi-helpers eval`` on the tiny model: receipts in about 70 tokens,
    passports in 112 to 120). No bound guarantees it for every answer (a receipt may hold 50 items):
    this checks the shipped set on this model, not a law."""
    entry = next(entry for entry in read_manifest(EVAL) if entry["id"] == item)
    answer = evaluate(*cli_model_and_processor, [entry], max_new_tokens=200)["items"][0]
    assert answer["valid"] is True, (answer["errors"], answer["raw"])


def test_committed_manifest_is_what_the_script_writes():
    script = load_script("make_eval_set")
    assert (EVAL / "manifest.jsonl").read_text(encoding="utf-8") == script.manifest_text(), (
        "data/eval is stale: run python scripts/make_eval_set.py"
    )
    for name, schema in script.SCHEMAS.items():
        assert json.loads((EVAL / "schemas" / name).read_text(encoding="utf-8")) == schema
    assert (EVAL / "README.md").read_text(encoding="utf-8") == script.README


@pytest.mark.parametrize("image", ["receipts/receipt_01.png", "lines/line_03.png"])
def test_eval_images_are_rendered_deterministically(image):
    script = load_script("make_eval_set")
    first, second = script.render(image), script.render(image)
    assert first == second
    committed = (EVAL / image).read_bytes()
    if committed != first:  # e.g. another zlib: then at least every pixel must agree
        with Image.open(EVAL / image) as old, Image.open(io.BytesIO(first)) as new:
            assert old.convert("RGB").tobytes() == new.convert("RGB").tobytes(), (
                f"data/eval/{image} differs from a fresh render: run python scripts/make_eval_set.py"
            )


def test_render_rejects_unknown_item():
    with pytest.raises(KeyError, match="receipts/receipt_01.png"):
        load_script("make_eval_set").render("receipts/receipt_99.png")
