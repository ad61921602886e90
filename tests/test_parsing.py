"""extract_json: find the JSON in a chatty model answer, never guess at broken JSON."""

import pytest

from phi_helpers import JSONExtractionError, extract_json


def test_json_fenced_block_with_prose_around_it():
    answer = 'Here\'s the extracted data:\n```json\n{"name": "Ada", "items": [1, 2]}\n```\nLet me know!'
    assert extract_json(answer) == {"name": "Ada", "items": [1, 2]}


def test_json_fence_wins_over_an_earlier_bare_object():
    answer = 'Format: {"example": true}\n```JSON\n{"real": 1}\n```'
    assert extract_json(answer) == {"real": 1}


def test_plain_fence_is_used_and_non_json_fences_are_skipped():
    assert extract_json('```\n[{"a": 1}, {"a": 2}]\n```') == [{"a": 1}, {"a": 2}]
    answer = '```python\nprint({1: 2})\n```\nResult: {"ok": true}'
    assert extract_json(answer) == {"ok": True}


def test_bare_object_with_leading_and_trailing_prose():
    answer = 'Sure! {"total": 12.5, "note": "braces } and [ in strings"} I hope this helps {really}.'
    assert extract_json(answer) == {"total": 12.5, "note": "braces } and [ in strings"}


def test_first_balanced_value_is_returned_and_failed_starts_are_skipped():
    assert extract_json('See [the receipt]: {"a": 1} and {"b": 2}') == {"a": 1}
    assert extract_json("Values: [1, 2, 3].") == [1, 2, 3]


def test_no_json_at_all():
    answer = "I cannot read the receipt, sorry."
    with pytest.raises(JSONExtractionError, match="No JSON found") as info:
        extract_json(answer)
    assert info.value.text == answer
    assert "Answer with JSON only" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_json_is_not_repaired_and_the_position_is_shown():
    answer = 'Data: {"name": "Ada", "age": 36,}'
    with pytest.raises(JSONExtractionError) as info:
        extract_json(answer)
    message = str(info.value)
    assert "line 1, column 33" in message  # the position of the offending "}"
    assert "<-- HERE -->" in message
    assert info.value.text == answer


def test_python_style_single_quotes_are_an_error():
    with pytest.raises(JSONExtractionError, match="property name"):
        extract_json("{'name': 'Ada'}")


def test_truncated_answer_mentions_max_new_tokens():
    with pytest.raises(JSONExtractionError, match="max_new_tokens"):
        extract_json('```json\n{"items": [1, 2,')


def test_invalid_json_fence_reports_its_own_error():
    answer = '{"fallback": 1}\n```json\n{"a": 1 "b": 2}\n```'
    with pytest.raises(JSONExtractionError, match=r"```json block .*line 1, column 9"):
        extract_json(answer)


def test_fenced_scalar_is_not_an_object_or_array():
    with pytest.raises(JSONExtractionError, match="not an object or array"):
        extract_json("```json\n42\n```")


def test_non_string_input():
    with pytest.raises(JSONExtractionError, match="string"):
        extract_json(None)


def test_answer_cut_inside_a_string_is_flagged_as_cut_off():
    with pytest.raises(JSONExtractionError, match="cut off by max_new_tokens"):
        extract_json('{"surname": "LINDQVIST", "given_names": "NOOR EL')


def test_every_error_survives_pickling_as_a_process_pool_sends_it():
    """A worker of a ProcessPoolExecutor (or Ray) sends its exception back pickled. Before, a cut-off
    extract's JSONTruncatedError and extract_json's JSONExtractionError could not be unpickled
    (``__init__() missing ... 'text'``), which broke the whole pool."""
    import inspect
    import pickle

    from phi_helpers import errors

    with pytest.raises(errors.JSONExtractionError) as caught:
        extract_json("no json here")
    raised = [caught.value, errors.JSONTruncatedError("cut off at 4 tokens", '{"name": "Al')]
    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, Exception)]
    raised += [c("a message") for c in classes if "text" not in inspect.signature(c.__init__).parameters]
    assert len(raised) > 20
    raised[1].add_note("extract's second attempt")
    raised[1].attempt = 2  # an attribute added later is kept too
    for error in raised:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)
    assert pickle.loads(pickle.dumps(raised[1])).__notes__ == ["extract's second attempt"]
