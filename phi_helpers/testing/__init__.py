"""Test support: tiny random checkpoints in the official layout (for tests and offline dry runs)."""

from .checkpoints import FIXTURES, VARIANTS, make_tiny_checkpoint, tiny_config_dict

__all__ = ["FIXTURES", "VARIANTS", "make_tiny_checkpoint", "tiny_config_dict"]
