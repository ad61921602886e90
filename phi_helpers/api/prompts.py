"""Prompts in the exact format Phi-3-vision and Phi-3.5-vision were trained on.

A one-question prompt with two images looks like this (the checkpoint's chat template produces it):

    <|user|>
    <|image_1|>
    <|image_2|>
    What differs between these pictures?<|end|>
    <|assistant|>

``<|user|>``, ``<|end|>`` and ``<|assistant|>`` are special tokens. ``<|image_1|>`` is plain text
that the processor replaces by the image's tokens; images are numbered from 1 over the whole
conversation, in the order they are passed.

``build_prompt`` makes a single-turn prompt; ``Chat`` keeps a multi-turn conversation with images.
"""

import re

from .images import load_image

_IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


def build_prompt(question: str, num_images: int = 1, system: str | None = None) -> str:
    """Return a single-turn prompt: optional system message, ``num_images`` image tags, the question.

    >>> build_prompt("What is this?")
    '<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n'
    """
    _check_text(question, "question")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be a whole number >= 0, got {num_images!r}.")
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _image_tags(1, num_images) + question})
    return _render(messages)


def _check_text(text, what: str) -> None:
    """A question must be a non-empty string without its own ``<|image_N|>`` tags."""
    if not isinstance(text, str):
        raise ValueError(f"The {what} must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise ValueError(f"The {what} is empty; write what you want to ask.")
    if _IMAGE_TAG.search(text):
        raise ValueError(
            f"The {what} already contains an image tag ({_IMAGE_TAG.search(text).group()}). Leave the tags "
            "out: pass the images and phi_helpers adds and numbers the tags for you."
        )


def _image_tags(first: int, count: int) -> str:
    """``<|image_first|>\\n`` ... for ``count`` images, numbered from ``first``."""
    return "".join(f"<|image_{number}|>\n" for number in range(first, first + count))


def _render(messages: list[dict]) -> str:
    """The checkpoint's chat template, written out in Python, with the generation prompt."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    if messages and messages[-1]["role"] != "assistant":
        text += "<|assistant|>\n"
    return text


class Chat:
    """A conversation with the model: user turns (with images) and assistant answers.

        chat = Chat(system="You are a careful assistant.")
        chat.add_user("What is in this picture?", images="photo.jpg")
        answer = ask(model, processor, chat)       # ask() appends the answer to the chat
        chat.add_user("And what colour is it?")
        answer = ask(model, processor, chat)

    Images are numbered over the whole conversation, so the second image anywhere in the chat is
    ``<|image_2|>``. Every image costs hundreds to thousands of tokens, every turn; use
    ``drop_images(keep_last=1)`` when a long conversation gets too big for the context.

    If ``ask`` fails (say, with a ContextLengthError), your question stays as the last turn: fix the
    cause, e.g. ``chat.drop_images(keep_last=1)``, and call ``ask(model, processor, chat)`` again.
    """

    def __init__(self, system: str | None = None):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {type(system).__name__}.")
        self.system = system or None
        self._turns: list[dict] = []  # {"role": "user"|"assistant", "text": str, "images": [PIL images]}

    def add_user(self, text: str, images=None) -> "Chat":
        """Add a user turn. ``images``: one image or a list; anything ``load_image`` accepts.

        All images are loaded first, so if one fails nothing is added. Returns the chat.
        """
        _check_text(text, "user message")
        loaded = [load_image(image) for image in _as_list(images)]
        self._turns.append({"role": "user", "text": text, "images": loaded})
        return self

    def add_assistant(self, text: str) -> "Chat":
        """Add the model's answer (``ask`` does this for you). Returns the chat."""
        if not isinstance(text, str):
            raise ValueError(f"The assistant message must be a string, got {type(text).__name__}.")
        self._turns.append({"role": "assistant", "text": text, "images": []})
        return self

    @property
    def messages(self) -> list[dict]:
        """The conversation as ``[{"role": ..., "content": ...}]``, image tags numbered in order.

        This is what ``processor.tokenizer.apply_chat_template`` expects.
        """
        messages = [{"role": "system", "content": self.system}] if self.system else []
        next_number = 1
        for turn in self._turns:
            tags = _image_tags(next_number, len(turn["images"]))
            next_number += len(turn["images"])
            messages.append({"role": turn["role"], "content": tags + turn["text"]})
        return messages

    @property
    def images(self) -> list:
        """All images of the conversation, in tag order (pass them to the processor with ``render()``)."""
        return [image for turn in self._turns for image in turn["images"]]

    def render(self) -> str:
        """The prompt for the whole conversation, ending with ``<|assistant|>\\n`` when it is the model's turn."""
        if not self._turns:
            raise ValueError("The chat is empty; add a question first with chat.add_user(...).")
        return _render(self.messages)

    def reset(self) -> "Chat":
        """Forget all turns and images (the system message stays). Returns the chat."""
        self._turns.clear()
        return self

    def drop_images(self, keep_last: int = 0) -> int:
        """Remove all but the last ``keep_last`` images from the history; return how many were removed.

        The text of every turn stays; a removed image's tag simply disappears and the remaining
        images are renumbered from ``<|image_1|>``. Use this to make a long chat fit the context.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a whole number >= 0, got {keep_last!r}.")
        to_drop = max(len(self.images) - keep_last, 0)
        remaining = to_drop
        for turn in self._turns:  # oldest first
            removed = min(remaining, len(turn["images"]))
            del turn["images"][:removed]
            remaining -= removed
        return to_drop

    def __len__(self) -> int:
        """Number of user and assistant turns (the system message is not counted)."""
        return len(self._turns)

    def __repr__(self) -> str:
        system = _preview(self.system) if self.system else None
        lines = [f"Chat(system={system}, turns={len(self)}, images={len(self.images)})"]
        number = 1
        for turn in self._turns:
            labels = "".join(f"[image {n}] " for n in range(number, number + len(turn["images"])))
            number += len(turn["images"])
            lines.append(f"  {turn['role']}: {labels}{_preview(turn['text'])}")
        return "\n".join(lines)


def _as_list(images) -> list:
    """``None`` -> [], a list/tuple -> itself, anything else (one image) -> [it]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _preview(text: str, width: int = 60) -> str:
    """A one-line, shortened repr of ``text`` for ``Chat.__repr__``."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


__all__ = ["build_prompt", "Chat"]
