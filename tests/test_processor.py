"""Processor with the real Phi-3 tokenizer: reference ids of spec §5.4, batching, every error case."""

import pytest
import torch
from PIL import Image
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from phi_helpers import ContextLengthError, PromptImageMismatchError
from phi_helpers.errors import InvalidArgumentError
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor
from phi_helpers.models.phi3_v.processing_phi3_v import Phi3VProcessor
from phi_helpers.testing import FIXTURES

IMAGE = 32044
PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
USER_CHUNK = [1, 32010, 29871, 13]
QUESTION_CHUNK = [1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 32007, 29871, 13, 32001]


@pytest.fixture(scope="module")
def processor():
    tokenizer = TokenizersBackend.from_pretrained(FIXTURES)
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=4), tokenizer=tokenizer)


def image(width=640, height=480, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def test_reference_token_ids(processor):
    ids = processor(PROMPT, image(), return_tensors="pt")["input_ids"][0].tolist()
    assert ids == USER_CHUNK + [IMAGE] * 757 + QUESTION_CHUNK  # BOS at the start of every chunk
    assert processor.tokenizer("\n<|assistant|>\n").input_ids[-1] == 32001  # <|assistant|> swallows "\n"


def test_1200x675_at_16_crops_gives_the_published_length(processor):
    # HF discussion #42: input_ids length 2371 and pixel_values (1, 17, 3, 336, 336).
    out = processor(PROMPT, image(1200, 675), num_crops=16)
    assert out["input_ids"].shape == (1, 2371)
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert out["attention_mask"].sum() == 2371


def test_official_call_styles(processor):
    a, b = image(colour=(255, 0, 0)), image(336, 672, colour=(0, 0, 255))
    two = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    out = processor(two, [a, b], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[: 4 + 757] == USER_CHUNK + [IMAGE] * 757
    assert ids[4 + 757 : 4 + 757 + 3] == [1, 29871, 13]  # BOS + "\n" after the first run
    assert ids.count(IMAGE) == 757 + 469
    assert out["image_sizes"].tolist() == [[672, 672], [672, 336]]
    # keyword order used by pipelines, and the reversed positional order
    assert torch.equal(processor(images=[a, b], text=two)["input_ids"], out["input_ids"])
    assert torch.equal(processor([a, b], two)["input_ids"], out["input_ids"])
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == PROMPT


def test_text_only_prompt(processor):
    out = processor("<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert "pixel_values" not in out
    assert out["input_ids"][0].tolist() == processor.tokenizer("<|user|>\nHi<|end|>\n<|assistant|>\n").input_ids


def test_batch_of_prompts_with_their_own_images_is_left_padded(processor):
    short = "<|user|>\n<|image_1|>\nA?<|end|>\n<|assistant|>\n"
    long = "<|user|>\n<|image_1|>\n<|image_2|>\nA longer question?<|end|>\n<|assistant|>\n"
    a, b, c = image(colour=(255, 0, 0)), image(336, 336), image(672, 336)
    batch = processor([short, long], [[a], [b, c]])
    first, second = processor(short, a), processor(long, [b, c])
    assert batch["input_ids"].shape[1] == second["input_ids"].shape[1]
    pad = batch["input_ids"].shape[1] - first["input_ids"].shape[1]
    assert batch["input_ids"][0, :pad].eq(processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * first["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, pad:], first["input_ids"][0])
    assert torch.equal(batch["input_ids"][1], second["input_ids"][0])
    assert torch.equal(batch["pixel_values"], torch.cat([first["pixel_values"], second["pixel_values"]]))
    # a flat list of images is handed out in tag order
    assert torch.equal(processor([short, long], [a, b, c])["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(
    ("prompt", "images", "message"),
    [
        ("<|image_1|>\n<|image_2|>\nQ", 1, "2 image tag"),
        ("<|image_1|>\nQ", 2, "1 image tag"),
        ("Q without tags", 1, "0 image tag"),
        ("<|image_2|>\n<|image_1|>\nQ", 2, "increasing order"),
        ("<|image_1|>\n<|image_1|>\nQ", 2, "each once"),
        ("<|image_2|>\nQ", 1, "increasing order"),
        ("<|image_1|>\nQ", 0, "1 image tag"),
    ],
)
def test_tag_errors(processor, prompt, images, message):
    with pytest.raises(PromptImageMismatchError, match=message):
        processor(prompt, [image() for _ in range(images)])


def test_batch_with_wrong_number_of_image_lists(processor):
    with pytest.raises(PromptImageMismatchError, match="2 prompts but 1 lists"):
        processor(["<|image_1|>A", "<|image_1|>B"], [[image()]])


def test_prompt_over_context_length(processor):
    limit = processor.tokenizer.model_max_length
    processor.tokenizer.model_max_length = 500
    try:
        with pytest.raises(ContextLengthError, match="775 tokens"):
            processor(PROMPT, image())
    finally:
        processor.tokenizer.model_max_length = limit


def test_truncation_with_images_is_refused(processor):
    with pytest.raises(InvalidArgumentError, match="image tokens"):
        processor(PROMPT, image(), truncation=True)


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # the tokenizer's, in the reference call
def test_text_only_prompts_take_the_tokenizers_padding_truncation_and_max_length(processor):
    """The original hands text-only prompts to tokenizer(texts, padding=, truncation=, max_length=)."""
    texts = ["<|user|>\nHi<|end|>\n<|assistant|>\n", "<|user|>\nA longer question here<|end|>\n<|assistant|>\n"]
    for kwargs in (dict(padding="max_length", max_length=20), dict(truncation=True, max_length=5), dict(padding=True),
                   dict(max_length=3), dict(padding=True, max_length=3), dict(padding="longest", truncation=True, max_length=4)):
        ours = processor(texts, **kwargs)
        try:  # a batch of unequal lengths without padding is a tensor the tokenizer cannot make; ours pads it
            expected = processor.tokenizer(texts, return_tensors="pt", **kwargs)
        except ValueError:
            expected = processor.tokenizer(texts, return_tensors="pt", **{"padding": "longest", **kwargs})
        assert torch.equal(ours["input_ids"], expected["input_ids"]), kwargs
        assert torch.equal(ours["attention_mask"], expected["attention_mask"]), kwargs
    assert processor(texts[0], padding="max_length", max_length=10)["input_ids"].shape == (1, 10)
    with pytest.raises(InvalidArgumentError, match="padding must be one of"):
        processor(texts, padding="maxlength")


def test_a_literal_image_token_in_the_prompt_is_refused(processor):
    """<|image|> (32044) marks image features; typed into the text it would be taken for one."""
    for images in (None, image()):
        with pytest.raises(PromptImageMismatchError, match=r"contains <\|image\|>.*<\|image_1\|>"):
            processor("<|user|>\n<|image_1|>\nSay <|image|> please<|end|>\n<|assistant|>\n" if images else "Say <|image|>", images)


def test_processor_chat_template_numbers_image_items(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\n<|image_2|>\nAnd this?<|end|>\n<|assistant|>\n"
    )


def test_text_only_batches_pad_like_the_tokenizer_and_image_batches_left(processor):
    texts = ["<|user|>\nHi<|end|>\n<|assistant|>\n", "<|user|>\nA longer question here<|end|>\n<|assistant|>\n"]
    right = processor(texts)["attention_mask"][0].tolist()
    assert right[0] == 1 and right[-1] == 0  # the original's tokenizer(texts, padding=...) pads right
    assert processor(texts, padding_side="left")["attention_mask"][0].tolist()[0] == 0
    with_images = processor(["<|image_1|>A", "<|image_1|>A longer question"], [[image()], [image()]])
    assert with_images["attention_mask"][0].tolist()[0] == 0


def test_original_processor_api(processor):
    assert processor.special_image_token == "<|image|>" and processor.special_image_token_id == 32044
    assert processor.calc_num_image_tokens_from_image_size(640, 480) == 757
    assert processor.calc_num_image_tokens([image(), image(336, 672)]) == [757, 469]


@pytest.mark.parametrize("typo, meant", [("num_crop", "num_crops"), ("image", "images"), ("max_lenght", "max_length")])
def test_a_misspelt_argument_is_refused_not_ignored(processor, typo, meant):
    """Before, processor(prompt, image, num_crop=16) ran at the default num_crops without a word."""
    with pytest.raises(InvalidArgumentError, match=f"no argument '{typo}': did you mean {meant}="):
        processor("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", Image.new("RGB", (40, 30)), **{typo: 1})


def test_what_a_pipeline_passes_along_is_still_accepted(processor):
    inputs = processor("<|user|>\nHi<|end|>\n<|assistant|>\n", do_sample=False, min_new_tokens=2, videos=None, audio=None)
    assert inputs["input_ids"].shape[0] == 1


@pytest.mark.parametrize("setting", ["min_length", "truncation_side"])
def test_a_setting_of_another_kind_is_not_taken_for_a_typo(processor, setting):
    """min_length is a generation setting, truncation_side the tokenizer's: not "did you mean max_length / truncation"."""
    assert processor("<|user|>\nHi<|end|>\n<|assistant|>\n", **{setting: 2})["input_ids"].shape[0] == 1


@pytest.mark.parametrize("with_image", [False, True])
def test_a_prompt_longer_than_the_context_gets_only_our_error(processor, capfd, with_image):
    """Before, transformers first printed "Token indices sequence length is longer than the specified maximum
    sequence length ... will result in indexing errors", then ContextLengthError said what to do."""
    tag, image = ("<|image_1|>\n", Image.new("RGB", (40, 30))) if with_image else ("", None)
    with pytest.raises(ContextLengthError):
        processor(f"<|user|>\n{tag}" + "word " * 132_000 + "<|end|>\n<|assistant|>\n", image)
    assert "Token indices sequence length" not in "".join(capfd.readouterr())
