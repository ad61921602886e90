"""Phi-3-vision / Phi-3.5-vision (model_type "phi3_v") as a transformers model folder.

configuration_phi3_v, image_processing_phi3_v, processing_phi3_v and modeling_phi3_v follow the layout
of transformers' own ``models/<name>/`` folders; importing this package registers them with the Auto
classes (registration.py), so the official checkpoints load with the standard calls.
"""

from . import registration  # noqa: F401  (registers the Auto classes on import)
from .configuration_phi3_v import Phi3VConfig
from .image_processing_phi3_v import Phi3VImageProcessor
from .modeling_phi3_v import Phi3VForCausalLM, Phi3VModel
from .processing_phi3_v import Phi3VProcessor

__all__ = ["Phi3VConfig", "Phi3VImageProcessor", "Phi3VProcessor", "Phi3VForCausalLM", "Phi3VModel"]
