"""The synthetic evaluation set in data/eval/ (written by scripts/make_eval_set.py)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

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


def test_committed_manifest_is_what_the_script_writes():
    script = load_script("make_eval_set")
    assert (EVAL / "manifest.jsonl").read_text(encoding="utf-8") == script.manifest_text(), (
        "data/eval is stale: run python scripts/make_eval_set.py"
    )
    for name, schema in script.SCHEMAS.items():
        assert json.loads((EVAL / "schemas" / name).read_text(encoding="utf-8")) == schema


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
