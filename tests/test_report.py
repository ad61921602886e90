"""environment_report: facts about this machine, memory needs of the model, a readable table."""

import importlib.util
import os
import platform
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

from phi_helpers import environment_report
from phi_helpers.api import hardware, quantization, report as report_module
from phi_helpers.versions import TESTED_VERSIONS
from phi_helpers.api.hardware import GIB, memory_estimate, memory_verdict


def test_versions_and_host_facts_match_this_interpreter():
    report = environment_report(print_report=False)
    assert report["torch"] == torch.__version__
    assert report["transformers"] == transformers.__version__
    assert report["python_executable"] == sys.executable
    assert report["phi_helpers_path"].endswith("phi_helpers")
    assert 1 <= report["cpu_count"] <= os.cpu_count()
    if hasattr(os, "sysconf"):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        assert report["ram_gib"] == pytest.approx(ram, abs=0.2)


def test_weights_memory_is_computed_from_the_config():
    report = environment_report(print_report=False)
    assert report["model_parameters"] == 4_146_621_440  # the official checkpoint's 592 tensors, summed
    assert sum(report["parameter_groups"].values()) == 4_146_621_440
    # 4.15e9 parameters x 4 bytes = 16.6 GB = 15.4 GiB; half precision needs half of that.
    weights = report["weights_gib"]
    assert (weights["float32"], weights["bfloat16"], weights["float16"]) == (15.4, 7.7, 7.7)
    # int8: the 3.62e9 decoder Linear weights and the 0.1e9 of lm_head in 1 byte, the other 0.42e9 parameters
    # in 2 (or 4); int4 keeps lm_head in bf16.
    groups = report["parameter_groups"]
    assert groups["decoder_linear"] == 32 * (3072 * 9216 + 3072 * 3072 + 3072 * 16384 + 8192 * 3072)
    assert groups["lm_head"] == 32064 * 3072
    assert weights["int8 + bf16"] == 4.3 and weights["int8 + fp32"] == 5.0 and weights["int4 + bf16"] == 2.7


def test_activation_memory_grows_with_crops_and_tokens():
    small = memory_estimate(num_crops=1, prompt_tokens=16, new_tokens=16)
    large = memory_estimate(num_crops=16, prompt_tokens=16, new_tokens=16)
    assert small["sequence_tokens"] == 2 * 144 + 1 + 2 * 12 + 32  # 1 tile + the global image
    assert large["sequence_tokens"] == 17 * 144 + 1 + 17 * 12 + 32  # a 16x1 grid (a tall page): the most tokens
    assert large["activations_gib"]["bfloat16"] > 4 * small["activations_gib"]["bfloat16"]
    assert large["activations_gib"]["float32"] == pytest.approx(2 * large["activations_gib"]["bfloat16"], abs=0.02)  # each rounded to 0.01
    longer = memory_estimate(num_crops=16, prompt_tokens=16, new_tokens=16 + 1000)
    kv_per_token = 2 * 32 * 32 * 96 * 2  # K and V, 32 layers, 32 heads of 96, bf16
    assert longer["activations_gib"]["bfloat16"] - large["activations_gib"]["bfloat16"] == pytest.approx(
        1000 * kv_per_token / 2**30, abs=0.01
    )


def test_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = environment_report(print_report=False)
    assert report["cuda_available"] is False
    assert report["gpu_name"] is None and report["gpu_memory_gib"] is None
    assert report["bf16_supported"] is False and report["flash_attn_available"] is False


def fake_gpu(monkeypatch, name, memory_gib, major, free_gib=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(name=name, total_memory=memory_gib * 2**30)
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8)
    free = int((memory_gib if free_gib is None else free_gib) * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free, int(memory_gib * 2**30)))


def test_gpu_facts_and_whether_the_weights_fit(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Fake T4", 15, major=7, free_gib=14.6)
    report = environment_report()
    assert report["gpu_name"] == "Fake T4" and report["gpu_memory_gib"] == 15.0 and report["gpu_free_gib"] == 14.6
    assert report["bf16_supported"] is False
    table = capsys.readouterr().out
    assert "Fake T4 (15.0 GiB, 14.6 free)" in table
    assert "weights in float32       15.4 GiB  (does not fit in GPU: needs 16.5 GiB with activations, 14.6 free)" in table
    assert "weights in bfloat16      7.7 GiB  (fits in GPU: needs 8.3 GiB with activations, 14.6 free)" in table


@pytest.mark.parametrize(
    "gpu, memory_gib, expected",
    [
        ("8 GB laptop GPU", 7.79, {"bfloat16": "does not fit", "int8 + bf16": "fits", "int4 + bf16": "fits"}),
        ("RTX 3080 10 GB", 9.77, {"bfloat16": "tight", "int8 + bf16": "fits"}),
        ("RTX 3060 12 GB", 11.76, {"bfloat16": "fits", "float32": "does not fit"}),
        ("V100 16 GB", 15.77, {"float32": "does not fit", "bfloat16": "fits"}),
        ("A100 40 GB", 39.4, {"float32": "fits"}),
    ],
)
def test_the_gpu_verdict_counts_the_activations_as_the_docs_do(monkeypatch, gpu, memory_gib, expected):
    """README: "Use a GPU with ≥ 12 GB" (bf16); notebook 00: int8 fits 8 GB GPUs, int4 6 GB ones. The
    weights alone (7.7 GiB in bf16) would fit the 8 GB GPU, weights + activations do not."""
    fake_gpu(monkeypatch, gpu, memory_gib, major=8)
    fits = environment_report(print_report=False)["fits"]
    assert {name: fits[name] for name in expected} == expected


def test_a_16_gb_laptop_without_a_gpu(monkeypatch, capsys):
    """Notebook 00: fp32 fits only 32 GB machines, bf16 a 16 GB laptop only just, int8 fits; the RAM that
    counts is what is available (a 16 GB laptop with a browser open has about 10 GB)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "total_ram_bytes", lambda: 16 * GIB)
    monkeypatch.setattr(hardware, "available_ram_bytes", lambda: 10 * GIB)
    report = environment_report()
    assert report["ram_available_gib"] == 10.0
    assert report["fits"]["float32"] == "does not fit" and report["fits"]["bfloat16"] == "tight"
    assert report["fits"]["int8 + bf16"] == "fits"
    table = capsys.readouterr().out
    assert "RAM                      16.0 GiB, 10.0 available" in table
    assert "weights in float32       15.4 GiB  (does not fit in RAM: needs 16.5 GiB with activations, 10.0 available)" in table
    assert "weights in bfloat16      7.7 GiB  (tight in RAM: needs 8.3 GiB with activations, 10.0 available)" in table


def test_without_the_available_ram_the_total_counts(monkeypatch):
    """The reviewer's case: 16 GiB of RAM, fp32 said "fits" though 15.4 GiB of weights + 1.1 of activations do not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "total_ram_bytes", lambda: 16 * GIB)
    monkeypatch.setattr(hardware, "available_ram_bytes", lambda: None)
    assert environment_report(print_report=False)["fits"]["float32"] == "does not fit"


def test_memory_verdict_matches_the_readme():
    """README: fp32 on CPU has ~17 GB of RAM in use, "have about 20 GB free"."""
    need = memory_estimate()["need_gib"]
    assert need["float32"] == 16.5 and need["bfloat16"] == 8.3 and need["int8 + bf16"] == 4.8
    assert memory_verdict(need["float32"], 20e9 / GIB) == "fits"
    assert memory_verdict(need["float32"], 18e9 / GIB) == "tight"
    assert memory_verdict(need["float32"], 17e9 / GIB) == "does not fit"


def test_printed_table_is_aligned(capsys):
    environment_report()
    lines = capsys.readouterr().out.splitlines()
    rows = lines[2 : lines.index("")]  # the table ends at the blank line before the note
    assert len(rows) >= 12
    value_columns = {len(line) - len(line[line.index("  "):].lstrip()) for line in rows}
    assert len(value_columns) == 1, rows
    assert any("activations" in line.lower() or "kv cache" in line.lower() for line in lines)


def test_print_report_false_prints_nothing(capsys):
    environment_report(print_report=False)
    assert capsys.readouterr().out == ""


def test_no_warning_with_the_tested_versions(monkeypatch):
    monkeypatch.setattr(platform, "python_version", lambda: TESTED_VERSIONS["python"] + ".7")
    monkeypatch.setattr(torch, "__version__", TESTED_VERSIONS["torch"] + "+cpu")  # a local label is the same release
    monkeypatch.setattr(transformers, "__version__", TESTED_VERSIONS["transformers"])
    assert environment_report(print_report=False)["warnings"] == []


def test_warns_when_python_is_not_the_locks(monkeypatch):
    monkeypatch.setattr(platform, "python_version", lambda: "3.12.1")
    monkeypatch.setattr(torch, "__version__", TESTED_VERSIONS["torch"])
    monkeypatch.setattr(transformers, "__version__", TESTED_VERSIONS["transformers"])
    [warning] = environment_report(print_report=False)["warnings"]
    assert warning.startswith(f"Python 3.12.1 runs this, but the lock is resolved for Python {TESTED_VERSIONS['python']}")


@pytest.mark.parametrize("library", [torch, transformers])
def test_warns_when_torch_or_transformers_is_not_the_tested_version(monkeypatch, capsys, library):
    monkeypatch.setattr(platform, "python_version", lambda: TESTED_VERSIONS["python"] + ".7")
    monkeypatch.setattr(torch, "__version__", TESTED_VERSIONS["torch"])
    monkeypatch.setattr(transformers, "__version__", TESTED_VERSIONS["transformers"])
    monkeypatch.setattr(library, "__version__", "9.9.9")
    report = environment_report()
    name = library.__name__
    [warning] = report["warnings"]
    assert f"{name} 9.9.9 is installed" in warning and f"tested with {name} {TESTED_VERSIONS[name]}" in warning
    assert "./run.sh" in warning and "requirements.txt" in warning
    # a pip install has no run.sh and no lock: the plain pin works there too
    assert f'pip install "{name}=={TESTED_VERSIONS[name]}"' in warning
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Warning: {name} 9.9.9 is installed" in printed


def test_int4_without_a_cuda_gpu_is_not_said_to_fit(monkeypatch, capsys):
    """int4 needs bitsandbytes on a CUDA GPU: load_model refuses it on a CPU, so "fits in RAM" misled."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = environment_report()
    assert report["fits"]["int4 + bf16"] == report_module.NEEDS_CUDA
    assert "(needs a CUDA GPU)" in capsys.readouterr().out


def test_int8_on_a_mac_says_it_runs_with_device_cpu(monkeypatch, capsys):
    """load_model() picks the Apple GPU, where quantize='int8' is refused: the row says where it fits."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    environment_report()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("weights in int8")]
    assert rows and all("in RAM with device='cpu': needs" in row for row in rows)


@pytest.mark.parametrize(
    "gpu, capability, expected",
    [
        ("Fake T4", (7, 5), "not used, load_model picks sdpa: GPU older than Ampere (flash-attn 2 needs compute capability 8.0+)"),
        ("Fake H100", (9, 0), "available (load_model picks flash_attention_2)"),
    ],
)
def test_the_flash_attn_row_is_what_load_model_picks(monkeypatch, capsys, gpu, capability, expected):
    """flash-attn installed on a T4 (compute capability 7.5): load_model picks sdpa, since flash-attn 2 needs an
    Ampere or newer GPU; the report said "available" from flash-attn's own check, which looks at no GPU."""
    fake_gpu(monkeypatch, gpu, 15, major=capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpu)
    monkeypatch.setattr(hardware, "is_flash_attn_2_available", lambda: True)
    report = environment_report()
    assert report["flash_attn_available"] is (capability >= (8, 0))
    assert (report["attention"], report["attention_reason"]) == hardware.pick_attention("auto", "cuda", torch.float16)
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("flash-attn ")]
    assert row.split(None, 1)[1] == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_crops=0), "num_crops must be a whole number of at least 1, got 0"),
    (dict(num_crops=1.5), "num_crops must be a whole number of at least 1, got 1.5"),
    (dict(num_crops="4"), "num_crops must be a whole number"),
    (dict(prompt_tokens=-5), "prompt_tokens must be a whole number of at least 0, got -5"),
    (dict(new_tokens="8"), "new_tokens must be a whole number of at least 1"),
    (dict(print_report="no"), "print_report must be True or False"),
])
def test_a_request_that_cannot_be_is_refused_not_estimated(kwargs, message):
    """Before: num_crops=0 or -3 got estimates and "fits" verdicts; "4" or None a raw TypeError."""
    from phi_helpers.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        environment_report(**{"print_report": False, **kwargs})


def test_the_memory_request_uses_the_crops_of_the_checkpoint_load_model_would_load(monkeypatch, tmp_path):
    """Before: always 4 crops, while load_model gives Phi-3-vision its 16: "fits" where it is tight."""
    from phi_helpers.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "p3v", variant="phi-3-vision")
    for model, crops in ((None, 4), ("tiny", 4), ("microsoft/Phi-3-vision-128k-instruct", 16), (str(folder), 16)):
        monkeypatch.delenv("PHI_HELPERS_MODEL", raising=False)
        if model:
            monkeypatch.setenv("PHI_HELPERS_MODEL", model)
        assert environment_report(print_report=False)["num_crops"] == crops, model
    assert environment_report(print_report=False, num_crops=2)["num_crops"] == 2  # an argument wins


def torchao_row_and_int8_rows(capsys) -> tuple[str, list[str]]:
    lines = capsys.readouterr().out.splitlines()
    [row] = [line for line in lines if line.startswith("torchao ")]
    return row.split(None, 1)[1], [line for line in lines if line.startswith("weights in int8")]


def test_the_torchao_row_shows_its_version_or_how_to_install_it(monkeypatch, capsys):
    """The report showed "weights in int8 + bf16 ... fits" with no word about torchao, which int8 needs on a
    CPU (flash-attn had its row): now a torchao row, and the int8 rows say they need it while it is missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quantization, "torchao_version", lambda: "0.18.0")
    report = environment_report()
    row, int8_rows = torchao_row_and_int8_rows(capsys)
    assert (report["torchao"], report["torchao_missing"], row) == ("0.18.0", None, "0.18.0")
    assert int8_rows and not any("torchao" in line for line in int8_rows)

    monkeypatch.setattr(quantization, "torchao_version", lambda: None)
    report = environment_report()
    row, int8_rows = torchao_row_and_int8_rows(capsys)
    assert report["torchao"] is None
    assert row.startswith("""quantize='int8' needs torchao, which is not installed: pip install "torchao>=0.18\"""")
    assert len(int8_rows) == 2 and all(line.endswith("; needs torchao, see its row)") for line in int8_rows)

    monkeypatch.setattr(quantization, "torchao_version", lambda: "0.17.0")
    environment_report()
    row, int8_rows = torchao_row_and_int8_rows(capsys)
    assert "but torchao 0.17.0 is installed: pip install -U \"torchao>=0.18\"" in row
    assert all("needs torchao" in line for line in int8_rows)


def test_int8_rows_on_a_cuda_gpu_with_bitsandbytes_do_not_need_torchao(monkeypatch, capsys):
    """There quantize='int8' is bitsandbytes' LLM.int8() (quantization_config)."""
    fake_gpu(monkeypatch, "Fake A10", 24, major=8)
    monkeypatch.setattr(quantization, "torchao_version", lambda: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name == "bitsandbytes" else real_find_spec(name, *args))
    environment_report()
    _, int8_rows = torchao_row_and_int8_rows(capsys)
    assert int8_rows and not any("torchao" in line for line in int8_rows)


def test_total_ram_on_a_system_without_proc_or_sysconf(monkeypatch):
    """Windows has neither /proc/meminfo nor os.sysconf: environment_report() said "RAM unknown"."""
    psutil = pytest.importorskip("psutil")
    total = psutil.virtual_memory().total  # (psutil reads /proc/meminfo itself on Linux)

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(hardware, "open", no_proc, raising=False)  # the module's own open()
    monkeypatch.delattr(os, "sysconf")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"total": total})())
    assert hardware.total_ram_bytes() == total
