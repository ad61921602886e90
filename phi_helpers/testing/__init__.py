"""Test support: tiny random checkpoints in the official layout (for tests and offline dry runs).

``FIXTURES`` is the folder of the vendored Phi-3-vision-128k-instruct files (config.json, tokenizer) the
tiny checkpoints start from: the name the tests and benchmarks use for
``phi_helpers.models.phi3_v.processing_phi3_v.VENDORED_CHECKPOINT``.
"""

from ..models.phi3_v.processing_phi3_v import VENDORED_CHECKPOINT as FIXTURES
from .checkpoints import VARIANTS, make_tiny_checkpoint, tiny_config_dict

__all__ = ["FIXTURES", "VARIANTS", "make_tiny_checkpoint", "tiny_config_dict"]
