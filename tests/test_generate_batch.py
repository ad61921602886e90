"""generate_batch on the tiny random model: finished rows leave the batch, answers stay the same."""

import torch
from PIL import Image

from phi_helpers.api import generation
from phi_helpers.api.generation import generate_batch

PROMPTS = [
    "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n",
    "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them, please.<|end|>\n<|assistant|>\n",
    "<|user|>\nNo picture here, just a question.<|end|>\n<|assistant|>\n",
]


def images():
    return [[Image.new("RGB", (200, 120), "red")], [Image.new("RGB", (90, 160), "blue"), Image.new("RGB", (64, 64), "white")], []]


def test_finished_rows_leave_the_batch_and_answers_equal_one_plain_generate(monkeypatch, cli_model_and_processor):
    model, processor = cli_model_and_processor
    steps = 8
    # Reference: one plain batched generate without stop tokens (finished rows would stay in the batch).
    inputs = generation.encode(model, processor, PROMPTS, images(), steps)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = plain[:, inputs["input_ids"].shape[1] :].tolist()
    # Make the third token of row 0 a stop token: row 0 ends after 3 tokens (or earlier), the others go on.
    stop = plain[0][2]
    monkeypatch.setattr(generation, "_stop_token_ids", lambda model, processor: [stop])
    batch_sizes = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: batch_sizes.append(out.logits.shape[0]), with_kwargs=True)
    try:
        results = generate_batch(model, processor, PROMPTS, images(), max_new_tokens=steps)
    finally:
        hook.remove()
    for row, result in enumerate(results):
        expected = plain[row][: plain[row].index(stop) + 1] if stop in plain[row] else plain[row]
        assert result.generated_tokens == len(expected), f"row {row}"
        answer = expected[:-1] if expected[-1] == stop else expected  # the answer ends before its stop token
        assert result.text == processor.tokenizer.decode(answer, skip_special_tokens=True).strip(), f"row {row}"
    unfinished_rows = sum(stop not in tokens for tokens in plain)
    assert unfinished_rows >= 1  # otherwise the test proves nothing: pick another stop token
    assert batch_sizes[0] == 3 and batch_sizes[-1] == unfinished_rows  # the finished rows stopped costing compute
    assert len(batch_sizes) == steps  # one forward per new token, however the rounds were cut
