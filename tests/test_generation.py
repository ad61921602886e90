"""ask / stream_chunks on the tiny random model: prompts, stop tokens, streaming, Chat, errors."""

import copy
import gc
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from in_thread import run_with_watchdog
from phi_helpers import Chat, ContextLengthError, PromptImageMismatchError, ask, build_prompt, extract
from phi_helpers.errors import InvalidArgumentError, JSONTruncatedError, PromptError, SchemaError
from phi_helpers.api import generation
from phi_helpers.api.generation import stream_chunks

SPECIAL_TOKENS = ("<|end|>", "<|endoftext|>", "<|assistant|>", "<|user|>", "<|image|>", "<s>", "</s>")


@pytest.fixture
def model_and_processor(tiny_model_and_processor):
    return tiny_model_and_processor


@pytest.fixture
def image():
    picture = Image.new("RGB", (120, 80), "red")
    picture.paste((0, 0, 255), (60, 0, 120, 80))
    return picture


def record_generate(monkeypatch, model, reply_ids=None):
    """Replace model.generate by a recorder. With ``reply_ids`` it returns prompt + those ids
    (and feeds a streamer if one is given); without, it calls the real generate."""
    calls = []
    real_generate = model.generate

    def fake_generate(**kwargs):
        calls.append(kwargs)
        if reply_ids is None:
            output = real_generate(**kwargs)
            calls[-1]["output"] = output
            return output
        output = torch.cat([kwargs["input_ids"], torch.tensor([reply_ids])], dim=1)
        if kwargs.get("streamer") is not None:
            kwargs["streamer"].put(kwargs["input_ids"])
            for token in reply_ids:
                kwargs["streamer"].put(torch.tensor([token]))
            kwargs["streamer"].end()
        return output

    monkeypatch.setattr(model, "generate", fake_generate)
    return calls


# --- answers ----------------------------------------------------------------------------------------


def test_ask_returns_clean_text(model_and_processor, image):
    model, processor = model_and_processor
    answer = ask(model, processor, "What is in this picture?", images=image, max_new_tokens=12)
    assert isinstance(answer, str) and answer
    assert answer == answer.strip()
    assert not any(token in answer for token in SPECIAL_TOKENS)
    assert "What is in this picture?" not in answer


def test_only_new_tokens_are_decoded_and_special_tokens_dropped(monkeypatch, model_and_processor, image):
    model, processor = model_and_processor
    words = processor.tokenizer.encode("Two squares.", add_special_tokens=False)
    record_generate(monkeypatch, model, reply_ids=words + [32007, 32000])
    assert ask(model, processor, "Describe.", images=[image]) == "Two squares."


def test_greedy_by_default_and_stops_at_end_of_turn(monkeypatch, model_and_processor, image):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    ask(model, processor, "Describe.", images=image, max_new_tokens=7)
    settings = calls[-1]
    assert settings["do_sample"] is False
    assert settings["max_new_tokens"] == 7
    assert {32007, 32000, 2} <= set(settings["eos_token_id"])  # <|end|>, <|endoftext|>, config eos
    assert settings["pixel_values"].dtype == model.dtype
    assert settings["input_ids"].device == model.device
    assert (settings["input_ids"] == 32044).sum() > 0  # the image's tokens are in the prompt


def test_sampling_kwargs_switch_sampling_on_and_caller_settings_win(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    ask(model, processor, "Hi", temperature=0.7)
    assert calls[-1]["do_sample"] is True and calls[-1]["temperature"] == 0.7
    ask(model, processor, "Hi", temperature=0.0)  # the official sample code's way of saying "greedy"
    assert calls[-1]["do_sample"] is False and "temperature" not in calls[-1]
    ask(model, processor, "Hi", eos_token_id=[5], do_sample=False, top_k=3)
    assert calls[-1]["eos_token_id"] == [5] and calls[-1]["do_sample"] is False
    ask(model, processor, "Hi", temperature=None, top_p=None)  # None (a config's "unset") is the default: greedy
    assert calls[-1]["do_sample"] is False and "temperature" not in calls[-1] and "top_p" not in calls[-1]


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(temperature=0, do_sample=True), "pass one of them"), (dict(num_return_sequences=2), "one answer"),
     (dict(num_beams=2, schema={"type": "object"}), "beam search")],
)
def test_settings_ask_cannot_honour_are_refused_before_generating(monkeypatch, model_and_processor, kwargs, message):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    with pytest.raises(InvalidArgumentError, match=message):
        ask(model, processor, "Hi", **kwargs)
    assert calls == []


def test_extract_without_a_schema_is_refused_before_generating(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    with pytest.raises(SchemaError, match="must be a dict, got NoneType: for a free answer, use ask"):
        extract(model, processor, "Extract", None)
    assert calls == []


@pytest.mark.parametrize("schema,advice", [
    ('{"type": "object"}', "json.loads(text)"),
    ("schemas/receipt.schema.json", "load_schema(path)"),
])
def test_a_schema_that_is_not_a_dict_says_how_to_get_one(monkeypatch, model_and_processor, schema, advice):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    for call in (lambda: extract(model, processor, "Extract", schema), lambda: ask(model, processor, "Extract", schema=schema)):
        with pytest.raises(SchemaError, match=re.escape(advice)):  # the same error from both (before: two kinds)
            call()
    assert calls == []


@pytest.mark.parametrize("misplaced", [
    lambda image: [image], lambda image: (image,), lambda image: image, lambda image: "scan.jpg",
    lambda image: Path("photos/scan.PNG"), lambda image: b"\x89PNG\r\n",
])
def test_images_where_extracts_schema_goes_say_its_order(monkeypatch, model_and_processor, image, misplaced):
    """extract(model, processor, question, [image]) in ask's order. Before: "A JSON Schema must be a dict, got
    list", with nothing about the order."""
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    with pytest.raises(SchemaError, match=re.escape("extract(model, processor, question, schema, images)")) as caught:
        extract(model, processor, "Extract", misplaced(image))
    assert "images=[...]" in str(caught.value)
    assert calls == []


def test_an_invalid_or_unsupported_schema_is_a_schema_error(model_and_processor):
    """SchemaNotSupportedError is a SchemaError: ``except SchemaError`` catches every unusable schema."""
    model, processor = model_and_processor
    for schema in ({"type": "object", "properties": {"a": {"type": "foo"}}}, {"type": "object", "not": {}}):
        with pytest.raises(SchemaError):
            extract(model, processor, "Extract", schema)


def test_a_cut_off_extraction_leaves_the_question_last_in_the_chat(model_and_processor):
    """Before: the cut-off JSON was added as the answer, and the retry failed with "not the model's turn"."""
    model, processor = model_and_processor
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    chat = Chat().add_user("What is n?")
    with pytest.raises(JSONTruncatedError) as caught:
        extract(model, processor, chat, schema, max_new_tokens=2)
    assert caught.value.text and [m["role"] for m in chat.messages] == ["user"]
    data = extract(model, processor, chat, schema, max_new_tokens=60)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert json.loads(chat.messages[-1]["content"]) == data


def test_a_stopped_ask_in_a_chat_says_the_question_is_still_unanswered(monkeypatch, model_and_processor):
    """The kernel's stop button during ask(chat): before, a bare KeyboardInterrupt, and the learner's next
    add_user made two questions in a row."""
    model, processor = model_and_processor

    def stopped(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "generate", stopped)
    chat = Chat().add_user("What is n?")
    with pytest.raises(KeyboardInterrupt) as caught:
        ask(model, processor, chat)
    assert "your question is its last turn, still unanswered" in " ".join(getattr(caught.value, "__notes__", []))
    assert [m["role"] for m in chat.messages] == ["user"]
    with pytest.raises(KeyboardInterrupt) as caught:
        ask(model, processor, "What is n?")  # no chat: nothing to say about one
    assert not getattr(caught.value, "__notes__", [])


@pytest.mark.parametrize("swap,message", [
    (lambda model, processor: (model, processor.tokenizer), "The processor argument is a tokenizer"),
    (lambda model, processor: (processor, model), "not a model (the two are swapped: model first)"),
    (lambda model, processor: (model, None), "The processor argument is None"),
    (lambda model, processor: (model, processor.image_processor), "is a Phi3VImageProcessor, not the model's processor"),
    (lambda model, processor: ("tiny", processor), "The model argument is a str, not a model"),
])
def test_a_wrong_model_or_processor_is_named_before_anything_runs(model_and_processor, image, swap, message):
    """Before: bare AttributeErrors from inside transformers or torch."""
    model, processor = swap(*model_and_processor)
    for call in (lambda: ask(model, processor, "Hi", images=[image]),
                 lambda: generation.generate_batch(model, processor, ["Hi"], [[image]])):
        with pytest.raises(InvalidArgumentError, match=re.escape(message)):
            call()


def test_counts_from_numpy_and_torch_are_whole_numbers(model_and_processor):
    model, processor = model_and_processor
    assert ask(model, processor, "Hi", max_new_tokens=np.int64(2)) == ask(model, processor, "Hi", max_new_tokens=torch.tensor(2))
    with pytest.raises(InvalidArgumentError, match="got tensor\\(True\\)"):
        ask(model, processor, "Hi", max_new_tokens=torch.tensor(True))


def test_stream_is_a_bool_and_brings_its_own_streamer(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(InvalidArgumentError, match="stream must be True or False"):
        ask(model, processor, "Hi", stream="no")
    with pytest.raises(InvalidArgumentError, match="either stream=True or streamer="):  # before: streamer ignored
        ask(model, processor, "Hi", stream=True, streamer=object())


def test_templated_prompt_is_used_as_is(monkeypatch, model_and_processor, image):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model, reply_ids=[32007])
    prompt = build_prompt("Compare these.", num_images=2, system="Be brief.")
    ask(model, processor, prompt, images=[image, image])
    expected = processor(text=prompt, images=[image, image], return_tensors="pt")["input_ids"]
    assert torch.equal(calls[-1]["input_ids"], expected)


def test_images_from_paths_and_tag_mismatch(model_and_processor, image, tmp_path):
    model, processor = model_and_processor
    path = tmp_path / "picture.png"
    image.save(path)
    assert isinstance(ask(model, processor, "What?", images=[str(path)], max_new_tokens=3), str)
    with pytest.raises(PromptImageMismatchError):
        ask(model, processor, build_prompt("Compare.", num_images=1), images=[image, image])


def test_bad_arguments(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="max_new_tokens"):
        ask(model, processor, "Hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="question"):
        ask(model, processor, 42)


# --- streaming --------------------------------------------------------------------------------------


def test_stream_prints_and_returns_the_same_text_as_without_streaming(model_and_processor, image, capsys):
    model, processor = model_and_processor
    plain = ask(model, processor, "Describe the picture.", images=image, max_new_tokens=20)
    capsys.readouterr()
    streamed = ask(model, processor, "Describe the picture.", images=image, max_new_tokens=20, stream=True)
    printed = capsys.readouterr().out
    assert streamed == plain
    assert printed.strip() == plain


def test_stream_chunks_yields_pieces_that_join_to_the_answer(model_and_processor, image):
    model, processor = model_and_processor
    pieces = list(stream_chunks(model, processor, "Describe.", images=image, max_new_tokens=15))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == ask(model, processor, "Describe.", images=image, max_new_tokens=15)


def test_error_in_the_generation_thread_is_raised_in_the_caller(monkeypatch, model_and_processor):
    model, processor = model_and_processor

    def broken_generate(**kwargs):
        raise RuntimeError("boom in generate")

    monkeypatch.setattr(model, "generate", broken_generate)
    chat = Chat().add_user("Hi")
    result = run_with_watchdog(lambda: ask(model, processor, chat, stream=True))
    assert isinstance(result.get("error"), RuntimeError) and "boom" in str(result["error"])
    assert len(chat) == 1 and chat.messages[-1]["role"] == "user"  # the question is kept, no fake answer


def test_interrupt_stops_generation_and_keeps_the_partial_answer(monkeypatch, model_and_processor, image, capsys):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model)  # the real generate, recorded
    shown = []

    def show_then_interrupt(text):
        shown.append(text)
        if len(shown) == 2:  # the user presses "interrupt" while the second piece is printed
            raise KeyboardInterrupt

    monkeypatch.setattr(generation, "_show", show_then_interrupt)
    chat = Chat().add_user("Describe.", images=image)
    result = run_with_watchdog(lambda: ask(model, processor, chat, max_new_tokens=300, min_new_tokens=300, stream=True))
    partial = result["value"]
    assert partial == "".join(shown[:2]).strip() and partial
    assert any("stopped" in text for text in shown[2:])  # a short note is printed
    new_tokens = calls[-1]["output"].shape[1] - calls[-1]["input_ids"].shape[1]
    assert new_tokens < 300  # generation really stopped (min_new_tokens forbids an early eos)
    assert chat.messages[-1] == {"role": "assistant", "content": partial}


def test_closing_the_generator_early_stops_the_thread(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model)
    chunks = stream_chunks(model, processor, "Tell a story.", max_new_tokens=300, min_new_tokens=300)
    first = next(chunks)
    run_with_watchdog(chunks.close)
    assert first
    assert calls[-1]["output"].shape[1] - calls[-1]["input_ids"].shape[1] < 300


def test_a_script_that_keeps_a_stream_it_broke_out_of_exits_cleanly(tiny_checkpoint, tmp_path):
    """A kept stream goes on generating after a break; when Python exits, it is stopped. Before: its
    thread was still generating while Python shut down: "terminate called without an active exception",
    exit code 134."""
    script = tmp_path / "keeps_a_stream.py"
    script.write_text(textwrap.dedent("""
        import sys
        from phi_helpers import load_model
        from phi_helpers.api.generation import stream_chunks

        model, processor = load_model(sys.argv[1], device="cpu")
        chunks = stream_chunks(model, processor, "Tell a story.", max_new_tokens=3000, min_new_tokens=3000)
        for piece in chunks:
            break
        print("broke out")
    """))
    command = [sys.executable, str(script), str(tiny_checkpoint)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)  # a hang fails the test too
    assert "broke out" in finished.stdout, finished.stderr[-3000:]
    assert finished.returncode == 0, finished.stderr[-3000:]


def test_a_streamed_answer_goes_after_its_question_even_if_the_chat_moved_on(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    record_generate(monkeypatch, model)
    chat = Chat().add_user("First question?")
    chunks = stream_chunks(model, processor, chat, max_new_tokens=300, min_new_tokens=300)
    first = next(chunks)
    chat.add_user("Second question?")  # typed while the first answer was still streaming
    run_with_watchdog(chunks.close)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user"]
    assert chat.messages[1]["content"].startswith(first.strip()) and chat.messages[2]["content"] == "Second question?"


def test_a_stream_left_unfinished_is_closed_by_the_chats_next_question(monkeypatch, model_and_processor):
    """Before: the generator kept in ``chunks`` went on generating to max_new_tokens, the next ask
    answered the same question again, and collecting ``chunks`` then added a second answer."""
    model, processor = model_and_processor
    calls = record_generate(monkeypatch, model)
    chat = Chat().add_user("Tell a story.")
    chunks = stream_chunks(model, processor, chat, max_new_tokens=300, min_new_tokens=300)
    for index, piece in enumerate(chunks):
        if index == 2:
            break
    other_thread = run_with_watchdog(lambda: ask(model, processor, chat, max_new_tokens=4))
    assert "Another thread is still generating" in str(other_thread.get("error"))  # only this thread goes on
    with pytest.raises(PromptError, match="not the model's turn"):  # the partial answer went in first:
        ask(model, processor, chat, max_new_tokens=4)  # the chat ends with it, not with the question
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and chat.messages[1]["content"]
    assert calls[0]["output"].shape[1] - calls[0]["input_ids"].shape[1] < 300  # generation stopped there
    del chunks
    gc.collect()
    assert len(chat) == 2  # its later clean-up added nothing
    chunks = stream_chunks(model, processor, chat.add_user("Go on."), max_new_tokens=300, min_new_tokens=300)
    next(chunks)
    assert len(copy.deepcopy(chat)) == 3  # a chat with an open stream copies (without the stream)
    chat.add_user("And then?")  # typed after breaking out: the partial answer still goes after its question
    ask(model, processor, chat, max_new_tokens=4)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in chat.messages][2:5:2] == ["Go on.", "And then?"]


def test_an_interrupt_before_the_first_token_leaves_the_question_unanswered(monkeypatch, model_and_processor, image, capsys):
    """Before: a streamed ask stopped before its first piece added an empty answer, so the next ask
    said "It is not the model's turn". Now it is kept unanswered, as an interrupted plain ask keeps it."""
    model, processor = model_and_processor

    def interrupted(self):  # Ctrl-C while waiting for the first piece
        raise KeyboardInterrupt

    chat = Chat().add_user("Describe.", images=image)
    with monkeypatch.context() as patch:
        patch.setattr(generation._AnswerStreamer, "__next__", interrupted)
        result = run_with_watchdog(lambda: ask(model, processor, chat, max_new_tokens=8, stream=True))
    assert result["value"] == ""
    assert "your question stays unanswered in the chat" in capsys.readouterr().out
    assert [m["role"] for m in chat.messages] == ["user"]
    with monkeypatch.context() as patch:  # the same as an interrupted ask without streaming
        patch.setattr(model, "generate", lambda **kwargs: interrupted(None))
        with pytest.raises(KeyboardInterrupt):
            ask(model, processor, chat, max_new_tokens=8)
    assert [m["role"] for m in chat.messages] == ["user"]
    assert ask(model, processor, chat, max_new_tokens=8) and len(chat) == 2  # asking again answers it


def test_an_empty_answer_that_ended_by_itself_is_kept_streamed_or_not(model_and_processor, image):
    """Only an interrupted stream leaves the question unanswered: a finished one keeps even an empty answer."""
    model, processor = model_and_processor
    first = processor.tokenizer.encode(ask(model, processor, "Hi", max_new_tokens=4), add_special_tokens=False)[0]
    for stream in (False, True):
        chat = Chat().add_user("Hi")
        assert ask(model, processor, chat, max_new_tokens=4, eos_token_id=first, stream=stream) == ""
        assert chat.messages[-1] == {"role": "assistant", "content": ""}


# --- stop strings -----------------------------------------------------------------------------------


def test_the_answer_ends_before_the_first_stop_string(model_and_processor, image):
    """Before: the stop string and the rest of its token stayed in the answer ("...omegaRegister")."""
    model, processor = model_and_processor
    full = ask(model, processor, Chat().add_user("Describe.", images=image), max_new_tokens=12)
    assert "omegaRegister" in full  # the tiny model's greedy answer: the stop string ends inside a token
    expected = full[: full.index("omegaReg")].strip()
    for stop_strings in ("omegaReg", ["Roman", "omegaReg"]):  # the first one found in the answer wins
        chat = Chat().add_user("Describe.", images=image)
        assert ask(model, processor, chat, max_new_tokens=12, stop_strings=stop_strings) == expected
        assert chat.messages[-1] == {"role": "assistant", "content": expected}
        chat = Chat().add_user("Describe.", images=image)
        pieces = list(stream_chunks(model, processor, chat, max_new_tokens=12, stop_strings=stop_strings))
        assert "".join(pieces).strip() == expected and chat.messages[-1]["content"] == expected


def test_a_stop_string_split_over_streamed_pieces_is_cut_too(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    reply = processor.tokenizer.encode("The total is 30.89 dollars.", add_special_tokens=False)
    record_generate(monkeypatch, model, reply_ids=reply)  # generate's own stop check does not run here
    pieces = list(stream_chunks(model, processor, "Hi", max_new_tokens=20, stop_strings=["9 dol"]))
    assert "".join(pieces) == "The total is 30.8"
    assert ask(model, processor, "Hi", max_new_tokens=20, stop_strings=["9 dol"]) == "The total is 30.8"
    assert "".join(stream_chunks(model, processor, "Hi", max_new_tokens=20, stop_strings=["x dol"])).strip() == (
        "The total is 30.89 dollars."  # text held back as a possible stop string comes out in the end
    )
    with pytest.raises(InvalidArgumentError, match="empty"):
        ask(model, processor, "Hi", max_new_tokens=20, stop_strings=["x", ""])


# --- Chat -------------------------------------------------------------------------------------------


def test_chat_gets_the_answer_appended_and_continues(model_and_processor, image):
    model, processor = model_and_processor
    chat = Chat(system="Be brief.").add_user("What is this?", images=image)
    first = ask(model, processor, chat, max_new_tokens=8)
    assert len(chat) == 2 and chat.messages[-1] == {"role": "assistant", "content": first}
    chat.add_user("And this one?", images=image)
    second = ask(model, processor, chat, max_new_tokens=8, stream=True)
    assert len(chat) == 4 and chat.messages[-1]["content"] == second
    assert "<|image_2|>" in chat.render()


def test_chat_must_end_with_a_question_and_carries_its_own_images(model_and_processor, image):
    model, processor = model_and_processor
    chat = Chat().add_user("Hi").add_assistant("Hello")
    with pytest.raises(ValueError, match="add_user"):
        ask(model, processor, chat)
    with pytest.raises(ValueError, match="own images"):
        ask(model, processor, Chat().add_user("Hi"), images=image)


# --- context length ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_error_keeps_the_users_turn(monkeypatch, model_and_processor, image, stream):
    model, processor = model_and_processor
    chat = Chat().add_user("What is this?", images=image)
    prompt_tokens = processor(text=chat.render(), images=chat.images, return_tensors="pt")["input_ids"].shape[1]
    monkeypatch.setattr(model.config, "max_position_embeddings", prompt_tokens + 5)  # a short context: fails fast
    too_many = model.config.max_position_embeddings - prompt_tokens + 1  # the smallest amount that overflows
    with pytest.raises(ContextLengthError) as info:
        ask(model, processor, chat, max_new_tokens=too_many, stream=stream)
    message = str(info.value)
    assert f"The prompt is {prompt_tokens:,} tokens" in message
    assert f"{too_many:,}" in message and f"{model.config.max_position_embeddings:,}" in message
    assert "num_crops" in message and "drop_images" in message
    assert len(chat) == 1 and chat.messages[-1]["role"] == "user"


def test_a_prompt_too_long_is_refused_before_any_image_is_processed(monkeypatch, model_and_processor, image):
    """Before: the processor made every image's pixel values first (15 s and 1.3 GB for 200 images) and only
    then found that the prompt could not fit. The counts come from the images' sizes, as the processor's own."""
    model, processor = model_and_processor
    images = [image] * 3
    [(tokens, image_tokens)] = processor.prompt_lengths(build_prompt("Compare them.", num_images=3), images)
    encoded = processor(text=build_prompt("Compare them.", num_images=3), images=images, return_tensors="pt")["input_ids"]
    assert (tokens, image_tokens) == (encoded.shape[1], int((encoded == processor.image_token_id).sum()))

    def processed(*args, **kwargs):
        raise AssertionError("the images were processed for a prompt that cannot fit")

    monkeypatch.setattr(type(processor.image_processor), "__call__", processed)
    with pytest.raises(ContextLengthError, match=f"The prompt is {tokens:,} tokens \\({image_tokens:,} of them"):
        ask(model, processor, "Compare them.", images=images, max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ContextLengthError, match="not on its size in pixels: ask\\(..., num_crops=1\\) for one call"):
        ask(model, processor, "Compare them.", images=images, max_new_tokens=model.config.max_position_embeddings)


def test_prompt_lengths_checks_as_the_processor_does_and_reads_no_pixels(model_and_processor, tmp_path):
    """It gave TypeErrors for what the processor refuses with a typed error, counted add_special_tokens=False
    wrong, and decoded every image (seconds for large RGBA pictures) to read sizes a file's header has."""
    _, processor = model_and_processor
    for text in (None, 5, [], "a\ud800b"):
        with pytest.raises((PromptError, InvalidArgumentError)):
            processor.prompt_lengths(text)
    prompt = build_prompt("Hi.", num_images=1)
    Image.new("RGBA", (900, 600), (0, 0, 0, 0)).save(tmp_path / "big.png")
    for special in (True, False):
        encoded = processor(text=prompt, images=[Image.open(tmp_path / "big.png")], add_special_tokens=special)["input_ids"]
        lazy = Image.open(tmp_path / "big.png")
        lazy.load = lambda: pytest.fail("prompt_lengths decoded the image")
        assert processor.prompt_lengths(prompt, [lazy], add_special_tokens=special)[0][0] == encoded.shape[1]
    assert processor.prompt_lengths([lazy], prompt) == processor.prompt_lengths(prompt, [lazy])  # (images, text)


def test_a_batch_that_does_not_fit_names_the_prompt_and_its_own_counts(model_and_processor, image):
    """Before: the longest prompt's length was reported with the image tokens of another row."""
    model, processor = model_and_processor
    long_text = build_prompt("ok " * 3000, num_images=0)
    [(text_tokens, _)] = processor.prompt_lengths(long_text)
    too_many = model.config.max_position_embeddings - text_tokens + 1
    with pytest.raises(ContextLengthError, match=f"Prompt 2 of 2 is {text_tokens:,} tokens \\(0 of them for images\\)"):
        generation.generate_batch(model, processor, ["Look.", long_text], [[image] * 2, []], max_new_tokens=too_many)


def test_context_limit_is_prompt_plus_new_tokens(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    record_generate(monkeypatch, model, reply_ids=[32007])
    prompt_tokens = processor(text=build_prompt("Hi", num_images=0), return_tensors="pt")["input_ids"].shape[1]
    monkeypatch.setattr(model.config, "max_position_embeddings", prompt_tokens + 5)
    ask(model, processor, "Hi", max_new_tokens=5)  # exactly fills the context: allowed
    with pytest.raises(ContextLengthError, match=f"{prompt_tokens + 6:,} in all"):
        ask(model, processor, "Hi", max_new_tokens=6)


def test_chats_given_to_generate_batch_say_how_to_pass_them(model_and_processor, image):
    """Before: "needs a non-empty list of prompts (strings)", with nothing about the Chat."""
    model, processor = model_and_processor
    chat = Chat().add_user("Hi", images=image)
    with pytest.raises(PromptError, match=re.escape("pass [chat.render(processor) for chat in chats]")):
        generation.generate_batch(model, processor, [chat], [chat.images], max_new_tokens=4)


# --- what to do instead: code that runs as written -------------------------------------------------

CALLS = {  # each function called as a learner would, with an argument it refuses; question and images are theirs
    "ask": lambda model, processor, question, images, **refused: ask(model, processor, question, images=images, **refused),
    "extract": lambda model, processor, question, images, **refused: extract(
        model, processor, question, {"type": "object", "properties": {}}, images=images, **refused
    ),
    "stream_chunks": lambda model, processor, question, images, **refused: stream_chunks(
        model, processor, question, images=images, **refused
    ),
}


@pytest.mark.parametrize("caller", [*CALLS, "generate_batch"])
def test_the_code_a_refusal_suggests_runs_as_written(model_and_processor, image, tmp_path, caller):
    """Before: the suggested code passed the images as given (paths) to the processor, which said "images must
    be loaded images"; generate_batch's refusal spoke of one question and images=..., which it does not take."""
    model, processor = model_and_processor
    image.save(tmp_path / "x.png")
    if caller == "generate_batch":
        learner = {"prompts": ["Describe.", "Hi"], "images": [[str(tmp_path / "x.png")], []]}
        instead = "the images of each row of the batch: pass the prompts and one list of images per prompt instead"
    else:
        learner = {"question": "Describe.", "images": [str(tmp_path / "x.png")]}
        instead = "the images: pass the question and its images (images=...) instead"
    codes = []
    for refused in (dict(input_ids=torch.ones(1, 3, dtype=torch.long)), dict(output_scores=True)):
        with pytest.raises(InvalidArgumentError) as caught:
            if caller == "generate_batch":
                generation.generate_batch(model, processor, learner["prompts"], learner["images"], **refused)
            else:
                CALLS[caller](model, processor, learner["question"], learner["images"], **refused)
        message = str(caught.value)
        if "input_ids" in refused:
            assert instead in message
        codes.append(re.search(r"yourself(?: \([^)]*\))?: (.*)\.$", message).group(1))
    assert codes[0] == codes[1]
    namespace = {"model": model, "processor": processor, **learner}
    exec(codes[0], namespace)
    assert namespace["output"].scores and namespace["output"].sequences.shape[0] == 1


def test_the_module_lists_its_public_names():
    assert generation.__all__ == ["ask", "extract", "stream_chunks", "generate_batch", "Generation"]
