"""Cost of constrained decoding: schema compile time and time per token, constrained vs not.

    python benchmarks/bench_constrained.py              # CPU, about a minute on 2 cores
    python benchmarks/bench_constrained.py --device cuda
    python benchmarks/bench_constrained.py --tiny       # a smoke run on the tiny config in seconds

On the mid-size random config of bench_native.py (~70 M parameters), in one run:

1. compile: building xgrammar's tokenizer info (once per tokenizer) and compiling the eval schemas;
2. the mask alone: fill + apply the token mask along a valid passport answer (microseconds per token);
3. decoding: ``model.generate`` with and without the mask, same prompt, same number of new tokens
   (a free-text string field, so the random model never closes it and both runs generate the same
   number of tokens); time per token = (time for N+1 tokens - time for 1 token) / N, median of repeats,
   the two variants interleaved so that a busy machine slows both alike.

Random weights: the times say how the code runs, nothing about answers. Numbers: docs/structured-output.md.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import xgrammar
from PIL import Image
from transformers import LogitsProcessorList
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from bench_native import PROMPT, build_model
from phi_helpers.api.constrained import SchemaConstraint, apply_mask, compile_schema, grammar_compiler
from phi_helpers.models.phi3_v.image_processing_phi3_v import Phi3VImageProcessor
from phi_helpers.models.phi3_v.processing_phi3_v import Phi3VProcessor
from phi_helpers.testing import FIXTURES

SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "eval" / "schemas"
STOP = [32007, 32000]  # <|end|>, <|endoftext|>
FREE_TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
PASSPORT_ANSWER = ('{"surname":"LINDQVIST","given_names":"NOOR ELISE","passport_number":"X4R7Z1K05","nationality":"UTO",'
                   '"date_of_birth":"1988-03-14","sex":"F","expiry_date":"2033-07-21"}')


def seconds(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-crops", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny model, 1 repeat of 4 tokens: checks the script runs")
    args = parser.parse_args()
    if args.tiny:
        args.repeats, args.new_tokens = 1, 4

    tokenizer = TokenizersBackend.from_pretrained(FIXTURES)
    model = build_model("sdpa", "tiny" if args.tiny else "mid", args.device)
    vocab = model.get_output_embeddings().out_features
    print(f"torch {torch.__version__} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | "
          f"device {args.device} | vocab {vocab} | {args.new_tokens} new tokens | median of {args.repeats}")

    # 1. compile
    start = time.perf_counter()
    grammar_compiler(tokenizer, vocab, STOP)
    print(f"tokenizer info + compiler (once per tokenizer): {time.perf_counter() - start:.3f} s")
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        start = time.perf_counter()
        compile_schema(tokenizer, schema, vocab, STOP)
        first = time.perf_counter() - start
        start = time.perf_counter()
        compile_schema(tokenizer, schema, vocab, STOP)
        print(f"compile {path.name}: {first * 1000:.1f} ms (the same schema again: {(time.perf_counter() - start) * 1000:.1f} ms)")

    # 2. the mask alone, along a valid answer
    grammar = compile_schema(tokenizer, json.loads((SCHEMAS / "passport.schema.json").read_text()), vocab, STOP)
    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    scores = torch.zeros(1, vocab, device=args.device)
    pieces = tokenizer.tokenize(PASSPORT_ANSWER)
    pieces[0] = pieces[0].removeprefix("▁")  # sentencepiece adds a space before the text; an answer has none
    tokens = tokenizer.convert_tokens_to_ids(pieces)
    start = time.perf_counter()
    for token in tokens:
        matcher.fill_next_token_bitmask(bitmask)
        apply_mask(scores, bitmask)
        assert matcher.accept_token(token)
    mask_ms = (time.perf_counter() - start) / len(tokens) * 1000
    print(f"mask alone (fill + apply), passport answer of {len(tokens)} tokens: {mask_ms:.3f} ms/token")

    # 3. decoding with and without the mask
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=args.num_crops), tokenizer)
    inputs = processor(PROMPT, Image.new("RGB", (640, 480), (30, 100, 200))).to(args.device)
    free_text = compile_schema(tokenizer, FREE_TEXT, vocab, STOP)

    def generate(new_tokens: int, constrained: bool):
        extra = {"logits_processor": LogitsProcessorList([SchemaConstraint(free_text)])} if constrained else {}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=32000, eos_token_id=None, **extra)
        assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens

    generate(2, True)  # warm-up
    generate(2, False)
    per_token = {False: [], True: []}
    for _ in range(args.repeats):
        for constrained in (False, True):
            long = seconds(lambda: generate(args.new_tokens + 1, constrained), args.device)
            short = seconds(lambda: generate(1, constrained), args.device)
            per_token[constrained].append((long - short) / args.new_tokens)
    free, masked = statistics.median(per_token[False]), statistics.median(per_token[True])
    print(f"decode, unconstrained: {free * 1000:.2f} ms/token")
    print(f"decode, constrained:   {masked * 1000:.2f} ms/token  (x{masked / free:.3f}, {100 * (masked / free - 1):+.1f}%)")


if __name__ == "__main__":
    main()
