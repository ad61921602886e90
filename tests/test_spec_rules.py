"""Rules of docs/phi3v-architecture.md (the spec) that no other test pins, each checked against the spec
itself: class defaults read from §1.1, and model outputs and pixel values compared with small references
written here from the spec text (no phi_helpers code computes an expected value)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionConfig, CLIPVisionModel

import phi_helpers  # noqa: F401  (registers the Auto classes)
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.testing import make_tiny_checkpoint

# torch 2.13 CPU: the first call of a transcendental op can be off by ~1e-4 (transformers5-notes.md)
for op in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.log, torch.erf):
    op(torch.linspace(0.1, 1, 64))

VARIANTS = ("phi-3-vision", "phi-3.5-vision")
IMAGE_TOKEN = 32044  # <|image|> (spec §1.4); the original processor wrote -N instead (spec §5.2)
TILE = 336
MEAN = [0.48145466, 0.4578275, 0.40821073]  # spec §1.3
STD = [0.26862954, 0.26130258, 0.27577711]


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- the original image processor, from spec §4 ----------------------------------------------------


def original_tokens(height, width):
    """Spec §4.6: image tokens of a padded canvas of height x width pixels."""
    rows, cols = height // TILE, width // TILE
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def original_canvas(image, num_crops):
    """Spec §4.1-4.2: convert("RGB"); portrait -> transpose; largest scale s with s*ceil(s/ratio) <= num_crops;
    bilinear resize to s*336 wide; white padding to a multiple of 336 (top = floor of half); transpose back."""
    image = image.convert("RGB")
    portrait = image.width < image.height
    if portrait:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * TILE
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / TILE) * TILE
    top = (target - new_h) // 2
    image = ImageOps.expand(image, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    return image.transpose(Image.Transpose.TRANSPOSE) if portrait else image


def original_pixel_values(image, num_crops):
    """Spec §4.3-4.5: (num_crops + 1, 3, 336, 336): bicubic global squash, row-major tiles, zero crops."""
    canvas = original_canvas(image, num_crops)
    hd = torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    hd = (hd - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    height, width = hd.shape[1:]
    glob = F.interpolate(hd[None], size=(TILE, TILE), mode="bicubic")
    tiles = hd.reshape(3, height // TILE, TILE, width // TILE, TILE).permute(1, 3, 0, 2, 4).reshape(-1, 3, TILE, TILE)
    crops = torch.cat([glob, tiles])
    return torch.cat([crops, torch.zeros(num_crops + 1 - len(crops), 3, TILE, TILE)]), [height, width]


# --- the original model, from spec §2, §3, §6 -------------------------------------------------------


class OriginalPhi3V:
    """Eager float32 forward of the original, read from a checkpoint's config.json and model.safetensors.

    ``forward(ids, start, cache)`` encodes ``ids`` at positions start, start+1, ... on top of ``cache``
    (per layer: keys already rotated, values), as the original's eager attention with a KV cache does.
    Image positions are the original's negative ids."""

    def __init__(self, path):
        self.config = json.loads((path / "config.json").read_text())
        self.w = {name: tensor.float() for name, tensor in load_file(path / "model.safetensors").items()}
        vision = CLIPVisionConfig(**self.config["vision_config"])
        vision._attn_implementation = "eager"
        self.clip = CLIPVisionModel(vision).eval()
        prefix = "model.vision_embed_tokens.img_processor.vision_model."
        self.clip.load_state_dict({k[len(prefix) :]: v for k, v in self.w.items() if k.startswith(prefix)}, strict=True)

    def image_features(self, pixel_values, image_sizes):
        """Spec §3: penultimate CLIP layer without CLS, 2x2 merge, row-major tiles, sub_GN ending every row,
        then [sub-grid, glb_GN, global grid] per image, projected by Linear-GELU-Linear."""
        w, dim = self.w, self.config["img_processor"]["image_dim_out"]
        with torch.no_grad():
            hidden = self.clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
        crops = hidden.reshape(*pixel_values.shape[:2], 24, 24, dim)
        sub = w["model.vision_embed_tokens.sub_GN"].reshape(4 * dim)  # ends every row of a grid
        glb = w["model.vision_embed_tokens.glb_GN"].reshape(4 * dim)  # between the sub-image grid and the global one

        def merge(grid):  # (24, 24, C) -> (12, 12, 4C); cell (i, j): patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)
            return grid.reshape(12, 2, 12, 2, dim).permute(0, 2, 1, 3, 4).reshape(12, 12, 4 * dim)

        def with_newlines(grid):  # (R, C, D) -> (R * (C + 1), D)
            return torch.cat([grid, sub.expand(grid.shape[0], 1, -1)], dim=1).reshape(-1, grid.shape[-1])

        vectors = []
        for i, (height, width) in enumerate(image_sizes.tolist()):
            rows, cols = height // TILE, width // TILE
            cells = torch.stack([merge(crops[i, 1 + k]) for k in range(rows * cols)])  # (rows*cols, 12, 12, 4C)
            grid = cells.reshape(rows, cols, 12, 12, -1).permute(0, 2, 1, 3, 4).reshape(rows * 12, cols * 12, -1)
            vectors += [with_newlines(grid), glb[None], with_newlines(merge(crops[i, 0]))]
        x, p = torch.cat(vectors), "model.vision_embed_tokens.img_projection."
        x = F.gelu(x @ w[p + "0.weight"].T + w[p + "0.bias"])
        return x @ w[p + "2.weight"].T + w[p + "2.bias"]

    def rotation(self, positions):
        """Spec §6 LongRoPE: short factors unless max(position)+1 > original_max_position_embeddings; cos and
        sin both scaled by sqrt(1 + ln(s)/ln(original)), s = max_position_embeddings / original."""
        c = self.config
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        original = c["original_max_position_embeddings"]
        factors = c["rope_scaling"]["long_factor" if int(positions.max()) + 1 > original else "short_factor"]
        inv_freq = 1.0 / (torch.tensor(factors) * c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = positions[:, None].float() * inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        scale = math.sqrt(1 + math.log(c["max_position_embeddings"] / original) / math.log(original))
        return emb.cos() * scale, emb.sin() * scale

    def forward(self, ids, pixel_values=None, image_sizes=None, start=0, cache=None, last_only=False):
        """ids (L,) -> (logits (L, vocab), or (1, vocab) with ``last_only``; the new cache)."""
        c, w = self.config, self.w
        heads, width = c["num_attention_heads"], c["hidden_size"]
        head_dim, eps = width // heads, c["rms_norm_eps"]
        x = F.embedding(ids.clamp(0, c["vocab_size"]), w["model.embed_tokens.weight"])
        images = (ids < 0) & (ids > -int(1e9))
        if images.any():
            x[images] = self.image_features(pixel_values, image_sizes)
        length = len(ids)
        cos, sin = self.rotation(torch.arange(start, start + length))
        mask = torch.full((length, start + length), -math.inf).triu(start + 1)

        def rms(h, weight):  # float32 statistics, back to the input dtype, then the weight (spec §6)
            return weight * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

        def rotate(t):
            first, second = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-second, first], dim=-1) * sin

        new_cache = []
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            qkv = rms(x, w[p + "input_layernorm.weight"]) @ w[p + "self_attn.qkv_proj.weight"].T
            q, k, v = (t.reshape(length, heads, head_dim).transpose(0, 1) for t in qkv.split(width, dim=-1))  # Q, K, V rows
            q, k = rotate(q), rotate(k)
            if cache is not None:
                k, v = torch.cat([cache[layer][0], k], dim=1), torch.cat([cache[layer][1], v], dim=1)
            new_cache.append((k, v))
            if last_only and layer == c["num_hidden_layers"] - 1:  # the cache needs all K, V; the rest the last row
                q, x, mask = q[:, -1:], x[-1:], mask[-1:]
            scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=1 / math.sqrt(head_dim))  # mask + q k^T / sqrt(d)
            x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(x), width) @ w[p + "self_attn.o_proj.weight"].T
            gate_up = rms(x, w[p + "post_attention_layernorm.weight"]) @ w[p + "mlp.gate_up_proj.weight"].T
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + (up * F.silu(gate)) @ w[p + "mlp.down_proj.weight"].T
        return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T, new_cache

    def generate(self, ids, pixel_values, image_sizes, steps, reset, prefill):
        """Greedy decoding with a KV cache after ``prefill`` (forward's output for ``ids``): the logits of
        each step. ``reset`` (Phi-3.5-vision, spec §6): once the sequence is >= original_max_position_embeddings
        + 1 tokens while the cache holds at most original_max_position_embeddings, drop the cache and encode
        the whole sequence again (images too). Without: new tokens on top of the cache, whatever its length."""
        original = self.config["original_max_position_embeddings"]
        logits, cache = prefill
        scores = [logits[-1]]
        for _ in range(steps - 1):
            ids = torch.cat([ids, logits[-1].argmax()[None]])
            if reset and len(ids) >= original + 1 and cache[0][0].shape[1] <= original:
                logits, cache = self.forward(ids, pixel_values, image_sizes, last_only=True)
            else:
                logits, cache = self.forward(ids[-1:], start=len(ids) - 1, cache=cache)
            scores.append(logits[-1])
        return torch.stack(scores)


def original_ids(input_ids):
    """The original processor's ids for one processed prompt: the k-th run of <|image|> becomes -k."""
    ids, run = input_ids[0].clone(), 0
    for j in range(len(ids)):
        if ids[j] == IMAGE_TOKEN:
            run += j == 0 or ids[j - 1] != IMAGE_TOKEN
            ids[j] = -run
    return ids


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of both variants with the same weights, RMSNorm weights made random (the shipped
    tiny ones are all 1, which would hide a norm weight applied wrongly or not at all)."""
    paths = {variant: make_tiny_checkpoint(tmp_path_factory.mktemp(variant), variant=variant) for variant in VARIANTS}
    weights = load_file(paths["phi-3-vision"] / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if name.startswith(("model.layers.", "model.norm.")) and name.endswith("norm.weight"):
            weights[name] = (1 + 0.5 * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)
    for path in paths.values():
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return paths


# --- 1. configuration ----------------------------------------------------------------------------


def test_config_class_defaults_are_the_originals():
    """Spec §1.1, "Phi3VConfig class defaults": the values a config gets for keys config.json leaves out
    (Phi-3-vision's has no embd_pdrop, resid_pdrop or pad_token_id)."""
    config = Phi3VConfig()
    spec = dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="silu",
        max_position_embeddings=4096, original_max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5,
        use_cache=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
        sliding_window=None,
    )
    assert {name: getattr(config, name) for name in spec} == spec
    # rope_theta 10000.0 and rope_scaling None: plain RoPE, no LongRoPE factors
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.rope_parameters["rope_type"] == "default"
    assert "long_factor" not in config.rope_parameters
    # num_key_value_heads None -> num_attention_heads
    assert Phi3VConfig(num_attention_heads=8, num_key_value_heads=None).num_key_value_heads == 8


# --- 2. cached decoding across 4096 tokens ------------------------------------------------------


@pytest.fixture(scope="module")
def across_4096(checkpoints):
    """A 4095-token prompt with an image (num_crops 1) and the reference's logits of 4 greedy steps under each
    cache rule: {False: the cache is kept, True: it is reset at 4097 tokens}. The 3rd new token is at
    position 4096, the first past original_max_position_embeddings. Both checkpoints have the same weights."""
    path = checkpoints["phi-3-vision"]
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor("<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n", picture(60, 40), num_crops=1)
    filler_length = 4095 - prompt["input_ids"].shape[1]
    filler = torch.randint(3, 32000, (1, filler_length), generator=torch.Generator().manual_seed(0))
    prompt["input_ids"] = torch.cat([prompt["input_ids"], filler], dim=1)
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    reference = OriginalPhi3V(path)
    ids, images = original_ids(prompt["input_ids"]), (prompt["pixel_values"], prompt["image_sizes"])
    prefill = reference.forward(ids, *images, last_only=True)
    return prompt, {reset: reference.generate(ids, *images, 4, reset, prefill) for reset in (False, True)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_across_4096_follows_each_checkpoints_rule(checkpoints, across_4096, variant):
    """Spec §6 (LongRoPE switch, cache reset), §8.3 and §10: decoding past original_max_position_embeddings
    (4096). Phi-3-vision keeps its cache: the keys cached under 4097 tokens keep their short-factor
    rotation while each new token is rotated with the long factors. Phi-3.5-vision drops the cache at 4097
    tokens and encodes the whole sequence (image included) again with the long factors.

    The greedy tokens and the logits of every step must equal the reference's under the checkpoint's rule,
    and differ from those under the other rule from the 4097th token on (so the test sees the rule)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints[variant], dtype=torch.float32).eval()
    prompt, expected = across_4096
    with torch.no_grad():
        out = model.generate(
            **prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens, logits = out.sequences[0, prompt["input_ids"].shape[1] :], torch.cat(out.logits)
    resets = variant == "phi-3.5-vision"
    assert tokens.tolist() == expected[resets].argmax(-1).tolist()
    torch.testing.assert_close(logits, expected[resets], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[:2], expected[not resets][:2], atol=1e-4, rtol=0)  # the same up to 4096 tokens
    assert (logits[2:] - expected[not resets][2:]).abs().amax(-1).min() > 0.1  # different past them


# --- 3. whole-model logits ----------------------------------------------------------------------


def test_logits_equal_an_original_style_forward(checkpoints):
    """Spec §2, §3, §6: the whole model in float32 (CLIP features, HD layout, projection, qkv split Q|K|V,
    gate_up split gate|up, RMSNorm, LongRoPE, eager softmax attention) against the reference, two images:
    a 2x2 tile grid (row-major tile order) and a 1x2 one (rows and columns not swapped)."""
    path = checkpoints["phi-3-vision"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path, num_crops=4)
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [picture(300, 200, 1), picture(400, 150, 2)])
    assert inputs["image_sizes"].tolist() == [[672, 672], [336, 672]]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    expected, _ = OriginalPhi3V(path).forward(original_ids(inputs["input_ids"]), inputs["pixel_values"], inputs["image_sizes"])
    assert logits.shape == expected.shape
    assert (logits - expected).abs_().max() < 2e-5  # logits of size 1-10: float32 rounding only


def test_rmsnorm_casts_to_the_input_dtype_before_the_weight(checkpoints):
    """Spec §6: RMSNorm computes in float32, casts back to the input dtype, then multiplies by the weight
    (in bfloat16 the other order, weight first in float32, rounds differently)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints["phi-3-vision"], dtype=torch.bfloat16).eval()
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    with torch.no_grad():
        got = norm(x)
    assert torch.equal(got, norm.weight * normed.to(torch.bfloat16))
    assert not torch.equal(got, (norm.weight.float() * normed).to(torch.bfloat16))  # the order shows


# --- 4-6. processor ------------------------------------------------------------------------------


def image_in_mode(mode):
    """A 150x110 random picture in ``mode``, with content that exercises the mode's conversion to RGB."""
    rng = np.random.default_rng(3)
    base = picture(150, 110, 3)
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = int(np.bincount(np.array(image).ravel()).argmax())  # the commonest colour
        return image
    if mode == "PA":
        image = base.convert("P").convert("PA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (110, 150), dtype=np.uint8)))
        return image
    if mode == "I;16":  # above and below 255
        return Image.fromarray(rng.integers(0, 512, (110, 150)).astype(np.uint16))
    if mode == "I":  # negative and above 255 too
        return Image.fromarray(rng.integers(-100, 400, (110, 150)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-20, 300, (110, 150)).astype(np.float32))
    return base.convert(mode)


@pytest.mark.parametrize("num_crops", [1, 4])
@pytest.mark.parametrize("mode", ["P", "P+transparency", "PA", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_processor_pixel_values_of_other_image_modes_equal_the_original(processor, mode, num_crops):
    """Spec §4.1-4.5: an image of any mode is converted with PIL's convert("RGB") (no alpha compositing), then
    goes through the HD transform; the processor's pixel_values, image_sizes and token count equal the
    reference's bit for bit."""
    image = image_in_mode(mode)
    assert image.mode == mode.split("+")[0]
    out = processor("<|image_1|>\nWhat?", image, num_crops=num_crops)
    pixel_values, size = original_pixel_values(image, num_crops)
    assert torch.equal(out["pixel_values"], pixel_values[None])
    assert out["image_sizes"].tolist() == [size]
    assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == original_tokens(*size)


@pytest.mark.parametrize(
    ("width", "height", "size", "tokens"),
    [(1, 1, [1344, 1344], 2509), (1, 5000, [5376, 336], 2653), (5000, 1, [336, 5376], 2473)],
)
def test_extreme_valid_images_at_16_crops(processor, width, height, size, tokens):
    """Spec §4.2 and §4.6-4.7: a 1x1 image is upscaled to a 4x4 grid; a 1x5000 or 5000x1 line takes 16
    tiles in a row (int(5376/5000) = 1 pixel, padded white to 336). Token count, image_sizes and
    pixel_values through the processor."""
    image = picture(width, height, 4)
    out = processor("<|image_1|>", image, num_crops=16)
    pixel_values, canvas = original_pixel_values(image, 16)
    assert canvas == size and original_tokens(*size) == tokens  # the spec's arithmetic gives the listed numbers
    assert out["image_sizes"].tolist() == [size]
    assert out["input_ids"][0].tolist() == [1] + [IMAGE_TOKEN] * tokens + [1]  # every text chunk (here "") starts with BOS
    assert torch.equal(out["pixel_values"], pixel_values[None])


def test_a_zero_padded_tag_is_image_1(processor):
    """Spec §5.2: tags match <\\|image_\\d+\\|> and N = int(digits), so <|image_01|> is image 1: it is
    removed from the text and replaced by the image's tokens, exactly like <|image_1|>."""
    image = picture(60, 40)
    padded = processor("<|user|>\n<|image_01|>\nHi<|end|>\n", image, num_crops=1)
    plain = processor("<|user|>\n<|image_1|>\nHi<|end|>\n", image, num_crops=1)
    assert torch.equal(padded["input_ids"], plain["input_ids"])
    tokenizer = processor.tokenizer
    assert padded["input_ids"][0].tolist() == (
        tokenizer("<|user|>\n").input_ids + [IMAGE_TOKEN] * original_tokens(TILE, TILE) + tokenizer("\nHi<|end|>\n").input_ids
    )
