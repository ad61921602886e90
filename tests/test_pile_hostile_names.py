"""Hostile names in a pile of files, and what each run records about them: a folder named "tiny" beside
``PHI_HELPERS_MODEL=tiny``, a ``~user`` that does not exist, file names that are not UTF-8 reached from
two folders, FIFOs, devices and loops of symbolic links among the images, a password in an image URL. Before, the tiny random
model's answers were recorded as the folder's (a re-run with ``--model ./tiny`` kept them), ``~nouser``
ended in "RuntimeError: Could not determine home directory.", a non-UTF-8 name run from another folder
was written twice, the odd files of a folder vanished without a word, and a loop of links was "missing".
"""

import base64
import http.server
import io
import json
import os
import pwd
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli_runner import run
from local_server import no_proxy, serve  # noqa: F401  (no_proxy: an autouse fixture)
from phi_helpers.cli import inputs, outputs
from phi_helpers.errors import ImageLoadError, ModelLoadError

pytestmark = pytest.mark.usefixtures("tiny_model")  # tests/conftest.py: the CLI loads the cached tiny model

FAST = ["--num-crops", "1", "--max-new-tokens", "2"]
NO_USER = "~phi_helpers_no_such_user"  # a shell leaves it as it is: no such user (checked below)
posix_only = pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="POSIX file names, FIFOs and links")


def picture(path: Path) -> Path:
    Image.new("RGB", (24, 16), "gray").save(path, format="PNG")
    return path


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def caption(capsys, image, output, *more) -> tuple[int, str, str]:
    return run(capsys, "predict", "--image", image, "--task", "caption", "--output", output, *FAST, *more)


# ----------------------------------------------------------------------------------------------
# "tiny" is the tiny random model, whatever folders are there
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["tiny", "TINY", " tiny "])
def test_tiny_is_recorded_as_the_tiny_model_beside_a_folder_named_tiny(monkeypatch, tmp_path, tiny_checkpoint, spelling):
    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_checkpoint, tmp_path / "tiny")  # a real checkpoint folder named tiny
    assert outputs.model_key(spelling) == "tiny" and outputs.model_files(spelling) is None
    assert outputs.model_key("./tiny") == str(Path(tiny_checkpoint).resolve()) and outputs.model_files("./tiny")


def test_the_tiny_models_answers_are_not_taken_for_the_folder_tinys(capsys, monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_checkpoint, tmp_path / "tiny")
    picture(tmp_path / "one.png")
    monkeypatch.setenv("PHI_HELPERS_MODEL", "tiny")  # load_model loads the tiny random model, not ./tiny
    code, _, err = caption(capsys, "one.png", "tz.jsonl")
    assert code == 0, err
    assert lines_of(tmp_path / "tz.jsonl")[0]["request"]["model"] == "tiny"

    code, _, err = caption(capsys, "one.png", "tz.jsonl", "--model", "./tiny")  # the folder: another model
    assert code == 0 and "Nothing left to do" not in err, err
    assert "1 of 1 item in tz.jsonl answers another request (it differs in: model)" in err
    assert [line["request"]["model"] for line in lines_of(tmp_path / "tz.jsonl")] == ["tiny", str(tiny_checkpoint)]


# ----------------------------------------------------------------------------------------------
# ~nouser
# ----------------------------------------------------------------------------------------------


def test_a_home_folder_of_nobody_as_image_says_so(capsys, tmp_path):
    with pytest.raises(KeyError):
        pwd.getpwnam(NO_USER[1:])
    code, _, err = run(capsys, "predict", "--image", f"{NO_USER}/x.png", "--task", "caption")
    missing_code, _, missing_err = run(capsys, "predict", "--image", tmp_path / "x.png", "--task", "caption")
    assert code == missing_code == 1 and "No file or folder" in missing_err
    assert err == (f"error: Cannot find the home folder of '{NO_USER}' in the --image value '{NO_USER}/x.png': there is "
                   f"no user '{NO_USER[1:]}' on this machine. Write ~/ for your own home folder, or the full path.\n")
    code, _, err = caption(capsys, f"{NO_USER}/*.png", tmp_path / "out.jsonl")  # a pattern: the same words
    assert code == 1 and f"Cannot find the home folder of '{NO_USER}' in the --image value '{NO_USER}/*.png'" in err


def test_a_home_folder_of_nobody_as_model_says_so(capsys, tmp_path):
    picture(tmp_path / "a.png")
    code, _, err = caption(capsys, tmp_path, tmp_path / "out.jsonl", "--model", f"{NO_USER}/m")
    assert code == 1 and err.startswith(f"error: Cannot find the home folder of '{NO_USER}' in the model folder "
                                        f"'{NO_USER}/m'"), err
    with pytest.raises(ModelLoadError):
        outputs.model_files(f"{NO_USER}/m")


def test_an_edited_line_with_a_home_folder_of_nobody_is_another_model(tmp_path):
    assert outputs.request_differences({"model": f"{NO_USER}/m"}, {"model": "tiny"}) == ["model"]


# ----------------------------------------------------------------------------------------------
# Names that are not UTF-8
# ----------------------------------------------------------------------------------------------


@posix_only
def test_a_name_that_is_not_utf8_is_done_once_from_any_folder(capsys, monkeypatch, tmp_path):
    (tmp_path / "pile").mkdir()
    bad = picture(Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/pile/bad\xff\xfe.png")))
    output = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    code, _, err = caption(capsys, "pile", output)  # "source": "pile/bad\xff\xfe.png", relative
    assert code == 0, err

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # "pile/bad..." names nothing here: found by path_b64
    code, _, err = caption(capsys, f"{tmp_path}/pile/*", output)  # an absolute pattern
    assert code == 0 and "1 of 1 item is already done" in err and "Nothing left to do" in err, err
    (line,) = lines_of(output)
    assert "path" not in line and base64.b64decode(line["path_b64"]) == os.fsencode(str(bad))


@pytest.mark.parametrize("field", ["source_b64", "path_b64"])
def test_a_line_whose_base64_an_edit_broke_is_moved_aside(capsys, tmp_path, field):
    (tmp_path / "pile").mkdir()
    picture(tmp_path / "pile" / "a.png")
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"source": "x.png", field: "not base64!", "task": "caption"}) + "\n")
    code, _, err = caption(capsys, tmp_path / "pile", output)
    assert code == 0 and "1 line of" in err and "moved it to" in err, err
    assert [line["source"] for line in lines_of(output)] == [str(tmp_path / "pile" / "a.png")]


# ----------------------------------------------------------------------------------------------
# What is not a regular file
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def odd_pile(tmp_path) -> Path:
    """An image beside a FIFO, a link to a device, a link to nothing and a loop of links, all named as images."""
    pile = tmp_path / "pile"
    pile.mkdir()
    picture(pile / "a.png")
    os.mkfifo(pile / "fifo.jpg")
    os.symlink("/dev/null", pile / "dev.jpg")
    os.symlink("nothing.png", pile / "gone.png")
    os.symlink("loop2.jpg", pile / "loop1.jpg")
    os.symlink("loop1.jpg", pile / "loop2.jpg")
    return pile


NOT_REGULAR = "not regular files (FIFOs, devices, broken or looping links)"


@posix_only
def test_a_folder_names_what_is_not_a_regular_file(capsys, odd_pile):
    items = inputs.collect_all([str(odd_pile)])
    assert [item.source for item in items] == [str(odd_pile / "a.png")]
    assert capsys.readouterr().err == (f"1 item from 1 file; 5 files left out ({NOT_REGULAR}: {odd_pile}/dev.jpg, "
                                       f"{odd_pile}/fifo.jpg, {odd_pile}/gone.png and 2 more)\n")


@posix_only
def test_a_pattern_names_what_is_not_a_regular_file(capsys, odd_pile):
    items = inputs.collect_all([f"{odd_pile}/*"])
    assert [item.source for item in items] == [str(odd_pile / "a.png")]
    assert f"5 files left out ({NOT_REGULAR}: {odd_pile}/dev.jpg, {odd_pile}/fifo.jpg, {odd_pile}/gone.png and 2 more)" \
        in capsys.readouterr().err


@posix_only
def test_a_folder_of_nothing_but_odd_files_says_what_is_there(odd_pile):
    (odd_pile / "a.png").unlink()
    with pytest.raises(ImageLoadError, match=rf"5 {NOT_REGULAR.replace('(', '[(]').replace(')', '[)]')} "):
        inputs.collect_items(str(odd_pile))


@posix_only
def test_a_loop_of_links_is_not_called_missing(capsys, odd_pile):
    code, _, err = run(capsys, "predict", "--image", odd_pile / "loop1.jpg", "--task", "caption")
    assert code == 1 and err == (f"error: '{odd_pile}/loop1.jpg' leads through a loop of symbolic links (a link that "
                                 "points back to itself, directly or through other links; ls -l shows where each "
                                 "points). Point it at a file.\n")
    with pytest.raises(ImageLoadError, match="is a symbolic link to 'nothing.png', where there is nothing"):
        inputs.collect_items(str(odd_pile / "gone.png"))


# ----------------------------------------------------------------------------------------------
# A password in an image URL stays out of the results file and off the screen
# ----------------------------------------------------------------------------------------------


class _OnePicture(http.server.BaseHTTPRequestHandler):
    """/ok.png is a small PNG; anything else is 404."""

    def do_GET(self):  # noqa: N802  (the name http.server calls)
        if self.path != "/ok.png":
            self.send_error(404)
            return
        body = io.BytesIO()
        Image.new("RGB", (24, 16), "gray").save(body, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(body.getvalue())

    def log_message(self, *args):
        pass


def test_a_password_in_a_url_is_neither_recorded_nor_shown_and_the_re_run_skips_the_item(capsys, tmp_path):
    """Before, every line kept "http://bob:hunter2@..." in "source", and the "failed:" line showed it."""
    output = tmp_path / "out.jsonl"
    with serve(_OnePicture) as url:
        good, bad = (url.replace("http://", "http://bob:hunter2@") + name for name in ("/ok.png", "/gone.png"))
        code, _, err = caption(capsys, good, output, "--image", bad)
        assert code == 1 and "failed: http://***@127.0.0.1:" in err
        text = output.read_text(encoding="utf-8")
        assert "hunter2" not in text and "hunter2" not in err
        assert [line["source"] for line in lines_of(output)] == [good.replace("bob:hunter2@", "***@"),
                                                                 bad.replace("bob:hunter2@", "***@")]
        assert "error" not in lines_of(output)[0]
        code, _, err = caption(capsys, good, output)  # the same image again: done already
        assert code == 0 and "1 of 1 item is already done" in err and len(lines_of(output)) == 2
        output.write_text(text.replace("***@", "bob:hunter2@"), encoding="utf-8")  # as earlier versions wrote it
        code, _, err = caption(capsys, good, output)
        assert code == 0 and "1 of 1 item is already done" in err


def test_a_malformed_url_fails_alone_and_its_line_does_not_stop_a_re_run(capsys, tmp_path):
    """Before (this session's first cut of the password rule): "error: Invalid IPv6 URL", nothing run,
    and a results file holding such a line could not be resumed or read."""
    output = tmp_path / "out.jsonl"
    good = picture(tmp_path / "ok.png")
    code, _, err = caption(capsys, "http://bob:pw@[::1/a.png", output, "--image", good)
    assert code == 1 and "failed: http://***@[::1/a.png" in err and "pw" not in output.read_text(encoding="utf-8")
    code, _, err = caption(capsys, good, output)
    assert code == 0 and "1 of 1 item is already done" in err
    assert [record["source"] for record in outputs.latest_records(output)] == ["http://***@[::1/a.png", str(good)]
