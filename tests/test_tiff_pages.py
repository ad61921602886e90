"""A multi-page TIFF (a scanned fax) is a document: one item, one line, per page, as a PDF. An animated
GIF is one picture: one item, its first frame. ``load_image`` keeps giving a TIFF's first page."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image, TiffImagePlugin

from cli_runner import run
from phi_helpers.api.images import count_pages, load_image, load_page
from phi_helpers.cli import inputs
from phi_helpers.cli.evaluate import read_manifest
from phi_helpers.errors import ImageLoadError, ManifestError

FAST = ["--num-crops", "1", "--max-new-tokens", "2"]
SIZES = [(48, 32), (64, 40), (80, 48)]  # a size per page: each line's image_size tells which page it read
COLORS = ["white", "gray", "black"]


def tiff(path: Path, sizes=SIZES, colors=COLORS) -> Path:
    pages = [Image.new("RGB", size, color) for size, color in zip(sizes, colors)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (24, 24), color) for color in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_page_is_an_item_and_an_image_or_a_one_page_tiff_is_one(tmp_path):
    tiff(tmp_path / "fax.tif")
    tiff(tmp_path / "single.tiff", sizes=[(30, 20)], colors=["gray"])
    animated_gif(tmp_path / "anim.gif")
    items = {(Path(item.source).name, item.page): item for item in inputs.collect_items(str(tmp_path))}
    assert sorted(items, key=str) == sorted([("anim.gif", None), ("fax.tif", 1), ("fax.tif", 2), ("fax.tif", 3),
                                             ("single.tiff", None)], key=str)
    assert [items["fax.tif", page].load().size for page in (1, 2, 3)] == SIZES
    assert items["anim.gif", None].load().getpixel((0, 0)) == (255, 0, 0)  # its first frame
    assert inputs.is_multi_input(str(tmp_path / "fax.tif"))  # --output is needed, as for a PDF
    assert not inputs.is_multi_input(str(tmp_path / "single.tiff")) and not inputs.is_multi_input(str(tmp_path / "anim.gif"))


def test_the_pages_are_counted_from_their_headers_not_decoded(tmp_path, monkeypatch):
    path = tiff(tmp_path / "fax.tif")
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    assert count_pages(path) == 3 and count_pages(path.read_bytes()) == 3
    assert len(inputs.collect_items(str(path))) == 3


def test_load_image_gives_the_first_page_and_load_page_any(tmp_path):
    path = tiff(tmp_path / "fax.tif")
    assert load_image(path).size == SIZES[0]
    assert load_page(path, 3).size == SIZES[2] and load_page(path, 3).getpixel((0, 0)) == (0, 0, 0)
    assert load_page(path.read_bytes(), 2).size == SIZES[1]
    with pytest.raises(ImageLoadError, match=r"has 3 pages, so there is no page 4\. Ask for a page from 1 to"):
        load_page(path, 4)
    with pytest.raises(ImageLoadError, match=r"^load_page\(\) reads a file, not a URL"):
        load_page("https://example.com/fax.tif", 1)
    with pytest.raises(ImageLoadError, match=r"^load_page\(\) cannot read a TiffImageFile\. .*call image\.seek\(page - 1\)"):
        load_page(Image.open(path), 2)


def test_a_page_goes_through_the_checks_of_load_image(tmp_path, monkeypatch):
    """Pillow checks the pixel count of the first page only, on opening: a larger later page is refused too;
    a 16-bit greyscale page is scaled to 8 bits, not clipped to white, as load_image does."""
    path = tmp_path / "scan.tif"
    first, wide = Image.new("L", (10, 10), 0), Image.new("I;16", (8, 8), 32768)
    first.save(path, save_all=True, append_images=[wide, Image.new("L", (100, 100))])
    assert load_page(path, 2).getpixel((0, 0)) == (128, 128, 128)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    message = str(pytest.raises(ImageLoadError, load_page, path, 3).value)
    assert message.startswith(f"Refusing to decode page 3 of '{path}'") and "100 x 100 = 10,000 pixels" in message
    assert load_page(path, 1).size == (10, 10)


def test_a_page_is_turned_upright_by_its_orientation_tag(tmp_path):
    path = tmp_path / "sideways.tif"
    Image.new("RGB", (40, 20)).save(path, save_all=True, append_images=[Image.new("RGB", (60, 20))], tiffinfo={274: 6})
    assert load_image(path).size == (20, 40) and load_page(path, 2).size == (20, 60)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the damaged file
def test_a_tiff_that_cannot_be_opened_is_one_failed_item_among_many(tmp_path):
    tiff(tmp_path / "fax.tif")
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(b"II*\x00 this is not the rest of a TIFF")
    items = inputs.collect_items(str(tmp_path))
    assert [(Path(item.source).name, item.page) for item in items] == [("damaged.tif", None)] + [("fax.tif", n) for n in (1, 2, 3)]
    with pytest.raises(ImageLoadError, match=f"^Could not read '{damaged}' as an image"):
        items[0].load()
    with pytest.raises(ImageLoadError, match=f"^Could not read '{damaged}' as an image"):
        inputs.collect_items(str(damaged))  # the only input: at once, before the model loads


def test_item_at_rebuilds_a_tiff_page(tmp_path, monkeypatch):
    """What a Ray replica does with a row {source, page, path}: read that page, from any working folder."""
    path = tiff(tmp_path / "fax.tif")
    monkeypatch.chdir(tmp_path)
    (item,) = [item for item in inputs.collect_all(["fax.tif"]) if item.page == 2]
    monkeypatch.chdir("/")
    rebuilt = inputs.item_at(item.source, item.page, item.path, item.modified)
    assert rebuilt.key == ("fax.tif", 2) and rebuilt.path == str(path)
    assert rebuilt.load().size == SIZES[1]


def test_the_ray_engine_splits_a_remote_tiff_into_pages(tmp_path):
    pytest.importorskip("pyarrow")
    from phi_helpers.cli import ray_engine

    uri = f"file://{tiff(tmp_path / 'fax.tif')}"
    single = f"file://{tiff(tmp_path / 'one.tif', sizes=[(30, 20)], colors=['gray'])}"
    assert [row["page"] for row in ray_engine._RemotePages(frozenset({(uri, 1)}))({"source": uri})] == [2, 3]
    assert [row["page"] for row in ray_engine._RemotePages()({"source": single})] == [None]
    assert [row["page"] for row in ray_engine._RemotePages()({"source": f"file://{animated_gif(tmp_path / 'a.gif')}"})] == [None]
    assert ray_engine.remote_item(uri, 3).load().size == SIZES[2]
    assert ray_engine.remote_item(single, None).load().size == (30, 20)


@pytest.mark.usefixtures("tiny_model")
def test_predict_answers_every_page_and_resumes_per_page(capsys, tmp_path):
    (tmp_path / "scans").mkdir()
    tiff(tmp_path / "scans" / "fax.tif")
    tiff(tmp_path / "scans" / "single.tif", sizes=[(30, 20)], colors=["gray"])
    animated_gif(tmp_path / "scans" / "anim.gif")
    output = tmp_path / "out.jsonl"
    args = ["predict", "--image", tmp_path / "scans", "--task", "ocr", "--output", output, *FAST]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    records = {(Path(record["source"]).name, record.get("page")): record for record in lines(output)}
    assert sorted(records, key=str) == sorted([("anim.gif", None), ("fax.tif", 1), ("fax.tif", 2), ("fax.tif", 3),
                                               ("single.tif", None)], key=str)
    assert [records["fax.tif", page]["image_size"] for page in (1, 2, 3)] == [list(size) for size in SIZES]
    assert "page" not in records["single.tif", None] and records["anim.gif", None]["image_size"] == [24, 24]
    code, _, err = run(capsys, *args)
    assert code == 0 and "Nothing left to do." in err and len(lines(output)) == 5


@pytest.mark.usefixtures("tiny_model")
def test_one_multi_page_tiff_needs_an_output_as_a_pdf_does(capsys, tmp_path):
    code, _, err = run(capsys, "predict", "--image", tiff(tmp_path / "fax.tif"), "--task", "ocr", *FAST)
    assert code == 2 and "--output FILE is required when --image is a folder, a glob, a PDF, a multi-page TIFF" in err


def test_an_eval_manifest_refuses_a_multi_page_tiff_as_a_pdf(tmp_path):
    tiff(tmp_path / "fax.tif")
    tiff(tmp_path / "page.tif", sizes=[(30, 20)], colors=["gray"])
    line = {"image": "fax.tif", "task": "ocr", "expected": "x"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(dict(line, image="page.tif")) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path)
    message = str(caught.value)
    assert "line 1: the image" in message and "is a TIFF of several pages; eval scores one image per item" in message
    assert "line 2" not in message  # a one-page TIFF is an image


def test_a_thumbnail_or_overview_in_a_tiff_is_not_a_page(tmp_path):
    """TIFF tag 254 (NewSubfileType) bit 0 marks a reduced-resolution copy of another image: a preview,
    or a pyramid's overview level. Counted as a page, it made one photo a two-page document."""
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), "red").save(buffer, format="TIFF", save_all=True,
                                          append_images=[Image.new("RGB", (16, 12), "red")], tiffinfo={254: 0})
    data = buffer.getvalue()
    entry = b"\xfe\x00\x04\x00\x01\x00\x00\x00\x00\x00\x00\x00"  # tag 254, LONG, 1 value: 0
    second = data.index(entry, data.index(entry) + 1)
    (tmp_path / "photo.tif").write_bytes(data[: second + 8] + b"\x01" + data[second + 9 :])  # the second image: a preview
    assert count_pages(tmp_path / "photo.tif") == 1 and count_pages(data) == 2
    assert [item.key for item in inputs.collect_items(str(tmp_path / "photo.tif"))] == [(str(tmp_path / "photo.tif"), None)]
    assert load_page(tmp_path / "photo.tif", 1).size == (80, 60)


def test_a_tiff_page_with_a_damaged_header_is_an_image_load_error(tmp_path):
    """Pillow raises KeyError for some damaged page headers; it stopped a whole folder ("KeyError: 0")."""
    buffer = io.BytesIO()
    pages = [Image.new("RGB", (60, 40), (0, 80 * n, 0)) for n in range(3)]
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(buffer.getvalue())
    entry = data.index(b"\x03\x01\x03\x00\x01\x00\x00\x00", len(data) // 2)  # a later page's Compression tag
    data[entry + 8 : entry + 10] = b"\x39\x30"  # compression 12345: unknown to Pillow
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "bad.tif").write_bytes(bytes(data))
    Image.new("RGB", (40, 30), "white").save(tmp_path / "scans" / "good.png")
    items = inputs.collect_items(str(tmp_path / "scans"))  # no KeyError: one bad item at most
    for item in items:
        try:
            item.load()
        except ImageLoadError:
            pass
