"""Drawing helpers shared by scripts/make_images.py and scripts/make_eval_set.py.

Everything is drawn with Pillow alone and with the font Pillow ships (``ImageFont.load_default(size=N)``,
Pillow >= 10.1 built with FreeType, as in the PyPI wheels), so the images do not depend on the fonts
of the machine and the same code gives the same pixels everywhere. PNGs are written without any
metadata (no timestamp), so a re-run gives identical bytes.

The bundled font covers printable ASCII only: :func:`text` refuses anything else instead of drawing
empty boxes.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/...`: make the phi_helpers package importable
    sys.path.insert(0, str(ROOT))

from phi_helpers.tutorial.mrz import make_td3  # noqa: E402

INK = (28, 28, 32)
GREY = (110, 110, 118)
WHITE = (255, 255, 255)
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


# --------------------------------------------------------------------------- text


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` pixels."""
    f = ImageFont.load_default(size=size)
    if not isinstance(f, ImageFont.FreeTypeFont):
        raise RuntimeError("These images need Pillow >= 10.1 built with FreeType (pip install -U pillow).")
    return f


def _ascii_only(s: str) -> str:
    if not all(" " <= c <= "~" for c in s):
        raise ValueError(f"{s!r}: the bundled font draws printable ASCII only; spell it without accents/symbols.")
    return s


def text(draw: ImageDraw.ImageDraw, xy, s: str, size: int, fill=INK, *, anchor: str = "la",
         bold: bool = False) -> None:
    """Draw ``s``; ``bold`` thickens the strokes (the bundled font has a single weight)."""
    draw.text(xy, _ascii_only(s), font=font(size), fill=fill, anchor=anchor,
              stroke_width=1 if bold else 0, stroke_fill=fill)


def width(s: str, size: int, bold: bool = False) -> float:
    return font(size).getlength(s) + (2 if bold else 0)


def wrap(s: str, size: int, max_width: float, bold: bool = False) -> list[str]:
    """Greedy word wrap of ``s`` into lines no wider than ``max_width``."""
    lines: list[str] = []
    for word in s.split():
        if lines and width(lines[-1] + " " + word, size, bold) <= max_width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def mono(draw: ImageDraw.ImageDraw, xy, s: str, size: int, cell: float, fill=INK, bold: bool = False) -> None:
    """Monospaced look with a proportional font: each character centred in a ``cell``-wide box."""
    x0, y = xy
    for i, c in enumerate(s):
        text(draw, (x0 + i * cell + cell / 2, y), c, size, fill, anchor="ma", bold=bold)


def iso_to_printed(iso: str) -> str:
    """'1988-03-14' -> '14 MAR 1988' (month names by hand: strftime would follow the locale)."""
    year, month, day = iso.split("-")
    return f"{day} {MONTHS[int(month) - 1]} {year}"


def iso_to_yymmdd(iso: str) -> str:
    year, month, day = iso.split("-")
    return year[2:] + month + day


# --------------------------------------------------------------------------- files


def png_bytes(img: Image.Image, colors: int | None = None) -> bytes:
    """PNG encoding with no metadata chunks: the same image always gives the same bytes.

    ``colors`` reduces the image to a palette of that many colours (median cut, no dithering: both
    deterministic), which makes flat drawings with anti-aliased text about three times smaller.
    """
    if colors is not None:
        img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_png(img: Image.Image, path: Path, colors: int | None = None) -> int:
    """Write ``img`` to ``path`` (folders created); returns the size in bytes."""
    data = png_bytes(img, colors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


# --------------------------------------------------------------------------- a line of text


def draw_text_line(s: str, size: int = 30, pad: int = 24, fill=INK, background=WHITE) -> Image.Image:
    """One line of text on a plain background, sized to fit (an OCR test item)."""
    w = int(width(s, size)) + 2 * pad
    img = Image.new("RGB", (w, size + 2 * pad), background)
    text(ImageDraw.Draw(img), (pad, pad + size // 2), s, size, fill, anchor="lm")
    return img


# --------------------------------------------------------------------------- receipts

CENT = Decimal("0.01")


@dataclass(frozen=True)
class Receipt:
    """A shop receipt. Prices are strings ("2.25") so the sums are exact; tax is rounded half up."""

    merchant: str
    address: tuple[str, ...]
    date: str                                  # ISO YYYY-MM-DD (the expected answer)
    printed_date: str                          # as printed on the receipt
    time: str
    items: tuple[tuple[str, int, str], ...]    # (name, quantity, unit price)
    tax_rate: str                              # "0.08" for 8 %
    currency: str                              # ISO 4217 code, printed before the amounts
    payment: str = "Card"

    def line_total(self, qty: int, price: str) -> Decimal:
        return (qty * Decimal(price)).quantize(CENT)

    @property
    def subtotal(self) -> Decimal:
        return sum((self.line_total(q, p) for _, q, p in self.items), Decimal("0.00"))

    @property
    def tax(self) -> Decimal:
        return (self.subtotal * Decimal(self.tax_rate)).quantize(CENT, rounding=ROUND_HALF_UP)

    @property
    def total(self) -> Decimal:
        return self.subtotal + self.tax

    @property
    def tax_percent(self) -> str:
        return f"{(Decimal(self.tax_rate) * 100).normalize():f}%"

    def expected(self) -> dict:
        """Ground truth for an extraction task (see data/eval/schemas/receipt.schema.json)."""
        return {
            "merchant": self.merchant,
            "date": self.date,
            "currency": self.currency,
            "items": [
                {"name": n, "quantity": q, "unit_price": float(Decimal(p)), "amount": float(self.line_total(q, p))}
                for n, q, p in self.items
            ],
            "subtotal": float(self.subtotal),
            "tax": float(self.tax),
            "total": float(self.total),
        }


def draw_receipt(r: Receipt, w: int = 440) -> Image.Image:
    """A till receipt, portrait, white paper on a light grey margin."""
    margin, pad = 16, 26
    inner_left, inner_right = margin + pad, w - margin - pad
    rows = len(r.items)
    h = 330 + 34 * rows + 28 * len(r.address)
    img = Image.new("RGB", (w, h), (226, 228, 232))
    d = ImageDraw.Draw(img)
    d.rectangle([margin, margin, w - margin, h - margin], fill=WHITE, outline=(200, 200, 205))

    y = margin + 24
    text(d, (w / 2, y), r.merchant, 26, anchor="ma", bold=True)
    y += 40
    for line in r.address:
        text(d, (w / 2, y), line, 17, GREY, anchor="ma")
        y += 24
    y += 8
    text(d, (inner_left, y), f"Date: {r.printed_date}", 17)
    text(d, (inner_right, y), f"Time: {r.time}", 17, anchor="ra")
    y += 30

    def rule(y: float) -> None:
        for x in range(inner_left, inner_right, 10):
            d.line([x, y, x + 5, y], fill=GREY, width=1)

    rule(y)
    y += 14
    for name, qty, price in r.items:
        text(d, (inner_left, y), name, 18)
        text(d, (inner_left + 215, y), f"{qty} x {price}", 16, GREY)
        text(d, (inner_right, y), f"{r.line_total(qty, price)}", 18, anchor="ra")
        y += 34
    rule(y)
    y += 16
    for label, amount in (("Subtotal", r.subtotal), (f"Tax {r.tax_percent}", r.tax)):
        text(d, (inner_left, y), label, 18)
        text(d, (inner_right, y), f"{amount}", 18, anchor="ra")
        y += 30
    y += 4
    text(d, (inner_left, y), "TOTAL", 24, bold=True)
    text(d, (inner_right, y), f"{r.currency} {r.total}", 24, anchor="ra", bold=True)
    y += 44
    text(d, (w / 2, y), f"Paid by {r.payment}", 16, GREY, anchor="ma")
    y += 26
    text(d, (w / 2, y), "Thank you for your visit!", 16, GREY, anchor="ma")
    return img


# --------------------------------------------------------------------------- specimen passports


@dataclass(frozen=True)
class Person:
    """A fictitious holder of a SPECIMEN passport of Utopia (ICAO 9303's example state, code UTO)."""

    surname: str
    given_names: str
    document_number: str
    birth_date: str        # ISO YYYY-MM-DD
    sex: str               # M / F
    expiry_date: str       # ISO
    issue_date: str        # ISO
    place_of_birth: str
    nationality: str = "UTO"
    optional_data: str = ""

    def mrz_lines(self) -> list[str]:
        return make_td3(
            surname=self.surname, given_names=self.given_names, document_number=self.document_number,
            nationality=self.nationality, birth_date=iso_to_yymmdd(self.birth_date), sex=self.sex,
            expiry_date=iso_to_yymmdd(self.expiry_date), optional_data=self.optional_data,
        )

    def expected(self) -> dict:
        """Ground truth for an extraction task (see data/eval/schemas/passport.schema.json)."""
        return {
            "surname": self.surname.upper(),
            "given_names": self.given_names.upper(),
            "passport_number": self.document_number,
            "nationality": self.nationality,
            "date_of_birth": self.birth_date,
            "sex": self.sex,
            "expiry_date": self.expiry_date,
        }


def _portrait(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """A neutral head-and-shoulders silhouette (no real face)."""
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=(214, 222, 230), outline=(150, 160, 170), width=2)
    cx, w = (x0 + x1) / 2, x1 - x0
    d.ellipse([cx - w * 0.22, y0 + 34, cx + w * 0.22, y0 + 34 + w * 0.52], fill=(150, 162, 176))
    d.chord([cx - w * 0.42, y1 - w * 0.55, cx + w * 0.42, y1 + w * 0.45], 180, 360, fill=(150, 162, 176))


def draw_passport(p: Person) -> Image.Image:
    """A SPECIMEN passport data page with a valid TD3 machine-readable zone."""
    w, h = 880, 600
    img = Image.new("RGB", (w, h), (234, 240, 236))
    d = ImageDraw.Draw(img)
    # light security-print waves behind the data
    for y in range(80, 470, 36):
        d.arc([-40, y, w + 40, y + 60], 200, 340, fill=(220, 230, 224), width=1)
    d.rectangle([0, 0, w, 62], fill=(32, 70, 92))
    text(d, (28, 31), "UTOPIA", 26, WHITE, anchor="lm", bold=True)
    text(d, (w / 2, 31), "PASSPORT / PASSEPORT", 24, WHITE, anchor="mm")
    text(d, (w - 28, 31), "SPECIMEN", 24, (255, 120, 110), anchor="rm", bold=True)

    _portrait(d, (34, 92, 234, 352))

    def field(x: int, y: int, label: str, value: str) -> None:
        text(d, (x, y), label, 14, GREY)
        text(d, (x, y + 18), value, 21, bold=True)

    left, mid, right = 266, 470, 640
    field(left, 84, "Type / Type", "P")
    field(mid, 84, "Code / Code", p.nationality)
    field(right, 84, "Passport No. / No du passeport", p.document_number)
    field(left, 138, "Surname / Nom", p.surname.upper())
    field(left, 192, "Given names / Prenoms", p.given_names.upper())
    field(left, 246, "Nationality / Nationalite", "UTOPIAN")
    field(left, 300, "Date of birth / Date de naissance", iso_to_printed(p.birth_date))
    field(right, 300, "Sex / Sexe", p.sex)
    field(left, 354, "Place of birth / Lieu de naissance", p.place_of_birth.upper())
    field(left, 408, "Date of issue / Date de delivrance", iso_to_printed(p.issue_date))
    field(right - 40, 408, "Date of expiry / Date d'expiration", iso_to_printed(p.expiry_date))
    text(d, (34, 372), "Holder's signature", 14, GREY)
    d.line([34, 410, 234, 410], fill=(150, 160, 170), width=1)

    # SPECIMEN watermark, diagonal and translucent, kept clear of the MRZ
    mark = Image.new("L", (440, 100), 0)
    ImageDraw.Draw(mark).text((220, 50), "SPECIMEN", font=font(76), fill=80, anchor="mm")
    mark = mark.rotate(14, resample=Image.BICUBIC, expand=True)
    img.paste(Image.new("RGB", mark.size, (210, 40, 40)), (440, 130), mark)

    # machine-readable zone
    d.rectangle([0, 470, w, h], fill=(250, 250, 246))
    cell = 19
    x0 = (w - 44 * cell) / 2
    for i, line in enumerate(p.mrz_lines()):
        mono(d, (x0, 492 + i * 46), line, 28, cell)
    return img
