"""The early schema checks of the command line (``load_schema``, ``check_supported``): every schema
they pass compiles, and every one that would only fail after the model loaded is refused by them."""

import json
import os
import re
import time

import pytest
import torch

from phi_helpers import SchemaError, SchemaNotSupportedError
from phi_helpers.api import constrained
from phi_helpers.api.constrained import MAX_SCHEMA_CHARS, check_supported, compile_schema
from phi_helpers.api.structured import load_schema
from phi_helpers.errors import InvalidArgumentError

VOCAB, STOP = 32064, [32007]  # the model's vocabulary, <|end|>
DRAFT_07 = "http://json-schema.org/draft-07/schema#"


def root(total: dict, **keywords) -> dict:
    """An extraction schema whose one required property, ``total``, is ``total``."""
    return {"type": "object", "properties": {"total": total}, "required": ["total"], **keywords}


CONTRADICTIONS = [
    ({"type": "number", "minimum": 5, "maximum": 1}, "minimum 5 and maximum 1 leave no number"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "exclusiveMinimum 1 and maximum 1 leave no number"),
    ({"type": "number", "minimum": 2, "exclusiveMaximum": 2}, "minimum 2 and exclusiveMaximum 2 leave no number"),
    ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "minimum 1.2 and maximum 1.8 leave no integer"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "exclusiveMinimum 1 and exclusiveMaximum 2 leave no integer"),
    ({"enum": []}, "an empty enum allows no value"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 is above maxLength 2: no string fits"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "minItems 3 is above maxItems 1: no array fits"),
    ({"type": "string", "const": 5}, "const value 5 does not fit the rest of this schema (5 is not of type 'string')"),
    ({"type": "integer", "enum": ["a", 3]}, "enum value \"a\" does not fit the rest of this schema ('a' is not of type 'integer')"),
    ({"type": "integer", "const": 3, "minimum": 5}, "const value 3 does not fit"),
    ({"type": "string", "pattern": "^[A-Z]{3}$", "enum": ["EUR", "euro"]}, "enum value \"euro\" does not fit"),
    ({"type": "string", "format": "date", "enum": ["2023-02-30"]}, "enum value \"2023-02-30\" does not fit"),
    ({"type": "object", "properties": {"net": {"type": "number"}}, "required": ["gross"], "additionalProperties": False},
     "required 'gross' is not in properties and no other property is allowed"),
    ({"type": "object", "properties": {"net": {"type": "number"}}, "required": ["gross"]},
     "required 'gross' is not in properties and no other property is allowed"),
]


@pytest.mark.parametrize("total,message", CONTRADICTIONS, ids=[message for _total, message in CONTRADICTIONS])
def test_a_schema_that_contradicts_itself_is_refused_naming_the_place(total, message):
    with pytest.raises(SchemaNotSupportedError, match="contradicts itself") as caught:
        check_supported(root(total))
    assert f"(root)/properties/total: {message}" in str(caught.value)


def test_contradictions_are_found_in_defs_items_and_anyof_too():
    schema = {
        "type": "object",
        "$defs": {"code": {"type": "string", "minLength": 4, "maxLength": 3}},
        "properties": {
            "codes": {"type": "array", "items": {"$ref": "#/$defs/code"}},
            "note": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 9, "maximum": 1}]},
            "kind": {"$ref": "#/$defs/code", "const": "abcd"},
        },
    }
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(schema)
    message = str(caught.value)
    assert "(root)/$defs/code: minLength 4 is above maxLength 3" in message
    assert "(root)/properties/note/anyOf/1: minimum 9 and maximum 1 leave no integer" in message
    assert "(root)/properties/kind: const value \"abcd\" does not fit" in message  # the $ref is followed


SATISFIABLE = [
    {"type": "number", "minimum": 1, "maximum": 1},
    {"type": "integer", "minimum": 1.2, "maximum": 2.8},
    {"type": ["integer", "null"], "exclusiveMinimum": 0.5, "exclusiveMaximum": 3},
    {"type": "string", "minLength": 2, "maxLength": 2},
    {"type": "string", "pattern": "^[A-Z]{3}$", "enum": ["EUR", "USD"]},
    {"type": ["string", "null"], "enum": ["F", "M", None]},
    {"type": "string", "format": "date", "const": "2024-02-29"},
    {"type": "object", "properties": {"net": {"type": "number"}}, "required": ["net"], "additionalProperties": False},
]


@pytest.mark.parametrize("total", SATISFIABLE, ids=[json.dumps(total) for total in SATISFIABLE])
def test_tight_but_satisfiable_schemas_pass_and_compile(cli_model_and_processor, total):
    compile_schema(cli_model_and_processor[1].tokenizer, root(total), VOCAB, STOP)


def test_an_integers_fractional_bounds_become_whole_numbers_for_the_grammar(cli_model_and_processor):
    """xgrammar refuses ``"minimum": 1.2`` for an integer; 1.2 to 2.8 allows exactly 2."""
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, root({"type": "integer", "minimum": 1.2, "maximum": 2.8}), VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"total":') == ["<0x32>", "2"]


def test_properties_named_like_keywords_compile(cli_model_and_processor):
    """Only subschemas are rewritten for the grammar, never a properties map or enum data."""
    schema = {
        "type": "object",
        "properties": {"minLength": {"type": "integer"}, "format": {"enum": [{"maxLength": 1}]}},
        "required": ["minLength", "format"],
    }
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, schema, VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"minLength":1,"format":{"maxLength":1}}') == ["<|end|>"]


def test_tuple_items_are_named_as_such():
    schema = {"$schema": DRAFT_07, **root({"type": "array", "items": [{"type": "string"}, {"type": "integer"}]})}
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(schema)
    assert "(root)/properties/total/items: tuple items, a list of schemas, are not supported" in str(caught.value)
    assert "boolean" not in str(caught.value)


def test_lengths_next_to_a_date_are_refused():
    """The date pattern would otherwise be replaced by the length pattern: any 10 characters."""
    with pytest.raises(SchemaNotSupportedError, match="next to format 'date'"):
        check_supported(root({"type": "string", "format": "date", "maxLength": 10}))


def enum_schema(count: int) -> dict:
    return root({"type": "string", "enum": [f"C{index:05d}" for index in range(count)]})


def test_a_large_enum_within_the_bound_compiles(cli_model_and_processor):
    schema = enum_schema(5_000)  # ten times a list of the world's currencies
    assert len(json.dumps(schema, separators=(",", ":"))) < MAX_SCHEMA_CHARS
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, schema, VOCAB, STOP)
    assert "C" in constrained.allowed_next_tokens(tokenizer, grammar, '{"total":"')


def test_a_schema_over_the_bound_is_refused_fast_before_compiling(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a grammar compiler was built")

    monkeypatch.setattr(constrained, "grammar_compiler", never)
    start = time.perf_counter()
    with pytest.raises(SchemaNotSupportedError) as caught:
        compile_schema(object(), enum_schema(50_000), VOCAB, STOP)  # xgrammar would need minutes
    assert time.perf_counter() - start < 2
    message = str(caught.value)
    assert f"MAX_SCHEMA_CHARS = {MAX_SCHEMA_CHARS:,}" in message
    assert "at (root)/properties/total, has 50,000 values" in message
    assert '"type": "string"' in message and "--no-constrain" in message


def test_descriptions_do_not_count_towards_the_bound():
    schema = root({"type": "number"}, description="x" * (2 * MAX_SCHEMA_CHARS))
    check_supported(schema)


def test_a_schema_file_with_a_byte_order_mark_loads(tmp_path):
    schema = root({"type": "number"})
    path = tmp_path / "bom.schema.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(schema).encode())
    assert load_schema(path) == schema


@pytest.mark.parametrize("encoding, message", [
    ("utf-16", "is saved as UTF-16; save it as UTF-8"),
    ("latin-1", "is not UTF-8 text (line 2 has the byte 0xdf); save it as UTF-8"),
])
def test_a_schema_file_in_another_encoding_says_how_to_save_it(tmp_path, encoding, message):
    """Before: Python's codec message ("'utf-8' codec can't decode byte 0xff in position 0"), a byte offset."""
    path = tmp_path / "windows.schema.json"
    path.write_text('{"type": "object",\n "properties": {"Straße": {"type": "string"}}}', encoding=encoding)
    with pytest.raises(SchemaError, match=re.escape(f"The schema file '{path}' {message}")):
        load_schema(path)


@pytest.mark.parametrize("pattern, message", [
    (r"^\bINV\d+$", "a pattern the grammar cannot express ('^\\\\bINV\\\\d+$': Regex parsing error at position 2: Word boundary"),
    (r"\AINV\d+\Z", "\\A, \\Z or \\z in a pattern"),  # xgrammar would read them as the letters A and Z
])
def test_patterns_xgrammar_reads_otherwise_are_refused_at_their_place(pattern, message):
    with pytest.raises(SchemaNotSupportedError) as error:
        check_supported(root({"type": "string", "pattern": pattern}))
    assert f"(root)/properties/total: {message}" in str(error.value)


@pytest.fixture
def uncached(monkeypatch):
    """check_supported and compile_schema remember the schemas they passed: these tests watch them work."""
    monkeypatch.setattr(constrained, "_SUPPORTED", {})
    for compilers in constrained._COMPILERS.values():
        for _compiler, grammars in compilers.values():
            grammars.clear()


def test_whatever_else_the_grammar_cannot_build_is_found_by_check_supported(monkeypatch, uncached):
    def refuse(*args, **kwargs):
        raise RuntimeError("[12:00:00] /project/cpp/json_schema_converter.cc:1: something new")

    monkeypatch.setattr(constrained.xgrammar.Grammar, "from_json_schema", refuse)
    with pytest.raises(SchemaNotSupportedError, match="cannot be compiled to a grammar: something new. Change"):
        check_supported(root({"type": "number"}))


ANNOTATED = [
    {"readOnly": True}, {"writeOnly": True}, {"deprecated": True}, {"$anchor": "total"},
    {"contentMediaType": "text/plain", "contentEncoding": "base64", "contentSchema": {"type": "string"}},
    {"x-order": 1}, {"x-ui": {"widget": "money", "$ref": "other.json"}},  # a vendor extension's value is not a schema
]


@pytest.mark.parametrize("annotation", ANNOTATED, ids=[next(iter(annotation)) for annotation in ANNOTATED])
def test_annotations_are_ignored_and_left_out_of_the_grammar(cli_model_and_processor, monkeypatch, annotation, uncached):
    """They change no valid answer (JSON Schema 2020-12: the content keywords are annotations, never decoded
    or checked), so they are neither refused nor given to xgrammar."""
    given, from_json_schema = [], constrained.xgrammar.Grammar.from_json_schema

    def spy(text, **options):
        given.append(text)
        return from_json_schema(text, **options)

    monkeypatch.setattr(constrained.xgrammar.Grammar, "from_json_schema", spy)
    schema = root({"type": "number", **annotation})
    compile_schema(cli_model_and_processor[1].tokenizer, schema, VOCAB, STOP)
    assert given and all(json.loads(text) == constrained._grammar_schema(root({"type": "number"})) for text in given)


def test_a_property_named_like_an_annotation_is_kept(cli_model_and_processor):
    schema = {"type": "object", "properties": {"x-id": {"enum": [1]}, "readOnly": {"enum": [2]}}, "required": ["x-id", "readOnly"]}
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, schema, VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"x-id":1,"readOnly":2}') == ["<|end|>"]


USE_A_PATTERN = 'use "type": "string" with a "pattern"'
ADVICE = [
    ({"oneOf": [{"type": "string"}, {"type": "null"}]},
     "'oneOf': use \"anyOf\" instead: the model writes one branch either way (a \"oneOf\" of a schema and "
     "{\"type\": \"null\"} is exactly \"anyOf\" here)"),
    ({"type": "string", "format": "hostname"}, f"format 'hostname' (only date, date-time, time, uuid, ipv4, email): {USE_A_PATTERN}"),
    ({"type": "string", "format": "ipv6"}, f"format 'ipv6' (only date, date-time, time, uuid, ipv4, email): {USE_A_PATTERN}"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True},
     "'uniqueItems': remove it and check for repeated items after extraction"),
]


@pytest.mark.parametrize("total,message", ADVICE, ids=[message.split(":")[0] for _total, message in ADVICE])
def test_common_refusals_say_what_to_write_instead(total, message):
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root(total))
    assert f"(root)/properties/total: {message}" in str(caught.value)


def test_every_problem_is_listed_in_one_message_with_its_advice():
    schema = {"type": "object", "properties": {
        "a": {"oneOf": [{"type": "string"}, {"type": "null"}]}, "b": {"type": "string", "format": "hostname"},
        "c": {"type": "integer", "maximum": 2**64},
    }}
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(schema)
    problems = str(caught.value).split("; ")
    assert [re.search(r"\(root\)(\S*): ", problem)[1] for problem in problems] == ["/properties/a", "/properties/b", "/properties/c"]
    assert "anyOf" in problems[0] and "pattern" in problems[1] and "drop the bound" in problems[2]


def test_a_pattern_python_cannot_read_is_refused_at_its_place_with_what_to_write():
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root({"type": "string", "pattern": r"^[\p{L} .'-]+$"}))
    message = str(caught.value)
    assert "(root)/properties/total/pattern: " in message and "that Python's re can read (bad escape \\p at position 2" in message
    assert "list the letters instead, e.g. [A-Za-zÀ-ÖØ-öø-ÿ]" in message and "[^\\W\\d_]" in message


def test_the_suggested_letters_compile_and_allow_accents(cli_model_and_processor):
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, root({"type": "string", "pattern": "^[A-Za-zÀ-ÖØ-öø-ÿ .'-]+$"}), VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"total":"Zoë O\'Neil"}') == ["<|end|>"]


def test_an_invalid_schema_value_is_named_at_its_place(tmp_path):
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root({"type": []}))
    assert "Not a valid JSON Schema: (root)/properties/total/type: [] is not valid" in str(caught.value)
    assert "[] should be non-empty" in str(caught.value)
    path = tmp_path / "bad.schema.json"
    path.write_text(json.dumps({"$defs": {"a": {"pattern": "("}}}))
    with pytest.raises(ValueError, match=r"bad.schema.json': Not a valid JSON Schema: \(root\)/\$defs/a/pattern: '\(' is not"):
        load_schema(path)


INT64 = 2**63
OUT_OF_RANGE = [
    ({"type": "integer", "maximum": 99999999999999999999}, "maximum 99999999999999999999"),
    ({"type": "integer", "minimum": -INT64 - 1}, f"minimum {-INT64 - 1}"),
    ({"type": "integer", "maximum": 1e19}, "maximum 1e+19"),  # as a whole number, 10**19
    ({"type": ["integer", "null"], "exclusiveMinimum": -INT64 - 2, "maximum": 5}, f"exclusiveMinimum {-INT64 - 2}"),
]


@pytest.mark.parametrize("total,bound", OUT_OF_RANGE, ids=[bound for _total, bound in OUT_OF_RANGE])
def test_integer_bounds_beyond_64_bits_are_refused_at_their_place(total, bound):
    """xgrammar would fail with its own "Check failed: (val <= MAX_INT64_AS_DOUBLE)"."""
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root(total))
    assert (f"(root)/properties/total: {bound} is outside the integers the grammar can bound "
            f"({-INT64} to {INT64 - 1}): drop the bound (and check the value after extraction") in str(caught.value)
    assert "Check failed" not in str(caught.value)


@pytest.mark.parametrize("total", [
    {"type": "number", "minimum": 12345678901234567890},  # xgrammar would read 12345678901234567168
    {"type": "number", "maximum": 10**400},  # beyond the largest float
    {"type": ["integer", "number"], "exclusiveMaximum": 2**53 + 1},
], ids=["inexact", "beyond-float", "integer-or-number"])
def test_number_bounds_a_float_does_not_hold_are_refused_at_their_place(total):
    keyword, value = [(key, value) for key, value in total.items() if key != "type"][0]
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root(total))
    assert f"(root)/properties/total: {keyword} {value} has more digits than a 64-bit float holds" in str(caught.value)


def test_bounds_at_the_ends_of_what_xgrammar_takes_compile_and_hold(cli_model_and_processor):
    tokenizer = cli_model_and_processor[1].tokenizer
    schema = root({"type": "integer", "minimum": -INT64, "exclusiveMaximum": INT64})
    grammar = compile_schema(tokenizer, schema, VOCAB, STOP)
    assert "7" in constrained.allowed_next_tokens(tokenizer, grammar, '{"total":922337203685477580')
    assert "8" not in constrained.allowed_next_tokens(tokenizer, grammar, '{"total":922337203685477580')
    assert "8" in constrained.allowed_next_tokens(tokenizer, grammar, '{"total":-922337203685477580')
    for total in ({"type": "number", "minimum": -1.7976931348623157e308, "maximum": 1e300},
                  {"type": "number", "exclusiveMinimum": 5e-324}, {"type": "number", "maximum": 2**53}):
        compile_schema(tokenizer, root(total), VOCAB, STOP)


def test_an_integer_or_number_keeps_fractional_bounds(cli_model_and_processor):
    """xgrammar bounds the integer branch of ["integer", "number"] as an integer, refusing 5.5; every integer is
    a number, so the grammar gets "number" alone."""
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, root({"type": ["integer", "number"], "maximum": 5.5}), VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"total":5.5}') == ["<|end|>"]
    with pytest.raises(ValueError, match="not the beginning"):
        constrained.allowed_next_tokens(tokenizer, grammar, '{"total":6')


@pytest.mark.parametrize("bound", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_infinite_or_nan_bounds_bound_nothing_and_compile(cli_model_and_processor, bound):
    """``json.loads("1e400")`` is ``inf``; JSON has no such number for xgrammar to read."""
    tokenizer = cli_model_and_processor[1].tokenizer
    grammar = compile_schema(tokenizer, root({"type": "number", "minimum": 2, "maximum": bound}), VOCAB, STOP)
    assert constrained.allowed_next_tokens(tokenizer, grammar, '{"total":123}') is not None


@pytest.mark.parametrize("total, keyword, kind", [
    ({"maximum": 5}, "maximum", "number"), ({"pattern": "^[0-9]+$"}, "pattern", "string"),
    ({"items": {"type": "integer"}, "minItems": 2}, "items", "array"),
    ({"properties": {"net": {"type": "number"}}}, "properties", "object"),
])
def test_keywords_without_their_type_are_refused(total, keyword, kind):
    """Without "type", xgrammar lets any JSON value through and ignores the keyword: refused, with the fix."""
    with pytest.raises(SchemaNotSupportedError) as error:
        check_supported(root(total))
    assert f'(root)/properties/total: {keyword} without "type" (add "type": "{kind}"' in str(error.value)
    check_supported(root({**total, "type": kind}))  # the fix works


def test_openapi_annotations_and_number_formats_are_accepted(cli_model_and_processor):
    schema = root({"type": "integer", "format": "int64", "example": 3, "xml": {"name": "total"}},
                  externalDocs={"url": "https://example.com/docs"}, discriminator={"propertyName": "kind"})
    schema["properties"]["rate"] = {"type": "number", "format": "double"}
    compile_schema(cli_model_and_processor[1].tokenizer, schema, VOCAB, STOP)  # check_supported, then compiled


@pytest.mark.parametrize("keyword, value, advice", [
    ("nullable", True, '"type": ["string", "null"]'), ("allOf", [{"type": "string"}], "merge its parts"),
    ("multipleOf", 5, "check the value after extraction"), ("format", "int64", 'use "type": "string" with a "pattern"'),
])
def test_openapi_and_pydantic_v1_keywords_get_advice(keyword, value, advice):
    with pytest.raises(SchemaNotSupportedError) as error:
        check_supported(root({"type": "string", keyword: value}))
    assert "(root)/properties/total" in str(error.value) and advice in str(error.value)


# --- keywords the grammar would ignore, and settings that fight the mask -----------------------------------------

IGNORED_BY_THE_GRAMMAR = [
    ({"$ref": "#/$defs/Color", "enum": ["red"]}, "enum next to $ref (the grammar follows the $ref alone: move them"),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}], "minimum": 0, "maximum": 120},
     "maximum, minimum next to anyOf (the grammar follows the anyOf alone: repeat them inside each branch)"),
    ({"type": "integer", "anyOf": [{"type": "integer"}, {"type": "string"}]}, "type next to anyOf"),
    ({"type": "array", "minItems": 1}, 'an array without "items" (give "items": one schema that every item follows'),
    ({"type": "array", "maxItems": 3}, 'an array without "items" (give "items": one schema that every item follows; '
                                       "without it the grammar allows only [])"),
    ({"type": "string", "pattern": "(?i)^abc$"}, "an inline flag such as (?i) in a pattern"),
    ({"type": "string", "id": "x"}, "'id': draft-04's identifier of the schema: remove it"),
]


@pytest.mark.parametrize("total,message", IGNORED_BY_THE_GRAMMAR, ids=[message[:30] for _total, message in IGNORED_BY_THE_GRAMMAR])
def test_keywords_the_grammar_would_ignore_are_refused_at_their_place(total, message):
    """Before: accepted, then every finished answer failed the final check ("Please report this")."""
    with pytest.raises(SchemaNotSupportedError) as caught:
        check_supported(root(total, **{"$defs": {"Color": {"type": "string", "enum": ["red", "green"]}}}))
    assert f"(root)/properties/total: {message}" in str(caught.value)


def test_draft_03s_required_true_is_refused():
    """Valid in draft-03 (so the meta-schema passes it), ignored by the grammar: every answer failed."""
    schema = {"$schema": "http://json-schema.org/draft-03/schema#", "type": "object",
              "properties": {"a": {"type": "string", "required": True}}}
    with pytest.raises(SchemaNotSupportedError, match="\\(root\\)/properties/a: \"required\": true \\(draft-03's form"):
        check_supported(schema)


def test_pydantics_annotations_next_to_ref_and_any_of_are_fine():
    check_supported(root({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "Total"},
                         **{"$defs": {"B": {"type": "string"}}},
                         properties={"total": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
                                     "b": {"$ref": "#/$defs/B", "description": "the b"}}))


def test_definitions_no_ref_reaches_are_not_checked_and_those_reached_through_others_are():
    """A shared library of definitions may hold some that the grammar cannot enforce; unused, they change
    no answer. Before: any unsupported keyword in any definition refused the whole schema."""
    library = {"Code": {"type": "string", "enum": ["A", "B"]}, "Pair": {"$ref": "#/$defs/a~1b"},
               "a/b": {"type": "integer"}, "Either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
               "Not3": {"type": "integer", "not": {"const": 3}}}
    check_supported(root({"$ref": "#/$defs/Code"}, **{"$defs": library}))
    with pytest.raises(SchemaNotSupportedError) as caught:  # reached through Pair, then a/b
        check_supported(root({"$ref": "#/$defs/Pair"}, **{"$defs": {**library, "a/b": library["Not3"]}}))
    assert "(root)/$defs/a/b: 'not'" in str(caught.value) and "Either" not in str(caught.value)
    with pytest.raises(SchemaNotSupportedError, match="definitions/Either: 'oneOf'"):
        check_supported(root({"$ref": "#/definitions/Either"}, definitions={"Either": library["Either"]}))


def test_settings_that_ban_tokens_are_refused_with_a_schema(cli_model_and_processor):
    """no_repeat_ngram_size bans JSON's own repeats ('"},{"'): with the mask, no token was left and the
    answer failed with a bare RuntimeError."""
    from phi_helpers.api.generation import generation_settings

    model, processor = cli_model_and_processor
    schema = root({"type": "string"})
    for kwargs in ({"no_repeat_ngram_size": 3}, {"min_new_tokens": 5}, {"bad_words_ids": [[100]]}):
        with pytest.raises(InvalidArgumentError, match=f"{next(iter(kwargs))} with a schema: they ban or force tokens"):
            generation_settings(model, processor, 16, kwargs, schema)
    generation_settings(model, processor, 16, {"no_repeat_ngram_size": 3}, None)  # without a schema: as asked
    generation_settings(model, processor, 16, {"suppress_tokens": torch.tensor([5, 6])}, None)  # ids as a tensor
    with pytest.raises(InvalidArgumentError, match="suppress_tokens with a schema"):
        generation_settings(model, processor, 16, {"suppress_tokens": torch.tensor([5, 6])}, schema)
    generation_settings(model, processor, 16, {"no_repeat_ngram_size": 0, "repetition_penalty": 1.2}, schema)


def test_a_checked_schema_is_neither_checked_nor_compiled_again(cli_model_and_processor, monkeypatch):
    """A maxLength in the thousands takes seconds to build: once per schema, not on every call."""
    tokenizer = cli_model_and_processor[1].tokenizer
    schema = root({"type": "string", "maxLength": 7})
    first = compile_schema(tokenizer, schema, VOCAB, STOP)
    checks = []
    real = constrained._check_supported
    monkeypatch.setattr(constrained, "_check_supported", lambda schema: checks.append(schema) or real(schema))
    assert compile_schema(tokenizer, json.loads(json.dumps(schema)), VOCAB, STOP) is first and checks == []
    reordered = {key: schema[key] for key in reversed(schema)}  # another key order: the answer's order may differ
    compile_schema(tokenizer, reordered, VOCAB, STOP)
    assert checks == [reordered]


def test_a_number_too_large_for_a_float_is_not_a_valid_answer():
    from phi_helpers.api.structured import validation_errors

    assert validation_errors({"total": float("inf")}, root({"type": "number"})) == [
        "total: a number too large for a 64-bit float (read as inf)"]
    assert validation_errors(json.loads('{"total": [1e400]}'), root({"type": "array", "items": {"type": "number"}}))


def test_a_schema_file_with_a_huge_integer_is_named(tmp_path):
    from phi_helpers.errors import SchemaError

    path = tmp_path / "big.schema.json"
    path.write_text('{"type": "object", "maxProperties": ' + "9" * 5000 + "}")
    with pytest.raises(SchemaError, match=f"The schema file '{re.escape(str(path))}' cannot be read: Exceeds the limit"):
        load_schema(path)


def test_a_pattern_whose_grammar_would_take_minutes_is_refused_at_once():
    started = time.perf_counter()
    with pytest.raises(SchemaNotSupportedError, match=r"a repetition count above 10,000 in a pattern \('\^\[A-Z\]\{1,50000\}\$'\)"):
        check_supported(root({"type": "string", "pattern": "^[A-Z]{1,50000}$"}))
    assert time.perf_counter() - started < 5  # 129 s to compile, before


def test_load_schema_refuses_what_is_not_a_schema_file_with_what_to_pass(tmp_path):
    """Before: raw TypeErrors from pathlib for a dict or None, a read that waited for ever on a FIFO and one
    that never ended on /dev/zero, and advice about --schema in the Python API."""
    from phi_helpers.errors import SchemaError

    with pytest.raises(SchemaError, match="this schema is a dict already: pass it as schema= as it is"):
        load_schema({"type": "object"})
    for wrong in (None, 5, b"s.json"):
        with pytest.raises(SchemaError, match="needs the path of a JSON Schema file"):
            load_schema(wrong)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(SchemaError, match=r"not a regular file \(a pipe or a device\)"):
            load_schema(path)
    with pytest.raises(SchemaError, match="is a directory"):
        load_schema(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (11 * 2**20))
    with pytest.raises(SchemaError, match="more than a JSON Schema needs"):
        load_schema(big)
    with pytest.raises(SchemaError, match="relative paths start from"):
        load_schema(tmp_path / "missing.json")
