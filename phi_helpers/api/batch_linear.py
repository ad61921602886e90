"""The linear layers of a batched decoding step on a CPU: oneDNN's kernel instead of MKL's.

In a decoding step every linear layer multiplies its weight by one row per answer still being
generated. torch computes ``x @ W.T`` in fp32 on an x86 CPU with MKL, which takes a matrix-vector
kernel for 1 to 3 rows, reading the weights as fast as memory delivers them, and a matrix kernel for 4
rows and more that reads them 2-3x slower on small row counts: on this project's CPU a step for 8 rows
cost about 3 steps of one. oneDNN's kernel for the same product, on the same weights, is 1.1-2.1x
faster than MKL's at 4-64 rows with the real model's layer shapes (1.7x at 8 rows;
benchmarks/bench_native.py, "gemm" with ``--model full-width``), so ``generate_batch`` decodes with

    with batch_kernels(model, rows=len(prompts)):   # OneDnnLinear() where it pays
        model.generate(...)

which sends every fp32 ``F.linear`` of 4-64 rows on the CPU to ``torch.ops.mkldnn._linear_pointwise``
(torch's oneDNN linear operator, which torch.compile's CPU backend also calls). The weights stay as
they are: no second copy, no packing. Anything else (1-3 rows, a prefill's hundreds of rows, GPUs,
bf16, quantized weights, gradients) runs ``F.linear`` as before, and so does everything on a torch
build without MKL or oneDNN.

The products differ from MKL's in their last bits, as MKL's own 8 rows already differ from 8 one-row
products; the answers are those of one prompt at a time (tests/test_batch_linear.py). A
``TorchFunctionMode`` is local to the thread that enters it and changes no module, so a model can be
shared by threads and quantized as usual.
"""

from contextlib import nullcontext

import torch
from torch.nn.functional import linear
from torch.overrides import TorchFunctionMode

ONEDNN_ROWS = range(4, 65)  # where oneDNN's kernel beat MKL's at the real layer shapes ("gemm" row sweep)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a quantized tensor subclass


def onednn_available() -> bool:
    """Does this torch build have MKL (which oneDNN replaces) and oneDNN's linear operator?"""
    return (
        torch.backends.mkl.is_available()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def batch_kernels(model, rows: int):
    """``OneDnnLinear()`` for decoding ``rows`` rows with ``model`` on a CPU where it pays, else a context
    that changes nothing."""
    if model.device.type == "cpu" and rows >= ONEDNN_ROWS.start and onednn_available():
        return OneDnnLinear()
    return nullcontext()


class OneDnnLinear(TorchFunctionMode):
    """While entered, fp32 CPU ``F.linear`` calls with ``ONEDNN_ROWS`` rows run on oneDNN (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is linear and _takes_onednn(*args, **kwargs):
            return _onednn_linear(*args, **kwargs)
        return func(*args, **kwargs)


def _takes_onednn(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    rows = input.numel() // input.shape[-1] if input.dim() >= 2 and input.shape[-1] else 0
    return (
        rows in ONEDNN_ROWS
        and not torch.is_grad_enabled()
        and type(input) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
        and input.device.type == weight.device.type == "cpu"
        and input.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
    )


def _onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # input (..., in_features) -> (rows, in_features) -> (rows, out_features) -> (..., out_features)
    out = torch.ops.mkldnn._linear_pointwise(input.reshape(-1, input.shape[-1]), weight, bias, "none", [], "")
    return out.reshape(*input.shape[:-1], weight.shape[0])


__all__ = ["ONEDNN_ROWS", "OneDnnLinear", "batch_kernels", "onednn_available"]
