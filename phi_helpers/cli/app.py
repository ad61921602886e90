"""The command line: ``python -m phi_helpers predict ...`` and ``python -m phi_helpers eval ...``.

Installed as the console script ``phi-helpers`` too. Run ``phi-helpers predict --help`` for the
options and examples. What the commands do is in ``phi_helpers.cli.tasks`` (predict) and
``phi_helpers.cli.evaluate`` (eval); this module reads the arguments, checks them, loads the model
and writes the results.

Exit codes: ``EXIT_CODES`` (``phi-helpers --help`` and the README show the same table). Errors are one
line on stderr starting with ``error:``; set ``PHI_HELPERS_DEBUG=1`` to get the full traceback instead.
A run stopped by a signal (Ctrl-C, SIGTERM, SIGHUP) cleans up, says what it kept, and then, run as the
console script, ends by that same signal (``main``), as a shell expects of a program.
"""

import argparse
import codecs
import contextlib
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

from transformers.utils import logging as hf_logging

from ..api.choices import ATTENTIONS, DEFAULT_MODEL_ID, DEVICES, DTYPE_SHORT_NAMES, DTYPES
from ..api.loading import check_device, check_dtype, requested_model_id
from ..api.prompts import check_user_text
from ..api.quantization import QUANTIZE_CHOICES, check_quantize
from ..errors import CommandLineError, InvalidArgumentError, OutputBusyError, PromptError, check_whole_number
from ..models.phi3_v.image_processing_phi3_v import CONTEXT_LENGTH, check_num_crops
from ..versions import package_version
from .evaluate import run_eval_command
from .inputs import collect_all, collect_items, is_multi_input, terminal_safe
from .outputs import (
    STOP_SIGNALS, JsonlWriter, OutputLock, Progress, appends_lines, check_answers, check_output_path,
    check_replaceable, error_message, failure_line, finish_run, flush_stdout, input_files, item_fields, json_safe,
    make_record, model_info, nothing_left, print_result, resume, schema_advice, stopping_signal,
    terminate_as_interrupt, write_atomically,
)
from .ray_engine import INSTALL_RAY, run_ray
from .tasks import BATCH_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS
from .tasks import BATCH_SIZE as DEFAULT_BATCH_SIZE
from .tasks import TASKS, ModelLoader, chunks, loaded_request, predict, predict_items, read_schema, request_fields, task_prompt


EXIT_TRY_LATER = 75  # EX_TEMPFAIL of sysexits.h: a temporary failure, try again later
EXIT_READER_GONE = 141  # what a shell reports for a program that SIGPIPE ended: 128 + 13
# The exit codes of phi-helpers: the one table, shown by every --help (exit_codes_text) and in the README.
EXIT_CODES = {
    0: "success",
    1: "a run-time error: a missing file or model, an unwritable output, an item that failed, an answer that "
       "does not follow its schema",
    2: "a usage error: an unknown option or task, vqa without --prompt... (nothing ran)",
    EXIT_TRY_LATER: "another phi-helpers run is writing this --output now: try again later (EX_TEMPFAIL)",
    129: "stopped by SIGHUP: the terminal closed, an ssh connection dropped",
    130: "stopped by Ctrl-C (SIGINT)",
    EXIT_READER_GONE: "the reader of standard output went away (a pipe into head, which stops reading)",
    143: "stopped by SIGTERM: timeout, kill, docker stop, a scheduler's cancel",
}
EXIT_NOTE = ("129, 130 and 143 keep what was written; the command says so, then ends by the signal itself, which a "
             "shell reports as 128 + its number (and a shell loop around the command stops on Ctrl-C).")


def exit_codes_text() -> str:
    """``EXIT_CODES`` as the help's epilogs show them."""
    entries = [textwrap.fill(meaning, 100, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
               for code, meaning in EXIT_CODES.items()]
    return "\n".join(["exit codes:", *entries, "", textwrap.fill(EXIT_NOTE, 100, initial_indent="  ", subsequent_indent="  ")])


PREDICT_EXAMPLES = """\
examples:
  phi-helpers predict --image photo.jpg --task caption
  phi-helpers predict --image https://example.com/chart.png --task vqa --prompt "What is the highest bar?"
  phi-helpers predict --image receipt.png --task ocr --format json --output receipt.json
  phi-helpers predict --image receipt.png --task extract --schema receipt.schema.json --format json
  phi-helpers predict --image scans/ --task ocr --output scans.jsonl             # a folder
  phi-helpers predict --image "scans/**/*.png" --task ocr --output scans.jsonl   # a glob (quote it)
  phi-helpers predict --image report.pdf --task caption --output pages.jsonl     # every page of a PDF
  phi-helpers predict --image fax.tif --task ocr --output fax.jsonl              # every page of a TIFF
  phi-helpers predict --image scans/ --task ocr --output scans.jsonl --engine ray --replicas 2   # Ray, this machine
  phi-helpers predict --image s3://bucket/scans/ --task ocr --output scans.parquet --engine ray --address auto --replicas 8

Folders, globs, PDFs, multi-page TIFFs and several --image values give one JSON line per image or
page in the --output file (an animated GIF is one image: its first frame). Lines are written as soon as they are ready; running the same command again skips
the items already answered for the same request (task, prompt, schema, model and settings), retries
those that failed (their lines have an "error") and redoes those answered for another request.
"""

EVAL_EXAMPLES = """\
examples (data/eval: the labelled set in a clone of the repository; pip installs do not hold it):
  phi-helpers eval --data data/eval
  phi-helpers eval --data data/eval --limit 3 --output report.json
  PHI_HELPERS_MODEL=tiny phi-helpers eval --data data/eval --limit 3 --max-new-tokens 16   # offline dry run

DIR/manifest.jsonl has one item per line: {"image": ..., "task": "ocr", "expected": "text"} or
{"image": ..., "task": "extract", "schema": "schemas/x.schema.json", "expected": {...}}. OCR items
are scored with the character error rate (lower is better), extraction items with per-field exact
match (higher is better).
"""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="phi-helpers",
        description="Run Phi-3-vision / Phi-3.5-vision from the command line (also: python -m phi_helpers).",
        epilog=exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"phi-helpers {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict_parser(commands)
    _add_eval_parser(commands)
    return parser


def _add_predict_parser(commands) -> None:
    parser = commands.add_parser(
        "predict",
        help="caption, transcribe, question or extract JSON from images",
        description="Run one task on an image, a folder of images, a glob pattern or a PDF.",
        epilog=f"{PREDICT_EXAMPLES}\n{exit_codes_text()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--image", required=True, nargs="+", action="extend", metavar="PATH_OR_URL",
        help="an image file or http(s) URL; or a folder, a glob pattern, a PDF or a multi-page TIFF (one result "
        "per image/page); "
        "several values are allowed",
    )
    parser.add_argument(
        "--task", required=True, choices=TASKS,
        help="caption: describe the image; ocr: transcribe its text; vqa: answer --prompt; "
        "extract: JSON that follows --schema",
    )
    parser.add_argument("--prompt", metavar="TEXT", help="the question (required for vqa); replaces the built-in instruction "
                        "for caption and ocr; extra instructions for extract")
    parser.add_argument("--schema", metavar="FILE.json", help="JSON Schema of the answer (required for --task extract); "
                        "the answer is constrained to it, token by token, so it always parses and validates")
    _add_no_constrain_option(parser)
    parser.add_argument("--output", metavar="FILE", help="write the result here (required for many images: JSON lines, "
                        "appended); default: print it")
    parser.add_argument("--format", choices=("txt", "json"), help="txt: the answer only (default for one image); "
                        "json: the answer with its metadata (always used for many images)")
    _add_model_options(parser)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("process", "ray"), default="process",
                        help='process: this Python process (default); ray: Ray Data, one model replica per worker '
                        f'({INSTALL_RAY})')
    engine.add_argument("--address", metavar="ADDR", help="with --engine ray: the Ray cluster to use (e.g. auto, "
                        "ray://head:10001); default: start a local Ray on this machine")
    engine.add_argument("--replicas", type=_positive_int, metavar="N", help="with --engine ray: model replicas working "
                        "in parallel, one GPU each where there are GPUs (default: 1)")
    parser.set_defaults(parser=parser)


def _add_eval_parser(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="score the model on a labelled set (character error rate, field exact match)",
        description="Run the model on every item of DIR/manifest.jsonl and score the answers.",
        epilog=f"{EVAL_EXAMPLES}\n{exit_codes_text()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with manifest.jsonl (e.g. data/eval in a clone of the repository)")
    parser.add_argument("--output", metavar="FILE", help="also write the full report (every answer and score) as JSON")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N items of the manifest")
    _add_no_constrain_option(parser)
    _add_model_options(parser)


def _add_no_constrain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-constrain", dest="constrain", action="store_false",
                        help="extract without constrained decoding: the same prompt (it shows the schema), the answer "
                        "checked and asked again once if it is invalid (to compare with the default)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command: which model, where, and how much to generate."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=_model, metavar="ID_OR_PATH", help=f"hub id or local folder; 'tiny' for a tiny random test model "
                       f"(default: $PHI_HELPERS_MODEL, else {DEFAULT_MODEL_ID})")
    group.add_argument("--device", type=_device, default="auto", metavar=f"{{{','.join(DEVICES)},cuda:N}}",
                       help="default: auto (CUDA, then MPS, then CPU)")
    group.add_argument("--dtype", type=_dtype, default="auto", metavar=f"{{{','.join(DTYPE_SHORT_NAMES)}}}",
                       help="default: auto (bf16/fp16 on GPUs; on CPU fp32, or bf16 for quantized weights: --quantize "
                       "int8 or a folder saved quantized)")
    group.add_argument("--attn", type=_attn, choices=ATTENTIONS, default="auto",
                       help="attention implementation (default: auto)")
    group.add_argument("--quantize", type=_quantize, default="none", metavar=f"{{none,{','.join(QUANTIZE_CHOICES)}}}",
                       help="weight-only quantization of the language model: int8 (CPU: torchao; CUDA: bitsandbytes "
                       "or torchao) or int4 (CUDA with bitsandbytes); default: none")
    group.add_argument("--num-crops", type=_num_crops, metavar="N", help="image crops of 336 px: more = finer detail, "
                       "more tokens (default: the checkpoint's: 4 for Phi-3.5-vision, 16 for Phi-3-vision)")
    group.add_argument("--max-new-tokens", type=_max_new_tokens, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                       help=f"longest answer in tokens (default: {DEFAULT_MAX_NEW_TOKENS}); prompt + N must fit the context")
    group.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help=f"images per generate call when there are many (default: {DEFAULT_BATCH_SIZE})")


def _positive_int(text: str) -> int:
    """argparse type of the counts: phi_helpers' whole-number check, reported as a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    try:
        return check_whole_number(value, "N", minimum=1)
    except InvalidArgumentError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}") from None


def _device(text: str) -> str:
    """argparse type of --device: load_model's device names, any case ("CUDA:1" -> "cuda:1")."""
    try:
        return check_device(text)
    except InvalidArgumentError:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DEVICES)} or cuda:N)") from None


def _dtype(text: str) -> str:
    """argparse type of --dtype: load_model's dtype names, any case, as the short name ("bfloat16" -> "bf16")."""
    try:
        dtype = check_dtype(text)
    except InvalidArgumentError:
        other_names = ", ".join(name for name in DTYPES if name not in DTYPE_SHORT_NAMES)
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(DTYPE_SHORT_NAMES)}; or {other_names})"
        ) from None
    return "auto" if dtype is None else next(name for name in DTYPE_SHORT_NAMES if DTYPES.get(name) == dtype)


def _attn(text: str) -> str:
    """argparse type of --attn: any case, as load_model takes it ("EAGER" -> "eager"); choices checks the name."""
    return text.strip().lower()


def _quantize(text: str) -> str:
    """argparse type of --quantize: load_model's quantize names, any case ("INT8" -> "int8"); "none"."""
    try:
        return check_quantize(text) or "none"
    except InvalidArgumentError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from none, {', '.join(QUANTIZE_CHOICES)})"
        ) from None


def _model(text: str) -> str:
    """argparse type of --model: not empty (an unset shell variable), which would mean another model."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"is empty ({text!r}); give a hub id such as {DEFAULT_MODEL_ID}, a local folder or 'tiny' "
            "(is a shell variable unset?), or leave --model out for $PHI_HELPERS_MODEL or the default"
        )
    return text


def _max_new_tokens(text: str) -> int:
    """argparse type of --max-new-tokens: a count the model's context can hold (else every item would
    fail, after the model loaded)."""
    count = _positive_int(text)
    if count >= CONTEXT_LENGTH:
        raise argparse.ArgumentTypeError(f"{count:,} tokens do not fit the model's context of {CONTEXT_LENGTH:,} "
                                         "tokens, prompt included; a long answer needs a few thousand at most")
    return count


def _num_crops(text: str) -> int:
    """argparse type of --num-crops: a count that the model's context can hold (``check_num_crops``)."""
    try:
        return check_num_crops(_positive_int(text))
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


OTHER_FORMAT_SUFFIXES = (".csv", ".tsv", ".json", ".txt", ".xlsx", ".xls")  # names of formats JSON lines are not


def _as_typed(text: str) -> str:
    """A command-line argument as the user typed it: where the locale is not UTF-8 (LC_ALL=C with
    PYTHONUTF8=0), Python keeps each byte of "合計" it cannot decode as a surrogate code point; UTF-8 bytes are
    read back as UTF-8 (other bytes stay, and the prompt check names them)."""
    if not any("\udc80" <= char <= "\udcff" for char in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        return text


def _check_predict_args(args) -> bool:
    """Usage errors argparse cannot see by itself (exit code 2). Returns True if the results are JSON
    lines appended to --output: many images, or an --output that ends in .jsonl or holds results."""
    predict_parser = args.parser  # set_defaults(parser=...): its .error() shows the predict usage line
    if args.task == "vqa" and not (args.prompt and args.prompt.strip()):
        predict_parser.error('--task vqa needs a question: add --prompt "..."')
    if args.prompt:
        args.prompt = _as_typed(args.prompt)
        try:  # a special token typed into --prompt is a usage error like the others (exit 2)
            check_user_text(args.prompt, "--prompt")
        except PromptError as error:
            predict_parser.error(str(error))
    if args.task == "extract" and not args.schema:
        predict_parser.error("--task extract needs a JSON Schema: add --schema FILE.json")
    if args.schema and args.task != "extract":
        predict_parser.error("--schema is only used with --task extract")
    if not args.constrain and args.task != "extract":
        predict_parser.error("--no-constrain is only used with --task extract")
    if args.engine != "ray" and (args.address or args.replicas):
        predict_parser.error("--address and --replicas are options of --engine ray")
    if args.engine != "ray" and (args.output or "").lower().endswith(".parquet"):
        predict_parser.error("Parquet output (--output NAME.parquet) is written by --engine ray; without it, results are "
                             "JSON lines: use --output NAME.jsonl, or add --engine ray")
    many = len(args.image) > 1 or is_multi_input(args.image[0]) or args.engine == "ray"
    if many and not args.output:
        predict_parser.error("--output FILE is required when --image is a folder, a glob, a PDF, a multi-page TIFF or several "
                             "images, "
                             "and with --engine ray (results are written as JSON lines)")
    lines = many or (args.output is not None and appends_lines(Path(args.output)))
    suffix = Path(args.output or "").suffix.lower()
    if lines and suffix in OTHER_FORMAT_SUFFIXES and not Path(args.output).exists():  # an existing one: checked below
        predict_parser.error(f"results of many images are JSON lines, not {suffix[1:].upper()}: name the file NAME.jsonl "
                             f"(a {suffix} file of JSON lines would be misread by the programs that open {suffix} files)")
    if lines and args.format == "txt":
        predict_parser.error("--format txt is for a single image; many images, and an --output that ends in .jsonl "
                             "or holds earlier results, are always written as JSON lines")
    return lines


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` and return its exit code (``EXIT_CODES``).

    Without ``argv`` (the console script ``phi-helpers``, ``python -m phi_helpers``) it reads ``sys.argv[1:]``,
    and a run stopped by a signal (Ctrl-C, SIGTERM, SIGHUP) ends, after its cleanup and message, by that same
    signal: a shell sees what stopped it (130, 143, 129) and a shell loop around the command stops too. A
    program or test that passes ``argv`` gets the code back instead (128 + the signal's number). argparse's
    usage errors, ``--help`` and ``--version`` raise SystemExit (2, 0, 0), as argparse does.
    """
    _fill_closed_streams()
    _escape_what_stdout_cannot_hold()
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: message + exit code 2 (SystemExit)
    code = run_command(args)
    if argv is None and code in STOPPED_BY:
        _end_by_signal(STOPPED_BY[code])
    return code


STOPPED_BY = {128 + number: number for number in (signal.SIGINT, *STOP_SIGNALS)}  # exit code -> the signal


def run_command(args) -> int:
    """Run the command ``args`` asks for; return the exit code. Every error ends here as one line on stderr."""
    try:
        with terminate_as_interrupt(), _loading_bar_only_on_a_terminal():  # timeout, kill, a closed terminal: as Ctrl-C
            code = run_predict(args) if args.command == "predict" else run_eval_command(args, load=lambda: ModelLoader.of(args)())
        flush_stdout()  # a closed pipe shows here, in the handler below, not at exit (exit code 120)
        return code
    except KeyboardInterrupt as interrupt:
        stopped_by = stopping_signal(interrupt)
        by = "" if stopped_by == signal.SIGINT else f" by {stopped_by.name}"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal that stderr was may be gone
            print(f"error: interrupted{by} ({interrupted_note(args)})", file=sys.stderr, flush=True)
        return 128 + stopped_by
    except BrokenPipeError:  # stdout was closed by its reader (| head): stop quietly, as a shell command would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        return EXIT_READER_GONE
    except Exception as error:  # noqa: BLE001  (one line, never a traceback; PHI_HELPERS_DEBUG=1 shows it)
        if os.environ.get("PHI_HELPERS_DEBUG"):
            raise
        print(terminal_safe(f"error: {error_message(error)}"), file=sys.stderr)
        return EXIT_TRY_LATER if isinstance(error, OutputBusyError) else 1


def _end_by_signal(number: int) -> None:
    """End this process by signal ``number`` with its default action, as a shell expects of a program that a
    signal stopped (POSIX only; elsewhere the exit code says it)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


def _fill_closed_streams() -> None:
    """Standard output or error closed by the caller (``>&-``, ``2>&-``): /dev/null takes the descriptor, so
    that no file this run opens gets number 1 or 2 (what C code, Ray or a child process writes to its
    stdout or stderr would go into that file: into the results). ``sys.stderr`` writes to /dev/null then
    (transformers' import already sees to it); ``sys.stdout`` stays None, as Python leaves a closed stdout:
    an answer or report printed there would be lost, so the commands refuse to print to it (``run_single``,
    ``run_eval_command``)."""
    for number in (1, 2):
        try:
            os.fstat(number)
        except OSError:  # closed
            os.dup2(os.open(os.devnull, os.O_WRONLY), number)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def _escape_what_stdout_cannot_hold() -> None:
    """A standard output whose encoding cannot hold every character (Windows writes cp1252 to a pipe or a file;
    PYTHONIOENCODING=ascii) writes what it cannot hold as JSON's escape (``\\u5408``; ``\\ud83d\\ude00`` for an
    emoji), so that ``--format json`` stays valid JSON: before, printing an answer in Japanese failed after the
    whole run, and the answer was lost. (--output files are UTF-8.)"""
    if not _stdout_is_utf8() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors=JSON_ESCAPES)


def _stdout_is_utf8() -> bool:
    """Whether standard output writes UTF-8 (a closed one counts as UTF-8: nothing is printed to it)."""
    return sys.stdout is None or codecs.lookup(getattr(sys.stdout, "encoding", None) or "ascii").name == "utf-8"


def _json_escapes(error: UnicodeEncodeError) -> tuple[str, int]:
    """The codec error handler ``JSON_ESCAPES``: each character the encoding cannot hold as ``\\uXXXX``, one
    beyond U+FFFF as its UTF-16 surrogate pair, as JSON writes them."""
    units = []
    for char in error.object[error.start : error.end]:
        code = ord(char)
        units += [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)] if code > 0xFFFF else [code]
    return "".join(f"\\u{unit:04x}" for unit in units), error.end


JSON_ESCAPES = "phi_helpers.json_escapes"
codecs.register_error(JSON_ESCAPES, _json_escapes)


@contextlib.contextmanager
def _loading_bar_only_on_a_terminal():
    """transformers' "Loading weights" bar, as ours (``Progress``), only on a terminal: in a log, its carriage
    returns glue its updates onto one line."""
    shown = hf_logging.is_progress_bar_enabled()
    if shown and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def interrupted_note(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    if args.command == "eval":
        return "nothing was written"
    if args.engine == "ray" and (args.output or "").lower().endswith(".parquet"):
        return ("nothing was kept: an interrupted Parquet output is removed (a Parquet run cannot resume); run the "
                "command again to start over, or write to a .jsonl --output, which a re-run goes on from")
    return "everything written so far is kept; run the same command again to go on"


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------


def run_predict(args) -> int:
    """The ``predict`` command: one image -> an answer; many images -> JSON lines."""
    lines = _check_predict_args(args)
    # A broken or unsupported schema, or a special token in --prompt (or the schema), is refused now,
    # before the (slow) model loading.
    schema = read_schema(args.schema, args.constrain) if args.task == "extract" else None
    check_user_text(task_prompt(args.task, args.prompt, schema), "prompt")
    if args.engine == "ray":
        return run_ray(args, schema, model=requested_model_id(args.model))
    if lines:
        return run_batch(args, schema)
    return run_single(args, schema)


def task_options(args, schema) -> dict:
    """Keyword arguments of ``tasks.predict`` taken from the command line."""
    return {"question": args.prompt, "schema": schema, "max_new_tokens": args.max_new_tokens, "constrain": args.constrain}


def run_single(args, schema) -> int:
    """One image: everything is checked before the (slow) model loading; the answer is printed or written."""
    if sys.stdout is None and not args.output:
        raise CommandLineError("Standard output is closed, so the answer would be printed to nowhere: write it to a "
                               "file with --output FILE (or give the command a standard output).")
    (item,) = collect_items(args.image[0])
    image = item.load()  # a missing file, unreadable image or bad URL fails here, before loading the model
    if args.output:
        check_output_path(Path(args.output), inputs=input_files([item], args.schema))
        check_replaceable(Path(args.output))  # not an image or a PDF named by a slip of the tab key
    model, processor = ModelLoader.of(args)()
    result = predict(model, processor, [image], args.task, **task_options(args, schema))[0]
    result = {**item_fields(item), "image_size": list(image.size), **result}
    request = request_fields(args, schema, requested_model_id(args.model))
    record = json_safe(make_record(result, args.task, args.schema, model_info(model, processor), request))

    # JSON printed to a stdout that is not UTF-8 (Windows' cp1252) is ASCII, \u escapes: valid in any encoding
    ascii_only = not args.output and not _stdout_is_utf8()
    text = json.dumps(record, indent=2, ensure_ascii=ascii_only) if args.format == "json" else answer_text(record, ascii_only)
    if args.output:
        write_atomically(Path(args.output), text + "\n")
        print(terminal_safe(f"wrote {args.output}"), file=sys.stderr)
    else:
        print_result(text)
    if record.get("valid") is False:  # the answer is kept (printed or written) and the exit code says it is not usable
        print(f"error: the answer does not follow the schema ({'; '.join(record['errors'])}); "
              f"{schema_advice([record], args.max_new_tokens)}", file=sys.stderr)
        return 1
    return 0


def answer_text(record: dict, ascii_only: bool) -> str:
    """What ``--format txt`` prints: the answer; for extract the JSON (``ascii_only``: with \\u escapes), or
    the last raw answer if none parsed."""
    if record["task"] != "extract":
        return record["answer"]
    if record["answer"] is None:
        return record["raw"][-1]
    return json.dumps(record["answer"], indent=2, ensure_ascii=ascii_only)


def run_batch(args, schema) -> int:
    """Many images: JSON lines appended to --output, batched generation, finished items skipped."""
    items = collect_all(args.image)
    output = Path(args.output)
    check_output_path(output, inputs=input_files(items, args.schema))
    request = request_fields(args, schema, requested_model_id(args.model))
    with OutputLock(output) as lock:  # a second run on the same file stops at once
        todo = resume(output, items, request).todo
        lock.follow()  # resume may have replaced the file (torn lines moved aside): lock the one written now
        if not todo:
            return nothing_left(output, items, args.max_new_tokens)
        failed = _predict_into(output, todo, args, schema, request)
        return max(finish_run(len(todo), failed, output), check_answers(output, items, args.max_new_tokens))


def _predict_into(output: Path, todo: list, args, schema, request: dict) -> int:
    """Load the model, answer ``todo`` in batches, append each record to ``output``; return how many failed."""
    model, processor = ModelLoader.of(args)()
    request = loaded_request(request, requested_model_id(args.model))  # a hub model downloaded or updated just now
    info = model_info(model, processor)
    failed = 0
    with JsonlWriter(output) as writer, Progress(len(todo), args.task) as progress:
        for batch in chunks(todo, args.batch_size):
            for record in predict_items(model, processor, batch, args.task, **task_options(args, schema)):
                record = make_record(record, args.task, args.schema, info, request)
                writer.write(record)
                if "error" in record:
                    failed += 1
                    progress.failed(failure_line(record))
            progress.update(len(batch))
    return failed


if __name__ == "__main__":
    sys.exit(main())
