"""quantize="int8" for real on CPU (torchao, tiny checkpoint), and the typed errors where it cannot run."""

import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig, TorchAoConfig, pipeline

from cli_runner import run
from op_calls import CountCalls
from phi_helpers import Chat, ask, extract, load_model
from phi_helpers.api import quantization
from phi_helpers.api.generation import generate_batch, stream_chunks
from phi_helpers.api.quantization import (
    FUSED_INT8_MAX_ROWS, SKIP_MODULES, FusedInt8Linear, quantization_config, tensor_bytes, use_fused_int8_kernel,
    weights_bytes,
)
from phi_helpers.cli.outputs import model_info
from phi_helpers.errors import InvalidArgumentError, QuantizationBackendMissingError, QuantizationUnavailableError

INT8_KERNEL = (torch.ops.aten._weight_int8pack_mm.default,)
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason='pip install "torchao>=0.18"')
PROMPT = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint):
    model, processor = load_model(str(tiny_checkpoint), device="cpu", quantize="int8", num_crops=1)
    return model, processor


def image():
    return Image.new("RGB", (64, 48), (200, 40, 40))


def greedy(model, processor, tokens=6):
    inputs = processor(PROMPT, [image()], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:]


@needs_torchao
def test_int8_quantizes_the_language_model_linears_only(int8_model):
    model, _ = int8_model
    quantized = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor"}
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert quantized == {name for name in linears if name.startswith(("model.layers.", "lm_head"))}
    assert all(not name.startswith(tuple(SKIP_MODULES["int8"])) for name in quantized)
    assert type(model.model.vision_embed_tokens.img_projection[0].weight).__name__ == "Parameter"
    assert model.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16  # "auto" on CPU: bf16 beside int8
    assert model_info(model, int8_model[1])["quantize"] == "int8"


@needs_torchao
def test_int8_greedy_decoding_is_deterministic_and_close_to_fp32(int8_model, tiny_checkpoint):
    model, processor = int8_model
    first = greedy(model, processor)
    assert torch.equal(first, greedy(model, processor))
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    inputs = processor(PROMPT, [image()], return_tensors="pt")
    with torch.no_grad():
        exact, approx = reference(**inputs).logits[0, -1], model(**inputs).logits[0, -1]
    assert not torch.equal(exact, approx)  # the weights really changed ...
    assert torch.nn.functional.cosine_similarity(exact, approx, dim=0) > 0.99  # ... by int8 rounding only


@needs_torchao
def test_every_api_path_works_with_the_int8_model(int8_model):
    model, processor = int8_model
    expected = processor.decode(greedy(model, processor, tokens=4), skip_special_tokens=True)
    assert ask(model, processor, "What is shown?", images=[image()], max_new_tokens=4, min_new_tokens=4) == expected.strip()
    assert "".join(stream_chunks(model, processor, "What is shown?", images=[image()], max_new_tokens=4, min_new_tokens=4)).strip() == expected.strip()
    chat = Chat().add_user("What is shown?", images=[image()])
    assert isinstance(ask(model, processor, chat, max_new_tokens=3), str)
    batch = generate_batch(model, processor, [PROMPT, PROMPT], [[image()], [image()]], max_new_tokens=3)
    assert len(batch) == 2 and batch[0].text == batch[1].text
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    result = pipe(images=image(), text=PROMPT, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected


@needs_torchao
def test_constrained_extraction_with_the_int8_model(int8_model):
    """The token mask works on a quantized model too: the random int8 model's answer still validates."""
    model, processor = int8_model
    schema = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "seen": {"type": "boolean"}},
              "required": ["kind", "seen"], "additionalProperties": False}
    data = extract(model, processor, "What is shown?", schema, images=[image()], max_new_tokens=32)
    assert jsonschema.validate(data, schema) is None and set(data) == {"kind", "seen"}


@needs_torchao
def test_a_saved_int8_model_reloads_quantized_with_the_same_answers(int8_model, tmp_path):
    model, processor = int8_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    assert type(reloaded.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert use_fused_int8_kernel(reloaded) == len(model.model.layers) * 4 + 1  # what load_model does on CPU
    assert torch.equal(greedy(reloaded, AutoProcessor.from_pretrained(tmp_path)), greedy(model, processor))


@needs_torchao
def test_decoding_uses_the_fused_int8_kernel_and_prefill_torchaos_path(int8_model):
    """Few rows (decoding) go through torch._weight_int8pack_mm, many (prefill) through torchao's own
    matmul; both compute the same product up to bf16 rounding, and the saved state is unchanged."""
    model, _ = int8_model
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is FusedInt8Linear and type(model.model.vision_embed_tokens.img_projection[0]) is torch.nn.Linear
    weight = layer.weight
    exact = weight.dequantize().float()  # (out, in): the int8 values times their row scales
    generator = torch.Generator().manual_seed(0)
    for rows in (1, FUSED_INT8_MAX_ROWS, FUSED_INT8_MAX_ROWS + 1):
        x = torch.randn(1, rows, layer.in_features, generator=generator).to(torch.bfloat16)
        with torch.no_grad(), CountCalls(kernel=INT8_KERNEL) as calls:
            y = layer(x)
        assert calls.kernel == (rows <= FUSED_INT8_MAX_ROWS)
        assert y.shape == (1, rows, layer.out_features) and y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), x.float() @ exact.t(), rtol=2e-2, atol=2e-2)
    fp32 = torch.randn(1, 1, layer.in_features, generator=generator)  # fp32 input: torchao's path, no kernel
    with torch.no_grad(), CountCalls(kernel=INT8_KERNEL) as calls:
        assert layer(fp32).dtype == torch.float32 and not calls.kernel
    assert "model.layers.0.mlp.down_proj.weight" in model.state_dict()


@needs_torchao
def test_weights_bytes_counts_int8_weights_at_their_real_size(int8_model, tiny_checkpoint):
    """get_memory_footprint counts a torchao int8 weight at its bf16 size (notebook 00 printed the bf16
    figure for an int8 model); weights_bytes counts its int8 data and its scales."""
    model, _ = int8_model
    layer = model.model.layers[0].mlp.down_proj
    weight = layer.weight  # int8 data, a float32 scale and an int8 zero point per output row
    assert tensor_bytes(weight) == layer.out_features * (layer.in_features + weight.scale.element_size() + 1)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert weights_bytes(bf16) == 2 * sum(parameter.numel() for parameter in bf16.parameters())
    assert model.get_memory_footprint() == bf16.get_memory_footprint()  # what the notebook showed before
    assert weights_bytes(model) < 0.8 * weights_bytes(bf16)


def test_weights_bytes_of_a_plain_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False)).to(torch.float16)
    assert weights_bytes(model) == (4 * 3 + 3 + 3 * 2) * 2


@pytest.fixture(scope="module")
def saved_int8_folder(int8_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-int8")
    model, processor = int8_model
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@needs_torchao
def test_a_saved_int8_folder_loads_quantized_without_quantize(saved_int8_folder, capsys):
    """Its config.json holds the quantization_config: the printed line says so, and "auto" picks bf16 as
    for quantize="int8" (not fp32 beside int8, the slow path)."""
    model, _ = load_model(saved_int8_folder, device="cpu")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| bfloat16 (quantized model: the other weights in bf16) |" in line
    assert "| int8 weights (torchao, saved quantized) |" in line
    assert model.dtype == torch.bfloat16 and type(model.model.layers[0].mlp.down_proj) is FusedInt8Linear
    assert model_info(model, _)["quantize"] == "int8"


@needs_torchao
def test_a_saved_int8_folder_with_quantize_int8_gets_no_second_config(saved_int8_folder, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(saved_int8_folder, device="cpu", quantize="int8")
    assert not [str(w.message) for w in caught if "quantization_config" in str(w.message)]
    assert "int8 weights (torchao, saved quantized)" in capsys.readouterr().out


def saved_int8_config(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint with the quantization_config a saved int8 model's config.json holds."""
    folder = tmp_path / "int8"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "torchao", "modules_to_not_convert": ["model.vision_embed_tokens"],
        "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {}}},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_saved_int8_folder_without_torchao_names_the_install_command(monkeypatch, tiny_checkpoint, tmp_path):
    """transformers' own error is an untyped "ValueError: TorchAoConfig requires torchao to be installed"."""
    folder = saved_int8_config(tiny_checkpoint, tmp_path)
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(QuantizationBackendMissingError, match=r'holds int8 weights quantized with torchao .*pip install "torchao>=0\.18"'):
        load_model(folder, device="cpu")


def installed_torchao(monkeypatch, version: str) -> None:
    """Pretend that pip installed torchao ``version`` (transformers' own check accepts 0.15 and newer)."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "torchao" else real(name))


@pytest.mark.parametrize("version", ["0.17.0", "0.12.0"])
def test_a_torchao_older_than_0_18_is_refused_with_the_upgrade_command(monkeypatch, tiny_checkpoint, tmp_path, version):
    """torchao 0.15-0.17 make AffineQuantizedTensor weights, which the fused int8 kernel and weights_bytes do not
    know (int8 would silently decode slowly); below 0.15 transformers raised an untyped ValueError saying
    "pip install torchao", which does nothing where torchao is installed."""
    installed_torchao(monkeypatch, version)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    upgrade = re.escape(f'torchao {version} is installed: pip install -U "torchao>=0.18"')
    with pytest.raises(QuantizationBackendMissingError, match=f"quantize='int8' needs torchao 0.18 or newer, but {upgrade}"):
        quantization_config("int8", "cpu", torch.bfloat16)
    with pytest.raises(QuantizationBackendMissingError, match=upgrade):
        load_model(str(tiny_checkpoint), device="cpu", quantize="int8")
    with pytest.raises(QuantizationBackendMissingError, match=f"holds int8 weights quantized with torchao .*{upgrade}"):
        load_model(saved_int8_config(tiny_checkpoint, tmp_path), device="cpu")
    installed_torchao(monkeypatch, "0.18.0")
    assert quantization.torchao_missing("quantize='int8'") is None


def test_the_restart_advice_is_given_in_a_notebook_kernel_only(monkeypatch):
    """A running kernel does not see a package installed after it started (transformers checked at import); a
    command or script run afresh does, so "restart the kernel" would only confuse there."""
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: None))  # imported, no shell runs
    with pytest.raises(QuantizationBackendMissingError) as info:
        quantization_config("int8", "cpu", torch.bfloat16)
    assert "restart" not in str(info.value).lower() and str(info.value).endswith('pip install -e ".[quantize]").')
    monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: "the notebook's shell"))
    with pytest.raises(QuantizationBackendMissingError, match=r"\. Then restart the kernel \(Kernel > Restart Kernel\)\.$"):
        quantization_config("int8", "cpu", torch.bfloat16)


def saved_nf4_config() -> dict:
    """The quantization_config of a folder saved from quantize="int4" (bitsandbytes NF4)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def test_a_saved_nf4_folder_on_cpu_says_it_needs_a_cuda_gpu(monkeypatch):
    """As quantize='int4' on CPU does: installing bitsandbytes alone would not make it load here."""
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    with pytest.raises(QuantizationUnavailableError, match=r"holds int4 weights quantized with bitsandbytes .*needs a CUDA GPU "
                       r"with bitsandbytes \(`pip install bitsandbytes`\), not cpu\. On CPU load the original, unquantized "
                       r"checkpoint with quantize='int8'") as info:
        quantization.saved_quantization(saved_nf4_config(), None, "cpu")
    assert not isinstance(info.value, ImportError)  # nothing to install fixes it on this machine
    with pytest.raises(QuantizationBackendMissingError, match=r"holds int4 weights .*needs bitsandbytes: pip install bitsandbytes\.$"):
        quantization.saved_quantization(saved_nf4_config(), None, "cuda:0")


def test_a_saved_int8_folder_cannot_be_quantized_otherwise(monkeypatch, tiny_checkpoint, tmp_path):
    folder = saved_int8_config(tiny_checkpoint, tmp_path)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(InvalidArgumentError, match="holds int8 weights .* quantize='int4' cannot apply"):
        load_model(folder, device="cpu", quantize="int4")
    with pytest.raises(QuantizationUnavailableError, match="Apple GPUs"):
        quantization.saved_quantization({"quant_method": "torchao", "quant_type": "Int8WeightOnlyConfig"}, None, "mps")


def load_benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_rows_show_n_a_for_a_rate_it_could_not_measure_and_whole_messages():
    """On a busy machine the timed answer can take less than the timed prefill: no rate, not a negative one."""
    bench = load_benchmark("bench_gpu_quantization")
    assert math.isnan(bench.decode_tokens_per_s(4, total=0.5, prefill=0.6))
    assert bench.decode_tokens_per_s(5, total=3.0, prefill=1.0) == 2.0
    row = {"host_peak_gib": 0.1, "gpu_loaded_gib": math.nan, "gpu_peak_gib": math.nan, "prefill_s": 0.6,
           "decode_tokens_per_s": math.nan, "prompt_tokens": 100}
    line = bench.format_row("bf16", row)
    assert "nan" not in line and "-" not in line and line.count("n/a") == 3
    message = ("QuantizationUnavailableError: quantize='int4' on CPU is not available: it needs bitsandbytes on a CUDA GPU "
               "(`pip install bitsandbytes`). On CPU use quantize='int8' (torchao), about a quarter of the fp32 weights' memory.")
    assert bench.format_row("int4", {"error": message}) == f"int4    not available: {message}"


# --- what runs where: checked before anything is loaded ----------------------------------------------


@needs_torchao
def test_int8_on_cpu_is_torchao_weight_only_without_the_vision_tower():
    config, note = quantization_config("INT8", "cpu", torch.float32)
    assert isinstance(config, TorchAoConfig) and type(config.quant_type).__name__ == "Int8WeightOnlyConfig"
    assert config.modules_to_not_convert == SKIP_MODULES["int8"] == ["model.vision_embed_tokens"]
    assert note == "int8 weights (torchao)"
    assert quantization_config(None, "cpu", torch.float32) == (None, "not quantized")
    assert quantization_config("none", "cuda", torch.bfloat16)[0] is None


def test_unknown_quantize_value():
    with pytest.raises(ValueError, match="Choose None, 'int8' or 'int4'"):
        quantization_config("int3", "cpu", torch.float32)


def test_int4_on_cpu_says_what_runs_where():
    with pytest.raises(QuantizationUnavailableError, match="(?s)CUDA GPU.*bitsandbytes.*quantize='int8'") as info:
        quantization_config("int4", "cpu", torch.float32)
    assert not isinstance(info.value, ImportError)  # nothing to install fixes it on this machine


def test_mps_has_no_quantization_backend():
    with pytest.raises(QuantizationUnavailableError, match="Apple GPUs.*dtype='fp16'"):
        quantization_config("int8", "mps", torch.float16)


def test_missing_torchao_names_the_install_command(monkeypatch):
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    with pytest.raises(QuantizationBackendMissingError, match=r'needs torchao, which is not installed: pip install "torchao>=0\.18"') as info:
        quantization_config("int8", "cpu", torch.float32)
    assert isinstance(info.value, ImportError) and isinstance(info.value, QuantizationUnavailableError)
    with pytest.raises(QuantizationBackendMissingError, match="pip install bitsandbytes"):
        quantization_config("int4", "cuda", torch.bfloat16)


def test_bitsandbytes_is_used_on_cuda_where_installed(monkeypatch):
    monkeypatch.setattr(quantization, "_installed", lambda package: package == "bitsandbytes")
    config, note = quantization_config("int4", "cuda:0", torch.bfloat16)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules == SKIP_MODULES["int4"] == ["model.vision_embed_tokens", "lm_head"]
    assert note == "int4 weights (bitsandbytes)"
    config, _ = quantization_config("int8", "cuda", torch.float16)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_8bit
    assert config.llm_int8_skip_modules == ["model.vision_embed_tokens"]


def test_load_model_refuses_before_loading(monkeypatch, tiny_checkpoint):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", refuse)
    with pytest.raises(QuantizationUnavailableError):
        load_model(str(tiny_checkpoint), device="cpu", quantize="int4")


@needs_torchao
def test_cli_quantize_int8_is_recorded(capsys, tiny_checkpoint, tmp_path):
    picture = tmp_path / "red.png"
    image().save(picture)
    code, out, err = run(capsys, "predict", "--image", picture, "--task", "caption", "--format", "json",
                         "--model", tiny_checkpoint, "--device", "cpu", "--quantize", "int8",
                         "--num-crops", "1", "--max-new-tokens", "3")
    assert code == 0, err
    record = json.loads(out)
    assert record["quantize"] == "int8" and record["dtype"] == "bfloat16"
    assert "int8 weights (torchao)" in err  # load_model's line goes to stderr
