"""The model card's own loading calls work after `import phi_helpers` (accelerate is a dependency), and
load_model puts the weights straight onto the device with device_map."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import phi_helpers  # noqa: F401  (registers the native classes, as in the notebooks)
from phi_helpers import FlashAttentionUnavailableError, load_model


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_the_model_cards_call(tiny_checkpoint, device_map):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, device_map=device_map, torch_dtype="auto", trust_remote_code=True
    )
    assert type(model).__module__.startswith("phi_helpers.")  # the native class, no remote code
    assert model.device.type == "cpu"
    assert model.dtype == torch.bfloat16  # "auto": the checkpoint's dtype
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())


def test_flash_attention_without_flash_attn_is_still_our_error(tiny_checkpoint):
    with pytest.raises(FlashAttentionUnavailableError, match="sdpa"):
        AutoModelForCausalLM.from_pretrained(
            tiny_checkpoint, device_map="cpu", torch_dtype="auto", trust_remote_code=True,
            _attn_implementation="flash_attention_2",
        )


def test_load_model_loads_straight_onto_the_device(monkeypatch, tiny_checkpoint):
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail("no copy after loading"))
    model, _ = load_model(str(tiny_checkpoint), device="cpu", dtype="bf16")
    assert seen[0]["device_map"] == "cpu" and seen[0]["dtype"] == torch.bfloat16
    assert model.dtype == torch.bfloat16 and not model.training


def test_image_prompts_run_with_the_vision_weights_offloaded(tiny_checkpoint, tmp_path):
    """accelerate offloads what does not fit (here: the vision tower and projection, to disk). Before: an image prompt
    failed with "Cannot copy out of meta tensor" (the image features were sent to the projection's
    not-yet-loaded 'meta' device)."""
    from PIL import Image

    from phi_helpers import ask
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    image = Image.new("RGB", (672, 448), (200, 120, 40))
    on_disk = {"model.vision_embed_tokens": "disk", "model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map=on_disk, offload_folder=tmp_path, dtype="auto")
    assert any(p.device.type == "meta" for p in offloaded.model.vision_embed_tokens.parameters())  # offloaded
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map="cpu", dtype="auto")
    expected = ask(in_memory, processor, "Describe.", image, max_new_tokens=6)
    assert ask(offloaded, processor, "Describe.", image, max_new_tokens=6) == expected
