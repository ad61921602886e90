"""PreallocatedCache: the same answers as DynamicCache, written in place instead of copied every step."""

import pytest
import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria

from phi_helpers.api import generation, kv_cache
from phi_helpers.api.kv_cache import GROWTH, PreallocatedCache, PreallocatedLayer

PROMPTS = [
    "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n",
    "<|user|>\nJust text, a little longer than the first one.<|end|>\n<|assistant|>\n",
]
STEPS = 6


@pytest.fixture(scope="module")
def model_inputs(cli_model_and_processor):
    model, processor = cli_model_and_processor
    inputs = generation.encode(model, processor, PROMPTS, [[Image.new("RGB", (200, 120), "red")], []], STEPS)
    return model, inputs


def greedy(model, inputs, cache, steps=STEPS):
    with torch.inference_mode():
        output = model.generate(
            **inputs, cache=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )
    return output.sequences, torch.stack(output.scores)


@pytest.mark.parametrize("capacity", [64 + STEPS, 3])  # room for everything; far too small (grows)
def test_same_tokens_and_scores_as_dynamic_cache(model_inputs, capacity):
    model, inputs = model_inputs
    tokens, scores = greedy(model, inputs, DynamicCache(config=model.config))
    cache = PreallocatedCache(model.config, capacity=capacity)
    same_tokens, same_scores = greedy(model, inputs, cache)
    assert torch.equal(tokens, same_tokens) and torch.equal(scores, same_scores)
    layer = cache.layers[0]
    assert isinstance(layer, PreallocatedLayer) and layer.keys.data_ptr() == layer.key_buffer.data_ptr()
    assert layer.get_seq_length() == tokens.shape[1] - 1  # the last token is generated, not yet cached


def test_decoding_steps_write_into_one_buffer(model_inputs):
    """After the prefill, no step allocates a new buffer: the keys stay a view of the same memory."""
    model, inputs = model_inputs
    length = inputs["input_ids"].shape[1]
    cache = PreallocatedCache(model.config, capacity=length + STEPS)
    buffers = set()
    hook = model.register_forward_hook(lambda *args: buffers.add(cache.layers[-1].key_buffer.data_ptr()))
    try:
        greedy(model, inputs, cache)
    finally:
        hook.remove()
    assert len(buffers) == 1 and cache.layers[-1].key_buffer.shape[2] == length + STEPS


def test_rows_removed_from_the_batch_continue_like_dynamic_cache(model_inputs):
    """batch_select_indices (generate_batch's finished rows), then two more steps: the same as DynamicCache."""
    model, inputs = model_inputs
    results = []
    for cache in (DynamicCache(config=model.config), PreallocatedCache(model.config, capacity=128)):
        sequences, _ = greedy(model, inputs, cache, steps=2)
        cache.batch_select_indices(torch.tensor([1]))
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(2, 2)], dim=1)[1:]
        results.append(greedy(model, {"input_ids": sequences[1:], "attention_mask": mask}, cache, steps=3))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_crop_and_reset(model_inputs):
    model, inputs = model_inputs
    cache = PreallocatedCache(model.config, capacity=128)
    greedy(model, inputs, cache, steps=2)
    length = cache.get_seq_length()
    cache.crop(-1)
    assert cache.get_seq_length() == length - 1 and cache.layers[0].keys.data_ptr() == cache.layers[0].key_buffer.data_ptr()
    cache.reset()
    assert cache.get_seq_length() == 0
    tokens, scores = greedy(model, inputs, cache)  # a reset cache is filled again from the start
    assert torch.equal(tokens, greedy(model, inputs, DynamicCache(config=model.config))[0])


def test_ask_uses_a_cache_sized_for_prompt_and_answer(monkeypatch, cli_model_and_processor):
    model, processor = cli_model_and_processor
    caches = []
    generate = model.generate

    def spy(**kwargs):
        caches.append(kwargs.get("cache"))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generation.ask(model, processor, "What is this?", max_new_tokens=4)
    assert isinstance(caches[0], PreallocatedCache) and caches[0].layers[0].capacity > 4


def test_buffers_start_small_and_double_up_to_the_capacity(monkeypatch):
    """Before: the whole capacity was allocated at the first step (max_new_tokens=32768 reserved 12 GiB
    of the real model's memory, even for a one-token answer)."""
    monkeypatch.setattr(kv_cache, "GROWTH", 4)
    layer, written, rooms = PreallocatedLayer(capacity=100), [], []
    for step in range(120):  # a prompt of 3 tokens, then one token at a time, past the capacity
        keys = torch.randn(1, 2, 3 if step == 0 else 1, 5)
        layer.update(keys, -keys)
        written.append(keys)
        rooms.append(layer.key_buffer.shape[2])
    assert sorted(set(rooms)) == [7, 14, 28, 56, 100, 200]  # 3 + 4, doubled, capped at 100; then past it
    assert torch.equal(layer.keys, torch.cat(written, dim=2)) and torch.equal(layer.values, -layer.keys)


class StopAfter(StoppingCriteria):
    """Ends generation after ``tokens`` new tokens, whatever the model writes."""

    def __init__(self, tokens):
        self.tokens, self.calls = tokens, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.tokens, dtype=torch.bool)


def spy_caches(monkeypatch, model):
    caches, generate = [], model.generate

    def spy(**kwargs):
        caches.append((kwargs.get("cache"), kwargs["input_ids"].shape[1]))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return caches


def test_a_short_answer_with_a_huge_max_new_tokens_takes_little_memory(monkeypatch, cli_model_and_processor):
    model, processor = cli_model_and_processor
    caches = spy_caches(monkeypatch, model)
    generation.ask(model, processor, "What is this?", max_new_tokens=30_000, stopping_criteria=[StopAfter(2)])
    cache, prompt = caches[0]
    assert cache.layers[0].capacity == prompt + 30_000
    assert cache.layers[0].key_buffer.shape[2] == prompt + GROWTH


def test_a_long_answer_grows_the_buffers_and_equals_dynamic_cache(monkeypatch, cli_model_and_processor):
    model, processor = cli_model_and_processor
    monkeypatch.setattr(kv_cache, "GROWTH", 2)
    reference = generation.ask(model, processor, "Tell a story.", max_new_tokens=24, min_new_tokens=24,
                               cache=DynamicCache(config=model.config))
    caches = spy_caches(monkeypatch, model)
    rooms = []
    hook = model.register_forward_hook(lambda *args: rooms.append(caches[0][0].layers[0].key_buffer.shape[2]))
    try:
        answer = generation.ask(model, processor, "Tell a story.", max_new_tokens=24, min_new_tokens=24)
    finally:
        hook.remove()
    prompt = caches[0][1]
    assert answer == reference
    assert rooms[0] == prompt + 2 and rooms[-1] == prompt + 24  # grew from 2 answer tokens to all 24
