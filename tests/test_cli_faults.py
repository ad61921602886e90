"""The command line under faults: an output removed during a run, a full disk, a NUL-filled tail,
hidden files in folders, an interrupted Parquet run, gold answers that break their schema."""

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import phi_helpers  # noqa: F401  (registers the native classes)
from cli_runner import run, scans
from phi_helpers.cli import outputs, tasks

pytestmark = pytest.mark.usefixtures("tiny_model")  # tests/conftest.py: the CLI loads the cached tiny model

FAST = ["--num-crops", "1", "--max-new-tokens", "2", "--batch-size", "1"]


@pytest.fixture
def folder(tmp_path) -> Path:
    return scans(tmp_path, 4, step=60)


def calls_of_generate(monkeypatch, before_call=None) -> list:
    """Wrap tasks.generate_batch: the returned list grows by one per call; ``before_call(n)`` runs first."""
    calls = []
    real = tasks.generate_batch

    def counting(*args, **kwargs):
        calls.append(1)
        if before_call:
            before_call(len(calls))
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "generate_batch", counting)
    return calls


def last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_an_output_removed_during_a_run_stops_it_with_exit_1(capsys, monkeypatch, tmp_path, folder):
    output = tmp_path / "out.jsonl"
    calls = calls_of_generate(monkeypatch, lambda n: n == 3 and output.unlink())  # removed after 2 lines
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1
    assert "removed or replaced" in last_line(err) and "3 result(s)" in last_line(err), err  # all lines of this run are gone
    assert "results in" not in err
    assert len(calls) == 3  # stopped at once: the 4th item was not run into a removed file
    assert not output.exists()


def test_an_output_replaced_during_a_run_is_reported(capsys, monkeypatch, tmp_path, folder):
    output = tmp_path / "out.jsonl"

    def replace(n):
        if n == 2:
            os.replace(output, tmp_path / "moved.jsonl")
            output.write_text("")

    calls_of_generate(monkeypatch, replace)
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1 and "removed or replaced" in last_line(err), err


def test_a_full_disk_names_the_file_and_says_a_rerun_goes_on(capsys, monkeypatch, tmp_path, folder):
    output = tmp_path / "out.jsonl"
    real_fsync, count = os.fsync, []

    def fsync(fd):
        count.append(fd)
        if len(count) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1
    line = last_line(err)
    assert str(output) in line and "No space left on device" in line and "run the same command again" in line, line
    assert "kept" in line
    monkeypatch.setattr(outputs.os, "fsync", real_fsync)
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 0, err
    assert "3 of 4 items are already done" in err  # the lines written before the error count
    assert len(outputs.read_records(output)) == 4


def test_an_interrupted_parquet_run_says_nothing_is_kept_and_can_run_again(capsys, monkeypatch, tmp_path, folder):
    """A Parquet output is not read back to resume: Ctrl-C keeps nothing, and the folder it began (with the
    part files written so far) goes, so that the same command runs again (a JSONL output is the one that resumes)."""
    pytest.importorskip("ray")
    from phi_helpers.cli import ray_engine

    output = tmp_path / "out.parquet"

    def interrupted(*args, **kwargs):
        output.mkdir()  # what the writer has made when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_engine, "_run_on_ray", interrupted)
    argv = ["predict", "--image", folder, "--task", "caption", "--output", output, "--engine", "ray", *FAST]
    code, _, err = run(capsys, *argv)
    assert code == 130
    line = last_line(err)
    assert "cannot resume" in line and ".jsonl" in line and "kept;" not in line, line
    assert not output.exists()
    code, _, err = run(capsys, *argv)
    assert code == 130 and "already exists" not in err  # not refused: it ran (and was interrupted) again


def test_without_an_address_a_new_local_ray_starts_even_when_another_runs(monkeypatch):
    """README: "Without --address it starts a local Ray". A Ray found on the machine (RAY_ADDRESS, or
    /tmp/ray/ray_current_cluster after `ray start --head`) is not joined: ray.init(num_cpus=...) would fail."""
    ray = pytest.importorskip("ray")
    from phi_helpers.cli import ray_engine

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # another cluster (nothing listens there)
    try:
        ray_engine.start_ray(num_cpus=1, dashboard=False)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 1
    finally:
        ray.shutdown()


def test_a_folder_leaves_out_hidden_files_as_a_glob_does(tmp_path):
    """A folder copied from a Mac holds "._NAME.jpg" AppleDouble files: not images, and hidden."""
    from phi_helpers.cli.inputs import collect_items

    mac = tmp_path / "mac"
    mac.mkdir()
    for index in range(2):
        Image.new("RGB", (32, 32), "gray").save(mac / f"IMG_{index}.jpg")
        (mac / f"._IMG_{index}.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(100))
    folder_items = [item.source for item in collect_items(str(mac))]
    assert folder_items == [str(mac / "IMG_0.jpg"), str(mac / "IMG_1.jpg")]
    assert folder_items == [item.source for item in collect_items(str(mac / "*.jpg"))]


def test_eval_refuses_gold_answers_that_break_their_schema_and_repeated_or_bad_ids(tmp_path):
    from phi_helpers.cli.evaluate import read_manifest
    from phi_helpers.errors import ManifestError

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    (tmp_path / "receipt.schema.json").write_text(json.dumps({
        "type": "object", "required": ["total"], "properties": {"total": {"type": "number"}, "note": {"type": "string"}},
    }))
    lines = [
        {"id": "r1", "image": "a.png", "task": "extract", "schema": "receipt.schema.json", "expected": {"totl": 4.2}},
        {"id": "r2", "image": "a.png", "task": "extract", "schema": "receipt.schema.json", "expected": {"total": "4.2"}},
        {"id": "r3", "image": "a.png", "task": "extract", "schema": "receipt.schema.json", "expected": {"total": 4.2}},
        {"id": "o1", "image": "a.png", "task": "ocr", "expected": "text"},
        {"id": "o1", "image": "a.png", "task": "ocr", "expected": "other"},
        {"id": None, "image": "a.png", "task": "ocr", "expected": "text"},
        {"id": {}, "image": "a.png", "task": "ocr", "expected": "text"},
        {"image": "a.png", "task": "ocr", "expected": "text"},  # id "a"
        {"image": "a.png", "task": "ocr", "expected": "text"},  # id "a" again: the same item twice
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path)
    message = str(caught.value)
    assert message.startswith("6 items of"), message
    for number in (1, 2, 5, 6, 7, 9):
        assert f"line {number}:" in message, (number, message)
    assert "line 3:" not in message and "line 4:" not in message and "line 8:" not in message
    assert "'total' is a required property" in message and "'4.2' is not of type 'number'" in message
    assert "also the id of line 4" in message and "also the id of line 8" in message


def test_a_tail_of_nul_bytes_left_by_a_crash_is_moved_aside(tmp_path):
    output = tmp_path / "out.jsonl"
    good = '{"source": "a.png", "task": "ocr", "answer": "x"}\n{"source": "b.png", "task": "ocr", "answer": "y"}\n'
    output.write_bytes(good.encode() + bytes(4096))
    assert outputs.repair_jsonl(output) == 1
    assert output.read_text() == good
    assert outputs.torn_path(output).read_bytes() == bytes(4096) + b"\n"  # kept, not lost
    output.write_bytes(good.encode() + bytes(100) + b"\n" + bytes(50))  # two lines of NULs
    assert outputs.repair_jsonl(output) == 2
    assert output.read_text() == good


def test_the_ray_engine_refuses_a_remote_pdf_page_over_the_pixel_limit(monkeypatch, tmp_path):
    """A replica renders a remote PDF page with render_pdf_page, the pixel limit of images included."""
    pytest.importorskip("pyarrow")
    from PIL import Image as PILImage

    from phi_helpers.cli import ray_engine
    from phi_helpers.errors import ImageLoadError

    pdf = tmp_path / "doc.pdf"
    Image.new("RGB", (200, 150), "white").save(pdf)  # 200 x 150 points: 400 x 300 pixels at 144 dpi
    assert ray_engine.remote_item(f"file://{pdf}", 1).load().size == (400, 300)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50_000)  # pages may have twice that: 100,000 pixels
    with pytest.raises(ImageLoadError, match="page 1 of 'file://"):
        ray_engine.remote_item(f"file://{pdf}", 1).load()
    with pytest.raises(ImageLoadError, match="has no page 3"):
        ray_engine.remote_item(f"file://{pdf}", 3).load()


def test_a_file_size_limit_reached_mid_line_is_named_with_what_to_do(tmp_path, folder, tiny_checkpoint):
    """A write that fails half-way leaves the line's rest in Python's buffer; closing the file tries again
    and fails again: that second failure must not hide the message (a real limit: ulimit -f)."""
    import resource
    import subprocess
    import sys

    output = tmp_path / "out.jsonl"
    env = {**os.environ, "PHI_HELPERS_MODEL": str(tiny_checkpoint), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "phi_helpers", "predict", "--image", str(folder), "--task", "caption",
         "--output", str(output), *FAST],
        capture_output=True, text=True, env=env, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)),  # about one line
    )
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert f"Could not write '{output}': File too large" in line and "run the same command again" in line, line


def test_sigterm_stops_a_run_as_ctrl_c_does_and_keeps_what_was_written(capsys, monkeypatch, tmp_path, folder):
    """``timeout 600 phi-helpers predict ...`` or ``kill``: before, the process died on SIGTERM without a
    word; now it says what it kept and returns 143 (128 + SIGTERM), and the handler before it comes back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    calls_of_generate(monkeypatch, before_call=lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None)
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
    assert code == 143 and "error: interrupted by SIGTERM (everything written so far is kept" in err, err
    assert len(output.read_text().splitlines()) == 2  # the two items before the signal
    assert signal.getsignal(signal.SIGTERM) is before
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
    assert code == 0 and len(output.read_text().splitlines()) == 4  # the same command goes on


def test_file_names_cannot_send_escape_sequences_to_the_terminal(capsys, tmp_path, folder):
    """A crafted name in a pile of documents (a window title, cursor moves that hide the "failed:" line):
    before, it reached the terminal as it was; the records keep the real name (JSON escapes it)."""
    title = "\x1b]0;PWNED\x07\x1b[2K\x1b[1A"
    (folder / f"{title}invoice.png").write_bytes(b"not a png")
    (folder / "\x1b[31mlogo\x1b[0m.svg").write_text("<svg/>")
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
    assert code == 1
    assert "\x1b" not in err and "\x07" not in err
    assert "failed: " in err and "\\x1b]0;PWNED\\x07\\x1b[2K\\x1b[1Ainvoice.png" in err
    assert "(\\x1b[31mlogo\\x1b[0m.svg)" in err  # the SVG left out, named
    sources = [json.loads(line)["source"] for line in output.read_text().splitlines()]
    assert str(folder / f"{title}invoice.png") in sources


def test_new_weights_saved_into_the_same_model_folder_redo_the_items(capsys, monkeypatch, tmp_path, folder, tiny_checkpoint):
    """The request named a local model by its folder only: weights fine-tuned and saved into the same folder
    kept the old answers ("4 of 4 items are already done ... Nothing left to do"). Lines written before the
    model's files were recorded still count as done."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    output = tmp_path / "out.jsonl"
    argv = ["predict", "--image", folder, "--task", "caption", "--output", output, "--model", model, *FAST]
    calls = calls_of_generate(monkeypatch)
    assert run(capsys, *argv)[0] == 0 and len(calls) == 4
    code, _, err = run(capsys, *argv)
    assert code == 0 and "4 of 4 items are already done" in err and len(calls) == 4

    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved over: a new time
    code, _, err = run(capsys, *argv)
    assert code == 0 and len(calls) == 8, err
    assert "4 of 4 items in" in err and "(it differs in: the model's files (config.json or weights" in err, err

    lines = [json.loads(line) for line in output.read_text().splitlines()]  # as an older version wrote them
    for line in lines:
        del line["request"]["model_files"]
    output.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run(capsys, *argv)
    assert code == 0 and "4 of 4 items are already done" in err and len(calls) == 8, err


def test_a_hub_model_is_known_by_the_commit_of_its_cached_snapshot(monkeypatch, tmp_path):
    """Read offline from the Hugging Face cache (no request); nothing when the model is not downloaded."""
    cache = {"owner/name": str(tmp_path / "models--owner--name" / "snapshots" / "0123abcd" / "config.json")}
    monkeypatch.setattr(outputs.huggingface_hub, "try_to_load_from_cache", lambda repo, name: cache.get(repo))
    assert outputs.model_files("owner/name") == "0123abcd"
    assert outputs.model_files("owner/other") is None
    assert outputs.model_files("tiny") is None
