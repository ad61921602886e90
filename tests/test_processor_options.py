"""The processor's options: return_tensors as the original, transformers' standard options implemented or
refused (never ignored), and errors that name the prompt, image or tag at fault."""

import numpy as np
import pytest
import torch

from phi_helpers import ImageLoadError, PromptImageMismatchError
from phi_helpers.errors import InvalidArgumentError
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor

from test_processor import IMAGE, PROMPT, QUESTION_CHUNK, USER_CHUNK, image, processor  # noqa: F401  (a fixture)

TEXT = "<|user|>\nHi<|end|>\n<|assistant|>\n"
TEXTS = [TEXT, "<|user|>\nA longer question here<|end|>\n<|assistant|>\n"]


# --- return_tensors as the original: text-only prompts go to tokenizer(texts, ..., return_tensors=...) -----


def test_text_only_return_tensors_none_gives_the_tokenizers_lists(processor):
    """Before, return_tensors=None gave tensors; the original hands it to the tokenizer, which gives lists."""
    single = processor(TEXT, return_tensors=None)
    assert single["input_ids"] == processor.tokenizer(TEXT)["input_ids"]  # a flat list for one prompt
    assert single["attention_mask"] == [1] * len(single["input_ids"])
    batch = processor(TEXTS, return_tensors=None)  # unpadded, of unequal lengths, as the tokenizer gives them
    assert batch["input_ids"] == processor.tokenizer(TEXTS)["input_ids"]
    assert len(batch["input_ids"][0]) < len(batch["input_ids"][1])
    padded = processor(TEXTS, padding=True, return_tensors=None)
    assert dict(padded) == dict(processor.tokenizer(TEXTS, padding=True))


def test_text_only_return_tensors_np_gives_the_tokenizers_arrays(processor):
    ours = processor(TEXTS, padding="max_length", max_length=20, return_tensors="np")
    expected = processor.tokenizer(TEXTS, padding="max_length", max_length=20, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert isinstance(ours[key], np.ndarray) and ours[key].dtype == expected[key].dtype
        assert np.array_equal(ours[key], expected[key])


def test_with_images_return_tensors_none_is_the_originals_mix(processor):
    """The original builds input_ids as a LongTensor and gives the image processor return_tensors=None, which
    leaves pixel_values a tensor and image_sizes a list (before, image_sizes was a tensor too)."""
    plain = processor(PROMPT, image(), return_tensors=None)
    reference = processor(PROMPT, image())
    assert plain["image_sizes"] == [[672, 672]]
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert isinstance(plain[key], torch.Tensor) and torch.equal(plain[key], reference[key]), key
    assert plain["input_ids"].dtype == torch.long


# --- transformers' standard options: implemented ----------------------------------------------------------


def test_add_special_tokens_false_leaves_out_every_bos(processor):
    """Before, add_special_tokens=False was ignored: the BOS stayed."""
    assert processor(TEXT, add_special_tokens=False)["input_ids"][0].tolist() == processor.tokenizer(
        TEXT, add_special_tokens=False
    )["input_ids"]
    ids = processor(PROMPT, image(), add_special_tokens=False)["input_ids"][0].tolist()
    assert ids == USER_CHUNK[1:] + [IMAGE] * 757 + QUESTION_CHUNK[1:]
    assert processor(PROMPT, image(), add_special_tokens=True)["input_ids"][0].tolist() == USER_CHUNK + [IMAGE] * 757 + QUESTION_CHUNK


def test_pad_to_multiple_of_pads_text_only_and_image_prompts(processor):
    """Before, pad_to_multiple_of=8 was ignored."""
    ours = processor(TEXTS, padding=True, pad_to_multiple_of=8)
    expected = processor.tokenizer(TEXTS, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert torch.equal(ours["input_ids"], expected["input_ids"]) and ours["input_ids"].shape[1] % 8 == 0
    assert processor(TEXTS, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0  # padding implied
    with_image = processor(PROMPT, image(), pad_to_multiple_of=8)  # 4 + 757 + 14 = 775 tokens -> 776, padded left
    assert with_image["input_ids"].shape == (1, 776)
    assert with_image["attention_mask"][0].tolist() == [0] + [1] * 775
    assert with_image["input_ids"][0, 1:].tolist() == USER_CHUNK + [IMAGE] * 757 + QUESTION_CHUNK
    with pytest.raises(InvalidArgumentError, match="pad_to_multiple_of must be a whole number of at least 1"):
        processor(TEXT, pad_to_multiple_of=0)


def test_return_attention_mask_false_leaves_it_out(processor):
    """Before, return_attention_mask=False was ignored."""
    assert list(processor(TEXTS, return_attention_mask=False).keys()) == ["input_ids"]
    assert "attention_mask" not in processor(PROMPT, image(), return_attention_mask=False)
    assert "attention_mask" in processor(PROMPT, image(), return_attention_mask=True)


def test_grouped_options_are_read_as_keywords(processor):
    """transformers 5 passes options grouped: images_kwargs={"num_crops": 16} was ignored before (4 crops)."""
    grouped = processor(text=PROMPT, images=image(), images_kwargs={"num_crops": 16})
    assert grouped["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert torch.equal(grouped["input_ids"], processor(PROMPT, image(), num_crops=16)["input_ids"])
    text_grouped = processor(TEXT, text_kwargs={"padding": "max_length", "max_length": 40}, common_kwargs={"return_tensors": "np"})
    assert text_grouped["input_ids"].shape == (1, 40) and isinstance(text_grouped["input_ids"], np.ndarray)
    same = processor(PROMPT, image(), num_crops=16, images_kwargs={"num_crops": 16})  # given twice, the same: fine
    assert same["pixel_values"].shape[1] == 17
    with pytest.raises(InvalidArgumentError, match="num_crops is given twice, as 2 and as 16"):
        processor(PROMPT, image(), num_crops=2, images_kwargs={"num_crops": 16})
    with pytest.raises(InvalidArgumentError, match="does not take videos_kwargs"):
        processor(PROMPT, image(), videos_kwargs={"fps": 2})


def test_image_options_reach_the_image_processor(processor):
    ours = processor(PROMPT, image(), image_mean=[0, 0, 0], image_std=[1, 1, 1])["pixel_values"]
    expected = processor.image_processor(image(), image_mean=[0, 0, 0], image_std=[1, 1, 1])["pixel_values"]
    assert torch.equal(ours, expected) and not torch.equal(ours, processor(PROMPT, image())["pixel_values"])


# --- transformers' standard options: refused -------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(return_token_type_ids=True), "does not implement the text option return_token_type_ids=True"),
        (dict(stride=2), "does not implement the text option stride=2"),
        (dict(return_offsets_mapping=True), "marks no assistant tokens"),
        (dict(sanitize_control_tokens=True), "build_prompt and Chat refuse special tokens"),
        (dict(fps=2), "does not take fps=2: Phi-3-vision reads text and images only"),
        (dict(videos=[np.zeros((4, 30, 40, 3), np.uint8)]), "not videos or audio. Pass video frames as images"),
        (dict(audio=np.zeros(16000, np.float32)), "not videos or audio"),
        (dict(do_normalize=False), "does not take do_normalize=False: it always resizes, pads and normalises"),
        (dict(images_kwargs={"size": {"height": 224, "width": 224}}), "does not take size="),
    ],
)
def test_options_it_does_not_implement_are_refused_not_ignored(processor, option, message):
    with pytest.raises(InvalidArgumentError, match=message):
        processor(PROMPT, image(), **option)


def test_options_left_off_or_passed_by_pipelines_are_accepted(processor):
    reference = processor(PROMPT, image())["input_ids"]
    for options in (dict(return_token_type_ids=False, stride=None, fps=None), dict(videos=None, audio=None),
                    dict(do_normalize=None, do_convert_rgb=True), dict(max_new_tokens=4, do_sample=False)):
        assert torch.equal(processor(PROMPT, image(), **options)["input_ids"], reference), options


def test_the_image_processor_refuses_options_it_does_not_read():
    """Before, do_normalize=False, size= and do_resize=False gave the same pixels, without a word."""
    processor = Phi3VImageProcessor(num_crops=1)
    for option in (dict(do_normalize=False), dict(size={"height": 224, "width": 224}), dict(do_resize=False),
                   dict(device="cpu")):
        with pytest.raises(InvalidArgumentError, match=f"does not take {next(iter(option))}=.*Its options are num_crops"):
            processor(image(), **option)
    reference = processor(image())["pixel_values"]
    for option in (dict(do_resize=None), dict(do_convert_rgb=False)):  # unset; no effect, as in the original
        assert torch.equal(processor(image(), **option)["pixel_values"], reference)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(image_std=0), "image_std must be 3 positive numbers"),
        (dict(image_std=[0.5, 0.0, 0.5]), "image_std must be 3 positive numbers"),
        (dict(image_mean=[0.5, 0.5]), "image_mean must be 3 numbers, one per channel"),
        (dict(image_mean="grey"), "image_mean must be 3 numbers"),
        (dict(image_mean=[0.5, float("nan"), 0.5]), "image_mean must be 3 numbers"),
    ],
)
def test_unusable_mean_or_std_is_refused(option, message):
    """Before, image_std=0 gave inf pixel values and a 2-value mean a numpy broadcast error."""
    with pytest.raises(InvalidArgumentError, match=message):
        Phi3VImageProcessor(num_crops=1)(image(), **option)
    with pytest.raises(InvalidArgumentError, match=message):
        Phi3VImageProcessor(num_crops=1, **option)


# --- apply_chat_template ----------------------------------------------------------------------------------


def test_apply_chat_template_tokenizes_with_images_as_the_processor(processor):
    """The pipeline's chat path: apply_chat_template(tokenize=True, return_dict=True) calls the processor."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image()},
                                             {"type": "text", "text": "What is shown in this image?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = processor(PROMPT, image())
    assert torch.equal(out["input_ids"], expected["input_ids"]) and torch.equal(out["pixel_values"], expected["pixel_values"])


def test_apply_chat_template_refuses_a_video_item(processor):
    """Before, {"type": "video"} items were dropped from the prompt without a word."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "What happens?"}, {"type": "video", "path": "a.mp4"}]}]
    for tokenize in (False, True):
        with pytest.raises(InvalidArgumentError, match="Message 1 holds a 'video' item: Phi-3-vision reads text and images"):
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)


def test_apply_chat_template_refuses_what_the_template_cannot_do(processor):
    """Before: a KeyError ('offset_mapping') for the assistant mask; sanitize_control_tokens garbled the ids."""
    messages = [{"role": "user", "content": "a <|end|> b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(InvalidArgumentError, match="return_offsets_mapping=True.*marks no assistant tokens"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    with pytest.raises(InvalidArgumentError, match="sanitize_control_tokens=True"):
        processor.apply_chat_template(messages[:1], tokenize=True, return_dict=True, sanitize_control_tokens=True)


# --- errors that name what is at fault -------------------------------------------------------------------


def test_batch_prompts_are_numbered_from_1(processor):
    """Before: "Prompt 0 has 1 image tag(s)..." for the first prompt, while images count from 1."""
    with pytest.raises(PromptImageMismatchError, match=r"^Prompt 1 of 2 has 1 image tag\(s\) but 2 image\(s\)"):
        processor(["<|image_1|>A", "<|image_1|>B"], [[image(), image()], [image()]])
    with pytest.raises(PromptImageMismatchError, match=r"^Prompt 2 of 2 contains <\|image\|>"):
        processor(["A", "B <|image|>"])


@pytest.mark.parametrize("tag", ["<|image_-1|>", "<| image_1 |>", "<|Image_1|>", "<|image 1|>"])
def test_a_malformed_tag_is_named(processor, tag):
    """Before: "has 0 image tag(s) but 1 image(s)" without a word about the malformed tag."""
    prompt = f"<|user|>\n{tag}\nWhat is this?<|end|>\n<|assistant|>\n"
    with pytest.raises(PromptImageMismatchError, match=f"has 0 image tag.*{tag.replace('|', '[|]')!s}' in it is not an image tag"):
        processor(prompt, image())
    assert processor(prompt)["input_ids"][0].tolist() == processor.tokenizer(prompt)["input_ids"]  # without images: text


@pytest.mark.parametrize(
    ("text", "images", "place"),
    [
        (PROMPT, [image(), None], r"images\[1\]"),
        (PROMPT, [None], r"images\[0\]"),
        ([PROMPT, PROMPT], [[image()], [None]], r"images\[1\]\[0\]"),
    ],
)
def test_none_in_an_image_list_is_refused(processor, text, images, place):
    """Before, images=[a, None] for one tag ran with the None dropped."""
    with pytest.raises(ImageLoadError, match=f"^{place} is None, not an image"):
        processor(text, images)


def test_none_in_an_image_list_is_refused_by_the_image_processor():
    with pytest.raises(ImageLoadError, match=r"^images\[1\] is None"):
        Phi3VImageProcessor(num_crops=1)([image(), None])


def test_a_bad_image_says_which_one_it_is(processor):
    """Before: "Cannot use a numpy array ..." without saying which image of the batch."""
    bad = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(ImageLoadError, match=r"^Prompt 2 of 2, image 1 of 1: Cannot use a numpy array of shape \(3, 4, 5\)"):
        processor([PROMPT, PROMPT], [[image()], [bad]])
    two = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    with pytest.raises(ImageLoadError, match=r"^Image 2 of 2: Cannot use a numpy array"):
        processor(two, [image(), bad])
    with pytest.raises(ImageLoadError, match=r"^Image 2 of 2: Expected a PIL image"):
        Phi3VImageProcessor(num_crops=1)([image(), 7])
    with pytest.raises(ImageLoadError, match=r"^Cannot use a numpy array"):  # a lone image needs no number
        processor(PROMPT, bad)
