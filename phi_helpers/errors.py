"""Every error phi_helpers raises on bad input: one base class, one subclass per mistake.

Each subclass also derives from the built-in exception a caller would expect (``ValueError``,
``ImportError``, ``TimeoutError``...), so ``except ValueError`` keeps working. Messages say what went
wrong *and* what to do about it. This is the lowest layer of the package: it imports nothing from it.

``check_whole_number`` is the one check for counts (``num_crops``, ``max_new_tokens``, ``num_images``...)
so that every layer refuses ``0``, ``1.5``, ``"2"`` or ``True`` with the same words (and takes numpy's
and torch's integers, which computed counts often are).
"""

import codecs
import numbers
import operator
from pathlib import Path


class PhiHelpersError(Exception):
    """Base class of every error raised by phi_helpers."""


class InvalidArgumentError(PhiHelpersError, ValueError):
    """An argument has a value phi_helpers cannot use: a count below its minimum, an unknown name..."""


class PromptError(PhiHelpersError, ValueError):
    """A question, chat turn or system message cannot be used: not a string, empty, or not the model's turn."""


class SpecialTokenError(PromptError):
    """Text typed by a user contains a special token (``<|end|>``, ``<|user|>``, ``<|image_1|>``...).

    The prompt is one string: once a typed ``<|end|>`` is inside it, the tokenizer cannot tell it from
    the real end of a turn, so phi_helpers refuses such text instead of letting it steer the model.
    """


class PromptImageMismatchError(PhiHelpersError, ValueError):
    """The ``<|image_N|>`` tags in a prompt do not match the images passed with it."""


class ImageLoadError(PhiHelpersError, ValueError):
    """An image could not be read: missing file, corrupt or empty data, a failed download..."""


class ImageDownloadTimeout(ImageLoadError, TimeoutError):
    """An image URL did not answer in time."""


class ImageAspectRatioError(PhiHelpersError, ValueError):
    """An image is so wide or tall that the HD transform would shrink one side to nothing."""


class ContextLengthError(PhiHelpersError, ValueError):
    """Prompt (text + image tokens) plus the tokens to generate exceed the model's context. ``facts``: the
    message's numbers without its advice, for a caller whose advice differs (the command line's options)."""

    def __init__(self, message: str, facts: str | None = None):
        super().__init__(message)
        self.facts = facts


class ConfigurationError(PhiHelpersError, ValueError):
    """A model configuration (config.json) describes something this implementation does not define."""


class FlashAttentionUnavailableError(PhiHelpersError, ImportError):
    """``flash_attention_2`` was requested but flash-attn (or a CUDA GPU) is not available."""


class MissingDependencyError(PhiHelpersError, ImportError):
    """An optional package is not installed; the message says what to ``pip install``."""


class _AboutAnAnswer(PhiHelpersError, ValueError):
    """An error about a model answer, which ``.text`` keeps."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text

    def __reduce__(self):  # pickle (a process pool, Ray) rebuilds it with both arguments, then its attributes
        return type(self), (self.args[0], self.text), self.__dict__


class JSONExtractionError(_AboutAnAnswer):
    """No JSON object could be parsed from a model answer. ``.text`` keeps the raw answer."""


class SchemaError(PhiHelpersError, ValueError):
    """A JSON Schema cannot be used: missing, unreadable, not JSON, not a valid schema, a ``$ref`` that
    leaves the schema (other files and URLs are never fetched), or a recursive ``$ref``."""


class DeviceUnavailableError(PhiHelpersError, RuntimeError):
    """The device asked for (``"cuda"``, ``"mps"``...) is not available on this machine."""


class ModelLoadError(PhiHelpersError, OSError):
    """The checkpoint could not be found, downloaded or read (wrong model id or path, no connection...)."""


class CommandLineError(PhiHelpersError, ValueError):
    """What the command line asks for cannot be done (an unwritable --output...): exit code 1."""


class ManifestError(CommandLineError):
    """An evaluation set's manifest.jsonl is missing, empty, has a malformed line, or names a file outside
    its folder (the message names the line)."""


class OutputBusyError(CommandLineError):
    """Another run holds the lock on the output (``OutputLock``): try again later (the command line's exit
    code 75, EX_TEMPFAIL, so that a scheduler can tell "busy" from "failed")."""


class MRZError(PhiHelpersError, ValueError):
    """A machine-readable zone, or a field meant for one, is malformed."""


class RayNotInstalledError(MissingDependencyError):
    """``--engine ray`` / ``predict_dataset`` need Ray Data, an optional extra (``phi_helpers.cli.ray_engine.INSTALL_RAY`` says how to install it)."""


class SchemaNotSupportedError(SchemaError):
    """A JSON Schema uses a feature that constrained decoding cannot enforce (refused before generating)."""


class JSONTruncatedError(_AboutAnAnswer):
    """A constrained answer ran out of ``max_new_tokens`` before its JSON was complete. ``.text`` keeps it."""


class QuantizationUnavailableError(PhiHelpersError, RuntimeError):
    """The ``quantize=`` asked for cannot run on this device (e.g. int4 on CPU, anything on Apple MPS)."""


class QuantizationBackendMissingError(QuantizationUnavailableError, ImportError):
    """The library that does the quantization (torchao or bitsandbytes) is not installed."""


def check_whole_number(value, name: str, minimum: int = 0, hint: str = "") -> int:
    """Return ``value`` as an ``int`` if it is a whole number (not a bool) >= ``minimum``: a Python,
    numpy or torch integer; else raise InvalidArgumentError.

    >>> check_whole_number(4, "num_crops", minimum=1)
    4
    """
    whole = not isinstance(value, bool) and (isinstance(value, numbers.Integral) or _is_integer_tensor(value))
    number = operator.index(value) if whole else None
    if number is None or number < minimum:
        raise InvalidArgumentError(f"{name} must be a whole number of at least {minimum}{hint}, got {value!r}.")
    return number


def _is_integer_tensor(value) -> bool:
    """A one-number integer tensor (``torch.tensor(8)``), which ``operator.index`` reads as that number."""
    return (type(value).__name__ == "Tensor" and value.ndim == 0 and str(value.dtype) != "torch.bool"
            and not value.is_floating_point() and not value.is_complex())


# Byte order marks of other encodings a Windows editor may save text in
# (UTF-32's first: its FF FE 00 00 starts with UTF-16's FF FE)
OTHER_ENCODINGS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                   (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def refuse_other_encodings(data: bytes, name: str, error: type = InvalidArgumentError) -> None:
    """Raise ``error`` for the bytes of a text file ``name`` that a byte order mark says are UTF-16 or UTF-32,
    saying how to save it as UTF-8."""
    for bom, encoding in OTHER_ENCODINGS:
        if data.startswith(bom):
            raise error(f"{name} is saved as {encoding}; save it as UTF-8 (e.g. in your editor's Save As, or "
                        f"iconv -f {encoding} -t UTF-8).")


def utf8_text(data: bytes, name: str, error: type = InvalidArgumentError) -> str:
    """``data``, the bytes of the text file ``name`` (how messages call it): UTF-8, with or without a byte order mark (some Windows
    editors write one). A file saved as UTF-16 or UTF-32 (its byte order mark says so), or in another encoding
    (the line of the first byte that is not UTF-8 is named), raises ``error`` saying how to save it as UTF-8."""
    refuse_other_encodings(data, name, error)
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = data.count(b"\n", 0, problem.start) + 1
        raise error(f"{name} is not UTF-8 text (line {line} has the byte 0x{data[problem.start]:02x}); save it as "
                    "UTF-8 (e.g. in your editor's Save As, or iconv -f LATIN1 -t UTF-8 for Western European text).") from None


def expand_home(path, what: str, error: type = InvalidArgumentError) -> Path:
    """``Path(path)`` with a leading ``~`` / ``~user`` replaced by that home folder, as the shell does.

    A ``~name`` whose user does not exist (a shell leaves ``~nouser/x.png`` as it is, so a typo for ``~/``
    reaches the program literally) raises ``error`` naming ``what``,
    instead of pathlib's bare RuntimeError.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = str(path).split("/", 1)[0]
        raise error(
            f"Cannot find the home folder of {head!r} in the {what} {str(path)!r}: there is no user "
            f"{head[1:]!r} on this machine. Write ~/ for your own home folder, or the full path."
        ) from None
