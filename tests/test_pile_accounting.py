"""What a pile of files leaves out is counted and named: files without an image or PDF suffix, hidden
files, files in hidden folders, more names of a file (links), the sub-folders a folder argument does not
enter. Before, "docs/**/*" listed 295 items from 300 files and nobody said which 9 were left out;
``--image docs/`` ran 20 of ~290 images without a word about its 12 sub-folders; ``--image docs/misc/``
said "contains no image or PDF files" of a folder that holds a JPEG without a suffix."""

import os
from pathlib import Path

import pytest
from PIL import Image

from cli_runner import run
from phi_helpers.cli import inputs
from phi_helpers.errors import ImageLoadError


def picture(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), "gray").save(path, format=fmt)


@pytest.fixture
def pile(tmp_path) -> Path:
    """A small pile like the reviewers' 300 files: images at the top and in sub-folders, and what is not."""
    pile = tmp_path / "docs"
    picture(pile / "top.png")
    picture(pile / "batch" / "a.png")
    picture(pile / "batch" / "b.jpg", "JPEG")
    picture(pile / "misc" / "scan_noext", "JPEG")  # a JPEG without a suffix
    (pile / "misc" / "notes.txt").write_text("hello\n")
    (pile / "misc" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (pile / "misc" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (pile / "misc" / "._a.jpg").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    picture(pile / ".hidden" / "secret.png")
    picture(pile / "batch" / ".cache" / "thumb.png")
    os.symlink("a.png", pile / "batch" / "link_to_a.png")  # a file listed already, under another name
    return pile


def test_a_pattern_counts_and_names_what_it_left_out(capsys, pile):
    items = inputs.collect_all([f"{pile}/**/*"])
    assert sorted(Path(item.source).name for item in items) == ["a.png", "b.jpg", "top.png"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith("3 items from 3 files; 7 files left out (no image or PDF suffix: ")
    assert f"{pile}/misc/Thumbs.db, {pile}/misc/notes.txt, {pile}/misc/scan_noext; " in err
    assert f"hidden: {pile}/misc/.DS_Store, {pile}/misc/._a.jpg; " in err
    assert f"in hidden folders: {pile}/.hidden/secret.png, {pile}/batch/.cache/thumb.png)" in err
    assert f"; 1 name of a file listed already (a link, or a file named twice), skipped ({pile}/batch/link_to_a.png)" in err


def test_a_folder_says_which_sub_folders_it_did_not_enter(capsys, pile):
    items = inputs.collect_all([str(pile)])
    assert [Path(item.source).name for item in items] == ["top.png"]
    err = capsys.readouterr().err
    assert err == (f"1 item from 1 file; 2 sub-folders of '{pile}' not entered ({pile}/batch, {pile}/misc; for their "
                   f"files too: --image '{pile}/**/*')\n")


def test_a_folder_without_images_mentions_the_files_without_a_suffix(pile):
    with pytest.raises(ImageLoadError) as error:
        inputs.collect_items(str(pile / "misc"))
    message = str(error.value)
    assert "contains no image or PDF files" in message
    assert f"3 files without such a suffix ({pile}/misc/Thumbs.db, {pile}/misc/notes.txt, {pile}/misc/scan_noext)" \
           in message and "name an image file on its own with --image to read it whatever its name" in message
    assert f"2 hidden files ({pile}/misc/.DS_Store, {pile}/misc/._a.jpg)" in message
    (item,) = inputs.collect_items(str(pile / "misc" / "scan_noext"))  # named on its own: an image
    assert item.load().size == (24, 16)


def test_many_left_out_files_are_counted_beyond_the_first_names(capsys, tmp_path):
    picture(tmp_path / "a.png")
    for index in range(5):
        (tmp_path / f"note_{index}.txt").write_text("x")
    inputs.collect_all([str(tmp_path)])
    assert f"5 files left out (no image or PDF suffix: {tmp_path}/note_0.txt, {tmp_path}/note_1.txt, " \
           f"{tmp_path}/note_2.txt and 2 more)" in capsys.readouterr().err


def test_nothing_left_out_says_nothing_and_a_quiet_listing_says_nothing(capsys, tmp_path, pile):
    assert len(inputs.collect_all([f"{pile}/**/*"], report=False)) == 3  # as item_dataset lists (notebook 06)
    assert capsys.readouterr().err == ""
    clean = tmp_path / "clean"
    picture(clean / "a.png")
    picture(clean / "b.png")
    assert len(inputs.collect_all([str(clean)])) == 2
    assert capsys.readouterr().err == ""
    assert len(inputs.collect_all([str(clean), f"{clean}/*.png"])) == 2  # the same files twice: the items once
    assert capsys.readouterr().err == (f"2 items from 2 files; 2 names of files listed already (a link, or a file named "
                                       f"twice), skipped ({clean}/a.png, {clean}/b.png)\n")


def test_the_command_line_says_it_once(capsys, monkeypatch, tmp_path, pile, tiny_model):
    output = tmp_path / "out.jsonl"
    code, out, err = run(capsys, "predict", "--image", f"{pile}/**/*", "--task", "caption", "--output", output,
                         "--num-crops", "1", "--max-new-tokens", "2")
    assert code == 0 and out == ""
    assert err.count("7 files left out") == 1 and len(output.read_text().splitlines()) == 3


def test_the_ray_engine_says_it_once_before_ray_starts(capsys, monkeypatch, tmp_path, pile):
    pytest.importorskip("ray")
    from phi_helpers.cli import ray_engine

    monkeypatch.setattr(ray_engine, "_run_on_ray", lambda *args: 0)  # what run_ray listed is all this test needs
    code, out, err = run(capsys, "predict", "--image", f"{pile}/**/*", "--task", "caption", "--output",
                         tmp_path / "out.jsonl", "--engine", "ray")
    assert code == 0 and out == "" and err.count("7 files left out") == 1, err
