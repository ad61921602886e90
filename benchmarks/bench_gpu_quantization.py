"""Full-size Phi-3.5-vision (random weights) on one CUDA GPU: bf16 vs int8 vs int4 (4-bit NF4).

NOT RUN YET: no GPU was available when it was written. Prepared to run in one go on a CUDA machine:

    pip install -e '.[quantize]' bitsandbytes       # torchao for int8 without bitsandbytes; NF4 needs bitsandbytes
    python benchmarks/bench_gpu_quantization.py     # about 5 minutes on an H100-class GPU, ~20 GB of disk
    python benchmarks/bench_gpu_quantization.py --device cpu --tiny   # dry run: the same code path, seconds

Writes the real architecture (the shipped config.json: 4,146,621,440 parameters) with seeded random bf16
weights into a temporary folder (8.3 GB, like the official safetensors), then runs each variant in a
fresh subprocess and prints one table:

* host RAM peak while loading (ru_maxrss minus the RSS before ``load_model``): ``device_map`` puts
  each tensor straight onto the GPU, so this should stay far below the 8.3 GB of weights;
* GPU memory after loading, and the peak during one answer about an image at num_crops=16;
* decode tokens/s at batch 1 (greedy, after a warm-up).

Random weights say nothing about answer quality; only the real checkpoint can show that.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"bf16": None, "int8": "int8", "int4": "int4"}


def write_full_checkpoint(folder: Path) -> Path:
    """The tiny checkpoint's tokenizer and processor files with the real config and random bf16 weights."""
    from safetensors.torch import save_file

    from phi_helpers.models.phi3_v import Phi3VConfig, Phi3VForCausalLM
    from phi_helpers.testing import FIXTURES, make_tiny_checkpoint

    make_tiny_checkpoint(folder)
    config = json.loads((FIXTURES / "config.json").read_text())
    config["_attn_implementation"] = "sdpa"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig(**config))
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, tensor in model.state_dict().items():
        if tensor.ndim >= 2:
            weights[name] = (torch.randn(tensor.shape, generator=generator) / tensor.shape[-1] ** 0.5).to(torch.bfloat16)
        else:
            weights[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def run_variant(folder: str, name: str, tokens: int, device: str) -> dict:
    from PIL import Image

    from phi_helpers import load_model
    from phi_helpers.api.kv_cache import PreallocatedCache
    from phi_helpers.errors import PhiHelpersError

    before = _rss_bytes()
    try:
        model, processor = load_model(folder, device=device, dtype="bf16", quantize=VARIANTS[name], num_crops=16)
    except PhiHelpersError as error:
        return {"variant": name, "error": f"{type(error).__name__}: {error}"}
    host_peak = _peak_rss_bytes() - before
    cuda = device == "cuda"
    loaded = torch.cuda.memory_allocated() if cuda else float("nan")

    image = Image.new("RGB", (1344, 1344), (200, 120, 40))  # square: every one of the 16 crops is used
    prompt = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [image], return_tensors="pt").to(device)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)

    def cache():  # the KV cache ask() uses, sized for the longest answer here
        return PreallocatedCache(model.config, capacity=inputs["input_ids"].shape[1] + tokens)

    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, cache=cache(), **options)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, cache=cache(), **options)
        if cuda:
            torch.cuda.synchronize()
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, cache=cache(), **options)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - started
    return {
        "variant": name,
        "host_peak_gib": host_peak / 2**30,
        "gpu_loaded_gib": loaded / 2**30,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "prefill_s": prefill,
        "decode_tokens_per_s": decode_tokens_per_s(tokens, total, prefill),
    }


def decode_tokens_per_s(tokens: int, total: float, prefill: float) -> float:
    """Tokens per second after the first; nan when the timed answer took no longer than the timed prefill
    (too few tokens on a busy machine: a negative or infinite rate would be noise, not a measurement)."""
    return (tokens - 1) / (total - prefill) if total > prefill else math.nan


def format_row(name: str, row: dict) -> str:
    """One line of the table: the measurements ("n/a" where there is none), or the whole error message."""
    if "error" in row:
        return f"{name:<7} not available: {row['error'].splitlines()[-1]}"
    return (f"{name:<7} {_number(row['host_peak_gib'], 17, 2)} {_number(row['gpu_loaded_gib'], 14, 2)} "
            f"{_number(row['gpu_peak_gib'], 12, 2)} {_number(row['prefill_s'], 9, 2)} "
            f"{_number(row['decode_tokens_per_s'], 12, 1)}   ({row['prompt_tokens']} prompt tokens)")


def _number(value: float, width: int, decimals: int) -> str:
    return f"{'n/a':>{width}}" if math.isnan(value) else f"{value:>{width}.{decimals}f}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer (default 64)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (with --device cpu: a dry run of the script)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.folder, args.variant, args.tokens, args.device)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("This benchmark needs a CUDA GPU (benchmarks/bench_quantization.py is the CPU one).")
    if args.tiny:
        args.tokens = 4
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from phi_helpers.testing import make_tiny_checkpoint

            folder = make_tiny_checkpoint(Path(tmp) / "tiny")
        else:
            folder = write_full_checkpoint(Path(tmp) / "full")
        size = (folder / "model.safetensors").stat().st_size / 2**30
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU (dry run)"
        print(f"{gpu}, torch {torch.__version__}; {'tiny' if args.tiny else 'full-size'} safetensors {size:.2f} GiB")
        header = f"{'variant':<7} {'host RAM peak GiB':>17} {'GPU loaded GiB':>14} {'GPU peak GiB':>12} {'prefill s':>9} {'decode tok/s':>12}"
        print(header + "\n" + "-" * len(header))
        for name in VARIANTS:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", name, "--folder", str(folder), "--tokens", str(args.tokens),
                 "--device", args.device],
                capture_output=True, text=True,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-400:]}
            print(format_row(name, row))


if __name__ == "__main__":
    main()
