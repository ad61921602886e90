"""Structured output: JSON Schemas, and checking a model answer against one.

    from phi_helpers.api.structured import load_schema, check_extraction
    schema = load_schema("data/eval/schemas/receipt.schema.json")
    data, problems = check_extraction(answer_text, schema)   # problems == [] when the answer is valid
"""

import json
from pathlib import Path

import jsonschema

from .parsing import extract_json
from ..errors import JSONExtractionError, SchemaError


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
    validator = _validator_for(schema)
    problems = []
    for error in validator.iter_errors(data):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        problems.append(f"{where}: {error.message}")
    return sorted(problems)


def check_schema(schema) -> None:
    """Raise SchemaError (a ValueError) when ``schema`` is not a usable JSON Schema."""
    if not isinstance(schema, dict):
        raise SchemaError(f"A JSON Schema must be a JSON object, not {type(schema).__name__}.")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise SchemaError(f"Not a valid JSON Schema: {error.message}") from None


def load_schema(path) -> dict:
    """Read a JSON Schema file and check it; raise SchemaError with a readable message if it is unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaError(f"No schema file at '{path}'. Check the spelling of --schema.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SchemaError(f"Cannot read the schema file '{path}': {error}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise SchemaError(
            f"The schema file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    try:
        check_schema(schema)
    except SchemaError as error:
        raise SchemaError(f"The schema file '{path}': {error}") from None
    return schema


def _validator_for(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # also check "format": "date" etc.
