"""Constrained decoding: the model can only write JSON that follows your JSON Schema.

    from phi_helpers import extract
    data = extract(model, processor, "Extract the passport fields.", schema, images=[passport])

Asked nicely for JSON, a model usually writes it, but nothing forces it to: a cut-off answer, a
comment before the JSON, a missing field or a wrong type are all possible. Constrained decoding
removes that possibility. Before each new token, the JSON Schema, compiled into a grammar, says
which tokens may come next; every other token gets the score ``-inf`` (the *token mask*), so it
cannot be chosen, greedy or sampled. The answer therefore always parses and validates, unless it is
cut off by ``max_new_tokens`` (then ``JSONTruncatedError``, which keeps the partial text).

The grammar engine is xgrammar (the one vLLM and SGLang use): it compiles a typical extraction schema in
tens of milliseconds (once: compiled grammars are kept), and its mask costs well under a millisecond per token
on a CPU, except while a string with a long length bound is written (docs/structured-output.md has the
numbers). Answers are compact JSON (no spaces) with the properties in the schema's order.

The JSON Schema subset that is enforced (anything else is refused before generating, with
``SchemaNotSupportedError``):

* the root is an object (``"type": "object"``), because ``extract`` returns a dict;
* ``type`` (one or a list), ``properties``, ``required`` (names that ``properties`` defines),
  ``additionalProperties`` (true, false or a schema; when absent, no extra properties are written),
  ``items`` (one schema for every item), ``prefixItems`` (a tuple: ``minItems`` and ``maxItems`` both its
  length, no ``items``), ``minItems``, ``maxItems``, ``enum``, ``const``, ``anyOf``, ``oneOf`` where it
  means ``anyOf`` (objects that each require one property with a ``const`` or ``enum`` of their own, as
  Pydantic's discriminated unions: ``_exclusive_branches``), ``pattern`` (regular expressions without look-arounds or
  back-references, matched anywhere in the value as JSON Schema says, and naming no control character,
  quote or backslash on its own, which the grammar would write unescaped; a class with other characters
  beside one, ``[\\t ]``, is fine: the grammar leaves it out), ``minLength`` and ``maxLength`` (not next to a
  ``pattern`` or ``format``), ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (an integer's
  within the signed 64-bit range, a number's exact as a 64-bit float), the formats of ``FORMAT_PATTERNS``
  (``date``: real calendar dates, leap years included; ``date-time``, ``time``, ``uuid``, ``ipv4``, ``email``;
  no other ``pattern`` next to them), and ``$ref``
  to ``#/$defs/...`` or ``#/definitions/...`` (a definition no ``$ref`` reaches is not checked);
* numbers are written as plain decimals, at most ``NUMBER_FRACTION_DIGITS`` (6) digits after the point and
  no exponent (xgrammar's way of bounding them), within their bounds and within ``UNBOUNDED_NUMBER_LIMIT``
  (10**18) of zero (integers: where they have no bound), so that every number reads back as a finite float;
* annotations are allowed and ignored: ``$schema``, ``$id``, ``$anchor``, ``$comment``, ``title``,
  ``description``, ``default``, ``examples``, ``readOnly``, ``writeOnly``, ``deprecated``,
  ``contentMediaType``, ``contentEncoding``, ``contentSchema``, the formats no validator checks
  (``ANNOTATION_FORMATS``: Pydantic's ``password``, ``path``, ``binary``), and vendor extensions
  (``x-order``...: name annotations of your own so).

The refusal says what to write instead where there is a common fix: ``anyOf`` for ``oneOf``, a
``pattern`` for other formats, a check after extraction for ``uniqueItems``, the closest keyword for a
typo (``maxlength``).

Also refused: a schema that contradicts itself (``minimum`` above ``maximum``, an empty ``enum``, an
``enum`` value of another ``type``, a ``required`` property that may not be written...: every answer
would fail the schema's own check), and one larger than ``MAX_SCHEMA_CHARS`` (its grammar would take
minutes to compile). Both are found in milliseconds, without compiling anything.

What the mask cannot do: make the values right. A passport number that follows the pattern can
still be misread; check values against the document (notebook 02b, the MRZ check digits).
"""

import difflib
import importlib.util
import json
import math
import re
import weakref
from dataclasses import dataclass
from fractions import Fraction
from urllib.parse import unquote

import torch
import xgrammar
from transformers import LogitsProcessor

from ..errors import InvalidArgumentError, JSONExtractionError, JSONTruncatedError, SchemaNotSupportedError
from .structured import VENDOR_PREFIX, check_schema, schema_validator, validation_errors

# Annotations: they change no valid answer, so they are ignored and left out of the grammar, as are vendor
# extensions (VENDOR_PREFIX). The content keywords are annotations too: JSON Schema 2020-12 says a validator
# MUST NOT decode or check the string's content.
DESCRIPTIVE = frozenset({
    "title", "description", "$comment", "default", "examples", "readOnly", "writeOnly", "deprecated", "$anchor",
    "contentMediaType", "contentEncoding", "contentSchema",
    "example", "xml", "externalDocs", "discriminator",  # OpenAPI's annotations
})
ANNOTATIONS = DESCRIPTIVE | {"$schema", "$id", "$defs", "definitions"}
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "enum",
    "const", "anyOf", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "format", "$ref",
})
# The other keywords of JSON Schema (drafts 3 to 2020-12): refused, with KEYWORD_ADVICE or KEYWORD_DEFAULT_ADVICE
# ("oneOf" is accepted where it means "anyOf", see _exclusive_branches). A keyword in none of these sets is a typo
# or an annotation of one's own, which is told so (see _keyword_advice).
OTHER_KEYWORDS = frozenset({
    "oneOf", "allOf", "not", "if", "then", "else", "multipleOf", "uniqueItems", "contains", "minContains", "maxContains",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedItems", "unevaluatedProperties", "additionalItems", "$dynamicRef", "$dynamicAnchor",
    "$recursiveRef", "$recursiveAnchor", "$vocabulary", "id", "divisibleBy", "disallow", "extends",
})
BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
TYPED_KEYWORDS = {  # keyword -> the type it constrains (it needs that "type" next to it)
    **dict.fromkeys(BOUND_KEYWORDS, "number"),
    **dict.fromkeys(("pattern", "minLength", "maxLength", "format"), "string"),
    **dict.fromkeys(("items", "prefixItems", "minItems", "maxItems"), "array"),
    **dict.fromkeys(("properties", "required", "additionalProperties"), "object"),
}
# What to write instead of an unsupported keyword or format (no semicolons: the problems are listed with them).
KEYWORD_ADVICE = {
    "oneOf": 'use "anyOf" instead: the model writes one branch either way (a "oneOf" of a schema and '
             '{"type": "null"} is exactly "anyOf" here), unless every branch is an object that requires the same '
             'property with a "const" (or "enum") of its own (a Pydantic discriminated union), which is accepted',
    "uniqueItems": "remove it and check for repeated items after extraction (the grammar does not remember items)",
    "nullable": 'OpenAPI\'s nullable is written in JSON Schema as a type list with "null", e.g. "type": ["string", "null"]',
    "allOf": 'merge its parts into one schema (pydantic v1\'s "allOf": [{"$ref": ...}] is the "$ref" alone)',
    "additionalItems": 'it goes with tuple "items", which are not supported: give one schema in "items"',
    "dependencies": "remove it and check the dependency after extraction",
    "id": "draft-04's identifier of the schema: remove it (or write \"$id\")",
    # Pydantic writes its bounds under their own names where it cannot put them into a type (next to a Union's anyOf)
    **{name: f'Pydantic\'s {name}= ("{keyword}"), left next to a Union: bound each type of the Union instead '
             f'(Union[Annotated[int, Field({name}=...)], ...]), or for Union[int, float] write float'
       for name, keyword in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum"))},
}
KEYWORD_DEFAULT_ADVICE = "remove it and check the value after extraction"  # multipleOf, not, if/then/else...
# OpenAPI's formats of numbers: annotations (a JSON Schema validator checks formats of strings only).
NUMBER_FORMATS = ("int32", "int64", "float", "double")
# Formats that jsonschema checks in no draft, so they change no valid answer: annotations (Pydantic writes them
# for SecretStr, Path and bytes).
ANNOTATION_FORMATS = ("password", "path", "binary")
FORMAT_ADVICE = 'use "type": "string" with a "pattern"'
# The integer bounds xgrammar enforces: it stores them as signed 64-bit integers (and refuses any other).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BOUND_ADVICE = "drop the bound (and check the value after extraction if it matters)"
# How xgrammar writes a number that has a bound: a plain decimal (no exponent) with at most this many digits
# after the point, e.g. 0.000001 is the smallest above 0. Its number without a bound has any exponent and any
# count of digits (1e999 and a 400-digit number read as infinity; Python refuses to read an integer of more
# than 4,300 digits), so every number and integer gets bounds for the grammar (_grammar_range): a side without
# one gets UNBOUNDED_NUMBER_LIMIT from zero, and a number's bounds are cut to it (xgrammar's bounded numbers
# lose digits past 2**63). Larger than any amount in a document, exact as a float, and cheap to compile: a
# round bound takes a quarter of the time of 2**63's 19 digits (0.5 ms per number; the largest float, 40 ms).
NUMBER_FRACTION_DIGITS = 6
UNBOUNDED_NUMBER_LIMIT = 10**18

# The largest schema that is compiled into a grammar, in characters of compact JSON (descriptions and other
# annotations not counted). xgrammar's compile time grows faster than the schema and ignores Ctrl-C; measured
# on 2 CPU cores with the Phi-3 tokenizer, an enum of 10-letter strings takes 0.1 s for 1,000 values (12 kB),
# 1.8 s for 8,000 (130 kB), 29 s for 32,000 (520 kB), minutes for 50,000. At this bound an enum of any string
# length compiles in under a second, and the slowest shape found (1,900 optional properties) in 7 s. Real
# documents stay far below it: the world's countries or currencies are a few hundred values, under 5 kB.
MAX_SCHEMA_CHARS = 50_000
# The largest {m,n} count in a pattern: "[A-Z]{1,N}" compiles in 3.7 s at N = 10,000, 18 s at 20,000 and
# 129 s at 50,000 (same measure).
MAX_PATTERN_REPEAT = 10_000

# format "date": a real calendar date YYYY-MM-DD (years 0001-9999, 29 February only in leap years).
# xgrammar's own "date" rule allows e.g. 2023-11-31, which a JSON Schema validator rejects.
_YEAR = r"([1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(\d{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = r"((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"
_DATE = rf"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
DATE_PATTERN = rf"^{_DATE}$"
# The only patterns allowed next to format "date": a date's shape (YYYY-MM-DD), which every calendar date matches.
# The grammar writes DATE_PATTERN for such a string, so any other pattern would be left unenforced.
_DIGIT = r"(?:\\d|\[0-9\])"
_DATE_SHAPE = re.compile(rf"\^?{_DIGIT}\{{4\}}-{_DIGIT}\{{2\}}-{_DIGIT}\{{2\}}\$?")
# format "time" (and the time of "date-time"): RFC 3339's full-time, as jsonschema checks it (rfc3339_validator):
# 23:59:59 at most (no leap second), a fraction of up to 6 digits (a microsecond, what Python's datetime holds),
# and "Z" or an offset; T and Z in capitals (jsonschema also takes small ones).
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0 to 255 without leading zeros, as Python's ipaddress reads it
_LABEL = r"[A-Za-z0-9]+(-+[A-Za-z0-9]+)*"  # a domain name's label: no hyphen first or last
# format -> the pattern the grammar writes for it: only strings that jsonschema's check of the format accepts
# (answers must validate), often fewer ("email": jsonschema only asks for an "@"). Where the check is not
# installed (date-time and time need rfc3339-validator) or the draft has none, any string passes it.
FORMAT_PATTERNS = {
    "date": DATE_PATTERN,
    "date-time": rf"^{_DATE}T{_TIME}$",
    "time": rf"^{_TIME}$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "ipv4": rf"^({_OCTET}\.){{3}}{_OCTET}$",
    "email": rf"^[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@({_LABEL}\.)+[A-Za-z]{{2,63}}$",
}
# The format checks the patterns are written for: JSON Schema 2020-12's. A draft that checks a format otherwise
# (draft-03's "time" is HH:MM:SS without an offset) is refused (see _format_checked_otherwise).
def _format_checks() -> dict:
    import jsonschema  # here, not at the top: importing it costs a second or more (its format checkers' grammars)

    return jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers

# The advice of every refusal: how to get an answer without the grammar.
UNCONSTRAINED_PATH = ("the unconstrained path (the command line's --no-constrain, in Python ask() without a schema or "
                      "predict_dataset(..., constrain=False))")

# JSON text written by the model: no spaces, properties in the schema's order (short, stable answers).
SEPARATORS = (",", ":")

_NAMED_SUBSCHEMAS = ("properties", "$defs", "definitions")  # name -> subschema
_ORDERED = (("minLength", "maxLength", "string"), ("minItems", "maxItems", "array"))  # (lower, upper, what)


def check_supported(schema) -> None:
    """Raise ``SchemaNotSupportedError`` (listing every problem) unless constrained decoding enforces all of
    ``schema`` and some answer satisfies it. A schema larger than ``MAX_SCHEMA_CHARS`` is refused first,
    in milliseconds, before anything is compiled; the last check builds the grammar (``json_grammar``,
    no tokenizer needed), so that nothing is left to fail once a model is loaded. A schema that passed
    is not checked again (its JSON text is remembered): a long ``maxLength`` takes seconds to build."""
    _supported_grammar(schema)


def _supported_grammar(schema) -> xgrammar.Grammar:
    """The grammar of ``schema`` (``json_grammar``) once ``_check_supported`` has passed it, remembered."""
    return _remembered(_SUPPORTED, _schema_text(schema), lambda: _check_supported(schema))


SCHEMAS_REMEMBERED = 64  # checked schemas, and compiled grammars per tokenizer, kept for the next call
_SUPPORTED: dict[str, xgrammar.Grammar] = {}  # schema text -> the grammar of a schema that passed, oldest first


def _schema_text(schema) -> str | None:
    """``schema`` as JSON text in its own key order (the order of properties is the order of the answer),
    or None if it is not JSON (``check_schema`` then says why)."""
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _remembered(cache: dict, key: str | None, make):
    """``make()``, kept in ``cache`` under ``key`` for the next call (the oldest dropped beyond
    ``SCHEMAS_REMEMBERED``); made afresh each time when ``key`` is None. An exception is not kept."""
    if key is None:
        return make()
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        for oldest in list(cache)[: max(0, len(cache) - SCHEMAS_REMEMBERED)]:  # threads may drop the same one
            cache.pop(oldest, None)
    return value


def _check_supported(schema) -> xgrammar.Grammar:
    try:
        check_schema(schema)
    except ValueError as error:
        raise SchemaNotSupportedError(str(error)) from None
    schema = _without_unused_definitions(_one_of_as_any_of(schema, schema))
    _check_size(schema)
    problems, contradictions = [], []
    if schema.get("type") != "object":
        problems.append('(root): the root must be "type": "object" (extract returns a dict)')
    validator = schema_validator(schema)
    for where, node in _walk(schema, "(root)"):
        problems += _unsupported(node, where) + _format_checked_otherwise(node, where, validator)
        contradictions += _contradictions(node, where, validator) if isinstance(node, dict) else []
    messages = []
    if problems:
        messages.append(
            "This JSON Schema uses features that constrained decoding cannot enforce: " + "; ".join(problems)
            + f". Otherwise, use {UNCONSTRAINED_PATH}. Supported: see help(phi_helpers.api.constrained)."
        )
    if contradictions:
        messages.append(
            "This JSON Schema contradicts itself, so answers would fail its own check: " + "; ".join(contradictions) + "."
        )
    if messages:
        raise SchemaNotSupportedError(" ".join(messages))
    return json_grammar(schema)  # anything else xgrammar cannot build, found before a model is loaded


def _without_unused_definitions(schema: dict) -> dict:
    """``schema`` keeping only the ``$defs`` (or ``definitions``) that some ``$ref`` reaches from its root:
    the others change no answer, so what they hold is neither checked nor compiled (a library of
    definitions shared between schemas may hold some that constrained decoding does not support)."""
    libraries = {key: schema[key] for key in ("$defs", "definitions") if isinstance(schema.get(key), dict)}
    used = {key: {} for key in libraries}
    todo = [{key: value for key, value in schema.items() if key not in libraries}]
    while todo:
        for _where, node in _walk(todo.pop(), ""):
            found = _definition_name(node.get("$ref")) if isinstance(node, dict) else None
            if found is None:
                continue
            key, name = found
            if name not in libraries.get(key, {}):
                return schema  # not found here (check_schema resolved it): keep every definition, check them all
            if name not in used[key]:
                used[key][name] = libraries[key][name]
                todo.append(used[key][name])
    return {key: used.get(key, value) for key, value in schema.items()}


def _definition_name(reference) -> tuple[str, str] | None:
    """``("$defs", NAME)`` or ``("definitions", NAME)`` for a ``$ref`` to ``#/$defs/NAME`` or ``#/definitions/NAME``
    (the escapes of a JSON pointer undone), or None for any other reference."""
    found = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", reference) if isinstance(reference, str) else None
    return None if found is None else (found[1], unquote(found[2]).replace("~1", "/").replace("~0", "~"))


def _resolved(subschema, schema: dict):
    """``subschema``, or where its ``$ref`` leads in ``schema`` (followed to the end: ``check_schema`` refused
    cycles); None where a ``$ref`` does not name one of ``schema``'s definitions."""
    while isinstance(subschema, dict) and "$ref" in subschema:
        found = _definition_name(subschema["$ref"])
        subschema = None if found is None else schema.get(found[0], {}).get(found[1])
    return subschema


def _one_of_as_any_of(subschema, schema: dict):
    """A copy of ``subschema`` (a part of ``schema``) where every ``oneOf`` whose branches exclude each other
    (``_exclusive_branches``) is an ``anyOf``: it allows exactly the same values, and the grammar enforces
    ``anyOf``. Any other ``oneOf`` is kept, and refused."""
    if not isinstance(subschema, dict):
        return subschema
    copy = _with_subschemas(subschema, lambda sub: _one_of_as_any_of(sub, schema))
    if "anyOf" in copy or not isinstance(copy.get("oneOf"), list) or not _exclusive_branches(copy["oneOf"], schema):
        return copy
    return {("anyOf" if key == "oneOf" else key): value for key, value in copy.items()}


def _exclusive_branches(branches: list, schema: dict) -> bool:
    """Whether no value can match two of ``branches``: each (its ``$ref`` followed in ``schema``) is an object that
    requires the same property, and the values each allows there (its ``const`` or ``enum``) are allowed by no
    other, as in Pydantic's discriminated unions (``Union[Card, Cash] = Field(discriminator="kind")``). A
    ``oneOf`` of such branches is exactly an ``anyOf``: a value that matches one branch matches no other."""
    tags = [_tags(_resolved(branch, schema), schema) for branch in branches]
    for name in set.intersection(*(set(tag) for tag in tags)):
        # Python's == is the looser equality (True == 1 == 1.0, which JSON Schema tells apart from True), so
        # values that differ here differ for the validator too
        if all(first != second for index, values in enumerate(tags) for other in tags[index + 1 :]
               for first in values[name] for second in other[name]):
            return True
    return False


def _tags(branch, schema: dict) -> dict:
    """``{name: the values allowed}`` for each property that the object schema ``branch`` requires and limits to a
    ``const`` or an ``enum``; empty unless ``branch`` allows objects alone."""
    if not isinstance(branch, dict) or _types(branch) != ["object"] or not isinstance(branch.get("required"), list):
        return {}
    tags = {}
    for name in branch["required"]:
        value = _resolved(branch.get("properties", {}).get(name), schema)
        if isinstance(value, dict) and "const" in value:
            tags[name] = [value["const"]]
        elif isinstance(value, dict) and isinstance(value.get("enum"), list):
            tags[name] = value["enum"]
    return tags


def _check_size(schema: dict) -> None:
    """Refuse ``schema`` when its grammar is larger than ``MAX_SCHEMA_CHARS`` (its compile would take minutes)."""
    size = len(json.dumps(_grammar_schema(schema), separators=SEPARATORS, ensure_ascii=False))
    if size <= MAX_SCHEMA_CHARS:
        return
    enums = [(len(node["enum"]), where) for where, node in _walk(schema, "(root)") if isinstance(node, dict) and "enum" in node]
    count, where = max(enums, default=(0, ""))
    largest = f" Its largest enum, at {where}, has {count:,} values." if enums else ""
    raise SchemaNotSupportedError(
        f"This JSON Schema is too large for constrained decoding: {size:,} characters of JSON (descriptions and "
        f"other annotations not counted), more than MAX_SCHEMA_CHARS = {MAX_SCHEMA_CHARS:,}: compiling it would take "
        f"minutes and could not be interrupted.{largest} Make it smaller: for a long list of allowed values, use "
        f'"type": "string" and check the value after extraction; or use {UNCONSTRAINED_PATH}.'
    )


def _walk(schema, where: str):
    """Every subschema that constrained decoding uses, ``schema`` first, each with its place
    (``(root)/properties/total``)."""
    yield where, schema
    if isinstance(schema, dict):
        for path, sub in _subschemas(schema):
            yield from _walk(sub, f"{where}/{path}")


def _subschemas(schema: dict):
    """The subschemas directly inside ``schema``, each with its path from ``schema`` (``properties/total``)."""
    for key in _NAMED_SUBSCHEMAS:
        for name, sub in schema.get(key, {}).items():
            yield f"{key}/{name}", sub
    if isinstance(schema.get("additionalProperties"), dict):
        yield "additionalProperties", schema["additionalProperties"]
    if "items" in schema:
        yield "items", schema["items"]
    for key in ("prefixItems", "anyOf"):  # lists of schemas (a draft that does not know the keyword allows any value)
        for index, sub in enumerate(schema[key] if isinstance(schema.get(key), list) else []):
            yield f"{key}/{index}", sub


def _with_subschemas(schema: dict, change) -> dict:
    """A copy of ``schema`` whose subschemas (those of ``_subschemas``) are ``change(subschema)``; the rest (names,
    ``enum`` and ``const`` data) is kept as it is."""
    copy = dict(schema)
    for key in _NAMED_SUBSCHEMAS:
        if isinstance(copy.get(key), dict):
            copy[key] = {name: change(sub) for name, sub in copy[key].items()}
    for key in ("additionalProperties", "items"):
        if key in copy:
            copy[key] = change(copy[key])
    for key in ("prefixItems", "anyOf", "oneOf"):
        if isinstance(copy.get(key), list):
            copy[key] = [change(sub) for sub in copy[key]]
    return copy


def _untyped(schema: dict, where: str) -> list[str]:
    """Keywords of one kind of value (numbers, strings, arrays, objects) in a subschema with no ``type``:
    xgrammar then lets any JSON value through and ignores them."""
    if "type" in schema or {"enum", "const", "$ref", "anyOf"} & schema.keys():
        return []
    return [f'{where}: {keyword} without "type" (add "type": "{kind}": without it the grammar ignores {keyword})'
            for keyword, kind in TYPED_KEYWORDS.items() if keyword in schema]


def _beside_ref_or_any_of(schema: dict, where: str) -> list[str]:
    """Keywords next to ``$ref`` or ``anyOf``: the grammar follows the reference (or the branches) alone,
    so they would be ignored while writing and then checked, failing every answer. (Keywords that are not
    supported are named on their own, see ``_unsupported``.)"""
    for keyword, advice in (("$ref", "move them into the schema it names"), ("anyOf", "repeat them inside each branch")):
        if keyword in schema:
            others = sorted(key for key in schema if key != keyword and key in SUPPORTED_KEYWORDS)
            if others:
                return [f"{where}: {', '.join(others)} next to {keyword} (the grammar follows the {keyword} alone: {advice})"]
    return []


def _unsupported(schema, where: str) -> list[str]:
    """A message for every keyword, format or $ref of one subschema that is not supported."""
    if isinstance(schema, list):
        return [f"{where}: tuple items, a list of schemas, are not supported (give one schema that every item follows)"]
    if not isinstance(schema, dict):
        return [f"{where}: a boolean schema ({json.dumps(schema)}) is only supported as additionalProperties"]
    problems = _untyped(schema, where) + _beside_ref_or_any_of(schema, where)
    if "array" in _types(schema) and not {"items", "prefixItems", "enum", "const"} & schema.keys():
        problems.append(f'{where}: an array without "items" (give "items": one schema that every item follows; '
                        "without it the grammar allows only [])")
    if "prefixItems" in schema and not isinstance(schema["prefixItems"], list):
        problems.append(f"{where}: prefixItems {json.dumps(schema['prefixItems'])[:80]} (give a list of schemas, one per "
                        "position of the tuple)")
    elif "prefixItems" in schema and not _fixed_tuple(schema):
        problems.append(f'{where}: prefixItems without a fixed length (a tuple needs "minItems" and "maxItems" both '
                        f'{len(schema["prefixItems"])}, its number of prefixItems, and no "items", as Pydantic writes '
                        'tuple[float, float], or else one schema in "items" that every item follows)')
    if "required" in schema and not isinstance(schema["required"], list):
        problems.append(f"{where}: \"required\": {json.dumps(schema['required'])} (draft-03's form: list the names in "
                        '"required" of the object that holds the properties)')
    unknown = sorted(key for key in set(schema) - SUPPORTED_KEYWORDS - ANNOTATIONS if not _descriptive(key))
    problems += [f"{where}: {keyword!r}: {_keyword_advice(keyword)}" for keyword in unknown]
    format_ = schema.get("format")
    if "format" in schema and format_ not in FORMAT_PATTERNS and not _annotation_format(schema):
        problems.append(f"{where}: format {format_!r} (only {', '.join(FORMAT_PATTERNS)}): {FORMAT_ADVICE}")
    if format_ in FORMAT_PATTERNS and "pattern" in schema and not _fits_format(schema["pattern"], format_):
        problems.append(f"{where}: a pattern next to format {format_!r} ({schema['pattern']!r}): the grammar writes "
                        f"the format's own pattern and cannot enforce another pattern as well, so keep one of them "
                        f"(format {format_!r}, or the pattern alone) and check the other after extraction")
    lengths = "minLength" in schema or "maxLength" in schema
    if "pattern" in schema and lengths:
        problems.append(f"{where}: minLength/maxLength next to a pattern (put the length into the pattern)")
    if format_ in FORMAT_PATTERNS and lengths:
        problems.append(f"{where}: minLength/maxLength next to format {format_!r} (the grammar writes the format's own "
                        "pattern in their place: remove them, and check the length after extraction if it matters)")
    if "pattern" in schema:
        problems += _pattern_problems(schema["pattern"], where)
    ref = schema.get("$ref")
    if ref is not None and not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", str(ref)):
        problems.append(f"{where}: $ref {ref!r} (only '#/$defs/NAME' or '#/definitions/NAME')")
    for keyword in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(schema.get(keyword), bool):
            problems.append(f"{where}: {keyword} true/false (draft-04; give the bound itself: \"{keyword}\": 0)")
    if schema.get("additionalProperties", False) is not False:
        problems += [f"{where}: required {name!r} that is not in properties (add it to properties)" for name in _unlisted(schema)]
    problems += [f"{where}: {problem}" for problem in _unwritable_data(schema)]
    problems += [f"{where}/{key}: the name {json.dumps(name)} holds a lone surrogate, which is not a character (UTF-8 "
                 "cannot hold it): rename it"
                 for key in _NAMED_SUBSCHEMAS for name in schema.get(key, {}) if _lone_surrogate(name)]
    return problems + [f"{where}: {problem}" for problem in _bound_problems(schema)]


def _fits_format(pattern: str, format_: str) -> bool:
    """Whether ``pattern`` (next to ``format_``) is one that the format's own pattern enforces too: that pattern,
    or for "date" a date's shape, ``^\\d{4}-\\d{2}-\\d{2}$`` or the like, which every calendar date matches."""
    return pattern == FORMAT_PATTERNS[format_] or (format_ == "date" and _DATE_SHAPE.fullmatch(pattern) is not None)


def _fixed_tuple(schema: dict) -> bool:
    """Whether the ``prefixItems`` of ``schema`` are the whole array (a tuple): ``minItems`` and ``maxItems`` both
    their number and no ``items``, which xgrammar enforces exactly. (With ``items`` next to them, drafts before
    2020-12 would check every item against ``items``; with fewer ``minItems``, a tuple may end early.)"""
    count = len(schema["prefixItems"])
    return "items" not in schema and schema.get("minItems") == count and schema.get("maxItems") == count


def _format_checked_otherwise(schema, where: str, validator) -> list[str]:
    """A format of ``FORMAT_PATTERNS`` in ``schema`` that the schema's draft (its ``validator``) checks otherwise than
    JSON Schema 2020-12, for which the patterns are written: draft-03's "time", HH:MM:SS without an offset."""
    format_ = schema.get("format") if isinstance(schema, dict) else None
    checker = validator.format_checker.checkers.get(format_)
    if format_ not in FORMAT_PATTERNS or checker in (None, _format_checks().get(format_)):
        return []
    return [f"{where}: format {format_!r}, which this schema's draft checks otherwise than JSON Schema 2020-12, whose "
            f"form the grammar writes: {FORMAT_ADVICE}"]


def _keyword_advice(keyword: str) -> str:
    """What to do about ``keyword``, which constrained decoding does not support: ``KEYWORD_ADVICE``, else for a
    keyword of JSON Schema ``KEYWORD_DEFAULT_ADVICE``, else that it is none (a typo, with the closest keyword, or
    an annotation of one's own, which is accepted as ``x-...``)."""
    if keyword in KEYWORD_ADVICE:
        return KEYWORD_ADVICE[keyword]
    if keyword in OTHER_KEYWORDS:
        return KEYWORD_DEFAULT_ADVICE
    known = {name.lower(): name for name in sorted(SUPPORTED_KEYWORDS | ANNOTATIONS | OTHER_KEYWORDS)}
    close = difflib.get_close_matches(keyword.lower(), known, n=1, cutoff=0.8)
    guess, fix = (f' (did you mean "{known[close[0]]}"?)', "correct it") if close else ("", "remove it")
    return (f'not a JSON Schema keyword{guess}: {fix}, or name an annotation of your own "{VENDOR_PREFIX}{keyword}" '
            f'(names that start with "{VENDOR_PREFIX}" are accepted and left out of the grammar)')


def _unwritable_data(schema: dict) -> list[str]:
    """Why the first ``enum`` or ``const`` value of ``schema`` that cannot be written as itself cannot: the grammar
    copies these values through xgrammar, which reads integers as signed 64-bit and other numbers as 64-bit
    floats, and text as UTF-8."""
    for keyword, values in (("enum", schema.get("enum", [])), ("const", [schema["const"]] if "const" in schema else [])):
        for value in values:
            for part, problem in _unwritable(value):
                inside = f" holds {json.dumps(part)[:80]}" if part is not value else ""
                return [f"{keyword} value {json.dumps(value)[:80]}{inside}: {problem}"]
    return []


def _unwritable(value) -> list[tuple]:
    """``(part, why)`` for each part of the JSON value ``value`` (itself, an item, a key) that the grammar cannot
    write as Python reads it back, ``why`` saying what to do; empty if it can write all of it."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return [(value, "an integer beyond the signed 64-bit range, which the grammar would write as a float (another "
                        f'number): write it as a string ("{value}") or check it after extraction')]
    if isinstance(value, float) and not math.isfinite(value):
        return [(value, "not a JSON number (JSON has no NaN or Infinity): remove it")]
    if isinstance(value, str) and _lone_surrogate(value):
        return [(value, "a lone surrogate, which is not a character (UTF-8 cannot hold it): remove it")]
    if isinstance(value, dict):
        return [found for item in value.items() for part in item for found in _unwritable(part)]
    if isinstance(value, list):
        return [found for item in value for found in _unwritable(item)]
    return []


def _lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate code point (U+D800 to U+DFFF) on its own: JSON's "\\ud800" reads as one."""
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _annotation_format(schema: dict) -> bool:
    """Whether the ``format`` of ``schema`` is an annotation: one of ``ANNOTATION_FORMATS``, or one of OpenAPI's
    ``NUMBER_FORMATS`` where ``schema`` allows numbers or integers (perhaps with null or other types: a JSON Schema
    validator checks formats of strings only)."""
    format_ = schema.get("format")
    return format_ in ANNOTATION_FORMATS or (format_ in NUMBER_FORMATS and bool({"number", "integer"} & set(_types(schema))))


def _descriptive(key: str) -> bool:
    """Whether the keyword ``key`` only describes (``DESCRIPTIVE``, or a vendor extension ``x-...``): it is ignored
    and left out of the grammar."""
    return key in DESCRIPTIVE or key.startswith(VENDOR_PREFIX)


def _bound_problems(schema: dict) -> list[str]:
    """Why xgrammar cannot enforce a number bound of ``schema`` exactly, with what to do: an integer's bound (as a
    whole number) outside the signed 64-bit range, a number's bound that a 64-bit float does not hold (xgrammar
    reads it as one, rounded, so it would allow numbers beyond the bound), or a range so narrow that no number
    the grammar writes (``NUMBER_FRACTION_DIGITS``) lies inside (xgrammar would allow no number at all)."""
    if _integers_only(schema):
        ends = zip((_lower_bound(schema), _upper_bound(schema)), _integer_range(schema))  # whole is None: no bound
        return [
            f"{bound[2]} {bound[0]} is outside the integers the grammar can bound ({INT64_MIN} to {INT64_MAX}): {BOUND_ADVICE}"
            for bound, whole in ends if whole is not None and not INT64_MIN <= whole <= INT64_MAX
        ]
    bounds = _bounds(schema, "minimum", "exclusiveMinimum") + _bounds(schema, "maximum", "exclusiveMaximum")
    inexact = [
        f"{keyword} {value} has more digits than a 64-bit float holds (the grammar would round it): {BOUND_ADVICE}"
        for value, _exclusive, keyword in bounds if not _is_double(value)
    ]
    if inexact or not {"number", "integer"} & set(_types(schema)) or _empty_range(schema):
        return inexact
    lowest, highest = _lower_bound(schema), _upper_bound(schema)
    for bound, toward in ((lowest, math.inf), (highest, -math.inf)):
        if bound is not None and math.copysign(1, toward) * _inside(*bound[:2], toward=toward) > UNBOUNDED_NUMBER_LIMIT:
            return [f"{bound[2]} {bound[0]} leaves only numbers beyond those the grammar writes (within "
                    f"±{UNBOUNDED_NUMBER_LIMIT:,}, see help(phi_helpers.api.constrained)): {BOUND_ADVICE}"]
    low, high = (_exact(bound) * 10**NUMBER_FRACTION_DIGITS for bound in _grammar_range(schema))  # in millionths
    if lowest and highest and math.ceil(low) > math.floor(high):
        return [f"{lowest[2]} {lowest[0]} and {highest[2]} {highest[0]} leave no number with at most "
                f"{NUMBER_FRACTION_DIGITS} digits after the point, which is how the grammar writes numbers (as a 64-bit "
                f"float reads them): widen the range, or {BOUND_ADVICE}"]
    return []


def _grammar_range(schema: dict) -> tuple:
    """The ``minimum`` and ``maximum`` the grammar gets for the numbers of ``schema`` (which allows numbers or
    integers), both inclusive (see ``NUMBER_FRACTION_DIGITS``). An integer: its whole bounds, and on a side without
    one ``UNBOUNDED_NUMBER_LIMIT`` from zero (the end of the signed 64-bit integers where the other bound lies
    beyond it). A number: an exclusive bound as the next 64-bit float inside it (xgrammar writes
    ``10000000000000000.3`` above ``"exclusiveMinimum": 1e16``, which reads back as 1e16 itself), and never more
    than ``UNBOUNDED_NUMBER_LIMIT`` from zero (xgrammar's bounded numbers lose digits past 2**63: between 1e20 and
    1e22 it allows only 1e20)."""
    limit = UNBOUNDED_NUMBER_LIMIT
    if _integers_only(schema):
        low, high = _integer_range(schema)
        return (
            low if low is not None else -limit if high is None or high >= -limit else INT64_MIN,
            high if high is not None else limit if low is None or low <= limit else INT64_MAX,
        )
    low, high = _lower_bound(schema), _upper_bound(schema)
    return (
        -limit if low is None else max(_inside(*low[:2], toward=math.inf), -limit),
        limit if high is None else min(_inside(*high[:2], toward=-math.inf), limit),
    )


def _inside(value, exclusive: bool, toward: float):
    """The bound ``value`` as an inclusive one: an exclusive bound becomes the next float ``toward`` the inside.
    A bound no float holds is kept (it is refused, see ``_bound_problems``)."""
    return math.nextafter(float(value), toward) if exclusive and _is_double(value) else value


def _exact(bound) -> Fraction:
    """The number xgrammar reads for a bound: an integer as it is, a float as its shortest decimal (``0.1``, not the
    binary 0.1000000000000000055...), the text JSON writes for it."""
    return Fraction(bound) if isinstance(bound, int) else Fraction(repr(float(bound)))


def _is_double(value) -> bool:
    """Whether a 64-bit float holds the number ``value`` exactly."""
    try:
        return float(value) == value
    except OverflowError:  # an integer beyond the largest float
        return False


def _pattern_problems(pattern: str, where: str) -> list[str]:
    """Why the grammar cannot enforce a ``pattern`` as Python's ``re`` (which validates answers) reads it."""
    if re.search(r"\(\?<?[=!]|\\[1-9]|\(\?P=", pattern):
        return [f"{where}: a pattern with a look-around or back-reference ({pattern!r}): rewrite it without them, or check "
                "the value after extraction"]
    if re.search(r"(?<!\\)(\\\\)*\(\?[aiLmsux-]+[:)]", pattern):
        return [f"{where}: an inline flag such as (?i) in a pattern ({pattern!r}; the grammar cannot read it: write "
                "both cases, e.g. [Aa])"]
    if re.search(r"(?<!\\)(\\\\)*\\[AZz]", pattern):  # xgrammar would read \A as the letter A
        return [f"{where}: \\A, \\Z or \\z in a pattern ({pattern!r}; write ^ and $)"]
    counts = [int(count) for bounds in re.findall(r"(?<!\\)\{(\d+)(?:,(\d*))?\}", pattern) for count in bounds if count]
    if max(counts, default=0) > MAX_PATTERN_REPEAT:
        return [f"{where}: a repetition count above {MAX_PATTERN_REPEAT:,} in a pattern ({pattern!r}): its grammar would "
                "take minutes to compile; lower it (max_new_tokens bounds the answer anyway)"]
    tokens = _regex_tokens(pattern)
    if _lone_surrogate(pattern) or any(re.fullmatch(r"\\u[dD][89a-fA-F]..", token.text) for token in tokens):
        return [f"{where}: a lone surrogate in a pattern ({pattern!r}): it is not a character (UTF-8 cannot hold it), "
                "so no answer could hold it; remove it"]
    for token in tokens:
        if token.text in ("\\W", "\\D") or (token.negated and token.text in ("\\w", "\\d")):
            place = " inside [^...]" if token.negated else ""
            return [f"{where}: {token.text}{place} in a pattern ({pattern!r}): the grammar reads \\w and \\d as ASCII, so "
                    "it would allow letters or digits of other scripts that the check refuses; list the characters"]
        if token.text.startswith("\\U"):
            return [f"{where}: \\U in a pattern ({pattern!r}): the grammar would read it as the letter U; "
                    "write the character itself"]
        if token.text == "\\S" and token.in_class:
            return [f"{where}: \\S inside [...] in a pattern ({pattern!r}): the grammar cannot write it as Python's re reads "
                    "it; write \\S outside the class (e.g. (?:\\S|-) for [\\S-]), or list the characters"]
    mixed = _mixed_classes(tokens)
    unsafe = next((token for index, token in enumerate(tokens) if index not in mixed and _names_unescaped_char(token)), None)
    if unsafe is not None:
        return [f"{where}: {unsafe.text!r} in a pattern ({pattern!r}): the grammar would write that character unescaped, "
                "which is not valid JSON; leave control characters, \" and \\ out of a pattern (a [^...] class may "
                "exclude them), or check them after extraction"]
    branches = _anchored_branches(tokens)
    if branches is None:
        return [f"{where}: ^ or $ inside a pattern ({pattern!r}); they can only begin or end it (or a top-level | branch)"]
    # As written, but without the anchors between branches (xgrammar warns of a ^ or $ in the middle).
    cores = ["".join(token.text for token in core) for _, core, _ in branches]
    as_written = ("^" if branches[0][0] else "") + "|".join(cores) + ("$" if branches[-1][2] else "")
    try:
        for regex in (as_written, whole_value_pattern(pattern)):  # first as written: errors point at the user's text
            xgrammar.Grammar.from_regex(regex)
    except RuntimeError as error:
        return [f"{where}: a pattern the grammar cannot express ({pattern!r}: {_xgrammar_reason(error)}): rewrite it, "
                "or check the value after extraction"]
    return []


def whole_value_pattern(pattern: str) -> str | None:
    r"""``pattern`` as a regex the whole value must match, which is how xgrammar reads a pattern; None if a
    ``^`` or ``$`` stands anywhere but at the start or end of a top-level branch.

    JSON Schema's ``pattern`` matches anywhere in the value (Python's ``re.search``, which checks the
    answers): ``"^[A-Z]"`` accepts "Lindqvist". Given to xgrammar as it is, it would allow only one capital
    letter. So each top-level branch gets ``.*`` where it is not anchored: ``"^[A-Z]"`` -> ``"(?:[A-Z]).*"``.
    Spellings xgrammar reads otherwise are rewritten (``_regex_tokens``, ``_xgrammar_spelling``): a ``]`` first
    in a class (``[]a]``, ``[^]]``) or outside one becomes ``\]``, a named group ``(?P<name>...)`` a plain one,
    a character beyond ASCII ``\u{...}``, ``\s`` and ``\S`` the characters Python's re means by them, and a group's
    ``?`` ``{0,1}``.
    """
    branches = _anchored_branches(_regex_tokens(pattern))
    if branches is None:
        return None
    return "|".join(("" if start else ".*") + "(?:" + "".join(map(_xgrammar_spelling, [None, *core], core)) + ")"
                    + ("" if end else ".*") for start, core, end in branches)


# The characters Python's re matches with \s, less the control characters a JSON string escapes (the grammar
# never writes those), as members of a class in xgrammar's spelling. xgrammar's own \s differs: it allows
# U+FEFF (which \s refuses) but not U+0085 (which \S refuses).
_WHITESPACE_CLASS = " \\u{85}\\u{A0}\\u{1680}\\u{2000}-\\u{200A}\\u{2028}\\u{2029}\\u{202F}\\u{205F}\\u{3000}"


def _xgrammar_spelling(previous: "_RegexToken | None", token: "_RegexToken") -> str:
    """``token`` spelled so that xgrammar reads it as Python's re does. A character beyond ASCII, written as it is
    (or escaped, ``\\é``), becomes ``\\u{E9}``: written as it is, xgrammar 0.2.9 lets the ``.``, ``\\s`` and
    ``[^...]`` of the same pattern write quotes, backslashes and control characters (invalid JSON). So does a
    ``]`` outside a class, which becomes ``\\]``. ``\\s`` and ``\\S`` (outside a class; refused inside one but
    ``\\s``) become ``_WHITESPACE_CLASS``. A ``?`` right after a group (``previous``) becomes ``{0,1}``: xgrammar
    0.2.9 reads ``(x\\d+)?`` in a JSON string as if the ``x`` alone were optional (it wrote "1"), and
    ``(x\\d+){0,1}`` as Python does."""
    if token.text == "?" and previous is not None and previous.is_anchor(")"):
        return "{0,1}"
    if token.text == "\\s":
        return _WHITESPACE_CLASS if token.in_class else f"[{_WHITESPACE_CLASS}]"
    if token.text == "\\S":
        return f"[^{_WHITESPACE_CLASS}]"
    if token.text == "]" and not token.in_class:
        return "\\]"
    literal = token.text.removeprefix("\\")  # "é" or "\\é" (other escapes are longer)
    if len(literal) == 1 and ord(literal) > 0x7F:
        return f"\\u{{{ord(literal):X}}}"
    return token.text


def _anchored_branches(tokens: list["_RegexToken"]) -> list[tuple[bool, list["_RegexToken"], bool]] | None:
    """The top-level ``|`` branches as (starts with ``^``, the tokens between the anchors, ends with ``$``);
    None if a ``^`` or ``$`` stands anywhere else."""
    branches, branch = [], []
    for token in tokens:
        if token.text == "|" and token.depth == 0 and not token.in_class:
            branches.append(branch)
            branch = []
        else:
            branch.append(token)
    branches.append(branch)
    found = []
    for branch in branches:
        start = bool(branch) and branch[0].is_anchor("^")
        end = len(branch) > start and branch[-1].is_anchor("$")
        core = branch[start : len(branch) - end]
        if any(token.is_anchor("^") or token.is_anchor("$") for token in core):
            return None
        found.append((start, core, end))
    return found


# What a JSON string must escape; xgrammar writes a character a pattern names as it is.
_JSON_ESCAPED = [chr(code) for code in range(0x20)] + ['"', "\\"]
_CHARACTER_SETS = {".", "[", "[^", "]"} | {f"\\{letter}" for letter in "sSwWdD"}


def _names_unescaped_char(token: "_RegexToken") -> bool:
    """Whether ``token`` names a control character, ``"`` or ``\\`` that the value may contain: xgrammar
    drops those from ``.``, from shorthands such as ``\\s`` and from classes that also name other
    characters, but keeps one named on its own (``\\n``, ``[\\n]``, ``\\x22``, ``[\\x00-\\x1f]``), unescaped."""
    if token.negated or token.text in _CHARACTER_SETS:
        return False
    try:
        named = re.compile(f"[{token.text}]" if token.in_class else token.text)
    except re.error:  # "(", "*" and other operators: no character of their own
        return False
    return any(named.fullmatch(char) for char in _JSON_ESCAPED)


def _mixed_classes(tokens: list["_RegexToken"]) -> set[int]:
    """Indices of the tokens of every ``[...]`` class that also names a character JSON writes as it is:
    xgrammar leaves control characters, ``"`` and ``\\`` out of such a class (``[\\t ]`` allows a
    space only), and writes them unescaped only from a class of nothing else (``[\\n\\t]``)."""
    mixed, start = set(), None
    for index, token in enumerate(tokens):
        if start is None and token.in_class and token.text in ("[", "[^"):
            start = index
        elif start is not None and token.text == "]":
            body = "".join(member.text for member in tokens[start + 1 : index])
            if _names_a_plain_char(body):
                mixed.update(range(start, index + 1))
            start = None
    return mixed


def _names_a_plain_char(class_body: str) -> bool:
    """Whether the class ``[class_body]`` matches some character that JSON does not escape (tried up to
    U+07FF: a class of only rarer characters beside a control character is refused, to be safe)."""
    try:
        named = re.compile(f"[{class_body}]")
    except re.error:
        return False
    return any(named.fullmatch(chr(code)) for code in range(0x20, 0x800) if chr(code) not in _JSON_ESCAPED)


@dataclass(frozen=True)
class _RegexToken:
    """One character, or one escape (``\\`` and the next character), of a pattern, and where it stands."""

    text: str
    in_class: bool = False  # inside [...]
    negated: bool = False  # inside [^...]
    depth: int = 0  # groups open around it

    def is_anchor(self, char: str) -> bool:
        return self.text == char and not self.in_class


def _regex_tokens(pattern: str) -> list[_RegexToken]:
    r"""The pattern as tokens, with ``]`` first in a class written ``\]`` and ``(?P<name>`` as ``(``."""
    tokens, depth, index = [], 0, 0
    in_class = negated = False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":  # one escape: \\x41, \\u0041, \\U0001F600 and \\012 whole
            escape = re.match(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|0[0-7]{0,2}|.)", pattern[index:], re.DOTALL)
            text, index = escape.group(), index + escape.end()
        elif in_class:
            in_class, negated = (False, False) if char == "]" else (True, negated)
            text, index = char, index + 1
            tokens.append(_RegexToken(text, in_class or char == "]", negated, depth))
            continue
        elif char == "[":
            negated = pattern.startswith("^", index + 1)
            opening = "[^" if negated else "["
            index += len(opening)
            in_class = True
            tokens.append(_RegexToken(opening, True, negated, depth))
            if pattern.startswith("]", index):  # a ] first in a class is a literal to Python, not to xgrammar
                tokens.append(_RegexToken("\\]", True, negated, depth))
                index += 1
            continue
        elif char == "(":
            named = re.match(r"\(\?P<\w+>", pattern[index:])
            text, index = "(", index + (named.end() if named else 1)
            depth += 1
            tokens.append(_RegexToken(text, False, False, depth - 1))
            continue
        else:
            text, index = char, index + 1
            depth -= char == ")"
        tokens.append(_RegexToken(text, in_class, negated, depth))
    return tokens


def _xgrammar_reason(error: Exception) -> str:
    """xgrammar's message without its time stamp and source line (``[12:00:00] /project/cpp/x.cc:94: ``)."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip().rstrip(".")


def json_grammar(schema: dict) -> xgrammar.Grammar:
    """The grammar of the JSON answers that follow ``schema`` (no tokenizer needed: milliseconds for any
    schema up to ``MAX_SCHEMA_CHARS``). ``SchemaNotSupportedError`` if xgrammar cannot build it."""
    try:
        return xgrammar.Grammar.from_json_schema(
            json.dumps(_grammar_schema(schema)), any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )
    except (RuntimeError, ValueError) as error:
        raise SchemaNotSupportedError(
            f"The JSON Schema cannot be compiled to a grammar: {_xgrammar_reason(error)}. Change that part of the "
            f"schema, or use {UNCONSTRAINED_PATH}."
        ) from None


def _contradictions(schema: dict, where: str, validator) -> list[str]:
    """A message, with what to change, for every keyword of one subschema that leaves no value at all."""
    found = [_empty_range(schema), *_misordered(schema), *_misfits(schema, validator)]
    if schema.get("additionalProperties", False) is False:  # absent: no other property is written either
        found += [
            f"required {name!r} is not in properties and no other property is allowed (additionalProperties is "
            "false or absent): add it to properties or remove it from required" for name in _unlisted(schema)
        ]
    return [f"{where}: {message}" for message in found if message]


def _empty_range(schema: dict) -> str | None:
    """Why the number bounds of ``schema`` leave no number (no integer, for an integer), or None."""
    low, high = _lower_bound(schema), _upper_bound(schema)
    if low is None or high is None:
        return None
    if _integers_only(schema):
        first, last = _integer_range(schema)
        empty, what = first > last, "integer"
    else:
        empty, what = low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1])), "number"
    return f"{low[2]} {low[0]} and {high[2]} {high[0]} leave no {what} (change one of them)" if empty else None


def _misordered(schema: dict) -> list[str]:
    """Why the length or item-count bounds of ``schema`` leave nothing (a lower bound above the upper one)."""
    return [
        f"{low} {schema[low]} is above {high} {schema[high]}: no {what} fits (change one of them)"
        for low, high, what in _ORDERED if low in schema and high in schema and schema[low] > schema[high]
    ]


def _misfits(schema: dict, validator) -> list[str]:
    """Why ``enum`` or ``const`` of ``schema`` allow a value that the rest of ``schema`` refuses (the model could
    write it; every answer that did would be refused), checked by ``validator`` (the whole schema's)."""
    from jsonschema.exceptions import best_match  # (see _format_checks)

    if schema.get("enum") == []:
        return ["an empty enum allows no value (list the allowed values)"]
    found = []
    for keyword, values in (("enum", schema.get("enum", [])), ("const", [schema["const"]] if "const" in schema else [])):
        rest = validator.evolve(schema={key: value for key, value in schema.items() if key != keyword})
        wrong = [value for value in values if not rest.is_valid(value)]
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            found.append(
                f"{keyword} value {json.dumps(wrong[0])}{more} does not fit the rest of this schema "
                f"({best_match(rest.iter_errors(wrong[0])).message}): change the value or the other keywords"
            )
    return found


def _unlisted(schema: dict) -> list[str]:
    """The ``required`` names of an object schema that its ``properties`` do not define."""
    if _types(schema) and "object" not in _types(schema):
        return []
    return [name for name in schema.get("required", []) if name not in schema.get("properties", {})]


def _types(schema: dict) -> list[str]:
    """The types ``schema`` allows, as a list (empty: any type)."""
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else types


def _integers_only(schema: dict) -> bool:
    """Whether the only numbers ``schema`` allows are integers (its bounds then mean whole numbers)."""
    return "integer" in _types(schema) and "number" not in _types(schema)


def _lower_bound(schema: dict):
    """The tightest of ``minimum`` and ``exclusiveMinimum`` as ``(value, exclusive, keyword)``, or None."""
    return max(_bounds(schema, "minimum", "exclusiveMinimum"), key=lambda bound: bound[:2], default=None)


def _upper_bound(schema: dict):
    """The tightest of ``maximum`` and ``exclusiveMaximum`` as ``(value, exclusive, keyword)``, or None."""
    return min(_bounds(schema, "maximum", "exclusiveMaximum"), key=lambda bound: (bound[0], not bound[1]), default=None)


def _bounds(schema: dict, inclusive: str, exclusive: str) -> list[tuple]:
    """The number bounds of ``schema`` under these two keywords, as ``(value, exclusive, keyword)``."""
    return [
        (schema[keyword], keyword == exclusive, keyword) for keyword in (inclusive, exclusive)
        if isinstance(schema.get(keyword), (int, float)) and not isinstance(schema[keyword], bool)
        and (isinstance(schema[keyword], int) or math.isfinite(schema[keyword]))  # infinite or NaN: no bound
    ]


def _integer_range(schema: dict) -> tuple:
    """The smallest and largest integer the bounds of ``schema`` allow (None where unbounded)."""
    low, high = _lower_bound(schema), _upper_bound(schema)
    return (
        None if low is None else math.floor(low[0]) + 1 if low[1] else math.ceil(low[0]),
        None if high is None else math.ceil(high[0]) - 1 if high[1] else math.floor(high[0]),
    )


# Any JSON value, for the grammar: what "{}", "additionalProperties": true and an object without "properties"
# allow. xgrammar's own any-value rule has numbers without bounds (see NUMBER_FRACTION_DIGITS), so this one,
# recursive, is added to the $defs of the grammar's copy of a schema that uses it.
_ANY_NAME = "phi_helpers_any_value"
_ANY_REF = f"#/$defs/{_ANY_NAME}"
_ANY_VALUE = {"anyOf": [
    {"type": "null"}, {"type": "boolean"}, {"type": "string"},
    {"type": "number", "minimum": -UNBOUNDED_NUMBER_LIMIT, "maximum": UNBOUNDED_NUMBER_LIMIT},
    {"type": "array", "items": {"$ref": _ANY_REF}}, {"type": "object", "additionalProperties": {"$ref": _ANY_REF}},
]}


def _grammar_schema(schema):
    """A copy of ``schema`` for the grammar compiler, subschema by subschema (``enum`` and ``const`` values are
    data and stay as they are): see ``_rewrite_for_grammar``; any value (``{}``) becomes ``_ANY_VALUE``."""
    copy = _grammar_subschema(schema)
    if isinstance(copy, dict) and any(isinstance(node, dict) and node.get("$ref") == _ANY_REF for _, node in _walk(copy, "")):
        copy["$defs"] = {**copy.get("$defs", {}), _ANY_NAME: _ANY_VALUE}
    return copy


def _grammar_subschema(schema):
    if not isinstance(schema, dict):
        return schema
    copy = {key: value for key, value in schema.items() if not _descriptive(key)}
    return _rewrite_for_grammar(_with_subschemas(copy, _grammar_subschema))


def _rewrite_for_grammar(copy: dict) -> dict:
    """Rewrite the keywords of one subschema (``copy``, changed in place) that xgrammar would get wrong:
    descriptions and other annotations are gone already (they change nothing), formats that are annotations
    (``_annotation_format``) are dropped, the others become their ``FORMAT_PATTERNS``, lengths a pattern,
    ``["integer", "number"]`` ``"number"``, a number's bounds those of ``_grammar_range`` (infinite or NaN ones count as none), and any
    value (``{}``, ``true``, an object's unnamed properties) ``_ANY_VALUE``."""
    if not {"type", "enum", "const", "$ref", "anyOf"} & copy.keys():  # {}: any value (keywords of a type are refused)
        return {"$ref": _ANY_REF}
    if _annotation_format(copy):
        del copy["format"]
    if "pattern" in copy:
        copy["pattern"] = whole_value_pattern(copy["pattern"])  # checked by _pattern_problems: never None
    if copy.get("format") in FORMAT_PATTERNS:  # a pattern next to it is enforced by the format's (_fits_format)
        copy["pattern"] = whole_value_pattern(FORMAT_PATTERNS[copy.pop("format")])  # in xgrammar's spelling
    if "minLength" in copy or "maxLength" in copy:
        # xgrammar 0.2's length-bounded strings let raw control characters through (invalid JSON);
        # the same bounds as a pattern do not. (Refused together with a pattern, see _unsupported.)
        low, high = copy.pop("minLength", 0), copy.pop("maxLength", "")
        copy["pattern"] = f"^.{{{low},{high}}}$"
    if "object" in _types(copy) and "properties" not in copy:  # names and values of any kind
        copy.setdefault("additionalProperties", True)
    if copy.get("additionalProperties") is True:
        copy["additionalProperties"] = {"$ref": _ANY_REF}
    if {"integer", "number"} <= set(_types(copy)):  # xgrammar would bound its integers as such (refusing 1.5)
        copy["type"] = [kind for kind in _types(copy) if kind != "integer"]  # every integer is a number
    if {"integer", "number"} & set(_types(copy)):
        bounds = dict(zip(("minimum", "maximum"), _grammar_range(copy)))
    else:  # JSON has no Infinity or NaN for xgrammar to read; such a bound allows every number
        bounds = {keyword: value for value, _exclusive, keyword in _bounds(copy, "minimum", "exclusiveMinimum")
                  + _bounds(copy, "maximum", "exclusiveMaximum")}
    for keyword in BOUND_KEYWORDS:
        copy.pop(keyword, None)
    copy.update(bounds)
    return copy


def closed_schema(schema):
    """A copy of ``schema`` with ``"additionalProperties": false`` in every object schema that lists
    ``properties`` and says nothing of ``additionalProperties``: the objects as constrained decoding writes
    them (it writes no other property there; an object without ``properties`` takes any), where JSON Schema
    alone would let any other key through. ``eval`` checks expected answers against it (a misspelt key)."""
    if not isinstance(schema, dict):
        return schema
    copy = _with_subschemas(schema, closed_schema)
    if "object" in _types(copy) and "properties" in copy and "additionalProperties" not in copy:
        copy["additionalProperties"] = False
    return copy

# One grammar compiler per tokenizer: building it reads the whole vocabulary (about a second). Each keeps
# the grammars it compiled last: tokenizer -> {(vocab_size, stop ids): (compiler, {schema text: grammar})}.
_COMPILERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grammar_compiler(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgrammar.GrammarCompiler:
    """xgrammar's compiler for ``tokenizer``, cached.

    ``vocab_size`` is the model's (its logits' width): Phi-3-vision's is 32064 while the tokenizer
    knows 32045 tokens; the ids in between have no text and are always masked. ``stop_token_ids``
    (``<|end|>``, ``<|endoftext|>``...) are the only tokens allowed once the JSON is complete.
    """
    return _compiler_and_grammars(tokenizer, vocab_size, stop_token_ids)[0]


def _compiler_and_grammars(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> tuple:
    key = (vocab_size, tuple(stop_token_ids))
    compilers = _COMPILERS.setdefault(tokenizer, {})
    if key not in compilers:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # No cache of xgrammar's own (we keep the compiled grammars): its cache key is the grammar printed as EBNF
        # and parsed again, which reads "\\xdfe" (ß, then e) as "\\u0dfe" (xgrammar 0.2.9).
        compilers[key] = (xgrammar.GrammarCompiler(info, cache_enabled=False), {})
    return compilers[key]


def compile_schema(tokenizer, schema: dict, vocab_size: int, stop_token_ids: list[int]) -> xgrammar.CompiledGrammar:
    """Check ``schema`` (``SchemaNotSupportedError`` if a feature is not enforced) and compile it to a
    grammar; the last ``SCHEMAS_REMEMBERED`` grammars of each compiler are kept for the next call."""
    grammar = _supported_grammar(schema)  # checked first; built once (seconds for a long maxLength)
    compiler, grammars = _compiler_and_grammars(tokenizer, vocab_size, stop_token_ids)
    return _remembered(grammars, _schema_text(schema), lambda: compiler.compile_grammar(grammar))


class SchemaConstraint(LogitsProcessor):
    """The token mask as a logits processor for ``model.generate`` (one per ``generate`` call).

    At each step, for each row of the batch: tell the row's grammar matcher which token was chosen
    last, ask it for the bitmask of allowed next tokens (one bit per token id), and set the score of
    every other token to ``-inf``. Rows whose JSON is finished (and stopped) are left alone. One more
    rule than the grammar's: no surrogate after a byte ED (see ``_surrogate_guard``).
    """

    def __init__(self, grammar: xgrammar.CompiledGrammar):
        self.grammar = grammar
        self.matchers: list[xgrammar.GrammarMatcher] | None = None
        self.bitmask: torch.Tensor | None = None  # (batch, ceil(vocab / 32)) int32
        self.surrogate_leads: set[int] = set()  # see _surrogate_guard
        self.no_surrogate_tails: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.matchers is None:  # first step: nothing generated yet
            self.matchers = [xgrammar.GrammarMatcher(self.grammar) for _ in range(input_ids.shape[0])]
            self.bitmask = xgrammar.allocate_token_bitmask(input_ids.shape[0], self.grammar.tokenizer_info.vocab_size)
            self.surrogate_leads, self.no_surrogate_tails = _surrogate_guard(self.grammar.tokenizer_info)
        else:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist()):
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise InvalidArgumentError(
                        f"Token {token} was chosen although the JSON Schema's mask forbids it: another logits "
                        "processor ruled out every token the schema allows. Leave it out when you pass a schema."
                    )
        last_tokens = input_ids[:, -1].tolist()
        for row, matcher in enumerate(self.matchers):
            if matcher.is_terminated():
                self.bitmask[row] = -1  # all bits set: the row is finished, generate pads it
            else:
                matcher.fill_next_token_bitmask(self.bitmask, row)
                if last_tokens[row] in self.surrogate_leads:
                    self.bitmask[row] &= self.no_surrogate_tails
        return apply_mask(scores, self.bitmask)

    def keep_rows(self, rows: list[int]) -> None:
        """Follow the batch when rows leave it (``generate_batch`` drops finished answers between
        rounds of ``generate``): keep the matchers of ``rows``, in that order. The next call accepts
        the last token of each kept row, as within one round."""
        if self.matchers is not None:
            self.matchers = [self.matchers[row] for row in rows]
            self.bitmask = self.bitmask[: len(rows)]


def _surrogate_guard(tokenizer_info: xgrammar.TokenizerInfo) -> tuple[set[int], torch.Tensor]:
    """xgrammar 0.2.9 lets a JSON string hold the bytes of a surrogate code point (ED, then A0 to BF, then one
    more), which is not UTF-8: the tokenizer decodes them, and the byte tokens after them (the closing quote...),
    as U+FFFD, and the answer no longer parses. Such bytes come one token each (<0xED>, <0xA0>: the tokenizer's
    pieces of text are UTF-8), so after a token that ends with the byte ED the tokens that begin with A0 to BF
    are masked too. Returns the ids of the tokens that end with ED and a bitmask row without those others."""
    pieces = tokenizer_info.decoded_vocab  # the bytes of each token
    leads = {token for token, piece in enumerate(pieces) if piece.endswith(b"\xed")}
    allowed = torch.ones((tokenizer_info.vocab_size + 31) // 32 * 32, dtype=torch.int64)
    allowed[[token for token, piece in enumerate(pieces) if piece[:1] and 0xA0 <= piece[0] <= 0xBF]] = 0
    words = (allowed.view(-1, 32) << torch.arange(32)).sum(dim=1)  # bit j of word i: token 32 * i + j
    return leads, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def apply_mask(scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the scores of the tokens not allowed by ``bitmask`` to ``-inf``, in place, on the scores' device."""
    device = scores.device
    if device.type == "cpu" or (device.type == "cuda" and importlib.util.find_spec("triton") is not None):
        xgrammar.apply_token_bitmask_inplace(scores, bitmask.to(device))
    else:  # MPS, or CUDA without triton (Windows): the plain torch version
        xgrammar.apply_token_bitmask_inplace(scores, bitmask.to(device), backend="torch_native")
    return scores


def allowed_next_tokens(tokenizer, grammar: xgrammar.CompiledGrammar, text: str) -> list[str]:
    """The tokens the mask allows after the answer ``text`` (a prefix of a valid answer), as strings.

    For teaching: ``allowed_next_tokens(tokenizer, grammar, '{"sex":"')`` shows what may come next.
    ``InvalidArgumentError`` if ``text`` is not the beginning of an answer the grammar allows.
    """
    matcher = xgrammar.GrammarMatcher(grammar)
    if not matcher.accept_string(text):
        raise InvalidArgumentError(
            f"{text!r} is not the beginning of an answer that follows the schema: pass the first characters of a valid "
            'answer, compact (no spaces) and with the properties in the schema\'s order, such as \'{"name":\'.'
        )
    bitmask = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32)) & 1  # (words, 32): bit j of word i is token 32 * i + j
    token_ids = bits.flatten()[: grammar.tokenizer_info.vocab_size].nonzero().flatten().tolist()
    return tokenizer.convert_ids_to_tokens(token_ids)


def read_answer(text: str, schema: dict) -> dict:
    """The dict in a constrained answer; ``JSONTruncatedError`` (with ``.text``) if it was cut off.

    The mask guarantees that the text is the beginning of a valid answer, and lets the model end its turn
    only where the grammar is complete. So an answer that does not parse either stopped early
    (``max_new_tokens``, an interruption, a stop string: ``JSONTruncatedError``), or the grammar was complete
    there, a bug (``JSONExtractionError``; also for JSON that Python cannot read, nested 1,000 deep). The
    validation below is a second check that should never fail.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if not _grammar_complete(text, schema):
            raise JSONTruncatedError(
                f"The answer stopped before its JSON was complete ({len(text)} characters): it ran out of "
                "max_new_tokens (or was interrupted, or a stop string ended it). Raise max_new_tokens; error.text "
                "keeps the partial answer.",
                text=text,
            ) from None
        raise JSONExtractionError(
            f"The constrained answer is complete for the grammar but is not valid JSON ({error}): a bug in the grammar "
            "engine. Please report this with the schema.",
            text=text,
        ) from None
    except RecursionError:  # "[[[[...": a value of any kind ({}) may nest without end
        raise JSONExtractionError(
            "The constrained answer nests its JSON deeper than Python's json module reads (1,000 levels): give the "
            'values of any kind in the schema ({} or an object without "properties") a type.',
            text=text,
        ) from None
    except ValueError as error:  # an integer of more than 4,300 digits, which the grammar's bounds rule out
        raise JSONExtractionError(
            f"The constrained answer is JSON that Python cannot read ({error}). Please report this with the schema.",
            text=text,
        ) from None
    problems = validation_errors(data, schema)
    if problems:  # a bug in the grammar engine, or a keyword it ignores: never return an invalid dict
        raise JSONExtractionError(
            f"The constrained answer does not validate against the schema: {'; '.join(problems)}. "
            "Please report this with the schema.",
            text=text,
        )
    return data


def _grammar_complete(text: str, schema: dict) -> bool:
    """Whether the grammar of ``schema`` accepts ``text`` as a whole answer (where the mask lets the model stop).
    Built for text, not tokens (an empty vocabulary), on demand: only an answer that does not parse needs it."""
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False)
    matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(_supported_grammar(schema)), terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


__all__ = ["check_supported", "compile_schema", "SchemaConstraint", "allowed_next_tokens", "read_answer"]
