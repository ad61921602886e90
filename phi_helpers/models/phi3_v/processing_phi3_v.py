"""Processor of Phi-3-vision / Phi-3.5-vision: prompt text + images -> model inputs (spec §5).

A prompt names its images with tags ``<|image_1|>``, ``<|image_2|>``, ... (plain text, not tokens).
The processor splits the prompt at the tags, tokenizes each text chunk on its own (so *every* chunk
starts with BOS, id 1, as in the original), and puts ``num_img_tokens`` copies of the ``<|image|>``
token (id 32044) where each tag was. The model later overwrites those positions with image features.

Differences from the original processor, on purpose (docs/native-implementation.md):
* image positions use the real token id 32044 instead of negative ids -N, so outputs decode and
  ``repetition_penalty`` works; the model still accepts negative ids;
* a list of prompts, each with its own images, is batched with left padding;
* bad tags raise PromptImageMismatchError instead of an assert or silently wrong features; a prompt
  that is not text (or holds a surrogate code point) raises PromptError, a file name given as an image
  InvalidArgumentError, instead of a TypeError from the tokenizer;
* the original takes no other option (a TypeError): here transformers' standard options are either
  implemented (``add_special_tokens``, ``pad_to_multiple_of``, ``return_attention_mask``, and the
  grouped ``text_kwargs={...}`` / ``images_kwargs={...}`` of transformers 5 and its pipelines) or
  refused with InvalidArgumentError, never ignored;
* with images and ``return_tensors="np"`` every output is a numpy array (the original left
  ``input_ids`` and ``attention_mask`` torch tensors); with ``return_tensors=None`` the outputs are the
  original's (text only: the tokenizer's lists; with images: ``image_sizes`` a list, the rest tensors).

The prompt is tokenized as it is written: ``<|user|>``, ``<|end|>``... in it are control tokens, as on
the model card. Text a user types is checked for special tokens before it gets into a prompt
(``phi_helpers.api.prompts``); a prompt handed to the processor is taken to be meant as written.
"""

import difflib
import inspect
import json
import os
import re
from pathlib import Path

import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import AudioKwargs, ImagesKwargs, TextKwargs, VideosKwargs
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from ...errors import ContextLengthError, InvalidArgumentError, PromptError, PromptImageMismatchError, check_whole_number
from .image_processing_phi3_v import Phi3VImagesKwargs, checked_image, flatten_images, image_name, to_rgb

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")  # THE image tag pattern of the package: <|image_1|>, <|image_2|>...
_LOOKS_LIKE_A_TAG = re.compile(r"<\|[^<>|]*image[^<>|]*\|>", re.IGNORECASE)  # <| image_1 |>, <|image_-1|>, <|Image 1|>...
IMAGE_TOKEN = "<|image|>"
_SURROGATE = re.compile("[\ud800-\udfff]")  # code points that are not characters: UTF-8 cannot encode them
PADDING_CHOICES = (False, True, "longest", "max_length", "do_not_pad")  # the tokenizer's; all but "max_length" pad to the longest

# The tokenizer files shipped with Phi-3-vision-128k-instruct (Phi-3.5-vision's are the same): its
# tokenizer_config.json holds the checkpoint's chat template and the list of added (special) tokens.
VENDORED_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "phi-3-vision-128k-instruct"
_VENDORED_TOKENIZER_CONFIG = json.loads((VENDORED_CHECKPOINT / "tokenizer_config.json").read_text(encoding="utf-8"))
CHECKPOINT_CHAT_TEMPLATE = _VENDORED_TOKENIZER_CONFIG["chat_template"]
CHECKPOINT_ADDED_TOKENS = tuple(token["content"] for token in _VENDORED_TOKENIZER_CONFIG["added_tokens_decoder"].values())


def image_tag(number: int) -> str:
    """The tag that stands for the ``number``-th image of a prompt (counting from 1): ``<|image_1|>``."""
    return f"<|image_{number}|>"


# The processor's chat template (processor.apply_chat_template): this preamble, then the tokenizer's own
# (the checkpoint's) template. The preamble turns list contents (pipeline / multimodal chat messages)
# into strings, each {"type": "image"} item an <|image_N|> line numbered over the whole conversation, so
# that the checkpoint's template renders them; string contents pass unchanged.
_CONTENT_ITEMS_TO_TEXT = (
    "{% set converted = namespace(messages=[], images=0) %}"
    "{% for message in messages %}"
    "{% set content = namespace(text='') %}"
    "{% if message['content'] is string %}{% set content.text = message['content'] %}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set converted.images = converted.images + 1 %}"
    "{% set content.text = content.text + '<|image_' + converted.images|string + '|>\n' %}"
    "{% elif item['type'] == 'text' %}{% set content.text = content.text + item['text'] %}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% set converted.messages = converted.messages + [{'role': message['role'], 'content': content.text}] %}"
    "{% endfor %}"
    "{% set messages = converted.messages %}"
)


def processor_chat_template(tokenizer_template: str | None = None) -> str:
    """The processor's chat template: ``_CONTENT_ITEMS_TO_TEXT`` + the tokenizer's template (default: the
    checkpoint's), so there is one template, which ``phi_helpers.api.prompts`` renders too."""
    return _CONTENT_ITEMS_TO_TEXT + (tokenizer_template or CHECKPOINT_CHAT_TEMPLATE)


def check_encodable(text: str, which: str) -> None:
    """Raise PromptError if ``text`` holds a surrogate code point (U+D800 to U+DFFF), which the tokenizer
    cannot encode (it is not a character, and UTF-8 has no bytes for it). ``which``: what the text is,
    as the message starts ("The question", "Prompt 2"). ``phi_helpers.api.prompts`` checks typed text
    with it too, so every way in says the same."""
    found = _SURROGATE.search(text)
    if found:
        raise PromptError(
            f"{which} contains the surrogate code point U+{ord(found.group()):04X} at character {found.start()}, "
            "which is not a character and cannot be tokenized. It usually comes from bytes decoded with "
            "errors='surrogateescape' (a file name, os.listdir) or from an unpaired \\ud800 escape in JSON. Fix the "
            "decoding where the text comes from, or replace it: text.encode('utf-8', 'replace').decode()."
        )


# transformers' standard processor options (ProcessingKwargs) that this processor does not implement. They are
# refused, not ignored (``add_special_tokens``, ``pad_to_multiple_of`` and ``return_attention_mask``, which it
# implements, are arguments of __call__): a text option unless it is off (None or False), a video or audio
# option unless it is None. Image options go to the image processor, which refuses those it does not read.
_IMAGE_OPTIONS = ImagesKwargs.__optional_keys__ | Phi3VImagesKwargs.__optional_keys__
_TEXT_OPTIONS = TextKwargs.__optional_keys__
_VIDEO_AND_AUDIO_OPTIONS = (VideosKwargs.__optional_keys__ | AudioKwargs.__optional_keys__) - _IMAGE_OPTIONS - _TEXT_OPTIONS
_TEXT_OPTION_HINTS = {
    "sanitize_control_tokens": "Check typed text before it goes into a prompt: phi_helpers.build_prompt and Chat refuse "
    "special tokens in it.",
    "return_offsets_mapping": "apply_chat_template(return_assistant_tokens_mask=True) asks for it, but Phi-3-vision's "
    "chat template marks no assistant tokens.",
}
_TEXT_OPTION_HINTS["return_text_replacement_offsets"] = _TEXT_OPTION_HINTS["return_offsets_mapping"]
_GROUPED_OPTIONS = ("text_kwargs", "images_kwargs", "common_kwargs", "videos_kwargs", "audio_kwargs")  # transformers 5's way


def _image_options(kwargs: dict) -> dict:
    """The image options in ``kwargs`` (``image_mean=``, ``do_normalize=``...), for the image processor, which
    reads or refuses them; before that, refuse the text, video and audio options this processor does not
    implement, and misspelt arguments. The rest (generation settings a pipeline passes along) is ignored."""
    for name, value in kwargs.items():
        if name in _IMAGE_OPTIONS:
            continue
        if name in _TEXT_OPTIONS and value is not None and value is not False:
            hint = _TEXT_OPTION_HINTS.get(name, "Call processor.tokenizer(...) for it (the processor tokenizes on its own).")
            raise InvalidArgumentError(f"Phi3VProcessor does not implement the text option {name}={value!r}. {hint}")
        if name in _VIDEO_AND_AUDIO_OPTIONS and value is not None:
            raise InvalidArgumentError(
                f"Phi3VProcessor does not take {name}={value!r}: Phi-3-vision reads text and images only."
            )
        close = difflib.get_close_matches(name, list(_CALL_DEFAULTS), n=1, cutoff=0.85)  # not min_length (max_length) nor truncation_side
        if close:
            raise InvalidArgumentError(f"The processor has no argument {name!r}: did you mean {close[0]}=?")
    return {name: value for name, value in kwargs.items() if name in _IMAGE_OPTIONS}


def _ungroup(kwargs: dict, given: dict) -> dict:
    """``given`` (the arguments of __call__) and ``kwargs``, with the options inside ``text_kwargs={...}``,
    ``images_kwargs={...}`` and ``common_kwargs={...}`` taken out of their groups. An option given twice with
    different values (as a keyword, not left at its default, and in a group) is refused; video and audio
    groups must be empty."""
    options = {**given, **kwargs}
    for group in _GROUPED_OPTIONS:
        grouped = options.pop(group, None) or {}
        if not isinstance(grouped, dict):
            raise InvalidArgumentError(f"{group} must be a dict of options, got {grouped!r:.60}.")
        if grouped and group in ("videos_kwargs", "audio_kwargs"):
            raise InvalidArgumentError(f"Phi3VProcessor does not take {group}: Phi-3-vision reads text and images only.")
        for name, value in grouped.items():
            before = options.get(name, _CALL_DEFAULTS.get(name))
            if before != _CALL_DEFAULTS.get(name) and before != value:
                raise InvalidArgumentError(f"{name} is given twice, as {before!r} and as {value!r}; give it once.")
            options[name] = value
    return options


def _are_prompts(value) -> bool:
    """A prompt (str) or a non-empty list of prompts."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


def prompt_name(index: int, count: int) -> str:
    """How messages name prompt ``index`` (from 0) of ``count``: "The prompt", "Prompt 2 of 3"."""
    return "The prompt" if count == 1 else f"Prompt {index + 1} of {count}"


def _image_numbers(prompt: str) -> list[int]:
    return [int(n) for n in IMAGE_TAG.findall(prompt)]


def _check_tags(prompt: str, num_images: int, which: str) -> None:
    """Tags must be <|image_1|> ... <|image_k|>, each once, in this order, with k = number of images."""
    numbers = _image_numbers(prompt)
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        raise PromptImageMismatchError(
            f"{which}: image tags must be <|image_1|>, <|image_2|>, ... each once and in increasing order; "
            f"found {[image_tag(n) for n in numbers]}. Number the images 1..N in the order you pass them."
        )
    if len(numbers) != num_images:
        hint = (
            "Add one <|image_N|> tag per image (phi_helpers.build_prompt does this)"
            if len(numbers) < num_images
            else "Pass one image per tag, in tag order"
        )
        malformed = [tag for tag in _LOOKS_LIKE_A_TAG.findall(prompt) if not IMAGE_TAG.fullmatch(tag) and tag != IMAGE_TOKEN]
        if malformed:
            hint += (
                f". {malformed[0]!r} in it is not an image tag (it is read as text): write tags as <|image_1|>, "
                "<|image_2|>... with no spaces, numbered from 1"
            )
        raise PromptImageMismatchError(
            f"{which} has {len(numbers)} image tag(s) but {num_images} image(s) were given. {hint}."
        )


def _rgb_images(images_per_prompt: list[list], convert=to_rgb) -> list:
    """Every prompt's images, in order, as RGB PIL images (``convert``: `checked_image` leaves them as they are, not
    decoded); an error names the image: "Image 2 of 3" of the prompt, or "Prompt 2 of 3, image 1 of 1" in a batch."""
    rgb = []
    for index, group in enumerate(images_per_prompt):
        for position, image in enumerate(group, start=1):
            name = image_name(position, len(group))
            if len(images_per_prompt) > 1:
                name = f"{prompt_name(index, len(images_per_prompt))}, image {position} of {len(group)}"
            rgb.append(convert(image, name))
    return rgb


def _refuse_other_content(conversation) -> None:
    """InvalidArgumentError for a chat message item other than text or an image ({"type": "video"}...):
    the chat template would drop it without a word."""
    batched = conversation and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    conversations = conversation if batched else [conversation]
    for messages in conversations:
        for number, message in enumerate(getattr(messages, "messages", messages), start=1):
            content = message.get("content") if isinstance(message, dict) else None
            for item in content if isinstance(content, (list, tuple)) else ():
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                if kind not in ("text", "image", "image_url"):
                    raise InvalidArgumentError(
                        f"Message {number} holds a {kind!r} item: Phi-3-vision reads text and images only, so its chat "
                        'template has no place for it. Pass video frames as images ({"type": "image", "image": frame}), '
                        "or leave the item out."
                    )


def check_context_length(
    prompt_tokens: int, limit: int, max_new_tokens: int = 0, image_tokens: int = 0, which: str = "The prompt"
) -> None:
    """Raise ContextLengthError when ``prompt_tokens`` (+ ``max_new_tokens`` to generate) exceed ``limit``.

    The one place that refuses a prompt too long for the model: the processor calls it with the
    tokenizer's ``model_max_length``, ``ask`` with the model's context and the answer's length, both before
    any image is processed. ``which`` names the prompt ("Prompt 2 of 3" in a batch).
    """
    total = prompt_tokens + max_new_tokens
    if total <= limit:
        return
    facts = f"{which} is {prompt_tokens:,} tokens ({image_tokens:,} of them for images)"
    if max_new_tokens:
        facts += f" and up to {max_new_tokens:,} new tokens were asked for: {total:,} in all,"
    facts += f" but the model's context holds {limit:,}."
    raise ContextLengthError(
        f"{facts} " + ("Lower max_new_tokens, use " if max_new_tokens else "Use ")
        + "fewer images or a lower num_crops (an image's tokens depend on its shape and num_crops, not on its size "
        "in pixels: ask(..., num_crops=1) for one call, load_model(num_crops=...) for all), or shorten the prompt "
        "or history (chat.drop_images(keep_last=1), chat.drop_turns(keep_last=3) or chat.reset()).",
        facts=facts,
    )


class Phi3VProcessor(ProcessorMixin):
    r"""Pairs the Phi-3 tokenizer with :class:`Phi3VImageProcessor`.

    Call it like the original: ``processor(prompt, image)``, ``processor(prompt, [img1, img2])``, or
    with a list of prompts and one list of images per prompt: ``processor([p1, p2], [[a], [b, c]])``.
    """

    special_image_token = IMAGE_TOKEN  # the original processor's name for it

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        chat_template = chat_template or processor_chat_template(getattr(tokenizer, "chat_template", None))
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def special_image_token_id(self) -> int:
        return self.image_token_id

    def calc_num_image_tokens(self, images, num_crops: int | None = None) -> list[int]:
        """Token cost of each image (PIL images) at the image processor's num_crops."""
        return self.image_processor.calc_num_image_tokens(images, num_crops)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Token cost of a width x height image at the image processor's num_crops."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height, num_crops)

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs):
        # tokenizer_config.json names "LlamaTokenizer", whose transformers-5 class rebuilds the
        # normaliser and drops the "▁" (29871) before "\n". Load tokenizer.json as it is instead.
        kwargs.pop("num_crops", None)
        return TokenizersBackend.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def __call__(
        self,
        text=None,
        images=None,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors="pt",
        num_crops: int | None = None,
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize prompt(s) and process their images.

        Args:
            text: a prompt, or a list of prompts.
            images: for one prompt, an image or a list of images in tag order; for a list of prompts, a
                list with one list of images per prompt (or one flat list, consumed in tag order).
            padding, truncation, max_length: for text-only prompts, the tokenizer's, as in the original
                (a batch is always padded to its longest prompt; ``padding="max_length"`` pads further).
                With images the original ignores them; here truncation is refused, since it would cut
                through image tokens.
            padding_side: where batches are padded. Default: "left" (what generation needs) when there are
                images; for text-only prompts the tokenizer's own side ("right"), as in the original.
            return_tensors: "pt" (default), "np", or None: for text-only prompts, the tokenizer's Python lists
                (a flat list for one prompt); with images, as the original: image_sizes a list, the rest tensors.
            num_crops: overrides ``image_processor.num_crops`` for this call.
            add_special_tokens: False leaves out the BOS (id 1) that starts the prompt and each text chunk.
            pad_to_multiple_of: pads the prompts up to a length that is a multiple of it (a single prompt too).
            return_attention_mask: False leaves out ``attention_mask``.
            videos, audio: Phi-3-vision reads neither; None (what pipelines pass) or empty.
            kwargs: image options go to the image processor (``image_mean=``...); ``text_kwargs={...}``,
                ``images_kwargs={...}`` and ``common_kwargs={...}`` (transformers 5's grouped options) are
                read as plain keywords; what a pipeline passes along (generation settings) is ignored;
                transformers options this processor does not implement, and misspelt arguments
                (``num_crop=``), are refused.

        Returns a BatchFeature with ``input_ids``, ``attention_mask`` and, with images, ``pixel_values``
        and ``image_sizes``.
        """
        if any(group in kwargs for group in _GROUPED_OPTIONS):  # read them as plain keywords
            given = dict(
                padding=padding, truncation=truncation, max_length=max_length, padding_side=padding_side,
                return_tensors=return_tensors, num_crops=num_crops, add_special_tokens=add_special_tokens,
                pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask, videos=videos, audio=audio,
            )
            return self(text, images, **_ungroup(kwargs, given))
        image_options = _image_options(kwargs)
        if flatten_images(videos, "videos") or flatten_images(audio, "audio"):
            raise InvalidArgumentError(
                "Phi-3-vision reads text and images only, not videos or audio. Pass video frames as images, each "
                "with its own <|image_N|> tag."
            )
        if padding not in PADDING_CHOICES:
            raise InvalidArgumentError(f"padding must be one of {PADDING_CHOICES}, got {padding!r}.")
        if padding_side not in (None, "left", "right"):
            raise InvalidArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if pad_to_multiple_of is not None:
            check_whole_number(pad_to_multiple_of, "pad_to_multiple_of", minimum=1)
        text, prompts, images_per_prompt = self._prompts_and_images(text, images)

        if not any(images_per_prompt):  # text only: the tokenizer's own truncation and padding, as in the original
            if truncation is None:  # the tokenizer's rule: max_length truncates when padding is not asked for
                truncation = max_length is not None and padding in (False, "do_not_pad")
            if pad_to_multiple_of and padding in (False, "do_not_pad"):
                padding = "longest"  # the tokenizer would ignore pad_to_multiple_of without padding
            encoded = self.tokenizer(
                prompts, padding=padding, truncation=truncation, max_length=max_length, padding_side=padding_side,
                pad_to_multiple_of=pad_to_multiple_of, add_special_tokens=add_special_tokens,
                return_attention_mask=return_attention_mask, verbose=False,
            )
            self._check_length(encoded["input_ids"])
            if return_tensors is None:  # the tokenizer's lists, as the original returns them
                return BatchFeature(data={key: rows[0] for key, rows in encoded.items()} if isinstance(text, str) else dict(encoded))
            if len({len(ids) for ids in encoded["input_ids"]}) > 1:  # rows of unequal length cannot be a tensor
                encoded = self.tokenizer.pad(
                    encoded, padding="longest", padding_side=padding_side, return_attention_mask=return_attention_mask
                )
            return BatchFeature(data=dict(encoded), tensor_type=return_tensors)

        if truncation:
            raise InvalidArgumentError("Truncation would cut through image tokens; shorten the prompt instead.")
        all_images = _rgb_images(images_per_prompt)
        # the length is checked from the images' sizes, before their pixels are processed (seconds for many)
        sequences = self._sequences(prompts, images_per_prompt, self.calc_num_image_tokens(all_images, num_crops), add_special_tokens)
        self._check_length(sequences)
        # as the original: the image processor makes pixel_values a tensor and, with return_tensors=None, image_sizes a list
        image_inputs = self.image_processor(all_images, num_crops=num_crops, return_tensors=return_tensors, **image_options)
        image_inputs.pop("num_img_tokens")  # the same counts (calc_num_image_tokens is how the image processor counts)
        input_ids, attention_mask = self._pad(sequences, padding_side or "left", pad_to_multiple_of)
        data = {"input_ids": input_ids, "attention_mask": attention_mask, **image_inputs}
        if return_attention_mask is False:
            del data["attention_mask"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """ProcessorMixin's, after refusing message items other than text and images ({"type": "video"}...),
        which the chat template would otherwise drop without a word."""
        _refuse_other_content(conversation)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def _split_images(self, prompts: list[str], images) -> list[list]:
        """Assign images to prompts and check every prompt's tags against its images."""
        if len(prompts) == 1:
            groups = [flatten_images(images)]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(g, (list, tuple)) for g in images):
            groups = [flatten_images(group, f"images[{index}]") for index, group in enumerate(images)]
        else:  # one flat list for several prompts: hand out images in tag order
            flat, groups = flatten_images(images), []
            for prompt in prompts:
                start = sum(len(group) for group in groups)
                groups.append(flat[start : start + len(_image_numbers(prompt))])
            if sum(len(group) for group in groups) != len(flat):
                raise PromptImageMismatchError(
                    f"The prompts have {sum(len(g) for g in groups)} image tags in total but {len(flat)} "
                    "images were given; add a tag per image or pass one list of images per prompt."
                )
        if len(groups) != len(prompts):
            raise PromptImageMismatchError(
                f"Got {len(prompts)} prompts but {len(groups)} lists of images; pass one list per prompt."
            )
        for index, (prompt, group) in enumerate(zip(prompts, groups)):
            which = prompt_name(index, len(prompts))
            if IMAGE_TOKEN in prompt:
                raise PromptImageMismatchError(
                    f"{which} contains {IMAGE_TOKEN}, the token the processor puts in place of each image's "
                    "features. Mark where each image goes with <|image_1|>, <|image_2|>, ... instead."
                )
            _check_tags(prompt, len(group), which)
        return groups

    def prompt_lengths(
        self, text, images=None, num_crops: int | None = None, add_special_tokens: bool = True
    ) -> list[tuple[int, int]]:
        """``(tokens, image tokens)`` of each prompt, as ``processor(text, images, ...)`` would encode it (the same
        checks, but for the context length, which the caller checks with these counts: ``ask`` does, first),
        counted from the images' sizes without decoding or processing their pixels."""
        _, prompts, images_per_prompt = self._prompts_and_images(text, images)
        tokens_per_image = self.calc_num_image_tokens(_rgb_images(images_per_prompt, convert=checked_image), num_crops)
        return [
            (len(ids), sum(token == self.image_token_id for token in ids))
            for ids in self._sequences(prompts, images_per_prompt, tokens_per_image, add_special_tokens)
        ]

    def _prompts_and_images(self, text, images) -> tuple:
        """``(text, prompts, images per prompt)`` of a call, checked: the prompts (``processor(images, text)`` is
        read the other way round), their characters, the images loaded (not paths) and matched to the tags."""
        if _are_prompts(images) and not _are_prompts(text):
            text, images = images, text  # called as processor(images, text)
        if text is None:
            raise InvalidArgumentError("The processor needs a prompt (text=...).")
        if not _are_prompts(text):
            raise PromptError(
                f"text must be a prompt (a string) or a non-empty list of prompts, got {type(text).__name__} "
                f"{text!r:.60}."
            )
        prompts = [text] if isinstance(text, str) else list(text)
        for index, prompt in enumerate(prompts):
            check_encodable(prompt, prompt_name(index, len(prompts)))
        paths = [image for image in flatten_images(images) if isinstance(image, (str, os.PathLike))]
        if paths:
            raise InvalidArgumentError(
                f"images must be loaded images (PIL images), not file names or URLs such as {str(paths[0])!r:.80}: "
                "load each one with phi_helpers.load_image(path) first (phi_helpers.ask does this for you)."
            )
        return text, prompts, self._split_images(prompts, images)

    def _sequences(self, prompts: list[str], images_per_prompt: list[list], tokens_per_image: list[int],
                   add_special_tokens: bool) -> list[list[int]]:
        """The token ids of each prompt, its image tags expanded to ``tokens_per_image`` (all prompts' images, in order)."""
        sequences, offset = [], 0
        for prompt, group in zip(prompts, images_per_prompt):
            sequences.append(self._tokenize(prompt, tokens_per_image[offset : offset + len(group)], add_special_tokens))
            offset += len(group)
        return sequences

    def _tokenize(self, prompt: str, tokens_per_image: list[int], add_special_tokens: bool) -> list[int]:
        """Chunks between tags are tokenized separately (each starts with BOS, unless add_special_tokens is
        False); tags become image runs."""
        chunks = IMAGE_TAG.split(prompt)[::2]  # split() also returns the captured numbers; drop them
        ids = self.tokenizer(chunks[0], add_special_tokens=add_special_tokens, verbose=False).input_ids
        for count, chunk in zip(tokens_per_image, chunks[1:]):
            ids += [self.image_token_id] * count + self.tokenizer(chunk, add_special_tokens=add_special_tokens, verbose=False).input_ids
        return ids

    def _check_length(self, sequences: list[list[int]]) -> None:
        """ContextLengthError for a prompt longer than the context, saying what to do (the tokenizer's own
        "Token indices sequence length is longer..." warning is turned off where it tokenizes: verbose=False)."""
        row = max(range(len(sequences)), key=lambda index: len(sequences[index]))
        image_tokens = sum(token == self.image_token_id for token in sequences[row])
        check_context_length(len(sequences[row]), self.tokenizer.model_max_length, image_tokens=image_tokens,
                             which=prompt_name(row, len(sequences)))

    def _pad(self, sequences: list[list[int]], padding_side: str, multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest sequence, rounded up to a ``multiple`` of it if one is given."""
        length = max(len(s) for s in sequences)
        if multiple:
            length = -(-length // multiple) * multiple
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


# The keywords of Phi3VProcessor.__call__ and their defaults, for _image_options and _ungroup (read once, not on every call).
_CALL_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(Phi3VProcessor.__call__).parameters.items()
    if name not in ("self", "kwargs")
}

__all__ = [
    "Phi3VProcessor", "processor_chat_template", "CHECKPOINT_CHAT_TEMPLATE", "IMAGE_TAG", "image_tag", "check_context_length",
    "check_encodable", "prompt_name",
]

