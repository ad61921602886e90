"""How the time of ``extract_json`` grows with the length of brace-heavy answers.

    python benchmarks/bench_extract_json.py              # n = 20,000 and 80,000 characters: under a minute
    python benchmarks/bench_extract_json.py --size 400   # a smoke run (seconds, most of them importing)

For each kind of hostile text, times ``extract_json`` at a length n and at 4n, and the same for the
previous method (``raw_decode`` tried at every bracket, kept here as the baseline). Linear time shows
as a ratio near 4 between the two lengths, quadratic time as a ratio near 16. Not a test; numbers go
to docs/batch-robustness.md.
"""

import argparse
import json
import platform
import time

from phi_helpers.api.parsing import extract_json
from phi_helpers.errors import JSONExtractionError

TEXTS = {  # each makes a text of about n characters
    "{x} repeated": lambda n: "{x}" * (n // 3),
    "unclosed keys": lambda n: '{"a": [1, ' * (n // 10),
    "prose with brackets": lambda n: "a { b [ c } d ] " * (n // 16),
    "invalid nests of 40": lambda n: ("[" * 40 + "1," + "]" * 40) * (n // 82),
}
REPEATS = {"extract_json": 5, "raw_decode everywhere": 1}  # the best of these runs is reported


def decode_at_every_bracket(text: str):
    """The previous method: raw_decode at each '{' and '[' from left to right (quadratic)."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text, start)[0]
            except (json.JSONDecodeError, RecursionError):
                continue
    return None


def seconds(function, text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        try:
            function(text)
        except JSONExtractionError:
            pass
        best = min(best, time.perf_counter() - begin)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000, metavar="N", help="n, in characters (default: 20,000)")
    args = parser.parse_args()
    sizes = (args.size, 4 * args.size)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'text':22} {'method':22} {'n=' + str(sizes[0]):>10} {'n=' + str(sizes[1]):>10} {'ratio':>7}")
    for name, make in TEXTS.items():
        for label, function in (("extract_json", extract_json), ("raw_decode everywhere", decode_at_every_bracket)):
            small, large = (seconds(function, make(size), REPEATS[label]) for size in sizes)
            print(f"{name:22} {label:22} {small:10.4f} {large:10.4f} {large / small:7.1f}")


if __name__ == "__main__":
    main()
