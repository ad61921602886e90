"""OneDnnLinear: the linear layers of a batched decoding step on oneDNN (4-64 rows, fp32, CPU), the
same products up to rounding, everything else untouched; generate_batch decodes 4+ prompts with it."""

import pytest
import torch
from PIL import Image
from op_calls import CountCalls
from torch.nn.functional import linear

from phi_helpers.api import batch_linear
from phi_helpers.api.batch_linear import ONEDNN_ROWS, OneDnnLinear, onednn_available
from phi_helpers.api.generation import generate_batch

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no MKL or no oneDNN")
PROMPT = "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"


def onednn_calls() -> CountCalls:
    """Counts the calls of oneDNN's linear operator and of torch's own linear (MKL) while active."""
    return CountCalls(
        onednn=(torch.ops.mkldnn._linear_pointwise.default,),
        mkl=(torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default),
    )


def test_the_locked_torch_has_the_operator():
    """x86-64 CPU wheels of torch have MKL and oneDNN; a release without the private operator fails here
    (the drift check) rather than silently decoding batches on the slower kernel."""
    if torch.backends.mkl.is_available():
        assert onednn_available()


@needs_onednn
@pytest.mark.parametrize("shape", [(4, 96), (8, 1, 96), (2, 32, 96), (ONEDNN_ROWS.stop - 1, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_run_on_onednn_with_the_same_products(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    layer = torch.nn.Linear(96, 160, bias=with_bias)
    with torch.inference_mode():
        expected = layer(x)
        with OneDnnLinear(), onednn_calls() as calls:
            got = layer(x)
            transposed = linear(x.transpose(-1, -2).contiguous().transpose(-1, -2), layer.weight, layer.bias)
    assert (calls.onednn, calls.mkl) == (2, 0)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(transposed, expected, atol=1e-5)  # a strided input is read as it is


@needs_onednn
@pytest.mark.parametrize("rows", [1, ONEDNN_ROWS.start - 1, ONEDNN_ROWS.stop, 773])
def test_other_row_counts_stay_on_mkl(rows):
    layer = torch.nn.Linear(96, 160)
    with torch.inference_mode(), OneDnnLinear(), onednn_calls() as calls:
        layer(torch.randn(1, rows, 96))
    assert calls.onednn == 0 and calls.mkl == 1


@needs_onednn
def test_gradients_bf16_and_tensor_subclasses_stay_on_linear():
    layer = torch.nn.Linear(96, 160)
    x = torch.randn(8, 96)
    with OneDnnLinear(), onednn_calls() as calls:
        layer(x).sum().backward()  # autograd: oneDNN's operator has no backward
        with torch.inference_mode():
            linear(x.bfloat16(), layer.weight.bfloat16())

            class Quantized(torch.Tensor):  # stands for torchao's and bitsandbytes' weight types
                pass

            linear(x, layer.weight.detach().as_subclass(Quantized))
    assert calls.onednn == 0 and layer.weight.grad is not None


@needs_onednn
def test_generate_batch_decodes_four_prompts_on_onednn_with_the_answers_of_one_at_a_time(
    monkeypatch, cli_model_and_processor
):
    model, processor = cli_model_and_processor
    colours = ["red", "blue", "white", "green"]
    images = [[Image.new("RGB", (80 + 30 * i, 60), colour)] for i, colour in enumerate(colours)]
    one_at_a_time = [generate_batch(model, processor, [PROMPT], [group], max_new_tokens=6)[0].text for group in images]
    with onednn_calls() as calls:
        together = generate_batch(model, processor, [PROMPT] * 4, images, max_new_tokens=6)
    assert calls.onednn > 0  # the decoding steps of 4 rows ran on oneDNN
    assert [result.text for result in together] == one_at_a_time
    assert len(set(one_at_a_time)) > 1  # different images, different answers: the rows were not mixed up
    monkeypatch.setattr(batch_linear, "ONEDNN_ROWS", range(0))  # as before: MKL only
    with onednn_calls() as calls:
        assert [result.text for result in generate_batch(model, processor, [PROMPT] * 4, images, 6)] == one_at_a_time
    assert calls.onednn == 0
