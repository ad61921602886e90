"""Phi3VConfig refuses a config.json whose sizes contradict each other, before any model is built."""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from phi_helpers.errors import ConfigurationError
from phi_helpers.models.phi3_v import Phi3VConfig
from phi_helpers.testing import tiny_config_dict


@pytest.mark.parametrize(
    "sizes, head_dim",
    [({"num_attention_heads": 4, "num_key_value_heads": 4}, 48), ({"hidden_size": 96}, 48), ({"hidden_size": 384}, 192)],
)
def test_rope_factor_lists_must_match_the_head_size(sizes, head_dim):
    """The LongRoPE lists hold one factor per pair of rotated dimensions (48 for head_dim 96). transformers
    only logs another count, then fails while building the model with a tensor broadcasting RuntimeError."""
    with pytest.raises(ConfigurationError) as info:
        Phi3VConfig(**{**tiny_config_dict(), **sizes})
    message = str(info.value)
    assert f"config.json's rope_scaling long_factor has 48 entries, but head_dim/2 is {head_dim // 2}" in message
    assert f"= head_dim {head_dim}): the config does not belong to these weights" in message
    assert isinstance(info.value, ValueError)


def test_the_shipped_and_tiny_configs_pass():
    Phi3VConfig(**tiny_config_dict())
    Phi3VConfig(**tiny_config_dict("phi-3-vision"))


def test_from_pretrained_raises_it_too(tiny_checkpoint, tmp_path):
    """The model card's own call gets the same error (not a RuntimeError from the RoPE code)."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "num_key_value_heads": 4}))
    with pytest.raises(ConfigurationError, match="head_dim/2 is 24"):
        AutoModelForCausalLM.from_pretrained(folder)
