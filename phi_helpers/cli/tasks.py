"""The tasks of ``phi-helpers predict`` (caption, ocr, vqa, extract) over a batch of images.

    from phi_helpers import load_model
    from phi_helpers.cli.inputs import collect_items
    from phi_helpers.cli.tasks import predict

    model, processor = load_model()
    items = collect_items("scans/")                  # a file, URL, folder, glob, PDF or TIFF
    images = [item.load() for item in items[:4]]
    for result in predict(model, processor, images, task="ocr"):
        print(result["answer"])

The fixed prompts (``TASK_PROMPTS``), the extraction prompt built from a JSON Schema and the
follow-up prompt used for the one retry when an unconstrained extraction is not valid (extraction is
constrained to the schema by default, see ``phi_helpers.api.constrained``); ``predict`` runs a task as
ONE batched ``generate`` call (``phi_helpers.api.generation.generate_batch``); ``predict_items``
never raises for a bad item.
"""

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass

from ..api.choices import BATCH_MAX_NEW_TOKENS
from ..api.constrained import check_supported, read_answer
from ..api.generation import Generation, generate_batch
from ..api.loading import load_model
from ..api.prompts import Chat, build_prompt
from ..api.structured import check_extraction, load_schema
from ..errors import InvalidArgumentError, JSONExtractionError, JSONTruncatedError, PromptError, SchemaNotSupportedError
from .inputs import Item
from .outputs import (  # TASKS: every record's "task" is one of them
    MODEL_FILES, MODEL_SETTINGS, PROMPT_SHA256, TASKS, canonical_json, error_record, item_fields, model_files, model_key,
    model_settings,
)


@dataclass(frozen=True)
class ModelLoader:
    """How the command line gets its model: ``load_model`` with these choices, called in this process
    (``phi-helpers predict`` / ``eval``) or in each Ray replica (``--engine ray``).

    ``model`` is a hub id, a local folder (for Ray: one every node can read) or ``"tiny"``; it wins over
    ``$PHI_HELPERS_MODEL`` (a replica's too), as ``--model`` does. ``None``: ``load_model``'s choice.
    The other fields are ``load_model``'s arguments.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    num_crops: int | None = None
    quantize: str | None = None

    @classmethod
    def of(cls, args) -> "ModelLoader":
        """The choices of the command line's ``args`` (``--model``, ``--device``, ... ``--quantize``)."""
        return cls(args.model, args.device, args.dtype, args.attn, args.num_crops, args.quantize)

    def __call__(self):
        """``(model, processor)``; what ``load_model`` prints (its choices) goes to stderr: stdout holds answers."""
        with contextlib.redirect_stdout(sys.stderr):
            return load_model(
                self.model, device=self.device, dtype=self.dtype, attn=self.attn, num_crops=self.num_crops,
                quantize=self.quantize,
            )

BATCH_SIZE = 4  # images per generate call, by default

TASK_PROMPTS = {
    "caption": "Describe this image in one or two sentences.",
    "ocr": (
        "Transcribe all the text in this image exactly as it is written, line by line, keeping the "
        "original spelling, capitalisation, numbers and punctuation. Answer with the text only, "
        "without any comment."
    ),
}

EXTRACT_PROMPT = (
    "Extract the information in this image as one JSON object that follows this JSON Schema:\n"
    "{schema}\n"
    "Use exactly the property names of the schema. Leave out properties that are not in the image. "
    "Answer with the JSON object only, no explanation."
)

RETRY_PROMPT = (
    "Your answer is not valid: {problems}\n"
    "Answer again with only the corrected JSON object, following the JSON Schema."
)


MAX_PROBLEMS_SHOWN = 5  # a retry prompt lists at most this many problems (the first ones, sorted by field)


def read_schema(path, constrain: bool) -> dict:
    """The JSON Schema in file ``path``, checked now (before the slow model loading); with ``constrain``,
    also that constrained decoding can enforce it. Every refusal names the file."""
    schema = load_schema(path)
    if constrain:
        try:
            check_supported(schema)
        except SchemaNotSupportedError as error:
            raise SchemaNotSupportedError(f"The schema file '{path}': {error}") from None
    return schema


def task_prompt(task: str, question: str | None = None, schema: dict | None = None) -> str:
    """The instruction sent with each image for ``task`` (see ``TASK_PROMPTS`` and ``EXTRACT_PROMPT``).

    ``question`` is the user's ``--prompt``: the question for ``vqa``, a replacement of the fixed
    instruction for ``caption`` and ``ocr``, and extra instructions (put before the schema) for ``extract``.
    """
    if task not in TASKS:
        raise InvalidArgumentError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "vqa":
        if not question:
            raise PromptError("The vqa task needs a question (--prompt TEXT).")
        return question
    if task == "extract":
        if schema is None:
            raise InvalidArgumentError("The extract task needs a JSON Schema (--schema FILE.json).")
        prompt = EXTRACT_PROMPT.format(schema=json.dumps(schema, ensure_ascii=False))
        return f"{question}\n{prompt}" if question else prompt
    return question or TASK_PROMPTS[task]


def request_fields(args, schema: dict | None, model: str) -> dict:
    """The request a record answers: everything that changes the answer, in one flat JSON object.

    A re-run skips an item only if its last line was answered for an equal request. To make a new
    option part of the request, add one key here; give it the value ``None`` when the option is not
    used, so that the lines written before the key existed still count as the same request (a key
    missing from an old line reads as ``None``). The schema enters by the SHA-256 of its canonical
    JSON, so editing the schema file redoes the items while renaming it does not; the model by its name,
    ``model_files`` (new weights saved into the same folder redo the items) and ``model_settings`` (so do
    a new chat template, num_crops or generation settings); the instruction by the SHA-256 of its whole
    text (a version of phi-helpers that words a task's instruction differently redoes the items). Options
    are recorded as given: ``--dtype auto`` is one request on every machine.
    """
    instruction = task_prompt(args.task, args.prompt, schema)
    if args.task == "extract" and not args.constrain:
        instruction += "\n" + RETRY_PROMPT  # the retry's wording changes its answers too
    return {
        "task": args.task,
        "prompt": args.prompt,
        PROMPT_SHA256: hashlib.sha256(instruction.encode()).hexdigest(),
        "schema_sha256": None if schema is None else hashlib.sha256(canonical_json(schema).encode()).hexdigest(),
        "model": model_key(model),
        MODEL_FILES: model_files(model),
        MODEL_SETTINGS: model_settings(model),
        "dtype": args.dtype,
        "num_crops": args.num_crops,
        "max_new_tokens": args.max_new_tokens,
        "constrained": args.constrain if args.task == "extract" else None,
        "quantize": None if args.quantize == "none" else args.quantize,
    }


def loaded_request(request: dict, model: str) -> dict:
    """``request`` with ``model_files`` read again now that ``model`` is loaded: a hub model that the load
    downloaded (none was in the cache when the request was made) or updated (a new commit) is recorded by
    the commit that answers. ``request_fields`` is made before loading, to decide what a re-run skips."""
    files = model_files(model)
    return request if files is None else {**request, MODEL_FILES: files}


def predict(
    model, processor, images: list, task: str, question: str | None = None, schema: dict | None = None,
    max_new_tokens: int = BATCH_MAX_NEW_TOKENS, constrain: bool = True,
) -> list[dict]:
    """Run ``task`` on each image (all in one batch) and return one result dict per image.

    Every result has ``prompt``, ``answer`` and the costs (``prompt_tokens``, ``generated_tokens``,
    ``seconds_to_first_token``, ``total_seconds``, ``batch_size``). For ``extract`` the answer is the parsed
    JSON (or ``None``) and the result also has ``raw`` (every answer text, in order), ``valid``,
    ``errors``, ``attempts`` and ``constrained``.

    With ``constrain`` (the default) the answers are decoded under the schema's token mask, so they
    always parse and validate; the only failure left is an answer cut off by ``max_new_tokens``
    (``valid`` false, the reason in ``errors``, the partial text in ``raw``). Without it, an invalid
    first answer gets ONE retry, in which the problems are told to the model in a follow-up turn of
    the same conversation (see ``RETRY_PROMPT``).
    """
    prompt = task_prompt(task, question, schema)
    prompts, image_lists = [build_prompt(prompt, processor=processor)] * len(images), [[im] for im in images]
    if task == "extract" and constrain:
        generations = generate_batch(model, processor, prompts, image_lists, max_new_tokens, schema=schema)
        return [_constrained_result(prompt, g, schema) for g in generations]
    first = generate_batch(model, processor, prompts, image_lists, max_new_tokens)
    if task != "extract":
        return [_result(prompt, g.text, [g]) for g in first]

    checked = [check_extraction(g.text, schema) for g in first]
    to_retry = [i for i, (_data, problems) in enumerate(checked) if problems]
    second = {}
    if to_retry:
        chats = [_retry_chat(prompt, images[i], first[i].text, checked[i][1]) for i in to_retry]
        retried = generate_batch(model, processor, [c.render(processor) for c in chats], [c.images for c in chats], max_new_tokens)
        second = dict(zip(to_retry, retried))

    results = []
    for index, generation in enumerate(first):
        attempts = [generation] + ([second[index]] if index in second else [])
        data, problems = checked[index] if index not in second else check_extraction(second[index].text, schema)
        result = _result(prompt, data, attempts)
        result.update(raw=[g.text for g in attempts], valid=not problems, errors=problems, attempts=len(attempts))
        result["constrained"] = False
        results.append(result)
    return results


def _constrained_result(prompt: str, generation: Generation, schema: dict) -> dict:
    """The result of one constrained extraction: valid, cut off by max_new_tokens (read_answer tells a cut-off
    answer from one the grammar let end), or, if the grammar engine failed, why the answer is not valid."""
    try:
        data, problems = read_answer(generation.text, schema), []
    except JSONTruncatedError:
        data, problems = None, [f"cut off by max_new_tokens ({generation.generated_tokens} tokens) before the JSON was "
                                f"complete; the partial answer is in \"raw\""]
    except JSONExtractionError as error:
        data, problems = None, [str(error)]
    result = _result(prompt, data, [generation])
    result.update(raw=[generation.text], valid=not problems, errors=problems, attempts=1, constrained=True)
    return result


def _retry_chat(prompt: str, image, answer: str, problems: list[str]) -> Chat:
    """The conversation for the retry: the question with its image, the bad answer, the problems."""
    chat = Chat()
    chat.add_user(prompt, images=image)
    chat.add_assistant(answer or "(empty answer)", generated=True)
    chat.add_user(RETRY_PROMPT.format(problems="; ".join(problems[:MAX_PROBLEMS_SHOWN])))
    return chat


def _result(prompt: str, answer, generations: list[Generation]) -> dict:
    """A result dict; token counts and seconds are summed over the attempts (1, or 2 after a retry)."""
    return {
        "prompt": prompt,
        "answer": answer,
        "prompt_tokens": sum(g.prompt_tokens for g in generations),
        "generated_tokens": sum(g.generated_tokens for g in generations),
        "seconds_to_first_token": _round(generations[0].seconds_to_first_token),
        "total_seconds": _round(sum(g.seconds for g in generations)),
        "batch_size": generations[0].batch_size,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def predict_items(model, processor, items: list[Item], task: str, **task_kwargs) -> list[dict]:
    """Run ``task`` on a list of items as one batch; never raises for a bad item.

    Each returned dict starts with the item's ``source`` (and ``page`` for the pages of PDFs and TIFFs) and has either
    the result of ``predict`` plus ``image_size``, or ``error``. An item whose image cannot be read
    gets its error at once; if the batch itself fails, its items are run again one by one, so that
    only the item that causes the failure is reported as failed.
    """
    records = [None] * len(items)
    loaded = []  # (index, item, image) of the items whose image could be read
    for index, item in enumerate(items):
        try:
            loaded.append((index, item, item.load()))
        except Exception as error:  # noqa: BLE001  (reported in the item's own line)
            records[index] = error_record(item, error)
    for index, record in _predict_loaded(model, processor, loaded, task, task_kwargs):
        records[index] = record
    return records


def _predict_loaded(model, processor, loaded: list, task: str, task_kwargs: dict):
    """Yield ``(index, record)`` for loaded items; a failing batch is split into batches of one."""
    if not loaded:
        return
    try:
        results = predict(model, processor, [image for _index, _item, image in loaded], task, **task_kwargs)
    except Exception as error:  # noqa: BLE001  (reported in the item's own line)
        if len(loaded) == 1:
            index, item, _image = loaded[0]
            yield index, error_record(item, error)
        else:
            for one in loaded:
                yield from _predict_loaded(model, processor, [one], task, task_kwargs)
        return
    for (index, item, image), result in zip(loaded, results):
        yield index, {**item_fields(item), "image_size": list(image.size), **result}


def chunks(sequence: list, size: int):
    """Consecutive pieces of ``sequence`` of at most ``size`` elements."""
    for start in range(0, len(sequence), size):
        yield sequence[start : start + size]
