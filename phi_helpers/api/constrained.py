"""Constrained decoding: the model can only write JSON that follows your JSON Schema.

    from phi_helpers import extract
    data = extract(model, processor, "Extract the passport fields.", schema, images=[passport])

Asked nicely for JSON, a model usually writes it, but nothing forces it to: a cut-off answer, a
comment before the JSON, a missing field or a wrong type are all possible. Constrained decoding
removes that possibility. Before each new token, the JSON Schema, compiled into a grammar, says
which tokens may come next; every other token gets the score ``-inf`` (the *token mask*), so it
cannot be chosen, greedy or sampled. The answer therefore always parses and validates, unless it is
cut off by ``max_new_tokens`` (then ``JSONTruncatedError``, which keeps the partial text).

The grammar engine is xgrammar (the one vLLM and SGLang use): it compiles a schema in milliseconds
and computes a mask in microseconds, so decoding costs about the same as without it
(docs/structured-output.md has the numbers). Answers are compact JSON (no spaces) with the
properties in the schema's order.

The JSON Schema subset that is enforced (anything else is refused before generating, with
``SchemaNotSupportedError``):

* the root is an object (``"type": "object"``), because ``extract`` returns a dict;
* ``type`` (one or a list), ``properties``, ``required``, ``additionalProperties`` (true, false or
  a schema; when absent, no extra properties are written), ``items``, ``minItems``, ``maxItems``,
  ``enum``, ``const``, ``anyOf``, ``pattern`` (regular expressions without look-arounds or
  back-references), ``minLength`` and ``maxLength`` (not next to a ``pattern``), ``minimum``, ``maximum``, ``exclusiveMinimum``,
  ``exclusiveMaximum``, ``format: "date"`` (real calendar dates, leap years included), and ``$ref``
  to ``#/$defs/...`` or ``#/definitions/...``;
* annotations are allowed and ignored: ``$schema``, ``$id``, ``$comment``, ``title``,
  ``description``, ``default``, ``examples``.

What the mask cannot do: make the values right. A passport number that follows the pattern can
still be misread; check values against the document (notebook 02b, the MRZ check digits).
"""

import importlib.util
import json
import re
import weakref

import torch
import xgrammar
from transformers import LogitsProcessor

from ..errors import JSONExtractionError, JSONTruncatedError, SchemaNotSupportedError
from .structured import check_schema, validation_errors

ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples", "$defs", "definitions"})
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
    "anyOf", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "format", "$ref",
})
SUPPORTED_FORMATS = ("date",)

# format "date": a real calendar date YYYY-MM-DD (years 0001-9999, 29 February only in leap years).
# xgrammar's own "date" rule allows e.g. 2023-11-31, which a JSON Schema validator rejects.
_YEAR = r"([1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(\d{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = r"((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"
DATE_PATTERN = rf"^({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)$"
_SAMPLE_DATES = ("0001-01-01", "1988-03-14", "2024-02-29", "9999-12-31")  # a date pattern must accept these

# JSON text written by the model: no spaces, properties in the schema's order (short, stable answers).
SEPARATORS = (",", ":")


def check_supported(schema) -> None:
    """Raise ``SchemaNotSupportedError`` (listing every problem) unless constrained decoding enforces all of ``schema``."""
    try:
        check_schema(schema)
    except ValueError as error:
        raise SchemaNotSupportedError(str(error)) from None
    problems = []
    if schema.get("type") != "object":
        problems.append('(root): the root must be "type": "object" (extract returns a dict)')
    _collect_problems(schema, "(root)", problems)
    if problems:
        raise SchemaNotSupportedError(
            "This JSON Schema uses features that constrained decoding cannot enforce: " + "; ".join(problems)
            + ". Remove them (or check them yourself after extraction), or use the unconstrained path "
            "(the command line's --no-constrain). Supported: see help(phi_helpers.api.constrained)."
        )


def _collect_problems(schema, where: str, problems: list[str]) -> None:
    """Walk ``schema`` and append a message for every keyword, format or $ref that is not supported."""
    if not isinstance(schema, dict):
        problems.append(f"{where}: a boolean schema ({json.dumps(schema)}) is only supported as additionalProperties")
        return
    for keyword in sorted(set(schema) - SUPPORTED_KEYWORDS - ANNOTATIONS):
        problems.append(f"{where}: {keyword!r}")
    if "format" in schema and schema["format"] not in SUPPORTED_FORMATS:
        problems.append(f"{where}: format {schema['format']!r} (only {', '.join(SUPPORTED_FORMATS)})")
    if schema.get("format") == "date" and "pattern" in schema:
        pattern = re.compile(schema["pattern"])
        if not all(pattern.search(date) for date in _SAMPLE_DATES):
            problems.append(f"{where}: a pattern next to format 'date' must accept every YYYY-MM-DD date")
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        problems.append(f"{where}: minLength/maxLength next to a pattern (put the length into the pattern)")
    if "pattern" in schema and re.search(r"\(\?<?[=!]|\\[1-9]|\(\?P=", schema["pattern"]):
        problems.append(f"{where}: a pattern with a look-around or back-reference ({schema['pattern']!r})")
    ref = schema.get("$ref")
    if ref is not None and not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", str(ref)):
        problems.append(f"{where}: $ref {ref!r} (only '#/$defs/NAME' or '#/definitions/NAME')")
    for name, sub in schema.get("properties", {}).items():
        _collect_problems(sub, f"{where}/properties/{name}", problems)
    for key in ("$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            _collect_problems(sub, f"{where}/{key}/{name}", problems)
    if isinstance(schema.get("additionalProperties"), dict):
        _collect_problems(schema["additionalProperties"], f"{where}/additionalProperties", problems)
    if "items" in schema:
        _collect_problems(schema["items"], f"{where}/items", problems)
    for index, sub in enumerate(schema.get("anyOf", [])):
        _collect_problems(sub, f"{where}/anyOf/{index}", problems)


def _grammar_schema(schema):
    """A copy of ``schema`` for the grammar compiler: ``format: "date"`` becomes ``DATE_PATTERN``."""
    if isinstance(schema, list):
        return [_grammar_schema(value) for value in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: _grammar_schema(value) for key, value in schema.items()}
    if copy.get("format") == "date":
        del copy["format"]
        copy["pattern"] = DATE_PATTERN  # a checked pattern next to it accepts every such date
    if "minLength" in copy or "maxLength" in copy:
        # xgrammar 0.2's length-bounded strings let raw control characters through (invalid JSON);
        # the same bounds as a pattern do not. (Refused together with a pattern, see _collect_problems.)
        low, high = copy.pop("minLength", 0), copy.pop("maxLength", "")
        copy["pattern"] = f"^.{{{low},{high}}}$"
    return copy


# One grammar compiler per tokenizer: building it reads the whole vocabulary (about a second).
_COMPILERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grammar_compiler(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgrammar.GrammarCompiler:
    """xgrammar's compiler for ``tokenizer``, cached.

    ``vocab_size`` is the model's (its logits' width): Phi-3-vision's is 32064 while the tokenizer
    knows 32045 tokens; the ids in between have no text and are always masked. ``stop_token_ids``
    (``<|end|>``, ``<|endoftext|>``...) are the only tokens allowed once the JSON is complete.
    """
    key = (vocab_size, tuple(stop_token_ids))
    compilers = _COMPILERS.setdefault(tokenizer, {})
    if key not in compilers:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        compilers[key] = xgrammar.GrammarCompiler(info)
    return compilers[key]


def compile_schema(tokenizer, schema: dict, vocab_size: int, stop_token_ids: list[int]) -> xgrammar.CompiledGrammar:
    """Check ``schema`` (``SchemaNotSupportedError`` if a feature is not enforced) and compile it to a grammar."""
    check_supported(schema)
    compiler = grammar_compiler(tokenizer, vocab_size, stop_token_ids)
    try:
        return compiler.compile_json_schema(
            json.dumps(_grammar_schema(schema)), any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )
    except (RuntimeError, ValueError) as error:  # e.g. a regular expression the grammar cannot express
        raise SchemaNotSupportedError(f"The JSON Schema cannot be compiled to a grammar: {error}") from None


class SchemaConstraint(LogitsProcessor):
    """The token mask as a logits processor for ``model.generate`` (one per ``generate`` call).

    At each step, for each row of the batch: tell the row's grammar matcher which token was chosen
    last, ask it for the bitmask of allowed next tokens (one bit per token id), and set the score of
    every other token to ``-inf``. Rows whose JSON is finished (and stopped) are left alone.
    """

    def __init__(self, grammar: xgrammar.CompiledGrammar):
        self.grammar = grammar
        self.matchers: list[xgrammar.GrammarMatcher] | None = None
        self.bitmask: torch.Tensor | None = None  # (batch, ceil(vocab / 32)) int32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.matchers is None:  # first step: nothing generated yet
            self.matchers = [xgrammar.GrammarMatcher(self.grammar) for _ in range(input_ids.shape[0])]
            self.bitmask = xgrammar.allocate_token_bitmask(input_ids.shape[0], self.grammar.tokenizer_info.vocab_size)
        else:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist()):
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise RuntimeError(f"Token {token} was chosen although the JSON Schema's mask forbids it.")
        for row, matcher in enumerate(self.matchers):
            if matcher.is_terminated():
                self.bitmask[row] = -1  # all bits set: the row is finished, generate pads it
            else:
                matcher.fill_next_token_bitmask(self.bitmask, row)
        return apply_mask(scores, self.bitmask)

    def keep_rows(self, rows: list[int]) -> None:
        """Follow the batch when rows leave it (``generate_batch`` drops finished answers between
        rounds of ``generate``): keep the matchers of ``rows``, in that order. The next call accepts
        the last token of each kept row, as within one round."""
        if self.matchers is not None:
            self.matchers = [self.matchers[row] for row in rows]
            self.bitmask = self.bitmask[: len(rows)]


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
    """
    matcher = xgrammar.GrammarMatcher(grammar)
    if not matcher.accept_string(text):
        raise ValueError(f"{text!r} is not the beginning of an answer that follows the schema.")
    bitmask = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32)) & 1  # (words, 32): bit j of word i is token 32 * i + j
    token_ids = bits.flatten()[: grammar.tokenizer_info.vocab_size].nonzero().flatten().tolist()
    return tokenizer.convert_ids_to_tokens(token_ids)


def read_answer(text: str, schema: dict) -> dict:
    """The dict in a constrained answer; ``JSONTruncatedError`` (with ``.text``) if it was cut off.

    The mask guarantees that the text is the beginning of a valid answer, so the only way for it not
    to parse is that generation stopped early (``max_new_tokens``, or you interrupted it). The
    validation below is a second check that should never fail.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise JSONTruncatedError(
            f"The answer stopped before its JSON was complete ({len(text)} characters): it ran out of "
            "max_new_tokens (or was interrupted). Raise max_new_tokens; error.text keeps the partial answer.",
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


__all__ = ["check_supported", "compile_schema", "SchemaConstraint", "allowed_next_tokens", "read_answer"]
