"""Images per second of the Ray engine with 1 and 2 model replicas, on a local Ray.

    python benchmarks/bench_ray.py                         # tiny random checkpoint, CPU, a few minutes
    python benchmarks/bench_ray.py --model microsoft/Phi-3.5-vision-instruct --images 64   # a GPU machine

For each replica count the same folder of generated images goes through ``predict_dataset`` (task
``caption``) and the driver notes when each record arrives. Two rates per run:

* ``steady``: records after the first one, divided by the time from the first record to the last: the
  rate once every replica has loaded its model (what a long job sees);
* ``overall``: all records over the whole run, model loading included (what a short job sees).

Then ``r1`` (one replica's steady rate) and the efficiency ``e2 = r2 / (2 * r1)`` give the expected
rate on N replicas: ``rN ≈ N * r1 * eN`` (see docs/scaling.md). Random weights: the numbers say how
the engine runs, nothing about answers. Not a test; the numbers go to docs/scaling.md.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from phi_helpers.cli.ray_engine import item_dataset, iter_records, predict_dataset, require_ray, start_ray
from phi_helpers.testing import make_tiny_checkpoint


def make_images(folder: Path, count: int) -> None:
    for index in range(count):
        shade = (index * 37) % 256
        Image.new("RGB", (336 + 8 * (index % 4), 336), (shade, 255 - shade, 128)).save(folder / f"image_{index:03d}.png")


def run_once(folder: Path, model: str, replicas: int, args) -> dict:
    items = item_dataset([str(folder)])
    records = predict_dataset(
        items, "caption", model, replicas=replicas, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        num_crops=args.num_crops, cpus_per_replica=args.cpus_per_replica,
    )
    start = time.perf_counter()
    arrivals = [time.perf_counter() for record in iter_records(records, args.images, f"{replicas} replica(s)") if "error" not in record]
    end = time.perf_counter()
    first = arrivals[0]
    # Records arrive a batch at a time: the steady rate counts the records after the first batch.
    after_first_batch = [t for t in arrivals if t > first + 1e-3]
    # One batch in all (no more images than --batch-size): no steady rate to measure.
    steady = len(after_first_batch) / (arrivals[-1] - first) if after_first_batch else float("nan")
    return {"replicas": replicas, "records": len(arrivals), "seconds": end - start,
            "overall": len(arrivals) / (end - start), "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or folder (default: a tiny random checkpoint built here)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-crops", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    ray = require_ray()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = args.model or str(make_tiny_checkpoint(work / "tiny", variant="phi-3.5-vision"))
        folder = work / "images"
        folder.mkdir()
        make_images(folder, args.images)
        start_ray(num_cpus=max(os.cpu_count(), max(args.replicas) + 1), dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            results = [run_once(folder, model, replicas, args) for replicas in args.replicas]
        finally:
            ray.shutdown()

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model: {args.model or 'tiny random'}; "
          f"{args.images} images, batch {args.batch_size}, {args.max_new_tokens} new tokens, num_crops {args.num_crops}")
    print("| replicas | records | seconds | overall images/s | steady images/s | efficiency vs 1 replica |")
    print("|---|---|---|---|---|---|")
    r1 = results[0]["steady"] / results[0]["replicas"]
    for result in results:
        efficiency = result["steady"] / (result["replicas"] * r1) if r1 > 0 else float("nan")  # NaN > 0 is False
        print(f"| {result['replicas']} | {result['records']} | {result['seconds']:.1f} | {result['overall']:.2f} | "
              f"{result['steady']:.2f} | {efficiency:.2f} |")
    if r1 > 0:
        print(f"\nr1 = {r1:.2f} images/s per replica; expected on N replicas: N x {r1:.2f} x e_N")
    else:
        print(f"\nNo steady rate: every record came in the first batch. Use more --images than --batch-size ({args.batch_size}).")


if __name__ == "__main__":
    main()
