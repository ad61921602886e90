"""Constrained decoding (phi_helpers.api.constrained) on the tiny random checkpoint.

The tiny model answers random words (see the first test): so every test below that gets valid JSON
out of it proves that the token mask works. Schemas are small and their strings and numbers bounded,
because a random model rarely closes a free-text string within a few dozen tokens.
"""

import datetime
import json
import re

import jsonschema
import pytest
import torch
import xgrammar
from PIL import Image

from phi_helpers import Chat, JSONTruncatedError, SchemaNotSupportedError, ask, extract
from phi_helpers.api.constrained import DATE_PATTERN, SchemaConstraint, allowed_next_tokens, compile_schema
from phi_helpers.api.generation import generate_batch, stream_chunks
from phi_helpers.api.prompts import build_prompt

QUESTION = "Extract the fields of this document as JSON."
TOKENS = 64  # enough to close every schema below

SCHEMAS = {
    "enum_and_integer": {
        "type": "object",
        "properties": {"sex": {"enum": ["F", "M", "X"]}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["sex", "age"],
    },
    "pattern_and_date": {
        "type": "object",
        "properties": {
            "nationality": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "date_of_birth": {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        },
        "required": ["nationality", "date_of_birth"],
    },
    "nested_array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"code": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "price": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["code", "price"],
                },
            },
            "paid": {"type": "boolean"},
        },
        "required": ["items", "paid"],
    },
    "optional_ref_anyof_const": {
        "type": "object",
        "$defs": {"code": {"type": "string", "maxLength": 3}},
        "properties": {
            "kind": {"const": "receipt"},
            "id": {"$ref": "#/$defs/code"},
            "note": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": 9}]},
            "extra": {"type": "string", "maxLength": 2},
        },
        "required": ["kind", "id", "note"],
    },
    "annotations_and_vendor_extensions": {
        "type": "object",
        "x-generator": {"name": "form-builder", "$ref": "elsewhere.json"},
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}$", "readOnly": True, "x-order": 0, "$anchor": "code"},
            "size": {"type": "integer", "minimum": 0, "maximum": 9, "deprecated": True, "writeOnly": True},
            "note": {"type": "string", "maxLength": 3, "contentMediaType": "text/plain", "contentEncoding": "8bit"},
        },
        "required": ["code", "size"],
    },
    # Latin-1 letters before a hex digit: xgrammar's own cache read "\\xdfe" (ß, then e) back as "\\u0dfe", so every
    # answer had the wrong key and failed validation
    "latin_1_keys_and_values": {
        "type": "object",
        "properties": {"Straße": {"enum": ["Größe", "Müller"]}, "Date de création": {"const": "£5 à 21°C"}, "名前": {"type": "boolean"}},
        "required": ["Straße", "Date de création", "名前"],
    },
}


def images():
    return [Image.new("RGB", (64, 48), "white"), Image.new("RGB", (40, 90), "navy"), Image.new("RGB", (80, 80), "orange")]


def check(data, schema):
    assert isinstance(data, dict)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    validator.validate(data)  # raises with the reason if invalid
    assert list(data) == [name for name in schema["properties"] if name in data]  # the schema's order


def answer_batch(model, processor, max_new_tokens, schema=None) -> list[str]:
    """Greedy answers to QUESTION for each of ``images()``, in one batched generate call."""
    batch = images()
    results = generate_batch(model, processor, [build_prompt(QUESTION)] * len(batch), [[im] for im in batch], max_new_tokens, schema=schema)
    return [result.text for result in results]


def test_unconstrained_answers_are_not_json(cli_model_and_processor):
    """Why the rest of this file proves something: without the mask, the tiny model writes no JSON."""
    for answer in answer_batch(*cli_model_and_processor, max_new_tokens=12):
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer)


@pytest.mark.parametrize("name", SCHEMAS)
def test_greedy_answers_validate_for_every_image_in_a_batch(cli_model_and_processor, name):
    schema = SCHEMAS[name]
    for answer in answer_batch(*cli_model_and_processor, max_new_tokens=TOKENS, schema=schema):
        check(json.loads(answer), schema)


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_answers_validate_for_every_seed(cli_model_and_processor, name):
    model, processor = cli_model_and_processor
    schema, image = SCHEMAS[name], images()[0]
    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        data = extract(model, processor, QUESTION, schema, images=[image], max_new_tokens=TOKENS,
                       do_sample=True, temperature=1.5, top_k=50)
        check(data, schema)
        answers.add(json.dumps(data))
    assert len(answers) > 1  # sampling did sample


def test_streaming_and_chat(cli_model_and_processor):
    model, processor = cli_model_and_processor
    schema = SCHEMAS["enum_and_integer"]
    pieces = list(stream_chunks(model, processor, QUESTION, images=images()[:1], max_new_tokens=TOKENS, schema=schema))
    check(json.loads("".join(pieces)), schema)

    chat = Chat()
    chat.add_user(QUESTION, images=images()[1])
    data = extract(model, processor, chat, schema, max_new_tokens=TOKENS)
    check(data, schema)
    assert chat.messages[-1] == {"role": "assistant", "content": json.dumps(data, separators=(",", ":"))}


def test_running_out_of_tokens_is_a_typed_error_with_the_partial_text(cli_model_and_processor):
    model, processor = cli_model_and_processor
    with pytest.raises(JSONTruncatedError, match="max_new_tokens") as caught:
        extract(model, processor, QUESTION, SCHEMAS["nested_array"], images=images()[:1], max_new_tokens=3)
    assert caught.value.text.startswith('{"') and isinstance(caught.value, ValueError)


UNSUPPORTED = [
    ({"type": "array", "items": {"type": "string"}}, 'the root must be "type": "object"'),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}, "(root)/properties/a: 'oneOf': use \"anyOf\""),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not'"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "'uniqueItems': remove it and check"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}}, "format 'hostname' (only date, date-time, time, uuid, ipv4, email): use \"type\": \"string\" with"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\p{Lu}$"}}}, "(root)/properties/a/pattern: '^\\\\p{Lu}$' is not a regular"),
    ({"type": "object", "properties": {"a": {"type": []}}}, "(root)/properties/a/type: [] is not valid"),
    ({"type": "object", "properties": {"a": {"type": "integer", "maximum": 99999999999999999999}}},
     "(root)/properties/a: maximum 99999999999999999999 is outside the integers the grammar can bound"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}, "$ref 'other.json#/x'"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "pattern": "^1"}}}, "a pattern next to format 'date' ('^1')"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?=a)b$"}}}, "look-around"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "Not a valid JSON Schema"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"a": {"type": "array", "items": [{"type": "string"}]}}},
     "(root)/properties/a/items: tuple items"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": 5, "maximum": 1}}}, "(root)/properties/a: minimum 5 and maximum 1 leave no number"),
    ({"type": "object", "properties": {"a": {"enum": [f"C{index:05d}" for index in range(50_000)]}}}, "MAX_SCHEMA_CHARS"),
]


@pytest.mark.parametrize("schema,message", UNSUPPORTED, ids=[message for _schema, message in UNSUPPORTED])
def test_unsupported_schemas_are_refused_before_generating(cli_model_and_processor, monkeypatch, schema, message):
    model, processor = cli_model_and_processor

    def never(*args, **kwargs):
        raise AssertionError("generate was called")

    monkeypatch.setattr(model, "generate", never)
    with pytest.raises(SchemaNotSupportedError) as caught:
        extract(model, processor, QUESTION, schema, images=images()[:1], max_new_tokens=8)
    assert message in str(caught.value)


def test_the_mask_allows_only_what_the_schema_allows(cli_model_and_processor):
    _model, processor = cli_model_and_processor
    tokenizer = processor.tokenizer
    grammar = compile_schema(tokenizer, SCHEMAS["enum_and_integer"], 32064, [32007])

    def allowed_texts(prefix):
        tokens = allowed_next_tokens(tokenizer, grammar, prefix)
        return {tokenizer.decode([tokenizer.convert_tokens_to_ids(token)]) for token in tokens}

    assert allowed_texts("") == {"{", '{"'}
    after_quote = allowed_texts('{"sex":"')
    assert {"F", "M", "X"} <= after_quote
    assert all(any(f'{letter}","age":'.startswith(text) for letter in "FMX") for text in after_quote)
    assert allowed_next_tokens(tokenizer, grammar, '{"sex":"F","age":12}') == ["<|end|>"]
    with pytest.raises(ValueError, match="not the beginning"):
        allowed_next_tokens(tokenizer, grammar, '{"age":')  # the schema's order: sex first


def test_a_pattern_matches_anywhere_in_the_value_as_json_schema_says(cli_model_and_processor):
    """JSON Schema's pattern is a search (jsonschema accepts "Lindqvist" for "^[A-Z]"); xgrammar reads a
    pattern as the whole value, which allowed one capital letter and nothing after it."""
    _model, processor = cli_model_and_processor
    tokenizer = processor.tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z]"},
                                               "mail": {"type": "string", "pattern": "@"},
                                               "code": {"type": "string", "pattern": "^X|Y$"}},
              "required": ["name", "mail", "code"]}
    grammar = compile_schema(tokenizer, schema, 32064, [32007])

    def allowed_texts(prefix):
        return {tokenizer.decode([tokenizer.convert_tokens_to_ids(t)]) for t in allowed_next_tokens(tokenizer, grammar, prefix)}

    assert "ind" in allowed_texts('{"name":"L') and '"' in allowed_texts('{"name":"L')  # "Lindqvist", or "L"
    assert not any(text[:1].islower() for text in allowed_texts('{"name":"'))  # still starts with a capital
    assert "a" in allowed_texts('{"name":"Li","mail":"') and '"' not in allowed_texts('{"name":"Li","mail":"ann')
    assert '"' in allowed_texts('{"name":"Li","mail":"ann@x.org","code":"aY')  # ends with Y
    assert '"' in allowed_texts('{"name":"Li","mail":"ann@x.org","code":"Xa')  # starts with X
    assert '"' not in allowed_texts('{"name":"Li","mail":"ann@x.org","code":"aX')
    assert allowed_next_tokens(tokenizer, grammar, '{"name":"Lindqvist","mail":"ann@x.org","code":"X-9"}') == ["<|end|>"]
    with pytest.raises(SchemaNotSupportedError, match=r"\^ or \$ inside a pattern"):
        compile_schema(tokenizer, {"type": "string", "pattern": "(^a)b"}, 32064, [32007])


@pytest.mark.parametrize("pattern", ["^[A-Z]", "@", "^X|Y$", "^[^]]$", "[]a]", "^(?P<code>[a-c]+)$", "a\\|b", "[|^$]", "^$", "",
                                     "^[^\\n]*$", "^[ -~]+$", "^\\x41", "^[\\tab]+$"])
def test_the_grammar_accepts_exactly_what_the_check_accepts(cli_model_and_processor, pattern):
    """For every value xgrammar can write in a patterned string (no quote, backslash or control
    character), the grammar allows it if and only if Python's re.search (which checks answers) does."""
    _model, processor = cli_model_and_processor
    grammar = compile_schema(processor.tokenizer, {"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}},
                                                  "required": ["v"]}, 32064, [32007])
    for value in ["", "a", "b", "]", "a]", "X", "Xa", "aY", "aX", "|", "^", "$", "a|b", "@", "x@y", "Lindqvist", "abc", "é"]:
        matcher = xgrammar.GrammarMatcher(grammar)
        accepted = matcher.accept_string(json.dumps({"v": value}, ensure_ascii=False, separators=(",", ":")))
        assert accepted == (re.search(pattern, value) is not None), (pattern, value)


@pytest.mark.parametrize("pattern, message", [
    ("^\\W+$", "\\W in a pattern"), ("^[^\\d]+$", "\\d inside [^...]"), ("^\\U0001F600$", "\\U in a pattern"),
    ("(?:^a)", "^ or $ inside a pattern"),
    # xgrammar writes a character the pattern names on its own as it is: a raw tab, quote or backslash is not JSON
    ("^a\\t$", "'\\\\t' in a pattern"), ('^"[a-z]+"$', "'\"' in a pattern"), ("^[\\x00-\\x1f]+$", "'\\\\x00' in a pattern"),
    ("^[\\n\\t]+$", "'\\\\n' in a pattern"), ("^\\x22$", "not valid JSON"), ("^[\\b]$", "not valid JSON"),
])
def test_patterns_the_grammar_would_read_otherwise_are_refused(cli_model_and_processor, pattern, message):
    _model, processor = cli_model_and_processor
    with pytest.raises(SchemaNotSupportedError, match=re.escape(message)):
        compile_schema(processor.tokenizer, {"type": "string", "pattern": pattern}, 32064, [32007])


@pytest.mark.parametrize("pattern", ["^[^\\n]*$", '^[^"\\\\]+$', "^\\s*$", "^.*$", "^[ -~]+$", "^\\x41$", "^a$|^b$|c",
                                     # a class that also names other characters: xgrammar leaves them out of it
                                     "^[\\t ]+$", '^[a-z"]+$', "^[a\\\\]$", "^[\\x00-z]+$"])
def test_patterns_that_leave_out_what_json_escapes_are_kept_quietly(cli_model_and_processor, capfd, pattern):
    """Control characters, quotes and backslashes excluded (or left to ".", "\\s", wide classes, which the
    grammar writes without them) are fine; anchors on branches no longer make xgrammar print a warning."""
    _model, processor = cli_model_and_processor
    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}}
    compile_schema(processor.tokenizer, schema, 32064, [32007])
    assert "Warning" not in capfd.readouterr().err


@pytest.mark.parametrize("pattern, plain, left_out", [("^[\\t ]+$", " ", "\t"), ('^[a-z"]+$', "ab", '"'), ("^[a\\\\]+$", "a", "\\")])
def test_a_class_that_also_names_other_characters_never_writes_what_json_escapes(cli_model_and_processor, pattern, plain, left_out):
    """What the check relies on to accept such a class (before: refused): xgrammar leaves the control
    character, quote or backslash out of it, raw and escaped, so every answer is valid JSON."""
    _model, processor = cli_model_and_processor
    grammar = compile_schema(processor.tokenizer, {"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}},
                                                  "required": ["v"]}, 32064, [32007])
    for value, allowed in ((plain, True), (left_out, False)):
        raw, escaped = '{"v":"' + value + '"}', json.dumps({"v": value}, separators=(",", ":"))
        assert xgrammar.GrammarMatcher(grammar).accept_string(escaped) is allowed
        assert xgrammar.GrammarMatcher(grammar).accept_string(raw) is allowed


def test_ids_beyond_the_tokenizer_are_always_masked(cli_model_and_processor):
    """The model scores 32064 ids, the tokenizer has 32045 tokens: the ids between have no text."""
    model, processor = cli_model_and_processor
    vocab = model.get_output_embeddings().out_features
    grammar = compile_schema(processor.tokenizer, SCHEMAS["optional_ref_anyof_const"], vocab, [32007])
    constraint = SchemaConstraint(grammar)
    scores = constraint(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, vocab))
    assert torch.isinf(scores[0, len(processor.tokenizer):]).all()


def test_date_pattern_accepts_exactly_the_calendar_dates():
    pattern = re.compile(DATE_PATTERN)
    for year in (1, 4, 100, 1900, 2000, 2023, 2024, 9999):
        for month in range(1, 13):
            for day in range(1, 33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    datetime.date(year, month, day)
                    real = True
                except ValueError:
                    real = False
                assert bool(pattern.fullmatch(text)) == real, text
    assert not pattern.fullmatch("0000-01-01")
