"""generate() options passed through ask / stream_chunks / extract: honoured as asked, or refused before
generating with a typed error that says what to do (never a raw transformers error, never ignored)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from phi_helpers import Chat, ask, build_prompt, extract
from phi_helpers.api import generation
from phi_helpers.api.generation import ASK_MAX_NEW_TOKENS, BATCH_MAX_NEW_TOKENS, generate_batch, stream_chunks
from phi_helpers.api.kv_cache import PreallocatedCache
from phi_helpers.errors import InvalidArgumentError

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}


@pytest.fixture
def model_and_processor(tiny_model_and_processor):
    return tiny_model_and_processor


@pytest.fixture
def image():
    return Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))


def spy_generate(monkeypatch, model):
    """Record the keyword arguments of every model.generate call (the real generate runs)."""
    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


CALLERS = {
    "ask": lambda model, processor, **kwargs: ask(model, processor, "Hi", max_new_tokens=4, **kwargs),
    "stream": lambda model, processor, **kwargs: "".join(stream_chunks(model, processor, "Hi", max_new_tokens=4, **kwargs)),
    "extract": lambda model, processor, **kwargs: extract(model, processor, "Hi", SCHEMA, max_new_tokens=12, **kwargs),
}


# --- the KV cache: ours only when the caller did not ask for another, or for none -------------------


def test_use_cache_false_gives_the_answer_of_plain_generate_without_a_cache(monkeypatch, model_and_processor, image):
    """Before: ask added its own cache anyway, which generate then filled again at every step (6196
    entries after 8 tokens) and the answer changed."""
    model, processor = model_and_processor
    inputs = processor(text=build_prompt("Describe.", num_images=1), images=[image], return_tensors="pt")
    stop_ids = generation._stop_token_ids(model, processor)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False, eos_token_id=stop_ids,
                               pad_token_id=processor.tokenizer.pad_token_id)
    expected = generation._decode_answer(processor, plain[0, inputs["input_ids"].shape[1]:].tolist(), stop_ids)
    calls = spy_generate(monkeypatch, model)
    assert ask(model, processor, "Describe.", images=[image], max_new_tokens=8, use_cache=False) == expected
    assert "cache" not in calls[-1]


def test_a_cache_implementation_of_transformers_is_used_instead_of_ours(monkeypatch, model_and_processor, image):
    """Before: ValueError "Passing both cache_implementation and cache" from inside generate."""
    model, processor = model_and_processor
    default = ask(model, processor, "Describe.", images=[image], max_new_tokens=8)
    calls = spy_generate(monkeypatch, model)
    assert ask(model, processor, "Describe.", images=[image], max_new_tokens=8, cache_implementation="static") == default
    assert "cache" not in calls[-1] and calls[-1]["cache_implementation"] == "static"
    ask(model, processor, "Describe.", images=[image], max_new_tokens=8)
    assert isinstance(calls[-1]["cache"], PreallocatedCache)  # the default is still ours


# --- generation_config ------------------------------------------------------------------------------


def test_a_generation_config_counts_and_keywords_beside_it_win(model_and_processor):
    """Before: GenerationConfig(do_sample=True) was decoded greedily, with no word about it."""
    model, processor = model_and_processor
    config = GenerationConfig(do_sample=True, top_k=0)
    greedy = ask(model, processor, "Hi", max_new_tokens=8)
    sampled = []
    for seed in range(3):
        torch.manual_seed(seed)
        with_config = ask(model, processor, "Hi", max_new_tokens=8, generation_config=config)
        torch.manual_seed(seed)
        assert with_config == ask(model, processor, "Hi", max_new_tokens=8, do_sample=True, top_k=0)
        sampled.append(with_config)
    assert set(sampled) != {greedy}
    assert ask(model, processor, "Hi", max_new_tokens=8, generation_config=config, do_sample=False) == greedy
    assert ask(model, processor, "Hi", max_new_tokens=8, generation_config=model.generation_config) == greedy
    with pytest.raises(InvalidArgumentError, match="pass max_new_tokens=5 as an argument of its own"):
        ask(model, processor, "Hi", generation_config=GenerationConfig(max_new_tokens=5))


@pytest.mark.parametrize("function, default", [
    ("ask", ASK_MAX_NEW_TOKENS), ("stream_chunks", ASK_MAX_NEW_TOKENS), ("extract", BATCH_MAX_NEW_TOKENS),
    ("extract, streamed", BATCH_MAX_NEW_TOKENS), ("generate_batch", BATCH_MAX_NEW_TOKENS),
])
def test_max_new_tokens_in_a_generation_config_is_refused_naming_the_default_of_the_function_called(
    model_and_processor, function, default
):
    """Before: "(256 when left out)" whatever the function, though generate_batch's default is 512."""
    model, processor = model_and_processor
    config = GenerationConfig(max_new_tokens=100)
    call = {
        "ask": lambda: ask(model, processor, "Hi", generation_config=config),
        "stream_chunks": lambda: stream_chunks(model, processor, "Hi", generation_config=config),
        "extract": lambda: extract(model, processor, "Hi", SCHEMA, generation_config=config),
        "extract, streamed": lambda: extract(model, processor, "Hi", SCHEMA, stream=True, generation_config=config),
        "generate_batch": lambda: generate_batch(model, processor, ["Hi"], [[]], generation_config=config),
    }[function]
    name = function.split(",")[0]
    expected = f"pass max_new_tokens=100 as an argument of its own instead ({name}() takes {default} when it is left out)"
    with pytest.raises(InvalidArgumentError, match=re.escape(expected)):
        call()


def test_extract_answers_as_long_as_the_command_lines_extract_by_default(monkeypatch, model_and_processor):
    """An extraction that fits on the command line fits in Python. Before: extract stopped at 256 tokens, the
    command line at 512."""
    from phi_helpers.cli.app import build_parser

    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    extract(model, processor, "Hi", SCHEMA)
    command_line = build_parser().parse_args(["predict", "--task", "extract", "--schema", "s.json", "--image", "x.png"])
    assert calls[-1]["max_new_tokens"] == command_line.max_new_tokens


# --- refused before generating ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(return_dict_in_generate=True, output_scores=True), "call model.generate on the processor's inputs yourself"),
    (dict(output_scores=True), "return the answer's text"),
    (dict(num_beams=0), "num_beams must be a whole number of at least 1, got 0"),
    (dict(num_beams=-1), "num_beams must be a whole number of at least 1"),
    (dict(num_beams=1.5), "num_beams must be a whole number of at least 1"),
    (dict(temperature="0.7"), "temperature must be a number of at least 0"),
    (dict(temperature=-1.0), "temperature must be a number"),
    (dict(top_p=0.0), "top_p must be a number above 0 and at most 1"),
    (dict(top_p=1.5), "top_p must be a number above 0 and at most 1"),
    (dict(top_k=-1), "top_k must be a whole number of at least 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number above 0"),
    (dict(max_length=50), "pass max_new_tokens=... instead"),
    (dict(eos_token_id="end of turn"), "stop_strings=['end of turn']"),
    (dict(num_crops=0), "num_crops must be a whole number of at least 1"),
    (dict(cache_implementation="offloaded"), "runs on the CPU already"),
    (dict(generation_config={"do_sample": True}), "must be a transformers GenerationConfig"),
    (dict(temprature=0.7), "temprature= is not a generation setting: did you mean temperature=...?"),
    (dict(num_crop=4), "did you mean num_crops=...?"),
    (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),  # before: sampled
    (dict(min_new_tokens=-1), "min_new_tokens must be a whole number of at least 0"),  # before: accepted
    (dict(stop_strings=5), "stop_strings must be a string or a list of strings, got 5"),
    (dict(pad_token_id="x"), "pad_token_id must be a whole number"),
    (dict(bad_words_ids="x"), "bad_words_ids must be a list of lists of token ids"),
    (dict(logits_processor=[None]), "logits_processor must be a list of callables"),
    (dict(cache=5), "cache must be a transformers Cache"),
    (dict(past_key_values=5), "past_key_values must be a transformers Cache"),
])
@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_settings_that_cannot_work_are_refused_before_generating(monkeypatch, model_and_processor, caller, kwargs, message):
    """Before: ZeroDivisionError, TypeError, transformers' ValueErrors, torch errors, or silently ignored
    (max_length, output_scores) - each from another place, or not at all."""
    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        CALLERS[caller](model, processor, **kwargs)
    assert calls == []


BATCH_CALLER = {
    "batch": lambda model, processor, **kwargs: generate_batch(model, processor, ["Hi"], [[]], max_new_tokens=4, **kwargs),
}
MODEL_INPUTS = ["input_ids", "attention_mask", "pixel_values", "image_sizes", "position_ids", "inputs_embeds", "inputs"]


@pytest.mark.parametrize("name", MODEL_INPUTS)
@pytest.mark.parametrize("caller", sorted(CALLERS) + ["batch"])
def test_the_model_inputs_ask_builds_itself_are_refused_with_what_to_pass(monkeypatch, model_and_processor, caller, name):
    """Before: input_ids= and attention_mask= failed with transformers' "got multiple values for keyword argument",
    pixel_values= and image_sizes= on a question without images were quietly ignored."""
    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    value = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{name}= is a model input, which ")) as caught:
        {**CALLERS, **BATCH_CALLER}[caller](model, processor, **{name: value})
    assert "builds from the prompt and the images" in str(caught.value) and "images=" in str(caught.value)
    assert calls == []


@pytest.mark.parametrize("kwargs, caller, hint", [
    (dict(image="photo.jpg"), "ask", "image= is not a generation setting: did you mean images=...?"),  # the CLI's --image
    (dict(image="photo.jpg"), "stream", "did you mean images=...?"),
    (dict(image="photo.jpg"), "extract", "did you mean images=...?"),
    (dict(image="photo.jpg"), "batch", "did you mean images=...?"),
    (dict(schem={}), "ask", "did you mean schema=...?"),
    (dict(strem=True), "ask", "did you mean stream=...?"),
])
def test_a_misspelled_keyword_of_the_function_itself_is_named(monkeypatch, model_and_processor, kwargs, caller, hint):
    """Before: image= got "did you mean image_sizes=...?", a model input."""
    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    with pytest.raises(InvalidArgumentError, match=re.escape(hint)):
        {**CALLERS, **BATCH_CALLER}[caller](model, processor, **kwargs)
    assert calls == []


def test_beam_search_cannot_be_streamed(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    with pytest.raises(InvalidArgumentError, match="cannot be streamed"):  # before: transformers' ValueError
        stream_chunks(model, processor, "Hi", max_new_tokens=4, num_beams=2)
    with pytest.raises(InvalidArgumentError, match="cannot be streamed"):
        ask(model, processor, "Hi", max_new_tokens=4, num_beams=2, stream=True)
    assert calls == []
    assert ask(model, processor, "Hi", max_new_tokens=4, num_beams=2)  # without streaming: fine


# --- taken as a learner means them ------------------------------------------------------------------


def test_stop_strings_need_no_tokenizer_argument(model_and_processor):
    """Before: generate's ValueError asking for tokenizer=..."""
    model, processor = model_and_processor
    answer = ask(model, processor, "Hi", max_new_tokens=8)
    word = answer.split()[1]  # the answer's second word: generation stops once it is written
    expected = answer[: answer.index(word)].strip()  # and the answer ends before it
    assert ask(model, processor, "Hi", max_new_tokens=8, stop_strings=[word]) == expected
    assert "".join(stream_chunks(model, processor, "Hi", max_new_tokens=8, stop_strings=[word])).strip() == expected
    assert ask(model, processor, Chat().add_user("Hi"), max_new_tokens=8, stop_strings=[word]) == expected


def test_eos_token_id_may_name_a_token(model_and_processor):
    """Before: TypeError "new(): invalid data type 'str'"."""
    model, processor = model_and_processor
    first = processor.tokenizer.encode(ask(model, processor, "Hi", max_new_tokens=8), add_special_tokens=False)[0]
    name = processor.tokenizer.convert_ids_to_tokens(first)
    assert ask(model, processor, "Hi", max_new_tokens=8, eos_token_id=name) == ""  # stops at once
    assert ask(model, processor, "Hi", max_new_tokens=8, eos_token_id=["<|end|>", name]) == ""
    assert ask(model, processor, "Hi", max_new_tokens=8, eos_token_id="<|end|>") == ask(model, processor, "Hi", max_new_tokens=8)


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_num_crops_sets_the_image_tiles_of_one_call(monkeypatch, model_and_processor, image, caller):
    """Before: transformers' "model_kwargs are not used by the model: ['num_crops']"."""
    model, processor = model_and_processor
    calls = spy_generate(monkeypatch, model)
    run = {
        "ask": lambda: ask(model, processor, "Describe.", images=[image], max_new_tokens=2, num_crops=1),
        "stream": lambda: list(stream_chunks(model, processor, "Describe.", images=[image], max_new_tokens=2, num_crops=1)),
        "extract": lambda: extract(model, processor, "Describe.", SCHEMA, images=[image], max_new_tokens=12, num_crops=1),
    }[caller]
    run()
    assert calls[-1]["pixel_values"].shape[1] == 2  # num_crops + 1 tiles
    expected = processor(text=build_prompt("Describe.", num_images=1), images=[image], num_crops=1)["input_ids"]
    assert torch.equal(calls[-1]["input_ids"], expected)
    assert processor.image_processor.num_crops != 1  # the processor's own setting is unchanged


def test_a_model_moved_to_the_meta_device_is_refused_with_what_to_do(model_and_processor):
    """Before: "Tensor.item() cannot be called on meta tensors" from inside generate."""
    import copy

    model, processor = model_and_processor
    on_meta = copy.deepcopy(model).to("meta")
    with pytest.raises(InvalidArgumentError, match="on the 'meta' device.*load it again with load_model"):
        ask(on_meta, processor, "Hi", max_new_tokens=2)


def test_a_schema_key_that_is_not_a_string_is_named():
    """Before: TypeError "'int' object is not iterable" from inside the constraint's checks."""
    from phi_helpers.api.structured import check_schema_type
    from phi_helpers.errors import SchemaError

    with pytest.raises(SchemaError, match=re.escape("(root)/properties: the key 1 is not a string (int)")):
        check_schema_type({"type": "object", "properties": {1: {"type": "string"}}})
