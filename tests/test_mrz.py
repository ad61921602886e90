"""phi_helpers.tutorial.mrz (ICAO 9303 TD3) and the tutorial images drawn by scripts/make_images.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from phi_helpers.errors import PhiHelpersError
from phi_helpers.tutorial.mrz import MRZError, check_digit, check_fields, make_td3, parse_td3

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "notebooks" / "images"

# The specimen of ICAO Doc 9303 part 4 (Utopia, Anna Maria Eriksson).
ICAO_LINE1 = "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"
ICAO_LINE2 = "L898902C36UTO7408122F1204159ZE184226B<<<<<10"
ICAO_FIELDS = dict(
    surname="ERIKSSON", given_names="ANNA MARIA", document_number="L898902C3", nationality="UTO",
    birth_date="740812", sex="F", expiry_date="120415", optional_data="ZE184226B",
)
ALL_CHECKS = {"document_number", "birth_date", "expiry_date", "optional_data", "composite"}


def load_script(name: str):
    """Import scripts/<name>.py by path (scripts/ is not a package)."""
    if f"_scripts_{name}" in sys.modules:
        return sys.modules[f"_scripts_{name}"]
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def replace_at(line: str, index: int, char: str) -> str:
    return line[:index] + char + line[index + 1:]


# --------------------------------------------------------------------------- check digits


@pytest.mark.parametrize(
    "field, digit",
    [("L898902C3", "6"), ("740812", "2"), ("120415", "9"), ("ZE184226B<<<<<", "1"), ("<<<<", "0"),
     ("AB2134<<<", "5")],
)
def test_check_digit_known_values(field, digit):
    assert check_digit(field) == digit


def test_check_digit_rejects_characters_outside_the_mrz_alphabet():
    with pytest.raises(MRZError, match="'a'"):
        check_digit("a1")
    with pytest.raises(MRZError):
        check_digit(740812)


# --------------------------------------------------------------------------- parsing


def test_icao_specimen_parses_as_valid_with_the_right_fields():
    result = parse_td3([ICAO_LINE1, ICAO_LINE2])
    for key, value in ICAO_FIELDS.items():
        assert result[key] == value, key
    assert result["document_type"] == "P"
    assert result["issuing_country"] == "UTO"
    assert result["checks"] == dict.fromkeys(ALL_CHECKS, True)
    assert result["valid"] is True


def test_parse_accepts_one_string_with_whitespace_and_a_tuple():
    text = f"\n   {ICAO_LINE1}  \r\n\t{ICAO_LINE2}\n\n"
    assert parse_td3(text)["valid"]
    assert parse_td3((ICAO_LINE1, ICAO_LINE2))["document_number"] == "L898902C3"


@pytest.mark.parametrize(
    "index, failing",
    [
        (4, {"document_number", "composite"}),     # a digit of the document number
        (9, {"document_number", "composite"}),     # the document number's check digit itself
        (15, {"birth_date", "composite"}),         # birth date
        (24, {"expiry_date", "composite"}),        # expiry date
        (31, {"optional_data", "composite"}),      # personal number
        (43, {"composite"}),                       # the composite check digit
    ],
)
def test_a_single_changed_digit_is_caught_by_the_right_check(index, failing):
    original = ICAO_LINE2[index]
    changed = str((int(original) + 1) % 10)
    result = parse_td3([ICAO_LINE1, replace_at(ICAO_LINE2, index, changed)])
    assert {name for name, ok in result["checks"].items() if not ok} == failing
    assert result["valid"] is False


def test_nationality_has_no_check_digit():
    # Nationality carries no check digit: a misread code still "validates" (documented limitation).
    result = parse_td3([ICAO_LINE1, ICAO_LINE2.replace("UTO", "UTA")])
    assert result["valid"] and result["nationality"] == "UTA"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([ICAO_LINE1], "got 1 non-empty line"),
        ([ICAO_LINE1, ICAO_LINE2, ICAO_LINE2], "got 3 non-empty line"),
        ([ICAO_LINE1, ICAO_LINE2[:-1]], "line 2 has 43 characters"),
        ([ICAO_LINE1 + "<", ICAO_LINE2], "line 1 has 45 characters"),
        ([ICAO_LINE1.lower(), ICAO_LINE2], "only upper-case A-Z"),
        ([ICAO_LINE1, ICAO_LINE2.replace("<", " ")], "line 2 contains ' '"),
        ("", "got 0 non-empty line"),
        (12345, "list of two strings"),
        ([ICAO_LINE1, None], "list of two strings"),
    ],
)
def test_bad_input_raises_mrz_error_with_a_useful_message(lines, message):
    with pytest.raises(MRZError, match=message):
        parse_td3(lines)


def test_mrz_error_is_a_value_error_and_a_phi_helpers_error():
    assert issubclass(MRZError, ValueError) and issubclass(MRZError, PhiHelpersError)


def test_empty_optional_data_may_have_check_digit_0_or_filler():
    line2 = "L898902C36UTO7408122F1204159<<<<<<<<<<<<<<<"
    for optional_check in "<0":
        body = line2[:42] + optional_check
        composite = check_digit(body[0:10] + body[13:20] + body[21:43])
        assert parse_td3([ICAO_LINE1, body + composite])["checks"]["optional_data"]
    body = line2[:42] + "7"
    composite = check_digit(body[0:10] + body[13:20] + body[21:43])
    assert not parse_td3([ICAO_LINE1, body + composite])["checks"]["optional_data"]


# --------------------------------------------------------------------------- building


def test_make_td3_reproduces_the_icao_specimen():
    lines = make_td3(
        surname="Eriksson", given_names="Anna Maria", document_number="L898902C3", nationality="UTO",
        birth_date="740812", sex="F", expiry_date="120415", optional_data="ZE184226B",
    )
    assert lines == [ICAO_LINE1, ICAO_LINE2]


def test_round_trip_with_accents_hyphens_and_no_optional_data():
    lines = make_td3(
        surname="Moreau-Santos", given_names="Élise D'Arcy", document_number="AB12", nationality="D",
        issuing_country="UTO", birth_date="010203", sex="X", expiry_date="311130",
    )
    assert [len(line) for line in lines] == [44, 44]
    assert lines[0].startswith("P<UTOMOREAU<SANTOS<<ELISE<DARCY<")
    result = parse_td3(lines)
    assert result["valid"], result["checks"]
    assert result["surname"] == "MOREAU SANTOS"
    assert result["given_names"] == "ELISE DARCY"
    assert result["document_number"] == "AB12"
    assert result["nationality"] == "D" and result["issuing_country"] == "UTO"
    assert result["sex"] == "X" and lines[1][20] == "<"
    assert result["optional_data"] == "" and lines[1][42] == "<"


def test_long_names_are_cut_to_the_line():
    lines = make_td3(
        surname="Vandenberghe-Oosterhuis", given_names="Maximiliaan Frederik Alexander", document_number="X1",
        nationality="UTO", birth_date="900101", sex="M", expiry_date="300101",
    )
    assert lines[0] == "P<UTOVANDENBERGHE<OOSTERHUIS<<MAXIMILIAAN<FR"
    assert parse_td3(lines)["valid"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"birth_date": "1974-08-12"}, "YYMMDD"),
        ({"expiry_date": "121315"}, "month 01-12"),
        ({"document_number": "L898902C3X"}, "1 to 9 characters"),
        ({"sex": "Q"}, "'M', 'F' or 'X'"),
        ({"surname": "Иванова"}, "transliterate"),
        ({"surname": "  "}, "surname is empty"),
        ({"nationality": "UTOP"}, "1-3 letter"),
        ({"optional_data": "A" * 15}, "room for 14"),
        ({"document_type": "V"}, "document_type"),
    ],
)
def test_make_td3_rejects_bad_fields(change, message):
    fields = dict(ICAO_FIELDS) | change
    with pytest.raises(MRZError, match=message):
        make_td3(**fields)


# --------------------------------------------------------------------------- checking a model answer


SPECIMEN = parse_td3([ICAO_LINE1, ICAO_LINE2])


def test_check_fields_accepts_a_correct_answer_in_several_notations():
    answer = {
        "surname": "Eriksson",
        "given_names": "anna-maria",
        "passport_number": "L898 902 C3",
        "nationality": "uto",
        "date_of_birth": "12.08.1974",
        "sex": "Female",
        "expiry_date": "15 APR/AVR 2012",
        "comment": "ignored: not a passport field",
    }
    report = check_fields(answer, SPECIMEN)
    assert set(report) == set(answer) - {"comment"}
    assert all(r["match"] for r in report.values()), report


@pytest.mark.parametrize(
    "date", ["1974-08-12", "1974/08/12", "19740812", "740812", "12/08/1974", "12 Aug 1974", "August 12, 1974"]
)
def test_check_fields_date_formats(date):
    assert check_fields({"date_of_birth": date}, SPECIMEN)["date_of_birth"]["match"]


@pytest.mark.parametrize(
    "field, wrong",
    [
        ("surname", "ERIKSON"),
        ("given_names", "ANNA"),
        ("passport_number", "L898902C8"),
        ("date_of_birth", "1974-12-08"),
        ("date_of_birth", "sometime in 1974"),
        ("expiry_date", "2012-04-16"),
        ("sex", "M"),
        ("nationality", "UTA"),
    ],
)
def test_check_fields_catches_a_wrong_field(field, wrong):
    answer = {"surname": "ERIKSSON", "passport_number": "L898902C3", "date_of_birth": "1974-08-12"}
    answer[field] = wrong
    report = check_fields(answer, SPECIMEN)
    assert report[field] == {"match": False, "extracted": wrong, "mrz": report[field]["mrz"]}
    assert [name for name, r in report.items() if not r["match"]] == [field]


def test_check_fields_with_explicit_fields_counts_a_missing_one_as_wrong():
    report = check_fields({"surname": "Eriksson"}, SPECIMEN, fields=["surname", "expiry_date"])
    assert report["surname"]["match"] is True
    assert report["expiry_date"] == {"match": False, "extracted": None, "mrz": "120415"}


def test_check_fields_rejects_bad_arguments():
    with pytest.raises(MRZError, match="unknown_field"):
        check_fields({}, SPECIMEN, fields=["unknown_field"])
    with pytest.raises(MRZError, match="dict"):
        check_fields("surname: Eriksson", SPECIMEN)
    with pytest.raises(MRZError, match="parse_td3"):
        check_fields({"surname": "Eriksson"}, {"surname": "ERIKSSON"})


# --------------------------------------------------------------------------- tutorial images


def test_tutorial_passport_mrz_is_valid_and_matches_the_printed_fields():
    make_images = load_script("make_images")
    holder = make_images.PASSPORT_HOLDER
    mrz = parse_td3(holder.mrz_lines())
    assert mrz["valid"], mrz["checks"]
    assert mrz["issuing_country"] == "UTO" and mrz["optional_data"] == holder.optional_data
    report = check_fields(holder.expected(), mrz)
    assert len(report) == 7 and all(r["match"] for r in report.values()), report
    # the committed README documents the same MRZ
    readme = (IMAGES / "README.md").read_text(encoding="utf-8")
    assert "\n".join(holder.mrz_lines()) in readme


def test_committed_passport_png_is_what_the_script_draws():
    make_images = load_script("make_images")
    fresh = make_images._draw.draw_passport(make_images.PASSPORT_HOLDER)
    with Image.open(IMAGES / "passport.png") as committed:
        assert committed.size == fresh.size
        assert committed.convert("RGB").tobytes() == fresh.tobytes(), (
            "notebooks/images/passport.png is stale: run python scripts/make_images.py"
        )


def test_tutorial_receipt_adds_up_to_the_documented_total():
    receipt = load_script("make_images").RECEIPT
    amounts = [receipt.line_total(q, p) for _, q, p in receipt.items]
    assert 4 <= len(amounts) <= 6
    assert sum(amounts) == receipt.subtotal
    assert str(receipt.subtotal) == "28.60" and str(receipt.tax) == "2.29" and str(receipt.total) == "30.89"


def test_drawing_is_deterministic():
    make_images = load_script("make_images")
    png = make_images._draw.png_bytes
    for draw in (lambda: make_images.draw_scene(2), make_images.draw_chart,
                 lambda: make_images._draw.draw_passport(make_images.PASSPORT_HOLDER)):
        assert png(draw()) == png(draw())


def test_scenes_differ_and_bad_variant_is_rejected():
    make_images = load_script("make_images")
    one, two = make_images.draw_scene(1), make_images.draw_scene(2)
    assert one.size == two.size and one.tobytes() != two.tobytes()
    with pytest.raises(ValueError, match="variant"):
        make_images.draw_scene(3)


@pytest.mark.parametrize(
    "name", ["chart.png", "book_cover.png", "receipt.png", "passport.png", "scene_1.png", "scene_2.png"]
)
def test_committed_tutorial_images_are_small_pngs(name):
    path = IMAGES / name
    assert path.stat().st_size < 200 * 1024
    with Image.open(path) as img:
        assert img.format == "PNG" and 400 <= max(img.size) <= 900
        assert not (set(img.info) & {"date", "Creation Time", "tIME"}), img.info
