"""ICAO 9303 machine-readable zone (MRZ) of a passport: build it, parse it, check a model's answer.

A passport data page ends with two lines of 44 characters (format "TD3") drawn from ``A-Z``, ``0-9``
and the filler ``<``. Several fields carry a check digit, so a reading can be verified without
knowing the right answer::

    >>> lines = ["P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<",
    ...          "L898902C36UTO7408122F1204159ZE184226B<<<<<10"]
    >>> mrz = parse_td3(lines)
    >>> mrz["surname"], mrz["given_names"], mrz["document_number"], mrz["valid"]
    ('ERIKSSON', 'ANNA MARIA', 'L898902C3', True)

Tutorial notebook 02 asks a model for the fields of a passport as JSON and compares them with the
MRZ using :func:`check_fields`::

    >>> answer = {"surname": "Eriksson", "given_names": "Anna Maria", "passport_number": "L898902C3",
    ...           "date_of_birth": "1974-08-12"}
    >>> {field: r["match"] for field, r in check_fields(answer, mrz).items()}
    {'surname': True, 'given_names': True, 'passport_number': True, 'date_of_birth': True}

Layout of the two lines (positions are 1-based, as in ICAO 9303 part 4)::

    line 1   1-2 document type (P<)   3-5 issuing state   6-44 SURNAME<<GIVEN<NAMES
    line 2   1-9 document number      10 check            11-13 nationality
             14-19 birth date YYMMDD  20 check            21 sex (M, F or < for unspecified)
             22-27 expiry date YYMMDD 28 check            29-42 optional data   43 check
             44 composite check over positions 1-10, 14-20 and 22-43

This module is a submodule only (``from phi_helpers.tutorial.mrz import parse_td3``); it is not part of the
top-level ``phi_helpers`` API.
"""

from __future__ import annotations

import re
import unicodedata

from ..errors import MRZError

__all__ = ["MRZError", "check_digit", "make_td3", "parse_td3", "check_fields"]

LINE_LENGTH = 44
_MRZ_CHARS = re.compile(r"[A-Z0-9<]*")
_WEIGHTS = (7, 3, 1)


# --------------------------------------------------------------------------- check digits


def _char_value(char: str) -> int:
    if char.isdigit():
        return int(char)
    if "A" <= char <= "Z":
        return ord(char) - ord("A") + 10
    if char == "<":
        return 0
    raise MRZError(f"{char!r} cannot appear in an MRZ: use only A-Z, 0-9 and the filler '<'.")


def check_digit(s: str) -> str:
    """ICAO 9303 check digit of ``s``, as a one-character string.

    Each character gets a value (``0-9`` themselves, ``A-Z`` 10-35, ``<`` 0), is multiplied by the
    repeating weights 7, 3, 1, and the sum is taken modulo 10.

    >>> check_digit("L898902C3")
    '6'
    >>> check_digit("740812")
    '2'
    >>> check_digit("")
    '0'
    """
    if not isinstance(s, str):
        raise MRZError(f"check_digit expects a string, got {type(s).__name__}.")
    total = sum(_char_value(c) * _WEIGHTS[i % 3] for i, c in enumerate(s))
    return str(total % 10)


# --------------------------------------------------------------------------- building


def _to_mrz_text(value: str, what: str) -> str:
    """Upper-case, strip accents, turn spaces/hyphens into '<', drop apostrophes and dots."""
    if not isinstance(value, str):
        raise MRZError(f"{what} must be a string, got {type(value).__name__}.")
    text = unicodedata.normalize("NFKD", value)
    text = "".join(c for c in text if not unicodedata.combining(c)).upper().strip()
    text = re.sub(r"['’.,]", "", text)
    text = re.sub(r"[\s\-]+", "<", text)
    if not _MRZ_CHARS.fullmatch(text):
        bad = sorted({c for c in text if not re.fullmatch(r"[A-Z0-9<]", c)})
        raise MRZError(
            f"{what} {value!r} contains {''.join(bad)!r}, which has no MRZ form: "
            "transliterate it to Latin letters A-Z first."
        )
    return text


def _check_date(value: str, what: str) -> str:
    if not (isinstance(value, str) and re.fullmatch(r"\d{6}", value)):
        raise MRZError(f"{what} must be six digits YYMMDD (e.g. '740812' for 12 Aug 1974), got {value!r}.")
    month, day = int(value[2:4]), int(value[4:6])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise MRZError(f"{what} {value!r} is not a date: expected YYMMDD with month 01-12 and day 01-31.")
    return value


def _country(value: str, what: str) -> str:
    code = _to_mrz_text(value, what)
    if not re.fullmatch(r"[A-Z]{1,3}", code):
        raise MRZError(f"{what} must be a 1-3 letter ICAO code such as 'UTO' or 'D', got {value!r}.")
    return code.ljust(3, "<")


def make_td3(
    *,
    surname: str,
    given_names: str,
    document_number: str,
    nationality: str,
    birth_date: str,
    sex: str,
    expiry_date: str,
    issuing_country: str | None = None,
    document_type: str = "P",
    optional_data: str = "",
) -> list[str]:
    """The two 44-character MRZ lines of a passport (TD3), check digits included.

    Names are upper-cased, accents are stripped (``Élise`` -> ``ELISE``), spaces and hyphens become
    ``<``; a name longer than the 39 places of line 1 is cut, as ICAO 9303 allows. Dates are
    ``YYMMDD``. ``sex`` is ``"M"``, ``"F"`` or ``"X"``/``"<"``/``""`` for unspecified.
    ``issuing_country`` defaults to ``nationality``. ``document_number`` may have at most 9
    characters and ``optional_data`` at most 14.

    >>> make_td3(surname="Eriksson", given_names="Anna Maria", document_number="L898902C3",
    ...          nationality="UTO", birth_date="740812", sex="F", expiry_date="120415",
    ...          optional_data="ZE184226B")
    ['P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<', 'L898902C36UTO7408122F1204159ZE184226B<<<<<10']
    """
    doc_type = _to_mrz_text(document_type, "document_type")
    if not re.fullmatch(r"P[A-Z<]?", doc_type):
        raise MRZError(f"document_type of a passport must be 'P' or 'P' plus one letter, got {document_type!r}.")
    issuer = _country(nationality if issuing_country is None else issuing_country, "issuing_country")
    nation = _country(nationality, "nationality")

    primary = _to_mrz_text(surname, "surname")
    secondary = _to_mrz_text(given_names, "given_names")
    if not primary.strip("<"):
        raise MRZError("surname is empty: a passport MRZ needs at least a surname.")
    name = primary + ("<<" + secondary if secondary else "")
    name = name[:39].ljust(39, "<")

    number = _to_mrz_text(document_number, "document_number")
    if not 1 <= len(number) <= 9:
        raise MRZError(f"document_number must have 1 to 9 characters, got {document_number!r}.")
    number = number.ljust(9, "<")

    optional = _to_mrz_text(optional_data, "optional_data")
    if len(optional) > 14:
        raise MRZError(f"optional_data has {len(optional)} characters; a TD3 MRZ has room for 14.")
    optional = optional.ljust(14, "<")

    sex_code = {"M": "M", "F": "F", "X": "<", "<": "<", "": "<"}.get(str(sex).strip().upper())
    if sex_code is None:
        raise MRZError(f"sex must be 'M', 'F' or 'X' (unspecified), got {sex!r}.")

    birth = _check_date(birth_date, "birth_date")
    expiry = _check_date(expiry_date, "expiry_date")

    line1 = doc_type.ljust(2, "<") + issuer + name
    optional_check = "<" if optional == "<" * 14 else check_digit(optional)
    body = (
        number + check_digit(number) + nation + birth + check_digit(birth) + sex_code
        + expiry + check_digit(expiry) + optional + optional_check
    )
    composite = check_digit(body[0:10] + body[13:20] + body[21:43])
    return [line1, body + composite]


# --------------------------------------------------------------------------- parsing


def _split_lines(lines: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(lines, str):
        parts = lines.strip().splitlines()
    elif isinstance(lines, (list, tuple)) and all(isinstance(x, str) for x in lines):
        parts = list(lines)
    else:
        raise MRZError(
            "parse_td3 expects the two MRZ lines as a list of two strings or one string with a "
            f"newline between them, got {type(lines).__name__}."
        )
    parts = [p.strip() for p in parts if p.strip()]
    if len(parts) != 2:
        raise MRZError(f"A passport (TD3) MRZ has 2 lines of 44 characters; got {len(parts)} non-empty line(s).")
    for number, line in enumerate(parts, start=1):
        if len(line) != LINE_LENGTH:
            raise MRZError(
                f"MRZ line {number} has {len(line)} characters, a passport (TD3) line has 44: {line!r}."
            )
        if not _MRZ_CHARS.fullmatch(line):
            bad = "".join(sorted({c for c in line if not re.fullmatch(r"[A-Z0-9<]", c)}))
            raise MRZError(
                f"MRZ line {number} contains {bad!r}; only upper-case A-Z, digits and '<' are allowed: {line!r}."
            )
    return parts


def _digit_ok(field: str, digit: str, *, filler_allowed: bool = False) -> bool:
    if filler_allowed and field == "<" * len(field) and digit in "<0":
        return True
    return digit != "<" and check_digit(field) == digit


def parse_td3(lines: str | list[str] | tuple[str, ...]) -> dict:
    """Fields of a passport MRZ and the result of every check digit.

    ``lines`` is a list/tuple of the two lines or one string with a newline between them; whitespace
    around the lines is ignored. Returns a dict with ``document_type``, ``issuing_country``,
    ``surname``, ``given_names`` (spaces between names), ``document_number``, ``nationality``,
    ``birth_date`` and ``expiry_date`` (``YYMMDD``, as in the MRZ: the century is not encoded),
    ``sex`` (``"M"``, ``"F"`` or ``"X"``), ``optional_data``, ``checks`` (one bool per check digit:
    ``document_number``, ``birth_date``, ``expiry_date``, ``optional_data``, ``composite``),
    ``valid`` (all checks pass) and ``lines``. Raises :class:`MRZError` unless there are exactly
    two lines of 44 characters from ``A-Z0-9<``.

    >>> r = parse_td3("P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<\\n"
    ...               "L898902C36UTO7408122F1204159ZE184226B<<<<<10")
    >>> r["birth_date"], r["sex"], r["checks"]["composite"]
    ('740812', 'F', True)
    """
    line1, line2 = _split_lines(lines)

    surname, _, given = line1[5:].rstrip("<").partition("<<")
    number, optional = line2[0:9], line2[28:42]
    checks = {
        "document_number": _digit_ok(number, line2[9]),
        "birth_date": _digit_ok(line2[13:19], line2[19]),
        "expiry_date": _digit_ok(line2[21:27], line2[27]),
        "optional_data": _digit_ok(optional, line2[42], filler_allowed=True),
        "composite": _digit_ok(line2[0:10] + line2[13:20] + line2[21:43], line2[43]),
    }
    return {
        "document_type": line1[0:2].rstrip("<"),
        "issuing_country": line1[2:5].rstrip("<"),
        "surname": surname.replace("<", " ").strip(),
        "given_names": " ".join(given.replace("<", " ").split()),
        "document_number": number.rstrip("<"),
        "nationality": line2[10:13].rstrip("<"),
        "birth_date": line2[13:19],
        "sex": "X" if line2[20] == "<" else line2[20],
        "expiry_date": line2[21:27],
        "optional_data": optional.rstrip("<"),
        "checks": checks,
        "valid": all(checks.values()),
        "lines": [line1, line2],
    }


# --------------------------------------------------------------------------- checking a model answer

# Field of a model's JSON answer -> (key in parse_td3's result, kind of comparison).
_ALIASES = {
    "surname": ("surname", "name"),
    "last_name": ("surname", "name"),
    "family_name": ("surname", "name"),
    "given_names": ("given_names", "name"),
    "given_name": ("given_names", "name"),
    "first_names": ("given_names", "name"),
    "first_name": ("given_names", "name"),
    "passport_number": ("document_number", "code"),
    "document_number": ("document_number", "code"),
    "passport_no": ("document_number", "code"),
    "nationality": ("nationality", "code"),
    "issuing_country": ("issuing_country", "code"),
    "country_code": ("issuing_country", "code"),
    "date_of_birth": ("birth_date", "date"),
    "birth_date": ("birth_date", "date"),
    "dob": ("birth_date", "date"),
    "expiry_date": ("expiry_date", "date"),
    "date_of_expiry": ("expiry_date", "date"),
    "expiration_date": ("expiry_date", "date"),
    "sex": ("sex", "sex"),
    "gender": ("sex", "sex"),
}

_MONTHS = {
    m: i
    for i, names in enumerate(
        [("JAN", "JANUARY"), ("FEB", "FEBRUARY"), ("MAR", "MARCH"), ("APR", "APRIL"), ("MAY",),
         ("JUN", "JUNE"), ("JUL", "JULY"), ("AUG", "AUGUST"), ("SEP", "SEPT", "SEPTEMBER"),
         ("OCT", "OCTOBER"), ("NOV", "NOVEMBER"), ("DEC", "DECEMBER")],
        start=1,
    )
    for m in names
}


def _date_to_yymmdd(value: object) -> str | None:
    """``YYMMDD`` of a date written in one of the formats listed in :func:`check_fields`, else None."""
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    if re.fullmatch(r"\d{6}", text):  # YYMMDD, as in the MRZ
        y, m, d = text[0:2], int(text[2:4]), int(text[4:6])
    elif match := re.fullmatch(r"(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})", text):  # YYYY-MM-DD, YYYYMMDD
        y, m, d = match[1][2:], int(match[2]), int(match[3])
    elif match := re.fullmatch(r"(\d{1,2})[./-](\d{1,2})[./-](\d{4}|\d{2})", text):  # DD.MM.YYYY
        y, m, d = match[3][-2:], int(match[2]), int(match[1])
    elif match := re.fullmatch(r"(\d{1,2})[\s\-]*([A-Z]+)(?:/[A-Z]+)?\.?[\s\-]*(\d{4}|\d{2})", text):
        y, m, d = match[3][-2:], _MONTHS.get(match[2], 0), int(match[1])  # 12 AUG 1974, 12 AUG/AOUT 74
    elif match := re.fullmatch(r"([A-Z]+)\.?\s+(\d{1,2}),?\s+(\d{4})", text):  # August 12, 1974
        y, m, d = match[3][-2:], _MONTHS.get(match[1], 0), int(match[2])
    else:
        return None
    if not (1 <= m <= 12 and 1 <= d <= 31):
        return None
    return f"{y}{m:02d}{d:02d}"


def _normalise(value: object, kind: str) -> str | None:
    if value is None:
        return None
    if kind == "date":
        return _date_to_yymmdd(value)
    text = unicodedata.normalize("NFKD", str(value))
    text = "".join(c for c in text if not unicodedata.combining(c)).upper()
    if kind == "name":
        text = re.sub(r"['’.,]", "", text)
        return " ".join(re.sub(r"[<\-]", " ", text).split())
    if kind == "code":
        return re.sub(r"[\s<\-]", "", text)
    # sex
    text = text.strip()
    return {"MALE": "M", "FEMALE": "F", "<": "X", "UNSPECIFIED": "X"}.get(text, text[:1] if text else None)


def check_fields(extracted: dict, mrz: dict, fields: list[str] | None = None) -> dict:
    """Compare the fields a model extracted (e.g. parsed from its JSON answer) with the MRZ.

    ``mrz`` is the result of :func:`parse_td3`. Returns ``{field: {"match": bool, "extracted":
    value, "mrz": value}}`` for every field of ``extracted`` this function knows (other keys are
    ignored), or for exactly the names in ``fields`` if given (a field the model left out then
    counts as a mismatch).

    Known fields (and aliases): ``surname`` (``last_name``, ``family_name``), ``given_names``
    (``given_name``, ``first_name(s)``), ``passport_number`` (``document_number``, ``passport_no``),
    ``nationality``, ``issuing_country`` (``country_code``), ``date_of_birth`` (``birth_date``,
    ``dob``), ``expiry_date`` (``date_of_expiry``, ``expiration_date``), ``sex`` (``gender``).

    Names are compared ignoring case, accents, apostrophes and the difference between spaces,
    hyphens and ``<``. Codes ignore case, spaces and ``<``. Sex accepts ``M``/``F``/``X`` and
    ``male``/``female``. Dates are compared on ``YYMMDD`` (the MRZ does not encode the century) and
    may be written ``YYYY-MM-DD`` (also with ``/`` or ``.``, or ``YYYYMMDD``), ``DD.MM.YYYY`` or
    ``DD/MM/YYYY`` (day first, as printed on passports; 2-digit years accepted), ``12 AUG 1974``,
    ``12 AUG/AOUT 74``, ``August 12, 1974`` or ``YYMMDD``; any other form does not match.

    >>> mrz = parse_td3(["P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<",
    ...                  "L898902C36UTO7408122F1204159ZE184226B<<<<<10"])
    >>> result = check_fields({"surname": "ERIKSON", "sex": "female"}, mrz)
    >>> result["surname"]
    {'match': False, 'extracted': 'ERIKSON', 'mrz': 'ERIKSSON'}
    >>> result["sex"]["match"]
    True
    """
    if not isinstance(extracted, dict):
        raise MRZError(f"check_fields expects the extracted fields as a dict, got {type(extracted).__name__}.")
    if not isinstance(mrz, dict) or "checks" not in mrz:
        raise MRZError("check_fields expects `mrz` to be the dict returned by parse_td3.")
    names = list(fields) if fields is not None else [k for k in extracted if k in _ALIASES]
    unknown = [name for name in names if name not in _ALIASES]
    if unknown:
        raise MRZError(f"check_fields does not know the field(s) {unknown}; known fields: {sorted(_ALIASES)}.")

    report = {}
    for name in names:
        key, kind = _ALIASES[name]
        got = extracted.get(name)
        want = mrz[key]
        got_norm = _normalise(got, kind)
        want_norm = _normalise(want, kind)
        report[name] = {"match": got_norm is not None and got_norm == want_norm, "extracted": got, "mrz": want}
    return report
