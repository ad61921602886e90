"""The command line run unattended (cron, containers, shell loops, logs): closed or full standard streams,
signals, exit codes, progress in a log file, a Ray run whose model cannot load, read-only filesystems."""

import errno
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers.utils import logging as hf_logging

import phi_helpers  # noqa: F401  (registers the native classes)
from cli_runner import run, scans
from phi_helpers.api import loading
from phi_helpers.cli import app, outputs, ray_engine, tasks
from phi_helpers.errors import CommandLineError, ModelLoadError

pytestmark = pytest.mark.usefixtures("tiny_model")  # tests/conftest.py: the CLI loads the cached tiny model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-crops", "1", "--max-new-tokens", "2", "--batch-size", "1"]


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three small images and one file that is not an image (a failed item)."""
    folder = scans(tmp_path, 3, step=80)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture
def eval_set(tmp_path) -> Path:
    """An evaluation set of two items, one of them an image that cannot be read."""
    data = tmp_path / "set"
    data.mkdir()
    Image.new("RGB", (64, 32), "white").save(data / "blank.png")
    (data / "broken.png").write_bytes(b"not an image")
    (data / "manifest.jsonl").write_text('{"id": "broken", "image": "broken.png", "task": "ocr", "expected": "a"}\n'
                                         '{"id": "blank", "image": "blank.png", "task": "ocr", "expected": "b"}\n')
    return data


def last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def child_env(tiny_checkpoint) -> dict:
    return {**os.environ, "PHI_HELPERS_MODEL": str(tiny_checkpoint), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------
# A closed or full standard output
# ----------------------------------------------------------------------------------------------


def test_a_closed_stdout_refuses_to_print_an_answer_before_the_model_loads(capsys, monkeypatch, eval_set, tiny_model):
    """``phi-helpers predict --image a.png ... >&-``: before, the model loaded, the answer went nowhere and the
    run ended with "AttributeError: 'NoneType' object has no attribute 'flush'"."""
    monkeypatch.setattr(sys, "stdout", None)  # what Python makes of a closed descriptor 1
    code, _, err = run(capsys, "predict", "--image", eval_set / "blank.png", "--task", "caption", *FAST)
    assert code == 1 and "Standard output is closed" in last_line(err) and "--output FILE" in last_line(err), err
    code, _, err = run(capsys, "eval", "--data", eval_set, *FAST)
    assert code == 1 and "Standard output is closed" in last_line(err) and "--output FILE" in last_line(err), err
    assert tiny_model.calls == 0


def test_a_closed_stdout_does_not_fail_a_run_that_writes_its_results_to_a_file(capsys, monkeypatch, tmp_path, folder,
                                                                             eval_set):
    monkeypatch.setattr(sys, "stdout", None)
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder / "page_0.png", folder / "page_1.png", "--task", "caption",
                       "--output", output, *FAST)
    assert code == 0 and len(output.read_text().splitlines()) == 2, err
    code, _, err = run(capsys, "predict", "--image", folder / "page_0.png", "--task", "caption", "--output",
                       tmp_path / "answer.txt", *FAST)
    assert code == 0 and (tmp_path / "answer.txt").exists(), err
    code, _, err = run(capsys, "eval", "--data", eval_set, "--output", tmp_path / "report.json", *FAST)
    assert code == 1 and "1 of 2 items failed" in last_line(err)  # the broken image, not the closed stdout
    assert json.loads((tmp_path / "report.json").read_text())["items_evaluated"] == 2


class FullDisk(io.StringIO):
    """A standard output on a full disk (``> /dev/full``): every write fails."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_stdout_keeps_the_eval_report_and_names_standard_output(capsys, monkeypatch, tmp_path, eval_set, folder):
    """``eval --output report.json > /dev/full`` (or ``| head -1``): before, the tables were printed first, so
    the error came before the report file was written (it was lost), and said only "[Errno 28] No space..."."""
    report = tmp_path / "report.json"
    monkeypatch.setattr(sys, "stdout", FullDisk())
    code, _, err = run(capsys, "eval", "--data", eval_set, "--output", report, *FAST)
    assert code == 1 and json.loads(report.read_text())["items_evaluated"] == 2
    assert "Could not write to standard output: No space left on device" in last_line(err), err
    assert re.search(r"^failed: broken \(broken.png\): Could not read", err, re.M), err  # said before the tables
    code, _, err = run(capsys, "predict", "--image", folder / "page_0.png", "--task", "caption", *FAST)
    assert code == 1 and "Could not write to standard output: No space left on device" in last_line(err), err


CLOSED_STREAMS_CHILD = """
import os, sys
from phi_helpers.cli import app, tasks

real = tasks.generate_batch

def generate_and_print(*args, **kwargs):
    for number in (1, 2):  # as C code (Ray's, torch's) or a child process writes, past sys.stdout and sys.stderr
        os.write(number, b"a library writes to its standard output or error\\n")
    return real(*args, **kwargs)

tasks.generate_batch = generate_and_print
sys.argv = ["phi-helpers", *sys.argv[1:]]
sys.exit(app.main())
"""


def test_closed_stdout_and_stderr_get_dev_null_so_the_run_works_and_no_file_takes_their_place(tmp_path, folder,
                                                                                            tiny_checkpoint):
    """``phi-helpers predict ... >&- 2>&-`` (cron, a daemon): before, the output file got descriptor 2 (the
    lowest free one: transformers had put /dev/null on 1 for sys.stderr), so that whatever C code wrote to
    its stderr went into the results."""
    output = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", CLOSED_STREAMS_CHILD, "predict", "--image", str(folder), "--task", "caption",
         "--output", str(output), *FAST],
        env=child_env(tiny_checkpoint), timeout=300, preexec_fn=lambda: (os.close(1), os.close(2)),
    )
    assert result.returncode == 1  # the broken image: its line has an "error", the others an answer
    lines = output.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith('{"source"') for line in lines), lines


# ----------------------------------------------------------------------------------------------
# Progress in a log file
# ----------------------------------------------------------------------------------------------


def test_without_a_terminal_progress_is_plain_lines_and_every_failed_line_starts_a_line(capsys, monkeypatch, tmp_path,
                                                                                       folder, cli_model_and_processor):
    """stderr to a file (cron, docker logs): before, tqdm's carriage returns glued the whole run onto one line,
    and the failed: lines were in the middle of it (``grep '^failed:'`` found none)."""
    seen = []

    def load_model(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        return cli_model_and_processor

    monkeypatch.setattr(tasks, "load_model", load_model)
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", tmp_path / "o.jsonl", *FAST)
    assert code == 1 and "\r" not in err, err
    assert [line for line in err.splitlines() if "failed:" in line and not line.startswith("error:")] == \
        [line for line in err.splitlines() if line.startswith("failed: ")] != []
    assert re.search(r"^caption: 4/4 done, 1 failed, 0:00:\d\d$", err, re.M), err
    assert seen == [False] and hf_logging.is_progress_bar_enabled()  # transformers' loading bar too, and back after


def test_progress_without_a_terminal_writes_a_line_every_30_seconds_and_at_the_end(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(outputs.time, "monotonic", lambda: now[0])
    with outputs.Progress(10, "ocr") as progress:
        now[0] += 29
        progress.update(2)
        progress.failed("failed: a.png: Could not read it")
        now[0] += 2  # 31 s since the start
        progress.update(1)
        now[0] += 40
        progress.update(7)
        now[0] += 5
    assert capsys.readouterr().err.splitlines() == [
        "failed: a.png: Could not read it", "ocr: 3/10 done, 1 failed, 0:00:31", "ocr: 10/10 done, 1 failed, 0:01:11",
        "ocr: 10/10 done, 1 failed, 0:01:16",
    ]


def test_on_a_terminal_progress_stays_a_bar(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with outputs.Progress(2, "ocr") as progress:
        progress.update(1)
        progress.failed("failed: a.png: Could not read it")
        progress.update(1)
    err = capsys.readouterr().err
    assert "\r" in err and "2/2" in err and "\nfailed: a.png" in err.replace("\r", "\n")


def test_in_a_notebook_progress_stays_a_bar(capsys, monkeypatch):
    """A Jupyter kernel draws the bar in place (notebook 06 counts records with it); its stderr is no terminal."""
    kernel = type("ZMQInteractiveShell", (), {})()  # what IPython.get_ipython() is in a Jupyter kernel
    monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: kernel))
    with outputs.Progress(2, "ocr") as progress:
        progress.update(2)
    assert "\r" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


STUCK_CHILD = """
import sys, time
from phi_helpers.cli import app, tasks

def stuck(*args, **kwargs):
    print("generating", file=sys.stderr, flush=True)
    time.sleep(300)

tasks.generate_batch = stuck
sys.argv = ["phi-helpers", *sys.argv[1:]]
sys.exit(app.main())  # as the console script calls it
"""


def start_stuck_run(prefix: list, tmp_path, image, tiny_checkpoint, **popen) -> tuple[subprocess.Popen, Path]:
    """The console entry point (``sys.exit(main())``) in a child, stopped in its first generate call: its lock
    has made the output file, nothing is written yet."""
    output = tmp_path / "out.jsonl"
    argv = [sys.executable, "-c", STUCK_CHILD, "predict", "--image", str(image), "--task", "caption", "--output",
            str(output), *FAST]
    # Ctrl-C as in a terminal: a job started in the background by a script (CI under `&`) inherits SIGINT ignored
    process = subprocess.Popen([*prefix, *argv], env=child_env(tiny_checkpoint), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    for line in process.stderr:
        if "generating" in line:  # (a progress bar may share its line)
            break
    assert output.exists()
    return process, output


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_the_console_command_cleans_up_says_so_and_ends_by_the_signal(tmp_path, folder, tiny_checkpoint, stop):
    """SIGTERM ended the command with exit 130, as if Ctrl-C had stopped it; SIGHUP (a terminal closed, an ssh
    connection dropped) killed it without a word and left the empty output file its lock had made."""
    process, output = start_stuck_run([], tmp_path, folder / "page_0.png", tiny_checkpoint)
    process.send_signal(stop)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == -stop  # a shell reports 128 + the signal's number: 143, 129
    assert last_line(err) == f"error: interrupted by {stop.name} (everything written so far is kept; run the same " \
                             "command again to go on)"
    assert not output.exists()


def test_ctrl_c_stops_a_shell_loop_around_the_command(tmp_path, folder, tiny_checkpoint):
    """Ctrl-C signals the whole foreground group: the shell goes on with its script unless the command ended
    by SIGINT itself. Before, it exited 130, and a loop over many runs went on to the next one."""
    script = ['bash', '-c', '"$@"; echo "the script went on" >&2', 'loop']
    process, output = start_stuck_run(script, tmp_path, folder / "page_0.png", tiny_checkpoint, start_new_session=True)
    os.killpg(process.pid, signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert "error: interrupted (everything written so far is kept" in err and "the script went on" not in err, err
    assert process.returncode == -signal.SIGINT  # the shell stopped by it too
    assert not output.exists()


def test_in_process_callers_get_the_code_and_a_stop_signal_set_to_be_ignored_stays_ignored(capsys, monkeypatch,
                                                                                         tmp_path, folder):
    def hang_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        return []

    monkeypatch.setattr(tasks, "generate_batch", hang_up)
    output = tmp_path / "out.jsonl"
    previous = signal.signal(signal.SIGHUP, lambda *args: None)  # whatever the run does not handle, this test survives
    try:
        code, _, err = run(capsys, "predict", "--image", folder / "page_0.png", "--task", "caption", "--output", output,
                           *FAST)
        assert code == 129 and "error: interrupted by SIGHUP" in last_line(err) and not output.exists(), err
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup phi-helpers ...
        with outputs.terminate_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is outputs._interrupt
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


# ----------------------------------------------------------------------------------------------
# Exit codes
# ----------------------------------------------------------------------------------------------


def test_a_busy_output_exits_75_try_again_later(capsys, tmp_path, folder):
    """Another run writing the same --output is no failure of this one: cron or a scheduler should try again."""
    output = tmp_path / "out.jsonl"
    with open(output, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX)
        code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 75 == app.EXIT_TRY_LATER and "Another phi-helpers run is writing" in last_line(err)


@pytest.mark.parametrize("command", [[], ["predict"], ["eval"]], ids=["phi-helpers", "predict", "eval"])
def test_every_help_lists_every_exit_code(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "exit codes:" in out
    for number in app.EXIT_CODES:
        assert re.search(rf"^  {number} ", out, re.M), number


def test_the_readme_shows_the_exit_codes_of_the_command_line():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.M))
    assert {int(code): meaning for code, meaning in rows.items()} == app.EXIT_CODES


# ----------------------------------------------------------------------------------------------
# The Ray engine and a model that cannot load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["broken-model", "nowhere"])
def test_a_model_that_cannot_load_fails_before_ray_starts(capsys, monkeypatch, tmp_path, folder, tiny_checkpoint, model):
    """Before: Ray started, every replica failed to load, and after a minute and a page of Ray's traceback the
    run said a replica "died 4 times" and blamed memory. A folder with a file missing, and a path that is no
    folder at all (on this machine's own Ray), are now refused before Ray starts."""
    pytest.importorskip("ray")

    def no_ray(*args, **kwargs):
        raise AssertionError("start_ray was called for a model that cannot load")

    monkeypatch.setattr(ray_engine, "start_ray", no_ray)
    model = tmp_path / model
    if model.name == "broken-model":
        model.mkdir()
        for name in ("tokenizer.json", "preprocessor_config.json", "model.safetensors"):
            (model / name).write_bytes((Path(tiny_checkpoint) / name).read_bytes())
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", tmp_path / "o.jsonl",
                       "--engine", "ray", "--model", model, *FAST)
    expected = "it is missing" if model.name == "broken-model" else f"No model folder at '{model}'"
    assert code == 1 and expected in last_line(err), err


def test_a_cluster_driver_leaves_a_folder_it_does_not_see_to_the_replicas(tmp_path):
    """On a cluster (--address), the workers may see folders the driver does not: not refused up front."""
    ray_engine.check_model(str(tmp_path / "on-the-workers"), None, cluster=True)
    with pytest.raises(ModelLoadError, match="No model folder"):
        ray_engine.check_model(str(tmp_path / "on-the-workers"), None, cluster=False)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='the Ray engine tests need pip install "ray[data]>=2.60,<2.64"')
    ray_engine.start_ray(num_cpus=2, dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_a_replica_that_cannot_load_the_model_says_why_not_memory(capsys, monkeypatch, tmp_path, local_ray, folder):
    """The reviewer's run: --model names no folder, which only load_model in each replica finds out (as on a
    cluster whose driver does not see the workers' folders: the driver's own check is left out)."""
    monkeypatch.setattr(ray_engine, "check_model", lambda *args, **kwargs: None)
    nowhere = tmp_path / "nowhere"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", tmp_path / "o.jsonl",
                       "--engine", "ray", "--model", nowhere, *FAST)
    last = err.strip().splitlines()[-1]  # (Ray logs its own traceback of the replica above it)
    assert code == 1 and last.startswith(f"error: A model replica could not load the model: No model folder at "
                                         f"'{nowhere}'. Check the path"), last
    assert "memory" not in last and "died" not in last


def test_a_ray_run_with_stdout_closed_succeeds(capsys, monkeypatch, tmp_path, local_ray, folder, tiny_checkpoint):
    monkeypatch.setattr(sys, "stdout", None)
    output = tmp_path / "o.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder / "page_0.png", folder / "page_1.png", "--task", "caption",
                       "--output", output, "--engine", "ray", "--model", tiny_checkpoint, *FAST)
    assert code == 0 and len(output.read_text().splitlines()) == 2, err


def actor_died(report: str, at_start: bool) -> Exception:
    """What Ray raises for a replica that died: its report, and whether it died while it started."""
    return type("ActorDiedError", (Exception,), {"actor_init_failed": at_start})(report)


def test_the_error_of_a_replica_that_failed_to_start_is_read_from_rays_report():
    start = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker().__init__()"
             "\x1b[39m (pid=1)\n  File \"x.py\", line 1, in f\n    load()\n")
    ours = actor_died(start + "phi_helpers.errors.ModelLoadError: No model folder at 'm'. Check the path.", True)
    assert str(ray_engine.replica_death_error(ours)) == (
        "A model replica could not load the model: No model folder at 'm'. Check the path.")
    other = actor_died(start + "torch.OutOfMemoryError: CUDA out\nof memory", True)
    assert "(torch.OutOfMemoryError: CUDA out of memory)" in str(ray_engine.replica_death_error(other))
    killed = actor_died("The actor died unexpectedly before finishing this task.", False)
    assert f"died {ray_engine.REPLICA_RESTARTS + 1} times" in str(ray_engine.replica_death_error(killed))


# ----------------------------------------------------------------------------------------------
# Read-only filesystems, the tiny model's cache
# ----------------------------------------------------------------------------------------------


def test_a_read_only_filesystem_is_named_as_such_not_as_permissions(monkeypatch, tmp_path):
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # what access(2) says on it: EROFS
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(CommandLineError, match="is read-only .mounted read-only.. Choose an --output on a filesystem"):
        outputs.check_output_path(tmp_path / "out.jsonl")
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: SimpleNamespace(f_flag=0))
    with pytest.raises(CommandLineError, match="permission denied"):
        outputs.check_output_path(tmp_path / "out.jsonl")


def test_the_tiny_model_is_cached_under_xdg_cache_home_unless_phi_helpers_cache_is_set(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loading, "_build_tiny_checkpoint", lambda cache, target, build: target)
    monkeypatch.delenv("PHI_HELPERS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading._tiny_checkpoint() == tmp_path / "xdg" / "phi_helpers" / "tiny-phi-3.5-vision"
    monkeypatch.setenv("PHI_HELPERS_CACHE", str(tmp_path / "mine"))
    assert loading._tiny_checkpoint() == tmp_path / "mine" / "tiny-phi-3.5-vision"
    monkeypatch.delenv("PHI_HELPERS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert loading._tiny_checkpoint() == Path.home() / ".cache" / "phi_helpers" / "tiny-phi-3.5-vision"


def test_a_stdout_that_cannot_hold_the_answer_gets_escapes_not_an_error(monkeypatch):
    """Windows writes cp1252 to a pipe or a file: before, an answer in Japanese failed to print after the whole
    run ("'charmap' codec can't encode characters"), exit 1, and the answer was lost."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stream)
    answer = json.dumps({"answer": "合計は 5 € 😀"}, ensure_ascii=False)  # what --format json prints
    monkeypatch.setattr(app, "run_predict", lambda args: print(answer) or 0)
    assert app.main(["predict", "--image", "receipt.png", "--task", "caption"]) == 0
    stream.flush()
    printed = raw.getvalue().decode("cp1252")  # € is in cp1252: written as it is
    assert printed == '{"answer": "\\u5408\\u8a08\\u306f 5 € \\ud83d\\ude00"}\n'
    assert json.loads(printed) == json.loads(answer)  # still valid JSON, the same value


def test_names_with_line_breaks_escapes_and_bidi_controls_stay_on_their_lines(capsys, tmp_path):
    """A pile of documents names its files: a line break split a failed: line in two (grep '^failed:' missed
    it), an --output name's escape sequences reached the terminal raw, a right-to-left override reversed the
    rest of the line ("invoice\\u202egnp.exe.png" shows as "invoicegnp.exe.png" reversed)."""
    folder = tmp_path / "pile"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "good.png")
    (folder / "bad\nline.png").write_bytes(b"not a png")
    (folder / "invoice\u202egnp.exe.png").write_bytes(b"not a png")
    output = tmp_path / "b\x1b[31mRED.jsonl"
    code, _, err = run(capsys, "predict", "--image", folder, "--task", "caption", "--output", output, *FAST)
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and all("\\x0a" in line or "\\u202e" in line for line in failed), err
    assert "\x1b" not in err and "\u202e" not in err and "b\\x1b[31mRED.jsonl" in err


def test_a_prompt_typed_under_a_locale_that_is_not_utf8_is_read_as_typed(monkeypatch):
    """LC_ALL=C with PYTHONUTF8=0: Python keeps the bytes of "合計は?" as surrogates; before, --prompt was refused
    with advice about file names and JSON escapes."""
    typed = "合計は?".encode().decode("ascii", "surrogateescape")
    seen = []
    monkeypatch.setattr(app, "run_single", lambda args, *rest: seen.append(args.prompt) or 0)
    app.main(["predict", "--image", "receipt.png", "--task", "vqa", "--prompt", typed])
    assert seen == ["合計は?"]


def test_a_prompt_too_long_gets_the_command_lines_advice():
    """Before: the failed: line told a command-line user to call load_model(num_crops=...) and chat.drop_images()."""
    from phi_helpers.models.phi3_v.processing_phi3_v import check_context_length

    with pytest.raises(Exception) as info:
        check_context_length(130_000, 131_072, max_new_tokens=2_000, image_tokens=757)
    message = outputs.error_message(info.value)
    assert message.startswith("The prompt is 130,000 tokens (757 of them for images) and up to 2,000 new tokens")
    assert "--max-new-tokens" in message and "--num-crops" in message and "load_model" not in message


def test_an_existing_output_is_replaced_where_the_system_has_no_fchown_or_fchmod(monkeypatch, tmp_path):
    """Windows has no os.fchown (and os.fchmod only from Python 3.13): a second run with the same --output
    failed after the model had answered ("module 'os' has no attribute 'fchown'") and the answer was lost."""
    output = tmp_path / "answer.txt"
    output.write_text("first run\n")
    monkeypatch.delattr(os, "fchown")
    monkeypatch.delattr(os, "fchmod")
    outputs.write_atomically(output, "second run\n")
    assert output.read_bytes() == b"second run\n"


def test_lines_a_windows_editor_saved_are_read_and_repaired_without_carriage_returns(tmp_path):
    """A results file edited on Windows has \\r\\n line ends: a repair kept each \\r and added one more line end."""
    output = tmp_path / "out.jsonl"
    record = {"source": "a.png", "task": "ocr", "answer": "x"}
    output.write_bytes(json.dumps(record).encode() + b"\r\n" + b'{"source": "b.p\r\n')
    assert outputs.repair_jsonl(output) == 1
    assert output.read_bytes() == json.dumps(record).encode() + b"\n"


def test_json_printed_to_a_stdout_that_is_not_utf8_is_ascii(monkeypatch, tmp_path):
    """cp1252 held é as its own byte, so the printed JSON was no UTF-8 JSON (jq refused it): it is ASCII now."""
    Image.new("RGB", (40, 30)).save(tmp_path / "café.png")
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    assert app.main(["predict", "--image", str(tmp_path / "café.png"), "--task", "caption", "--format", "json", *FAST]) == 0
    sys.stdout.flush()
    printed = raw.getvalue()
    assert printed.isascii() and json.loads(printed)["source"] == str(tmp_path / "café.png")
