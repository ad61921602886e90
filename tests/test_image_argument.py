"""An empty ``--image`` value (an unset shell variable) is refused: as a path it would be the current folder."""

import os

import pytest
from PIL import Image

from cli_runner import run
from phi_helpers.cli import inputs
from phi_helpers.errors import ImageLoadError

EMPTY = ["", " ", "\t\n"]


@pytest.mark.parametrize("spec", EMPTY, ids=repr)
@pytest.mark.parametrize("check", [inputs.collect_items, inputs.is_multi_input, lambda spec: inputs.collect_all(["a.png", spec])],
                         ids=["collect_items", "is_multi_input", "collect_all"])
def test_an_empty_image_value_is_refused(tmp_path, monkeypatch, spec, check):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("a.png")  # the current folder has an image: "" must not pick it up
    with pytest.raises(ImageLoadError, match=r"^--image is empty \(.*\); give an image file, URL, folder, glob pattern or PDF"):
        check(spec)


BATCH, RAY = ["--output", "out.jsonl"], ["--engine", "ray", "--output", "out.jsonl"]


@pytest.mark.parametrize("images, extra", [([""], []), ([""], BATCH), ([""], RAY), (["a.png", " "], BATCH), (["a.png", " "], RAY)],
                         ids=["single", "batch", "ray", "second-blank", "second-blank-ray"])
def test_predict_with_an_empty_image_is_one_line_before_the_model_loads(capsys, tmp_path, monkeypatch, tiny_model, images, extra):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("a.png")
    code, out, err = run(capsys, "predict", "--image", *images, "--task", "caption", *extra)
    assert code == 1 and out == "" and tiny_model.calls == 0
    assert err.startswith("error: --image is empty (") and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["a.png"]  # nothing written
