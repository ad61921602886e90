"""Behaviour a mutation audit found unprotected: one small test for each (tiny random model)."""

import base64
import http.server
import io
import json
import os
import shutil
import socket
import textwrap

import pytest
import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from cli_runner import run
from local_server import no_proxy, serve  # noqa: F401  (no_proxy: an autouse fixture)
from phi_helpers import (
    ImageLoadError, ModelLoadError, PromptImageMismatchError, ask, build_prompt, extract, extract_json, load_image,
    load_model,
)
from phi_helpers.api import hardware
from phi_helpers.api.constrained import read_answer
from phi_helpers.api.generation import generate_batch, stream_chunks
from phi_helpers.api.loading import DEFAULT_MODEL_ID, planned_memory_gib, requested_model_id
from phi_helpers.api.metrics import field_matches
from phi_helpers.api.structured import check_schema, validation_errors
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


def test_extract_prompt_puts_the_users_instructions_before_the_schema(capsys, tiny_model, tmp_path, image):
    image.save(tmp_path / "photo.png")
    schema = {"type": "object", "properties": {"date": {"type": "string"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    _, out, err = run(capsys, "predict", "--image", tmp_path / "photo.png", "--task", "extract", "--schema", tmp_path / "s.json",
                      "--prompt", "Dates are written DD.MM.YYYY.", "--format", "json", "--num-crops", "1", "--max-new-tokens", "4")
    prompt = json.loads(out)["prompt"]
    assert prompt.startswith("Dates are written DD.MM.YYYY.\n"), err
    assert "follows this JSON Schema" in prompt and json.dumps(schema) in prompt


@pytest.mark.parametrize("value, expected", [("  tiny\n", "tiny"), (" ", DEFAULT_MODEL_ID)])
def test_phi_helpers_model_is_read_without_surrounding_blanks(monkeypatch, value, expected):
    monkeypatch.setenv("PHI_HELPERS_MODEL", value)
    assert requested_model_id() == expected


def test_planned_memory_grows_with_num_crops():
    """A hub id plans from the package's own table of official checkpoints: nothing is downloaded."""
    one = planned_memory_gib("microsoft/Phi-3.5-vision-instruct", device="cpu", num_crops=1)
    sixteen = planned_memory_gib("microsoft/Phi-3.5-vision-instruct", device="cpu", num_crops=16)
    assert one is not None and sixteen > one


def test_a_missing_field_is_wrong_even_when_null_is_expected():
    assert field_matches({"total": 12.5}, {"total": 12.5, "tip": None}) == {"total": True, "tip": False}


def test_field_matches_compares_strings_casefolded():
    assert field_matches({"street": "HAUPTSTRASSE 5"}, {"street": "Hauptstraße 5"}) == {"street": True}


def test_a_json_block_in_upper_case_or_after_a_blank_wins_over_a_plain_block():
    plain = 'The format is:\n```\n{"total": 0}\n```\n'
    assert extract_json(plain + 'The answer:\n```JSON\n{"total": 12.5}\n```') == {"total": 12.5}
    assert extract_json(plain + 'The answer:\n``` json\n{"total": 12.5}\n```') == {"total": 12.5}
    with pytest.raises(JSONExtractionError, match="The ```json block in the answer is not valid JSON"):
        extract_json('Here:\n``` json\n{"total": 12,}\n```\nor {"total": 13}')


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_data_url_wrapped_at_76_characters_loads_and_other_characters_are_refused():
    data = base64.b64encode(_png_bytes()).decode()
    wrapped = "\r\n".join(textwrap.wrap(data, 76))  # as the base64 tool and mail clients write it
    assert "\n" in wrapped
    assert load_image("data:image/png;base64," + wrapped).size == (40, 30)
    with pytest.raises(ImageLoadError, match="damaged"):
        load_image("data:image/png;base64," + data[:10] + "!" + data[10:])


class _PngHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        body = _png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_upper_case_http_url_is_downloaded():
    with serve(_PngHandler) as url:
        assert load_image(url.replace("http://", "HTTP://") + "/x.png").size == (40, 30)


def test_a_ref_shaped_value_of_enum_or_default_is_data(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("check_schema must not fetch anything")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    check_schema({"type": "object", "properties": {"kind": {"enum": [{"$ref": "not-a-ref"}, "other"]}}})
    check_schema({"type": "object", "properties": {"doc": {"type": "object", "default": {"$ref": "http://example.com/x"}}}})


def test_weights_cut_short_by_a_few_bytes_are_called_truncated(tmp_path, tiny_checkpoint):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 4)  # a copy that stopped 4 bytes early
    with pytest.raises(ModelLoadError, match=f"it is truncated: {size - 4:,} bytes instead of {size:,}"):
        load_model(str(copy), device="cpu")


def test_validation_errors_are_sorted():
    schema = {"type": "object", "properties": {"z": {"type": "number"}, "a": {"type": "number"}}, "required": ["z", "a"]}
    assert validation_errors({"z": "x", "a": "y"}, schema) == [
        "a: 'y' is not of type 'number'", "z: 'x' is not of type 'number'",
    ]
