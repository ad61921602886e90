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
Both build ``[{"role": ..., "content": ...}]`` messages and render them with transformers' own
chat-template machinery and the template *shipped with the checkpoint*: the processor's tokenizer's
``chat_template`` when you pass ``processor=``, else the one in the vendored Phi-3-vision
tokenizer_config.json (identical for Phi-3.5-vision). There is no copy of the template in Python: the
processor's own (``processor.apply_chat_template``, which also takes ``{"type": "image"}`` items) is the
same template after a preamble that turns such items into tags (``processor_chat_template``).

Special tokens in your text are refused (SpecialTokenError). The prompt is a single string, and a
tokenizer turns every ``<|end|>`` or ``<|user|>`` in it into the control token, wherever it came from;
a question that contains ``<|end|>\n<|system|>\n...`` would end your turn and speak for the system.
Escaping the text instead would silently change what the model reads, so phi_helpers stops and says
which token to remove. This covers every way text gets in: ``build_prompt``, ``Chat.add_user``,
``Chat.add_assistant``, ``Chat(system=...)``, ``ask`` with a plain question, the command line's
``--prompt`` and the notebook chat box (they all go through here). A full prompt that you write in the
chat format yourself (it starts with ``<|user|>`` or ``<|system|>``, as on the model card) is yours:
``ask`` and the processor use it as it is.

Text with a surrogate code point (``"\\udc80"``: a file name decoded with ``errors="surrogateescape"``,
an unpaired ``\\ud800`` escape in JSON) cannot be tokenized. It is refused when it is given (PromptError,
naming where it is), so a Chat never holds a turn that would break every later ``ask``; the processor
refuses it in a prompt you write yourself.
"""

import contextlib
import re
import threading
import weakref

from transformers.utils.chat_template_utils import render_jinja_template

from ..errors import (
    ImageLoadError, InvalidArgumentError, PromptError, PromptImageMismatchError, SpecialTokenError,
    check_whole_number,
)
from ..models.phi3_v.processing_phi3_v import (
    CHECKPOINT_ADDED_TOKENS,
    CHECKPOINT_CHAT_TEMPLATE,
    IMAGE_TAG,
    check_encodable,
    image_tag,
)
from .images import load_image

_CHAT_FORMAT_STARTS = ("<|user|>", "<|system|>")  # how a prompt written in the chat format begins
_LEADING_TAGS = re.compile(r"(?:<\|image_\d+\|>\n)*")  # the image tags ``Chat.messages`` puts before a turn's text
ZERO_WIDTH_SPACE = "\u200b"
_CLAIMING = threading.Lock()  # makes a chat's check-and-claim (Chat._in_use) atomic; held only for that


def build_prompt(question: str, num_images: int = 1, system: str | None = None, processor=None) -> str:
    """Return a single-turn prompt: optional system message, ``num_images`` image tags, the question.

    ``processor``: the model's processor (what ``load_model`` returns second): render with its checkpoint's
    chat template and refuse its special tokens (default: the template and tokens of the vendored
    Phi-3-vision tokenizer files, the same for Phi-3.5-vision).

    >>> build_prompt("What is this?")
    '<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n'
    """
    check_user_text(question, "question", processor, whole_prompt_advice=True)
    num_images = check_whole_number(num_images, "num_images")
    messages = []
    if system:
        check_user_text(system, "system message", processor)
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _image_tags(1, num_images) + question})
    return render_messages(messages, processor)


def render_messages(messages: list[dict], processor=None) -> str:
    """Render chat messages with the checkpoint's chat template, with the generation prompt.

    The template is ``processor.tokenizer.chat_template`` (tokenizer_config.json of the checkpoint) when
    a processor is given and has one, else the vendored checkpoint's. Rendering is transformers' own
    (``render_jinja_template``, what ``tokenizer.apply_chat_template(..., tokenize=False)`` runs).
    """
    template = getattr(_tokenizer(processor), "chat_template", None) or CHECKPOINT_CHAT_TEMPLATE
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)
    return rendered[0]


def is_chat_format(prompt: str) -> bool:
    """True for a prompt already written in the chat format (starts with ``<|user|>`` or ``<|system|>``)."""
    return prompt.lstrip().startswith(_CHAT_FORMAT_STARTS)


def special_tokens(processor=None) -> tuple[str, ...]:
    """The token strings that must not appear in typed text: the checkpoint's added tokens
    (``<|end|>``, ``<|user|>``, ``<|image|>``, ``<s>``...) plus those of ``processor``'s tokenizer."""
    tokens = set(CHECKPOINT_ADDED_TOKENS)
    tokenizer = _tokenizer(processor)
    if tokenizer is not None:
        tokens.update(tokenizer.get_added_vocab())
    return tuple(sorted(tokens))


def _tokenizer(processor):
    """``processor``'s tokenizer, or None when no processor is given. Anything else that is not a processor
    (the model, a model name, a bare tokenizer) raises InvalidArgumentError instead of being ignored."""
    if processor is None:
        return None
    if not hasattr(processor, "tokenizer"):
        raise InvalidArgumentError(
            f"processor must be the model's processor (the second thing load_model() returns: model, processor = "
            f"load_model(...)), or None for the checkpoint's own chat template; got a {type(processor).__name__}."
        )
    return processor.tokenizer


def check_user_text(text, what: str, processor=None, *, whole_prompt_advice: bool = False) -> None:
    """Refuse ``text`` that is not a non-empty string, or that holds an image tag or a special token.

    Raises PromptError (not a string, empty, a surrogate code point) or SpecialTokenError
    (``<|image_N|>``, ``<|end|>``...). ``whole_prompt_advice``: the error also says how to pass a whole
    prompt in the chat format instead (only where one is accepted: ``ask``'s question).
    """
    if not isinstance(text, str):
        raise PromptError(f"The {what} must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise PromptError(f"The {what} is empty; write what you want to ask.")
    check_plain_text(text, what, processor, whole_prompt_advice=whole_prompt_advice)


def check_plain_text(text: str, what: str, processor=None, *, whole_prompt_advice: bool = False) -> None:
    """Raise PromptError if ``text`` cannot be tokenized (a surrogate code point), SpecialTokenError if it
    contains an image tag or a special token (see the module doc)."""
    check_encodable(text, f"The {what}")
    tag = IMAGE_TAG.search(text)
    if tag:
        raise SpecialTokenError(
            f"The {what} already contains an image tag ({tag.group()}). Leave the tags out: pass the images "
            "and phi_helpers adds and numbers the tags for you."
        )
    found = sorted((text.index(token), -len(token), token) for token in special_tokens(processor) if token in text)
    if found:
        token = found[0][2]  # the first one in the text
        plain = token.replace("|", "") if "|" in token else " ".join(token)  # <|end|> -> <end>, <s> -> < s >
        raise SpecialTokenError(
            f"The {what} contains the special token {token}, which would act as a control token of the chat "
            f"format (end a turn, start another role...), not as text. Remove or reword it (e.g. write "
            f"{plain!r})."
            + (" To write a whole prompt in the chat format yourself, start it with <|user|> and pass it to ask() "
               "or the processor as it is." if whole_prompt_advice else "")
        )


def _defused(text: str, processor=None) -> str:
    """``text`` with a zero-width space after the first character of every special token (of the checkpoint
    and of ``processor``'s tokenizer) or image tag spelled in it, so that the tokenizer and the processor
    read it as text (see ``Chat.add_assistant``)."""
    spellings = [IMAGE_TAG.pattern] + [re.escape(t) for t in sorted(special_tokens(processor), key=len, reverse=True)]
    return re.sub("|".join(spellings), lambda match: match.group()[0] + ZERO_WIDTH_SPACE + match.group()[1:], text)


def _image_tags(first: int, count: int) -> str:
    """``<|image_first|>\\n`` ... for ``count`` images, numbered from ``first``."""
    return "".join(image_tag(number) + "\n" for number in range(first, first + count))


class Chat:
    """A conversation with the model: user turns (with images) and assistant answers.

        chat = Chat(system="You are a careful assistant.")
        chat.add_user("What is in this picture?", images="photo.jpg")
        answer = ask(model, processor, chat)       # ask() appends the answer to the chat
        chat.add_user("And what colour is it?")
        answer = ask(model, processor, chat)

    Images are numbered over the whole conversation, so the second image anywhere in the chat is
    ``<|image_2|>``. Every ``ask`` re-reads the whole history and re-encodes every image in it: nothing
    is cached between turns, so each turn costs more than the last (the time to the first token grows
    with the history), and every image costs hundreds to thousands of tokens, every turn. Use
    ``drop_images(keep_last=1)`` when a long conversation gets slow or too big for the context, and
    ``drop_turns(keep_last=3)`` when its text alone is too big.

    If ``ask`` fails or is interrupted before its first token (say, with a ContextLengthError), your
    question stays as the last turn: fix the cause, e.g. ``chat.drop_images(keep_last=1)`` or
    ``chat.drop_turns(keep_last=3)`` (the question and the exchange before it), and call
    ``ask(model, processor, chat)`` again. ``pop()`` removes the last turn, e.g. a question you no
    longer want to ask.

    To save a chat, store ``chat.messages`` (JSON) and ``chat.images`` (image files); to go on with it
    later, ``Chat.from_messages(messages, images)``.

    One Chat per conversation. A Chat is not for concurrent use: while one thread answers it (``ask``,
    ``extract``, or a ``stream_chunks`` stream that thread reads), another thread's ``ask``, ``extract``,
    ``stream_chunks``, ``add_user``, ``add_assistant``, ``pop``, ``reset``, ``drop_images`` or ``drop_turns``
    on it raises PromptError and changes nothing. A stream is done when it has been read to the end or closed
    (``chunks.close()``, which keeps its partial answer). The model and processor can be shared by
    threads: give each thread (each user) its own Chat.
    """

    # The threads that use the chat right now (see _in_use); on the class too, so that a chat pickled by an
    # earlier version, which has neither, unpickles into one that works.
    _reader = None  # the id of the thread that last read the stream writing the next answer (or made it)
    _owner = None  # the id of the thread asking or changing this chat right now

    def __init__(self, system: str | None = None):
        self.system = system  # checked by the property below
        # {"role": "user"|"assistant", "text": str, "images": [PIL images]} (+ "generated" for answers)
        self._turns: list[dict] = []
        self._stream = None  # a weak reference to the stream_chunks generator writing the next answer

    @property
    def system(self) -> str | None:
        """The system message (None for none). Setting it checks it as ``add_user`` checks a question."""
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        if text is not None and not isinstance(text, str):
            raise PromptError(f"system must be a string or None, got {type(text).__name__}.")
        if text:
            check_user_text(text, "system message")
        self._system = text or None

    @classmethod
    def from_messages(cls, messages: list[dict], images=None) -> "Chat":
        """The chat that ``messages`` (what ``chat.messages`` gave) and ``images`` (``chat.images``) describe.

            json.dump(chat.messages, file)          # and save chat.images, in order
            chat = Chat.from_messages(json.load(file), images=[...the same images, in order...])

        A user message may start with the ``<|image_N|>`` lines that ``messages`` writes (numbered over the
        whole chat); there must be one image per tag. The text is checked as ``add_user`` and
        ``add_assistant`` check it; a system message may come first.
        """
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(message, dict) and isinstance(message.get("content"), str) for message in messages
        ):
            raise PromptError("messages must be a list of {'role': ..., 'content': '...'} dicts, as chat.messages gives.")
        images = as_list(images)
        first = 1 if messages and messages[0].get("role") == "system" else 0
        chat, used = cls(system=messages[0]["content"] if first else None), 0
        for index, message in enumerate(messages[first:], start=first):
            tags = _LEADING_TAGS.match(message["content"]).group()
            numbers = [int(number) for number in IMAGE_TAG.findall(tags)]
            if numbers != list(range(used + 1, used + len(numbers) + 1)):
                raise PromptImageMismatchError(
                    f"Message {index} starts with the tags {[image_tag(n) for n in numbers]}, but the images are "
                    f"numbered over the whole chat: the next one is {image_tag(used + 1)}."
                )
            if message.get("role") == "user":  # every message, even a question repeated (add_user would skip it)
                own_images = images[used : used + len(numbers)]  # named by their place in images= if one fails
                chat._turns.append(_user_turn(message["content"][len(tags):], own_images, used + 1, len(images)))
            elif message.get("role") == "assistant" and not numbers:
                chat.add_assistant(message["content"])
            else:
                raise PromptError(
                    f"Message {index} has the role {message.get('role')!r}: a chat holds user and assistant "
                    "messages (images only in user messages), after an optional system message."
                )
            used += len(numbers)
        if used != len(images):
            raise PromptImageMismatchError(
                f"The messages have {used} image tag(s) but {len(images)} image(s) were given: pass the chat's "
                "images (chat.images), in order."
            )
        return chat

    def add_user(self, text: str, images=None) -> "Chat":
        """Add a user turn. ``images``: one image or a list; anything ``load_image`` accepts.

        All images are loaded first (an empty one is refused), so if one fails nothing is added, and the
        error names it by its position. Returns the chat.

        The same question (same text, same images) as the last turn, when that one is still
        unanswered, is not added a second time: re-running a cell whose ask was interrupted asks once.
        Any other question after an unanswered one is added after it.
        """
        turn = _user_turn(text, images)
        with self._in_use():
            last = self._turns[-1] if self._turns else None
            if last is not None and last["role"] == "user" and (last["text"], last["images"]) == (text, turn["images"]):
                return self
            self._turns.append(turn)
        return self

    def add_assistant(self, text: str, generated: bool = False, position: int | None = None) -> "Chat":
        """Add an assistant turn (``ask`` adds the model's answers for you). Returns the chat.

        ``position``: insert it there (after that many turns) instead of at the end; a streamed answer
        goes right after its question even if the caller added turns while it was being written.

        Text you write (e.g. an example answer) is refused if it holds a special token, like a user
        turn. ``generated=True`` marks an answer the model produced (``ask``, the chat box and the
        command line's retry pass it): it is kept exactly as generated, never refused, so an answer is
        never lost. Decoding has already dropped the special tokens the model emitted; only text the
        model spelled out character by character (``<`` ``s`` ``>``) can look like one. Such text stays
        text: in ``messages`` (and so in the prompt) a zero-width space follows its ``<``, so a
        transcribed ``<|system|>`` never becomes a control token and a written ``<|image_1|>`` never
        asks for an image. (A decoded answer never holds a surrogate code point; text that does is
        refused either way, since it could not be tokenized.)
        """
        with self._in_use():
            return self._add_assistant(text, generated, position)

    def _add_assistant(self, text: str, generated: bool, position: int | None) -> "Chat":
        """``add_assistant`` without the check for another thread: a stream adds its own answer with it."""
        if not isinstance(generated, bool):
            raise InvalidArgumentError(f"generated must be True or False, got {generated!r}.")
        if position is not None:
            position = check_whole_number(position, "position", hint=" (the number of turns before it) or None")
        if not isinstance(text, str):
            raise PromptError(f"The assistant message must be a string, got {type(text).__name__}.")
        if generated:
            check_encodable(text, "The assistant message")
        else:
            check_plain_text(text, "assistant message")
        turn = {"role": "assistant", "text": text, "images": [], "generated": generated}
        self._turns.insert(len(self._turns) if position is None else position, turn)
        return self

    def _stream_started(self, chunks) -> None:
        """Remember the ``stream_chunks`` generator that writes the next answer, without keeping it alive;
        the thread that made it is its reader until a thread reads it (``_reading``)."""
        self._stream = weakref.ref(chunks)
        self._reader = threading.get_ident()

    def _reading(self) -> None:
        """The stream calls this whenever a thread reads from it: that thread is now its reader."""
        self._reader = threading.get_ident()

    def _unfinished_stream(self):
        """The stream writing the next answer if it has not ended yet (finished, closed or collected), else None."""
        stream = self._stream() if self._stream is not None else None
        return stream if stream is not None and stream.gi_frame is not None else None

    @contextlib.contextmanager
    def _in_use(self):
        """Around whatever asks or changes this chat: refuse (PromptError, nothing changed) while another
        thread answers it (its ``ask`` runs, or it reads a stream still writing the answer); else this
        thread holds the chat until the block ends. The same thread may go on: a loop that broke out of
        a stream and asks again, or adds a turn while reading, works as it did."""
        me = threading.get_ident()
        with _CLAIMING:
            if self._owner not in (None, me) or (self._unfinished_stream() is not None and self._reader != me):
                raise _busy()
            before, self._owner = self._owner, me
        try:
            yield
        finally:
            self._owner = before

    def _close_stream(self) -> None:
        """Close a stream left unfinished (a loop broke out of ``stream_chunks`` but kept the generator): it
        stops generating and its partial answer goes in, as ``.close()`` does, before the chat goes on.
        If another thread is reading from it at this moment, PromptError, and the stream goes on."""
        stream = self._unfinished_stream()
        if stream is not None:
            try:
                stream.close()
            except ValueError:
                if stream.gi_running:  # "generator already executing": another thread resumed it just now
                    raise _busy() from None
                raise
        self._stream = None

    def __getstate__(self) -> dict:
        """What ``copy`` and ``pickle`` keep: the turns, not a stream still writing into this chat."""
        return {**self.__dict__, "_stream": None, "_reader": None, "_owner": None}

    def __copy__(self) -> "Chat":
        """``copy.copy(chat)``: a chat with turns of its own (the image objects are shared, not copied)."""
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__getstate__())
        copied._turns = [{**turn, "images": list(turn["images"])} for turn in self._turns]
        return copied

    def _withdraw(self, position: int) -> None:
        """Remove the model's answer at ``position`` (``extract`` withdraws one that was cut off)."""
        if position < len(self._turns) and self._turns[position].get("generated"):
            del self._turns[position]

    @property
    def messages(self) -> list[dict]:
        """The conversation as ``[{"role": ..., "content": ...}]``, image tags numbered in order.

        This is what ``processor.tokenizer.apply_chat_template`` expects and what ``render`` renders.
        """
        return self._messages()

    def _messages(self, processor=None) -> list[dict]:
        """``messages``, with the special tokens of ``processor``'s tokenizer also defused in answers."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        next_number = 1
        for turn in self._turns:
            tags = _image_tags(next_number, len(turn["images"]))
            next_number += len(turn["images"])
            text = _defused(turn["text"], processor) if turn.get("generated") else turn["text"]
            messages.append({"role": turn["role"], "content": tags + text})
        return messages

    @property
    def images(self) -> list:
        """All images of the conversation, in tag order (pass them to the processor with ``render()``)."""
        return [image for turn in self._turns for image in turn["images"]]

    def render(self, processor=None) -> str:
        """The prompt for the whole conversation, ending with ``<|assistant|>\\n`` when it is the model's turn.

        ``processor``: render with its checkpoint's chat template and also refuse its tokenizer's own
        special tokens (``ask`` passes it); default: the vendored Phi-3-vision template.
        """
        if not self._turns:
            raise PromptError("The chat is empty; add a question first with chat.add_user(...).")
        if processor is not None:  # its tokenizer may have special tokens of its own
            typed = [self.system or ""] + [turn["text"] for turn in self._turns if not turn.get("generated")]
            for text in typed:
                check_plain_text(text, "chat", processor)
        return render_messages(self._messages(processor), processor)

    def reset(self) -> "Chat":
        """Forget all turns and images (the system message stays). Returns the chat."""
        with self._in_use():
            self._close_stream()
            self._turns.clear()
        return self

    def pop(self) -> tuple[dict, list]:
        """Remove the last turn; return it as ``(message, images)``: its message as ``messages`` gave it
        and the images that turn added (``[]`` for none). The other turns and their image numbers stay.

            message, images = chat.pop()       # e.g. a question you no longer want answered
            chat = Chat.from_messages(chat.messages + [message], chat.images + images)   # puts it back
        """
        with self._in_use():
            self._close_stream()  # a stream still writing: its answer goes in first, and is the last turn
            if not self._turns:
                raise PromptError("The chat is empty: there is no turn to remove.")
            message = self.messages[-1]
            return message, self._turns.pop()["images"]

    def drop_images(self, keep_last: int = 0) -> int:
        """Remove all but the last ``keep_last`` images from the history; return how many were removed.

        The text of every turn stays; a removed image's tag simply disappears and the remaining
        images are renumbered from ``<|image_1|>``. Use this to make a long chat fit the context.
        """
        keep_last = check_whole_number(keep_last, "keep_last")
        with self._in_use():
            to_drop = max(len(self.images) - keep_last, 0)
            remaining = to_drop
            for turn in self._turns:  # oldest first
                removed = min(remaining, len(turn["images"]))
                del turn["images"][:removed]
                remaining -= removed
        return to_drop

    def drop_turns(self, keep_last: int) -> int:
        """Remove all but the last ``keep_last`` turns (with their images); return how many were removed.

        For a chat whose text no longer fits the context (``drop_images`` only removes images). The system
        message stays, the remaining images are renumbered from ``<|image_1|>``, and the chat still starts
        with a question: answers that would come first go too (also when ``keep_last`` keeps every turn). After a
        ContextLengthError the unanswered question is the last turn: ``chat.drop_turns(keep_last=3)`` keeps
        it and the exchange before it, and ``ask(model, processor, chat)`` answers it.
        """
        keep_last = check_whole_number(keep_last, "keep_last")
        with self._in_use():
            self._close_stream()  # a stream still writing: its answer goes in first
            first = max(len(self._turns) - keep_last, 0)
            while first < len(self._turns) and self._turns[first]["role"] == "assistant":
                first += 1  # the chat starts with a question
            del self._turns[:first]
        return first

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


def _busy() -> PromptError:
    """The error for a chat that another thread is answering (``Chat._in_use``)."""
    return PromptError(
        "Another thread is still generating an answer for this chat (its ask, extract or stream_chunks on it "
        "has not finished), so this call was refused and the chat is unchanged. Wait for that answer: a "
        "stream_chunks stream is done when it has been read to the end (exhaust the iterator) or closed "
        "(call .close() on it; its partial answer goes in). A Chat is one conversation, not for use by "
        "several threads at once: give each thread (each user) its own Chat; the model can be shared."
    )


def _user_turn(text: str, images, first: int = 1, total: int | None = None) -> dict:
    """A user turn of ``text`` and ``images`` (loaded), checked as ``Chat.add_user`` describes. An image that
    fails is named by its position in the call: ``first`` for the first of ``images``, of ``total`` given."""
    check_user_text(text, "user message")
    images = as_list(images)
    loaded = []
    for position, image in enumerate(images, start=first):
        try:
            loaded.append(load_image(image))
        except ImageLoadError as error:
            raise type(error)(f"Image {position} of {total or len(images)}: {error} Nothing was added to the chat.") from None
    return {"role": "user", "text": text, "images": loaded}


def as_list(images) -> list:
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


__all__ = ["build_prompt", "Chat", "render_messages", "check_user_text", "is_chat_format"]
