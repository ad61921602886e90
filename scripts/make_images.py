"""Draw the tutorial images into notebooks/images/ (and their README) from scratch.

    python scripts/make_images.py

Every image is drawn here with Pillow shapes and Pillow's bundled font: no photos, no third-party
artwork, no fonts from the machine, so the output is identical on every machine (same Pillow) and is
dedicated to the public domain (CC0 1.0). The notebooks use these committed files; they never
hot-link images.

Ground truth, for teachers and notebook authors (also written to notebooks/images/README.md):

* chart.png: grouped bar chart "Quarterly revenue, 2023 vs 2024", thousand USD, values in REVENUE.
* book_cover.png: "The Lighthouse Cartographer" by Mara Ellison (fictitious).
* receipt.png: RECEIPT below; subtotal 28.60, tax 8% 2.29, total USD 30.89.
* passport.png: SPECIMEN passport of Utopia (UTO) for the fictitious PASSPORT_HOLDER; valid TD3 MRZ.
* scene_1.png / scene_2.png: the same street; scene_2 differs in exactly SCENE_DIFFERENCES (5):
    1. the sun (top left) is replaced by a crescent moon;
    2. a second tree stands to the right of the house;
    3. the car is blue instead of red;
    4. one of the three clouds is gone (two clouds left);
    5. the house has a chimney.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _draw  # noqa: E402
from _draw import GREY, INK, WHITE, Person, Receipt, text, width, wrap  # noqa: E402

OUT_DIR = _draw.ROOT / "notebooks" / "images"

# --------------------------------------------------------------------------- ground truth

CHART_TITLE = "Quarterly revenue, 2023 vs 2024"
REVENUE = {  # thousand USD
    "2023": {"Q1": 120, "Q2": 135, "Q3": 128, "Q4": 160},
    "2024": {"Q1": 142, "Q2": 151, "Q3": 137, "Q4": 188},
}

BOOK_TITLE = "The Lighthouse Cartographer"
BOOK_AUTHOR = "Mara Ellison"

RECEIPT = Receipt(
    merchant="Juniper & Crumb Bakery",
    address=("14 Harbour Lane", "Port Meridian, Utopia"),
    date="2024-03-15",
    printed_date="15 Mar 2024",
    time="10:42",
    items=(
        ("Sourdough loaf", 1, "5.50"),
        ("Croissant", 3, "2.25"),
        ("Blueberry muffin", 2, "2.80"),
        ("Cappuccino", 2, "3.40"),
        ("Orange juice", 1, "3.95"),
    ),
    tax_rate="0.08",
    currency="USD",
)

PASSPORT_HOLDER = Person(
    surname="Lindqvist",
    given_names="Noor Elise",
    document_number="X4R7Z1K05",
    birth_date="1988-03-14",
    sex="F",
    expiry_date="2033-07-21",
    issue_date="2023-07-22",
    place_of_birth="Port Meridian",
    optional_data="UT5519307",
)

SCENE_DIFFERENCES = (
    "The sun (top left) is replaced by a crescent moon.",
    "A second tree stands to the right of the house.",
    "The car is blue instead of red.",
    "One of the three clouds is gone (two clouds left).",
    "The house has a chimney.",
)

# --------------------------------------------------------------------------- chart


def draw_chart() -> Image.Image:
    """Grouped bar chart with title, axis labels, legend and a value on every bar."""
    w, h = 820, 560
    img = Image.new("RGB", (w, h), WHITE)
    d = ImageDraw.Draw(img)
    colors = {"2023": (150, 178, 208), "2024": (36, 99, 160)}
    left, right, top, bottom = 100, w - 40, 110, h - 90
    y_max = 200

    text(d, (w / 2, 22), CHART_TITLE, 30, anchor="ma", bold=True)
    # legend
    lx = w / 2 - 110
    for series, color in colors.items():
        d.rectangle([lx, 70, lx + 22, 88], fill=color)
        text(d, (lx + 30, 79), series, 20, anchor="lm")
        lx += 140
    # grid and y axis
    for v in range(0, y_max + 1, 50):
        y = bottom - (bottom - top) * v / y_max
        d.line([left, y, right, y], fill=(225, 225, 230) if v else INK, width=1 if v else 2)
        text(d, (left - 10, y), str(v), 18, GREY, anchor="rm")
    d.line([left, top, left, bottom], fill=INK, width=2)
    # y label, rotated
    label = Image.new("L", (int(width("Revenue (thousand USD)", 20)) + 8, 28), 0)
    ImageDraw.Draw(label).text((4, 14), "Revenue (thousand USD)", font=_draw.font(20), fill=255, anchor="lm")
    label = label.rotate(90, expand=True)
    img.paste(Image.new("RGB", label.size, INK), (22, int((top + bottom) / 2 - label.size[1] / 2)), label)
    # bars
    quarters = list(REVENUE["2024"])
    group = (right - left) / len(quarters)
    bar = 58
    for i, q in enumerate(quarters):
        cx = left + group * (i + 0.5)
        for j, (series, color) in enumerate(colors.items()):
            v = REVENUE[series][q]
            x0 = cx - bar - 3 + j * (bar + 6)
            y = bottom - (bottom - top) * v / y_max
            d.rectangle([x0, y, x0 + bar, bottom - 1], fill=color)
            text(d, (x0 + bar / 2, y - 6), str(v), 18, anchor="md", bold=series == "2024")
        text(d, (cx, bottom + 12), q, 20, anchor="ma")
    text(d, ((left + right) / 2, h - 34), "Quarter", 20, anchor="ma")
    return img


# --------------------------------------------------------------------------- book cover


def draw_book_cover() -> Image.Image:
    """Portrait cover: night sea, a lighthouse with its beam, title on top, author at the bottom."""
    w, h = 560, 840
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    top_c, bottom_c = (16, 34, 66), (40, 96, 120)
    for y in range(h):  # vertical gradient, a plain function of y
        t = y / (h - 1)
        d.line([0, y, w, y], fill=tuple(round(a + (b - a) * t) for a, b in zip(top_c, bottom_c)))
    # beam
    d.polygon([(300, 470), (w, 380), (w, 520)], fill=(78, 116, 140))
    # sea and cliff
    d.rectangle([0, 640, w, h], fill=(18, 46, 72))
    for y in range(660, h, 26):
        for x in range(-20, w, 70):
            d.arc([x + (y % 52), y, x + (y % 52) + 40, y + 14], 200, 340, fill=(70, 120, 150), width=2)
    d.polygon([(120, 640), (210, 560), (420, 560), (480, 640)], fill=(52, 48, 44))
    # lighthouse
    d.polygon([(268, 560), (286, 470), (314, 470), (332, 560)], fill=(236, 232, 222))
    for y0 in (490, 530):
        d.polygon([(288 - (y0 - 470) * 0.2, y0), (312 + (y0 - 470) * 0.2, y0),
                   (314 + (y0 - 460) * 0.2, y0 + 14), (286 - (y0 - 460) * 0.2, y0 + 14)], fill=(180, 52, 48))
    d.rectangle([282, 446, 318, 470], fill=(255, 226, 120))
    d.polygon([(278, 446), (300, 426), (322, 446)], fill=(180, 52, 48))
    # a few stars (fixed positions)
    for x, y in ((60, 250), (140, 330), (480, 240), (410, 320), (90, 420), (510, 430), (230, 380)):
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(240, 236, 210))
    # title, author
    y = 70
    for line in wrap(BOOK_TITLE.upper(), 50, w - 80, bold=True):
        text(d, (w / 2, y), line, 50, (248, 236, 200), anchor="ma", bold=True)
        y += 64
    d.line([w / 2 - 60, y + 14, w / 2 + 60, y + 14], fill=(248, 236, 200), width=2)
    text(d, (w / 2, y + 34), "A NOVEL", 20, (200, 214, 224), anchor="ma")
    text(d, (w / 2, h - 70), BOOK_AUTHOR.upper(), 34, WHITE, anchor="ma", bold=True)
    return img


# --------------------------------------------------------------------------- scenes


def _tree(d: ImageDraw.ImageDraw, x: int, ground: int) -> None:
    d.rectangle([x - 9, ground - 70, x + 9, ground], fill=(110, 76, 46))
    d.ellipse([x - 48, ground - 170, x + 48, ground - 60], fill=(58, 140, 70))


def _cloud(d: ImageDraw.ImageDraw, x: int, y: int) -> None:
    for dx, dy, r in ((0, 10, 26), (30, 0, 34), (64, 10, 26)):
        d.ellipse([x + dx - r, y + dy - r, x + dx + r, y + dy + r], fill=WHITE)


def draw_scene(variant: int) -> Image.Image:
    """A street: house, tree, car, clouds and sun (variant 1) or the changed street (variant 2).

    Differences of variant 2, in the order of SCENE_DIFFERENCES: moon instead of sun, second tree,
    blue car, one cloud fewer, chimney on the house.
    """
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2, got {variant!r}.")
    second = variant == 2
    w, h, ground = 800, 500, 360
    img = Image.new("RGB", (w, h), (170, 212, 240))
    d = ImageDraw.Draw(img)
    # sky objects
    if second:
        d.ellipse([60, 40, 140, 120], fill=(250, 246, 214))
        d.ellipse([86, 30, 166, 110], fill=(170, 212, 240))  # bite out of the disc: a crescent
    else:
        d.ellipse([60, 40, 140, 120], fill=(255, 208, 60))
        for k in range(12):
            a = k * math.pi / 6
            d.line([100 + 52 * math.cos(a), 80 + 52 * math.sin(a), 100 + 68 * math.cos(a), 80 + 68 * math.sin(a)],
                   fill=(255, 196, 40), width=4)
    clouds = [(270, 70), (470, 110), (640, 60)]
    for x, y in clouds[:2] if second else clouds:
        _cloud(d, x, y)
    # ground, road
    d.rectangle([0, ground, w, h], fill=(112, 178, 96))
    d.rectangle([0, 410, w, 470], fill=(92, 92, 98))
    for x in range(10, w, 80):
        d.rectangle([x, 437, x + 40, 442], fill=(240, 240, 240))
    # house
    if second:  # chimney, drawn before the roof so the roof overlaps its base
        d.rectangle([414, 146, 442, 230], fill=(140, 70, 56))
    d.rectangle([300, 250, 480, ground], fill=(236, 206, 150))
    d.polygon([(286, 252), (390, 176), (494, 252)], fill=(176, 64, 52))
    d.rectangle([372, 296, 408, ground], fill=(120, 78, 50))
    for x in (318, 424):
        d.rectangle([x, 272, x + 38, 308], fill=(196, 228, 248), outline=WHITE, width=3)
    # trees
    _tree(d, 190, ground)
    if second:
        _tree(d, 570, ground)
    # car
    body = (40, 90, 200) if second else (208, 44, 44)
    d.rounded_rectangle([560, 400, 720, 440], radius=10, fill=body)
    d.polygon([(590, 400), (610, 372), (670, 372), (692, 400)], fill=body)
    d.polygon([(600, 398), (614, 378), (638, 378), (638, 398)], fill=(196, 228, 248))
    d.polygon([(646, 398), (646, 378), (666, 378), (682, 398)], fill=(196, 228, 248))
    for x in (596, 684):
        d.ellipse([x - 16, 426, x + 16, 458], fill=(30, 30, 34))
        d.ellipse([x - 6, 436, x + 6, 448], fill=(170, 170, 176))
    return img


# --------------------------------------------------------------------------- README


def readme() -> str:
    r, p = RECEIPT, PASSPORT_HOLDER
    mrz = p.mrz_lines()
    items = "\n".join(
        f"  - {name}: {qty} x {price} = {r.line_total(qty, price)}" for name, qty, price in r.items
    )
    revenue = "\n".join(
        f"- {year}: " + ", ".join(f"{q} {v}" for q, v in values.items()) + f" (year total {sum(values.values())})"
        for year, values in REVENUE.items()
    )
    diffs = "\n".join(f"  {i}. {diff}" for i, diff in enumerate(SCENE_DIFFERENCES, start=1))
    return f"""# Tutorial images

Generated by `python scripts/make_images.py` (do not edit by hand: change the script and re-run).
Everything is drawn from shapes and Pillow's bundled font, no photos, no third-party artwork, and
all people, places, shops and books are fictitious. The images are dedicated to the public domain
under [CC0 1.0](https://creativecommons.org/publicdomain/zero/1.0/).

## chart.png

Grouped bar chart titled "{CHART_TITLE}": x axis "Quarter", y axis "Revenue (thousand USD)",
legend 2023 (light blue) / 2024 (dark blue), the value printed above every bar.

{revenue}
- Highest quarter in 2024: Q4 (188); lowest: Q3 (137). 2024 beat 2023 in every quarter.

## book_cover.png

Portrait book cover with a lighthouse at night.

- Title: "{BOOK_TITLE}" (printed in capitals), subtitle "A NOVEL"
- Author: {BOOK_AUTHOR}

## receipt.png

Shop receipt, portrait.

- Shop: {r.merchant}, {", ".join(r.address)}
- Date: {r.printed_date} ({r.date}), time {r.time}
- Items:
{items}
- Subtotal {r.subtotal}, tax {r.tax_percent} {r.tax}, **total {r.currency} {r.total}**, paid by {r.payment.lower()}

## passport.png

SPECIMEN passport data page of Utopia, the fictitious state (code UTO) used in the examples of
ICAO Doc 9303. The holder is fictitious; the portrait is a grey silhouette.

- Type P, issuing state and nationality UTO ("UTOPIAN")
- Surname {p.surname.upper()}, given names {p.given_names.upper()}
- Passport number {p.document_number}
- Date of birth {p.birth_date} (printed {_draw.iso_to_printed(p.birth_date)}), sex {p.sex}
- Place of birth {p.place_of_birth.upper()}
- Date of issue {p.issue_date}, date of expiry {p.expiry_date}
- Optional data (personal number) {p.optional_data}
- Machine-readable zone (TD3, all check digits valid, see `phi_helpers.tutorial.mrz.parse_td3`):

```
{mrz[0]}
{mrz[1]}
```

## scene_1.png and scene_2.png

The same street twice (house, tree, car, clouds, sky). `scene_2.png` differs in exactly
{len(SCENE_DIFFERENCES)} ways:

{diffs}
"""


# --------------------------------------------------------------------------- main


def render_all() -> dict[str, Image.Image]:
    """Every tutorial image, by file name."""
    return {
        "chart.png": draw_chart(),
        "book_cover.png": draw_book_cover(),
        "receipt.png": _draw.draw_receipt(RECEIPT),
        "passport.png": _draw.draw_passport(PASSPORT_HOLDER),
        "scene_1.png": draw_scene(1),
        "scene_2.png": draw_scene(2),
    }


def main(out_dir: Path = OUT_DIR) -> None:
    for name, img in render_all().items():
        size = _draw.save_png(img, out_dir / name)
        print(f"{out_dir / name}  {img.width}x{img.height}  {size / 1024:.0f} KB")
    (out_dir / "README.md").write_text(readme(), encoding="utf-8")
    print(out_dir / "README.md")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no other arguments
    main()
