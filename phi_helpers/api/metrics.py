"""Scores for model answers against labels.

Two metrics, both small enough to read in a minute:

* **Character error rate (CER)** for transcriptions: the Levenshtein distance between the answer
  and the expected text (the fewest single-character insertions, deletions and substitutions that
  turn one into the other) divided by the length of the expected text. 0 is perfect; it can go
  above 1 when the answer is much longer than the reference. Runs of whitespace count as one space
  (line breaks are a matter of layout, not of reading). An empty reference (nothing to read) has
  no length to divide by: its CER is 0 for an empty answer and 1 for any other (all of it is wrong).
  Over a set of items, CER is all edits / all reference characters, with the same rule when every
  reference is empty (``error_rate``).
* **Per-field exact match** for JSON extraction: each top-level field of the expected object is
  right or wrong. Strings are compared ignoring case and extra whitespace, numbers by value
  (``40.4`` equals ``40.40``, but the string ``"40.4"`` does not equal the number), lists element
  by element in order, and objects key by key with the same rules. A missing field, or an answer
  that is no JSON object, counts as wrong. Reported per field and overall.

  Only the top level is scored field by field: keys of the answer that the expected object does not
  name are ignored there. Below it, a value must equal the expected value as a whole: a nested object
  (``"address": {"city": ...}``) is right only with exactly the expected keys, so a key missing from
  it or one too many makes the whole field wrong, as does one wrong element of a list. Where the
  schema lists an object's ``properties`` without ``additionalProperties``, constrained decoding
  writes no other key and eval refuses an expected answer with one; an extra nested key is then a
  declared property that the expected answer leaves out: write into ``expected`` every property
  that the document shows.

Both compare text by its characters after Unicode canonical normalisation (NFC, ``normalise_text``):
``"é"`` typed as one code point (U+00E9) or as ``e`` and a combining accent (U+0301) is the same
character, as it is on the page. Compatibility forms are not folded (no NFKC): a full-width
``"１"`` is not ``"1"`` and the ligature ``"ﬁ"`` is not ``"fi"`` in a CER, as they are different
characters on the page. (Field matching ignores case with ``str.casefold``, which also turns ``"ß"``
into ``"ss"`` and the ligature ``"ﬁ"`` into ``"fi"``; a full-width digit stays as it is.)

    from phi_helpers.api.metrics import character_error_rate, field_matches
    character_error_rate("sitting", "kitten")   # 3 edits / 6 characters = 0.5
    field_matches({"total": 40.4, "merchant": "ACME "}, {"total": 40.40, "merchant": "acme"})
    # {'total': True, 'merchant': True}
"""

import unicodedata

from rapidfuzz.distance import Levenshtein


def levenshtein(a: str, b: str) -> int:
    """The edit distance between ``a`` and ``b`` (insertions, deletions, substitutions; each costs 1).

    Computed by rapidfuzz (``rapidfuzz.distance.Levenshtein``), a maintained C++ implementation of the
    classic dynamic programme: fast enough for whole pages of text.
    """
    return Levenshtein.distance(a, b)


def normalise_text(text: str) -> str:
    """Canonical Unicode form (NFC: an accent typed as a combining character joins its letter), then
    every run of whitespace (spaces, tabs, line breaks) as one space and the ends stripped. ``None``
    (no answer) is the empty text. Compatibility forms stay distinct (no NFKC): a full-width ``"１"``
    or the ligature ``"ﬁ"`` is a different character on the page from ``"1"`` or ``"fi"``."""
    text = "" if text is None else str(text)
    return " ".join(unicodedata.normalize("NFC", text).split())


def character_error_rate(hypothesis: str, reference: str) -> float:
    """Levenshtein distance / reference length, after ``normalise_text`` on both (``error_rate``).

    An empty reference gives 0.0 for an empty answer and 1.0 for any other answer.
    """
    hypothesis, reference = normalise_text(hypothesis), normalise_text(reference)
    return error_rate(levenshtein(hypothesis, reference), len(reference))


def error_rate(edits: int, reference_chars: int) -> float:
    """``edits / reference_chars``: the CER of one item or, with the sums, of a whole set.

    With no reference characters there is nothing to divide by: 0.0 without edits (an empty answer to
    an empty reference is right), 1.0 with any (whatever was answered is wrong).
    """
    if not reference_chars:
        return 1.0 if edits else 0.0
    return edits / reference_chars


def normalise_value(value):
    """A JSON value made comparable: strings case- and whitespace-insensitive (and NFC), numbers by value."""
    if isinstance(value, str):
        return normalise_text(value.casefold())  # casefold first: it may take a letter apart ("ǰ"), NFC joins it again
    if isinstance(value, bool):
        return ("boolean", value)  # in Python True == 1: keep true and 1 apart
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return value  # 12.5 == 12.50 == 12.500; nothing rounded: 4e-7 is not 1e-7, nor ...567 ...568
    if isinstance(value, list):
        return [normalise_value(element) for element in value]
    if isinstance(value, dict):
        return {key: normalise_value(element) for key, element in value.items()}
    return value


def field_matches(answer, expected: dict) -> dict[str, bool]:
    """For each top-level field of ``expected``: does ``answer`` have the same value (normalised)?

    ``answer`` may be anything the model produced; if it is not a JSON object every field is wrong.
    """
    if not isinstance(answer, dict):
        return {field: False for field in expected}
    return {
        field: field in answer and normalise_value(answer[field]) == normalise_value(value)
        for field, value in expected.items()
    }
