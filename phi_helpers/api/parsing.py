"""Get the JSON out of a model answer.

Asked for JSON, models often wrap it: "Here's the extracted data:" followed by a fenced code block,
or JSON followed by an explanation. ``extract_json`` finds the JSON and parses it:

1. the first fenced block marked as JSON (three backticks followed by ``json``) is parsed;
2. otherwise the first plain fenced block that parses as JSON;
3. otherwise the first balanced JSON object ``{...}`` or array ``[...]`` anywhere in the text.

Invalid JSON is never "repaired" (a guessed fix could silently change your data): you get a
``JSONExtractionError`` that shows where parsing failed, and ``error.text`` keeps the whole answer.
"""

import json
import re

from ..errors import JSONExtractionError

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_ADVICE = 'Ask again and end the question with "Answer with JSON only."'


def extract_json(text: str) -> dict | list:
    """Return the JSON object (dict) or array (list) in a model answer.

    >>> extract_json('Here it is: {"total": 12.5} Hope this helps!')
    {'total': 12.5}

    Raises:
        JSONExtractionError: no JSON found, or it does not parse. ``error.text`` is the answer.
    """
    if not isinstance(text, str):
        message = f"extract_json() needs the answer as a string, got {type(text).__name__}."
        raise JSONExtractionError(message, text=str(text))
    json_blocks, other_blocks = _fenced_blocks(text)
    if json_blocks:
        return _parse_block(json_blocks[0], text)
    for block in other_blocks:
        try:
            return _parse_block(block, text)
        except JSONExtractionError:
            continue  # a code block in another language: look further
    return _first_json_value(text)


def _fenced_blocks(text: str) -> tuple[list[str], list[str]]:
    """Contents of the ``` fenced blocks in ``text``: (blocks marked json, all other blocks)."""
    json_blocks, other_blocks = [], []
    for match in _FENCE.finditer(text):
        language, body = match.group(1).lower(), match.group(2)
        (json_blocks if language == "json" else other_blocks).append(body)
    return json_blocks, other_blocks


def _parse_block(block: str, text: str) -> dict | list:
    """Parse the whole content of a fenced block; it must be one JSON object or array."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError as error:
        raise JSONExtractionError(
            f"The ```json block in the answer is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}: {_context(block, error.pos)}. {_ADVICE}",
            text=text,
        ) from None
    if not isinstance(value, (dict, list)):
        raise JSONExtractionError(
            f"The ```json block holds a {type(value).__name__} ({block.strip()[:40]!r}), not an object or array. "
            + _ADVICE,
            text=text,
        )
    return value


def _first_json_value(text: str) -> dict | list:
    """Try to decode at each ``{`` and ``[`` from left to right; return the first value that parses.

    ``raw_decode`` parses one value and ignores whatever follows it, so trailing prose is fine.
    If nothing parses, the error reports the attempt that got furthest: that is most likely the
    JSON the model meant to write.
    """
    decoder = json.JSONDecoder()
    best_error = None
    for start, char in enumerate(text):
        if char not in "{[":
            continue
        try:
            value, _end = decoder.raw_decode(text, start)
            return value
        except json.JSONDecodeError as error:
            if best_error is None or error.pos > best_error.pos:
                best_error = error
    if best_error is None:
        raise JSONExtractionError(
            f"No JSON found in the answer: it has no '{{' or '['. The answer starts with {text.strip()[:80]!r}. "
            + _ADVICE,
            text=text,
        )
    cut_off = ""
    ran_out = best_error.pos >= len(text.rstrip())  # the parser ran out of text
    if ran_out or best_error.msg.startswith("Unterminated string"):  # or a string never closes
        cut_off = " (the answer ends there: was it cut off by max_new_tokens?)"
    raise JSONExtractionError(
        f"The answer contains JSON-like text that does not parse: {best_error.msg} at line {best_error.lineno}, "
        f"column {best_error.colno}{cut_off}: {_context(text, best_error.pos)}. {_ADVICE}",
        text=text,
    )


def _context(text: str, position: int, width: int = 30) -> str:
    """A short excerpt around ``position`` with a marker where parsing failed."""
    before = text[max(position - width, 0) : position]
    after = text[position : position + width]
    return repr(before + " <-- HERE --> " + after)


__all__ = ["extract_json"]
