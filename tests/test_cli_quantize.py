"""The command line's model options take what load_model takes, and say what load_model does."""

import importlib.metadata
import json

import pytest

import phi_helpers
from cli_runner import run
from phi_helpers.api import quantization
from phi_helpers.cli import app as cli

PREDICT = ["predict", "--image", "x.png", "--task", "ocr"]


@pytest.mark.parametrize(
    "option, value, field, expected",
    [
        ("--device", "cuda:1", "device", "cuda:1"),
        ("--device", "CPU", "device", "cpu"),
        ("--quantize", "INT8", "quantize", "int8"),
        ("--quantize", "None", "quantize", "none"),
        ("--dtype", "bfloat16", "dtype", "bf16"),
        ("--dtype", "Float32", "dtype", "fp32"),
        ("--dtype", "half", "dtype", "fp16"),
        ("--attn", "EAGER", "attn", "eager"),
    ],
)
def test_the_spellings_load_model_accepts_are_accepted(option, value, field, expected):
    """They were refused with exit code 2 (argparse's fixed choices) although load_model takes them; each is
    recorded in one spelling, so that a re-run with "bfloat16" skips what "bf16" answered."""
    args = cli.build_parser().parse_args([*PREDICT, option, value])
    assert getattr(args, field) == expected


@pytest.mark.parametrize(
    "option, value",
    [("--device", "tpu"), ("--device", "cuda:x"), ("--dtype", "int8"), ("--quantize", "int2"), ("--attn", "flash")],
)
def test_other_values_are_usage_errors_that_list_the_choices(capsys, option, value):
    code, out, err = run(capsys, *PREDICT, option, value)
    assert code == 2 and out == ""
    assert f"argument {option}: invalid choice: '{value}' (choose from " in err


def test_the_dtype_help_says_what_auto_is_with_quantized_weights(capsys):
    """"auto (bf16/fp16 on GPUs, fp32 on CPU)" was wrong for --quantize int8 on CPU, which gets bf16."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {auto,bf16,fp16,fp32}" in help_text and "--quantize {none,int8,int4}" in help_text
    assert "default: auto (bf16/fp16 on GPUs; on CPU fp32, or bf16 for quantized weights: --quantize int8" in help_text


@pytest.fixture
def real_load_model(monkeypatch, tmp_path):
    """The real load_model behind the command line, and an image for it to read."""
    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", phi_helpers.load_model)
    monkeypatch.setattr(phi_helpers.api.loading.AutoProcessor, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("loaded despite the missing torchao"))
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


def test_missing_torchao_on_the_command_line_says_no_word_about_a_kernel(capsys, monkeypatch, tiny_checkpoint, real_load_model):
    """A notebook's kernel must be restarted after a pip install; a command is simply run again."""
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    code, out, err = run(capsys, "predict", "--image", real_load_model, "--task", "ocr", "--model", tiny_checkpoint,
                         "--device", "cpu", "--quantize", "int8")
    assert code == 1 and out == ""
    assert 'needs torchao, which is not installed: pip install "torchao>=0.18"' in err
    assert "kernel" not in err.lower() and "restart" not in err.lower()


def test_a_too_old_torchao_on_the_command_line_is_a_typed_error(capsys, monkeypatch, tiny_checkpoint, real_load_model):
    """It printed transformers' untyped "TorchAoConfig requires torchao to be installed" (for torchao < 0.15), or
    nothing while int8 lost its fused kernel (0.15 to 0.17)."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0" if name == "torchao" else real(name))
    code, _, err = run(capsys, "predict", "--image", real_load_model, "--task", "ocr", "--model", tiny_checkpoint,
                       "--device", "cpu", "--quantize", "INT8")
    assert code == 1
    assert err.startswith("error: quantize='int8' needs torchao 0.18 or newer, but torchao 0.12.0 is installed: "
                          'pip install -U "torchao>=0.18"'), err


def test_the_request_records_one_spelling(monkeypatch):
    """A re-run compares requests: --dtype bfloat16 --quantize INT8 is the same request as --dtype bf16 --quantize int8."""
    from phi_helpers.cli.tasks import request_fields

    def fields(*options):
        args = cli.build_parser().parse_args([*PREDICT, *options])
        return request_fields(args, None, "tiny")

    assert fields("--dtype", "bfloat16", "--quantize", "INT8") == fields("--dtype", "bf16", "--quantize", "int8")
    assert json.loads(json.dumps(fields("--quantize", "NONE")))["quantize"] is None
