"""Structured output: JSON Schemas, and checking a model answer against one.

    from phi_helpers.api.structured import load_schema, check_extraction
    schema = load_schema("data/eval/schemas/receipt.schema.json")  # (in a clone of the repository)
    data, problems = check_extraction(answer_text, schema)   # problems == [] when the answer is valid

A schema is used as it is: its ``$ref`` may point inside the schema itself (``"#/$defs/address"``),
never to another file or URL, so nothing is read or downloaded behind your back. A recursive schema
(a ``$ref`` that leads back to itself, e.g. a tree of nodes) cannot be shown to the model as a finite
prompt, so ``check_schema`` refuses it.
"""

import json
import math
import os
import re
import stat
from pathlib import Path

import referencing
import referencing.exceptions
import referencing.jsonschema

from .parsing import extract_json
from ..errors import SchemaError, JSONExtractionError, utf8_text

MAX_SCHEMA_FILE_BYTES = 10 * 2**20  # a schema file larger than this is not a schema (the largest real ones are kB)
MAX_SCHEMA_DEPTH = 128  # nesting levels of JSON in a schema, the $refs followed included
_BASE_URI = "urn:phi-helpers:schema"  # where a schema without "$id" lives for the $ref resolver
_UNRESOLVABLE = (
    referencing.exceptions.Unresolvable, referencing.exceptions.Unretrievable, referencing.exceptions.NoSuchResource,
)
_DATA_KEYWORDS = {"enum", "const", "default", "examples"}  # their values are data, not subschemas
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}  # name -> subschema
_UNSUPPORTED_REFS = ("$dynamicRef", "$recursiveRef")
VENDOR_PREFIX = "x-"  # vendor extensions (x-order, x-nullable...): annotations, their values are not subschemas
# Python's re (which checks answers) has no \p{...} classes. [^\W\d_] is every letter to it, but only A-Z
# and a-z to the constrained-decoding grammar, which reads \w as ASCII.
_UNICODE_CLASS_HINT = (
    "\\p{L} and other \\p{...} classes are not supported: list the letters instead, e.g. [A-Za-zÀ-ÖØ-öø-ÿ] "
    "for Latin letters with accents ([^\\W\\d_] means any letter to Python's re, but allows only A-Z and a-z "
    "under constrained decoding)."
)


def check_extraction(text: str, schema: dict) -> tuple[object, list[str]]:
    """Parse a model answer as JSON and validate it against ``schema``.

    Returns ``(data, problems)``: ``data`` is the parsed JSON (``None`` if nothing parsed) and
    ``problems`` is a list of readable messages, empty when the answer is valid.
    """
    try:
        data = extract_json(text)
    except JSONExtractionError as error:
        return None, [str(error)]
    return data, validation_errors(data, schema)


def validation_errors(data, schema: dict) -> list[str]:
    """The JSON Schema violations of ``data`` as sorted strings like ``"total: 'abc' is not of type 'number'"``."""
    validator = schema_validator(schema)
    problems = list(_infinite_numbers(data, []))
    for error in validator.iter_errors(data):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        problems.append(f"{where}: {error.message}")
    return sorted(problems)


def _infinite_numbers(data, path: list):
    """A problem for every number in ``data`` that is not a finite float: ``1e400`` (valid JSON, read as
    infinity) and Python's extensions ``NaN`` and ``Infinity``. No schema bound catches them, and they
    are not JSON when written back."""
    if isinstance(data, float) and not math.isfinite(data):
        where = "/".join(map(str, path)) or "(root)"
        problem = "NaN is not a JSON number" if math.isnan(data) else f"a number too large for a 64-bit float (read as {data})"
        yield f"{where}: {problem}"
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _infinite_numbers(value, [*path, key])
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _infinite_numbers(value, [*path, index])


def check_schema_type(schema) -> None:
    """``SchemaError`` for a schema that is not a dict (a JSON object), saying how to get one from what was passed,
    or one with a key that is not a string (JSON's keys are strings: ``{1: ...}`` has no JSON form)."""
    if isinstance(schema, dict):
        _check_keys(schema)
        return
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        how = f"a pydantic model gives its schema with {schema.__name__}.model_json_schema()"
    elif isinstance(schema, str) and schema.lstrip().startswith("{"):
        how = "JSON text becomes a dict with json.loads(text)"
    elif isinstance(schema, (str, bytes)) or hasattr(schema, "__fspath__"):
        how = "read a schema file with phi_helpers.load_schema(path)"
    elif schema is None:
        how = "for a free answer, use ask() without a schema"
    else:
        how = 'a schema is one JSON object, such as {"type": "object", "properties": {...}}'
    raise SchemaError(f"A JSON Schema must be a dict, got {type(schema).__name__}: {how}.")


def _check_keys(schema: dict) -> None:
    """``SchemaError`` naming the first key below ``schema`` that is not a string, and where it is."""
    stack, seen = [(schema, "(root)")], set()
    while stack:
        node, where = stack.pop()
        if id(node) in seen:  # a dict inside itself has no JSON form either; the meta-schema check says so
            continue
        seen.add(id(node))
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if not isinstance(key, (str, int)) or (isinstance(node, dict) and not isinstance(key, str)):
                raise SchemaError(
                    f"{where}: the key {key!r} is not a string ({type(key).__name__}), but JSON's keys are strings: "
                    f"write {str(key)!r}."
                )
            if isinstance(value, (dict, list)):
                stack.append((value, f"{where}/{key}"))


def check_schema(schema) -> None:
    """Raise ``SchemaError`` when ``schema`` is not a usable JSON Schema: not a dict (``check_schema_type``), not
    valid against its meta-schema, a ``$ref`` that does not point inside it (or that is a ``$dynamicRef``), a
    recursive ``$ref``, or nesting deeper than ``MAX_SCHEMA_DEPTH``."""
    check_schema_type(schema)
    import jsonschema  # here, not at the top: importing it costs a second or more (its format checkers' grammars)

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise SchemaError(f"Not a valid JSON Schema: {_meta_schema_problem(error)}") from None
    except RecursionError:
        raise SchemaError(f"The schema is nested too deeply (more than {MAX_SCHEMA_DEPTH} levels).") from None
    _check_refs(schema, _registry(schema).resolver(base_uri=_base_uri(schema)), [], set(), "#", 0)


def _meta_schema_problem(error) -> str:
    """What is wrong in a schema and where (``(root)/properties/total/type: ...``), from the meta-schema's
    ``error``; a pattern Python's ``re`` cannot read says so, with what to write instead of ``\\p{...}``."""
    where = "".join(f"/{part}" for part in error.absolute_path)
    if isinstance(error.cause, re.error):
        hint = f" {_UNICODE_CLASS_HINT}" if re.search(r"\\[pP]", error.instance) else ""
        return (
            f"(root){where}: {error.instance!r} is not a regular expression that Python's re can read ({error.cause}; "
            f"answers are checked with re).{hint}"
        )
    options = "; or ".join(dict.fromkeys(option.message for option in error.context))  # anyOf: why each failed
    return f"(root){where}: {error.message}" + (f" ({options})" if options else "")


def _check_refs(node, resolver, path: list[int], finished: set[int], where: str, depth: int, names=False) -> None:
    """Follow every ``$ref`` below ``node`` (depth first); ``path`` holds the ids of the subschemas
    being expanded, so reaching one of them again is a cycle; ``finished`` ones are not walked twice.
    ``names``: ``node`` maps names to subschemas (``properties``...), so its keys are not keywords."""
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"The schema is nested too deeply (more than {MAX_SCHEMA_DEPTH} levels).")
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_refs(item, resolver, path, finished, f"{where}/{index}", depth + 1)
        return
    if not isinstance(node, dict):
        return
    if names:
        for name, subschema in node.items():
            _check_refs(subschema, resolver, path, finished, f"{where}/{name}", depth + 1)
        return
    for keyword in _UNSUPPORTED_REFS:
        if keyword in node:
            raise SchemaError(f"{keyword} (at {where}) is not supported; use a plain \"$ref\" into the schema.")
    if isinstance(node.get("$ref"), str):
        reference = node["$ref"]
        try:
            resolved = resolver.lookup(reference)
        except _UNRESOLVABLE:
            raise SchemaError(
                f"The $ref {reference!r} (at {where}) does not point inside the schema. Only references into the "
                "schema itself (such as \"#/$defs/name\") are followed; other files and URLs are never fetched: "
                "copy the definition into \"$defs\"."
            ) from None
        target = id(resolved.contents)
        if target in path:
            raise SchemaError(
                f"The schema is recursive: the $ref {reference!r} (at {where}) leads back to a schema that contains it. "
                "Recursive schemas are not supported (answers could nest without end); write out a fixed number of "
                "levels instead."
            )
        if target not in finished:
            _check_refs(resolved.contents, resolved.resolver, [*path, target], finished, reference, depth + 1)
            finished.add(target)
    for key, value in node.items():
        if key not in _DATA_KEYWORDS and key != "$ref" and not key.startswith(VENDOR_PREFIX):
            _check_refs(value, resolver, path, finished, f"{where}/{key}", depth + 1, names=key in _SCHEMA_MAPS)


def _registry(schema: dict) -> referencing.Registry:
    """A registry that holds only ``schema`` and never retrieves anything (no files, no network)."""
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    return referencing.Registry(retrieve=_refuse_retrieval).with_resource(_base_uri(schema), resource)


def _refuse_retrieval(uri: str):
    raise referencing.exceptions.NoSuchResource(ref=uri)


def _base_uri(schema: dict) -> str:
    identifier = schema.get("$id")
    return identifier if isinstance(identifier, str) and identifier else _BASE_URI


def load_schema(path) -> dict:
    """Read a JSON Schema file (UTF-8, with or without a byte order mark) and check it (``check_schema``).

    Raises ``SchemaError`` (a ``ValueError``) naming the file when it is missing, unreadable, not a
    regular file (a pipe, a device), larger than ``MAX_SCHEMA_FILE_BYTES``, not JSON, or not a usable schema.
    """
    if isinstance(path, dict):
        raise SchemaError("load_schema reads a schema file; this schema is a dict already: pass it as schema= as it is.")
    if not isinstance(path, (str, os.PathLike)):
        raise SchemaError(f"load_schema needs the path of a JSON Schema file (a str or a Path), got {type(path).__name__}.")
    path = Path(path)
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):  # reading a pipe could wait for ever, /dev/zero would never end
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file (a pipe or a device)"
            raise SchemaError(f"'{path}' is {kind}: give the path of a .json file that holds the schema.")
        if status.st_size > MAX_SCHEMA_FILE_BYTES:
            raise SchemaError(
                f"The schema file '{path}' has {status.st_size:,} bytes, more than a JSON Schema needs "
                f"(MAX_SCHEMA_FILE_BYTES = {MAX_SCHEMA_FILE_BYTES:,}): is it the right file?"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise SchemaError(
            f"No schema file at '{path}'. Check the spelling; relative paths start from '{Path.cwd()}'."
        ) from None
    except OSError as error:
        raise SchemaError(f"Cannot read the schema file '{path}': {error}") from None
    text = utf8_text(data, f"The schema file '{path}'", SchemaError)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise SchemaError(
            f"The schema file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    except RecursionError:
        raise SchemaError(f"The schema file '{path}' is nested too deeply to read.") from None
    except ValueError as error:  # an integer of more than 4,300 digits (Python's limit on int conversion)
        raise SchemaError(f"The schema file '{path}' cannot be read: {error}.") from None
    try:
        check_schema(schema)
    except SchemaError as error:
        raise SchemaError(f"The schema file '{path}': {error}") from None
    return schema


def schema_validator(schema: dict):
    """A jsonschema validator for ``schema`` that also checks ``format`` (``"date"``...) and resolves ``$ref`` only
    inside ``schema``; ``.evolve(schema=part)`` checks against a part of it, its ``$ref`` resolved the same way."""
    import jsonschema  # (see check_schema)

    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER, registry=_registry(schema))
