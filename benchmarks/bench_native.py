"""Where the user waits, on a mid-size random config: today's code against the code at the start of
issue 13 ("before"), in one run, as ratios.

    python benchmarks/bench_native.py                 # CPU, all sections (long on 2 busy cores)
    python benchmarks/bench_native.py --sections preprocess vision
    python benchmarks/bench_native.py --tiny          # a smoke run of every section in a few seconds

Sections:
* preprocess: the image processor at 1344x1344/16, 4032x3024/16 (and its portrait 3024x4032) and
  1000x700/4 crops, against the previous pixel path (phi_helpers.testing.reference: one-thread PIL
  resize of a transposed portrait, out-of-place normalisation of a strided tensor, cat + stack);
  pixel_values must be torch.equal.
* vision: the vision tower alone (16 crops), all CLIP layers (before) against the layers that are used.
* prefill: vision + prompt at 16 crops for attn_implementation "eager" and "sdpa": before = the vision
  tower follows "eager" and runs all its layers; now = SDPA in the vision tower, one layer fewer.
* gemm: each linear layer of a decoding step (first layer and lm_head) for 8 rows against 1, with the
  CPU's caches flushed: what a batched decoding step costs against a single one; then four other ways
  to compute the 8 rows (oneDNN, which generate_batch uses, (W @ x.T).T, MKL's packed GEMM, 512-row
  blocks), with whether each gives nn.Linear's bits; then a step's products by row count, MKL against
  oneDNN (where ONEDNN_ROWS comes from).
* batch: images per second of generate_batch for 8 prompts in one call against 8 calls of one, at 1 (the
  prompts alone), 16 and 128 new tokens, with 640x480 images at 4 crops (773-token prompts) and 1 crop
  (329 tokens) (greedy; the answers are the same either way); the batch once more with its decoding
  steps on MKL only, as before batch_kernels.
* groups: the 8 prompts alone (1 new token) in one call with generate_batch's prefill encoding 1, 2 or 8
  prompts per forward pass, against 8 calls of one; it prints the MALLOC_* variables it ran under
  (glibc's malloc maps every freed block over 32 MB afresh, and the page faults depend on that).
* step: torch's profiler on one prompt's prefill (the matrix products' GFLOP/s) and on a decoding step
  for 1 and for 8 rows after a 4-crop prompt (linear layers, attention, the rest), as generate_batch
  runs them.

The gemm, batch, groups and step sections run the mid-size config, or with ``--model full-width`` one with the
real model's layer shapes (2 language and 3 CLIP layers; the batch section then takes about 10 minutes).

Random weights: the times say how the code runs, nothing about answer quality. Not a test; the
numbers go to docs/native-implementation.md. GPU figures: benchmarks/bench_gpu.py.
"""

import argparse
import os
import platform
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import linear

import phi_helpers  # noqa: F401  (registers the classes)
from phi_helpers.api import generation
from phi_helpers.api.batch_linear import ONEDNN_ROWS, _onednn_linear, batch_kernels, onednn_available
from phi_helpers.api.generation import generate_batch
from phi_helpers.api.kv_cache import PreallocatedCache
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.models.phi3_v.image_processing_phi3_v import TILE, Phi3VImageProcessor
from phi_helpers.models.phi3_v.modeling_phi3_v import Phi3VForCausalLM, Phi3VImageEmbedding
from phi_helpers.models.phi3_v.processing_phi3_v import Phi3VProcessor
from phi_helpers.testing import FIXTURES, tiny_config_dict
from phi_helpers.testing.reference import reference_pixel_values
from transformers.tokenization_utils_tokenizers import TokenizersBackend

# (language model sizes, CLIP sizes) of the random configs; head_dim 96 like the real model, so the
# real RoPE factor lists apply.
SIZES = {
    # ~70 M parameters, 212 MB in fp32: every section
    "mid": (
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4),
    ),
    # the real model's layer shapes with 2 of its 32 language layers and 3 of its 24 CLIP layers:
    # ~485 M parameters, 1.9 GB in fp32 (--model full-width: the gemm, batch and groups sections)
    "full-width": (
        dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=3, num_attention_heads=16),
    ),
}
PROMPT = "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"
EAGER_BEFORE = {"": "eager", "vision_config": "eager"}  # what a plain "eager" meant before: both parts


# --- the code as it was before, kept here so that both run in the same process -------------------


def clip_features_before(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """The previous Phi3VImageEmbedding.clip_features: every CLIP layer runs, the last one is dropped."""
    num_images, num_tiles = pixel_values.shape[:2]
    clip = self.img_processor.vision_model
    hidden = clip(pixel_values.flatten(0, 1).to(clip.dtype), output_hidden_states=True).hidden_states[-2]
    return hidden[:, 1:].reshape(num_images, num_tiles, self.grid * self.grid, self.image_dim_out)


class CodeBefore:
    """Context manager: the vision tower runs as before (all layers) while inside."""

    def __enter__(self):
        self.saved = Phi3VImageEmbedding.clip_features
        Phi3VImageEmbedding.clip_features = clip_features_before

    def __exit__(self, *exc):
        Phi3VImageEmbedding.clip_features = self.saved


# --- helpers -------------------------------------------------------------------------------------


def build_model(attn, size: str = "mid", device: str = "cpu") -> Phi3VForCausalLM:
    """Seeded random weights in fp32; ``size`` is "tiny" (the test config) or a key of SIZES."""
    config = tiny_config_dict("phi-3.5-vision")
    if size != "tiny":
        language, vision = SIZES[size]
        config.update(language)
        config["vision_config"].update(vision)
        config["img_processor"]["image_dim_out"] = vision["hidden_size"]
    torch.manual_seed(0)
    return Phi3VForCausalLM(Phi3VConfig(**config, attn_implementation=attn)).eval().to(device)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, runs interleaved so that a busy machine hurts all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_processor(num_crops: int) -> Phi3VProcessor:
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), TokenizersBackend.from_pretrained(FIXTURES))


# --- sections ------------------------------------------------------------------------------------


def bench_preprocess(args) -> None:
    print("\n## Image preprocessing (one image; before = the previous pixel path)")
    print(f"{'image':<12}{'crops':>6}{'before ms':>11}{'now ms':>9}{'speed-up':>10}  pixel_values equal")
    cases = [(336, 252, 4)] if args.tiny else [(1344, 1344, 16), (4032, 3024, 16), (3024, 4032, 16), (1000, 700, 4)]
    for width, height, num_crops in cases:
        image = noise_image(width, height, seed=width)
        processor = Phi3VImageProcessor(num_crops=num_crops)
        times = interleaved(
            {"before": lambda: reference_pixel_values([image], num_crops), "now": lambda: processor(image)},
            args.repeats_fast,
        )
        equal = torch.equal(reference_pixel_values([image], num_crops), processor(image)["pixel_values"])
        print(
            f"{f'{width}x{height}':<12}{num_crops:>6}{times['before'] * 1e3:>11.1f}{times['now'] * 1e3:>9.1f}"
            f"{times['before'] / times['now']:>9.2f}x  {equal}",
            flush=True,
        )


def bench_vision(args) -> None:
    print("\n## Vision tower alone, 16 crops (before = all CLIP layers; now = up to the used one)")
    model = build_model("sdpa", args.size)
    embedding = model.model.vision_embed_tokens
    inputs = make_processor(16)(PROMPT, noise_image(1344, 1344, 1))
    pixels = inputs["pixel_values"]

    def before():
        with CodeBefore(), torch.inference_mode():
            return embedding.clip_features(pixels)

    def now():
        with torch.inference_mode():
            return embedding.clip_features(pixels)

    times = interleaved({"before": before, "now": now}, args.repeats)
    layers = model.config.vision_config.num_hidden_layers
    print(f"CLIP layers run: before {layers}, now {embedding.num_clip_layers} | features equal: {torch.equal(before(), now())}")
    print(f"before {times['before']:.3f} s | now {times['now']:.3f} s | speed-up {times['before'] / times['now']:.2f}x", flush=True)


def bench_prefill(args) -> None:
    num_crops = 4 if args.tiny else 16
    print(f"\n## Prefill at {num_crops} crops: vision tower + prompt, KV cache filled (one 1344x1344 image)")
    inputs = make_processor(num_crops)(PROMPT, noise_image(1344, 1344, 2))
    print(f"prompt {inputs['input_ids'].shape[1]} tokens")
    print(f"{'attn_implementation':<22}{'before s':>10}{'now s':>8}{'speed-up':>10}  {'vision before -> now':<22}logits equal")
    for requested in ("eager", "sdpa"):
        before_model = build_model(EAGER_BEFORE if requested == "eager" else requested, args.size)
        now_model = build_model(requested, args.size)

        def prefill(model):
            with torch.inference_mode():
                return model(**inputs, use_cache=True, logits_to_keep=1).logits

        def before():
            with CodeBefore():
                return prefill(before_model)

        times = interleaved({"before": before, "now": lambda: prefill(now_model)}, args.repeats)
        clip_before = before_model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation
        clip_now = now_model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation
        close = torch.allclose(before(), prefill(now_model), atol=1e-4, rtol=1e-4)
        print(
            f"{requested!r:<22}{times['before']:>10.3f}{times['now']:>8.3f}{times['before'] / times['now']:>9.2f}x  "
            f"{f'{clip_before} -> {clip_now}':<22}{close} (atol 1e-4)",
            flush=True,
        )


def gemm_alternatives() -> dict:
    """Other ways to compute ``x @ W.T`` for 8 rows: for each, a function that takes a weight and returns
    ``f(x)``, or None where this torch build lacks the kernel."""

    def onednn(weight):  # what generate_batch runs for 4-64 rows on a CPU (phi_helpers.api.batch_linear)
        return (lambda x: _onednn_linear(x, weight)) if onednn_available() else None

    def transposed(weight):  # MKL again, with the roles of the two matrices swapped
        return lambda x: (weight @ x.T).T

    def mkl_packed(weight):  # what torch.compile's CPU freezing uses: a second copy, packed for 8 rows
        if not torch.backends.mkl.is_available():
            return None
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 8)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, 8)

    def blocks(weight):  # nn.Linear on 512 output features at a time
        return lambda x: torch.cat([linear(x, block) for block in weight.split(512)], dim=1)

    return {"oneDNN (used)": onednn, "(W@xT)T": transposed, "MKL packed": mkl_packed, "512-row blocks": blocks}


def bench_gemm(args) -> None:
    print(f"\n## The linear layers of one decoding step, 8 rows against 1 ({args.model} config, fp32, caches flushed)")
    model = build_model("sdpa", args.model)
    layer = model.model.layers[0]
    weights = {
        "qkv_proj": layer.self_attn.qkv_proj.weight, "o_proj": layer.self_attn.o_proj.weight,
        "gate_up_proj": layer.mlp.gate_up_proj.weight, "down_proj": layer.mlp.down_proj.weight,
        "lm_head": model.lm_head.weight,
    }
    flush = torch.zeros(4 * 2**20 if args.tiny else 128 * 2**20)  # 512 MB: more than the CPU's caches

    def cold_ms(fn) -> float:
        runs = []
        for _ in range(args.repeats_fast):
            flush.add_(1)  # the weight comes from memory, as in a step that reads all the others
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs) * 1e3

    def bits(a: torch.Tensor, b: torch.Tensor) -> str:
        return "same" if torch.equal(a, b) else "other"

    print("x @ W.T as nn.Linear computes it (MKL). bits: are the 8 rows' outputs those of 8 one-row products?")
    print(f"{'weight':<14}{'shape':>12}{'1 row ms':>10}{'8 rows ms':>11}{'ratio':>8}{'GB/s 1 row':>12}{'GB/s 8 rows':>13}{'bits':>7}")
    inputs = {name: torch.randn(8, weight.shape[1]) for name, weight in weights.items()}
    for name, weight in weights.items():
        one, eight = torch.randn(1, weight.shape[1]), inputs[name]
        ms1, ms8 = cold_ms(lambda: linear(one, weight)), cold_ms(lambda: linear(eight, weight))
        row_by_row = torch.cat([linear(row[None], weight) for row in eight])
        gb = weight.numel() * weight.element_size() / 1e9
        print(f"{name:<14}{'x'.join(map(str, weight.shape)):>12}{ms1:>10.2f}{ms8:>11.2f}{ms8 / ms1:>7.2f}x"
              f"{gb / ms1 * 1e3:>12.1f}{gb / ms8 * 1e3:>13.1f}{bits(linear(eight, weight), row_by_row):>7}", flush=True)

    alternatives = gemm_alternatives()
    print("\nThe same 8 rows computed in other ways (oneDNN: what generate_batch uses): ms, and bits against nn.Linear's 8 rows")
    print(f"{'weight':<14}{'nn.Linear ms':>13}" + "".join(f"{name:>16}" for name in alternatives))
    for name, weight in weights.items():
        eight = inputs[name]
        reference = linear(eight, weight)
        cells = []
        for make in alternatives.values():
            fn = make(weight)
            cells.append(f"{cold_ms(lambda: fn(eight)):>10.2f} {bits(fn(eight), reference):>5}" if fn else f"{'-':>16}")
        print(f"{name:<14}{cold_ms(lambda: linear(eight, weight)):>13.2f}" + "".join(cells), flush=True)

    if not onednn_available():
        return
    print(f"\nA decoding step's products (the 4 above + lm_head) by row count, ms: MKL (nn.Linear) against oneDNN, which"
          f" generate_batch uses for {ONEDNN_ROWS.start}-{ONEDNN_ROWS.stop - 1} rows")
    print(f"{'rows':>5}{'MKL ms':>9}{'oneDNN ms':>11}{'MKL / oneDNN':>14}")
    for rows in (1, 2, 4, 8) if args.tiny else (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128):
        xs = {name: torch.randn(rows, weight.shape[1]) for name, weight in weights.items()}
        mkl = sum(cold_ms(lambda: linear(xs[name], weight)) for name, weight in weights.items())
        dnn = sum(cold_ms(lambda: _onednn_linear(xs[name], weight)) for name, weight in weights.items())
        print(f"{rows:>5}{mkl:>9.2f}{dnn:>11.2f}{mkl / dnn:>13.2f}x", flush=True)


def bench_batch(args) -> None:
    print(f"\n## Batched generation: generate_batch with 8 prompts in one call vs 8 calls of one ({args.model} config, sdpa, fp32)")
    print("1 x 8: as generate_batch runs (decoding steps on oneDNN); MKL only: the same without batch_kernels (before)")
    model = build_model("sdpa", args.model)
    images = [[noise_image(640, 480, seed)] for seed in range(8)]
    prompts = [PROMPT] * 8
    print(f"{'crops':>5}{'prompt':>8}{'new tokens':>11}{'8 x 1 s':>9}{'1 x 8 s':>9}{'MKL only s':>12}{'images/s 8x1':>14}"
          f"{'images/s 1x8':>14}{'speed-up':>10}{'MKL only':>10}  same answers")
    for num_crops in (4,) if args.tiny else args.batch_crops:
        processor = make_processor(num_crops)
        prompt_tokens = processor(PROMPT, images[0])["input_ids"].shape[1]
        generate_batch(model, processor, prompts[:1], images[:1], 2)  # warm-up
        generate_batch(model, processor, prompts, images, 2)
        for new_tokens in (4,) if args.tiny else args.batch_tokens:

            def timed(fn):
                start = time.perf_counter()
                answers = [answer.text for answer in fn()]
                return time.perf_counter() - start, answers

            seq_s, one_by_one = timed(lambda: [generate_batch(model, processor, [p], [im], new_tokens)[0] for p, im in zip(prompts, images)])
            batch_s, together = timed(lambda: generate_batch(model, processor, prompts, images, new_tokens))
            saved, generation.batch_kernels = generation.batch_kernels, lambda model, rows: nullcontext()
            try:
                mkl_s, on_mkl = timed(lambda: generate_batch(model, processor, prompts, images, new_tokens))
            finally:
                generation.batch_kernels = saved
            print(
                f"{num_crops:>5}{prompt_tokens:>8}{new_tokens:>11}{seq_s:>9.1f}{batch_s:>9.1f}{mkl_s:>12.1f}{8 / seq_s:>14.3f}"
                f"{8 / batch_s:>14.3f}{seq_s / batch_s:>9.2f}x{seq_s / mkl_s:>9.2f}x  {one_by_one == together == on_mkl}",
                flush=True,
            )


def bench_groups(args) -> None:
    print(f"\n## The 8 prompts alone (1 new token) in one call, encoded PREFILL_ROWS prompts per forward pass, vs 8 calls of one ({args.model} config, 4 crops)")
    tuned = {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")}
    print(f"allocator settings: {' '.join(f'{k}={v}' for k, v in tuned.items()) or 'glibc defaults (no MALLOC_* variables)'}")
    model = build_model("sdpa", args.model)
    images = [[noise_image(640, 480, seed)] for seed in range(8)]
    processor = make_processor(4)
    saved = generation.PREFILL_ROWS

    def batched(rows: int):
        def run():
            generation.PREFILL_ROWS = rows
            return generate_batch(model, processor, [PROMPT] * 8, images, 1)
        return run

    fns = {"8 calls of one": lambda: [generate_batch(model, processor, [PROMPT], [im], 1) for im in images]}
    fns.update({f"PREFILL_ROWS={rows}": batched(rows) for rows in (1, 2, 8)})
    try:
        times = interleaved(fns, args.repeats)
    finally:
        generation.PREFILL_ROWS = saved
    for name, seconds in times.items():
        print(f"{name:<16}{seconds:>8.2f} s{times['8 calls of one'] / seconds:>8.2f}x")


def bench_step(args) -> None:
    print(f"\n## Where the time goes: one prompt's prefill, and a decoding step for 1 and 8 rows ({args.model} config, 4 crops, torch's profiler)")
    model = build_model("sdpa", args.model)
    processor = make_processor(4)
    image = [noise_image(640, 480, 0)]
    generate_batch(model, processor, [PROMPT], [image], 1)  # warm-up
    with torch.profiler.profile(with_flops=True) as prof:
        generate_batch(model, processor, [PROMPT], [image], 1)
    products = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")]
    seconds = sum(e.self_cpu_time_total for e in products) / 1e6
    print(f"prefill: its matrix products take {seconds:.3f} s, at {sum(e.flops for e in products) / seconds / 1e9:.0f} GFLOP/s")
    config, length = model.config, processor(PROMPT, image)["input_ids"].shape[1]
    head_dim = config.hidden_size // config.num_attention_heads
    print(f"decoding step after {length} tokens, ms:")
    print(f"{'rows':>5}{'step':>8}{'linear':>8}{'attention':>11}{'rest':>7}  linear kernel")
    for rows in (1, 8):
        cache = PreallocatedCache(config, capacity=length + 1)
        for layer in range(config.num_hidden_layers):  # random keys and values: the step reads the same bytes
            keys = torch.randn(rows, config.num_key_value_heads, length, head_dim)
            cache.update(keys, torch.randn_like(keys), layer)
        token, position = torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), length)

        def step():
            model(input_ids=token, cache=cache, position_ids=position, use_cache=True)
            cache.crop(-1)  # drop the new token: every step reads the same cache

        with torch.inference_mode(), batch_kernels(model, rows):
            step()
            start = time.perf_counter()
            for _ in range(args.repeats_fast):
                step()
            wall = (time.perf_counter() - start) / args.repeats_fast * 1e3
            with torch.profiler.profile() as prof:
                for _ in range(args.repeats_fast):
                    step()
        ms = {e.key: e.self_cpu_time_total / args.repeats_fast / 1e3 for e in prof.key_averages()}
        linear_ms = ms.get("aten::mm", 0) + ms.get("aten::addmm", 0) + ms.get("mkldnn::_linear_pointwise", 0)
        attention_ms = sum(value for key, value in ms.items() if "scaled_dot_product" in key and "aten::scaled" not in key)
        kernel = "oneDNN" if "mkldnn::_linear_pointwise" in ms else "MKL"
        print(f"{rows:>5}{wall:>8.2f}{linear_ms:>8.2f}{attention_ms:>11.2f}{wall - linear_ms - attention_ms:>7.2f}  {kernel}", flush=True)


SECTIONS = {"preprocess": bench_preprocess, "vision": bench_vision, "prefill": bench_prefill, "gemm": bench_gemm, "batch": bench_batch, "groups": bench_groups, "step": bench_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model measurement (median)")
    parser.add_argument("--repeats-fast", type=int, default=7, help="timed runs per preprocessing measurement")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[1, 16, 128], help="new tokens per answer (batch section)")
    parser.add_argument("--batch-crops", type=int, nargs="+", default=[4, 1], help="num_crops of the 640x480 images (batch section)")
    parser.add_argument("--model", choices=list(SIZES), default="mid", help="random config of the gemm, batch, groups and step sections")
    parser.add_argument("--tiny", action="store_true", help="tiny model and small inputs: checks the script runs")
    args = parser.parse_args()
    args.size = "tiny" if args.tiny else "mid"  # the config of the preprocess, vision and prefill sections
    if args.tiny:
        args.repeats, args.repeats_fast, args.model = 1, 1, "tiny"
    print(
        f"torch {torch.__version__} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | "
        f"{'tiny' if args.tiny else 'mid-size'} random config (gemm, batch, groups: {args.model}) | "
        "medians of interleaved runs"
    )
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
