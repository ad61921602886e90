"""phi_helpers: run Phi-3-vision and Phi-3.5-vision on current transformers, no trust_remote_code.

    from phi_helpers import load_model, load_image, ask
    model, processor = load_model()                 # device, dtype and attention picked for you
    image = load_image("notebooks/images/chart.png")  # a path (in the repository), URL, bytes or PIL image
    print(ask(model, processor, "Describe this chart.", images=[image]))

The whole public API:
    load_model(model_id, device, dtype, attn, num_crops, quantize) -> (model, processor)
    load_image(src) -> PIL.Image                    path / http(s) or data: URL / bytes / PIL / numpy
    build_prompt(question, num_images, system, processor)   chat-template prompt with <|image_N|> tags
    Chat                                            multi-turn conversation with images
    ask(model, processor, prompt_or_chat, images, max_new_tokens, stream, schema, **generate_kwargs) -> str
    extract(model, processor, prompt_or_chat, schema, images, ...) -> dict   JSON that always follows schema
    extract_json(text) -> dict | list               JSON object inside a model answer
    load_schema(path) -> dict                       a JSON Schema file, checked, for ask/extract(schema=)
    environment_report() -> dict                    versions, devices, flash-attn, does the model fit
    PhiHelpersError and its subclasses: every error says what to do. All live in phi_helpers.errors; the
        common ones import from phi_helpers too: PromptError (and its SpecialTokenError), ContextLengthError,
        PromptImageMismatchError, ImageLoadError (and its ImageDownloadTimeout), ImageAspectRatioError,
        SchemaError (and its SchemaNotSupportedError), JSONExtractionError, JSONTruncatedError,
        InvalidArgumentError, and those of load_model (ModelLoadError, ConfigurationError,
        DeviceUnavailableError, FlashAttentionUnavailableError, QuantizationUnavailableError and its
        subclass QuantizationBackendMissingError)

Special tokens (<|end|>, <|user|>, <|image_1|>...) typed into a question or chat turn are refused with
SpecialTokenError; a prompt you write in the chat format yourself (starting with <|user|>) is used as is.

Environment variable PHI_HELPERS_MODEL is the model load_model() loads when no model id is passed (a hub
id, a local path, or `tiny` for a small random checkpoint used by tests and offline dry runs).

Importing this package registers the native Phi-3-vision classes (model_type "phi3_v") with AutoConfig,
AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, AutoImageProcessor and AutoProcessor.
More: docs/native-implementation.md.

Layers, each importing only from those below it: errors < models (phi3_v) < testing < api < tutorial < cli.
More in the modules: phi_helpers.api.generation (stream_chunks; generate_batch: many prompts in one
batch), .api.structured, .api.metrics, .api.quantization, .cli.ray_engine (predict_dataset),
.tutorial.widgets (chat_box), .tutorial.profiling, .tutorial.mrz; `phi-helpers --help`.
"""

import logging

# transformers imports torchao whenever it is installed (the extra "quantize"), and torchao then logs that
# its CUDA-only kernels cannot load (on machines without them) and makes torch warn about a deprecated
# call. Harmless, but it would fill the stderr of every notebook and command: only these two loggers are
# quieted, to errors.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)
del logging, _logger  # not part of the package's namespace

from .models import phi3_v  # noqa: E402  (registers the Auto classes on import)
from .errors import (
    ConfigurationError,
    ContextLengthError,
    DeviceUnavailableError,
    FlashAttentionUnavailableError,
    ImageAspectRatioError,
    ImageDownloadTimeout,
    ImageLoadError,
    InvalidArgumentError,
    JSONExtractionError,
    JSONTruncatedError,
    ModelLoadError,
    PhiHelpersError,
    PromptError,
    PromptImageMismatchError,
    QuantizationBackendMissingError,
    QuantizationUnavailableError,
    SchemaError,
    SchemaNotSupportedError,
    SpecialTokenError,
)
from .api.generation import ask, extract
from .api.images import load_image
from .api.loading import load_model
from .api.parsing import extract_json
from .api.prompts import Chat, build_prompt
from .api.report import environment_report
from .api.structured import load_schema

del phi3_v  # phi_helpers.models.phi3_v stays importable; help(phi_helpers) lists the package, not an alias

# No __all__ on purpose: with one, help(phi_helpers) would print the full documentation of every
# name in it (several screens). The module docstring above lists the public API; help(ask) etc. tell more.
# So `from phi_helpers import *` gives those names and the package's own modules (api, errors, models,
# testing, versions), nothing else.
