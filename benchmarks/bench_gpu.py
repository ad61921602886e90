"""The FULL-size Phi-3.5-vision (4.1 B parameters, random weights) on a CUDA GPU in bf16.

    python benchmarks/bench_gpu.py                      # on a machine with an NVIDIA GPU (~10 GB free)
    python benchmarks/bench_gpu.py --device cpu --tiny  # dry run: a tiny config on CPU, same code path

Prints, for each attention implementation that is usable here (sdpa; flash_attention_2 where
load_model's "auto" would pick it: flash-attn installed, an Ampere or newer GPU; both with the KV cache ``ask`` uses, ``PreallocatedCache``) and for sdpa with a
static KV cache plus ``torch.compile``:

* prefill seconds at 4 and 16 crops (one 1344x1344 image: vision tower + prompt, KV cache filled);
* decode tokens per second at batch 1 and 8 (4 crops, greedy, every row generates all its tokens);
* peak GPU memory of each configuration.

A configuration that fails prints what broke instead of numbers, and the others still run. Random
weights: the numbers say how the code runs, nothing about answer quality (the architecture and shapes
are the real ones, built from the official config.json in phi_helpers/data/phi-3-vision-128k-instruct).
Not run yet on a GPU by this project: see docs/native-implementation.md.
"""

import argparse
import statistics
import time
import traceback

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig

import phi_helpers  # noqa: F401  (registers the classes)
from phi_helpers.api.kv_cache import PreallocatedCache
from phi_helpers.api.hardware import pick_attention
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor
from phi_helpers.models.phi3_v.modeling_phi3_v import Phi3VForCausalLM
from phi_helpers.models.phi3_v.processing_phi3_v import Phi3VProcessor
from phi_helpers.testing import FIXTURES, tiny_config_dict
from transformers.tokenization_utils_tokenizers import TokenizersBackend

PROMPT = "<|user|>\n<|image_1|>\nDescribe this image in detail.<|end|>\n<|assistant|>\n"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(args, attn: str) -> Phi3VForCausalLM:
    if args.tiny:
        config = Phi3VConfig(**tiny_config_dict("phi-3.5-vision"))
    else:
        config = AutoConfig.from_pretrained(FIXTURES)  # the official config.json: the real sizes
    config._attn_implementation = attn  # a dict sets the language model and the vision tower apart
    torch.manual_seed(0)
    with torch.device(args.device):  # random init directly on the device: seconds, not minutes
        model = Phi3VForCausalLM._from_config(config, dtype=args.dtype)
    return model.eval()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def inputs_for(args, batch: int, num_crops: int, model) -> dict:
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), TokenizersBackend.from_pretrained(FIXTURES))
    images = [[noise_image(1344, 1344, seed)] for seed in range(batch)]
    inputs = processor([PROMPT] * batch, images, padding_side="left").to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def measure(args, name: str, attn, generate_kwargs: dict) -> None:
    """One configuration: prefill at 4 and 16 crops, decode at batch 1 and 8, peak memory."""
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args, attn)

    def options(inputs, new_tokens: int) -> dict:
        """generate_kwargs, plus the KV cache ask() uses unless the configuration names its own."""
        if "cache_implementation" in generate_kwargs:
            return generate_kwargs
        return {**generate_kwargs, "cache": PreallocatedCache(model.config, inputs["input_ids"].shape[1] + new_tokens)}

    cells = []
    for num_crops in (4, 16):
        inputs = inputs_for(args, 1, num_crops, model)

        def prefill():
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=None, **options(inputs, 1))

        cells.append(f"{seconds(prefill, args.device, args.repeats):>{12 + (num_crops == 16)}.3f}")
    for batch in (1, 8):
        inputs = inputs_for(args, batch, 4, model)

        def run(new_tokens):
            def generate():
                with torch.inference_mode():
                    model.generate(
                        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        eos_token_id=None, **options(inputs, new_tokens),
                    )
            return generate

        first = seconds(run(1), args.device, args.repeats)
        total = seconds(run(args.new_tokens + 1), args.device, args.repeats)
        rate = f"{batch * args.new_tokens / (total - first):.1f}" if total > first else "n/a"  # noise can exceed the decode time
        cells.append(f"{rate:>11}")
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:>10.2f}" if args.device == "cuda" else f"{'-':>10}"
    print(f"{name:<36}{''.join(cells)}{peak}", flush=True)
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (with --device cpu: a dry run of the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.tiny:
        args.repeats, args.new_tokens = 1, 4
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU (dry run)"
    print(f"torch {torch.__version__} | {gpu} | {str(args.dtype).removeprefix('torch.')} | "
          f"{'tiny' if args.tiny else 'full-size'} random weights | median of {args.repeats} | {args.new_tokens} new tokens")
    header = f"{'configuration':<36}{'prefill 4 s':>12}{'prefill 16 s':>13}{'tok/s b=1':>11}{'tok/s b=8':>11}{'peak GiB':>10}"
    print(header)
    print("-" * len(header))
    configurations = [("sdpa", "sdpa", {})]
    attention, reason = pick_attention("auto", args.device, torch.bfloat16)  # load_model's rule (Ampere+, flash-attn)
    if attention == "flash_attention_2":
        configurations.append(("flash_attention_2", "flash_attention_2", {}))
    else:
        print(f"{'flash_attention_2':<36}skipped: {reason} (pip install flash-attn --no-build-isolation, on an Ampere+ GPU)")
    # With a static cache on CUDA, generate compiles the decoding step itself (torch.compile through
    # generation_config.compile_config; the prefill runs uncompiled). On the CPU dry run nothing is compiled.
    configurations.append(("sdpa + static cache + torch.compile", "sdpa", {"cache_implementation": "static"}))
    for name, attn, generate_kwargs in configurations:
        try:
            measure(args, name, attn, generate_kwargs)
        except Exception as error:  # noqa: BLE001  (report what broke, go on with the next configuration)
            where = traceback.extract_tb(error.__traceback__)[-1]
            print(f"{name:<36}FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                  f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})", flush=True)


if __name__ == "__main__":
    main()
