"""Write the small synthetic, labelled evaluation set in data/eval/.

    python scripts/make_eval_set.py

Nine items, each an image drawn by scripts/_draw.py and its expected answer:
3 lines of text (task "ocr"), 3 receipts and 3 SPECIMEN passports (task "extract", with a JSON
Schema). Used by ``python -m phi_helpers eval --data data/eval``. Every person, shop and number is
fictitious; the images are drawn from shapes and Pillow's bundled font (CC0 1.0). The output is the
same bytes on every run. The format is described in data/eval/README.md (written by this script).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _draw  # noqa: E402
from _draw import Person, Receipt  # noqa: E402

EVAL_DIR = _draw.ROOT / "data" / "eval"
PALETTE_COLORS = 128  # palette PNGs keep every image well under 60 KB

# (text, size, ink, background)
TEXT_LINES = (
    ("The quick brown fox jumps over 13 lazy dogs.", 30, (28, 28, 32), (255, 255, 255)),
    ("Invoice INV-2024-0457 is due on 30 June 2025.", 28, (40, 40, 40), (252, 246, 222)),
    ("Meet at Platform 9, coach B, seat 42 at 7:15 pm.", 26, (255, 255, 255), (30, 60, 110)),
)

RECEIPTS = (
    Receipt(
        merchant="Northwind Hardware",
        address=("220 Quarry Road", "Lake Verity, Utopia"),
        date="2024-11-02",
        printed_date="2024-11-02",
        time="16:05",
        items=(("Claw hammer", 1, "14.99"), ("Wood screws", 2, "4.25"), ("Paint brush", 3, "3.10"),
               ("Masking tape", 2, "2.45")),
        tax_rate="0.0725",
        currency="USD",
    ),
    Receipt(
        merchant="Cafe Lumen",
        address=("3 Rue des Lanternes", "New Harbour, Utopia"),
        date="2024-06-07",
        printed_date="7 Jun 2024",
        time="08:17",
        items=(("Espresso", 2, "2.10"), ("Oat latte", 1, "3.60"), ("Almond croissant", 2, "2.90"),
               ("Still water", 1, "1.50"), ("Fruit salad", 1, "4.20"), ("Granola bar", 3, "1.80")),
        tax_rate="0.10",
        currency="EUR",
        payment="Cash",
    ),
    Receipt(
        merchant="Pemberton Books",
        address=("88 Mill Street", "Old Meridian, Utopia"),
        date="2024-09-21",
        printed_date="Sat 21 Sep 2024",
        time="13:48",
        items=(("Paperback novel", 2, "8.99"), ("A5 notebook", 1, "6.50"), ("Bookmark", 3, "1.25"),
               ("Gift wrap", 1, "2.00")),
        tax_rate="0.20",
        currency="GBP",
    ),
)

PASSPORTS = (
    Person(surname="Okafor", given_names="Daniel James", document_number="K1M3P8Q20",
           birth_date="1979-11-02", sex="M", expiry_date="2029-05-16", issue_date="2019-05-17",
           place_of_birth="Lake Verity"),
    Person(surname="Moreau-Santos", given_names="Clara", document_number="B7T0W2Y61",
           birth_date="1995-01-30", sex="F", expiry_date="2031-09-03", issue_date="2021-09-04",
           place_of_birth="New Harbour", optional_data="UT9031847"),
    Person(surname="Haddad", given_names="Samir Ilyas", document_number="Z9C4D6F13",
           birth_date="1962-07-08", sex="M", expiry_date="2027-12-30", issue_date="2017-12-31",
           place_of_birth="Old Meridian"),
)

# Every string and number has both bounds, as docs/structured-output.md ("What it does not fix") asks:
# constrained decoding stops an open one only at max_new_tokens (a random model writes to the limit).
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "format": "date"}
_MONEY = {"type": "number", "minimum": 0, "maximum": 100000}

SCHEMAS = {
    "receipt.schema.json": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Receipt",
        "description": "Fields of a shop receipt. Amounts are numbers in the receipt's currency.",
        "type": "object",
        "required": ["merchant", "date", "currency", "total"],
        "properties": {
            "merchant": {"type": "string", "minLength": 1, "maxLength": 60, "description": "Shop name as printed."},
            "date": {**_DATE, "description": "Purchase date, YYYY-MM-DD."},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code, e.g. USD."},
            "items": {
                "type": "array",
                "maxItems": 50,
                "items": {
                    "type": "object",
                    "required": ["name", "amount"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 60},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "unit_price": _MONEY,
                        "amount": {**_MONEY, "description": "quantity x unit_price"},
                    },
                },
            },
            "subtotal": _MONEY,
            "tax": _MONEY,
            "total": {**_MONEY, "description": "Amount paid: subtotal + tax."},
        },
    },
    "passport.schema.json": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Passport data page",
        "description": "Fields of a passport data page, as printed in the visual zone and the MRZ.",
        "type": "object",
        "required": ["surname", "given_names", "passport_number", "nationality", "date_of_birth", "sex",
                     "expiry_date"],
        "properties": {
            "surname": {"type": "string", "minLength": 1, "maxLength": 40},
            "given_names": {"type": "string", "maxLength": 60},
            "passport_number": {"type": "string", "pattern": "^[A-Z0-9]{1,9}$"},
            "nationality": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ICAO 3-letter code."},
            "date_of_birth": {**_DATE, "description": "YYYY-MM-DD."},
            "sex": {"enum": ["M", "F", "X"]},
            "expiry_date": {**_DATE, "description": "YYYY-MM-DD."},
        },
    },
}


def items() -> list[tuple[dict, Callable[[], Image.Image]]]:
    """(manifest entry, function drawing its image) for every item, in manifest order."""
    out: list[tuple[dict, Callable[[], Image.Image]]] = []
    for i, (line, size, ink, background) in enumerate(TEXT_LINES, start=1):
        entry = {"id": f"line_{i:02d}", "image": f"lines/line_{i:02d}.png", "task": "ocr", "expected": line}
        out.append((entry, partial(_draw.draw_text_line, line, size=size, fill=ink, background=background)))
    for i, receipt in enumerate(RECEIPTS, start=1):
        entry = {"id": f"receipt_{i:02d}", "image": f"receipts/receipt_{i:02d}.png", "task": "extract",
                 "schema": "schemas/receipt.schema.json", "expected": receipt.expected()}
        out.append((entry, partial(_draw.draw_receipt, receipt)))
    for i, person in enumerate(PASSPORTS, start=1):
        entry = {"id": f"passport_{i:02d}", "image": f"passports/passport_{i:02d}.png", "task": "extract",
                 "schema": "schemas/passport.schema.json", "expected": person.expected()}
        out.append((entry, partial(_draw.draw_passport, person)))
    return out


def manifest_text() -> str:
    """Contents of manifest.jsonl."""
    return "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry, _ in items())


def render(image: str) -> bytes:
    """PNG bytes of one item, by its manifest path (e.g. ``"receipts/receipt_01.png"``)."""
    for entry, draw in items():
        if entry["image"] == image:
            return _draw.png_bytes(draw(), PALETTE_COLORS)
    raise KeyError(f"No eval item {image!r}; items are: {[e['image'] for e, _ in items()]}.")


README = """# Evaluation set

A tiny synthetic, labelled set for `python -m phi_helpers eval --data data/eval`. Generated by
`python scripts/make_eval_set.py` (do not edit by hand: change the script and re-run; the output is
identical on every run). Everything is drawn from shapes and Pillow's bundled font; every person,
shop and number is fictitious; the passports are SPECIMEN pages of Utopia (code UTO), the fictitious
state of ICAO Doc 9303. Public domain (CC0 1.0).

## Layout

```
manifest.jsonl                one JSON object per line, one line per item
lines/line_NN.png             a line of text                      task "ocr"
receipts/receipt_NN.png       a shop receipt                      task "extract"
passports/passport_NN.png     a SPECIMEN passport data page       task "extract"
schemas/receipt.schema.json   JSON Schema (draft 2020-12) of a receipt answer
schemas/passport.schema.json  JSON Schema (draft 2020-12) of a passport answer
```

## manifest.jsonl

Paths are relative to this folder.

- `id`: a short name for reports, e.g. `receipt_01`.
- `image`: the image file (one picture: a PDF or a multi-page TIFF is refused).
- `task`: `"ocr"` (transcribe the text) or `"extract"` (answer with a JSON object).
- `expected`: for `ocr` the exact text; for `extract` the expected JSON object: at least one field,
  valid against `schema`, and no key that an object's `properties` leave out unless its
  `additionalProperties` allows it (constrained decoding never writes such a key).
- `schema` (`extract` only): the JSON Schema the answer should follow.

A line holds only these fields, each once (another field, or a key written twice in one object, is
refused with the line number), in a file saved as UTF-8.

```
{"id": "line_01", "image": "lines/line_01.png", "task": "ocr", "expected": "The quick brown fox ..."}
{"id": "receipt_01", "image": "receipts/receipt_01.png", "task": "extract", "schema": "schemas/receipt.schema.json", "expected": {"merchant": "...", "date": "2024-11-02", "currency": "USD", "items": [...], "subtotal": 37.69, "tax": 2.73, "total": 40.42}}
```

Conventions of the expected answers:

- Dates are ISO `YYYY-MM-DD`, whatever way the image prints them (`7 Jun 2024`, `14 MAR 1988`...).
- Receipts: `merchant` as printed; `currency` is the ISO 4217 code printed before the total; amounts
  are numbers (`subtotal` = sum of item `amount`s, `tax` rounded half up to cents, `total` =
  `subtotal` + `tax`). Only `merchant`, `date`, `currency` and `total` are required by the schema.
- Passports: names in capitals as printed (a hyphenated surname keeps its hyphen; the MRZ writes it
  with `<`), `passport_number` and `nationality` as in the MRZ, `sex` `M`/`F`/`X`. The MRZ of every
  passport is valid (`phi_helpers.tutorial.mrz.parse_td3`), and `phi_helpers.tutorial.mrz.check_fields` compares an
  answer with it.
- Schemas: every string has a `maxLength` (40 to 60) or a pattern or enum of bounded length, every
  number a `minimum` and a `maximum` (amounts 0 to 100000, quantities 1 to 1000), and the items at
  most 50: under constrained decoding an open value can run on until `--max-new-tokens`.
"""


def main(out_dir: Path = EVAL_DIR) -> None:
    for entry, draw in items():
        img = draw()
        size = _draw.save_png(img, out_dir / entry["image"], PALETTE_COLORS)
        print(f"{out_dir / entry['image']}  {img.width}x{img.height}  {size / 1024:.0f} KB")
    for name, schema in SCHEMAS.items():
        (out_dir / "schemas").mkdir(parents=True, exist_ok=True)
        (out_dir / "schemas" / name).write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    (out_dir / "manifest.jsonl").write_text(manifest_text(), encoding="utf-8")
    (out_dir / "README.md").write_text(README, encoding="utf-8")
    print(out_dir / "manifest.jsonl")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no other arguments
    main()
