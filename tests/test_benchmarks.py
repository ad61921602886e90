"""The benchmark scripts still run (their --tiny dry runs), and the equalities they print hold.

They measure nothing here: the numbers in the docs come from full runs, as the docstring at the top
of each script says."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script",
    [
        ["bench_native.py", "--tiny"],
        ["bench_gpu.py", "--device", "cpu", "--tiny"],
        ["bench_gpu_quantization.py", "--device", "cpu", "--tiny"],
        ["bench_constrained.py", "--tiny"],
        ["bench_extract_json.py", "--size", "400"],
    ],
)
def test_benchmark_dry_run(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script[0]), *script[1:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "False" not in result.stdout, result.stdout  # pixel_values / features / logits / answers all equal
    assert "FAILED" not in result.stdout, result.stdout  # bench_gpu: every configuration ran
    available = [line for line in result.stdout.splitlines() if "not available" in line]
    assert all(line.startswith("int4") for line in available), result.stdout  # only NF4 needs a CUDA GPU


@pytest.mark.parametrize("script", sorted(path.name for path in BENCHMARKS.glob("bench_*.py")))
def test_every_benchmark_answers_help_without_running(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), (result.stdout + result.stderr)[-2000:]
