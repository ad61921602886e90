"""Prefill and decode time of the native Phi-3-vision model on a mid-size random config.

    python benchmarks/bench_native.py            # CPU, a few minutes on 2 cores
    python benchmarks/bench_native.py --device cuda --repeats 5

Compares attention (sdpa vs eager), dtype (fp32 vs bf16) and batch size (1 vs 8) in one run and prints
a table with each time and its ratio to the first row. Random weights: the times say how the code
runs, nothing about answer quality. Not a test; numbers go to docs/native-implementation.md.
"""

import argparse
import itertools
import platform
import statistics
import time

import torch
from PIL import Image

import phi_helpers  # noqa: F401  (registers the classes)
from phi_helpers.models.phi3_v.configuration_phi3_v import Phi3VConfig
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor
from phi_helpers.models.phi3_v.modeling_phi3_v import Phi3VForCausalLM
from phi_helpers.models.phi3_v.processing_phi3_v import Phi3VProcessor
from phi_helpers.testing import FIXTURES, tiny_config_dict
from transformers.tokenization_utils_tokenizers import TokenizersBackend

# ~70 M parameters: head_dim 96 like the real model, so the real RoPE factor lists apply.
MID_SIZES = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
MID_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4)
PROMPT = "<|user|>\n<|image_1|>\nDescribe this image.<|end|>\n<|assistant|>\n"


def build_model(attn: str, dtype: torch.dtype, device: str) -> Phi3VForCausalLM:
    config = tiny_config_dict("phi-3.5-vision")
    config.update(MID_SIZES)
    config["vision_config"].update(MID_VISION)
    config["img_processor"]["image_dim_out"] = MID_VISION["hidden_size"]
    torch.manual_seed(0)
    model = Phi3VForCausalLM(Phi3VConfig(**config, attn_implementation=attn))
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, inputs, new_tokens: int, repeats: int, device: str) -> tuple[float, float]:
    """Median prefill time (vision + prompt, filling the KV cache) and median time per decoding step."""
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only

    @torch.no_grad()
    def prefill():
        return model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def decode(prefilled):
        cache, token, step_mask = prefilled.cache, prefilled.logits[:, -1:].argmax(-1), mask
        step_positions = positions[:, -1:]
        for _ in range(new_tokens):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            step_positions = step_positions + 1
            out = model(input_ids=token, attention_mask=step_mask, position_ids=step_positions, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    decode(prefill())  # warm-up
    prefills, decodes = [], []
    for _ in range(repeats):
        prefills.append(timed(prefill, device))
        prefilled = prefill()
        decodes.append(timed(lambda: decode(prefilled), device) / new_tokens)
    return statistics.median(prefills), statistics.median(decodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--num-crops", type=int, default=4)
    args = parser.parse_args()

    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=args.num_crops), TokenizersBackend.from_pretrained(FIXTURES))
    images = [Image.new("RGB", (640, 480), (30 * i, 100, 200 - 20 * i)) for i in range(8)]
    batches = {1: processor(PROMPT, images[0]), 8: processor([PROMPT] * 8, [[image] for image in images])}

    print(f"torch {torch.__version__} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | "
          f"device {args.device} | prompt {batches[1]['input_ids'].shape[1]} tokens | {args.new_tokens} new tokens | "
          f"median of {args.repeats}")
    header = f"{'attention':<10}{'dtype':<10}{'batch':>6}{'prefill s':>12}{'x':>7}{'decode ms/tok':>15}{'x':>7}"
    print(header, flush=True)
    print("-" * len(header))
    baseline = None
    for attn, dtype, batch in itertools.product(("sdpa", "eager"), (torch.float32, torch.bfloat16), (1, 8)):
        model = build_model(attn, dtype, args.device)
        inputs = {k: v.to(args.device) for k, v in batches[batch].items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        prefill_s, decode_s = measure(model, inputs, args.new_tokens, args.repeats, args.device)
        baseline = baseline or (prefill_s, decode_s)
        print(
            f"{attn:<10}{str(dtype).removeprefix('torch.'):<10}{batch:>6}{prefill_s:>12.3f}{prefill_s / baseline[0]:>7.2f}"
            f"{decode_s * 1000:>15.1f}{decode_s / baseline[1]:>7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
