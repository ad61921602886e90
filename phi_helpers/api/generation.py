"""Ask the model a question and get its answer as a string.

    answer = ask(model, processor, "What is in this picture?", images=["photo.jpg"])
    answer = ask(model, processor, chat)                  # a Chat: the answer is appended to it
    answer = ask(model, processor, question, images=[img], stream=True)   # prints as it goes
    data = extract(model, processor, "Extract the fields.", schema, images=[img])  # a dict, always valid

What ``ask`` does, step by step (each step is a small function below):
1. ``_prepare``: turn the question (or Chat) into a prompt string and a list of PIL images.
2. ``encode``: run the processor, check that prompt + answer fit the context, move tensors to the model.
3. ``generation_settings``: greedy decoding, stop on ``<|end|>`` / ``<|endoftext|>``.
4. ``model.generate``, then decode only the new tokens.

``stream_chunks`` is the streaming version as a generator of text pieces; ``ask(stream=True)``
prints those pieces, and a notebook widget can show them instead.

``schema=`` (a JSON Schema, in ``ask``, ``stream_chunks`` and ``generate_batch``) constrains the answer
to JSON that follows it (``phi_helpers.api.constrained``); ``extract`` returns that answer as a dict.
"""

import threading
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..errors import ContextLengthError
from .constrained import SchemaConstraint, compile_schema, read_answer
from .images import load_image
from .prompts import Chat, _as_list, build_prompt

# The chat turn ends with <|end|>; <|endoftext|> is the tokenizer's eos. The checkpoints' own
# generation config only knows "</s>" (id 2), which the model rarely produces, so both are added.
_STOP_TOKENS = ("<|end|>", "<|endoftext|>")
_SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def ask(
    model, processor, prompt_or_chat, images=None, max_new_tokens: int = 256, stream: bool = False,
    schema: dict | None = None, **generate_kwargs,
) -> str:
    """Generate the model's answer and return it as a stripped string.

    Args:
        model, processor: what ``load_model()`` returned.
        prompt_or_chat: a plain question (image tags are added for you), a prompt that is already in
            chat format (contains ``<|user|>``; used as it is), or a ``Chat`` (its images are used and
            the answer is appended to it; if generation fails, your question stays in the chat).
        images: one image or a list; anything ``load_image`` accepts. Not used with a ``Chat``.
        max_new_tokens: the longest answer, in tokens.
        stream: print the answer while it is generated. Interrupting the kernel (Ctrl-C / the stop
            button) stops generation and returns the partial answer.
        schema: a JSON Schema: the answer can only be JSON that follows it (compact, in the schema's
            property order), unless cut off by ``max_new_tokens``. ``extract`` also parses it.
        **generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=True, temperature=0.7``).
            Decoding is greedy (deterministic) unless you pass sampling settings.

    Raises:
        ContextLengthError: the prompt (text + image tokens) plus ``max_new_tokens`` does not fit.
        PromptImageMismatchError: the prompt's ``<|image_N|>`` tags do not match the images.
        SchemaNotSupportedError: ``schema`` uses a feature the constraint cannot enforce (before generating).
    """
    if stream:
        return _print_stream(
            stream_chunks(model, processor, prompt_or_chat, images, max_new_tokens, schema=schema, **generate_kwargs)
        )
    prompt, image_list, chat = _prepare(prompt_or_chat, images)
    settings = generation_settings(model, processor, max_new_tokens, generate_kwargs, schema)
    inputs = encode(model, processor, prompt, image_list, max_new_tokens)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings)
    answer = _decode_new_tokens(processor, output, inputs["input_ids"].shape[1])
    if chat is not None:
        chat.add_assistant(answer)
    return answer


def extract(
    model, processor, prompt_or_chat, schema: dict, images=None, max_new_tokens: int = 256, stream: bool = False,
    **generate_kwargs,
) -> dict:
    """Ask for JSON that follows ``schema`` and return it as a dict that always validates against it.

    Same arguments as ``ask``; the answer is constrained token by token (constrained decoding), so it
    parses and validates whatever the model is, with greedy or sampled decoding. Tell the model what
    to extract in the question: the schema is enforced, not shown to it.

        schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
        data = extract(model, processor, "What is the total of this receipt?", schema, images=[receipt])

    Raises:
        SchemaNotSupportedError: the schema uses a feature that is not enforced (nothing is generated);
            the supported subset is listed in ``help(phi_helpers.api.constrained)``.
        JSONTruncatedError: the answer ran out of ``max_new_tokens`` first; ``error.text`` keeps it.
    """
    answer = ask(model, processor, prompt_or_chat, images, max_new_tokens, stream, schema=schema, **generate_kwargs)
    return read_answer(answer, schema)


def stream_chunks(
    model, processor, prompt_or_chat, images=None, max_new_tokens: int = 256, schema: dict | None = None,
    **generate_kwargs,
):
    """Yield the answer in pieces of text as the model generates it (same arguments as ``ask``).

    Generation runs in a background thread. If the thread fails, its exception is raised here. If you
    stop iterating early (``break``, ``.close()``, or a KeyboardInterrupt), generation is stopped. With a
    ``Chat``, the text generated so far is appended as the answer, unless generation failed.
    """
    prompt, image_list, chat = _prepare(prompt_or_chat, images)
    settings = generation_settings(model, processor, max_new_tokens, generate_kwargs, schema)
    inputs = encode(model, processor, prompt, image_list, max_new_tokens)

    stop = _StopFlag()
    settings["stopping_criteria"] = StoppingCriteriaList([*settings.get("stopping_criteria", []), stop])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []
    thread = threading.Thread(
        target=_generate_in_thread, args=(model, {**inputs, **settings, "streamer": streamer}, errors), daemon=True
    )
    thread.start()
    pieces: list[str] = []
    try:
        for piece in streamer:
            if piece:
                pieces.append(piece)
                yield piece
    finally:  # also runs when the caller stops early: stop the thread, keep what was generated
        stop.set()
        thread.join()
        if chat is not None and not errors:
            chat.add_assistant("".join(pieces).strip())
    if errors:
        raise errors[0]


def _print_stream(chunks) -> str:
    """Print text pieces as they arrive and return them joined; Ctrl-C keeps the partial answer."""
    pieces = []
    try:
        for piece in chunks:
            pieces.append(piece)
            _show(piece)
    except KeyboardInterrupt:
        chunks.close()  # stops generation (if it is not stopped already)
        _show(f"\n[stopped: generation interrupted, returning the partial answer ({len(''.join(pieces))} characters)]")
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


class _StopFlag(StoppingCriteria):
    """A stopping criterion that another thread can switch on with ``.set()``."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


def _prepare(prompt_or_chat, images) -> tuple[str, list, Chat | None]:
    """Return (prompt string, loaded images, the Chat or None) for any kind of input ``ask`` accepts."""
    if isinstance(prompt_or_chat, Chat):
        if images is not None:
            raise ValueError(
                "A Chat carries its own images: attach them with chat.add_user(text, images=...) and call "
                "ask(model, processor, chat) without images=."
            )
        if len(prompt_or_chat) == 0 or prompt_or_chat.messages[-1]["role"] != "user":
            raise ValueError("It is not the model's turn: add a question first with chat.add_user(...).")
        return prompt_or_chat.render(), prompt_or_chat.images, prompt_or_chat
    if not isinstance(prompt_or_chat, str):
        raise ValueError(
            f"ask() needs a question (str), a templated prompt (str) or a Chat, not a {type(prompt_or_chat).__name__}."
        )
    image_list = [load_image(image) for image in _as_list(images)]
    if "<|user|>" in prompt_or_chat:  # already in chat format: use as it is
        return prompt_or_chat, image_list, None
    return build_prompt(prompt_or_chat, num_images=len(image_list)), image_list, None


def encode(model, processor, prompts, images: list, max_new_tokens: int):
    """Processor output on the model's device (pixel values in the model's dtype), length-checked.

    ``prompts`` is one prompt with ``images`` its list of images, or a list of prompts with ``images``
    one list per prompt (a left-padded batch).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
    inputs = processor(text=prompts, images=images or None, return_tensors="pt")
    per_prompt = len(images) if isinstance(prompts, str) else max((len(group) for group in images), default=0)
    _check_context(model, processor, inputs["input_ids"], per_prompt, max_new_tokens)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _check_context(model, processor, input_ids: torch.Tensor, num_images: int, max_new_tokens: int) -> None:
    """Raise ContextLengthError when prompt + answer would not fit in the model's context window."""
    limit = model.config.max_position_embeddings
    prompt_tokens = input_ids.shape[1]
    if prompt_tokens + max_new_tokens <= limit:
        return
    image_token_id = getattr(processor, "image_token_id", None)
    image_tokens = int(((input_ids == image_token_id) | (input_ids < 0)).sum())
    raise ContextLengthError(
        f"The prompt is {prompt_tokens:,} tokens ({image_tokens:,} of them for {num_images} image(s)) and up to "
        f"{max_new_tokens:,} new tokens were asked for: {prompt_tokens + max_new_tokens:,} in all, but the model's "
        f"context holds {limit:,}. Lower max_new_tokens, use fewer or smaller images, a lower num_crops "
        "(load_model(num_crops=...)), or shorten the history (chat.drop_images(keep_last=1) or chat.reset())."
    )


def generation_settings(model, processor, max_new_tokens: int, generate_kwargs: dict, schema: dict | None = None) -> dict:
    """generate() keyword arguments: greedy unless sampling is asked for, stop at the end of the turn;
    with a ``schema``, the token mask of constrained decoding (compiled here, before any generation)."""
    settings = dict(generate_kwargs)
    if settings.get("temperature") == 0:  # "temperature 0" means greedy, as in the official sample code
        settings.pop("temperature")
        settings["do_sample"] = False
    settings.setdefault("do_sample", any(name in settings for name in _SAMPLING_KWARGS))
    settings.setdefault("eos_token_id", _stop_token_ids(model, processor))
    settings.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    settings["max_new_tokens"] = max_new_tokens
    if schema is not None:
        vocab_size = model.config.vocab_size  # the logits' width (32064 > the tokenizer's 32045)
        stop_ids = settings["eos_token_id"]
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        special = set(processor.tokenizer.all_special_ids)  # "</s>" is not one: decoding would keep it as text
        grammar = compile_schema(processor.tokenizer, schema, vocab_size, [i for i in stop_ids if i in special])
        settings["logits_processor"] = LogitsProcessorList([*settings.get("logits_processor", []), SchemaConstraint(grammar)])
    return settings


def _stop_token_ids(model, processor) -> list[int]:
    """``<|end|>`` and ``<|endoftext|>`` (looked up in the tokenizer) plus the model's configured eos."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(token) for token in _STOP_TOKENS]
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    unknown = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != unknown))  # no duplicates, in order


def _decode_new_tokens(processor, output: torch.Tensor, prompt_length: int) -> str:
    """Decode what comes after the prompt, without special tokens, stripped."""
    new_tokens = output[:, prompt_length:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0].strip()


__all__ = ["ask", "extract", "stream_chunks"]


@dataclass
class Generation:
    """One decoded answer and what it cost. Timings are those of the whole batch it ran in."""

    text: str
    prompt_tokens: int
    generated_tokens: int
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


def generate_batch(
    model, processor, prompts: list[str], images: list[list], max_new_tokens: int = 512, schema: dict | None = None
) -> list[Generation]:
    """Answer several prompts in ONE greedy ``model.generate`` call; return one Generation per prompt.

    With a ``schema``, every answer is constrained to JSON that follows it (one schema for the batch).

    ``prompts`` are chat-format prompts with ``<|image_N|>`` tags and ``images[i]`` is the list of
    images of ``prompts[i]``. The processor left-pads the prompts to the same length (generation
    appends on the right, so every row's last prompt token must be in the last column).
    """
    settings = generation_settings(model, processor, max_new_tokens, {}, schema)
    inputs = encode(model, processor, prompts, images, max_new_tokens)
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **settings, stopping_criteria=StoppingCriteriaList([timer]))
    seconds = time.perf_counter() - start
    first = None if timer.first_token_at is None else timer.first_token_at - start

    prompt_length = inputs["input_ids"].shape[1]
    stop_ids = set(settings["eos_token_id"])
    results = []
    for row, prompt_mask in zip(output, inputs["attention_mask"]):
        new_tokens = row[prompt_length:].tolist()
        count = _answer_length(new_tokens, stop_ids)
        text = processor.tokenizer.decode(new_tokens[:count], skip_special_tokens=True).strip()
        results.append(Generation(text, int(prompt_mask.sum()), count, first, seconds, len(prompts)))
    return results


def _answer_length(tokens: list[int], stop_ids: set[int]) -> int:
    """Tokens the model generated for this row: up to and including its first stop token (the rest
    is padding added while the other rows of the batch were still going)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return index + 1
    return len(tokens)
