"""The JSON Schemas that Pydantic writes (``Model.model_json_schema()``, Pydantic 2.14) under constrained decoding.

Each schema below is Pydantic's JSON, written out as a dict (the comment says which Pydantic type gives it), so
that these tests need no Pydantic. The promise is the one of ``phi_helpers.api.constrained``: an accepted schema
gives answers that validate, whatever the model writes; one that cannot be enforced exactly is refused before
generating, saying what to change. So each accepted schema is driven through the real grammar: random walks over
the token mask (``random_answers``: what a model with uniform scores writes, any allowed text), xgrammar's matcher
on chosen texts, and the tiny model.
"""

import json
import re
import uuid

import jsonschema
import pytest
import torch
import xgrammar
from test_schema_fuzz_findings import VOCAB, STOP, assert_valid, random_answers, refusal

from phi_helpers import extract
from phi_helpers.api import constrained
from phi_helpers.api.constrained import check_supported, compile_schema
from phi_helpers.api.structured import validation_errors


def root(value: dict, **keywords) -> dict:
    """A Pydantic model's schema with one required field, ``a``, whose schema is ``value``."""
    return {"properties": {"a": {**value, "title": "A"}}, "required": ["a"], "title": "M", "type": "object", **keywords}


def grammar_verdicts(schema: dict, values: list) -> dict:
    """``{value: whether the grammar of schema allows {"a": value} as a whole answer}``, by xgrammar's matcher on
    the text, the grammar compiled once (the one ``compile_schema`` uses: ``check_supported``'s)."""
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False)
    grammar = compiler.compile_grammar(constrained._supported_grammar(schema))
    verdicts = {}
    for value in values:
        matcher = xgrammar.GrammarMatcher(grammar, terminate_without_stop_token=True)
        text = json.dumps({"a": value}, separators=(",", ":"), ensure_ascii=False)
        verdicts[json.dumps(value)] = matcher.accept_string(text) and matcher.is_terminated()
    return verdicts


# --- 1. discriminated unions: a oneOf whose branches cannot both match is an anyOf ------------------------------------

# class Card(BaseModel): kind: Literal["card"]; last4: constr(pattern=r"^\d{4}$")
# class Cash(BaseModel): kind: Literal["cash"]; tendered: float = Field(ge=0, le=1000)
# class Payment(BaseModel): payment: Union[Card, Cash] = Field(discriminator="kind")
PAYMENT = {
    "$defs": {
        "Card": {"properties": {"kind": {"const": "card", "title": "Kind", "type": "string"},
                                "last4": {"pattern": "^\\d{4}$", "title": "Last4", "type": "string"}},
                 "required": ["kind", "last4"], "title": "Card", "type": "object"},
        "Cash": {"properties": {"kind": {"const": "cash", "title": "Kind", "type": "string"},
                                "tendered": {"maximum": 1000, "minimum": 0, "title": "Tendered", "type": "number"}},
                 "required": ["kind", "tendered"], "title": "Cash", "type": "object"},
    },
    "properties": {"payment": {
        "discriminator": {"mapping": {"card": "#/$defs/Card", "cash": "#/$defs/Cash"}, "propertyName": "kind"},
        "oneOf": [{"$ref": "#/$defs/Card"}, {"$ref": "#/$defs/Cash"}], "title": "Payment"}},
    "required": ["payment"], "title": "Payment", "type": "object",
}
# class Passport(BaseModel): kind: Literal[Kind.PASSPORT]; number: constr(pattern=r"^[A-Z0-9]{9}$")
# class IdCard(BaseModel): kind: Literal[Kind.ID, Kind.VISA]; number: constr(pattern=r"^[A-Z0-9]{6}$")
# class Document(BaseModel): document: Union[Passport, IdCard] = Field(discriminator="kind")   (Kind: a str Enum)
DOCUMENT = {
    "$defs": {
        "IdCard": {"properties": {"kind": {"enum": ["id", "visa"], "title": "Kind", "type": "string"},
                                  "number": {"pattern": "^[A-Z0-9]{6}$", "title": "Number", "type": "string"}},
                   "required": ["kind", "number"], "title": "IdCard", "type": "object"},
        "Passport": {"properties": {"kind": {"const": "passport", "title": "Kind", "type": "string"},
                                    "number": {"pattern": "^[A-Z0-9]{9}$", "title": "Number", "type": "string"}},
                     "required": ["kind", "number"], "title": "Passport", "type": "object"},
    },
    "properties": {"document": {
        "discriminator": {"mapping": {"id": "#/$defs/IdCard", "passport": "#/$defs/Passport", "visa": "#/$defs/IdCard"},
                          "propertyName": "kind"},
        "oneOf": [{"$ref": "#/$defs/Passport"}, {"$ref": "#/$defs/IdCard"}], "title": "Document"}},
    "required": ["document"], "title": "Document", "type": "object",
}


@pytest.mark.parametrize("schema, field, kinds", [(PAYMENT, "payment", {"card", "cash"}),
                                                  (DOCUMENT, "document", {"passport", "id", "visa"})],
                         ids=["const", "enum"])
def test_a_discriminated_union_is_accepted_and_every_answer_validates(cli_model_and_processor, schema, field, kinds):
    """Refused before ("'oneOf': use anyOf"). Every branch requires "kind" with values of its own, so no answer
    can match two branches: oneOf allows exactly what anyOf does, and read_answer checks the oneOf as written."""
    answers = random_answers(cli_model_and_processor[1].tokenizer, schema, walks=24, seed=7, max_tokens=60)
    assert_valid(answers, schema)
    assert {json.loads(answer)[field]["kind"] for answer in answers} == kinds  # every branch is written


def test_a_discriminated_union_is_enforced_as_any_of_without_xgrammars_fallback_warning(capfd, monkeypatch):
    monkeypatch.setattr(constrained, "_SUPPORTED", {})  # built afresh, so that the warning would show
    payment = {**PAYMENT, "properties": {"a": PAYMENT["properties"]["payment"]}, "required": ["a"]}
    verdicts = grammar_verdicts(payment, [{"kind": "card", "last4": "1234"}, {"kind": "cash", "tendered": 5},
                                          {"kind": "card", "tendered": 5}, {"kind": "cash", "last4": "1234"}, {}])
    assert list(verdicts.values()) == [True, True, False, False, False]
    assert "oneOf" not in capfd.readouterr().err  # xgrammar warns when it reads a oneOf as an anyOf


def test_the_tiny_model_writes_valid_discriminated_unions(cli_model_and_processor):
    model, processor = cli_model_and_processor
    kinds = set()
    for seed in range(4):
        torch.manual_seed(seed)
        data = extract(model, processor, "How was this paid?", PAYMENT, max_new_tokens=60, do_sample=True,
                       temperature=1.5, top_k=50)
        assert validation_errors(data, PAYMENT) == []
        kinds.add(data["payment"]["kind"])
    assert kinds == {"card", "cash"}


BOTH = {"kind": "a", "x": 1}  # a value that matches both branches of each oneOf below
OVERLAPPING = {
    "not objects": [{"type": ["string", "integer"]}, {"type": "integer"}],
    "the same const": [
        {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind", "x"]},
    ],
    "overlapping enums": [
        {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"enum": ["c", "a"]}}, "required": ["kind"]},
    ],
    "a branch without the tag": [
        {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    ],
    "tags under other names": [
        {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
        {"type": "object", "properties": {"x": {"const": 1}}, "required": ["x"]},
    ],
    "a branch that allows null too": [
        {"type": ["object", "null"], "properties": {"kind": {"const": "b"}}, "required": ["kind"]},
        {"type": ["object", "null"], "properties": {"kind": {"const": "c"}}, "required": ["kind"]},
    ],
    "1 and 1.0, one number": [
        {"type": "object", "properties": {"x": {"const": 1}}, "required": ["x"]},
        {"type": "object", "properties": {"x": {"const": 1.0}}, "required": ["x"]},
    ],
}
ONE_MATCHING_BOTH = {"not objects": 1, "a branch that allows null too": None, "1 and 1.0, one number": {"x": 1}}


@pytest.mark.parametrize("name", OVERLAPPING)
def test_a_one_of_whose_branches_may_both_match_is_still_refused(name):
    """Such a oneOf refuses a value that matches two branches; the grammar, which writes one branch, cannot."""
    branches = OVERLAPPING[name]
    both = ONE_MATCHING_BOTH.get(name, BOTH)
    assert validation_errors({"a": both}, root({"oneOf": branches})) != []  # what anyOf would allow and oneOf not
    assert validation_errors({"a": both}, root({"anyOf": branches})) == []
    assert "(root)/properties/a: 'oneOf': use \"anyOf\" instead" in refusal(root({"oneOf": branches}))


# --- 2. tuples: prefixItems of a fixed length ------------------------------------------------------------------------

# class M(BaseModel): a: tuple[conint(ge=0, le=9), constr(pattern=r"^[a-z]{1,3}$")]
PAIR = {"maxItems": 2, "minItems": 2, "prefixItems": [{"maximum": 9, "minimum": 0, "type": "integer"},
                                                      {"pattern": "^[a-z]{1,3}$", "type": "string"}], "type": "array"}
# class M(BaseModel): a: tuple[float, float]
POINT = {"maxItems": 2, "minItems": 2, "prefixItems": [{"type": "number"}, {"type": "number"}], "type": "array"}


@pytest.mark.parametrize("value", [PAIR, POINT], ids=["tuple[int, str]", "tuple[float, float]"])
def test_a_tuple_is_accepted_and_every_answer_validates(cli_model_and_processor, value):
    """Refused before, with a wrong extra line ("an array without items ... allows only []")."""
    schema = root(value)
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=20, seed=8, max_tokens=60), schema)


def test_the_grammar_writes_exactly_the_tuple():
    verdicts = grammar_verdicts(root(PAIR), [[1, "ab"], [1], [1, "ab", 3], ["ab", 1], [], [10, "a"], [1, "abcd"]])
    assert list(verdicts.values()) == [True, False, False, False, False, False, False]


@pytest.mark.parametrize("value", [
    {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "minItems": 1, "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}]},
    # before 2020-12, "items" checks every item: prefixItems [number] would be checked against string
    {"type": "array", "prefixItems": [{"type": "number"}], "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
], ids=["may end early", "no length", "items next to them"])
def test_a_tuple_without_a_fixed_length_is_refused_with_what_to_write(value):
    message = refusal(root(value))
    assert (f'(root)/properties/a: prefixItems without a fixed length (a tuple needs "minItems" and "maxItems" both '
            f'{len(value["prefixItems"])}, its number of prefixItems, and no "items"') in message
    assert "allows only []" not in message


def test_prefix_items_that_are_not_a_list_are_refused_in_a_draft_that_does_not_know_them():
    """Draft-07's meta-schema lets any value through under a keyword it does not know."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"a": {"type": "array", "prefixItems": {"x": {"type": "number"}}, "minItems": 1, "maxItems": 1}}}
    assert "(root)/properties/a: prefixItems {\"x\": {\"type\": \"number\"}} (give a list of schemas" in refusal(schema)


# --- 3. keywords that are not JSON Schema's --------------------------------------------------------------------------

def test_a_typo_is_named_with_the_closest_keyword():
    message = refusal(root({"type": "string", "maxlength": 20}))  # {"type": "string", "maxlength": 20} by hand
    assert ("(root)/properties/a: 'maxlength': not a JSON Schema keyword (did you mean \"maxLength\"?): correct it, "
            'or name an annotation of your own "x-maxlength"') in message
    assert "check the value after extraction" not in message


def test_an_annotation_of_ones_own_is_told_to_start_with_x_and_then_accepted():
    # b: str = Field(max_length=20, json_schema_extra={"ocr_hint": "top right"})
    message = refusal(root({"maxLength": 20, "ocr_hint": "top right", "type": "string"}))
    assert ("(root)/properties/a: 'ocr_hint': not a JSON Schema keyword: remove it, or name an annotation of your own "
            '"x-ocr_hint" (names that start with "x-" are accepted') in message
    assert "did you mean" not in message
    check_supported(root({"maxLength": 20, "x-ocr_hint": "top right", "type": "string"}))


def test_a_keyword_of_json_schema_keeps_its_advice():
    message = refusal(root({"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}))
    assert "'multipleOf': remove it and check the value after extraction" in message
    assert "not a JSON Schema keyword" not in message


def test_pydantics_bounds_next_to_a_union_are_named_once_with_what_to_write():
    """a: Union[int, float] = Field(ge=0, le=10). Before: "ge, le next to anyOf", and again each on its own."""
    message = refusal(root({"anyOf": [{"type": "integer"}, {"type": "number"}], "ge": 0, "le": 10}))
    assert "next to anyOf" not in message
    assert message.count("'ge'") == message.count("'le'") == 1
    assert "'ge': Pydantic's ge= (\"minimum\"), left next to a Union: bound each type of the Union instead" in message
    assert "for Union[int, float] write float" in message


# --- 4. formats ------------------------------------------------------------------------------------------------------

# datetime, time, UUID, IPv4Address give {"format": ..., "type": "string"}; EmailStr gives format "email".
FORMATS = ["date-time", "time", "uuid", "ipv4", "email"]


def test_the_format_checks_are_active_here():
    """Else the tests below would prove nothing: a format without its checker lets any string validate."""
    assert set(FORMATS) <= set(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
    assert validation_errors({"a": "noon"}, root({"format": "date-time", "type": "string"}))


@pytest.mark.parametrize("format_", [name for name in FORMATS if name != "email"])
def test_random_answers_to_each_format_validate(cli_model_and_processor, format_):
    """Refused before ("only date"). Before xgrammar's reading of "(\\.\\d{1,6})?" was worked around (see
    whole_value_pattern), walks wrote times such as "06:41:4119-14:05". (Not email: its parts have no length
    bound, so few walks end; test_the_grammar_writes_only_what_the_format_check_accepts covers it.)"""
    schema = root({"format": format_, "type": "string"})
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=16, seed=9, max_tokens=60), schema)


def near_misses() -> dict:
    """Values to try for each format, valid ones and ones that are not (or that jsonschema takes and the
    grammar need not write, such as a small "t")."""
    times = [f"{hour:02d}:{minute}:{second}{fraction}{offset}" for hour in (0, 9, 19, 23, 24) for minute in ("00", "59", "60")
             for second in ("00", "59", "60", "5") for fraction in ("", ".5", ".123456", ".")
             for offset in ("Z", "z", "+01:00", "-23:59", "+24:00", "")]
    dates = [f"{year:04d}-{month:02d}-{day:02d}" for year in (0, 1, 1900, 2000, 2023, 2024) for month in (0, 1, 2, 4, 12, 13)
             for day in (0, 1, 28, 29, 30, 31, 32)]
    octets = ["0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "300", "00", "01", "001", "-1", ""]
    return {
        "time": times,
        "date-time": [f"{date}{separator}12:30:00Z" for date in dates for separator in ("T", "t", " ")]
                     + [f"2024-02-29T{time}" for time in times[::7]],
        "uuid": [text for number in (0, 7**40, 2**128 - 1) for text in (
            str(uuid.UUID(int=number)), str(uuid.UUID(int=number)).upper(), uuid.UUID(int=number).hex,
            "{" + str(uuid.UUID(int=number)) + "}", "urn:uuid:" + str(uuid.UUID(int=number)), str(uuid.UUID(int=number))[:-1],
            str(uuid.UUID(int=number)) + "0", str(uuid.UUID(int=number)).replace("-", ":"))],
        "ipv4": [".".join([octet, "1", "2", "3"]) for octet in octets] + [".".join(["1", "2", "3", octet]) for octet in octets]
                + ["1.2.3", "1.2.3.4.5", " 1.2.3.4", "::1"],
        "email": ["ann@example.com", "a.b+c_d%e-f@mail.example.co.uk", "ann@example", "@example.com", "ann@@example.com",
                  "ann lee@example.com", "ann@-example.com", "ann@example-.com", ".ann@example.com", "ann.@example.com",
                  "ann@example.c", "ann", "a@b.cd"],
    }


@pytest.mark.parametrize("format_", FORMATS)
def test_the_grammar_writes_only_what_the_format_check_accepts(format_):
    """The grammar writes FORMAT_PATTERNS[format], never a value jsonschema's check refuses, and the common
    forms of the format (it is not empty)."""
    schema = root({"format": format_, "type": "string"})
    values = near_misses()[format_]
    verdicts = grammar_verdicts(schema, values)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    written = [value for value in values if verdicts[json.dumps(value)]]
    assert all(checker.conforms(value, format_) for value in written), [v for v in written if not checker.conforms(v, format_)]
    assert len(written) >= 3


@pytest.mark.parametrize("format_, value", [
    ("date-time", "2024-02-29T23:59:59.123456+05:30"), ("date-time", "0001-01-01T00:00:00Z"), ("time", "08:15:00Z"),
    ("uuid", "123e4567-e89b-12d3-a456-426614174000"), ("ipv4", "255.255.255.255"), ("ipv4", "0.0.0.0"),
    ("email", "x@y.de"),
])
def test_the_grammar_writes_the_usual_values_of_each_format(format_, value):
    assert grammar_verdicts(root({"format": format_, "type": "string"}), [value]) == {json.dumps(value): True}


def test_the_tiny_model_writes_valid_formats(cli_model_and_processor):
    """(Not email: its parts have no length bound, and the tiny model writes long ones.)"""
    model, processor = cli_model_and_processor
    names = [name for name in FORMATS if name != "email"]
    schema = {"properties": {name.replace("-", "_"): {"format": name, "title": name, "type": "string"} for name in names},
              "required": [name.replace("-", "_") for name in names], "title": "M", "type": "object"}
    torch.manual_seed(0)
    data = extract(model, processor, "Fill in the form.", schema, max_new_tokens=160, do_sample=True, temperature=1.5,
                   top_k=50)
    assert validation_errors(data, schema) == []


@pytest.mark.parametrize("format_", ["password", "path", "binary"])
def test_formats_that_no_validator_checks_are_annotations(format_):
    """SecretStr (with "writeOnly": true), Path and bytes: any string validates, so the format changes no answer
    and is left out of the grammar (refused before: "only date")."""
    value = {"format": format_, "maxLength": 8, "type": "string"}
    for validator in (jsonschema.Draft202012Validator, jsonschema.Draft7Validator, jsonschema.Draft4Validator,
                      jsonschema.Draft3Validator):
        assert format_ not in validator.FORMAT_CHECKER.checkers
    check_supported(root(value))
    without = constrained._grammar_schema(root({"maxLength": 8, "type": "string"}))
    assert constrained._grammar_schema(root(value)) == without


@pytest.mark.parametrize("value, message", [
    ({"format": "uuid", "pattern": "^[0-9a-f-]+$", "type": "string"}, "a pattern next to format 'uuid'"),
    ({"format": "email", "maxLength": 40, "type": "string"}, "minLength/maxLength next to format 'email' (the grammar "
                                                             "writes the format's own pattern in their place"),
    ({"format": "hostname", "type": "string"}, "format 'hostname' (only date, date-time, time, uuid, ipv4, email): use "
                                               '"type": "string" with a "pattern"'),
])
def test_what_a_format_cannot_enforce_is_refused(value, message):
    assert f"(root)/properties/a: {message}" in refusal(root(value))


def test_a_format_that_the_schemas_draft_checks_otherwise_is_refused():
    """Draft-03's "time" is HH:MM:SS, without the offset that the grammar writes (2020-12's form): every answer
    would fail. Other drafts check "time" as 2020-12 does, or not at all."""
    schema = {"$schema": "http://json-schema.org/draft-03/schema#", "type": "object",
              "properties": {"a": {"type": "string", "format": "time"}}}
    assert "(root)/properties/a: format 'time', which this schema's draft checks otherwise" in refusal(schema)
    assert validation_errors({"a": "12:00:00Z"}, schema)
    check_supported({**schema, "$schema": "http://json-schema.org/draft-07/schema#"})


def test_compile_schema_takes_a_pydantic_model_with_all_of_it(cli_model_and_processor):
    """One model with a discriminated union, a tuple, formats and an annotation format compiles for the tokenizer."""
    schema = {**PAYMENT, "properties": {**PAYMENT["properties"], "point": {**POINT, "title": "Point"},
                                        "issued": {"format": "date-time", "title": "Issued", "type": "string"},
                                        "secret": {"format": "password", "title": "Secret", "type": "string", "writeOnly": True}}}
    grammar = compile_schema(cli_model_and_processor[1].tokenizer, schema, VOCAB, STOP)
    assert xgrammar.GrammarMatcher(grammar).accept_string(
        '{"payment":{"kind":"cash","tendered":2.5},"point":[1,2],"issued":"2024-01-31T08:00:00Z","secret":"x"}')


# --- 5. an optional group in a pattern -------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, values", [
    (r"^INV(-\d+)?$", {"INV": True, "INV-12": True, "INV12": False, "INV-": False}),  # constr(pattern=...)
    (r"^\d+(\.\d{1,2})?$", {"12": True, "12.5": True, "12.50": True, "12.": False, "12.505": False}),
    (r"^(x1+)?(y1+)?$", {"": True, "x1y11": True, "1": False, "11y1": False, "x1": True}),
    (r"^(ab)??c$", {"c": True, "abc": True, "bc": False}),
])
def test_an_optional_group_is_written_as_python_reads_it(cli_model_and_processor, pattern, values):
    """xgrammar 0.2.9 reads a group made optional with "?" in a JSON string as if only its first part were
    optional: "^INV(-\\d+)?$" wrote "INV12", which the check refuses. The grammar gets "{0,1}" instead of
    that "?", which xgrammar reads as Python does (a fuzz of 200 random patterns found no other difference)."""
    schema = root({"pattern": pattern, "type": "string"})
    assert grammar_verdicts(schema, list(values)) == {json.dumps(value): allowed for value, allowed in values.items()}
    assert all(bool(re.search(pattern, value)) == allowed for value, allowed in values.items())
    assert_valid(random_answers(cli_model_and_processor[1].tokenizer, schema, walks=16, seed=10, max_tokens=30), schema)
