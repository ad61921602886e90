"""Batch extraction over hostile inputs: re-tasked and killed runs, odd file names, symlink loops,
huge or encrypted PDFs, trickling servers, schemas that reach out or recurse, manifests that leave
their folder, brace-heavy answers, broken checkpoints. Every test shows what the user sees: the
message and the exit code. Nothing here touches the network (servers listen on 127.0.0.1).
"""

import base64
import codecs
import builtins
import errno
import functools
import glob
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import phi_helpers  # noqa: F401  (registers the native classes)
from cli_runner import run
from phi_helpers.api import images as images_module
from phi_helpers.api import parsing
from phi_helpers.api.generation import Generation
from phi_helpers.api.images import load_image
from phi_helpers.api.loading import requested_model_id
from phi_helpers.api.parsing import extract_json
from phi_helpers.api.structured import check_extraction
from phi_helpers.cli import app as cli
from phi_helpers.cli import inputs, outputs, tasks
from phi_helpers.errors import ImageDownloadTimeout, ImageLoadError, InvalidArgumentError, JSONExtractionError, ModelLoadError

pytestmark = pytest.mark.usefixtures("tiny_model")  # tests/conftest.py: the CLI loads the cached tiny model

FAST = ["--num-crops", "1", "--max-new-tokens", "2"]
SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}}}


@pytest.fixture
def generations(monkeypatch):
    """Wrap tasks.generate_batch; the returned list gets the number of prompts of every call."""
    calls = []
    real = tasks.generate_batch

    def counting(model, processor, prompts, images, max_new_tokens=512, **kwargs):
        calls.append(len(prompts))
        return real(model, processor, prompts, images, max_new_tokens, **kwargs)

    monkeypatch.setattr(tasks, "generate_batch", counting)
    return calls


def picture(path: Path, color="white", size=(48, 32)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    picture(folder / "a.png", "red")
    picture(folder / "b.png", "blue")
    return folder


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def last_per_item(records: list[dict]) -> dict:
    return {outputs.record_key(record): record for record in records}


def minimal_pdf(media_box: str, trailer_extra: bytes = b"", extra_objects=()) -> bytes:
    """A one-page PDF written by hand (Pillow cannot write huge or encrypted ones)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [" + media_box.encode() + b"] >>",
        *extra_objects,
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer_extra, xref))
    return out.getvalue()


def encrypted_pdf() -> bytes:
    """A PDF with a standard security handler whose password nobody knows."""
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"
    ids = b"/Encrypt 4 0 R /ID [<" + b"33" * 16 + b"> <" + b"33" * 16 + b">] "
    return minimal_pdf("0 0 200 100", ids, [encrypt])


# ----------------------------------------------------------------------------------------------
# Resume is keyed on the whole request
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        (["--task", "ocr"], "task"),
        (["--prompt", "Name the colour."], "prompt"),
        (["--model", "someone/another-model"], "model"),
    ],
)
def test_another_request_redoes_every_item(capsys, tmp_path, folder, generations, change, field):
    output = tmp_path / "out.jsonl"
    base = ["predict", "--image", folder, "--task", "caption", "--output", output, *FAST]
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base, *change)  # argparse: the later value wins
    assert code == 0, err
    assert f"2 of 2 items in {output} answer another request (it differs in: {field}); running them again" in err
    assert generations == [2, 2]
    records = lines_of(output)
    assert len(records) == 4  # nothing lost: the first answers stay, the new ones follow
    assert all(record["request"][field] != records[0]["request"][field] for record in last_per_item(records).values())

    code, _, err = run(capsys, *base, *change)  # the same request again: nothing to do
    assert code == 0 and "2 of 2 items are already done for this request" in err and "Nothing left to do." in err
    assert generations == [2, 2] and len(lines_of(output)) == 4


@pytest.mark.parametrize(
    "change, field",
    [(["--max-new-tokens", "3"], "max_new_tokens"), (["--num-crops", "2"], "num_crops"), (["--dtype", "fp32"], "dtype"),
     (["--model", "tiny"], "model"), (["--prompt", "Describe it."], "prompt")],
)
def test_every_setting_that_changes_the_answer_is_in_the_request(change, field):
    base = ["predict", "--image", "x.png", "--task", "caption", *FAST]
    before, after = (
        tasks.request_fields(args, None, requested_model_id(args.model))
        for args in (cli.build_parser().parse_args(base), cli.build_parser().parse_args(base + change))
    )
    assert outputs.request_differences(before, after) == [field]



@pytest.mark.parametrize("name, change", [
    ("preprocessor_config.json", '{"num_crops": 1}'),  # another num_crops: other image tokens
    ("tokenizer_config.json", '{"chat_template": "{{ messages }}"}'),  # another prompt
    ("generation_config.json", '{"repetition_penalty": 1.5}'),  # other answers
    ("chat_template.jinja", "{{ messages }}"),
])
def test_a_model_folder_whose_settings_change_is_another_request(tmp_path, name, change):
    """Before: only config.json and the weights were fingerprinted; a re-run after a new num_crops, chat template
    or generation setting in the folder said "already done" and kept answers the folder no longer gives."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / name).write_text("{}")
    args = cli.build_parser().parse_args(["predict", "--image", "x.png", "--task", "caption", "--model", str(folder), *FAST])
    before = tasks.request_fields(args, None, str(folder))
    (folder / "trainer_state.json").write_text('{"step": 1}')  # files that change no answer change nothing
    os.utime(folder / name, ns=(1, 1))  # ...nor does a file saved again unchanged
    assert outputs.request_differences(before, tasks.request_fields(args, None, str(folder))) == []
    (folder / name).write_text(change)
    assert outputs.request_differences(before, tasks.request_fields(args, None, str(folder))) == ["model_settings"]
    assert outputs.request_differences({**before, "model_settings": None}, tasks.request_fields(args, None, str(folder))) == []


def test_a_new_wording_of_a_tasks_instruction_is_another_request(monkeypatch):
    """Before: the request held only --prompt (None for caption and ocr), so after an upgrade that rewords the
    built-in instruction, a re-run kept the answers to the old one."""
    args = cli.build_parser().parse_args(["predict", "--image", "x.png", "--task", "caption", *FAST])
    before = tasks.request_fields(args, None, "tiny")
    monkeypatch.setitem(tasks.TASK_PROMPTS, "caption", "Write a detailed paragraph about this image.")
    after = tasks.request_fields(args, None, "tiny")
    assert outputs.request_differences(before, after) == ["prompt_sha256"]
    assert outputs.request_differences({key: value for key, value in before.items() if key != "prompt_sha256"}, after) == []
    no_constrain = cli.build_parser().parse_args(["predict", "--image", "x.png", "--task", "extract", "--schema", "s.json",
                                                  "--no-constrain", *FAST])
    before = tasks.request_fields(no_constrain, SCHEMA, "tiny")
    monkeypatch.setattr(tasks, "RETRY_PROMPT", "Wrong: {problems}. Again.")  # the retry is asked too
    assert outputs.request_differences(before, tasks.request_fields(no_constrain, SCHEMA, "tiny")) == ["prompt_sha256"]


@pytest.mark.parametrize("before", [None, "commit-a"], ids=["downloaded", "updated"])
def test_the_lines_of_a_run_that_downloaded_its_model_name_the_commit(capsys, monkeypatch, tmp_path, folder, before):
    """Before: the request was made before loading, when a hub model not yet downloaded has no commit (its lines,
    model_files null, stayed "done" for any later revision), or the cache still named the commit that loading
    then replaced (the next run redid every item, blaming the model's files)."""
    loaded = []
    in_the_cache = lambda model: "commit-b" if loaded else before  # noqa: E731  (what from_pretrained fetched)
    monkeypatch.setattr(tasks, "model_files", in_the_cache)
    real = tasks.ModelLoader.__call__
    monkeypatch.setattr(tasks.ModelLoader, "__call__", lambda self: loaded.append(True) or real(self))
    output = tmp_path / "out.jsonl"
    assert run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)[0] == 0
    assert [record["request"]["model_files"] for record in lines_of(output)] == ["commit-b", "commit-b"]


def test_a_model_folder_is_one_request_however_it_is_spelled(monkeypatch, tmp_path):
    """A local folder is recorded by its absolute path: ./m and /abs/m are one model, while m from two
    working folders are two (a rerun must not skip items answered by another model)."""
    for name in ("one/m", "two/m"):
        (tmp_path / name).mkdir(parents=True)

    def request(model):
        args = cli.build_parser().parse_args(["predict", "--image", "x.png", "--task", "caption", "--model", model, *FAST])
        return tasks.request_fields(args, None, requested_model_id(args.model))

    monkeypatch.chdir(tmp_path / "one")
    spelled, absolute = request("./m"), request(str(tmp_path / "one" / "m"))
    assert spelled["model"] == str(tmp_path / "one" / "m") and outputs.request_differences(spelled, absolute) == []
    old_line = {**spelled, "model": "m"}  # written before folders were recorded by absolute path, in one/
    assert outputs.request_differences(old_line, absolute) == []
    monkeypatch.chdir(tmp_path / "two")
    assert outputs.request_differences(spelled, request("m")) == ["model"]
    assert request("someone/model")["model"] == "someone/model"  # a hub id stays as it is


def test_a_file_saved_over_in_place_is_run_again(capsys, tmp_path, folder, generations):
    """An in-place save keeps the file's inode (its identity for resuming): its modification time,
    recorded in the line, tells that the answer is about the old picture."""
    output = tmp_path / "out.jsonl"
    args = ["predict", "--image", folder, "--task", "caption", "--output", output, *FAST]
    assert run(capsys, *args)[0] == 0
    first = last_per_item(lines_of(output))[(str(folder / "a.png"), None)]
    assert first["path"] == str(folder / "a.png") and first["modified"] == (folder / "a.png").stat().st_mtime_ns
    inode = (folder / "a.png").stat().st_ino
    with open(folder / "a.png", "r+b") as file:  # a new picture in the same file
        file.write((folder / "b.png").read_bytes())
    os.utime(folder / "a.png", ns=(first["modified"] + 10**9, first["modified"] + 10**9))  # coarse clocks
    assert (folder / "a.png").stat().st_ino == inode
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 of 2 items was modified since their last line" in err and generations == [2, 1]
    code, _, err = run(capsys, *args)
    assert code == 0 and "Nothing left to do." in err and generations == [2, 1]


def test_a_rerun_from_another_folder_never_takes_another_file_for_a_done_one(capsys, monkeypatch, tmp_path, generations):
    """Lines name the file by its absolute path too: "a.png" answered in one folder is not the "a.png"
    of another folder run into the same output, and is found again from any folder."""
    output = tmp_path / "out.jsonl"
    for name, colour in (("one", "red"), ("two", "blue")):
        (tmp_path / name).mkdir()
        picture(tmp_path / name / "a.png", colour)
    monkeypatch.chdir(tmp_path / "one")
    assert run(capsys, "predict", "--image", ".", "--task", "caption", "--output", output, *FAST)[0] == 0
    monkeypatch.chdir(tmp_path / "two")
    code, _, err = run(capsys, "predict", "--image", ".", "--task", "caption", "--output", output, *FAST)
    assert code == 0 and "already done" not in err and generations == [1, 1]  # two's a.png is another file
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "predict", "--image", "one/a.png", "two/a.png", "--task", "caption", "--output", output, *FAST)
    assert code == 0 and "2 of 2 items are already done" in err and generations == [1, 1]

def test_a_moved_project_folder_is_still_done(capsys, monkeypatch, tmp_path, generations):
    """After ``mv proj proj2`` no file is at a line's recorded "path": the same command run in the new
    folder finds the files by their relative "source" (their "modified" time shows they are the same)."""
    project = tmp_path / "proj"
    project.mkdir()
    picture(project / "a.png", "red")
    picture(project / "b.png", "blue")
    monkeypatch.chdir(project)
    args = ["predict", "--image", ".", "--task", "caption", "--output", "out.jsonl", *FAST]
    assert run(capsys, *args)[0] == 0
    project.rename(tmp_path / "proj2")
    monkeypatch.chdir(tmp_path / "proj2")
    code, _, err = run(capsys, *args)
    assert code == 0 and "2 of 2 items are already done" in err and generations == [2]
    picture(tmp_path / "proj2" / "a.png", "green")  # another picture under the old name: its time differs
    os.utime("a.png", ns=(1, 1))
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 of 2 items was modified since their last line" in err and generations == [2, 1]



def test_a_copied_project_folder_is_still_done_while_the_original_stays(capsys, monkeypatch, tmp_path, generations):
    """cp -a proj proj3: the lines' recorded paths still name the original's files, but the copies under
    the same relative names kept the recorded modification times: they are the files the lines answer."""
    project = tmp_path / "proj"
    project.mkdir()
    picture(project / "a.png", "red")
    monkeypatch.chdir(project)
    args = ["predict", "--image", ".", "--task", "caption", "--output", "out.jsonl", *FAST]
    assert run(capsys, *args)[0] == 0
    shutil.copytree(project, tmp_path / "proj3")  # copies the modification times, as cp -a does
    monkeypatch.chdir(tmp_path / "proj3")
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 of 1 item is already done" in err and generations == [1]

def test_editing_the_schema_redoes_the_items_renaming_it_does_not(capsys, tmp_path, folder, generations):
    schema, renamed, output = tmp_path / "s.json", tmp_path / "t.json", tmp_path / "out.jsonl"
    schema.write_text(json.dumps(SCHEMA))
    args = ["predict", "--image", folder, "--task", "extract", "--output", output, *FAST]
    # 4 new tokens cut every answer off: exit code 1, each time, since the file holds them (check_answers)
    code, _, err = run(capsys, *args, "--schema", schema)
    assert code == 1 and "2 of 2 answers in" in err and "when --max-new-tokens (2) cuts it off" in err
    done = len(generations)
    renamed.write_text(json.dumps(SCHEMA, indent=4))  # same content, other file and spelling
    code, _, err = run(capsys, *args, "--schema", renamed)
    assert code == 1 and "2 of 2 items are already done for this request" in err and len(generations) == done
    assert "2 of 2 answers in" in err
    renamed.write_text(json.dumps({**SCHEMA, "required": ["total"]}))
    code, _, err = run(capsys, *args, "--schema", renamed)
    assert code == 1 and "(it differs in: schema_sha256)" in err and len(generations) > done


def test_latest_records_gives_each_item_its_last_line_however_the_runs_named_it(capsys, monkeypatch, tmp_path, folder):
    """An old line (no "path": before 1 Dec 2026), a run by relative names and one by absolute names: the
    documented "last line per path" would give a.png twice (None and its path); a re-run sees one item."""
    monkeypatch.chdir(folder)
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"source": "a.png", "task": "caption", "answer": "oldest"}) + "\n")
    assert run(capsys, "predict", "--image", "a.png", "--task", "caption", "--output", output, *FAST)[0] == 0
    assert run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)[0] == 0
    latest = outputs.latest_records(output)
    assert [(record["source"], record["task"]) for record in latest] == [(str(folder / "a.png"), "ocr"),
                                                                         (str(folder / "b.png"), "ocr")]
    assert len(lines_of(output)) == 4 and len({record.get("path") for record in lines_of(output)}) == 3


def test_latest_records_refuses_a_path_that_holds_no_results(tmp_path):
    """Before: a typo in the path, or another program's file, gave [] as if no item were done."""
    with pytest.raises(InvalidArgumentError, match="No results file at"):
        outputs.latest_records(tmp_path / "typo.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1, "text": "not ours"}\n')
    with pytest.raises(InvalidArgumentError, match="holds no phi-helpers predict record"):
        outputs.latest_records(other)
    (tmp_path / "empty.jsonl").write_text("")
    assert outputs.latest_records(tmp_path / "empty.jsonl") == []  # a run that has written nothing yet
    (tmp_path / "torn.jsonl").write_text('{"source": "a.png", "path": "/x/a.png", "task": "capt')
    assert outputs.latest_records(tmp_path / "torn.jsonl") == []  # killed while writing its first line
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        outputs.latest_records(tmp_path)
    (tmp_path / "notepad.jsonl").write_text('{"source": "a.png", "task": "ocr"}\n', encoding="utf-16")
    with pytest.raises(InvalidArgumentError, match="is saved as UTF-16; save it as UTF-8"):
        outputs.latest_records(tmp_path / "notepad.jsonl")
    with pytest.raises(InvalidArgumentError, match="needs the path of a results file"):
        outputs.latest_records(None)


def test_lines_without_a_request_are_redone(capsys, tmp_path, folder, generations):
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"source": str(folder / "a.png"), "task": "caption", "answer": "old"}) + "\n")
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 0 and "1 of 2 items in" in err
    assert "(it differs in: the request itself, which phi-helpers before 30 Nov 2026 did not record" in err
    assert generations == [2] and lines_of(output)[0]["answer"] == "old"


def test_a_new_request_field_that_is_unset_keeps_old_lines(tmp_path, folder):
    """Adding a key to request_fields with the value None does not make old lines foreign."""
    item = inputs.Item(str(folder / "a.png"))
    old_request = {"task": "ocr", "prompt": None}
    line = {"source": item.source, "task": "ocr", "request": old_request, "answer": "x"}
    (tmp_path / "o.jsonl").write_text(json.dumps(line) + "\n")
    plan = outputs.plan_resume([item], tmp_path / "o.jsonl", {**old_request, "quantize": None})
    assert (plan.todo, plan.done) == ([], 1)
    plan = outputs.plan_resume([item], tmp_path / "o.jsonl", {**old_request, "quantize": "4bit"})
    assert (plan.todo, plan.other_request, plan.differences) == ([item], 1, {"quantize"})


# ----------------------------------------------------------------------------------------------
# Torn lines and interrupted runs
# ----------------------------------------------------------------------------------------------


def test_a_torn_line_is_moved_aside_on_start(capsys, tmp_path, folder, generations):
    output = tmp_path / "out.jsonl"
    args = ["predict", "--image", folder, "--task", "caption", "--output", output, *FAST]
    assert run(capsys, *args)[0] == 0
    first, second = output.read_text().splitlines()
    output.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second line
    code, _, err = run(capsys, *args)
    assert code == 0
    assert f"warning: 1 line of {output} did not parse" in err and f"moved it to {output}.torn" in err
    assert "1 of 2 items is already done for this request" in err and generations == [2, 1]
    records = lines_of(output)  # every line parses again
    assert records[0] == json.loads(first) and len(records) == 2
    assert (tmp_path / "out.jsonl.torn").read_text() == second[: len(second) // 2] + "\n"


def test_invalid_utf8_in_the_output_is_moved_aside_too(capsys, tmp_path, folder):
    output = tmp_path / "out.jsonl"
    output.write_bytes(b'{"source": "x.png", "answer": "\xff"}\n')
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 0 and "warning: 1 line of" in err
    assert (tmp_path / "out.jsonl.torn").read_bytes() == b'{"source": "x.png", "answer": "\xff"}\n'
    assert len(lines_of(output)) == 2


# Long enough answers that a run of 16 images is still going when the test signals it after 2 lines, even
# on a loaded machine where the test's own polling is late (with FAST's 2 tokens the run could end first).
INTERRUPTED = ["--num-crops", "1", "--max-new-tokens", "48"]


def _start_predict(tiny_checkpoint, folder: Path, output: Path) -> subprocess.Popen:
    """``python -m phi_helpers predict`` on ``folder``, one image per generate call."""
    argv = [sys.executable, "-m", "phi_helpers", "predict", "--image", str(folder), "--task", "caption",
            "--output", str(output), "--model", str(tiny_checkpoint), "--batch-size", "1", *INTERRUPTED]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PHI_HELPERS_MODEL", None)
    # Ctrl-C as in a terminal: a job started in the background by a script (CI under `&`) inherits SIGINT ignored
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_lines(process: subprocess.Popen, output: Path, count: int) -> None:
    deadline = time.monotonic() + 300  # generous: a slow shared CI machine; normally a few seconds
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_text(encoding="utf-8").count("\n") >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"predict wrote fewer than {count} lines (exit code {process.poll()})")


@pytest.fixture
def many(tmp_path) -> Path:
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(16):
        picture(folder / f"page_{index:02}.png", (index * 15, 80, 160))
    return folder


def _assert_each_item_answered_once(output: Path, folder: Path) -> None:
    records = lines_of(output)  # every line parses
    successes = [record["source"] for record in records if "error" not in record]
    assert sorted(successes) == sorted(str(path) for path in folder.iterdir())  # none lost, none twice


def test_sigint_in_the_middle_then_resume(capsys, tmp_path, tiny_checkpoint, many):
    output = tmp_path / "out.jsonl"
    process = _start_predict(tiny_checkpoint, many, output)
    _wait_for_lines(process, output, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    # the console script ends by the signal itself, so a shell loop over runs stops too (a shell says 130)
    assert process.returncode == -signal.SIGINT and err.strip().splitlines()[-1].startswith("error: interrupted")
    written = len(lines_of(output))
    assert 2 <= written < 16

    code, _, err = run(capsys, "predict", "--image", many, "--task", "caption", "--output", output,
                       "--model", tiny_checkpoint, "--batch-size", "8", *INTERRUPTED)
    assert code == 0 and f"{written} of 16 items are already done for this request" in err
    _assert_each_item_answered_once(output, many)


def test_sigkill_torn_file_is_repaired_on_resume(capsys, tmp_path, tiny_checkpoint, many):
    output = tmp_path / "out.jsonl"
    process = _start_predict(tiny_checkpoint, many, output)
    _wait_for_lines(process, output, 2)
    process.kill()
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    intact = output.read_bytes()
    intact = intact[: intact.rindex(b"\n") + 1]  # what a kill between two lines leaves
    torn = intact.splitlines()[0][:25]  # ... and what a kill in the middle of a line leaves
    output.write_bytes(intact + torn)

    code, _, err = run(capsys, "predict", "--image", many, "--task", "caption", "--output", output,
                       "--model", tiny_checkpoint, "--batch-size", "8", *INTERRUPTED)
    assert code == 0 and f"warning: 1 line of {output} did not parse" in err
    _assert_each_item_answered_once(output, many)
    assert (tmp_path / "out.jsonl.torn").read_bytes() == torn + b"\n"


# ----------------------------------------------------------------------------------------------
# --output never destroys what the user has: inputs, other files, earlier results, links, devices
# ----------------------------------------------------------------------------------------------


def _refused(capsys, *argv) -> str:
    """Run the command line with the model loader broken: it must fail before loading; return stderr."""
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == "" and err.startswith("error: --output"), err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Make loading the model fail loudly: the checks under test come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", load)


@pytest.mark.parametrize("many", [False, True], ids=["one image", "a folder"])
def test_the_input_itself_is_never_the_output(capsys, tmp_path, folder, no_model, many):
    image = folder / "a.png"
    before = image.read_bytes()
    argv = ["predict", "--image", folder if many else image, "--task", "ocr", "--output", image, *FAST]
    assert "is the input" in _refused(capsys, *argv)
    assert image.read_bytes() == before
    link = tmp_path / "link.png"  # the same file under another name
    link.symlink_to(image)
    assert "is the input" in _refused(capsys, "predict", "--image", image, "--task", "ocr", "--output", link, *FAST)
    assert image.read_bytes() == before


@pytest.mark.parametrize("content", [b"my notes\nline two\n", b'{"source": "a.png", "request": {}}\n    78\n',
                                     b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_a_file_that_is_not_results_is_not_appended_to(capsys, tmp_path, folder, no_model, content):
    output = tmp_path / "notes.txt"
    output.write_bytes(content)
    err = _refused(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
    assert "holds something other than phi-helpers results (line " in err
    assert output.read_bytes() == content and not (tmp_path / "notes.txt.torn").exists()


@pytest.mark.parametrize("many", [False, True], ids=["one image", "a folder"])
def test_another_programs_json_lines_are_not_results(capsys, tmp_path, folder, no_model, many):
    """Lines with a "source" string are not ours without one of our tasks: the file is refused whole,
    not repaired (a line moved to .torn, blank lines dropped) and appended to."""
    data = tmp_path / "data.jsonl"
    content = b'{"source": "wiki", "text": "hello"}\n\n{"source": "books", "page": 12.5}\n'
    data.write_bytes(content)
    image = folder if many else folder / "a.png"
    err = _refused(capsys, "predict", "--image", image, "--task", "caption", "--output", data, *FAST)
    assert "holds something other than phi-helpers results (line 1: " in err
    assert data.read_bytes() == content and not (tmp_path / "data.jsonl.torn").exists()


@pytest.mark.parametrize("name", ["victim.png", "victim.pdf", "victim.bin"])
def test_a_single_answer_or_a_report_never_replaces_a_file_that_is_not_text(capsys, tmp_path, folder, no_model, name):
    """A slip of the tab key (--output scan.png) must not turn a picture or a document into text."""
    victim = tmp_path / name
    if name.endswith(".png"):
        picture(victim)
    else:  # a PDF (pure ASCII, as hand-made ones can be), or binary bytes
        victim.write_bytes(minimal_pdf("0 0 100 50") if name.endswith(".pdf") else b"\x00\x01\xfe data" * 100)
    before = victim.read_bytes()
    err = _refused(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--output", victim, *FAST)
    assert "holds something other than text" in err and "the answer would replace it" in err
    eval_set = Path(__file__).parents[1] / "data" / "eval"
    err = _refused(capsys, "eval", "--data", eval_set, "--limit", "1", "--output", victim, *FAST)
    assert "holds something other than text" in err and "the report would replace it" in err
    assert victim.read_bytes() == before


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_text_file_in_another_encoding_is_replaced_as_asked(capsys, tmp_path, folder, encoding):
    notes = tmp_path / "notes.txt"
    notes.write_bytes("café notes\n".encode(encoding))  # utf-16: with its byte order mark, as Notepad saves
    code, _, err = run(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--output", notes, *FAST)
    assert code == 0, err
    assert "café" not in notes.read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("many", [False, True], ids=["one image", "a folder"])
def test_devices_and_pipes_are_refused_without_reading_them(capsys, tmp_path, folder, no_model, many):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it to resume would wait for a writer forever
    image = folder if many else folder / "a.png"
    for output in (fifo, Path(os.devnull)):
        err = _refused(capsys, "predict", "--image", image, "--task", "ocr", "--output", output, *FAST)
        assert "is not a regular file" in err


def test_a_linked_output_stays_a_link_and_keeps_its_permissions(capsys, tmp_path, folder, generations):
    target, link = tmp_path / "real.json", tmp_path / "answer.json"
    target.write_text("an older answer\n")
    target.chmod(0o640)
    link.symlink_to(target)
    argv = ["predict", "--image", folder / "a.png", "--task", "ocr", "--format", "json", "--output", link, *FAST]
    assert run(capsys, *argv)[0] == 0
    assert link.is_symlink() and json.loads(target.read_text())["task"] == "ocr"
    assert target.stat().st_mode & 0o777 == 0o640
    jsonl, jsonl_link = tmp_path / "real.jsonl", tmp_path / "results.jsonl"
    jsonl.write_text('{"source": "x.png", "answer": "torn')  # repaired: the file is rewritten, the link kept
    jsonl_link.symlink_to(jsonl)
    assert run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", jsonl_link, *FAST)[0] == 0
    assert jsonl_link.is_symlink() and len(lines_of(jsonl)) == 2


def test_a_new_output_gets_the_usual_permissions(capsys, tmp_path, folder, generations):
    old = os.umask(0o022)
    try:
        assert run(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--output", tmp_path / "a.txt",
                   *FAST)[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_one_image_into_a_jsonl_file_adds_a_line(capsys, tmp_path, folder, generations):
    output = tmp_path / "all.jsonl"
    for name in ("a.png", "b.png", "a.png"):  # a loop of single-image calls builds one results file
        code, out, err = run(capsys, "predict", "--image", folder / name, "--task", "ocr", "--output", output, *FAST)
        assert code == 0 and out == ""
    assert [Path(record["source"]).name for record in lines_of(output)] == ["a.png", "b.png"]
    assert "1 of 1 item is already done" in err and generations == [1, 1]
    renamed = tmp_path / "results.json"  # results under another name are appended to as well
    output.rename(renamed)
    assert run(capsys, "predict", "--image", folder / "a.png", "--task", "caption", "--output", renamed, *FAST)[0] == 0
    assert len(lines_of(renamed)) == 3
    code, _, err = run(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--format", "txt",
                       "--output", renamed, *FAST)
    assert code == 2 and "holds earlier results" in err and len(lines_of(renamed)) == 3


def test_a_line_with_wrong_field_types_is_moved_aside(capsys, tmp_path, folder, generations):
    output = tmp_path / "out.jsonl"
    edited = json.dumps({"source": str(folder / "a.png"), "page": [1, 2], "task": "ocr", "answer": "x"})
    output.write_text(edited + "\n")
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
    assert code == 0 and "1 line of" in err and "broken by an edit" in err
    assert (tmp_path / "out.jsonl.torn").read_text() == edited + "\n" and len(lines_of(output)) == 2


def test_numbers_json_cannot_hold_are_written_as_text(capsys, tmp_path, folder, monkeypatch):
    monkeypatch.setattr(tasks, "generate_batch", lambda *args, **kwargs: [Generation('{"total": NaN}', 1, 1, 0.1, 0.1, 1)])
    schema, output = tmp_path / "s.json", tmp_path / "out.jsonl"
    schema.write_text(json.dumps(SCHEMA))
    argv = ["predict", "--image", folder / "a.png", "--task", "extract", "--schema", schema, "--no-constrain"]
    assert run(capsys, *argv, "--output", output)[0] == 1  # NaN is no JSON number: not a valid answer

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads(output.read_text().splitlines()[-1], parse_constant=refuse)
    assert record["answer"] == {"total": "NaN"} and record["valid"] is False and "total: NaN is not a JSON number" in record["errors"]


def test_too_many_crops_is_a_usage_error(capsys, folder, no_model):
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", "x.jsonl", "--num-crops", "840")
    assert code == 2 and "Use at most 839" in err


# ----------------------------------------------------------------------------------------------
# One bad item never stops the others
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="these file systems only allow UTF-8 names")
def test_names_that_are_not_utf8_are_recorded_losslessly(capsys, tmp_path, folder, generations):
    strange = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    picture(Path(strange), "green")
    (Path(os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.png"))).write_bytes(b"not a png")
    output = tmp_path / "out.jsonl"
    args = ["predict", "--image", folder, "--task", "caption", "--output", output, *FAST]
    code, _, err = run(capsys, *args)
    assert code == 1 and "1 of 4 items failed" in err
    records = {record["source"]: record for record in lines_of(output)}
    good, bad = records[f"{folder}/caf\\xe9.png"], records[f"{folder}/bad\\xff.png"]
    assert base64.b64decode(good["source_b64"]) == os.fsencode(strange) and "answer" in good
    assert "Could not read" in bad["error"] and "bad\\xff.png" in bad["error"]
    assert "answer" in records[str(folder / "a.png")] and "answer" in records[str(folder / "b.png")]

    code, _, err = run(capsys, *args)  # the lossless name finds the finished item again
    assert code == 1 and "3 of 4 items are already done" in err and "1 of 4 items failed in an earlier run" in err

    assert "path" not in good and good["modified"] == os.stat(strange).st_mtime_ns
    os.utime(strange, ns=(good["modified"] + 10**9, good["modified"] + 10**9))  # saved over: run again
    code, _, err = run(capsys, *args)  # before: no "modified" in the line, so the edit went unseen
    assert "1 of 4 items was modified since their last line" in err


def test_huge_encrypted_and_empty_pdfs_fail_alone(capsys, tmp_path, folder):
    (folder / "c_huge.pdf").write_bytes(minimal_pdf("0 0 20000 20000"))
    (folder / "d_locked.pdf").write_bytes(encrypted_pdf())
    (folder / "e_empty.pdf").write_bytes(b"")  # read right after the encrypted one
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1 and "3 of 5 items failed" in err
    errors = {Path(record["source"]).name: record.get("error") for record in lines_of(output)}
    assert errors["a.png"] is None and errors["b.png"] is None
    assert "Refusing to decode page 1 of" in errors["c_huge.pdf"] and "MAX_IMAGE_PIXELS" in errors["c_huge.pdf"]
    assert "40,000 x 40,000" in errors["c_huge.pdf"]
    assert errors["d_locked.pdf"].startswith(f"The PDF '{folder / 'd_locked.pdf'}' is encrypted")
    assert errors["e_empty.pdf"] == f"The PDF '{folder / 'e_empty.pdf'}' is empty (0 bytes). Re-save or re-download it."


def test_pdf_pages_obey_the_image_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "page.pdf"
    path.write_bytes(minimal_pdf("0 0 100 50"))  # rendered at scale 2: 200 x 100 = 20,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow opens twice that: the limit of images
    assert inputs.render_pdf_page(path, 1).size == (200, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9_999)
    with pytest.raises(ImageLoadError, match="200 x 100 = 20,000 pixels"):
        inputs.render_pdf_page(path, 1)


@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "-"])
def test_standard_output_is_never_an_output_file(capsys, tmp_path, folder, no_model, name):
    """Even with stdout redirected to a user's file (where /dev/stdout leads), it is not replaced."""
    err = _refused(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--output", name, *FAST)
    assert "without --output the answer is printed" in err or "leave --output out" in err


def test_a_linked_folder_cannot_lead_to_standard_output(capsys, tmp_path, folder, no_model):
    (tmp_path / "fds").symlink_to("/dev/fd")  # fds/1 is stdout, by way of /proc/self/fd
    (tmp_path / "me").symlink_to("/proc/self")
    for output in (tmp_path / "fds" / "1", tmp_path / "me" / "fd" / "1"):
        err = _refused(capsys, "predict", "--image", folder / "a.png", "--task", "ocr", "--output", output, *FAST)
        assert "is not a regular file" in err
    if Path("/dev/shm").is_dir():
        outputs.check_output_path(Path("/dev/shm") / f"{tmp_path.name}.jsonl")  # memory-backed files are files

def test_the_schema_and_link_loops_are_refused_too(capsys, tmp_path, folder, no_model):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    argv = ["predict", "--image", folder / "a.png", "--task", "extract", "--schema", schema, *FAST]
    assert "is the input" in _refused(capsys, *argv, "--output", schema)
    assert json.loads(schema.read_text()) == SCHEMA
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert "loop of symbolic links" in _refused(capsys, *argv, "--output", tmp_path / "loop_a")


def test_two_runs_never_write_one_file(capsys, tmp_path, folder, no_model):
    output = tmp_path / "out.jsonl"
    with outputs.OutputLock(output):  # another run holds it
        code, _, err = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", output, *FAST)
        assert code == 75 and "Another phi-helpers run is writing" in err  # 75: try again later
    assert not output.exists()  # the lock's empty file is gone again


@pytest.mark.parametrize("failure, exit_code", [(KeyboardInterrupt, 130), (ModelLoadError("no model"), 1)],
                         ids=["ctrl-c", "model-load-error"])
def test_a_run_that_stops_early_keeps_a_linked_output(capsys, monkeypatch, tmp_path, folder, failure, exit_code):
    """--output is a link to a file not made yet: the empty file made through it goes again, the link stays."""
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").mkdir()
    link = tmp_path / "lnk" / "out.jsonl"
    link.symlink_to(tmp_path / "real" / "out.jsonl")

    def load(*args, **kwargs):
        raise failure

    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", load)
    code, _, _ = run(capsys, "predict", "--image", folder, "--task", "ocr", "--output", link, *FAST)
    assert code == exit_code and link.is_symlink() and not (tmp_path / "real" / "out.jsonl").exists()


def test_the_lock_follows_a_repaired_file(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"source": "a.png", "task": "ocr", "answer": "x"}\n{"source": "b.p')
    with outputs.OutputLock(output) as lock:
        assert outputs.repair_jsonl(output) == 1  # replaced the file: a new inode
        lock.follow()
        with pytest.raises(outputs.CommandLineError, match="Another phi-helpers run"):
            outputs.OutputLock(output).__enter__()
    with outputs.OutputLock(output):  # released at the end
        pass


def test_resume_knows_a_file_by_any_spelling(capsys, tmp_path, folder, generations, monkeypatch):
    output = tmp_path / "out.jsonl"
    output.write_bytes(b"\xef\xbb\xbf")  # a byte order mark from an editor is no obstacle either
    monkeypatch.chdir(folder)
    assert run(capsys, "predict", "--image", "a.png", "--image", "b.png", "--task", "ocr", "--output", output, *FAST)[0] == 0
    (tmp_path / "hard.png").hardlink_to(folder / "b.png")
    code, _, err = run(capsys, "predict", "--image", folder / "a.png", tmp_path / "hard.png", "--task", "ocr",
                       "--output", output, *FAST)
    assert code == 0 and "2 of 2 items are already done" in err and generations == [2]


def test_a_file_named_twice_runs_once(capsys, tmp_path, folder, generations):
    output = tmp_path / "out.jsonl"
    (tmp_path / "link.png").symlink_to(folder / "a.png")
    code, _, err = run(capsys, "predict", "--image", folder / "a.png", folder, tmp_path / "link.png", folder / "a.png",
                       "--task", "ocr", "--output", output, *FAST)
    assert code == 0 and "2 of 2 items done" in err and generations == [2]
    assert [record["source"] for record in lines_of(output)] == [str(folder / "a.png"), str(folder / "b.png")]


def test_globs_and_folders_do_not_follow_symlink_loops(capsys, tmp_path, folder):
    (folder / "sub").mkdir()
    picture(folder / "sub" / "c.png", "white")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)  # scans/sub/loop -> scans
    (folder / "alias.png").symlink_to(folder / "a.png")  # the same file under a second name
    expected = [folder / "a.png", folder / "b.png", folder / "sub" / "c.png"]
    assert [Path(item.source) for item in inputs.collect_items(f"{folder}/**/*.png")] == expected
    assert [Path(item.source) for item in inputs.collect_items(str(folder))] == expected[:2]
    assert [Path(item.source) for item in inputs.collect_items(f"{folder}/*/*.png")] == expected[2:]

    output = tmp_path / "out.jsonl"
    code, _, _ = run(capsys, "predict", "--image", f"{folder}/**/*.png", "--task", "caption", "--output", output, *FAST)
    assert code == 0 and [Path(record["source"]) for record in lines_of(output)] == expected


def test_glob_matches_like_the_standard_library_without_links(tmp_path, monkeypatch):
    for name in ("a.png", "b.jpg", ".hidden.png", "x/c.png", "x/y/d.png", ".h/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pattern in ("*.png", "**/*.png", "x/**/*.png", "*/*.png", "**", "?.*", "[ab].*"):
        wanted = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        assert inputs.glob_files(pattern) == wanted, pattern


def test_a_glob_ignores_case_where_the_system_does(tmp_path, monkeypatch):
    """On Windows a camera's IMG_0001.JPG matches *.jpg (Python's glob and PowerShell agree); the pattern
    matched case by case, so those files were left out without a word."""
    for name in ("IMG_0001.JPG", "shot.jpg"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert inputs.glob_files("*.jpg") == [Path("shot.jpg")]  # Linux and macOS: names differ by case
    monkeypatch.setattr(os.path, "normcase", str.lower)  # what ntpath.normcase does on Windows (also to "\\")
    assert inputs.glob_files("*.jpg") == [Path("IMG_0001.JPG"), Path("shot.jpg")]


# ----------------------------------------------------------------------------------------------
# Files and folders this user may not read
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def locked(monkeypatch, tmp_path) -> Path:
    """A folder this user may not enter, as ``chmod 000`` makes it for anyone but root (these tests may
    run as root, whom the kernel lets in): listing it, or looking at or opening anything in it, also
    through a link, is "permission denied" (as Python 3.11's pathlib then raises too)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    picture(locked / "b.png", "green")

    def denied(real, listing=False):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                where = os.path.realpath(path)
                if where.startswith(f"{locked}{os.sep}") or (listing and where == str(locked)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "stat", denied(os.stat))
    monkeypatch.setattr(os, "scandir", denied(os.scandir, listing=True))
    monkeypatch.setattr(os, "listdir", denied(os.listdir, listing=True))
    monkeypatch.setattr(builtins, "open", denied(builtins.open))
    return locked


def _errors(output: Path) -> dict:
    return {record["source"]: record["error"] for record in lines_of(output) if "error" in record}


def test_an_unreadable_file_in_a_folder_is_one_failed_item(capsys, tmp_path, folder, locked, generations):
    (folder / "c.png").symlink_to(locked / "b.png")
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1 and "2 of 3 items done" in err and generations == [2]
    (message,) = _errors(output).values()
    assert message.startswith(f"Could not read '{folder / 'c.png'}' (Permission denied). Check that you may read it")


def test_unreadable_values_among_several_are_failed_items(capsys, tmp_path, folder, locked, generations):
    """Among several --image values, a file, a folder or a pattern's folder that cannot be read is one
    failed item each; the others run."""
    output = tmp_path / "out.jsonl"
    argv = [folder / "a.png", locked / "b.png", f"{locked}/*.png", folder / "b.png"]
    code, _, err = run(capsys, "predict", "--image", *argv, "--task", "caption", "--output", output, *FAST)
    assert code == 1 and "2 of 4 items done" in err and generations == [2]
    errors = _errors(output)
    assert sorted(errors) == sorted([str(locked / "b.png"), str(locked)])
    assert errors[str(locked / "b.png")].startswith(
        f"Could not read '{locked / 'b.png'}' (Permission denied). Check that you may read it")
    assert errors[str(locked)].startswith(
        f"Could not list the folder '{locked}' (Permission denied), so none of its files were run. Check")
    assert inputs.is_multi_input(str(locked / "b.png")) is False and inputs.is_multi_input(f"{locked}/*.png") is True


@pytest.mark.parametrize("spec", ["file", "folder", "pattern"])
def test_one_unreadable_image_value_fails_at_once_with_advice(capsys, tmp_path, locked, spec, no_model):
    image = {"file": locked / "b.png", "folder": locked, "pattern": f"{locked}/*.png"}[spec]
    output = [] if spec == "file" else ["--output", tmp_path / "out.jsonl"]
    code, out, err = run(capsys, "predict", "--image", image, "--task", "caption", *output, *FAST)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: Could not ") and "(Permission denied)" in err and "Check that you may read" in err


def test_a_subfolder_that_cannot_be_listed_is_a_warning(capsys, tmp_path, folder, locked, generations):
    """Under **, a folder that cannot be entered is left out with a warning that names it; the others run."""
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", f"{tmp_path}/**/*.png", "--task", "caption", "--output", output,
                       *FAST)
    assert code == 0 and generations == [2]
    assert f"warning: could not list the folder '{locked}' (Permission denied) under '{tmp_path}/**/*.png': its files " \
           "were not included" in err


def test_photos_pillow_cannot_read_are_named_not_silently_left_out(tmp_path, capsys):
    """A folder of iPhone photos (HEIC) was "a folder without images", and an SVG among JPEGs vanished
    without a word. AVIF, which Pillow reads, is an image of the folder."""
    mixed, phone = tmp_path / "mixed", tmp_path / "phone"
    mixed.mkdir(), phone.mkdir()
    picture(mixed / "a.png")
    Image.new("RGB", (30, 20), "red").save(mixed / "b.avif")
    (mixed / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    for name in ("IMG_1.HEIC", "IMG_2.heic"):
        (phone / name).write_bytes(b"\0\0\0\x18ftypheic")
    assert [Path(item.source).name for item in inputs.collect_items(str(mixed))] == ["a.png", "b.avif"]
    assert f"warning: under '{mixed}', 1 SVG file was left out (logo.svg): Pillow cannot read it, convert it to " \
           "JPEG or PNG; then run again to add them." in capsys.readouterr().err
    for spec in (str(phone), str(phone / "*")):
        with pytest.raises(ImageLoadError, match=r"; 2 HEIC/HEIF files were left out \(IMG_1.HEIC, IMG_2.heic\): "
                           r"Pillow cannot read them, convert them to JPEG or PNG\.$"):
            inputs.collect_items(spec)


def test_a_folder_of_folders_points_to_a_pattern(tmp_path):
    (tmp_path / "scans" / "2024").mkdir(parents=True)
    picture(tmp_path / "scans" / "2024" / "a.png")
    with pytest.raises(ImageLoadError, match=r"contains no image or PDF files .*; for the files of its sub-folders use "
                       r"a pattern \(quoted\): --image '.*/scans/\*\*/\*\.png'\.$"):
        inputs.collect_items(str(tmp_path / "scans"))


# ----------------------------------------------------------------------------------------------
# Downloads are bounded in time
# ----------------------------------------------------------------------------------------------


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Announces a 1 MB PNG, then sends one byte every 0.1 s: each read is quick, the whole is not."""

    def do_GET(self):  # noqa: N802  (the http.server name)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(100):  # ends by itself after 10 s
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()
    server.server_close()


def test_a_trickling_server_hits_the_total_deadline(trickling_url):
    with pytest.raises(ImageDownloadTimeout, match=r"took longer than max_seconds=0.5 \([\d,]+ bytes of the image arrived so far\)"):
        load_image(trickling_url, timeout=2, max_seconds=0.5)


def test_a_trickling_server_in_a_batch_is_one_failed_item(capsys, monkeypatch, tmp_path, folder, trickling_url):
    monkeypatch.setattr(inputs, "load_image", functools.partial(images_module.load_image, timeout=2, max_seconds=0.5))
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", trickling_url, folder / "a.png", "--task", "caption",
                       "--output", output, *FAST)
    assert code == 1 and "1 of 2 items failed" in err and f"failed: {trickling_url}: Downloading" in err
    first, second = lines_of(output)
    assert "took longer than max_seconds=0.5" in first["error"] and "answer" in second


# ----------------------------------------------------------------------------------------------
# Schemas are read, never fetched
# ----------------------------------------------------------------------------------------------


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        _Counting.hits += 1
        body = json.dumps({"type": "number"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def schema_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Counting.hits = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "make_schema, message",
    [
        (lambda url: {"properties": {"total": {"$ref": f"{url}/number.json"}}},
         "The $ref 'URL/number.json' (at #/properties/total) does not point inside the schema"),
        (lambda url: {"properties": {"total": {"$ref": "number.schema.json"}}},
         "The $ref 'number.schema.json' (at #/properties/total) does not point inside the schema"),
        (lambda url: {"$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
                      "$ref": "#/$defs/node"},
         "The schema is recursive: the $ref '#/$defs/node'"),
        (lambda url: {"properties": {"next": {"$ref": "#"}}}, "The schema is recursive: the $ref '#'"),
        (lambda url: {"properties": {"total": {"$ref": "#/$defs/missing"}}}, "The $ref '#/$defs/missing' (at #/properties/total) does not point"),
        (lambda url: {"$dynamicRef": "#meta"}, "$dynamicRef (at #) is not supported"),
    ],
    ids=["url", "file", "tree", "self", "missing", "dynamic"],
)
def test_schemas_that_reach_out_or_recurse_are_refused_before_the_run(
    capsys, tmp_path, folder, tiny_model, schema_server, make_schema, message
):
    (tmp_path / "number.schema.json").write_text('{"type": "number"}')
    schema = tmp_path / "bad.schema.json"
    schema.write_text(json.dumps(make_schema(schema_server)))
    code, out, err = run(capsys, "predict", "--image", folder, "--task", "extract", "--schema", schema,
                         "--output", tmp_path / "out.jsonl", *FAST)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: The schema file '{schema}': {message.replace('URL', schema_server)}")
    assert _Counting.hits == 0 and tiny_model.calls == 0 and not (tmp_path / "out.jsonl").exists()


def test_refs_inside_the_schema_work(capsys, tmp_path, folder):
    schema = tmp_path / "ok.schema.json"
    schema.write_text(json.dumps({
        "type": "object", "properties": {"total": {"$ref": "#/$defs/money"}, "tax": {"$ref": "#/$defs/money"}},
        "$defs": {"money": {"type": "number"}},
    }))
    code, out, err = run(capsys, "predict", "--image", folder / "a.png", "--task", "extract", "--schema", schema, "--format", "json", *FAST)
    assert code == 1 and "cut off by max_new_tokens" in err  # the refs resolved; 2 new tokens cannot close the object
    assert '{"total":'.startswith(json.loads(out)["raw"][0])  # the grammar's first tokens


# ----------------------------------------------------------------------------------------------
# Eval manifests stay inside their folder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "../outside.png", "task": "ocr", "expected": "x"}, "the image path '../outside.png' leads outside"),
        ({"image": "ABSOLUTE", "task": "ocr", "expected": "x"}, "the image path 'ABSOLUTE' leads outside"),
        ({"image": "link/outside.png", "task": "ocr", "expected": "x"}, "the image path 'link/outside.png' leads outside"),
        ({"image": "in.png", "task": "extract", "expected": {}, "schema": "../s.json"}, "the schema path '../s.json' leads outside"),
        ({"image": 7, "task": "ocr", "expected": "x"}, "image must be a file name (a non-empty string), not 7"),
        ({"image": "in\u0000.png", "task": "ocr", "expected": "x"}, "the image path 'in\\x00.png' contains a NUL character"),
    ],
    ids=["dotdot", "absolute", "symlink", "schema", "not-a-string", "nul"],
)
def test_manifest_paths_must_stay_in_the_data_folder(capsys, tmp_path, tiny_model, line, message):
    picture(tmp_path / "outside.png")
    (tmp_path / "s.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    picture(data / "in.png")
    (data / "link").symlink_to(tmp_path, target_is_directory=True)
    if line["image"] == "ABSOLUTE":
        line = {**line, "image": str(tmp_path / "outside.png")}
        message = message.replace("ABSOLUTE", line["image"])
    (data / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    code, out, err = run(capsys, "eval", "--data", data, *FAST)
    assert code == 1 and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {data / 'manifest.jsonl'}, line 1: {message}")
    assert tiny_model.calls == 0


# ----------------------------------------------------------------------------------------------
# extract_json: bounded work, no RecursionError
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["{x}" * 3000, "{x]" * 3000, '{"a": [1, {"b": ' * 30 + "}" * 3000, "[1, " * 90 + "]" * 89 + "x" * 3000,
     ("[" * 40 + "1," + "]" * 40) * 100, 'say "{" and [ "x" ' * 500, "a { b [ c } d ] " * 1000],
    ids=["braces", "mismatched", "unbalanced", "cut-off", "nested-invalid", "quotes", "prose"],
)
def test_extract_json_decodes_about_the_text_length(monkeypatch, text):
    """The work is counted, not timed: decoding at every brace (quadratic) would read the text
    hundreds of times over; the bracket matching lets each character be decoded a few times."""
    decoded = []

    class CountingDecoder(parsing.json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            decoded.append(len(s) - idx)
            return super().raw_decode(s, idx)

    monkeypatch.setattr(parsing.json, "JSONDecoder", CountingDecoder)
    with pytest.raises(JSONExtractionError, match="does not parse|nested more than 100 levels"):
        extract_json(text)
    assert sum(decoded) <= 45 * len(text)  # the 40-deep invalid nests may be tried once per level


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000,
                                  "```json\n" + "[" * 100_000 + "\n```", "[" * 101 + '{"a": 1}' + "]" * 101,
                                  '[{"a": 1}, ' + "[" * 200 + "]" * 200 + "]"])
def test_deep_nesting_is_a_json_extraction_error(text):
    with pytest.raises(JSONExtractionError, match="nested more than 100 levels deep") as error:
        extract_json(text)
    assert error.value.text == text  # no piece of a too-deep structure is taken for the answer


def test_extract_json_still_finds_the_first_value():
    assert extract_json('x {[1]: 2} y') == [1]  # the object fails where the array starts
    assert extract_json('{ bad {"a": 1} }') == {"a": 1}
    assert extract_json('He said "hi {" then {"a": "}"} ok') == {"a": "}"}
    deepest = extract_json("[" * 100 + "]" * 100)  # 100 levels are fine
    for _level in range(99):
        (deepest,) = deepest
    assert deepest == []


# ----------------------------------------------------------------------------------------------
# Broken checkpoints
# ----------------------------------------------------------------------------------------------


def _broken(tmp_path, tiny_checkpoint, name: str, damage) -> Path:
    copy = tmp_path / name
    shutil.copytree(tiny_checkpoint, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 1),
         "model.safetensors", "it is truncated: "),
        (lambda d: os.truncate(d / "model.safetensors", 5), "model.safetensors", "its header cannot be read"),
        (lambda d: (d / "config.json").write_text('{"model_type": '), "config.json", "it is not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "config.json", "it is missing"),
        (lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})),
         "model-00002-of-00002.safetensors", "it is missing (model.safetensors.index.json lists it)"),
    ],
    ids=["truncated", "no-header", "bad-config", "no-config", "missing-shard"],
)
def test_broken_checkpoints_name_the_file(capsys, monkeypatch, tmp_path, tiny_checkpoint, damage, file, problem):
    checkpoint = _broken(tmp_path, tiny_checkpoint, "ckpt", damage)
    picture(tmp_path / "photo.png")
    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", phi_helpers.load_model)  # the real loader
    code, out, err = run(capsys, "predict", "--image", tmp_path / "photo.png", "--task", "ocr", "--model", checkpoint,
                         "--device", "cpu", *FAST)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: The checkpoint file '{checkpoint / file}' is unusable: {problem}")


class _TrickledHeaders(http.server.BaseHTTPRequestHandler):
    """Sends its status line, then header bytes one every 0.1 s: the body never even starts."""

    def do_GET(self):  # noqa: N802
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(100):  # ends by itself after 10 s
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_trickled_headers_hit_the_total_deadline_too():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickledHeaders)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
        with pytest.raises(ImageDownloadTimeout, match=r"took longer than max_seconds=0.5 \(0 bytes of the image"):
            load_image(url, timeout=2, max_seconds=0.5)
    finally:
        server.shutdown()
        server.server_close()



# ----------------------------------------------------------------------------------------------
# Numbers too long to read; manifests in UTF-16, with a key twice or an unknown field
# ----------------------------------------------------------------------------------------------

LONG_NUMBER = '{"n": 1' + "0" * 5000 + "}"


@pytest.mark.parametrize("text", [LONG_NUMBER, f"```json\n{LONG_NUMBER}\n```", f"```\n{LONG_NUMBER}\n```",
                                  f"Here: [1, {LONG_NUMBER}] ok"], ids=["bare", "json-fence", "plain-fence", "nested"])
def test_a_number_too_long_to_read_is_a_json_extraction_error(text):
    with pytest.raises(JSONExtractionError, match="a number of more than 4300 digits") as error:
        extract_json(text)
    assert isinstance(error.value, ValueError) and error.value.text == text
    assert 'as a string (an id, a code), or bound it in the schema ("maximum")' in str(error.value)


def test_an_unconstrained_answer_of_endless_digits_goes_to_the_retry():
    data, problems = check_extraction(LONG_NUMBER, SCHEMA)  # raising would fail the item instead
    assert data is None and len(problems) == 1 and "more than 4300 digits" in problems[0]


def _manifest_refusal(capsys, tmp_path, tiny_model, content: bytes) -> str:
    """The one-line error of eval on a set whose manifest.jsonl holds ``content``; the model is never loaded."""
    data = tmp_path / "data"
    data.mkdir()
    picture(data / "a.png")
    (data / "s.json").write_text(json.dumps(SCHEMA))
    (data / "manifest.jsonl").write_bytes(content)
    code, out, err = run(capsys, "eval", "--data", data, *FAST)
    assert code == 1 and out == "" and tiny_model.calls == 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err.strip().removeprefix(f"error: {data / 'manifest.jsonl'}")


OCR_LINE = {"id": "a", "image": "a.png", "task": "ocr", "expected": "hi"}


@pytest.mark.parametrize("encoding, bom", [("UTF-16", b""), ("UTF-16", codecs.BOM_UTF16_BE), ("UTF-32", b"")],
                         ids=["utf-16", "utf-16-be", "utf-32"])
def test_a_manifest_saved_as_utf16_or_utf32_is_named_once(capsys, tmp_path, tiny_model, encoding, bom):
    text = json.dumps(OCR_LINE) + "\n" + json.dumps(dict(OCR_LINE, id="b")) + "\n"
    content = bom + text.encode("utf-16-be") if bom else text.encode(encoding.lower())  # Python's codec writes a BOM
    message = _manifest_refusal(capsys, tmp_path, tiny_model, content)
    assert message == (f" is saved as {encoding}; save it as UTF-8 (e.g. in your editor's Save As, "
                       f"or iconv -f {encoding} -t UTF-8).")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "id": "y", "image": "a.png", "task": "ocr", "expected": "hi"}',
         ", line 1 has the key 'id' twice in one object; JSON readers keep only the last value."),
        ('{"image": "a.png", "task": "extract", "schema": "s.json", "expected": {"total": 1, "total": 2}}',
         ", line 1 has the key 'total' twice"),
        (json.dumps(dict(OCR_LINE, weight=3)),
         ", line 1 has the unknown field(s) 'weight'; a manifest line has only the fields id, image, task, expected, "
         "schema. Fix the name, or remove the field."),
        ('{"imgae": "a.png", "task": "ocr", "expected": "hi", "ID": "a"}',
         ", line 1 has the unknown field(s) 'imgae' (did you mean 'image'?), 'ID' (did you mean 'id'?); a manifest "
         "line has only"),
    ],
    ids=["id-twice", "expected-key-twice", "unknown", "misspelt"],
)
def test_manifest_lines_with_a_key_twice_or_an_unknown_field_are_refused(capsys, tmp_path, tiny_model, line, message):
    assert _manifest_refusal(capsys, tmp_path, tiny_model, (line + "\n").encode()).startswith(message)


def test_every_field_a_line_holds_is_in_the_documented_fields(capsys, tmp_path, folder):
    """docs/batch-robustness.md, "Fields of a results line", names every key a line of either task has."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "batch-robustness.md").read_text(encoding="utf-8")
    section = docs.split("## Fields of a results line", 1)[1].split("\n## ", 1)[0]
    (folder / "broken.png").write_bytes(b"not a picture")
    schema = tmp_path / "total.schema.json"
    schema.write_text(json.dumps({**SCHEMA, "required": ["total"], "properties": {"total": {"type": "integer", "maximum": 9}}}))
    output = tmp_path / "out.jsonl"
    run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    run(capsys, "predict", "--image", folder / "a.png", "--task", "extract", "--schema", schema, "--output", output,
        "--num-crops", "1", "--max-new-tokens", "8")
    lines = lines_of(output)
    assert any("error" in line for line in lines) and any(line["task"] == "extract" for line in lines)
    keys = {key for line in lines for key in line} | {f"request.{key}" for line in lines for key in line["request"]}
    assert not {key for key in keys if f"`{key}`" not in section}


def test_a_glob_that_misses_only_by_case_names_the_files(tmp_path, monkeypatch):
    """Linux: *.jpg on a camera's IMG_0001.JPG said no file matched, listing .jpg among the suffixes it reads."""
    (tmp_path / "IMG_0001.JPG").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError, match=r"1 file would match but for the case of letters \(IMG_0001.JPG\)"):
        inputs.collect_items("*.jpg")
