"""fp32 vs bf16 vs int8 (vs int4) on CPU: load memory, prefill, decode, agreement with fp32.

    python benchmarks/bench_quantization.py              # mid-size random checkpoint, about 4 minutes on 2 cores
    python benchmarks/bench_quantization.py --tokens 16  # quicker

A mid-size random Phi-3.5-vision (same layout as the real one, smaller widths: see MID_SIZES) is written
once to a temporary folder in bf16, like the official safetensors. Each variant then runs in a fresh
subprocess, so that its peak RSS is its own:

* weights: the bytes of the loaded tensors (int8 tensors: data + scales, ``weights_bytes``); "LM": the language model's
  (everything but the vision tower and projection), whose int8 size the issue's target is about;
* RSS / own: the process's resident memory after answering minus before loading, with and without
  the pages of the memory-mapped safetensors file (which the OS can drop; "own" is RssAnon: weights,
  KV cache, what the allocator keeps); load peak: the peak of own memory while loading, sampled every
  5 ms;
* prefill: the first generated token for one image (num_crops=1) and a short question;
* decode: milliseconds per further token (greedy, ``--tokens`` new tokens, the KV cache ``ask`` uses);
* agreement: the first N greedy tokens identical to fp32 (up to the first difference); and, since a
  random model has many near-ties, the teacher-forced agreement too: fed fp32's N tokens, how many of
  the N next-token predictions are fp32's.

Variants: fp32, bf16, int8 (what ``quantize="int8"`` does on CPU: the language model's Linear layers and
lm_head in int8, the rest in bf16), int8+fp32 (the same beside fp32), and the alternatives we measured
and rejected: "int8 head16" (lm_head kept in bf16) and int8-all (the vision tower and projection
quantized too); int4 (only where the CPU has kernels; otherwise the typed error is reported).
Numbers: docs/quantization.md.
"""

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MID_SIZES = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12)
MID_VISION = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, projection_dim=512)
# name: (dtype, quantize, modules kept unquantized: None = what load_model does, else a list)
VARIANTS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "int8": ("bf16", "int8", None),  # quantize="int8": the default on CPU
    "int8+fp32": ("fp32", "int8", None),  # quantize="int8", dtype="fp32"
    "int8 head16": ("bf16", "int8", ["model.vision_embed_tokens", "lm_head"]),  # lm_head kept in bf16
    "int8-all": ("bf16", "int8", []),  # the vision tower and projection quantized too
    "int4": ("bf16", "int4", None),
}


def write_checkpoint(folder: Path) -> Path:
    """The tiny checkpoint's files with a mid-size config and seeded random bf16 weights."""
    from safetensors.torch import save_file

    from phi_helpers.models.phi3_v import Phi3VConfig, Phi3VForCausalLM
    from phi_helpers.testing import make_tiny_checkpoint
    from phi_helpers.testing.checkpoints import _random_weights

    make_tiny_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(MID_SIZES)
    config["vision_config"].update(MID_VISION)
    config["img_processor"]["image_dim_out"] = MID_VISION["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig(**config))
    model = model.to_empty(device="cpu")
    save_file(_random_weights(model, seed=0), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def run_variant(folder: str, name: str, tokens: int) -> dict:
    """One variant in this process: load, prefill, decode. Returns the measurements."""
    from transformers import AutoModelForCausalLM, AutoProcessor, TorchAoConfig

    from phi_helpers import load_model
    from phi_helpers.api.kv_cache import PreallocatedCache
    from phi_helpers.api.loading import return_freed_memory
    from phi_helpers.api.quantization import tensor_bytes, use_fused_int8_kernel, weights_bytes
    from phi_helpers.api.generation import ask  # noqa: F401  (the same import cost for every variant)
    from phi_helpers.errors import PhiHelpersError
    from phi_helpers.testing import make_tiny_checkpoint  # noqa: F401
    from PIL import Image

    dtype, quantize, keep = VARIANTS[name]
    torch.manual_seed(0)
    gc.collect()
    before, anon_before = _rss_bytes(), _anon_bytes()
    sampler = _AnonPeak()
    try:
        if keep is None:
            model, processor = load_model(folder, device="cpu", dtype=dtype, quantize=quantize, num_crops=1)
        else:  # the alternative: the same torchao config with another list of modules kept unquantized,
            # loaded as load_model does
            from torchao.quantization import Int8WeightOnlyConfig

            processor = AutoProcessor.from_pretrained(folder, num_crops=1)
            model = AutoModelForCausalLM.from_pretrained(
                folder, device_map="cpu", dtype=torch.bfloat16,
                quantization_config=TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=keep),
            ).eval()
            use_fused_int8_kernel(model)
            return_freed_memory()
    except PhiHelpersError as error:
        return {"variant": name, "error": f"{type(error).__name__}: {error}"}
    anon_peak = sampler.stop() - anon_before

    image = Image.new("RGB", (672, 448), (200, 120, 40))
    prompt = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [image], return_tensors="pt")
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
    length = inputs["input_ids"].shape[1] + tokens

    def cache():  # what ask() uses
        return PreallocatedCache(model.config, capacity=length)

    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, cache=cache(), **options)  # warm-up
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, cache=cache(), **options)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, cache=cache(), **options)
        total = time.perf_counter() - started
    gc.collect()
    resident_after, own_after = _rss_bytes() - before, _anon_bytes() - anon_before
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    reference_file = Path(folder) / "fp32_tokens.json"
    reference = json.loads(reference_file.read_text()) if reference_file.exists() else new
    with torch.inference_mode():  # teacher forcing: the prediction after each of fp32's tokens
        forced = torch.cat([inputs["input_ids"], torch.tensor([reference[:-1]])], dim=1)
        logits = model(**{**inputs, "input_ids": forced, "attention_mask": torch.ones_like(forced)}).logits
    predicted = logits[0, -len(reference):].argmax(-1).tolist()
    return {
        "forced_agreement": sum(a == b for a, b in zip(predicted, reference)),
        "variant": name,
        "load_peak_anon_gib": anon_peak / 2**30,
        "weights_gib": weights_bytes(model) / 2**30,
        "language_model_gib": sum(
            tensor_bytes(p) for n, p in model.named_parameters() if not n.startswith("model.vision_embed_tokens")
        ) / 2**30,
        "resident_gib": resident_after / 2**30,
        "own_after_gib": own_after / 2**30,
        "prefill_s": prefill,
        # too few tokens on a noisy machine can leave nothing after the prefill: no figure then
        "decode_ms_per_token": 1000 * (total - prefill) / (tokens - 1) if total > prefill else math.nan,
        "tokens": new,
        "prompt_tokens": inputs["input_ids"].shape[1],
    }


class _AnonPeak:
    """Samples RssAnon (the process's own memory, without file pages) in a thread until stop()."""

    def __init__(self):
        self.peak, self.running = _anon_bytes(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _anon_bytes())


def _anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def parameter_counts(folder: Path) -> dict:
    """Parameters of the language model's Linear layers (what int8 quantizes) and of the vision side."""
    from safetensors import safe_open

    counts = {"vision": 0, "quantized": 0, "other": 0}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        for key in file.keys():
            n = file.get_slice(key).get_shape()
            size = int(torch.tensor(n).prod())
            if key.startswith("model.vision_embed_tokens"):
                counts["vision"] += size
            elif key.startswith("model.layers") and key.endswith("proj.weight"):
                counts["quantized"] += size
            else:
                counts["other"] += size
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer (default 32)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.folder, args.variant, args.tokens)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "mid")
        counts = parameter_counts(folder)
        file_gib = (folder / "model.safetensors").stat().st_size / 2**30
        results = {}
        for name in VARIANTS:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", name, "--folder", str(folder), "--tokens", str(args.tokens)],
                capture_output=True, text=True,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            results[name] = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": done.stderr[-800:]}
            if name == "fp32" and "tokens" in results[name]:
                (folder / "fp32_tokens.json").write_text(json.dumps(results[name]["tokens"]))
            print(name, {k: v for k, v in results[name].items() if k != "tokens"}, flush=True)
    report(results, counts, file_gib, args.tokens)


def report(results: dict, counts: dict, file_gib: float, tokens: int) -> None:
    total = sum(counts.values())
    print(f"\nparameters: {total:,} (vision tower + projection {counts['vision'] / total:.1%}, "
          f"language-model Linear weights {counts['quantized'] / total:.1%}); safetensors (bf16) {file_gib:.3f} GiB")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    base = results["fp32"]
    header = (f"{'variant':<11} {'weights GiB':>11} {'LM GiB':>7} {'x fp32':>6} {'RSS GiB':>8} {'own GiB':>8} {'load peak':>9} "
              f"{'prefill s':>9} {'speed-up':>8} {'decode ms/tok':>13} {'speed-up':>8} {'agree':>6} {'forced':>6}")
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        if "error" in row:
            print(f"{name:<11} not available: {row['error'].splitlines()[-1]}")
            continue
        agree = _agreement(base["tokens"], row["tokens"])
        print(
            f"{name:<11} {row['weights_gib']:>11.3f} {row['language_model_gib']:>7.3f} "
            f"{row['language_model_gib'] / base['language_model_gib']:>6.2f} {row['resident_gib']:>8.3f} "
            f"{row['own_after_gib']:>8.3f} {row['load_peak_anon_gib']:>9.3f} {row['prefill_s']:>9.2f} {base['prefill_s'] / row['prefill_s']:>8.2f} "
            f"{_number(row['decode_ms_per_token'], 13, 1)} "
            f"{_number(base['decode_ms_per_token'] / row['decode_ms_per_token'], 8, 2)} "
            f"{agree:>3}/{tokens} {row['forced_agreement']:>3}/{tokens}"
        )
    print("\nLM GiB: the language model's weights (all but the vision tower and projection); RSS: the "
          "process's resident memory after answering minus before loading (with the safetensors file's pages, which "
          "the OS can drop); own: the same without file pages (RssAnon: weights, KV cache, allocator caches); "
          "load peak: own memory's peak while loading; speed-up: "
          "fp32's time / the variant's; agree: greedy tokens equal to fp32's up to the first difference; "
          "forced: next-token predictions equal to fp32's when fed fp32's tokens.")


def _number(value: float, width: int, decimals: int) -> str:
    """A table cell; "n/a" for a time too few tokens left unmeasured (nan) and the speed-ups built on it."""
    return f"{'n/a':>{width}}" if math.isnan(value) else f"{value:>{width}.{decimals}f}"


def _agreement(reference: list[int], tokens: list[int]) -> int:
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same


if __name__ == "__main__":
    main()
