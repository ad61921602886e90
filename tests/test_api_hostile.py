"""Hostile arguments to prompts, the processor and the model: a typed error that says what to do, never a
TypeError or IndexError from inside the tokenizer or torch, and never an argument silently ignored."""

import pytest
import torch
from PIL import Image

from phi_helpers import Chat, ask, build_prompt
from phi_helpers.api.generation import generate_batch
from phi_helpers.errors import InvalidArgumentError, PromptError

SURROGATE_TEXT = "a\ud800b"  # what surrogateescape file names and JSON "\ud800" escapes give
CHAT_FORMAT = "<|user|>\n{}<|end|>\n<|assistant|>\n"
SAYS_WHERE_AND_HOW = r"U\+D800 at character 1.*encode\('utf-8', 'replace'\)"


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (40, 30), "red")


# 1. Surrogate code points: refused where the text is given, with its position and a way out.


@pytest.mark.parametrize(
    "give",
    [
        lambda: build_prompt(SURROGATE_TEXT),
        lambda: build_prompt("hi", system=SURROGATE_TEXT),
        lambda: Chat(system=SURROGATE_TEXT),
        lambda: Chat().add_user(SURROGATE_TEXT),
        lambda: Chat().add_assistant(SURROGATE_TEXT),
        lambda: Chat().add_assistant(SURROGATE_TEXT, generated=True),
        lambda: Chat.from_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": SURROGATE_TEXT}]),
    ],
    ids=["question", "system", "Chat-system", "add_user", "add_assistant", "add_assistant-generated", "from_messages"],
)
def test_text_with_a_surrogate_is_refused_when_it_is_given(give):
    with pytest.raises(PromptError, match=SAYS_WHERE_AND_HOW):
        give()


def test_a_chat_that_refused_a_surrogate_turn_keeps_working(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    chat = Chat().add_user("hi")
    with pytest.raises(PromptError, match=SAYS_WHERE_AND_HOW):
        chat.add_user(SURROGATE_TEXT)
    with pytest.raises(PromptError, match=SAYS_WHERE_AND_HOW):
        chat.add_assistant(SURROGATE_TEXT)
    assert len(chat) == 1
    ask(model, processor, chat, max_new_tokens=1)
    assert [message["role"] for message in chat.messages] == ["user", "assistant"]


@pytest.mark.parametrize("question", [SURROGATE_TEXT, CHAT_FORMAT.format(SURROGATE_TEXT)], ids=["plain", "chat-format"])
def test_ask_and_generate_batch_refuse_a_surrogate(tiny_model_and_processor, question):
    model, processor = tiny_model_and_processor
    with pytest.raises(PromptError, match=r"U\+D800 at character"):
        ask(model, processor, question, max_new_tokens=1)
    with pytest.raises(PromptError, match=r"U\+D800 at character"):
        generate_batch(model, processor, ["hi", question], [[], []], max_new_tokens=1)


def test_the_processor_refuses_a_surrogate_in_a_prompt(processor):
    with pytest.raises(PromptError, match=r"The prompt contains .*U\+D800 at character 1"):
        processor(text=SURROGATE_TEXT)
    with pytest.raises(PromptError, match=r"Prompt 2 of 2 contains .*U\+DC80 at character 10"):
        processor(text=["hi", CHAT_FORMAT.format("x\udc80")])


# 2. The processor's text and images arguments.


def test_a_file_name_as_image_is_refused_not_taken_for_the_prompt(processor, tmp_path, image):
    path = tmp_path / "red.png"
    image.save(path)
    for images in (str(path), [str(path)], [path]):
        with pytest.raises(InvalidArgumentError, match=r"load_image\(path\)"):
            processor(text=build_prompt("x"), images=images)
    # the original's reversed call still works
    assert torch.equal(processor(image, build_prompt("x"))["input_ids"], processor(build_prompt("x"), image)["input_ids"])


@pytest.mark.parametrize("text", [5, b"hi", [], ["hi", 5]], ids=["int", "bytes", "empty-list", "list-with-int"])
def test_a_prompt_that_is_not_text_is_a_prompt_error(processor, text):
    with pytest.raises(PromptError, match="text must be a prompt"):
        processor(text=text)


# 3. The model called directly.


@pytest.mark.parametrize(
    "make_ids", [lambda ids: ids[0], lambda ids: ids.tolist(), lambda ids: ids[None]], ids=["1-D", "list", "3-D"]
)
def test_the_model_needs_2d_input_ids(model, processor, make_ids):
    ids = processor(text=build_prompt("hi", num_images=0))["input_ids"]
    with pytest.raises(InvalidArgumentError, match=r"2-D tensor \(batch, sequence\).*ids\[None\]"):
        model(input_ids=make_ids(ids))
    assert model(input_ids=ids).logits.shape[:2] == ids.shape


# 4. Chat.add_assistant's flags and the processor argument of the prompt builders.


@pytest.mark.parametrize("settings", [{"position": "0"}, {"position": -1}, {"position": 1.0}, {"generated": "yes"}, {"generated": 1}])
def test_add_assistant_refuses_flags_of_the_wrong_type(settings):
    chat = Chat().add_user("hi")
    with pytest.raises(InvalidArgumentError, match=next(iter(settings))):
        chat.add_assistant("Hello", **settings)
    assert len(chat) == 1
    assert chat.add_assistant("Hello", generated=False, position=0).messages[0] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("wrong", ["model", "tiny", "tokenizer"])
def test_a_processor_argument_that_is_not_a_processor_is_refused(model, processor, wrong):
    not_a_processor = {"model": model, "tiny": "tiny", "tokenizer": processor.tokenizer}[wrong]
    with pytest.raises(InvalidArgumentError, match=r"processor must be the model's processor .*load_model"):
        build_prompt("hi", processor=not_a_processor)
    with pytest.raises(InvalidArgumentError, match=r"processor must be the model's processor"):
        Chat().add_user("hi").render(not_a_processor)
    assert build_prompt("hi", processor=processor) == build_prompt("hi")
