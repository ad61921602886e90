"""The native model on tiny checkpoints loaded through the Auto classes (the real model's code path)."""

import copy
import json
import math
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, TextIteratorStreamer, pipeline

import phi_helpers  # noqa: F401  (registers the Auto classes)
from phi_helpers import FlashAttentionUnavailableError, PromptImageMismatchError
from phi_helpers.errors import InvalidArgumentError
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.models.phi3_v.modeling_phi3_v import Phi3VForCausalLM
from phi_helpers.testing import FIXTURES, make_tiny_checkpoint

PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
TWO_IMAGES = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n"

# torch 2.13 CPU: the first call of a transcendental op can be off by ~1e-4 (transformers5-notes.md)
for op in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.log, torch.erf):
    op(torch.linspace(0.1, 1, 64))


def picture(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def greedy_without_cache(model, inputs, steps, logits_processor=None):
    """Reference decoding: a full forward over the whole sequence at every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        logits = model(
            input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], use_cache=False
        ).logits[:, -1]
        if logits_processor is not None:
            logits = logits_processor(ids, logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


# --- configuration and weights -------------------------------------------------------------------


def test_real_config_builds_the_592_official_tensors():
    config = AutoConfig.from_pretrained(FIXTURES)
    index = json.loads((FIXTURES / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert set(shapes) == set(index)
    assert len(shapes) == 592
    assert sum(math.prod(s) for s in shapes.values()) == 4_146_621_440  # total_size 8,293,242,880 B / 2
    assert shapes["model.vision_embed_tokens.sub_GN"] == (1, 1, 1, 4096)
    assert shapes["model.vision_embed_tokens.glb_GN"] == (1, 1, 4096)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (9216, 3072)


def test_real_config_traps():
    config = AutoConfig.from_pretrained(FIXTURES)
    assert isinstance(config, Phi3VConfig)
    assert config._attn_implementation is None  # the stored "flash_attention_2" does not force flash-attn
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    real = json.loads((FIXTURES / "config.json").read_text())["rope_scaling"]
    assert rope["short_factor"] == real["short_factor"] and rope["long_factor"] == real["long_factor"]
    assert rope["original_max_position_embeddings"] == 4096
    assert config.vision_config.num_hidden_layers == 24 and config.vision_config.image_size == 336
    assert config.reset_cache_at_original_max is False  # Phi-3-vision keeps its cache past 4096


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(embd_layer="default"), "must be a dict"),
        (dict(embd_layer={"use_hd_transform": False}), "use_hd_transform"),
        (dict(embd_layer={"with_learnable_separator": False}), "with_learnable_separator"),
        (dict(embd_layer={"projection_cls": "linear"}), "projection_cls"),
        (dict(img_processor={"model_name": "openai/clip-vit-base-patch32"}), "model_name"),
        (dict(img_processor={"type_feature": "cls_patch"}), "type_feature'\\] is 'cls_patch'"),
    ],
)
def test_configs_of_image_embeddings_the_checkpoints_do_not_use_are_refused(change, message):
    """The original asserts these (or builds other modules); here they are typed errors, never ignored."""
    from phi_helpers.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        Phi3VConfig(**change)


@pytest.mark.parametrize("trust", [None, False, True])
def test_auto_classes_load_without_remote_code(tiny_checkpoint, trust):
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    model, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True, **kwargs)
    assert type(model) is Phi3VForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16  # dtype="auto" is transformers 5's default: the stored bf16
    assert model.config._attn_implementation == "sdpa"  # best available without flash-attn
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=2, **kwargs)
    assert type(processor).__name__ == "Phi3VProcessor" and processor.image_processor.num_crops == 2


def test_auto_tokenizer_reproduces_the_reference_ids(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    # transformers 5's LlamaTokenizer would drop the 29871 ("▁") before "\n"
    assert tokenizer("<|user|>\n").input_ids == [1, 32010, 29871, 13]


def test_weights_load_bit_equal_with_official_names(tiny_checkpoint, model):
    stored = load_file(tiny_checkpoint / "model.safetensors")
    state = model.state_dict()
    assert set(stored) == set(state)
    assert any(name.startswith("model.vision_embed_tokens.img_processor.vision_model.") for name in stored)
    assert all(torch.equal(stored[name].float(), state[name]) for name in stored)


def test_flash_attention_request_without_flash_attn(tiny_checkpoint):
    with pytest.raises(FlashAttentionUnavailableError, match="sdpa"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")


# --- numerics ------------------------------------------------------------------------------------


def test_longrope_switch_and_attention_factor(model):
    rotary = model.model.rotary_emb
    theta, dim = 10000.0, 96
    rope = model.config.rope_parameters
    x = torch.zeros(1, 1, dtype=torch.float32)
    scale = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert scale == pytest.approx(1.1902380714)
    for last, factors in ((4095, rope["short_factor"]), (4096, rope["long_factor"])):
        cos, _ = rotary(x, torch.tensor([[0, last]]))
        k = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (torch.tensor(factors) * theta**k)
        expected = torch.cos(last * inv_freq) * scale
        assert torch.allclose(cos[0, 1, :48], expected, atol=1e-5), f"position {last}"


def test_longrope_gives_phi3s_numbers_without_changing_the_module(model):
    """Phi3's rotary module picks the factors by overwriting its inv_freq buffer, so threads sharing a
    model raced (a long prompt in one thread rotated a short one in another with the long factors).
    Ours gives the same cos/sin bit for bit and leaves every buffer as it was."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    ours, phi3 = model.model.rotary_emb, Phi3RotaryEmbedding(model.config)
    before = {name: buffer.clone() for name, buffer in ours.named_buffers()}
    x = torch.zeros(1, dtype=torch.float32)
    for positions in (torch.arange(12)[None], torch.tensor([[0, 4095]]), torch.tensor([[0, 4096]]), torch.arange(8200).view(2, 4100)):
        for got, expected in zip(ours(x, positions), phi3(x, positions)):
            assert torch.equal(got, expected)
        assert all(torch.equal(buffer, before[name]) for name, buffer in ours.named_buffers())
    # model.to(torch.bfloat16) rounds Phi3's factor buffers; the original computes them in float32, as ours does
    from phi_helpers.models.phi3_v.modeling_phi3_v import Phi3VRotaryEmbedding

    halved, x = Phi3VRotaryEmbedding(model.config).to(torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    for positions in (torch.arange(12)[None], torch.arange(8200).view(2, 4100)):
        assert all(torch.equal(a, b) for a, b in zip(halved(x, positions), phi3(x, positions)))


def test_sdpa_and_eager_agree_in_language_model_and_vision_tower(tiny_checkpoint, processor):
    inputs = processor(TWO_IMAGES, [picture(500, 400, 1), picture(300, 600, 2)])
    logits = {}
    for attn in ("sdpa", "eager"):
        both_parts = {"": attn, "vision_config": attn}  # a plain "eager" would keep SDPA in the vision tower
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, attn_implementation=both_parts)
        assert model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == attn
        with torch.no_grad():
            logits[attn] = model(**inputs).logits
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("requested", "language", "vision"),
    [
        (None, "sdpa", "sdpa"),
        ("eager", "eager", "sdpa"),  # eager CLIP gives the same numbers as SDPA, only slower
        ("sdpa", "sdpa", "sdpa"),
        ({"": "eager", "vision_config": "eager"}, "eager", "eager"),
        ({"": "sdpa", "vision_config": "eager"}, "sdpa", "eager"),
    ],
)
def test_attention_of_language_model_and_vision_tower(tiny_checkpoint, requested, language, vision):
    kwargs = {} if requested is None else {"attn_implementation": requested}
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, **kwargs)
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    assert (model.config._attn_implementation, clip.config._attn_implementation) == (language, vision)
    model.set_attn_implementation("eager")  # after loading: the same rule
    assert (model.config._attn_implementation, clip.config._attn_implementation) == ("eager", "sdpa")
    model.set_attn_implementation({"vision_config": "eager"})
    assert (model.config._attn_implementation, clip.config._attn_implementation) == ("eager", "eager")


def test_last_clip_layer_is_loaded_but_not_run(tiny_checkpoint, processor):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
    ran = []
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**processor(PROMPT, picture(400, 300, 5)))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == list(range(len(layers) - 1))  # the penultimate layer's output is the image feature


def test_image_features_follow_the_hd_layout_of_the_spec(model, processor):
    """Re-derive the image embedding by index arithmetic (spec §3 steps 3-7) and compare."""
    embedding = model.model.vision_embed_tokens
    inputs = processor(PROMPT, picture(640, 480, 3))  # 2x2 tiles at num_crops=4
    with torch.no_grad():
        features = embedding.clip_features(inputs["pixel_values"])[0]  # (5, 576, C)
        got = embedding(inputs["pixel_values"], inputs["image_sizes"])
        vectors = []

        def cell(tile, i, j):  # patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) of a 24x24 grid
            return torch.cat([tile[(2 * i + di) * 24 + 2 * j + dj] for di in (0, 1) for dj in (0, 1)])

        for row in range(2 * 12):
            for col in range(2 * 12):
                tile = features[1 + (row // 12) * 2 + col // 12]
                vectors.append(cell(tile, row % 12, col % 12))
            vectors.append(embedding.sub_GN.flatten())
        vectors.append(embedding.glb_GN.flatten())
        for i in range(12):
            vectors += [cell(features[0], i, j) for j in range(12)] + [embedding.sub_GN.flatten()]
        expected = embedding.img_projection(torch.stack(vectors))
    assert got.shape == (757, model.config.hidden_size)
    assert torch.allclose(got, expected, atol=1e-5)


def test_clip_features_are_the_penultimate_layer_without_cls(model):
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    pixels = torch.randn(1, 1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = clip.pre_layrnorm(clip.embeddings(pixels[0]))
        for layer in clip.encoder.layers[:-1]:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        got = model.model.vision_embed_tokens.clip_features(pixels)
    assert torch.allclose(got[0, 0], hidden[0, 1:], atol=1e-5)


def test_images_land_in_prompt_order(model, processor):
    a, b = picture(336, 336, 10), picture(672, 336, 11)
    embed = model.model.embed
    with torch.no_grad():
        both = processor(TWO_IMAGES, [a, b])
        mixed = embed(both["input_ids"], both["pixel_values"], both["image_sizes"])
        only_a, only_b = processor(PROMPT, a), processor(PROMPT, b)
        alone_a = model.model.vision_embed_tokens(only_a["pixel_values"], only_a["image_sizes"])
        alone_b = model.model.vision_embed_tokens(only_b["pixel_values"], only_b["image_sizes"])
    positions = (both["input_ids"][0] == 32044).nonzero().flatten()
    assert len(positions) == len(alone_a) + len(alone_b)
    assert torch.allclose(mixed[0, positions[: len(alone_a)]], alone_a, atol=1e-5)
    assert torch.allclose(mixed[0, positions[len(alone_a) :]], alone_b, atol=1e-5)


def test_negative_image_ids_work_and_input_ids_are_not_modified(model, processor):
    inputs = processor(PROMPT, picture(400, 300, 4))
    negative = inputs["input_ids"].clone()
    negative[negative == 32044] = -1  # the original processor's marking
    kept = negative.clone()
    with torch.no_grad():
        expected = model(**inputs).logits
        got = model(input_ids=negative, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
        sizes_as_list = model(**{**inputs, "image_sizes": inputs["image_sizes"].tolist()}).logits  # the original iterates
    assert torch.equal(negative, kept)  # no in-place clamp (the original P3V modified the caller's tensor)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(sizes_as_list, expected)


def test_pixel_values_on_a_decoding_step_are_ignored_like_the_original(model, processor):
    """The original passes pixel_values on every decoding step; a step without image ids does not run
    CLIP. (On a first step, pixel_values without image ids are refused: tests/test_model_inputs.py.)"""
    inputs = processor(PROMPT, picture(400, 300, 6))
    with torch.no_grad():
        cache = model(**inputs).cache
    step = torch.tensor([[450]])
    calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            with_pixels = model(input_ids=step, cache=copy.deepcopy(cache), pixel_values=inputs["pixel_values"],
                                image_sizes=inputs["image_sizes"]).logits
            without = model(input_ids=step, cache=copy.deepcopy(cache)).logits
    finally:
        hook.remove()
    assert torch.equal(with_pixels, without) and not calls


def test_mismatched_image_positions_are_a_clear_error(model, processor):
    inputs = processor(PROMPT, picture(400, 300, 5))
    with pytest.raises(PromptImageMismatchError, match="same processor call"):
        model(input_ids=inputs["input_ids"][:, 10:], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(PromptImageMismatchError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])


# --- generation ----------------------------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_refused_like_the_original(model):
    """The original embeds them and fails (IndexError); a clamp to the last row would answer something."""
    vocab = model.config.vocab_size
    with pytest.raises(InvalidArgumentError, match=f"token id {vocab}, beyond the model's vocabulary of {vocab} ids"):
        model(input_ids=torch.tensor([[1, 5, vocab]]))
    model(input_ids=torch.tensor([[1, 5, vocab - 1]]))


def test_cached_generate_equals_greedy_recomputation(model, processor):
    inputs = processor(PROMPT, picture(500, 300, 6))
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(out, greedy_without_cache(model, inputs, 8))


def test_batch_equals_one_at_a_time(model, processor):
    prompts = [PROMPT, TWO_IMAGES, "<|user|>\n<|image_1|>\nA much longer question about the picture?<|end|>\n<|assistant|>\n"]
    images = [[picture(400, 300, 7)], [picture(336, 336, 8), picture(300, 700, 9)], [picture(900, 200, 12)]]
    batch = processor(prompts, images)
    together = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    for row, (prompt, group) in enumerate(zip(prompts, images)):
        single = processor(prompt, group)
        alone = model.generate(**single, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist(), f"prompt {row}"


def test_vision_tower_runs_once_per_generate(model, processor):
    calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**processor(PROMPT, picture(400, 300, 13)), max_new_tokens=5, do_sample=False, eos_token_id=None)
    finally:
        hook.remove()
    assert len(calls) == 1


def phi35_resetting_at_780(tmp_path):
    """A tiny Phi-3.5-vision whose cache reset comes at 780 tokens instead of 4096: (model, processor)."""
    path = make_tiny_checkpoint(tmp_path, variant="phi-3.5-vision", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["original_max_position_embeddings"] = 780
    (path / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def test_phi35_cache_reset_keeps_the_images(tmp_path):
    """Phi-3.5-vision re-encodes everything once the sequence passes original_max_position_embeddings.

    A short threshold (780 instead of 4096) keeps the test fast; the reset must keep pixel_values so the
    recomputation still sees the image, and the result must equal greedy recomputation without cache.
    """
    model, processor = phi35_resetting_at_780(tmp_path)
    inputs = processor(PROMPT, picture(640, 480, 14))  # 775 tokens: crosses 780 while decoding
    assert model.config.reset_cache_at_original_max
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(out, greedy_without_cache(model, inputs, 12))


def test_an_image_token_the_model_generates_is_text_when_phi35_re_encodes(tmp_path):
    """The original's images are negative ids, so a generated ``<|image|>`` (32044) is a token like any
    other, also when the sequence is encoded again past original_max_position_embeddings. Before: that
    re-encoding counted it as an image position ("757 feature vectors but 758 image positions")."""
    model, processor = phi35_resetting_at_780(tmp_path)
    inputs = processor(PROMPT, picture(640, 480, 14))  # 775 tokens: crosses 780 while decoding
    prompt = inputs["input_ids"].shape[1]

    def emit_image_token(input_ids, scores):  # the answer's second token is <|image|>
        if input_ids.shape[1] == prompt + 1:
            scores = torch.full_like(scores, -1e9)
            scores[:, model.config.image_token_id] = 0
        return scores

    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, logits_processor=[emit_image_token])
    assert out[0, prompt + 1] == model.config.image_token_id
    assert torch.equal(out, greedy_without_cache(model, inputs, 12, emit_image_token))
    ids = processor("<|user|>\nHello there<|end|>\n<|assistant|>\n")["input_ids"]
    ids = torch.cat([ids[:, :4], torch.tensor([[model.config.image_token_id]]), ids[:, 4:]], dim=1)  # one lone 32044
    with torch.no_grad():  # a text token (no pixel_values needed), as in the original
        assert torch.equal(model(input_ids=ids).logits, model(inputs_embeds=model.model.embed_tokens(ids)).logits)


@pytest.mark.parametrize(("variant", "resets"), [("phi-3-vision", False), ("phi-3.5-vision", True)])
def test_only_phi35_resets_the_cache_past_4096(tmp_path, variant, resets):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint(tmp_path, variant=variant))
    assert model.config.reset_cache_at_original_max is resets
    cache = type("FullCache", (), {"get_seq_length": lambda self: 4096})()
    step = model.prepare_inputs_for_generation(
        torch.ones(1, 4097, dtype=torch.long), cache=cache, next_sequence_length=1,
        pixel_values=torch.zeros(1), image_sizes=torch.zeros(1, 2), use_cache=True,
    )
    if resets:  # whole sequence again, images included
        assert step.get("cache") is None and step["input_ids"].shape[1] == 4097
        assert "pixel_values" in step and "image_sizes" in step
    else:  # one new token on top of the cache, no images
        assert step["cache"] is cache and step["input_ids"].shape[1] == 1
        assert "pixel_values" not in step


def test_save_and_reload_round_trip(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    inputs = processor(PROMPT, picture(400, 300, 15))
    assert torch.equal(reprocessor(PROMPT, picture(400, 300, 15))["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_pipeline_and_streaming(model, processor):
    image = picture(400, 300, 16)
    expected = model.generate(**processor(PROMPT, image), max_new_tokens=5, do_sample=False, eos_token_id=None)
    expected_text = processor.decode(expected[0, -5:], skip_special_tokens=True)

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    result = pipe(images=image, text=PROMPT, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected_text
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown in this image?"}]}]
    reply = pipe(text=chat, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": expected_text}

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    import threading

    inputs = processor(PROMPT, image)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, streamer=streamer)
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == expected_text
