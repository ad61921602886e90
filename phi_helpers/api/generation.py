"""Ask the model a question and get its answer as a string.

    answer = ask(model, processor, "What is in this picture?", images=["photo.jpg"])
    answer = ask(model, processor, chat)                  # a Chat: the answer is appended to it
    answer = ask(model, processor, question, images=[img], stream=True)   # prints as it goes
    data = extract(model, processor, "Extract the fields.", schema, images=[img])  # a dict, always valid

What ``ask`` does, step by step (each step is a small function below; ``_setup`` runs steps 1-4 for
``ask`` and ``stream_chunks``):
1. ``_check_call``: refuse arguments that would fail deep inside transformers, or be ignored.
2. ``_prepare``: turn the question (or Chat) into a prompt string and a list of PIL images.
3. ``generation_settings``: greedy decoding, stop on ``<|end|>`` / ``<|endoftext|>``.
4. ``encode``: run the processor, check that prompt + answer fit the context, move tensors to the model;
   then ``_add_cache`` gives ``generate`` the KV cache of ``kv_cache``.
5. ``model.generate``, then decode only the new tokens.

``stream_chunks`` is the streaming version as a generator of text pieces; ``ask(stream=True)``
prints those pieces, and a notebook widget can show them instead.

``schema=`` (a JSON Schema, in ``ask``, ``stream_chunks`` and ``generate_batch``) constrains the answer
to JSON that follows it (``phi_helpers.api.constrained``); ``extract`` returns that answer as a dict.
"""

import atexit
import contextlib
import difflib
import functools
import inspect
import numbers
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import (
    Cache, DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer,
)

from ..errors import (
    ImageAspectRatioError, InvalidArgumentError, JSONTruncatedError, PromptError, SchemaError, check_whole_number,
)
from ..models.phi3_v.image_processing_phi3_v import check_num_crops
from ..models.phi3_v.processing_phi3_v import check_context_length, prompt_name
from .batch_linear import batch_kernels
from .choices import ASK_MAX_NEW_TOKENS, BATCH_MAX_NEW_TOKENS
from .constrained import SchemaConstraint, compile_schema, read_answer
from .images import load_image
from .kv_cache import PreallocatedCache
from .prompts import Chat, as_list, build_prompt, is_chat_format
from .structured import check_schema_type

# The chat turn ends with <|end|>; <|endoftext|> is the tokenizer's eos. The checkpoints' own
# generation config only knows "</s>" (id 2), which the model rarely produces, so both are added.
_STOP_TOKENS = ("<|end|>", "<|endoftext|>")
_SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
PREFILL_ROWS = 1  # prompts per forward pass of generate_batch's prefill (see _prefill_in_groups)


def ask(
    model, processor, prompt_or_chat, images=None, max_new_tokens: int = ASK_MAX_NEW_TOKENS, stream: bool = False,
    schema: dict | None = None, **generate_kwargs,
) -> str:
    """Generate the model's answer and return it as a stripped string.

    Args:
        model, processor: what ``load_model()`` returned.
        prompt_or_chat: a plain question (image tags are added for you; special tokens in it are
            refused), a prompt that is already in chat format (starts with ``<|user|>`` or
            ``<|system|>``; used as it is), or a ``Chat`` (its images are used and
            the answer is appended to it; if generation fails or is interrupted before the first
            token, your question stays in the chat, unanswered: ask again to answer it).
        images: one image or a list; anything ``load_image`` accepts. Not used with a ``Chat``.
        max_new_tokens: the longest answer, in tokens (``ASK_MAX_NEW_TOKENS`` when left out).
        stream: print the answer while it is generated. Interrupting the kernel (Ctrl-C / the stop
            button) stops generation and returns the partial answer (with a Chat, it is added as the
            answer, unless nothing was generated yet).
        schema: a JSON Schema: the answer can only be JSON that follows it (compact, in the schema's
            property order), unless cut off by ``max_new_tokens``. ``extract`` also parses it.
        **generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=True, temperature=0.7``).
            Decoding is greedy (deterministic) unless you pass sampling settings, whatever the checkpoint's
            ``generation_config.json`` says about sampling (its other fields, such as ``repetition_penalty``,
            apply). Sampled answers repeat after ``torch.manual_seed(0)``. A ``generation_config``
            counts with the fields it sets (keywords you pass beside it win); ``eos_token_id`` may name
            tokens (``"<|end|>"``). ``stop_strings`` (a string or a list) end the answer where one first
            appears: the answer (returned, streamed and added to a Chat) is cut just before it, so the
            stop string itself is not part of it, as in OpenAI-style APIs. One more that is not
            generate's: ``num_crops`` sets the image tiles for this call (default: the processor's).
            Outputs beyond the text (``return_dict_in_generate``, ``output_scores``) are refused: the
            message shows how to call ``model.generate`` for them.

    Raises:
        ContextLengthError: the prompt (text + image tokens) plus ``max_new_tokens`` does not fit.
        PromptImageMismatchError: the prompt's ``<|image_N|>`` tags do not match the images.
        SpecialTokenError: the question or a chat turn contains ``<|end|>``, ``<|user|>``... (see prompts).
        SchemaNotSupportedError: ``schema`` uses a feature the constraint cannot enforce (before generating).
        InvalidArgumentError: a setting that cannot work (``num_beams=0``, ``top_p=1.5``, ``max_length``...),
            or a model input that ask builds itself (``input_ids``, ``pixel_values``...); the message says what
            to pass instead.
    """
    return _ask(model, processor, prompt_or_chat, images, max_new_tokens, stream, schema, generate_kwargs, caller=ask)


def _ask(model, processor, prompt_or_chat, images, max_new_tokens, stream, schema, generate_kwargs: dict, caller):
    """What ``ask`` does, for ``caller`` (``ask`` or ``extract``: the function the learner called, whose
    keywords and defaults the error messages name)."""
    if not isinstance(stream, bool):
        raise InvalidArgumentError(f"stream must be True or False, got {stream!r}.")
    if stream:  # _stream_chunks checks the rest
        return _print_stream(
            _stream_chunks(model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs, caller),
            chat=isinstance(prompt_or_chat, Chat),
        )
    with _answering(prompt_or_chat):  # a Chat: no other thread asks or changes it meanwhile
        inputs, settings, chat = _setup(
            model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs, caller, streaming=False
        )
        try:
            with torch.inference_mode():
                output = model.generate(**inputs, **settings)
        except KeyboardInterrupt as interrupt:  # the stop button: say where the chat stands
            if chat is not None and hasattr(interrupt, "add_note"):  # Python 3.11+
                interrupt.add_note(_STOPPED_IN_CHAT)
            raise
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        answer = _decode_answer(processor, new_tokens, settings["eos_token_id"], settings.get("stop_strings"))
        if chat is not None:
            chat.add_assistant(answer, generated=True)
    return answer


_STOPPED_IN_CHAT = ("Stopped before the answer was complete, so the chat did not change: your question is its last "
                    "turn, still unanswered. ask(model, processor, chat) answers it (run the same cell again), "
                    "chat.pop() takes it back out.")


def extract(
    model, processor, prompt_or_chat, schema: dict, images=None, max_new_tokens: int = BATCH_MAX_NEW_TOKENS,
    stream: bool = False, **generate_kwargs,
) -> dict:
    """Ask for JSON that follows ``schema`` and return it as a dict that always validates against it.

    Same arguments as ``ask``, but the schema comes before the images (pass those by name, ``images=``),
    and ``max_new_tokens`` is the command line's, ``BATCH_MAX_NEW_TOKENS``, when left out: JSON cut off is
    no answer. The answer is constrained token by token (constrained decoding), so it
    parses and validates whatever the model is, with greedy or sampled decoding. Tell the model what
    to extract in the question: the schema is enforced, not shown to it.

        total = {"type": "number", "minimum": 0, "maximum": 100000}  # bound numbers: an open one can run on
        schema = {"type": "object", "properties": {"total": total}, "required": ["total"]}
        data = extract(model, processor, "What is the total of this receipt?", schema, images=[receipt])

    Raises:
        SchemaNotSupportedError: the schema uses a feature that is not enforced (nothing is generated);
            the supported subset is listed in ``help(phi_helpers.api.constrained)``.
        JSONTruncatedError: the answer ran out of ``max_new_tokens`` first; ``error.text`` keeps it. With a
            ``Chat``, the cut-off answer is not added to it: call ``extract`` again with more tokens.
    """
    _check_not_images(schema)
    check_schema_type(schema)
    with _answering(prompt_or_chat):  # a Chat: held until a cut-off answer is taken back out of it
        answer = _ask(model, processor, prompt_or_chat, images, max_new_tokens, stream, schema, generate_kwargs, extract)
        try:
            return read_answer(answer, schema)
        except JSONTruncatedError:
            if isinstance(prompt_or_chat, Chat):  # the question stays the last turn: extract(..., chat) again with more tokens
                prompt_or_chat._withdraw(len(prompt_or_chat) - 1)
            raise


def _check_not_images(schema) -> None:
    """``SchemaError`` when extract's ``schema`` is what looks like its images (a list, a PIL image, bytes, the
    path of an image file): ask takes the images fourth, extract the schema."""
    path = os.fspath(schema) if isinstance(schema, (str, os.PathLike)) else ""
    image_file = isinstance(path, str) and os.path.splitext(path)[1].lower() in Image.registered_extensions()
    if image_file or isinstance(schema, (list, tuple, Image.Image, bytes, bytearray)):
        raise SchemaError(
            f"extract got a {type(schema).__name__} where its schema goes, images perhaps: extract's order is "
            "extract(model, processor, question, schema, images), the schema before the images (unlike ask). "
            "Pass the images by name: extract(model, processor, question, schema, images=[...])."
        )


def stream_chunks(
    model, processor, prompt_or_chat, images=None, max_new_tokens: int = ASK_MAX_NEW_TOKENS, schema: dict | None = None,
    **generate_kwargs,
):
    """Yield the answer in pieces of text as the model generates it (same arguments as ``ask``).

    Generation runs in a background thread. If the thread fails, its exception is raised here. Generation
    stops when the stream is closed. ``for piece in stream_chunks(...): ... break`` closes it at the
    ``break`` (the loop held the only reference), and so does a KeyboardInterrupt in ``ask(stream=True)``.
    A stream you keep in a variable (``chunks = stream_chunks(...)``) goes on generating in the background
    after you stop reading it, until it is closed (``chunks.close()``), read to the end, garbage-collected
    (``del chunks``) or, with a ``Chat``, closed by the chat's next ``ask``, ``extract`` or
    ``stream_chunks`` in the same thread (its partial answer goes in first, so the turns stay in order).
    When Python exits, every stream still generating is stopped.

    With a ``Chat``, the text generated so far is appended as the answer, unless generation failed or was
    stopped before any text came (the question then stays unanswered, as with ``ask``). Until the stream is
    read to the end or closed, another thread that asks or changes the chat gets a PromptError (a Chat is
    not for concurrent use; see ``Chat``).
    The arguments are checked and the prompt is encoded when you call it; generation starts with the
    first piece you ask for.
    """
    return _stream_chunks(model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs, stream_chunks)


def _stream_chunks(model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs: dict, caller):
    """What ``stream_chunks`` does, for ``caller`` (the function the learner called: ``stream_chunks``,
    or ``ask`` / ``extract`` with ``stream=True``)."""
    with _answering(prompt_or_chat):  # a Chat: no other thread asks or changes it meanwhile
        inputs, settings, chat = _setup(
            model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs, caller, streaming=True
        )
        chunks = _stream(model, processor, inputs, settings, chat, asked=len(chat) if chat is not None else 0)
        if chat is not None:
            chat._stream_started(chunks)  # closed by the chat's next question (Chat._close_stream)
    return chunks


def _answering(prompt_or_chat):
    """For a Chat, ``Chat._in_use``: refuse while another thread answers it, else hold it until the block
    ends; for a question, nothing."""
    return prompt_or_chat._in_use() if isinstance(prompt_or_chat, Chat) else contextlib.nullcontext()


def _stream(model, processor, inputs: dict, settings: dict, chat: Chat | None, asked: int):
    """The generator ``stream_chunks`` returns: generate in a thread, yield its text pieces; with a
    ``chat``, its answer goes in at position ``asked``, right after its question, and the thread that
    reads the stream is the one that may go on with the chat meanwhile (``Chat._reading``)."""
    if chat is not None:
        chat._reading()
    stop = _StopFlag()
    settings["stopping_criteria"] = StoppingCriteriaList([*settings.get("stopping_criteria", []), stop])
    streamer = _AnswerStreamer(processor.tokenizer, settings["eos_token_id"])
    errors: list[BaseException] = []
    thread = threading.Thread(
        target=_generate_in_thread, args=(model, {**inputs, **settings, "streamer": streamer}, errors), daemon=True
    )
    _LIVE_STREAMS[stop] = thread  # stopped when Python exits, if still going then
    thread.start()
    pieces: list[str] = []
    finished = False  # generation ended by itself (not stopped by the caller)
    try:
        for piece in _until_stop_string(streamer, settings.get("stop_strings")):
            if piece:
                pieces.append(piece)
                yield piece
                if chat is not None:
                    chat._reading()  # the thread that asked for the next piece
        finished = True
    finally:  # also runs when the caller stops early: stop the thread, keep what was generated
        stop.set()
        thread.join()
        answer = "".join(pieces).strip()
        # After its question, even if turns were added while it streamed; stopped before any text came,
        # the question stays unanswered (as when ask() without streaming is interrupted).
        if chat is not None and not errors and (finished or answer):
            chat._add_assistant(answer, generated=True, position=asked)  # its own answer: never refused
    if errors:
        raise errors[0]


def _until_stop_string(pieces, stop_strings):
    """The text of ``pieces`` up to the first stop string (excluded), piece by piece. Text that could be
    the start of a stop string is held back until the next piece shows whether it is one."""
    stop_strings = as_list(stop_strings)
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = _first_stop_string(text, stop_strings)
        if cut is not None:
            yield text[sent:cut]
            return
        held = max((size for stop in stop_strings for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
        yield text[sent : len(text) - held]
        sent = len(text) - held
    yield text[sent:]


def _first_stop_string(text: str, stop_strings: list[str]) -> int | None:
    """Where the first of ``stop_strings`` begins in ``text``, or None if none is in it."""
    found = [text.find(stop) for stop in stop_strings if stop in text]
    return min(found) if found else None


def _print_stream(chunks, chat: bool) -> str:
    """Print text pieces as they arrive and return them joined; Ctrl-C keeps the partial answer."""
    pieces = []
    try:
        for piece in chunks:
            pieces.append(piece)
            _show(piece)
    except KeyboardInterrupt:
        chunks.close()  # stops generation (if it is not stopped already)
        if pieces:
            note = f"returning the partial answer ({len(''.join(pieces))} characters)"
        else:
            note = "before the first token: no answer" + (", your question stays unanswered in the chat" if chat else "")
        _show(f"\n[stopped: generation interrupted, {note}]")
    _show("\n")
    return "".join(pieces).strip()


def _show(text: str) -> None:
    """Print without a newline and flush, so the notebook shows each piece immediately."""
    print(text, end="", flush=True)


def _generate_in_thread(model, kwargs: dict, errors: list) -> None:
    """Target of the generation thread: run generate, hand any exception to the caller's thread."""
    try:
        with torch.inference_mode():
            model.generate(**kwargs)
    except BaseException as error:  # noqa: BLE001  (re-raised in the caller's thread)
        errors.append(error)
        kwargs["streamer"].end()  # wake the caller, who waits for more text


# sentencepiece's byte fallback: a character the vocabulary lacks comes as the tokens of its UTF-8 bytes.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


class _AnswerStreamer(TextIteratorStreamer):
    """The answer's text pieces, without the prompt, special tokens and the stop token that ends it.

    Each token's text is passed on as soon as it is decoded for good, so the pieces join to exactly the text
    ``ask`` returns without streaming. (transformers' own ``put`` holds text back until the next space, and
    compact JSON has none: a constrained answer came in one piece, at the end.) Only the text of a trailing
    run of byte tokens (``<0xE2><0x82><0xAC>`` for "€") waits for the next token that is not a byte: the
    tokenizer decodes such a run as one piece of UTF-8, a "\ufffd" for each of its bytes while a byte is
    still missing (or wrong), so the run's text is not known before it ends.
    """

    def __init__(self, tokenizer, stop_ids):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
        # Never text: the stop tokens, and the special tokens that decoding skips (one between two bytes
        # would end a run of byte tokens here, but not for the decoder, which never sees it).
        self._dropped = set(stop_ids if isinstance(stop_ids, list) else [stop_ids]) | special

    def put(self, value) -> None:
        if self.next_tokens_are_prompt:  # generate hands over the prompt first: not part of the answer
            self.next_tokens_are_prompt = False
            return
        self.token_cache += [token for token in value.reshape(-1).tolist() if token not in self._dropped]
        whole = len(self.token_cache)  # the tokens decoded for good: all but a trailing run of byte tokens
        while whole and _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(self.token_cache[whole - 1])):
            whole -= 1
        text = self.tokenizer.decode(self.token_cache[:whole], **self.decode_kwargs)
        if len(text) > self.print_len:
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)


class _StopFlag(StoppingCriteria):
    """A stopping criterion that another thread can switch on with ``.set()``."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


# The generation thread of every stream, by its stop flag. Weak keys: the flag lives as long as its stream
# (its generator, and the thread while it runs), so a stream that is closed or garbage-collected drops out.
_LIVE_STREAMS: "weakref.WeakKeyDictionary[_StopFlag, threading.Thread]" = weakref.WeakKeyDictionary()
# How long exiting Python waits for each stream still generating to stop: the flag is read after every new
# token, so one decoding step; a stream still reading a long prompt may take longer, and is not waited for.
_EXIT_WAIT_SECONDS = 10


@atexit.register
def _stop_streams_at_exit() -> None:
    """Stop the streams still generating when Python exits (a kept ``chunks = stream_chunks(...)`` that was
    not read to the end): a generation thread still inside torch while Python shuts down aborts the process
    ("terminate called without an active exception", exit code 134) instead of letting it exit."""
    for stop, thread in list(_LIVE_STREAMS.items()):
        stop.set()
        thread.join(_EXIT_WAIT_SECONDS)


def _setup(model, processor, prompt_or_chat, images, max_new_tokens, schema, generate_kwargs: dict, caller, streaming):
    """What ``ask`` and ``stream_chunks`` do before generating (steps 1-4 of the module doc): check the call,
    prepare the prompt, settings and inputs, add the KV cache. Returns (inputs, settings, the Chat or None)."""
    max_new_tokens, generate_kwargs = _check_call(
        model, processor, max_new_tokens, schema, generate_kwargs, caller, streaming
    )
    num_crops = generate_kwargs.pop("num_crops", None)  # the processor's setting, for this call's images
    prompt, image_list, chat = _prepare(processor, prompt_or_chat, images)
    settings = generation_settings(model, processor, max_new_tokens, generate_kwargs, schema)
    try:
        inputs = encode(model, processor, prompt, image_list, max_new_tokens, num_crops)
    except ImageAspectRatioError as error:
        if chat is None:
            raise
        raise ImageAspectRatioError(
            f"{error} The chat holds this image and sends it again with every question: ask with a larger "
            "num_crops=, or go on without it (chat.pop() takes back the last turn with its images; "
            "chat.drop_images(keep_last=N) keeps only the last N images)."
        ) from None
    _add_cache(model, inputs, settings)
    return inputs, settings, chat


# generate() outputs that only a dict result holds: ask returns the answer's text instead.
_OUTPUT_KWARGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _generate_yourself(caller) -> str:
    """How to call ``model.generate`` yourself, for inputs or outputs that ``caller`` (the function the learner
    called) does not take or give: code that runs as written, on that function's question (or prompts) and images."""
    code = (
        "from phi_helpers import build_prompt, load_image; loaded = [load_image(image) for image in {images}]; "
        "inputs = processor(text=build_prompt({question}, num_images=len(loaded), processor=processor), "
        "images=loaded or None, return_tensors='pt').to(model.device); output = model.generate(**inputs, "
        "max_new_tokens=64, do_sample=False, return_dict_in_generate=True, output_scores=True)"
    )
    if caller is generate_batch:
        how, code = "one prompt at a time, here the first", code.format(question="prompts[0]", images="images[0]")
    else:
        how, code = "images: a list", code.format(question="question", images="images")
    return f"call model.generate on the processor's inputs yourself ({how}): {code}"


# generate() settings that are numbers in a range: the test, and how the error message says it.
_NUMBER_RANGES = {
    "temperature": (lambda value: value >= 0, "of at least 0 (0 means greedy)"),
    "top_p": (lambda value: 0 < value <= 1, "above 0 and at most 1"),
    "min_p": (lambda value: 0 <= value <= 1, "from 0 to 1"),
    "typical_p": (lambda value: 0 < value <= 1, "above 0 and at most 1"),
    "repetition_penalty": (lambda value: value > 0, "above 0 (1 means no penalty)"),
}


def _check_call(model, processor, max_new_tokens, schema, generate_kwargs: dict, caller, streaming) -> tuple[int, dict]:
    """Refuse what would otherwise fail deep inside transformers or be ignored. ``caller``: the function the
    learner called (ask, extract, stream_chunks, generate_batch), whose keywords and defaults the messages
    name. Returns ``max_new_tokens`` as an int and the generate() settings (``_check_generate_kwargs``)."""
    check_model_and_processor(model, processor)
    if schema is not None:
        check_schema_type(schema)
    max_new_tokens = check_whole_number(max_new_tokens, "max_new_tokens", minimum=1)
    return max_new_tokens, _check_generate_kwargs(model, processor, generate_kwargs, caller, streaming)


def _check_generate_kwargs(model, processor, generate_kwargs: dict, caller, streaming: bool) -> dict:
    """The generate() settings asked for, checked: those of a ``generation_config`` among them (keywords
    beside it win), ``eos_token_id`` as ids, ``num_crops`` (the processor's) a valid number of crops."""
    _check_names(model, generate_kwargs, caller)
    kwargs = dict(generate_kwargs)
    if kwargs.get("generation_config") is not None:
        kwargs = {**_config_settings(model, kwargs.pop("generation_config"), caller), **kwargs}
    if streaming and kwargs.get("streamer") is not None:
        raise InvalidArgumentError(
            "stream=True brings its own streamer: pass either stream=True or streamer=..., not both "
            "(stream_chunks(...) gives the pieces of text to show them your way)."
        )
    if kwargs.get("max_length") is not None:
        raise InvalidArgumentError(
            "max_length is not used here: the answer's length is max_new_tokens (the prompt does not count), "
            "so pass max_new_tokens=... instead."
        )
    asked_for = [name for name in _OUTPUT_KWARGS if kwargs.get(name)]
    if asked_for:
        returns = (
            "generate_batch() returns each answer's text (a Generation per prompt)" if caller is generate_batch
            else "ask(), extract() and stream_chunks() return the answer's text"
        )
        raise InvalidArgumentError(
            f"{', '.join(asked_for)}: {returns}, not generate()'s output. For scores and the other outputs, "
            f"{_generate_yourself(caller)}."
        )
    if kwargs.get("cache_implementation") == "offloaded" and model.device.type == "cpu":
        raise InvalidArgumentError(
            "cache_implementation='offloaded' keeps the KV cache in CPU memory while a GPU computes; this model "
            "runs on the CPU already, so leave it out."
        )
    if kwargs.get("num_crops") is not None:
        kwargs["num_crops"] = check_num_crops(kwargs["num_crops"])
    if kwargs.get("num_beams") is not None:
        kwargs["num_beams"] = check_whole_number(kwargs["num_beams"], "num_beams", minimum=1)
        if streaming and kwargs["num_beams"] > 1:
            raise InvalidArgumentError(
                "Beam search (num_beams > 1) chooses its answer only at the end, so it cannot be streamed: "
                "leave num_beams out to stream, or call ask(..., num_beams=...) without stream=True."
            )
    if kwargs.get("top_k") is not None:
        kwargs["top_k"] = check_whole_number(kwargs["top_k"], "top_k", hint=" (0 turns top-k off)")
    _check_types(kwargs)
    for name, (allowed, wording) in _NUMBER_RANGES.items():
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and allowed(value)):
            raise InvalidArgumentError(f"{name} must be a number {wording}, got {value!r}.")
    if kwargs.get("eos_token_id") is not None:
        kwargs["eos_token_id"] = _token_ids(processor, kwargs["eos_token_id"])
    return kwargs


# The model's inputs, which ask, extract, stream_chunks and generate_batch build from the prompt and the
# images (``encode``): given again as keywords, generate would fail on two of them or quietly drop the others.
_MODEL_INPUTS = ("inputs", "input_ids", "attention_mask", "position_ids", "inputs_embeds", "pixel_values", "image_sizes")


def _check_names(model, generate_kwargs: dict, caller) -> None:
    """``InvalidArgumentError`` for a keyword that is no setting of ``generate``: one of the model inputs
    ``caller`` builds itself, or a typo (``temprature=``, ``image=``), named with the closest setting or
    keyword of ``caller``; transformers would say "got multiple values" or "model_kwargs are not used",
    or nothing at all."""
    known = _generation_setting_names(type(model))
    for name in generate_kwargs:
        if name in _MODEL_INPUTS:
            instead = (
                " of each row of the batch: pass the prompts and one list of images per prompt instead, "
                "generate_batch(model, processor, prompts, images) with e.g. images=[[receipt], [], [page1, page2]]"
                if caller is generate_batch else ": pass the question and its images (images=...) instead"
            )
            raise InvalidArgumentError(
                f"{name}= is a model input, which {caller.__name__}() builds from the prompt and the images{instead}. "
                f"For inputs of your own, {_generate_yourself(caller)}."
            )
        if name not in known:
            candidates = known | _keywords(caller)
            close = difflib.get_close_matches(name, sorted(candidates), n=1)
            hint = f"did you mean {close[0]}=...? " if close else ""
            raise InvalidArgumentError(
                f"{name}= is not a generation setting: {hint}The settings are the fields of transformers' "
                "GenerationConfig (do_sample, temperature, top_p, repetition_penalty, ...) and num_crops."
            )


@functools.cache
def _generation_setting_names(model_class) -> frozenset[str]:
    """The keywords ``generate`` takes for ``model_class`` as settings: GenerationConfig's fields, generate's
    parameters but the prompt (``inputs``), a KV cache (``cache``, or transformers' name
    ``past_key_values``), and ``num_crops`` (the processor's). Computed once per class."""
    return frozenset({
        *GenerationConfig().to_dict(), *inspect.signature(model_class.generate).parameters,
        "cache", "past_key_values", "tokenizer", "num_crops",
    } - {"self", "kwargs", *_MODEL_INPUTS})


def _keywords(function) -> set[str]:
    """The named parameters of ``function`` (ask's are model, processor, prompt_or_chat, images,
    max_new_tokens, stream, schema): an ``image=`` meant ``images=``, not a generation setting."""
    parameters = inspect.signature(function).parameters.values()
    return {parameter.name for parameter in parameters if parameter.kind != inspect.Parameter.VAR_KEYWORD}


# generate() settings that are whole numbers, and their least value.
_WHOLE_NUMBERS = {"min_new_tokens": 0, "min_length": 0, "no_repeat_ngram_size": 0, "pad_token_id": 0, "num_return_sequences": 1}


def _check_types(kwargs: dict) -> None:
    """Settings of the wrong type, which transformers would take as something else (``do_sample="yes"``)
    or fail on deep inside ``generate``: an InvalidArgumentError saying what each must be."""
    for name, minimum in _WHOLE_NUMBERS.items():
        if kwargs.get(name) is not None:
            kwargs[name] = check_whole_number(kwargs[name], name, minimum=minimum)
    for name in ("do_sample", "use_cache"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {kwargs[name]!r}.")
    stop = kwargs.get("stop_strings")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, (list, tuple)) and all(isinstance(t, str) for t in stop))):
        raise InvalidArgumentError(f"stop_strings must be a string or a list of strings, got {stop!r}.")
    if stop is not None and not all(as_list(stop)):  # "" would be found at once: an empty answer
        raise InvalidArgumentError(f"stop_strings must not be empty strings, got {stop!r}.")
    for name in ("logits_processor", "stopping_criteria"):
        items = kwargs.get(name)
        if items is not None and not (isinstance(items, (list, tuple)) and all(callable(item) for item in items)):
            kind = "LogitsProcessorList" if name == "logits_processor" else "StoppingCriteriaList"
            raise InvalidArgumentError(f"{name} must be a list of callables (e.g. a transformers {kind}), got {items!r}.")
    bad_words = kwargs.get("bad_words_ids")
    if bad_words is not None and not (
        isinstance(bad_words, (list, tuple))
        and all(isinstance(ids, (list, tuple)) and ids and all(type(i) is int for i in ids) for ids in bad_words)
    ):
        raise InvalidArgumentError(
            f"bad_words_ids must be a list of lists of token ids, e.g. processor.tokenizer(['word'], "
            f"add_special_tokens=False).input_ids, got {bad_words!r}."
        )
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], Cache):
            raise InvalidArgumentError(
                f"{name} must be a transformers Cache (e.g. DynamicCache(config=model.config)), got "
                f"{type(kwargs[name]).__name__}; leave it out and ask() brings its own."
            )


def _config_settings(model, config, caller) -> dict:
    """The settings a ``generation_config`` asks for: its fields that differ from the model's own generation
    config (which ``generate`` starts from anyway), so that passing that one changes nothing. ``caller``:
    the function the learner called, whose default ``max_new_tokens`` the message names."""
    if not isinstance(config, GenerationConfig):
        raise InvalidArgumentError(
            f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}; "
            "or pass the settings as keywords, e.g. do_sample=True, temperature=0.7."
        )
    own = model.generation_config.to_dict()
    fields = {
        name: value for name, value in config.to_dict().items()
        if value is not None and not name.startswith("_") and name != "transformers_version" and value != own.get(name)
    }
    if "max_new_tokens" in fields:
        default = inspect.signature(caller).parameters["max_new_tokens"].default
        raise InvalidArgumentError(
            f"generation_config sets max_new_tokens={fields['max_new_tokens']}: pass max_new_tokens="
            f"{fields['max_new_tokens']} as an argument of its own instead ({caller.__name__}() takes {default} "
            "when it is left out)."
        )
    return fields


def _token_ids(processor, tokens):
    """``eos_token_id`` with every token string (``"<|end|>"``) replaced by its id."""
    strings = [token for token in (tokens if isinstance(tokens, (list, tuple)) else [tokens]) if isinstance(token, str)]
    if not strings:
        return tokens
    vocab = processor.tokenizer.get_vocab()
    unknown = [token for token in strings if token not in vocab]
    if unknown:
        raise InvalidArgumentError(
            f"eos_token_id={unknown[0]!r} is not a token of the tokenizer: pass token ids or single tokens such "
            f"as '<|end|>'; to stop when the answer contains a piece of text, pass stop_strings=[{unknown[0]!r}]."
        )
    if isinstance(tokens, str):
        return vocab[tokens]
    return [vocab[token] if isinstance(token, str) else token for token in tokens]


def check_model_and_processor(model, processor) -> None:
    """``InvalidArgumentError`` unless ``model`` is a Phi-3-vision model and ``processor`` its processor
    (what ``load_model`` returns, in that order): a tokenizer, an image processor or a swapped pair would
    otherwise fail with an AttributeError from inside transformers."""
    config = getattr(model, "config", None)
    if not hasattr(model, "generate") or config is None:
        swapped = " (the two are swapped: model first)" if hasattr(processor, "generate") else ""
        raise InvalidArgumentError(
            f"The model argument is a {type(model).__name__}, not a model{swapped}: pass what load_model() returns, "
            "model, processor = load_model(...), as ask(model, processor, ...)."
        )
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type == "meta" and not getattr(model, "hf_device_map", None):
        raise InvalidArgumentError(
            "The model's weights are on the 'meta' device, which holds shapes but no values (after .to('meta'), "
            "or a model built without its weights): load it again with load_model()."
        )
    if getattr(config, "model_type", None) != "phi3_v":
        raise InvalidArgumentError(
            f"These helpers run Phi-3-vision and Phi-3.5-vision (model_type 'phi3_v'); this model is "
            f"{getattr(config, 'model_type', None)!r}. Load one with phi_helpers.load_model()."
        )
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor") and hasattr(processor, "prompt_lengths")):
        kind = "a tokenizer" if hasattr(processor, "convert_tokens_to_ids") else f"a {type(processor).__name__}"
        kind = "None" if processor is None else kind
        raise InvalidArgumentError(
            f"The processor argument is {kind}, not the model's processor (which holds the tokenizer and the image "
            "processor): pass what load_model() returns, or AutoProcessor.from_pretrained(<the same checkpoint>)."
        )


def _prepare(processor, prompt_or_chat, images) -> tuple[str, list, Chat | None]:
    """Return (prompt string, loaded images, the Chat or None) for any kind of input ``ask`` accepts."""
    if isinstance(prompt_or_chat, Chat):
        prompt_or_chat._close_stream()  # a stream left unfinished: its partial answer goes in first
        if images is not None:
            raise PromptError(
                "A Chat carries its own images: attach them with chat.add_user(text, images=...) and call "
                "ask(model, processor, chat) without images=."
            )
        if len(prompt_or_chat) == 0 or prompt_or_chat.messages[-1]["role"] != "user":
            raise PromptError("It is not the model's turn: add a question first with chat.add_user(...).")
        return prompt_or_chat.render(processor), prompt_or_chat.images, prompt_or_chat
    if not isinstance(prompt_or_chat, str):
        raise PromptError(
            f"ask() needs a question (str), a templated prompt (str) or a Chat, not a {type(prompt_or_chat).__name__}."
        )
    image_list = [load_image(image) for image in as_list(images)]
    if is_chat_format(prompt_or_chat):  # written in the chat format by the caller: use it as it is
        return prompt_or_chat, image_list, None
    return build_prompt(prompt_or_chat, num_images=len(image_list), processor=processor), image_list, None


def encode(model, processor, prompts, images: list, max_new_tokens: int, num_crops: int | None = None):
    """Processor output on the model's device (pixel values in the model's dtype), length-checked.

    ``prompts`` is one prompt with ``images`` its list of images, or a list of prompts with ``images``
    one list per prompt: a batch, padded on the left whether or not it has images (generation appends
    on the right, so every row's last prompt token must be in the last column). ``num_crops``: the
    processor's setting for these images (default: ``processor.image_processor.num_crops``).
    """
    check_whole_number(max_new_tokens, "max_new_tokens", minimum=1)
    # Checked from the images' sizes, before their pixels are processed (seconds for many images); the longest
    # prompt is the one that does not fit (the rows are padded to it)
    lengths = processor.prompt_lengths(prompts, images or None, num_crops)
    row = max(range(len(lengths)), key=lambda index: lengths[index][0])
    tokens, image_tokens = lengths[row]
    check_context_length(tokens, model.config.max_position_embeddings, max_new_tokens, image_tokens,
                         prompt_name(row, len(lengths)))
    inputs = processor(text=prompts, images=images or None, padding_side="left", num_crops=num_crops, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


# generate() settings whose logits processors ban or force tokens regardless of a schema's mask.
_TOKEN_BANNING_KWARGS = (
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "sequence_bias", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "force_words_ids", "constraints",
)


def _is_set(value) -> bool:
    """Whether a generate() setting asks for something: not None, 0 or empty (a tensor or array of ids too)."""
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return value != 0
    try:
        return len(value) > 0
    except TypeError:  # no length: a 0-d tensor, an object
        return True


def generation_settings(model, processor, max_new_tokens: int, generate_kwargs: dict, schema: dict | None = None) -> dict:
    """generate() keyword arguments: greedy unless sampling is asked for, stop at the end of the turn;
    with a ``schema``, the token mask of constrained decoding (compiled here, before any generation)."""
    settings = {name: value for name, value in generate_kwargs.items() if value is not None}  # None: the default
    if settings.get("temperature") == 0:  # "temperature 0" means greedy, as in the official sample code
        if settings.get("do_sample"):
            raise InvalidArgumentError("temperature=0 means greedy decoding, do_sample=True sampling: pass one of them.")
        settings.pop("temperature")
        settings["do_sample"] = False
    if settings.get("num_return_sequences", 1) != 1:
        raise InvalidArgumentError(
            "ask() returns one answer, so num_return_sequences must be 1. For several different answers, "
            "call it several times with do_sample=True."
        )
    if schema is not None and settings.get("num_beams", 1) != 1:
        raise InvalidArgumentError(
            "A schema constrains one answer token by token, which beam search (num_beams > 1) does not follow; "
            "leave num_beams out."
        )
    banning = [] if schema is None else [name for name in _TOKEN_BANNING_KWARGS if _is_set(settings.get(name))]
    if banning:
        raise InvalidArgumentError(
            f"{', '.join(banning)} with a schema: they ban or force tokens on their own, which can rule out every "
            "token the schema allows (JSON repeats its own pieces, such as '\"},{\"'); leave them out: the "
            "schema decides which tokens may come."
        )
    settings.setdefault("do_sample", any(name in settings for name in _SAMPLING_KWARGS))
    settings.setdefault("eos_token_id", _stop_token_ids(model, processor))
    settings.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    if settings.get("stop_strings"):  # generate needs the tokenizer to find them
        settings.setdefault("tokenizer", processor.tokenizer)
    settings["max_new_tokens"] = max_new_tokens
    if schema is not None:
        vocab_size = model.config.vocab_size  # the logits' width (32064 > the tokenizer's 32045)
        stop_ids = settings["eos_token_id"]
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        special = set(processor.tokenizer.all_special_ids)  # "</s>" is not one: decoding would keep it as text
        grammar = compile_schema(processor.tokenizer, schema, vocab_size, [i for i in stop_ids if i in special])
        settings["logits_processor"] = LogitsProcessorList([*settings.get("logits_processor", []), SchemaConstraint(grammar)])
    return settings


def _add_cache(model, inputs, settings: dict) -> None:
    """A KV cache for prompt + answer, filled in place (``kv_cache``), unless the caller gave one, asked
    for none (``use_cache=False``) or asked transformers for one of its own (``cache_implementation``)."""
    if not ({"cache", "past_key_values", "cache_implementation"} & settings.keys()) and settings.get("use_cache", True):
        settings["cache"] = PreallocatedCache(model.config, inputs["input_ids"].shape[1] + settings["max_new_tokens"])


def _stop_token_ids(model, processor) -> list[int]:
    """``<|end|>`` and ``<|endoftext|>`` (looked up in the tokenizer) plus the model's configured eos."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(token) for token in _STOP_TOKENS]
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    unknown = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != unknown))  # no duplicates, in order


def _decode_answer(processor, new_tokens: list[int], stop_ids, stop_strings=None) -> str:
    """Decode the generated tokens before the first stop token, without special tokens, cut before the
    first of ``stop_strings`` (a string or a list; see ``ask``), stripped."""
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids])
    end = next((index for index, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
    text = processor.tokenizer.decode(new_tokens[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    cut = _first_stop_string(text, as_list(stop_strings))
    return text[:cut].strip()


@dataclass
class Generation:
    """One decoded answer and what it cost. Timings are those of the whole batch it ran in."""

    text: str
    prompt_tokens: int
    generated_tokens: int  # every token the model generated for it, its stop token (<|end|>) included
    seconds_to_first_token: float | None
    seconds: float
    batch_size: int


class FirstTokenTimer(StoppingCriteria):
    """A stopping criterion that never stops anything: it notes when it is first called.

    ``generate`` calls its stopping criteria right after each new token, so the first call happens
    when the first token of the answer exists: that is the time to first token. (A streamer would
    work too, but streamers only accept a batch of one.)
    """

    def __init__(self):
        self.first_token_at: float | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.first_token_at is None:
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)  # GPU work is asynchronous: wait for it
            self.first_token_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# The generate() settings generate_batch takes: they act on each row's own tokens, so they hold across its
# decoding rounds (settings such as min_new_tokens or stop_strings would start again with every round).
BATCH_SETTINGS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "num_crops")


def generate_batch(
    model, processor, prompts: list[str], images: list[list], max_new_tokens: int = BATCH_MAX_NEW_TOKENS,
    schema: dict | None = None, **generate_kwargs,
) -> list[Generation]:
    """Answer several prompts in one batched generation; return one Generation per prompt.

    Decoding is greedy unless you pass sampling settings (as in ``ask``). Sampled answers repeat after
    ``torch.manual_seed(0)`` for the same batch, but a row's answer depends on the other rows and their
    order (they draw from one random stream). With a ``schema``, every answer is constrained
    to JSON that follows it (one schema for the batch). ``**generate_kwargs``: the settings of
    ``BATCH_SETTINGS``, as in ``ask`` (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``typical_p``, ``repetition_penalty``, and ``num_crops`` for this batch's images); for other
    generate() settings, call ``ask`` once per prompt.

    ``prompts`` are questions or chat-format prompts, as in ``ask``, and ``images[i]`` is the list of
    images of ``prompts[i]`` (anything ``load_image`` accepts). ``encode`` pads the prompts on the left to the
    same length, with or without images (generation appends on the right, so every row's last prompt token
    must be in the last column).

    The prompts are encoded one at a time into one KV cache (`_prefill_in_groups`). Decoding then
    runs ``model.generate`` for all rows in rounds: a round ends as soon as some answer ends, the
    finished rows leave the batch and its KV cache, and the others go on from the cache, so a short
    answer stops costing compute once it is done (plain ``generate`` keeps computing finished rows,
    padded, until the longest answer ends). Each answer is that of one plain batched ``generate`` call
    up to rounding (tests/test_generate_batch.py finds the same tokens). On a CPU, the decoding steps'
    linear layers run on oneDNN while 4 to 64 rows are going (``batch_linear``).

    A batch whose longest prompt plus ``max_new_tokens`` can reach past 4096 tokens
    (``original_max_position_embeddings``) runs as one plain ``generate``, finished rows staying in it:
    past 4096 the model rotates every row with the long RoPE factors, as the original does, so a short
    prompt batched with a long one can get another answer than on its own.
    """
    max_new_tokens, generate_kwargs = _check_call(
        model, processor, max_new_tokens, schema, generate_kwargs, generate_batch, streaming=False
    )
    others = [name for name in generate_kwargs if name not in BATCH_SETTINGS]
    if others:
        raise InvalidArgumentError(
            f"generate_batch does not take {', '.join(others)}: it decodes in rounds, and only the settings "
            f"{', '.join(BATCH_SETTINGS)} hold across them. For other settings, call ask() once per prompt."
        )
    num_crops = generate_kwargs.pop("num_crops", None)
    prompts, images = _batch(processor, prompts, images)
    settings = generation_settings(model, processor, max_new_tokens, generate_kwargs, schema)
    inputs = encode(model, processor, prompts, images, max_new_tokens, num_crops)
    stop_ids = set(settings["eos_token_id"])
    timer = FirstTokenTimer()
    # Past original_max_position_embeddings (4096) the RoPE factors are chosen from the longest row, so a
    # long row leaving would change the others' factors mid-answer: such a batch runs as one generate.
    limit = getattr(model.config, "original_max_position_embeddings", None)
    rounds = limit is None or inputs["input_ids"].shape[1] + max_new_tokens <= limit
    settings["stopping_criteria"] = StoppingCriteriaList([timer, _AnyRowFinished(stop_ids)] if rounds else [timer])
    images_per_row = [len(group) for group in images]
    prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
    rows = list(range(len(prompts)))  # the rows of the batch still generating, as indices of prompts
    answers: list[list[int]] = [[] for _ in prompts]
    cache = PreallocatedCache(model.config, capacity=inputs["input_ids"].shape[1] + max_new_tokens)
    constraint = next((p for p in settings.get("logits_processor", []) if isinstance(p, SchemaConstraint)), None)
    # A checkpoint's generation_config may set min_new_tokens, which each round of generate would start again
    min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
    start = time.perf_counter()
    with torch.inference_mode():
        _prefill_in_groups(model, inputs, images_per_row, cache)
        with batch_kernels(model, rows=len(prompts)):  # on a CPU, oneDNN for 4-64 rows (batch_linear)
            while rows:
                output = model.generate(**inputs, **settings, cache=cache)
                new = output[:, inputs["input_ids"].shape[1] :].tolist()
                for row, tokens in zip(rows, new):
                    answers[row] += tokens
                generated = len(answers[rows[0]])
                going = [
                    i for i, row in enumerate(rows) if not stop_ids & set(answers[row]) and generated < max_new_tokens
                ]
                if not going:
                    break
                if len(going) < len(rows):  # finished rows leave the batch, its cache and its grammar matchers
                    cache.batch_select_indices(torch.tensor(going, device=output.device))
                    if constraint is not None:
                        constraint.keep_rows(going)
                inputs = _keep_rows(inputs, output, going, [images_per_row[row] for row in rows])
                rows = [rows[i] for i in going]
                settings["max_new_tokens"] = max_new_tokens - generated
                if min_new_tokens:
                    settings["min_new_tokens"] = max(0, min_new_tokens - generated)
    seconds = time.perf_counter() - start
    first = None if timer.first_token_at is None else timer.first_token_at - start
    results = []
    for tokens, prompt_count in zip(answers, prompt_tokens):
        count = _answer_length(tokens, stop_ids)
        text = _decode_answer(processor, tokens[:count], settings["eos_token_id"])
        results.append(Generation(text, prompt_count, count, first, seconds, len(prompts)))
    return results


def _batch(processor, prompts, images) -> tuple[list[str], list[list]]:
    """The prompts in chat format and their images loaded, as ``ask`` prepares one prompt: a plain
    question gets the chat template and its image tags, an image is anything ``load_image`` accepts.
    ``prompts`` must be a non-empty list of strings, ``images`` one list (of a prompt's images) per prompt."""
    if isinstance(prompts, (list, tuple)) and any(isinstance(p, Chat) for p in prompts):
        raise PromptError(
            "generate_batch takes prompts (strings), not Chats: pass [chat.render(processor) for chat in chats] "
            "and [chat.images for chat in chats]; the answers are not added to the chats."
        )
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptError("generate_batch needs a non-empty list of prompts (strings); for one prompt use ask().")
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts) or not all(isinstance(g, (list, tuple)) for g in images):
        raise PromptError(
            f"generate_batch needs one list of images per prompt ({len(prompts)} list(s), [] for a prompt without "
            "images), e.g. images=[[receipt], [], [page1, page2]]."
        )
    images = [[load_image(image) for image in group] for group in images]
    prompts = [prompt if is_chat_format(prompt) else build_prompt(prompt, num_images=len(group), processor=processor)
               for prompt, group in zip(prompts, images)]
    return prompts, images


def _prefill_in_groups(model, inputs, images_per_row: list[int], cache: PreallocatedCache) -> None:
    """Encode every prompt token but the last column into ``cache``, ``PREFILL_ROWS`` prompts per forward
    pass; ``generate`` then runs the last column of all rows together and goes on decoding.

    Why: on Linux, glibc's malloc hands every block over 32 MB straight back to the system when it is
    freed, so each such activation of a forward pass is mapped afresh and its pages faulted in again.
    A pass over several long prompts has many such activations: with the real model's layer sizes, 8
    prompts of 773 tokens cost 1.33x as much in one pass as in 8 calls of one, 1.06x in passes of two
    (benchmarks/bench_native.py, "groups"; with MALLOC_* settings that keep freed memory, passes of 2 or
    8 gain 2-3% and one prompt per pass loses 1%). One prompt per pass costs what a call of one does,
    on any allocator, and needs the least activation memory on any device. Each row is encoded with the
    position ids ``generate`` gives it but without its left padding, as a call of one would encode it:
    a short prompt in a batch of long ones costs its own length, not theirs. The padding's positions
    in the cache are zeros, which the mask hides.

    Left to ``generate`` (one pass, as before): batches of up to ``PREFILL_ROWS`` prompts, a last column
    that holds image positions, and prompts longer than ``original_max_position_embeddings`` (the long
    RoPE factors are chosen per pass, from its length).
    """
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    limit = getattr(model.config, "original_max_position_embeddings", None) or input_ids.shape[1]
    if len(input_ids) <= PREFILL_ROWS or input_ids.shape[1] > limit or model.model.image_positions(input_ids)[:, -1].any():
        return
    first_image = _first_images(images_per_row)
    for top in range(0, len(input_ids), PREFILL_ROWS):
        rows = slice(top, top + PREFILL_ROWS)
        start = int(mask[rows, :-1].any(dim=0).int().argmax())  # the group's left padding: not encoded
        group_mask = mask[rows, start:-1]
        group = {
            "input_ids": input_ids[rows, start:-1],
            "attention_mask": None if group_mask.all() else group_mask,  # generate drops a mask without padding
            "position_ids": (group_mask.long().cumsum(-1) - 1).masked_fill(group_mask == 0, 0),  # as generate
        }
        images = slice(first_image[top], first_image[min(top + PREFILL_ROWS, len(input_ids))])
        if "pixel_values" in inputs and images.stop > images.start:
            group["pixel_values"], group["image_sizes"] = inputs["pixel_values"][images], inputs["image_sizes"][images]
        part = DynamicCache(config=model.config)
        model(**group, cache=part, use_cache=True, logits_to_keep=1)
        cache.write_rows(top, len(input_ids), start, part)  # one copy of the keys and values at a time


class _AnyRowFinished(StoppingCriteria):
    """Ends a round of ``generate`` for the whole batch as soon as one row has produced a stop token."""

    def __init__(self, stop_ids: set[int]):
        self.stop_ids = sorted(stop_ids)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        finished = torch.isin(input_ids[:, -1], torch.tensor(self.stop_ids, device=input_ids.device)).any()
        return finished.expand(input_ids.shape[0])


def _keep_rows(inputs, output: torch.Tensor, keep: list[int], images_per_row: list[int]) -> dict:
    """The inputs of the next round: the kept rows' sequences so far, their attention masks (1 for
    every generated token) and their images (needed again only if the cache is re-encoded)."""
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"]
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], new_tokens)], dim=1)
    kept = {"input_ids": output[keep], "attention_mask": mask[keep]}
    if "pixel_values" in inputs:
        first_image = _first_images(images_per_row)
        image_index = [first_image[row] + i for row in keep for i in range(images_per_row[row])]
        index = torch.tensor(image_index, dtype=torch.long, device=output.device)
        kept["pixel_values"] = inputs["pixel_values"][index]
        kept["image_sizes"] = inputs["image_sizes"][index]
    return kept


def _first_images(images_per_row: list[int]) -> list[int]:
    """Where each row's images start in ``pixel_values`` (rows in order), and the total at the end."""
    return [sum(images_per_row[:row]) for row in range(len(images_per_row) + 1)]


def _answer_length(tokens: list[int], stop_ids: set[int]) -> int:
    """Tokens the model generated for this row: up to and including its first stop token (the rest
    is padding added while the other rows of the batch were still going)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return index + 1
    return len(tokens)


__all__ = ["ask", "extract", "stream_chunks", "generate_batch", "Generation"]
