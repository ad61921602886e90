"""generate_batch on the tiny random model: finished rows leave the batch, answers stay the same."""

import re

import pytest
import torch
from PIL import Image

from phi_helpers.api import generation
from phi_helpers.api.generation import generate_batch
from phi_helpers.errors import InvalidArgumentError, PromptError

PROMPTS = [
    "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n",
    "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them, please.<|end|>\n<|assistant|>\n",
    "<|user|>\nNo picture here, just a question.<|end|>\n<|assistant|>\n",
]


def images():
    return [[Image.new("RGB", (200, 120), "red")], [Image.new("RGB", (90, 160), "blue"), Image.new("RGB", (64, 64), "white")], []]


def generate_counting_rows(model, processor, prompts, pictures, steps):
    """generate_batch's results, and the number of rows of every forward pass it made."""
    batch_sizes = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: batch_sizes.append(out.logits.shape[0]), with_kwargs=True)
    try:
        return generate_batch(model, processor, prompts, pictures, max_new_tokens=steps), batch_sizes
    finally:
        hook.remove()


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
    results, batch_sizes = generate_counting_rows(model, processor, PROMPTS, images(), steps)
    for row, result in enumerate(results):
        expected = plain[row][: plain[row].index(stop) + 1] if stop in plain[row] else plain[row]
        assert result.generated_tokens == len(expected), f"row {row}"
        answer = expected[:-1] if expected[-1] == stop else expected  # the answer ends before its stop token
        assert result.text == processor.tokenizer.decode(answer, skip_special_tokens=True).strip(), f"row {row}"
    unfinished_rows = sum(stop not in tokens for tokens in plain)
    assert unfinished_rows >= 1  # otherwise the test proves nothing: pick another stop token
    prefill, decoding = batch_sizes[:3], batch_sizes[3:]
    assert prefill == [1, 1, 1]  # the prompts were encoded one at a time (all but their last token)
    assert decoding[0] == 3 and decoding[-1] == unfinished_rows  # the finished rows stopped costing compute
    assert len(decoding) == steps  # one forward per new token, however the rounds were cut


def test_prefill_in_groups_fills_the_cache_of_one_batched_pass(cli_model_and_processor):
    """One prompt at a time, each without its left padding, gives the keys and values of one pass over
    all of them at every real position, and zeros (masked) at the padding."""
    model, processor = cli_model_and_processor
    inputs = generation.encode(model, processor, PROMPTS, images(), 4)
    length = inputs["input_ids"].shape[1]
    one_pass = generation.PreallocatedCache(model.config, length)
    grouped = generation.PreallocatedCache(model.config, length)
    head = {key: value for key, value in inputs.items() if key in ("pixel_values", "image_sizes")}
    mask = inputs["attention_mask"][:, :-1]
    passes = []
    with torch.inference_mode():
        model(input_ids=inputs["input_ids"][:, :-1], attention_mask=mask, cache=one_pass, **head,
              position_ids=(mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0))
        hook = model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(kwargs["input_ids"].shape), with_kwargs=True)
        try:
            generation._prefill_in_groups(model, inputs, [len(group) for group in images()], grouped)
        finally:
            hook.remove()
    assert passes == [(1, int(tokens)) for tokens in mask.sum(-1)]  # each prompt's own tokens, no padding
    assert mask.sum(-1).min() < length - 1  # otherwise there is no padding to leave out: change PROMPTS
    assert grouped.get_seq_length() == length - 1
    real = mask.bool()[:, None, :, None]  # one pass computed keys for the padding too; they are masked
    for ours, theirs in zip(grouped.layers, one_pass.layers):
        assert torch.allclose(ours.keys * real, theirs.keys * real, atol=1e-5)
        assert torch.allclose(ours.values * real, theirs.values * real, atol=1e-5)
        assert not (ours.keys * ~real).any() and not (ours.values * ~real).any()


def test_prompts_past_the_original_context_are_prefilled_in_one_pass(monkeypatch, cli_model_and_processor):
    """The long RoPE factors are chosen per forward pass: a prompt past original_max_position_embeddings
    must be encoded by one pass, as generate does."""
    model, processor = cli_model_and_processor
    inputs = generation.encode(model, processor, PROMPTS, images(), 4)
    monkeypatch.setattr(model.config, "original_max_position_embeddings", inputs["input_ids"].shape[1] - 1)
    cache = generation.PreallocatedCache(model.config, inputs["input_ids"].shape[1])
    generation._prefill_in_groups(model, inputs, [len(group) for group in images()], cache)
    assert cache.get_seq_length() == 0  # left to generate


def test_a_batch_that_can_reach_the_long_rope_factors_keeps_every_row_to_the_end(monkeypatch, cli_model_and_processor):
    """Past original_max_position_embeddings the factors follow the longest row: if that row left the
    batch when done, the others would switch back to the short factors mid-answer. Such a batch runs as
    one plain generate, as the original does."""
    model, processor = cli_model_and_processor
    steps = 8
    long_text = "<|user|>\n" + "No picture here, just a long question. " * 120 + "<|end|>\n<|assistant|>\n"
    prompts, pictures = [PROMPTS[0], long_text, PROMPTS[2]], lambda: [images()[0], [], []]
    inputs = generation.encode(model, processor, prompts, pictures(), steps)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    longest = lengths.index(max(lengths))
    limit = max(lengths) + 1  # the longest row's answer crosses it; the others' never do
    assert sorted(lengths)[-2] + steps < limit  # otherwise the test proves nothing: change PROMPTS
    monkeypatch.setattr(model.config, "original_max_position_embeddings", limit)
    monkeypatch.setattr(model.model.rotary_emb, "limit", limit)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = plain[:, inputs["input_ids"].shape[1] :].tolist()
    stop = plain[longest][3]  # the longest row ends after 4 tokens (or earlier)
    assert any(stop not in tokens for tokens in plain)  # otherwise nobody would go on: change the prompts
    monkeypatch.setattr(generation, "_stop_token_ids", lambda model, processor: [stop])
    with torch.inference_mode():
        reference = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=stop, pad_token_id=0)
    reference = reference[:, inputs["input_ids"].shape[1] :].tolist()
    results, batch_sizes = generate_counting_rows(model, processor, prompts, pictures(), steps)
    assert set(batch_sizes[len(prompts):]) == {len(prompts)}  # after the prompts (one at a time), nobody left
    for row, result in enumerate(results):
        expected = reference[row][: reference[row].index(stop)] if stop in reference[row] else reference[row]
        assert result.text == processor.tokenizer.decode(expected, skip_special_tokens=True).strip(), f"row {row}"

def test_batches_of_the_wrong_shape_are_refused_with_what_to_pass(cli_model_and_processor):
    model, processor = cli_model_and_processor
    prompt, picture = "<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", Image.new("RGB", (40, 30))
    for prompts, images, message in [
        ([], [], "non-empty list of prompts"),
        (prompt, [[picture]], "non-empty list of prompts"),  # a string is not a list of prompts
        ([prompt, prompt], [picture, picture], "one list of images per prompt"),
        ([prompt, prompt], [[picture]], "one list of images per prompt"),
    ]:
        with pytest.raises(PromptError, match=message):
            generate_batch(model, processor, prompts, images, max_new_tokens=2)


def test_questions_and_images_are_taken_as_ask_takes_them(cli_model_and_processor, tmp_path):
    """A plain question gets the chat template, and an image may be a path or have transparency, as in
    ``ask``. Before: the question went to the model without the template (no error, worse answers), a path
    was refused, and a transparent PNG was read another way than ``ask`` reads it."""
    model, processor = cli_model_and_processor
    clear = Image.new("RGBA", (120, 90), (255, 0, 0, 0))  # transparent red: white in ask, red in the processor
    clear.save(tmp_path / "clear.png")
    questions, pictures = ["What is this?", "Hi", "And this?"], [[clear], [], [str(tmp_path / "clear.png")]]
    batch = generate_batch(model, processor, questions, pictures, max_new_tokens=6)
    alone = [generation.ask(model, processor, q, images=p, max_new_tokens=6) for q, p in zip(questions, pictures)]
    assert [result.text for result in batch] == alone
    templated = generate_batch(model, processor, [generation.build_prompt("Hi", num_images=0)], [[]], max_new_tokens=6)
    assert templated[0].text == alone[1]


def test_text_only_batches_are_padded_on_the_left_and_answer_as_ask_does(cli_model_and_processor):
    """Before: a batch without images was padded on the right (the tokenizer's side), so the shorter
    prompts went on after their padding and got other answers than on their own."""
    model, processor = cli_model_and_processor
    questions = ["Write a long story about a cat please.", "Hi", "word " * 30]
    inputs = generation.encode(model, processor, [generation.build_prompt(q, num_images=0) for q in questions], [[]] * 3, 4)
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()  # padding on the left
    batch = generate_batch(model, processor, questions, [[], [], []], max_new_tokens=10)
    assert [result.text for result in batch] == [generation.ask(model, processor, q, max_new_tokens=10) for q in questions]
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    batch = generate_batch(model, processor, questions, [[], [], []], max_new_tokens=10, schema=schema)
    alone = [generation.ask(model, processor, q, max_new_tokens=10, schema=schema) for q in questions]
    assert [result.text for result in batch] == alone


def test_sampling_settings_and_num_crops_are_taken_as_ask_takes_them(monkeypatch, cli_model_and_processor):
    """Before: generate_batch took no settings (TypeError), so a batch could neither sample nor set the tiles."""
    model, processor = cli_model_and_processor
    questions, pictures = ["What is this?", "Hi"], [[Image.new("RGB", (200, 120), "red")], []]
    tiles = generate_batch(model, processor, questions, pictures, max_new_tokens=6, num_crops=4)
    alone = [generation.ask(model, processor, q, images=p, max_new_tokens=6, num_crops=4) for q, p in zip(questions, pictures)]
    assert [result.text for result in tiles] == alone
    default = generate_batch(model, processor, questions, pictures, max_new_tokens=6)
    assert tiles[0].prompt_tokens > default[0].prompt_tokens  # 4 crops: more image tokens than the processor's 1
    calls = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: calls.append(kwargs) or real_generate(**kwargs))
    torch.manual_seed(0)
    sampled = generate_batch(model, processor, questions, pictures, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50)
    assert calls[0]["do_sample"] is True and calls[0]["temperature"] == 1.5 and calls[0]["top_k"] == 50
    assert [result.text for result in sampled] != [result.text for result in default]  # not greedy
    torch.manual_seed(0)
    again = generate_batch(model, processor, questions, pictures, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50)
    assert [result.text for result in again] == [result.text for result in sampled]  # the seed decides


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop_strings=["x"]), "generate_batch does not take stop_strings"),
    (dict(min_new_tokens=3), "call ask() once per prompt"),
    (dict(temprature=0.7), "did you mean temperature=...?"),
    (dict(top_p=2.0), "top_p must be a number above 0 and at most 1"),
])
def test_settings_that_do_not_hold_across_rounds_are_refused(cli_model_and_processor, kwargs, message):
    model, processor = cli_model_and_processor
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        generate_batch(model, processor, ["Hi"], [[]], max_new_tokens=4, **kwargs)


def test_a_checkpoints_min_new_tokens_holds_across_the_rounds(monkeypatch, cli_model_and_processor):
    """generation_config.json may set min_new_tokens: each round of generate started it again, so a row still
    going when another finished had its stop token suppressed once more and ran on (ask stopped it)."""
    model, processor = cli_model_and_processor
    prompts, pictures, steps = PROMPTS[:2], images()[:2], 10
    inputs = generation.encode(model, processor, prompts, pictures, steps)
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = plain[:, inputs["input_ids"].shape[1] :].tolist()
    # Row 0 stops after p + 1 tokens (the first round ends there), row 1 one token later: the first of round 2.
    p = next(p for p in range(2, steps - 2) if plain[0][p] not in plain[0][:p] + plain[1][: p + 2]
             and plain[1][p + 1] not in plain[0][: p + 1] + plain[1][: p + 1])
    stops = [plain[0][p], plain[1][p + 1]]
    monkeypatch.setattr(generation, "_stop_token_ids", lambda model, processor: stops)
    monkeypatch.setattr(model.generation_config, "min_new_tokens", 2)  # no stop in the first 2 tokens: none is there
    results = generate_batch(model, processor, prompts, pictures, max_new_tokens=steps)
    assert [result.generated_tokens for result in results] == [p + 1, p + 2]
