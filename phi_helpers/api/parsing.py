"""Get the JSON out of a model answer.

Asked for JSON, models often wrap it: "Here's the extracted data:" followed by a fenced code block,
or JSON followed by an explanation. ``extract_json`` finds the JSON and parses it:

1. the first fenced block marked as JSON (three backticks followed by ``json``) is parsed;
2. otherwise the first plain fenced block that parses as JSON;
3. otherwise the first balanced JSON object ``{...}`` or array ``[...]`` anywhere in the text.

The search takes time roughly linear in the length of the answer, however many braces it holds;
JSON nested deeper than ``MAX_JSON_DEPTH`` levels, or with an integer longer than Python reads
(``sys.get_int_max_str_digits()``, 4300 digits), is refused with a JSONExtractionError.

Invalid JSON is never "repaired" (a guessed fix could silently change your data): you get a
``JSONExtractionError`` that shows where parsing failed, and ``error.text`` keeps the whole answer.
"""

import json
import re
import sys

from ..errors import JSONExtractionError

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n`]*\n(.*?)```", re.DOTALL)
_BRACKET_OPEN = re.compile(r"[{\[]")
_STRUCTURE = re.compile(r'["{}\[\]]')  # what changes the nesting, outside strings
_STRING_END = re.compile(r'["\\]')  # what ends (or escapes inside) a string
MAX_JSON_DEPTH = 100
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
    except RecursionError:
        raise _too_deep_error(text) from None
    except json.JSONDecodeError as error:  # before ValueError, of which it is a kind
        raise JSONExtractionError(
            f"The ```json block in the answer is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}: {_context(block, error.pos)}. {_ADVICE}",
            text=text,
        ) from None
    except ValueError:  # the decoder's only other error: an integer too long to read
        raise _too_long_number_error(text) from None
    if not isinstance(value, (dict, list)):
        raise JSONExtractionError(
            f"The ```json block holds a {type(value).__name__} ({block.strip()[:40]!r}), not an object or array. "
            + _ADVICE,
            text=text,
        )
    return value


def _first_json_value(text: str) -> dict | list:
    """Return the first value that parses at a ``{`` or ``[``, from left to right.

    Decoding at every bracket would take quadratic time on brace-heavy text, so the brackets are
    matched first (``_match_brackets``, one pass, strings respected): a start whose brackets never
    close cannot parse and is not tried, and a start nested inside a failed attempt, before the
    place where it failed, would fail at the same place and is not tried either. ``raw_decode``
    parses one value and ignores whatever follows it, so trailing prose is fine. If nothing parses,
    the error reports the attempt that got furthest: most likely the JSON the model meant to write.
    """
    decoder = json.JSONDecoder()
    ends: dict[int, tuple[int | None, int]] = {}  # start -> (end after its closing bracket or None, scan)
    stops: dict[int, int] = {}  # scan -> where it stopped
    too_deep = False  # some brackets nest deeper than MAX_JSON_DEPTH
    failures = []  # (error position, scan) of failed attempts whose error lies beyond the current start
    best = None  # (position, message) of the failure that got furthest
    for match in _BRACKET_OPEN.finditer(text):
        start = match.start()
        first_of_scan = start not in ends
        if first_of_scan:
            stops[start], deep = _match_brackets(text, start, ends, scan=start)
            if deep:  # nothing inside may be taken for the answer's JSON
                too_deep = True
                continue
        end, scan = ends[start]
        failures = [failure for failure in failures if failure[0] > start]
        # the parser of a failed attempt went through this start as a value and failed inside it
        doomed = any(f_scan == scan and (end is None or end > f_pos) for f_pos, f_scan in failures)
        if (end is None or doomed) and not first_of_scan:
            continue
        # decode a slice that ends where the brackets do: an error's line/column cost the length before it
        try:
            value, _end = decoder.raw_decode(text[start : end or stops[scan]])
            return value
        except RecursionError:
            raise _too_deep_error(text) from None
        except json.JSONDecodeError as error:  # before ValueError, of which it is a kind
            failures.append((start + error.pos, scan))
            if best is None or start + error.pos > best[0]:
                best = (start + error.pos, error.msg)
        except ValueError:  # the decoder's only other error: an integer too long to read
            raise _too_long_number_error(text) from None
    if too_deep:
        raise _too_deep_error(text)
    if best is None:
        raise JSONExtractionError(
            f"No JSON found in the answer: it has no '{{' or '['. The answer starts with {text.strip()[:80]!r}. "
            + _ADVICE,
            text=text,
        )
    best_error = json.JSONDecodeError(best[1], text, best[0])
    cut_off = ""
    ran_out = best_error.pos >= len(text.rstrip())  # the parser ran out of text
    if ran_out or best_error.msg.startswith("Unterminated string"):  # or a string never closes
        cut_off = " (the answer ends there: was it cut off by max_new_tokens?)"
    raise JSONExtractionError(
        f"The answer contains JSON-like text that does not parse: {best_error.msg} at line {best_error.lineno}, "
        f"column {best_error.colno}{cut_off}: {_context(text, best_error.pos)}. {_ADVICE}",
        text=text,
    )


def _match_brackets(text: str, start: int, ends: dict, scan: int) -> tuple[int, bool]:
    """Match the brackets from ``text[start]`` on, as a JSON parser starting there would see them.

    Records in ``ends`` every bracket met outside a string: ``(index after its closing bracket, scan)``,
    or ``(None, scan)`` when it cannot start a value: it never closes (end of text, or a closing
    bracket of the other kind), or it is part of a structure nested deeper than ``MAX_JSON_DEPTH``.
    Stops when the bracket at ``start`` closes; returns where it stopped and whether it was too deep.
    Each scan sees strings from its own start, which is why a bracket inside a string of one scan
    starts a scan of its own.
    """
    stack, seen = [], []
    deep = False
    position = start
    while (found := _STRUCTURE.search(text, position)) is not None:
        char, position = found.group(), found.end()
        if char == '"':  # skip the string, escapes included
            while (quote := _STRING_END.search(text, position)) is not None and quote.group() == "\\":
                position = quote.end() + 1
            if quote is None:  # the string never ends
                position = len(text)
                break
            position = quote.end()
        elif char in "{[":
            stack.append(found.start())
            seen.append(found.start())
            deep |= len(stack) > MAX_JSON_DEPTH
        else:
            opener = stack.pop()
            if text[opener] + char not in ("{}", "[]"):
                stack.append(opener)
                break
            ends.setdefault(opener, (position, scan))
            if not stack:
                break
    else:
        position = len(text)
    for opener in stack if not deep else seen:
        if opener not in ends or ends[opener][1] == scan:
            ends[opener] = (None, scan)
    return position, deep


def _too_deep_error(text: str) -> JSONExtractionError:
    return JSONExtractionError(
        f"The answer holds JSON nested more than {MAX_JSON_DEPTH} levels deep, which is refused. {_ADVICE}", text=text
    )


def _too_long_number_error(text: str) -> JSONExtractionError:
    return JSONExtractionError(
        f"The answer holds a number of more than {sys.get_int_max_str_digits()} digits, which Python does not read "
        "and no value is (most likely the model repeated a digit until it was stopped). Ask for such a value as a "
        'string (an id, a code), or bound it in the schema ("maximum").',
        text=text,
    )


def _context(text: str, position: int, width: int = 30) -> str:
    """A short excerpt around ``position`` with a marker where parsing failed."""
    before = text[max(position - width, 0) : position]
    after = text[position : position + width]
    return repr(before + " <-- HERE --> " + after)


__all__ = ["extract_json"]
