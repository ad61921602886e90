"""Behaviour a mutation audit found unprotected: one small test for each (tiny random model)."""

import json

import pytest
import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from cli_runner import run
from phi_helpers import PromptImageMismatchError, ask, build_prompt, extract
from phi_helpers.api import hardware
from phi_helpers.api.constrained import read_answer
from phi_helpers.api.generation import generate_batch, stream_chunks
from phi_helpers.errors import InvalidArgumentError, JSONExtractionError


@pytest.fixture
def model_and_processor(tiny_model_and_processor):
    return tiny_model_and_processor


@pytest.fixture
def image():
    return Image.new("RGB", (200, 120), "red")


def test_generate_refuses_image_tokens_without_pixel_values(model_and_processor, image):
    model, processor = model_and_processor
    inputs = processor(build_prompt("What is this?", num_images=1), image, return_tensors="pt")
    with pytest.raises(PromptImageMismatchError):
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=1)


def test_beam_search_gives_the_same_answer_with_a_dynamic_cache(model_and_processor, image):
    model, processor = model_and_processor
    ours = ask(model, processor, "What is this?", images=[image], max_new_tokens=12, num_beams=3)
    dynamic = ask(
        model, processor, "What is this?", images=[image], max_new_tokens=12, num_beams=3,
        cache=DynamicCache(config=model.config),
    )
    assert ours == dynamic


def test_predict_appends_after_a_last_record_without_newline(capsys, tiny_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for color in ("red", "blue"):
        Image.new("RGB", (60, 40), color).save(folder / f"{color}.png")
    output = tmp_path / "out.jsonl"
    options = ["--task", "caption", "--output", output, "--num-crops", "1", "--max-new-tokens", "2"]
    assert run(capsys, "predict", "--image", folder, *options)[0] == 0
    output.write_bytes(output.read_bytes().rstrip(b"\n"))  # an editor saved it without the final newline
    Image.new("RGB", (60, 40), "green").save(folder / "green.png")
    assert run(capsys, "predict", "--image", folder, *options)[0] == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(record["source"].rsplit("/", 1)[-1] for record in records) == ["blue.png", "green.png", "red.png"]
    assert not output.with_name(output.name + ".torn").exists()


@pytest.mark.parametrize(
    "capability, expected", [((8, 0), "flash_attention_2"), ((8, 6), "flash_attention_2"), ((7, 5), "sdpa")]
)
def test_flash_attention_from_ampere_on(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: True)
    assert hardware.pick_attention("auto", "cuda", torch.bfloat16)[0] == expected


def test_batched_prompt_tokens_are_each_prompts_own(model_and_processor, image):
    model, processor = model_and_processor
    prompts, images = ["Hi", "What is this?"], [[], [image]]
    alone = [
        generate_batch(model, processor, [prompt], [pictures], max_new_tokens=2)[0].prompt_tokens
        for prompt, pictures in zip(prompts, images)
    ]
    batched = [row.prompt_tokens for row in generate_batch(model, processor, prompts, images, max_new_tokens=2)]
    assert alone[0] < alone[1]
    assert batched == alone


def test_stream_drops_a_final_end_of_sequence_token_as_ask_does(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    reply_ids = processor.tokenizer.encode("Hello world", add_special_tokens=False) + [2]  # 2 is </s>

    def fake_generate(**kwargs):
        if kwargs.get("streamer") is not None:
            kwargs["streamer"].put(kwargs["input_ids"])
            for token in reply_ids:
                kwargs["streamer"].put(torch.tensor([token]))
            kwargs["streamer"].end()
        return torch.cat([kwargs["input_ids"], torch.tensor([reply_ids])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    answer = ask(model, processor, "Hi", max_new_tokens=8)
    assert answer == "Hello world"
    assert "".join(stream_chunks(model, processor, "Hi", max_new_tokens=8)) == answer


def test_read_answer_checks_the_maximum():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}}}
    with pytest.raises(JSONExtractionError, match="maximum"):
        read_answer('{"a": 5}', schema)


def test_a_logits_processor_that_forbids_the_schema_is_an_argument_error(model_and_processor):
    model, processor = model_and_processor

    class OnlyOneWord(LogitsProcessor):  # allows token 15043 only, which no JSON answer can start with
        def __call__(self, input_ids, scores):
            keep = scores[:, 15043].clone()
            scores[:] = -float("inf")
            scores[:, 15043] = keep
            return scores

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    with pytest.raises(InvalidArgumentError, match="mask forbids"):
        extract(
            model, processor, "Count.", schema, max_new_tokens=8, logits_processor=LogitsProcessorList([OnlyOneWord()])
        )
