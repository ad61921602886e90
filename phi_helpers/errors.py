"""Every error phi_helpers raises on bad input: one base class, one subclass per mistake.

Each subclass also derives from the built-in exception a caller would expect (``ValueError``,
``ImportError``, ``TimeoutError``...), so ``except ValueError`` keeps working. Messages say what went
wrong *and* what to do about it.
"""


class PhiHelpersError(Exception):
    """Base class of every error raised by phi_helpers."""


class PromptImageMismatchError(PhiHelpersError, ValueError):
    """The ``<|image_N|>`` tags in a prompt do not match the images passed with it."""


class ImageLoadError(PhiHelpersError, ValueError):
    """An image could not be read: missing file, corrupt or empty data, a failed download..."""


class ImageDownloadTimeout(ImageLoadError, TimeoutError):
    """An image URL did not answer in time."""


class ImageAspectRatioError(PhiHelpersError, ValueError):
    """An image is so wide or tall that the HD transform would shrink one side to nothing."""


class ContextLengthError(PhiHelpersError, ValueError):
    """Prompt (text + image tokens) plus the tokens to generate exceed the model's context."""


class FlashAttentionUnavailableError(PhiHelpersError, ImportError):
    """``flash_attention_2`` was requested but flash-attn (or a CUDA GPU) is not available."""


class JSONExtractionError(PhiHelpersError, ValueError):
    """No JSON object could be parsed from a model answer. ``.text`` keeps the raw answer."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text


class DeviceUnavailableError(PhiHelpersError, RuntimeError):
    """The device asked for (``"cuda"``, ``"mps"``...) is not available on this machine."""


class ModelLoadError(PhiHelpersError, OSError):
    """The checkpoint could not be found, downloaded or read (wrong model id or path, no connection...)."""


class CommandLineError(PhiHelpersError, ValueError):
    """What the command line asks for cannot be done (an unwritable --output...): exit code 1."""


class MRZError(PhiHelpersError, ValueError):
    """A machine-readable zone, or a field meant for one, is malformed."""


class QuantizationUnavailableError(PhiHelpersError, RuntimeError):
    """The ``quantize=`` asked for cannot run on this device (e.g. int4 on CPU, anything on Apple MPS)."""


class QuantizationBackendMissingError(QuantizationUnavailableError, ImportError):
    """The library that does the quantization (torchao or bitsandbytes) is not installed."""
