"""environment_report: facts about this machine, memory needs of the model, a readable table."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

from phi_helpers import environment_report
from phi_helpers.versions import TESTED_VERSIONS


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


def test_weights_memory_for_4_15_billion_parameters():
    report = environment_report(print_report=False)
    assert report["model_parameters"] == 4_146_621_440
    # 4.15e9 parameters x 4 bytes = 16.6 GB = 15.4 GiB; half precision needs half of that.
    assert report["weights_gib"] == {"float32": 15.4, "bfloat16": 7.7, "float16": 7.7}


def test_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = environment_report(print_report=False)
    assert report["cuda_available"] is False
    assert report["gpu_name"] is None and report["gpu_memory_gib"] is None
    assert report["bf16_supported"] is False and report["flash_attn_available"] is False


def fake_gpu(monkeypatch, name, memory_gib, major):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(name=name, total_memory=memory_gib * 2**30)
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8)


def test_gpu_facts_and_whether_the_weights_fit(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Fake T4", 15, major=7)
    report = environment_report()
    assert report["gpu_name"] == "Fake T4" and report["gpu_memory_gib"] == 15.0
    assert report["bf16_supported"] is False
    table = capsys.readouterr().out
    assert "Fake T4 (15.0 GiB)" in table
    assert "weights in float32    15.4 GiB  (does NOT fit in GPU: 15.0 GiB)" in table
    assert "weights in bfloat16   7.7 GiB  (fits in GPU)" in table


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
    monkeypatch.setattr(torch, "__version__", TESTED_VERSIONS["torch"] + "+cpu")  # a local label is the same release
    monkeypatch.setattr(transformers, "__version__", TESTED_VERSIONS["transformers"])
    assert environment_report(print_report=False)["warnings"] == []


@pytest.mark.parametrize("library", [torch, transformers])
def test_warns_when_torch_or_transformers_is_not_the_tested_version(monkeypatch, capsys, library):
    monkeypatch.setattr(torch, "__version__", TESTED_VERSIONS["torch"])
    monkeypatch.setattr(transformers, "__version__", TESTED_VERSIONS["transformers"])
    monkeypatch.setattr(library, "__version__", "9.9.9")
    report = environment_report()
    name = library.__name__
    [warning] = report["warnings"]
    assert f"{name} 9.9.9 is installed" in warning and f"tested with {name} {TESTED_VERSIONS[name]}" in warning
    assert "./run.sh" in warning and "requirements.txt" in warning
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Warning: {name} 9.9.9 is installed" in printed
