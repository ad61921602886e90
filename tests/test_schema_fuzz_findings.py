"""What a property-based review found by fuzzing about 650 schemas: schemas that were accepted, and then made
even the tiny random model write JSON that does not parse or does not validate. The promise is that an accepted
schema makes any model write a valid answer, and that an unusable one is refused before generating, saying
what to do.

Most tests drive the real grammar, compiled for the real tokenizer: a random walk over the token mask of the
logits processor writes what a model with uniform scores would (``random_answers``), and xgrammar's matcher
says which texts the grammar allows. A few run the tiny model with seeds that hit the case before the fix.
"""

import json
import math
import random
import re

import pytest
import torch
import xgrammar

from phi_helpers import JSONExtractionError, JSONTruncatedError, SchemaError, SchemaNotSupportedError, extract
from phi_helpers.api import constrained
from phi_helpers.api.constrained import (
    allowed_next_tokens, check_supported, compile_schema, read_answer, whole_value_pattern,
)
from phi_helpers.api.generation import Generation
from phi_helpers.api.structured import check_schema, check_schema_type
from phi_helpers.cli.tasks import _constrained_result
from phi_helpers.errors import InvalidArgumentError

VOCAB, STOP = 32064, [32007]  # the model's vocabulary, <|end|>
JSON_ESCAPED = [chr(code) for code in range(0x20)] + ['"', "\\"]  # what a JSON string never holds as it is


def root(value: dict, **keywords) -> dict:
    """An extraction schema whose one required property, ``a``, is ``value``."""
    return {"type": "object", "properties": {"a": value}, "required": ["a"], **keywords}


def random_answers(tokenizer, schema: dict, walks: int, seed: int = 0, max_tokens: int = 40) -> list[str]:
    """The finished answers of ``walks`` random walks over the token mask of ``schema``, as the logits processor
    ``SchemaConstraint`` applies it (a batch of ``walks`` rows): at each step a token whose score the mask left
    alone, chosen at random (the stop token half the time it is allowed, a one-character token most other
    times, so that walks end). What a model with uniform scores writes: ANY allowed text can come out."""
    constraint = constrained.SchemaConstraint(compile_schema(tokenizer, schema, VOCAB, STOP))
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    short = {index for index, piece in enumerate(pieces) if piece and (len(piece.replace("▁", " ")) <= 1 or piece.startswith("<0x"))}
    rng = random.Random(seed)
    rows = [[1] for _ in range(walks)]  # the prompt's last token, then the answer
    for _ in range(max_tokens):
        scores = constraint(torch.tensor(rows), torch.zeros(walks, VOCAB))
        for row, written in enumerate(rows):
            if STOP[0] in written:
                written.append(STOP[0])  # finished: padded, as generate does
                continue
            allowed = (scores[row] == 0).nonzero().flatten().tolist()
            short_ones = [token for token in allowed if token in short]
            draw = rng.random()
            written.append(STOP[0] if STOP[0] in allowed and draw < 0.5 else rng.choice(short_ones) if short_ones and draw < 0.8
                           else rng.choice(allowed))
    answers = [tokenizer.decode(written[1 : written.index(STOP[0])], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
               for written in rows if STOP[0] in written]
    assert len(answers) >= walks // 3, "too few walks finished to prove anything"
    return answers


def assert_valid(answers: list[str], schema: dict) -> None:
    """Each answer parses as strict JSON (no NaN, no Infinity) and validates: ``read_answer`` returns it (it raises
    JSONTruncatedError or JSONExtractionError otherwise; a number read as infinity is a validation error)."""
    for answer in answers:
        read_answer(answer, schema)
        json.loads(answer, parse_constant=lambda constant: pytest.fail(f"{constant} in {answer!r}"))


def grammar_accepts(schema: dict, text: str) -> bool:
    """Whether the grammar of ``schema`` allows ``text`` as a whole answer (xgrammar's matcher, on text)."""
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False)
    matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(constrained.json_grammar(schema)), terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


def refusal(schema: dict) -> str:
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(schema)
    return str(caught.value)


# --- 1. every number the grammar writes is a finite 64-bit float (before: 1e999, read as infinity) ------------------

ANY_NUMBER = [
    {"type": "number"}, {"type": ["number", "null"]}, {"anyOf": [{"type": "number"}, {"type": "null"}]},
    {"type": ["integer", "number"]}, {}, {"type": "number", "maximum": 1e400}, {"type": "number", "minimum": 0},
    {"type": "object"}, {"type": "array", "items": {}},
]


@pytest.mark.parametrize("value", ANY_NUMBER, ids=[json.dumps(value) for value in ANY_NUMBER])
def test_the_grammar_writes_no_number_a_float_cannot_hold(value):
    """xgrammar's number without bounds takes any exponent and any count of digits: 52187e49605912 and a 400-digit
    number with a fraction read as infinity. Now every number gets bounds, so the grammar writes plain decimals."""
    schema = root(value)
    place = '{"a":{"x":NUMBER}}' if value.get("type") == "object" else '{"a":[NUMBER]}' if "items" in value else '{"a":NUMBER}'
    for number in ("1e999", "-5.736e3265452598", "1" + "0" * 400 + ".5", "1E5"):
        assert not grammar_accepts(schema, place.replace("NUMBER", number)), number
    assert grammar_accepts(schema, place.replace("NUMBER", "2.5"))


@pytest.mark.parametrize("value", ANY_NUMBER[:6] + ANY_NUMBER[7:], ids=[json.dumps(value) for value in ANY_NUMBER[:6] + ANY_NUMBER[7:]])
def test_random_answers_with_free_numbers_parse_finite_and_validate(cli_model_and_processor, value):
    """(Not "minimum": 0 alone: its 400-digit numbers take more tokens than a walk has.)"""
    schema = root(value)
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=30, seed=1), schema)


def test_a_side_without_a_bound_gets_ten_to_the_eighteen():
    """Python refuses to read an integer of more than 4,300 digits (a plain ValueError before)."""
    for kind in ("integer", "number"):
        schema = root({"type": kind})
        assert grammar_accepts(schema, '{"a":1000000000000000000}') and grammar_accepts(schema, '{"a":-1000000000000000000}')
        assert not grammar_accepts(schema, '{"a":1000000000000000001}') and not grammar_accepts(schema, '{"a":' + "9" * 5000 + "}")
    beyond = root({"type": "integer", "minimum": 2 * 10**18})  # the other bound beyond it: the end of the int64s
    assert grammar_accepts(beyond, '{"a":9223372036854775807}') and not grammar_accepts(beyond, '{"a":9223372036854775808}')
    cut = root({"type": "number", "maximum": 1e300})  # xgrammar's bounded numbers lose digits past 2**63: cut
    assert grammar_accepts(cut, '{"a":1000000000000000000}') and not grammar_accepts(cut, '{"a":2000000000000000000}')


def test_a_number_range_beyond_what_the_grammar_writes_is_refused():
    """Between 1e20 and 1e22 xgrammar allowed only 1e20; above "minimum": 1e20 (with the float's end as the other
    bound) nothing at all."""
    assert "minimum 1e+20 leaves only numbers beyond those the grammar writes (within ±1,000,000,000,000,000,000" in \
        refusal(root({"type": "number", "minimum": 1e20}))
    assert "exclusiveMaximum -1e+18 leaves only numbers beyond" in refusal(root({"type": "number", "exclusiveMaximum": -1e18}))
    check_supported(root({"type": "number", "maximum": -1e18}))  # -10**18 itself


def test_json_python_cannot_read_is_a_typed_error():
    with pytest.raises(JSONExtractionError, match="Python cannot read"):
        read_answer('{"a":' + "9" * 5000 + "}", root({"type": "integer"}))
    with pytest.raises(JSONExtractionError, match="deeper than Python's json module reads"):
        read_answer('{"a":' + "[" * 5000 + "]" * 5000 + "}", root({}))


def test_sampled_numbers_of_the_tiny_model_are_finite(cli_model_and_processor):
    """Seeds 2 and 4 wrote 3e190846594 and -5.736e3265452598: JSONExtractionError "Please report this"."""
    model, processor = cli_model_and_processor
    schema = root({"type": "number"})
    for seed in (2, 4):
        torch.manual_seed(seed)
        data = extract(model, processor, "Extract.", schema, max_new_tokens=24, do_sample=True, temperature=3.0, top_k=0)
        assert math.isfinite(data["a"])


def test_numbers_are_written_with_six_digits_after_the_point_at_most():
    """The documented price of bounding every number: no exponent, at most 6 digits after the point."""
    schema = root({"type": "number"})
    assert grammar_accepts(schema, '{"a":0.000001}') and grammar_accepts(schema, '{"a":123456789012.123456}')
    assert not grammar_accepts(schema, '{"a":0.0000001}') and not grammar_accepts(schema, '{"a":1e-7}')


# --- 2. a pattern's ".", "\s" and "[^...]" never write a quote, backslash or control character -----------------------

LEAKY_PATTERNS = [
    "^Nº .{1,6}$", "€", "^.{1,4}€$", "^😀.{0,3}$", "^[^α]{0,3}$", "^é\\s{0,2}$",
    "^[[:digit:]]{0,2}.{0,3}$", "^.{0,2}]$", "]", "^\\é.{0,2}$",
]


@pytest.mark.filterwarnings("ignore:Possible nested set")  # Python's re on [[:digit:]]: a class of "[", ":"...
@pytest.mark.parametrize("pattern", LEAKY_PATTERNS)
def test_a_pattern_with_characters_beyond_ascii_or_a_lone_bracket_writes_only_json(pattern):
    """xgrammar 0.2.9 dropped the exclusion of quotes, backslashes and control characters from the ".", "\\s" and
    "[^...]" of a pattern holding a character beyond ASCII (written as it is) or a "]" outside a class: "Nº .{1,6}"
    allowed '{"invoice":"Nº Tommy\\x19"}'. Now those are written \\u{...} and \\] for xgrammar."""
    schema = root({"type": "string", "pattern": pattern})
    fills = ["", "a", "é", "Nº ", "€", "😀", "d]", "12"]
    leaks = [before + char + after for char in JSON_ESCAPED for before in fills for after in ("", "€", "a", "]")
             if grammar_accepts(schema, '{"a":"' + before + char + after + '"}')]
    assert leaks == []


@pytest.mark.filterwarnings("ignore:Possible nested set")
@pytest.mark.parametrize("pattern", [pattern for pattern in LEAKY_PATTERNS if pattern.startswith("^")])  # walks end
def test_random_answers_to_such_patterns_parse_and_validate(cli_model_and_processor, pattern):
    schema = root({"type": "string", "pattern": pattern})
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=20, seed=2), schema)


def test_characters_beyond_ascii_are_written_as_unicode_escapes_for_xgrammar():
    assert whole_value_pattern("^Nº [α-ω]😀]$") == "(?:N\\u{BA} [\\u{3B1}-\\u{3C9}]\\u{1F600}\\])"
    assert whole_value_pattern("€") == ".*(?:\\u{20AC}).*"


def test_sampled_answers_of_the_tiny_model_to_a_euro_pattern_are_json(cli_model_and_processor):
    """Seeds 7, 11 and 12 wrote '{"price":":{"라€"}' and the like: a raw quote, invalid JSON."""
    model, processor = cli_model_and_processor
    schema = {"type": "object", "properties": {"price": {"type": "string", "pattern": "^.{1,4}€$"}}, "required": ["price"]}
    for seed in (7, 11, 12):
        torch.manual_seed(seed)
        data = extract(model, processor, "What is the price?", schema, max_new_tokens=64, do_sample=True, temperature=2.0)
        assert re.search("^.{1,4}€$", data["price"]) and not set(data["price"]) & set(JSON_ESCAPED)


@pytest.fixture
def leaky_grammar(monkeypatch):
    """The grammar the old rewrite built for "^Nº .{1,6}$" (the pattern given to xgrammar as it is), which lets
    a raw control character into a complete answer: what a bug in the grammar engine looks like."""
    schema = {"type": "object", "properties": {"invoice": {"type": "string", "pattern": "^Nº .{1,6}$"}}, "required": ["invoice"]}
    raw = xgrammar.Grammar.from_json_schema(json.dumps(root({"type": "string", "pattern": "Nº .{1,6}"})).replace('"a"', '"invoice"'),
                                            any_whitespace=False, separators=(",", ":"), strict_mode=True)
    monkeypatch.setattr(constrained, "_supported_grammar", lambda _schema: raw)
    return schema


def test_an_answer_that_ended_where_the_grammar_allows_but_does_not_parse_is_not_called_cut_off(leaky_grammar):
    """Before: every answer that did not parse was a JSONTruncatedError, "it ran out of max_new_tokens ... raise
    max_new_tokens", which cannot help when the model ended its turn on a complete (but invalid) answer."""
    with pytest.raises(JSONExtractionError, match="complete for the grammar but is not valid JSON") as caught:
        read_answer('{"invoice":"Nº Tommy\x19"}', leaky_grammar)
    assert "max_new_tokens" not in str(caught.value)
    with pytest.raises(JSONTruncatedError, match="max_new_tokens"):  # a real cut-off: the grammar is not complete
        read_answer('{"invoice":"Nº Tom', leaky_grammar)


def test_the_command_line_reports_such_an_answer_as_invalid_not_cut_off(leaky_grammar):
    def result(text):
        generation = Generation(text=text, prompt_tokens=10, generated_tokens=9, seconds_to_first_token=0.1, seconds=1.0, batch_size=1)
        return _constrained_result("Extract.", generation, leaky_grammar)

    invalid = result('{"invoice":"Nº Tommy\x19"}')
    assert invalid["valid"] is False and "not valid JSON" in invalid["errors"][0] and "cut off" not in invalid["errors"][0]
    assert "cut off by max_new_tokens (9 tokens)" in result('{"invoice":"Nº T')["errors"][0]


# --- 3. a pattern next to format "date" ------------------------------------------------------------------------------

def test_a_pattern_next_to_a_date_that_the_grammar_would_not_enforce_is_refused_with_advice():
    """The grammar writes the date pattern in place of the user's: "(01|14|29|31)$" was accepted (it matches the
    4 sample dates the check tried), then every answer failed it."""
    message = refusal(root({"type": "string", "format": "date", "pattern": "(01|14|29|31)$"}))
    assert "(root)/properties/a: a pattern next to format 'date' ('(01|14|29|31)$')" in message
    assert "keep one of them (format 'date', or the pattern alone) and check the other after extraction" in message
    for shape in (r"^\d{4}-\d{2}-\d{2}$", "[0-9]{4}-[0-9]{2}-[0-9]{2}", constrained.DATE_PATTERN):  # a date's shape: kept
        check_supported(root({"type": "string", "format": "date", "pattern": shape}))


def test_random_dates_with_a_date_shaped_pattern_validate(cli_model_and_processor):
    schema = root({"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"})
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=12, seed=3), schema)


# --- 4. enum and const values the grammar cannot write as themselves --------------------------------------------------

@pytest.mark.parametrize("value, part", [
    ({"enum": [12345678901234567890]}, "12345678901234567890"), ({"enum": ["x", -(2**63) - 1]}, str(-(2**63) - 1)),
    ({"const": 10**30}, str(10**30)), ({"const": {"k": [2**64]}}, str(2**64)),
])
def test_enum_integers_beyond_64_bits_are_refused_with_advice(value, part):
    """xgrammar wrote 12345678901234567890 as 1.2345678901234567e+19, another number: every answer failed."""
    message = refusal(root(value))
    assert f"holds {part}" in message or f"value {part}:" in message
    assert f'an integer beyond the signed 64-bit range, which the grammar would write as a float (another number): write it as a string ("{part}")' in message


def test_enum_integers_within_64_bits_are_written_exactly(cli_model_and_processor):
    schema = root({"enum": [2**63 - 1, -(2**63), 2**53 + 1]})
    answers = random_answers(cli_model_and_processor[1].tokenizer, schema, walks=12, seed=4)
    assert_valid(answers, schema)
    assert {json.loads(answer)["a"] for answer in answers} <= {2**63 - 1, -(2**63), 2**53 + 1}


# --- 5. exclusive bounds that a 6-digit fraction rounds onto ----------------------------------------------------------

def test_an_exclusive_bound_is_never_written_as_a_number_that_reads_back_as_the_bound(cli_model_and_processor):
    """xgrammar wrote 10000000000000000.3 above "exclusiveMinimum": 1e16, which Python reads as 1e16 itself."""
    schema = root({"type": "number", "exclusiveMinimum": 1e16, "maximum": 10000000000000002})
    assert not grammar_accepts(schema, '{"a":10000000000000000.3}') and not grammar_accepts(schema, '{"a":10000000000000001}')
    assert grammar_accepts(schema, '{"a":10000000000000002}')
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=12, seed=5), schema)
    below = root({"type": "number", "minimum": -3e10 - 1, "exclusiveMaximum": -3e10})
    assert not grammar_accepts(below, '{"a":-30000000000.000001}') and grammar_accepts(below, '{"a":-30000000000.000004}')
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, below, walks=12, seed=5), below)


@pytest.mark.parametrize("value", [
    {"type": "number", "minimum": 0.1234567, "maximum": 0.1234568},
    {"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.5000001},
    {"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 0.5000000000000001},
], ids=["inclusive", "exclusive-low", "no-float-inside"])
def test_a_range_with_no_number_of_six_digits_after_the_point_is_refused(value):
    """xgrammar built a grammar that allows no number there at all (nothing for the model to write)."""
    message = refusal(root(value))
    assert "leave no number with at most 6 digits after the point, which is how the grammar writes numbers" in message
    assert "widen the range, or drop the bound" in message


# --- 6. \s and \S as Python's re reads them ---------------------------------------------------------------------------

def test_whitespace_class_is_pythons_whitespace_without_control_characters():
    members = re.sub(r"\\u\{([0-9A-F]+)\}", lambda found: chr(int(found[1], 16)), constrained._WHITESPACE_CLASS)
    spelled = re.compile(f"[{members}]")
    assert [code for code in range(0x20, 0x110000) if spelled.fullmatch(chr(code))] == \
        [code for code in range(0x20, 0x110000) if re.fullmatch(r"\s", chr(code))]


@pytest.mark.parametrize("pattern, allowed, refused", [
    ("^a\\s$", ["a ", "a\u0085", "a\u3000"], ["a\ufeff", "a\t"]), ("^a\\S$", ["ab", "a\ufeff"], ["a\u0085", "a "]),
    ("^a[^\\s]$", ["ab", "a\ufeff"], ["a\u0085"]), ("^a[\\s\\d]$", ["a1", "a\u0085"], ["a\ufeff"]),
])
def test_s_and_S_allow_what_pythons_re_allows(pattern, allowed, refused):
    """xgrammar's \\s allowed U+FEFF (which re's \\s refuses) and its \\S U+0085 (which re's \\S refuses)."""
    schema = root({"type": "string", "pattern": pattern})
    for value in allowed + refused:
        assert grammar_accepts(schema, json.dumps({"a": value}, ensure_ascii=False, separators=(",", ":"))) is (value in allowed), value
        assert (re.search(pattern, value) is not None) is (value in allowed or value == "a\t"), value  # \t: JSON escapes it


def test_S_inside_a_class_is_refused_with_what_to_write():
    message = refusal(root({"type": "string", "pattern": "^[\\S-]+$"}))
    assert "\\S inside [...] in a pattern" in message and "write \\S outside the class" in message


def test_w_and_d_allow_ascii_only_as_documented():
    for pattern, ascii_only, other in (("^\\w$", "a", "é"), ("^\\d$", "7", "\u0663")):
        schema = root({"type": "string", "pattern": pattern})
        assert grammar_accepts(schema, '{"a":"' + ascii_only + '"}') and not grammar_accepts(schema, '{"a":"' + other + '"}')


# --- 7. number formats next to null, and values JSON cannot hold -------------------------------------------------------

def test_a_number_format_next_to_null_is_an_annotation(cli_model_and_processor):
    """Refused before, with the advice to use a string pattern."""
    schema = root({"type": ["number", "null"], "format": "double"})
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=12, seed=6), schema)


@pytest.mark.parametrize("value, message", [
    ({"const": float("inf")}, "const value Infinity: not a JSON number (JSON has no NaN or Infinity): remove it"),
    ({"enum": [1, float("nan")]}, "enum value NaN: not a JSON number"),
    ({"const": "\ud800"}, 'const value "\\ud800": a lone surrogate, which is not a character'),
    ({"enum": [{"k": "\udc00"}]}, 'enum value {"k": "\\udc00"} holds "\\udc00": a lone surrogate'),
    ({"type": "string", "pattern": "^\\ud800$"}, "a lone surrogate in a pattern"),
])
def test_values_json_cannot_hold_are_named(value, message):
    """Before: xgrammar's own "Failed to parse JSON ... Infinity", naming no value."""
    text = refusal(root(value))
    assert f"(root)/properties/a: {message}" in text and "Failed to parse" not in text


def test_a_property_name_with_a_lone_surrogate_is_named():
    text = refusal({"type": "object", "properties": {"\ud800": {"type": "integer"}}})
    assert '(root)/properties: the name "\\ud800" holds a lone surrogate' in text and "Failed to parse" not in text


# --- 8. messages ---------------------------------------------------------------------------------------------------

def test_a_prefix_that_is_not_an_answer_is_an_invalid_argument_with_advice(cli_model_and_processor):
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, root({"type": "integer", "minimum": 0, "maximum": 9}), VOCAB, STOP)
    with pytest.raises(InvalidArgumentError, match="not the beginning of an answer .* such as '\\{\"name\":'"):
        allowed_next_tokens(tokenizer, grammar, '{"b":')


@pytest.mark.parametrize("value, advice", [
    ({"type": "number", "multipleOf": 2}, "remove it and check the value after extraction"),
    ({"type": "string", "format": "hostname"}, 'use "type": "string" with a "pattern"'),
    ({"not": {"type": "null"}}, "remove it and check the value after extraction"),
])
def test_each_refusal_gives_its_advice_once(value, advice):
    text = refusal(root(value))
    assert text.count(advice) == 1 and "check them yourself" not in text
    assert text.endswith("Otherwise, use the unconstrained path (the command line's --no-constrain, in Python ask() without a "
                         "schema or predict_dataset(..., constrain=False)). Supported: see help(phi_helpers.api.constrained).")


@pytest.mark.parametrize("schema, advice", [
    (None, "for a free answer, use ask() without a schema"), ('{"type": "object"}', "JSON text becomes a dict with json.loads(text)"),
    ([{"type": "object"}], 'a schema is one JSON object, such as {"type": "object"'),
])
def test_a_schema_that_is_not_a_dict_is_refused_in_one_wording(schema, advice):
    for check in (check_schema_type, check_schema, check_supported):
        with pytest.raises(SchemaError, match=re.escape(f"A JSON Schema must be a dict, got {type(schema).__name__}: {advice}")):
            check(schema)


# --- found again by the re-run of the review's random walks: a surrogate's bytes in a string ----------------------------

def test_no_surrogate_bytes_follow_a_byte_ed_in_a_string(cli_model_and_processor):
    """xgrammar allows the bytes ED A0..BF .. (a surrogate code point, not UTF-8) in any string; a walk wrote
    '{"a":"エ종ව' + <0xED><0xAE><0xB7> + <0x22><0x7D>, which decodes as 'エ종ව�����': the quote was lost. The
    logits processor masks A0..BF after a byte ED (80..9F stay: U+D000 to U+D7FF are characters)."""
    model, processor = cli_model_and_processor
    tokenizer = processor.tokenizer
    constraint = constrained.SchemaConstraint(compile_schema(tokenizer, root({"type": "string"}), VOCAB, STOP))
    written = [1]  # the prompt's last token
    scores = constraint(torch.tensor([written]), torch.zeros(1, VOCAB))
    for piece in ["{", "<0x22>", "a", '"', "<0x3A>", "<0x22>", "<0xED>"]:
        token = tokenizer.convert_tokens_to_ids(piece)
        assert scores[0, token] == 0, piece  # allowed
        written.append(token)
        scores = constraint(torch.tensor([written]), torch.zeros(1, VOCAB))
    byte = {value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>") for value in range(0x80, 0xC0)}
    assert all(scores[0, byte[value]] == -math.inf for value in range(0xA0, 0xC0))
    assert all(scores[0, byte[value]] == 0 for value in range(0x80, 0xA0))
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("<0xED>"), byte[0x9F], byte[0xBF]]) == "\ud7ff"  # a character
