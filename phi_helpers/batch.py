"""Run one task over many images: where the images come from, batched generation, JSONL output.

This module is the engine behind ``python -m phi_helpers predict`` and ``... eval``; you can use it
from Python too:

    from phi_helpers import load_model
    from phi_helpers.batch import collect_items, predict

    model, processor = load_model()
    items = collect_items("scans/")                  # a file, URL, folder, glob or PDF
    images = [item.load() for item in items[:4]]
    for result in predict(model, processor, images, task="ocr"):
        print(result["answer"])

The pieces, top to bottom:

* tasks: the fixed prompts (``TASK_PROMPTS``), the extraction prompt built from a JSON Schema, and
  the follow-up prompt used for the one retry when an extraction is not valid;
* items: ``collect_items`` turns what the user typed after ``--image`` into a list of ``Item``s
  (one per image file or PDF page) whose pixels are only read when ``item.load()`` is called;
* generation: ``generate_batch`` runs several prompts as ONE greedy ``model.generate`` call (the
  processor left-pads them) and measures the time to the first token; ``predict`` adds the task logic;
* output: ``JsonlWriter`` appends one line per result and flushes it at once; ``done_keys`` reads
  back which items an earlier run already finished, so that a re-run can skip them.
"""

import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .errors import ImageLoadError, JSONExtractionError, PhiHelpersError
from .generation import encode, generation_settings
from .images import load_image
from .parsing import extract_json
from .prompts import Chat, build_prompt

# ----------------------------------------------------------------------------------------------
# Tasks and their prompts
# ----------------------------------------------------------------------------------------------

TASKS = ("caption", "ocr", "vqa", "extract")

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


def task_prompt(task: str, question: str | None = None, schema: dict | None = None) -> str:
    """The instruction sent with each image for ``task`` (see ``TASK_PROMPTS`` and ``EXTRACT_PROMPT``).

    ``question`` is the user's ``--prompt``: the question for ``vqa``, a replacement of the fixed
    instruction for ``caption`` and ``ocr``, and extra instructions (put before the schema) for ``extract``.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "vqa":
        if not question:
            raise ValueError("The vqa task needs a question (--prompt TEXT).")
        return question
    if task == "extract":
        if schema is None:
            raise ValueError("The extract task needs a JSON Schema (--schema FILE.json).")
        prompt = EXTRACT_PROMPT.format(schema=json.dumps(schema, ensure_ascii=False))
        return f"{question}\n{prompt}" if question else prompt
    return question or TASK_PROMPTS[task]


def check_extraction(text: str, schema: dict) -> tuple[object, list[str]]:
    """Parse a model answer as JSON and validate it against ``schema``.

    Returns ``(data, problems)``: ``data`` is the parsed JSON (``None`` if nothing parsed) and
    ``problems`` is a list of readable messages, empty when the answer is valid.
    """
    try:
        data = extract_json(text)
    except JSONExtractionError as error:
        return None, [str(error)]
    return data, validation_errors(data, schema)


def validation_errors(data, schema: dict) -> list[str]:
    """The JSON Schema violations of ``data`` as sorted strings like ``"total: 'abc' is not of type 'number'"``."""
    validator = _validator_for(schema)
    problems = []
    for error in validator.iter_errors(data):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        problems.append(f"{where}: {error.message}")
    return sorted(problems)


def check_schema(schema) -> None:
    """Raise ``ValueError`` when ``schema`` is not a usable JSON Schema."""
    if not isinstance(schema, dict):
        raise ValueError(f"A JSON Schema must be a JSON object, not {type(schema).__name__}.")
    jsonschema = _import_optional("jsonschema")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(f"Not a valid JSON Schema: {error.message}") from None


def load_schema(path) -> dict:
    """Read a JSON Schema file and check it; raise ValueError with a readable message if it is unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"No schema file at '{path}'. Check the spelling of --schema.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the schema file '{path}': {error}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"The schema file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    try:
        check_schema(schema)
    except ValueError as error:
        raise ValueError(f"The schema file '{path}': {error}") from None
    return schema


def _validator_for(schema: dict):
    jsonschema = _import_optional("jsonschema")
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # also check "format": "date" etc.


def _import_optional(name: str):
    """Import a package the command line needs but the library does not; say how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise PhiHelpersError(f"This needs the '{name}' package: pip install {name}") from None


# ----------------------------------------------------------------------------------------------
# Items: one image file, URL or PDF page each
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
PDF_SCALE = 2.0  # PDF pages are 72 points per inch: scale 2 renders them at 144 dpi


@dataclass
class Item:
    """One image to process: a file, a URL, or one page of a PDF (``page`` counts from 1)."""

    source: str
    page: int | None = None
    loader: Callable | None = None  # how to read the pixels; default: load_image(source)

    @property
    def key(self) -> tuple[str, int | None]:
        """What identifies this item in an output file (used to skip finished items on a re-run)."""
        return (self.source, self.page)

    @property
    def label(self) -> str:
        return self.source if self.page is None else f"{self.source} (page {self.page})"

    def load(self):
        """Read the image (an RGB PIL image). Raises ImageLoadError if it cannot be read."""
        return self.loader() if self.loader else load_image(self.source)


def is_url(spec: str) -> bool:
    """True for anything with a scheme (``https://...``); load_image rejects the unsupported ones."""
    return "://" in spec


def is_multi_input(spec: str) -> bool:
    """True when ``--image`` names many images (a folder, a glob pattern or a PDF): JSONL output."""
    if is_url(spec):
        return False
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".pdf"):
        return True
    return not path.exists() and glob.has_magic(spec)


def collect_items(spec: str, pdf_scale: float = PDF_SCALE) -> list[Item]:
    """Turn an ``--image`` argument into the list of items to process.

    * an ``http(s)://`` URL or an image file -> one item;
    * a PDF -> one item per page;
    * a folder -> its image files and PDFs (not its sub-folders), sorted by name;
    * a glob pattern such as ``"scans/*.png"`` or ``"scans/**/*.jpg"`` -> the matching image files
      and PDFs, sorted. Quote the pattern so that your shell does not expand it.

    Raises ImageLoadError when nothing is there (missing file, empty folder, pattern without matches).
    """
    if is_url(spec):
        return [Item(spec)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_supported(p))
        if not files:
            raise ImageLoadError(f"The folder '{path}' contains no image or PDF files ({_suffix_list()}).")
        return _items_for_files(files, pdf_scale, strict=False)
    if path.exists():
        return _items_for_files([path], pdf_scale, strict=True)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file() and _is_supported(p)]
        if not files:
            raise ImageLoadError(f"No image or PDF files match the pattern '{spec}' ({_suffix_list()}).")
        return _items_for_files(files, pdf_scale, strict=False)
    raise ImageLoadError(
        f"No file or folder at '{path}'. Check the spelling; relative paths start from the current "
        f"directory, which is '{Path.cwd()}'."
    )


def _items_for_files(files: list[Path], pdf_scale: float, strict: bool) -> list[Item]:
    """Items for image files and PDF pages. A PDF that cannot be opened raises when it was the only
    input (``strict``); among many files it becomes one item that fails (and is reported) when loaded."""
    items = []
    for path in files:
        if path.suffix.lower() != ".pdf":
            items.append(Item(str(path)))
            continue
        try:
            items.extend(pdf_items(path, pdf_scale))
        except ImageLoadError as error:
            if strict:
                raise
            items.append(Item(str(path), loader=_raiser(error)))
    return items


def pdf_items(path: Path, scale: float = PDF_SCALE) -> list[Item]:
    """One item per page of the PDF at ``path``; pages are rendered only when loaded."""
    count = _pdf_page_count(path)
    if count == 0:
        raise ImageLoadError(f"The PDF '{path}' has no pages.")
    return [Item(str(path), page=n, loader=_page_loader(path, n, scale)) for n in range(1, count + 1)]


def render_pdf_page(path, page: int, scale: float = PDF_SCALE):
    """Render page ``page`` (counting from 1) of a PDF as an RGB PIL image with pypdfium2."""
    pdfium = _import_optional("pypdfium2")
    document = _open_pdf(path)
    try:
        bitmap = document[page - 1].render(scale=scale)
        return bitmap.to_pil().convert("RGB")
    except pdfium.PdfiumError as error:
        raise ImageLoadError(f"Could not render page {page} of '{path}': {error}") from None
    finally:
        document.close()


def _pdf_page_count(path: Path) -> int:
    document = _open_pdf(path)
    try:
        return len(document)
    finally:
        document.close()


def _open_pdf(path):
    pdfium = _import_optional("pypdfium2")
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        raise ImageLoadError(f"Could not open '{path}' as a PDF ({error}). Is the file complete and not encrypted?") from None


def _page_loader(path: Path, page: int, scale: float) -> Callable:
    return lambda: render_pdf_page(path, page, scale)


def _raiser(error: Exception) -> Callable:
    def load():
        raise error

    return load


def _is_supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == ".pdf"


def _suffix_list() -> str:
    return " ".join(sorted(IMAGE_SUFFIXES | {".pdf"}))


# ----------------------------------------------------------------------------------------------
# Generation: several prompts in one generate() call, with timings
# ----------------------------------------------------------------------------------------------


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


def generate_batch(model, processor, prompts: list[str], images: list[list], max_new_tokens: int = 512) -> list[Generation]:
    """Answer several prompts in ONE greedy ``model.generate`` call; return one Generation per prompt.

    ``prompts`` are chat-format prompts with ``<|image_N|>`` tags and ``images[i]`` is the list of
    images of ``prompts[i]``. The processor left-pads the prompts to the same length (generation
    appends on the right, so every row's last prompt token must be in the last column).
    """
    inputs = encode(model, processor, prompts, images, max_new_tokens)
    settings = generation_settings(model, processor, max_new_tokens, {})
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


# ----------------------------------------------------------------------------------------------
# predict: a task over a list of images
# ----------------------------------------------------------------------------------------------


def predict(
    model, processor, images: list, task: str, question: str | None = None, schema: dict | None = None,
    max_new_tokens: int = 512,
) -> list[dict]:
    """Run ``task`` on each image (all in one batch) and return one result dict per image.

    Every result has ``prompt``, ``answer`` and the costs (``prompt_tokens``, ``generated_tokens``,
    ``seconds_to_first_token``, ``total_seconds``, ``batch_size``). For ``extract`` the answer is the parsed
    JSON (or ``None``) and the result also has ``raw`` (every answer text, in order), ``valid``,
    ``errors`` and ``attempts``: an invalid first answer gets ONE retry, in which the problems are
    told to the model in a follow-up turn of the same conversation (see ``RETRY_PROMPT``).
    """
    prompt = task_prompt(task, question, schema)
    first = generate_batch(model, processor, [build_prompt(prompt)] * len(images), [[im] for im in images], max_new_tokens)
    if task != "extract":
        return [_result(prompt, g.text, [g]) for g in first]

    checked = [check_extraction(g.text, schema) for g in first]
    to_retry = [i for i, (_data, problems) in enumerate(checked) if problems]
    second = {}
    if to_retry:
        chats = [_retry_chat(prompt, images[i], first[i].text, checked[i][1]) for i in to_retry]
        retried = generate_batch(model, processor, [c.render() for c in chats], [c.images for c in chats], max_new_tokens)
        second = dict(zip(to_retry, retried))

    results = []
    for index, generation in enumerate(first):
        attempts = [generation] + ([second[index]] if index in second else [])
        data, problems = checked[index] if index not in second else check_extraction(second[index].text, schema)
        result = _result(prompt, data, attempts)
        result.update(raw=[g.text for g in attempts], valid=not problems, errors=problems, attempts=len(attempts))
        results.append(result)
    return results


def _retry_chat(prompt: str, image, answer: str, problems: list[str]) -> Chat:
    """The conversation for the retry: the question with its image, the bad answer, the problems."""
    chat = Chat()
    chat.add_user(prompt, images=image)
    chat.add_assistant(answer or "(empty answer)")
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

    Each returned dict starts with the item's ``source`` (and ``page`` for PDF pages) and has either
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


def item_fields(item: Item) -> dict:
    """``{"source": ...}`` plus ``"page"`` for a PDF page: the start of every output line."""
    return {"source": item.source} if item.page is None else {"source": item.source, "page": item.page}


def error_record(item: Item, error: Exception) -> dict:
    """The output line of a failed item."""
    return {**item_fields(item), "error": error_message(error)}


def error_message(error: BaseException) -> str:
    """A one-line message: our own errors speak for themselves, others get their type name in front."""
    text = " ".join(str(error).split())
    if isinstance(error, (PhiHelpersError, OSError, ValueError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def model_info(model, processor) -> dict:
    """Which model ran and how: recorded in every result."""
    return {
        "model": getattr(model, "name_or_path", None) or model.config.name_or_path,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "num_crops": getattr(processor.image_processor, "num_crops", None),
    }


# ----------------------------------------------------------------------------------------------
# JSONL output: append, flush every line, resume
# ----------------------------------------------------------------------------------------------


def done_keys(path) -> set[tuple[str, int | None]]:
    """Keys ``(source, page)`` of the items that an existing JSONL file has finished successfully.

    Lines with an ``"error"`` do not count (those items are retried), nor do lines that do not parse
    (e.g. the last line of a run that was killed while writing it).
    """
    path = Path(path)
    if not path.exists():
        return set()
    keys = set()
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "source" in record and "error" not in record:
                keys.add((record["source"], record.get("page")))
    return keys


class JsonlWriter:
    """Append JSON lines to a file, flushing each one to disk as soon as it is written.

    The file is opened in append mode: nothing already in it is ever lost. If its last line was cut
    off by an interrupted run, a newline is added first so that the new lines stay parseable.

        with JsonlWriter("results.jsonl") as out:
            out.write({"source": "a.png", "answer": "..."})
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> "JsonlWriter":
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
        return self

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc_info) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def chunks(sequence: list, size: int):
    """Consecutive pieces of ``sequence`` of at most ``size`` elements."""
    for start in range(0, len(sequence), size):
        yield sequence[start : start + size]


__all__ = [
    "TASKS",
    "TASK_PROMPTS",
    "EXTRACT_PROMPT",
    "RETRY_PROMPT",
    "Item",
    "collect_items",
    "is_multi_input",
    "render_pdf_page",
    "generate_batch",
    "predict",
    "predict_items",
    "check_extraction",
    "load_schema",
    "done_keys",
    "JsonlWriter",
]
