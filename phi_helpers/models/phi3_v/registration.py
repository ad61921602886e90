"""Register the native Phi-3-vision classes with transformers' Auto classes (model_type "phi3_v").

Runs on `import phi_helpers`. Afterwards the official checkpoints load with the standard calls and
no prompt, whatever trust_remote_code says: registered local classes win and no remote code is fetched.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .configuration_phi3_v import Phi3VConfig
from .image_processing_phi3_v import Phi3VImageProcessor
from .modeling_phi3_v import Phi3VForCausalLM
from .processing_phi3_v import Phi3VProcessor

AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor}, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
AutoTokenizer.register(Phi3VConfig, tokenizer_class=TokenizersBackend, exist_ok=True)
