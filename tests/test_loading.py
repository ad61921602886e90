"""load_model and its choices: device, dtype, attention, PHI_HELPERS_MODEL, errors before loading."""

import json
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor

import phi_helpers.testing
from phi_helpers import FlashAttentionUnavailableError, load_model
from phi_helpers.api import hardware, loading
from phi_helpers.errors import ConfigurationError, DeviceUnavailableError, InvalidArgumentError, ModelLoadError
from phi_helpers.api.loading import check_checkpoint_files, pick_device, pick_dtype
from phi_helpers.api.hardware import pick_attention


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend there is one CUDA GPU with native bf16 (tests switch bf16 off where needed), of the
    Hopper generation (compute capability 9.0) with 80 GiB free."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (80 * 2**30, 80 * 2**30))


@pytest.fixture
def h100_and_t4(fake_cuda, monkeypatch):
    """GPU 0 an H100, GPU 1 a T4 (Turing, compute capability 7.5, 15 GiB), flash-attn installed."""
    gpus = {0: ("Fake H100", (9, 0)), 1: ("Fake T4", (7, 5))}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: gpus[index][1])
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: True)


@pytest.fixture
def no_env_model(monkeypatch):
    monkeypatch.delenv("PHI_HELPERS_MODEL", raising=False)


@pytest.fixture
def forbid_loading(monkeypatch):
    """Fail the test if anything is loaded: errors must come before any download."""

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", refuse)


# --- pick_device ------------------------------------------------------------------------------------


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert pick_device("auto") == ("cpu", "no GPU found")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto")[0] == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake H100")
    assert pick_device() == ("cuda", "Fake H100")


def test_explicit_devices(fake_cuda, monkeypatch):
    assert pick_device("CPU") == ("cpu", "asked for")
    assert pick_device("cuda:0") == ("cuda:0", "Fake H100")
    with pytest.raises(DeviceUnavailableError, match="only 1 CUDA GPU"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="MPS"):
        pick_device("mps")


def test_cuda_asked_for_on_a_machine_without_it(no_gpu):
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU.*device='auto' or 'cpu'"):
        pick_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="^device='cuda:1' was asked for"):  # what was asked, not 'cuda'
        pick_device("cuda:1")


@pytest.mark.parametrize("typo", ["gpu", "cuda:x", "cpu:0", ""])
def test_device_typos_list_the_valid_choices(typo):
    with pytest.raises(ValueError, match="'auto', 'cuda', 'mps', 'cpu'"):
        pick_device(typo)


# --- pick_dtype -------------------------------------------------------------------------------------


def test_auto_dtype_per_device(fake_cuda, monkeypatch):
    assert pick_dtype("auto", "cuda") == (torch.bfloat16, "GPU supports bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype("auto", "cuda:0")[0] == torch.float16  # emulated bf16 (T4, V100) does not count
    assert pick_dtype("auto", "mps")[0] == torch.float16
    assert pick_dtype("auto", "cpu")[0] == torch.float32


@pytest.mark.parametrize(
    "asked, expected",
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
     ("fp32", torch.float32), ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_explicit_dtypes(asked, expected):
    assert pick_dtype(asked, "cpu") == (expected, "asked for")


@pytest.mark.parametrize("typo", ["int8", "bf61", torch.int8])
def test_dtype_typos_list_the_valid_choices(typo):
    with pytest.raises(ValueError, match="bf16"):
        pick_dtype(typo, "cpu")


# --- pick_attention ---------------------------------------------------------------------------------


def test_auto_attention(monkeypatch, fake_cuda):
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: True)
    assert pick_attention("auto", "cuda", torch.bfloat16) == ("flash_attention_2", "flash-attn installed")
    assert pick_attention("auto", "cuda", torch.float32)[0] == "sdpa"
    assert pick_attention("auto", "cpu", torch.bfloat16)[0] == "sdpa"
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: False)
    assert pick_attention("auto", "cuda", torch.float16) == ("sdpa", "flash-attn not installed")


def test_explicit_attention():
    assert pick_attention("eager", "cpu", torch.float32) == ("eager", "asked for")
    assert pick_attention("SDPA", "cuda", torch.float16) == ("sdpa", "asked for")
    with pytest.raises(ValueError, match="'auto', 'sdpa', 'eager', 'flash_attention_2'"):
        pick_attention("flash", "cuda", torch.float16)


def test_flash_attention_asked_for_without_flash_attn(monkeypatch):
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(FlashAttentionUnavailableError) as info:
        pick_attention("flash_attention_2", "cuda", torch.bfloat16)
    assert "pip install flash-attn --no-build-isolation" in str(info.value)
    assert "attn='sdpa'" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_flash_attention_needs_half_precision(monkeypatch, fake_cuda):
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: True)
    assert pick_attention("flash_attention_2", "cuda", torch.float16)[0] == "flash_attention_2"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        pick_attention("flash_attention_2", "cuda", torch.float32)


def test_auto_attention_takes_sdpa_on_a_gpu_older_than_ampere(h100_and_t4):
    """flash-attn's own check sees only the package and CUDA; on a T4, V100 or RTX 20xx flash-attn 2 fails
    when the model runs. The GPU asked for counts (cuda:1 here), not GPU 0."""
    assert pick_attention("auto", "cuda:1", torch.float16) == (
        "sdpa", "GPU older than Ampere (flash-attn 2 needs compute capability 8.0+)"
    )
    assert pick_attention("auto", "cuda:0", torch.float16) == ("flash_attention_2", "flash-attn installed")
    assert pick_attention("auto", "cuda", torch.bfloat16)[0] == "flash_attention_2"  # "cuda" is GPU 0


def test_flash_attention_asked_for_on_a_gpu_older_than_ampere(h100_and_t4, no_env_model, forbid_loading):
    with pytest.raises(FlashAttentionUnavailableError) as info:
        pick_attention("flash_attention_2", "cuda:1", torch.float16)
    message = str(info.value)
    assert "Ampere generation or newer (compute capability 8.0+" in message
    assert "cuda:1 (Fake T4) has compute capability 7.5" in message and "attn='sdpa'" in message
    assert pick_attention("flash_attention_2", "cuda:0", torch.float16) == ("flash_attention_2", "asked for")
    with pytest.raises(FlashAttentionUnavailableError, match="compute capability 7.5"):  # before anything is loaded
        load_model("microsoft/Phi-3.5-vision-instruct", device="cuda:1", dtype="fp16", attn="flash_attention_2")


# --- load_model: errors come before loading ---------------------------------------------------------


def test_flash_attention_on_cpu_fails_before_loading(no_env_model, forbid_loading, no_gpu):
    with pytest.raises(FlashAttentionUnavailableError, match="NVIDIA GPU"):
        load_model("microsoft/Phi-3.5-vision-instruct", attn="flash_attention_2")


@pytest.mark.parametrize(
    "kwargs, error",
    [({"device": "gpu"}, ValueError), ({"dtype": "half-float"}, ValueError), ({"attn": "fast"}, ValueError),
     ({"num_crops": 0}, ValueError), ({"device": "cuda"}, DeviceUnavailableError)],
)
def test_bad_choices_fail_before_loading(no_env_model, forbid_loading, no_gpu, kwargs, error):
    with pytest.raises(error):
        load_model("microsoft/Phi-3.5-vision-instruct", **kwargs)


def test_missing_local_folder_is_reported_clearly(no_env_model, forbid_loading, tmp_path):
    with pytest.raises(ModelLoadError, match="No model folder at") as info:
        load_model(tmp_path / "no-such-model", device="cpu")
    assert isinstance(info.value, OSError)


def test_a_home_folder_of_a_user_that_does_not_exist_is_a_model_load_error(no_env_model, forbid_loading):
    """``~nouser/m`` (a shell leaves it as typed when there is no such user): ModelLoadError saying what to
    write, not pathlib's bare RuntimeError."""
    with pytest.raises(ModelLoadError, match=r"no user 'nouser-phi' on this machine\. Write ~/"):
        load_model("~nouser-phi/model", device="cpu")


@pytest.mark.parametrize("model_id", [Path("models/phi35-finetuned"), "phi35_local", "./x/y", "a/b/c", "pyproject.toml"])
def test_a_folder_that_is_not_there_is_never_looked_up_on_the_hub(no_env_model, forbid_loading, model_id):
    """Only owner/name goes to the hub: a Path, a bare name or a longer path is a local folder, whose name
    must not leave the machine (forbid_loading fails on any from_pretrained call)."""
    with pytest.raises(ModelLoadError, match="No model folder at"):
        load_model(model_id, device="cpu")


@pytest.mark.parametrize("model_id", ["", "   ", 123, ["microsoft/Phi-3.5-vision-instruct"]])
def test_a_model_id_that_is_not_one_is_refused(no_env_model, forbid_loading, model_id):
    with pytest.raises(InvalidArgumentError, match="model_id must be a hub id"):
        load_model(model_id, device="cpu")


def test_another_models_folder_is_refused_before_loading(no_env_model, forbid_loading, tiny_checkpoint, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="holds a 'llama' model"):
        load_model(folder, device="cpu")


def copied_checkpoint(tiny_checkpoint, tmp_path, remove=(), config=None) -> Path:
    """A copy of the tiny checkpoint without the files ``remove``, its config.json updated with ``config``."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, folder)
    for name in remove:
        (folder / name).unlink()
    if config:
        (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    return folder


@pytest.mark.parametrize(
    "missing", ["tokenizer.json", "preprocessor_config.json", "model.safetensors"]
)
def test_a_folder_missing_a_checkpoint_file_names_it(no_env_model, forbid_loading, tiny_checkpoint, tmp_path, missing):
    """Without tokenizer.json transformers asks for sentencepiece; without preprocessor_config.json or the
    weights it sends a local folder's user to huggingface.co and their internet connection."""
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, remove=[missing])
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, device="cpu")
    message = str(info.value)
    assert message.startswith(f"The checkpoint file '{folder / missing}' is unusable: it is missing")
    assert "copy or download the checkpoint again" in message.lower()
    assert "huggingface" not in message.lower() and "internet" not in message


def test_a_folder_saved_by_transformers_keeps_the_image_settings_in_processor_config(tiny_checkpoint, tmp_path):
    """save_pretrained writes the image processor's settings into processor_config.json, and no
    preprocessor_config.json: such a folder is complete."""
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, remove=["preprocessor_config.json"])
    settings = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": settings, "processor_class": "Phi3VProcessor"}))
    check_checkpoint_files(folder)
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {**settings, "num_crops": -1}}))
    with pytest.raises(ModelLoadError, match=r"processor_config.json' is unusable: its num_crops is -1"):
        check_checkpoint_files(folder)


def test_shards_without_their_index_are_named(no_env_model, forbid_loading, tiny_checkpoint, tmp_path):
    folder = copied_checkpoint(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, device="cpu")
    assert str(info.value).startswith(f"The checkpoint file '{folder / 'model.safetensors.index.json'}' is unusable: it is missing")
    assert "model-00001-of-00002.safetensors" in str(info.value)


def test_num_crops_0_in_preprocessor_config_names_the_file(no_env_model, tiny_checkpoint, tmp_path, capsys):
    folder = copied_checkpoint(tiny_checkpoint, tmp_path)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "num_crops": 0}))
    with pytest.raises(ModelLoadError, match=r"preprocessor_config.json' is unusable: its num_crops is 0, not a whole number"):
        load_model(folder, device="cpu")
    _, processor = load_model(folder, device="cpu", num_crops=2)  # the argument replaces the file's value
    assert processor.image_processor.num_crops == 2


def test_a_local_folder_error_gives_no_hub_or_network_advice(no_env_model, tiny_checkpoint, monkeypatch):
    def transformers_error(source, **kwargs):
        raise OSError(
            f"Can't load image processor for '{source}'. If you were trying to load it from "
            "'https://huggingface.co/models', make sure you don't have a local directory with the same name. "
            f"Otherwise, make sure '{source}' is the correct path to a directory containing a preprocessor_config.json file"
        )

    monkeypatch.setattr(AutoProcessor, "from_pretrained", transformers_error)
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_checkpoint, device="cpu")
    message = str(info.value)
    assert message.startswith(f"Could not load the folder '{tiny_checkpoint}': Can't load image processor")
    assert f"Make sure '{tiny_checkpoint}' is the correct path" in message
    assert "huggingface" not in message.lower() and "internet" not in message and "PHI_HELPERS_MODEL" not in message


def test_a_config_whose_head_size_does_not_match_the_rope_factors(no_env_model, forbid_loading, tiny_checkpoint, tmp_path):
    """transformers would fail while building the model with 'Attempting to broadcast a dimension of length 24'."""
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, config={"num_attention_heads": 4, "num_key_value_heads": 4})
    with pytest.raises(ConfigurationError, match=r"config.json's rope_scaling long_factor has 48 entries, but head_dim/2 is 24 "
                       r"\(hidden_size 192 / num_attention_heads 4 = head_dim 48\): the config does not belong to these weights"):
        load_model(folder, device="cpu")


def edited_checkpoint(tiny_checkpoint, tmp_path, edit) -> Path:
    """A copy of the tiny checkpoint whose weights (a dict of tensors) went through ``edit``."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors")
    return folder


def test_a_checkpoint_without_some_weights_is_refused(no_env_model, tiny_checkpoint, tmp_path, caplog):
    """Missing weights would be random numbers: the model would answer, wrongly, without a word."""
    folder = edited_checkpoint(tiny_checkpoint, tmp_path, lambda weights: weights.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="lacks 1 of the model's weights \\(lm_head.weight\\)"):
        load_model(folder, device="cpu")
    assert "LOAD REPORT" not in caplog.text  # one message, not transformers' table before it


def test_a_weight_of_another_shape_is_a_model_load_error(no_env_model, tiny_checkpoint, tmp_path, caplog):
    folder = edited_checkpoint(tiny_checkpoint, tmp_path, lambda weights: weights.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ModelLoadError, match=r"1 weight\(s\) of another shape .*\(model.norm.weight \[7\] instead of \[\d+\]\)"):
        load_model(folder, device="cpu")
    assert "LOAD REPORT" not in caplog.text


def test_transformers_report_of_unexpected_weights_is_still_shown(no_env_model, tiny_checkpoint, tmp_path, caplog):
    folder = edited_checkpoint(tiny_checkpoint, tmp_path, lambda weights: weights.update({"model.extra.weight": torch.ones(3)}))
    load_model(folder, device="cpu")
    assert "LOAD REPORT" in caplog.text and "model.extra.weight" in caplog.text


def test_hub_failures_become_a_short_model_load_error(no_env_model, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout: None)  # the hub answers the probe
    monkeypatch.setattr(AutoProcessor, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="(?s)couldn.t connect.*PHI_HELPERS_MODEL=tiny") as info:
        load_model("someone/some-model", device="cpu")
    assert info.value.__cause__ is None and info.value.__suppress_context__



class NameNotResolved(httpx2.ConnectError):
    """What the hub's HTTP client raises without a network."""


def unreachable(repo_id, timeout):
    raise NameNotResolved("[Errno -2] Name or service not known")


def test_an_unreachable_hub_fails_at_once_unless_the_cache_holds_the_model(no_env_model, forbid_loading, monkeypatch):
    """The hub's lookups retry every file for ~20 s without a network (minutes in all): one quick probe
    says so at once."""
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    with pytest.raises(ModelLoadError, match=r"huggingface.co cannot be reached \(\[Errno -2\] Name or service not known\) "
                       r"to download 'someone/model', and the Hugging Face cache does not hold it"):
        load_model("someone/model", device="cpu")


def test_an_unreachable_hub_loads_the_cached_copy_without_retries(no_env_model, monkeypatch, tiny_checkpoint, capsys):
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: f"/cache/{repo_id}/{filename}")
    calls = []
    for auto_class in (AutoProcessor, AutoModelForCausalLM):
        real = auto_class.from_pretrained

        def cached(source, real=real, **kwargs):
            calls.append(kwargs.get("local_files_only"))
            return real(tiny_checkpoint, **{key: value for key, value in kwargs.items() if key != "local_files_only"})

        monkeypatch.setattr(auto_class, "from_pretrained", cached)
    load_model("someone/model", device="cpu")
    assert calls == [True, True]
    assert "huggingface.co cannot be reached ([Errno -2] Name or service not known): loading 'someone/model' from the Hugging Face cache" in capsys.readouterr().out


def test_an_owner_name_id_that_may_have_meant_a_folder(no_env_model, forbid_loading, monkeypatch, tmp_path):
    """'models/phi35' is an owner/name, so it goes to the hub; when it is not found there, the message also
    says there is no such folder here (the user may have mistyped a folder under models/)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "phi35-finetuned").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    with pytest.raises(ModelLoadError, match=rf"There is no folder 'models/phi35' here either \(relative paths start from '{tmp_path}'\)"):
        load_model("models/phi35", device="cpu")


@pytest.mark.parametrize("typo", ["microsoft/Phi 3.5 vision", "owner/name..x"])
def test_an_id_the_hub_would_refuse_is_a_model_load_error(no_env_model, forbid_loading, monkeypatch, typo):
    """The hub's HFValidationError (a ValueError naming no remedy) is not what load_model raises."""
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: pytest.fail("the hub was asked"))
    with pytest.raises(ModelLoadError, match=rf"^'{typo}' is not a valid hub id: .*\. Check the id \(e\.g\. "
                       r"'microsoft/Phi-3\.5-vision-instruct'\) or pass a local folder\. There is no folder"):
        load_model(typo, device="cpu")


def test_only_network_failures_count_as_an_unreachable_hub(no_env_model, forbid_loading, monkeypatch):
    """A fault that is not the network's (here a bug) is not reported as 'huggingface.co cannot be reached'."""
    def broken(repo_id, timeout):
        raise TypeError("a bug, not the network")

    monkeypatch.setattr(huggingface_hub, "model_info", broken)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    with pytest.raises(TypeError, match="a bug"):
        load_model("someone/model", device="cpu")


def test_a_model_the_hub_does_not_have_is_named_before_loading(no_env_model, forbid_loading, monkeypatch):
    def not_found(repo_id, timeout):
        raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co")))

    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(ModelLoadError, match="There is no model 'someone/modle' on the Hugging Face hub, or it is private"):
        load_model("someone/modle", device="cpu")


def test_hf_hub_offline_asks_the_hub_nothing(no_env_model, monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: pytest.fail("the hub was asked"))
    for auto_class in (AutoProcessor, AutoModelForCausalLM):
        monkeypatch.setattr(auto_class, "from_pretrained", lambda source, real=auto_class.from_pretrained, **kwargs: real(tiny_checkpoint, **kwargs))
    load_model("someone/model", device="cpu")

# --- load_model on the tiny checkpoint --------------------------------------------------------------


def test_load_model_prints_one_line_with_its_choices(no_env_model, tiny_checkpoint, capsys):
    model, processor = load_model(tiny_checkpoint, device="cpu", dtype="bf16", attn="eager", num_crops=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [
        f"Loaded {tiny_checkpoint} on cpu (asked for) | bfloat16 (asked for) | "
        "attention: eager (asked for) | num_crops=2"
    ]
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "eager"  # beats "flash_attention_2" in config.json
    assert not model.training
    assert processor.image_processor.num_crops == 2


def test_auto_choices_on_cpu_and_checkpoint_num_crops(tiny_model_and_processor):
    model, processor = tiny_model_and_processor  # loaded with device="cpu" and everything else "auto"
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert processor.image_processor.num_crops == 4  # Phi-3.5-vision's preprocessor_config.json


def test_env_path_is_the_default_and_an_explicit_model_id_wins(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    monkeypatch.setenv("PHI_HELPERS_MODEL", str(tiny_checkpoint))
    model, _ = load_model(device="cpu")
    assert model.config.name_or_path == str(tiny_checkpoint)
    assert f"Loaded {tiny_checkpoint} (from PHI_HELPERS_MODEL) on cpu" in capsys.readouterr().out
    monkeypatch.setenv("PHI_HELPERS_MODEL", str(tmp_path / "elsewhere"))  # would fail if it were used
    model, _ = load_model(str(tiny_checkpoint), device="cpu")
    assert model.config.name_or_path == str(tiny_checkpoint)
    assert f"Loaded {tiny_checkpoint} on cpu" in capsys.readouterr().out


def test_env_tiny_builds_once_into_the_cache_and_warns_loudly(monkeypatch, tmp_path, capsys):
    builds = []
    real_make = phi_helpers.testing.make_tiny_checkpoint

    def counting_make(path, **kwargs):
        builds.append(path)
        return real_make(path, **kwargs)

    monkeypatch.setattr(phi_helpers.testing, "make_tiny_checkpoint", counting_make)
    monkeypatch.setenv("PHI_HELPERS_MODEL", "tiny")
    monkeypatch.setenv("PHI_HELPERS_CACHE", str(tmp_path))

    model, processor = load_model(device="cpu")
    output = capsys.readouterr().out
    cached = tmp_path / "tiny-phi-3.5-vision"
    assert model.config.name_or_path == str(cached)
    assert len(builds) == 1
    assert "RANDOM" in output and "MEANINGLESS" in output
    assert sum(line.startswith("!!") for line in output.splitlines()) >= 4  # a box, not a single line
    assert "Loaded tiny random Phi-3.5-vision (PHI_HELPERS_MODEL=tiny) on cpu" in output

    assert loading._tiny_checkpoint() == cached
    assert len(builds) == 1  # reused

    (cached / "model.safetensors").unlink()  # an interrupted build / damaged cache
    assert loading._tiny_checkpoint() == cached
    assert len(builds) == 2 and (cached / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-phi-3.5-vision"]  # no temporary folders left



@pytest.mark.parametrize("marker", ["complete\n", "make_tiny_checkpoint 000000000000\nconfig.json\n"],
                         ids=["an-old-marker", "another-build"])
def test_a_tiny_cache_built_by_another_version_is_rebuilt_then_reused(monkeypatch, tmp_path, capsys, tiny_checkpoint, marker):
    monkeypatch.setenv("PHI_HELPERS_CACHE", str(tmp_path))
    cached = tmp_path / "tiny-phi-3.5-vision"
    shutil.copytree(tiny_checkpoint, cached)  # as an older make_tiny_checkpoint left it: no processor_config.json
    (cached / "processor_config.json").unlink()
    (cached / ".phi_helpers_complete").write_text(marker)

    assert loading._tiny_checkpoint() == cached
    assert (cached / "processor_config.json").is_file()
    rebuilt = [line for line in capsys.readouterr().out.splitlines() if "rebuilding" in line]
    assert rebuilt == [f"tiny: rebuilding the cached tiny checkpoint in {cached}: it is incomplete or was built by "
                       "another version of phi_helpers."]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-phi-3.5-vision"]  # no temporary folders left

    def stamps():
        return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in [cached, *cached.iterdir()]}

    before = stamps()
    monkeypatch.setattr(phi_helpers.testing, "make_tiny_checkpoint", lambda *args, **kwargs: pytest.fail("rebuilt"))
    assert loading._tiny_checkpoint() == cached
    assert stamps() == before  # the current cache is reused untouched
    assert "rebuilding" not in capsys.readouterr().out


def test_a_tiny_cache_that_cannot_be_written_says_where_to_build_it(monkeypatch, tmp_path):
    """A stale cache in a folder this user may not write (a shared course image): before, a raw PermissionError."""
    monkeypatch.setenv("PHI_HELPERS_CACHE", str(tmp_path))

    def refused(folder, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(phi_helpers.testing, "make_tiny_checkpoint", refused)  # root may write anywhere: as a user
    with pytest.raises(ModelLoadError, match=r"could not be written to .* \(Permission denied\)\. Set PHI_HELPERS_CACHE"):
        loading._tiny_checkpoint()


def test_the_tiny_build_changes_with_the_code_that_builds_it(monkeypatch, tmp_path):
    edited = tmp_path / "checkpoints.py"
    edited.write_text(Path(phi_helpers.testing.checkpoints.__file__).read_text() + "# another layout\n")
    build = loading._tiny_build()
    monkeypatch.setattr(phi_helpers.testing.checkpoints, "__file__", str(edited))
    assert loading._tiny_build() != build


# --- memory: a warning before loading what would not fit --------------------------------------------


def test_a_warning_before_loading_what_does_not_fit(no_env_model, tiny_checkpoint, monkeypatch, capsys):
    """Warned, not refused: the line comes before the model loads, and the model still loads."""
    monkeypatch.setattr(loading, "available_memory", lambda device: (0.001, "of RAM available"))
    model, _ = load_model(tiny_checkpoint, device="cpu")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].startswith("Warning: the model needs about ") and "float32" in lines[0]
    assert "but cpu has only 1 MiB of RAM available: loading may run out of memory. Use load_model(dtype='bf16') " \
           "(command line: --dtype bf16; about " in lines[0]
    assert "or load_model(quantize='int8') (command line: --quantize int8; about " in lines[0]
    assert lines[1].startswith(f"Loaded {tiny_checkpoint} on cpu") and len(lines) == 2
    assert model.dtype == torch.float32


def test_the_warning_counts_the_folders_own_num_crops(no_env_model, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Phi-3-vision's folder says 16 crops: its activations are counted for 16, not for Phi-3.5's 4."""
    folder = copied_checkpoint(tiny_checkpoint, tmp_path)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "num_crops": 16}))
    monkeypatch.setattr(loading, "available_memory", lambda device: (0.001, "of RAM available"))
    load_model(folder, device="cpu")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "activations at num_crops=16)" in lines[0] and lines[1].endswith("num_crops=16")


def stop_at_the_hub(monkeypatch):
    """The hub cannot be reached and the cache is empty: load_model stops right after its checks."""
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)


def test_a_16_gb_laptop_without_a_gpu_is_warned_before_fp32_is_loaded(no_env_model, no_gpu, forbid_loading, monkeypatch, capsys):
    """README: fp32 on CPU keeps ~17 GB of RAM in use. The real model's 15.4 GiB of fp32 weights + 1.1 GiB of
    activations do not fit into the 10 GiB a 16 GB laptop has free."""
    monkeypatch.setattr(loading, "available_memory", lambda device: (10.0, "of RAM available"))
    stop_at_the_hub(monkeypatch)
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct")
    out = capsys.readouterr().out
    assert ("Warning: the model needs about 16.5 GiB (15.4 GiB of weights in float32 + 1.09 GiB of activations at num_crops=4), "
            "but cpu has only 10.0 GiB of RAM available: loading may run out of memory. Use load_model(dtype='bf16') "
            "(command line: --dtype bf16; about 8.3 GiB) or load_model(quantize='int8') (command line: --quantize int8; "
            "about 4.8 GiB).") in out
    monkeypatch.setattr(loading, "available_memory", lambda device: (20.0, "of RAM available"))
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct")
    assert "Warning" not in capsys.readouterr().out


def test_the_warning_looks_at_the_free_memory_of_the_gpu_asked_for(no_env_model, h100_and_t4, forbid_loading, monkeypatch, capsys):
    free = {0: 80 * 2**30, 1: int(7.79 * 2**30)}  # an 8 GB laptop GPU as cuda:1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free[index], free[index]))
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: False)
    stop_at_the_hub(monkeypatch)
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct", device="cuda:1")
    out = capsys.readouterr().out
    assert "Warning: the model needs about 8.3 GiB (7.7 GiB of weights in bfloat16 + 0.55 GiB" in out
    assert "but cuda:1 has only 7.8 GiB free on GPU 1" in out
    assert ("Use load_model(quantize='int8') (command line: --quantize int8; about 4.8 GiB) or "
            "load_model(quantize='int4') (command line: --quantize int4; about 3.3 GiB).") in out
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct", device="cuda:0")
    assert "Warning" not in capsys.readouterr().out


def test_a_mac_short_of_memory_is_told_that_int8_runs_on_its_cpu(no_env_model, no_gpu, forbid_loading, monkeypatch, capsys):
    """int8 does not run on Apple GPUs, so the warning offered nothing ("Close other programs") to an 8 GB Mac,
    where int8 on the CPU, in the same memory, fits."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(loading, "available_memory", lambda device: (7.0, "of RAM available"))
    stop_at_the_hub(monkeypatch)
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct")
    out = capsys.readouterr().out
    assert "but mps has only 7.0 GiB of RAM available" in out
    assert out.rstrip().endswith("Use load_model(device='cpu', quantize='int8') (command line: --device cpu --quantize int8; "
                                 "about 4.8 GiB; slower: the CPU instead of the Apple GPU)."), out


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_warning_tells_who_asked_for_fp32_to_drop_it(no_env_model, no_gpu, forbid_loading, monkeypatch, capsys, quantize):
    """load_model(quantize='int8', dtype='fp32') was told "Use load_model(quantize='int8')", what it had done; and
    load_model(dtype='fp32') got the size of int8 + bf16 for quantize='int8', which beside dtype='fp32' is int8 + fp32."""
    pytest.importorskip("torchao")
    monkeypatch.setattr(loading, "available_memory", lambda device: (4.0, "of RAM available"))
    stop_at_the_hub(monkeypatch)
    with pytest.raises(ModelLoadError):
        load_model("microsoft/Phi-3.5-vision-instruct", dtype="fp32", quantize=quantize)
    out = capsys.readouterr().out
    int8 = ("load_model(quantize='int8', dtype='bf16') or leave dtype out (command line: --quantize int8 --dtype bf16, "
            "or leave --dtype out; about 4.8 GiB).")
    if quantize is None:
        assert "Use load_model(dtype='bf16') (command line: --dtype bf16; about 8.3 GiB) or " + int8 in out
    else:
        assert "(5.0 GiB of weights in float32 with int8 + 1.09 GiB of activations at num_crops=4)" in out
        assert out.rstrip().endswith("loading may run out of memory. Use " + int8), out


def test_the_warning_of_a_saved_int8_folder_in_fp32_names_the_dtype_only(no_env_model, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Its weights are int8 already: no quantize= to add, only the fp32 beside them to drop."""
    pytest.importorskip("torchao")
    saved = {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, config={"quantization_config": saved})
    monkeypatch.setattr(loading, "available_memory", lambda device: (0.001, "of RAM available"))

    def stop(plan):
        raise ModelLoadError("stopped after the warning")

    monkeypatch.setattr(loading, "_load", stop)
    with pytest.raises(ModelLoadError, match="stopped after the warning"):
        load_model(folder, device="cpu", dtype="fp32")
    out = capsys.readouterr().out
    assert "Use load_model(dtype='bf16') or leave dtype out (command line: --dtype bf16, or leave --dtype out; about " in out
    assert "quantize=" not in out.split("Use ")[1]


def test_check_device_and_check_dtype_normalise_what_load_model_accepts():
    """The command line takes the same spellings (one list of choices: phi_helpers.api.choices)."""
    assert loading.check_device(" CUDA:1 ") == "cuda:1" and loading.check_device("Auto") == "auto"
    assert loading.check_dtype("BFloat16") is torch.bfloat16 and loading.check_dtype("auto") is None
    assert loading.check_dtype(torch.float16) is torch.float16
    with pytest.raises(InvalidArgumentError, match="Unknown device 'tpu'"):
        loading.check_device("tpu")
    with pytest.raises(InvalidArgumentError, match="Unknown dtype 'int8'"):
        loading.check_dtype("int8")


def test_load_model_returns_the_memory_freed_while_loading(monkeypatch, tiny_checkpoint):
    """glibc keeps freed heap memory (e.g. int8 quantization's full-precision copies) unless asked to give
    it back: load_model asks once the model is loaded (benchmarks/bench_quantization.py measures it)."""
    calls = []
    original = loading.return_freed_memory
    monkeypatch.setattr(loading, "return_freed_memory", lambda: calls.append(1) or original())
    load_model(str(tiny_checkpoint), device="cpu")
    assert calls == [1]


def test_a_folder_without_tokenizer_config_loads_as_before(no_env_model, tiny_checkpoint, tmp_path):
    """tokenizer.json alone gives the same tokenizer (transformers' defaults); such a folder loaded before."""
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, remove=["tokenizer_config.json"])
    check_checkpoint_files(folder)


def test_a_model_saved_without_its_processor_is_told_to_save_the_processor(no_env_model, tiny_checkpoint, tmp_path):
    folder = copied_checkpoint(tiny_checkpoint, tmp_path, remove=["tokenizer.json", "tokenizer_config.json",
                                                                    "preprocessor_config.json"])
    with pytest.raises(ModelLoadError, match=r"tokenizer.json' is unusable: it is missing\. If you saved this folder with "
                       r"model\.save_pretrained\(folder\), save the processor into it too: processor\.save_pretrained\(folder\)\."):
        check_checkpoint_files(folder)
    (folder / "tokenizer.json").write_bytes((tiny_checkpoint / "tokenizer.json").read_bytes())
    (folder / "processor_config.json").write_text('{"processor_class": "Phi3VProcessor"}')  # the hub's small one
    with pytest.raises(ModelLoadError, match="it is missing, and processor_config.json holds no image_processor settings"):
        check_checkpoint_files(folder)
