"""Tiny random checkpoints in the official on-disk layout, for tests and offline dry runs.

    from phi_helpers.testing import make_tiny_checkpoint
    path = make_tiny_checkpoint("/tmp/tiny", variant="phi-3.5-vision", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)   # the very code path of the real model

The directory holds what the hub repository holds: config.json (the real one, traps included: legacy
"su" RoPE, "_attn_implementation": "flash_attention_2", auto_map), model.safetensors with the official
key names, preprocessor_config.json (and Phi-3.5's processor_config.json and generation_config.json;
Phi-3-vision's repo has neither) and the real Phi-3 tokenizer files. Only the sizes are small: a 2-layer language model of width 192
(head_dim 96, so the real 48 RoPE factors fit) and a 3-layer CLIP of width 32 at the real 336 px /
patch 14. Its answers are random.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InvalidArgumentError
from ..models.phi3_v.configuration_phi3_v import Phi3VConfig
from ..models.phi3_v.modeling_phi3_v import Phi3VForCausalLM
from ..models.phi3_v.processing_phi3_v import VENDORED_CHECKPOINT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VARIANTS = ("phi-3-vision", "phi-3.5-vision")

TINY_SIZES = dict(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)


def tiny_config_dict(variant: str = "phi-3.5-vision") -> dict:
    """The real config.json with tiny sizes; Phi-3.5-vision's differences applied for that variant.

    Phi-3.5-vision's own RoPE factor lists are not vendored; both variants use Phi-3-vision's lists
    (with random weights the values do not matter, the code path is the same).
    """
    if variant not in VARIANTS:
        raise InvalidArgumentError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    config = json.loads((VENDORED_CHECKPOINT / "config.json").read_text())
    config.update(TINY_SIZES)
    config["vision_config"] = dict(TINY_VISION)
    config["img_processor"] = {**config["img_processor"], "image_dim_out": TINY_VISION["hidden_size"]}
    if variant == "phi-3.5-vision":
        config.update(
            _name_or_path="Phi-3.5-vision-instruct", sliding_window=262144, embd_pdrop=0.0, resid_pdrop=0.0, pad_token_id=32000
        )
    return config


def _random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, independent of transformers' initialisers: norms 1, the rest scaled so that
    activations keep their size and greedy decoding has clear winners."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name:
            value = torch.ones(tensor.shape)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        elif tensor.ndim >= 2 and "embed" not in name:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
        else:  # embeddings, class embedding, separators
            value = torch.randn(tensor.shape, generator=generator)
        weights[name] = value.to(torch.bfloat16).contiguous()
    return weights


def make_tiny_checkpoint(path, variant: str = "phi-3.5-vision", seed: int = 0) -> Path:
    """Write a tiny random Phi-3(.5)-vision checkpoint to ``path`` and return it as a Path.

    Deterministic: the same variant and seed give the same files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config_dict(variant)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    model = Phi3VForCausalLM(Phi3VConfig(**json.loads(json.dumps(config))))
    save_file(_random_weights(model, seed), str(path / "model.safetensors"), metadata={"format": "pt"})

    preprocessor = json.loads((VENDORED_CHECKPOINT / "preprocessor_config.json").read_text())
    if variant == "phi-3.5-vision":
        preprocessor.update(num_crops=4, do_convert_rgb=True)
        preprocessor["auto_map"]["AutoImageProcessor"] = "processing_phi3_v.Phi3VImageProcessor"
        # The hub repo also ships a processor_config.json pointing at remote code, and a
        # generation_config.json; Phi-3-vision's repo has neither (spec §1.2).
        processor = {"auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}, "processor_class": "Phi3VProcessor"}
        generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}
        (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(VENDORED_CHECKPOINT / name, path / name)
    return path


__all__ = ["make_tiny_checkpoint", "tiny_config_dict", "VARIANTS"]
