"""load_image: every kind of source, normalisation to upright RGB, and clear errors."""

import http.server
import io
import os
import re
import socket
import time
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image, features

from local_server import no_proxy, serve  # noqa: F401  (no_proxy: an autouse fixture)
from phi_helpers import ImageDownloadTimeout, ImageLoadError, load_image
from phi_helpers.api.images import check_pixel_count, count_pages, load_page

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_colour_image(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: lets tests check orientation and pixel content."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def png_path(tmp_path) -> Path:
    path = tmp_path / "two colours.png"
    two_colour_image().save(path)
    return path


def assert_two_colours(image: Image.Image, size=(40, 20)):
    assert image.mode == "RGB"
    assert image.size == size
    assert image.getpixel((2, 2)) == RED
    assert image.getpixel((size[0] - 3, size[1] - 3)) == BLUE


# --- local sources ----------------------------------------------------------------------------------


def test_path_as_str_and_as_pathlib(png_path):
    assert_two_colours(load_image(str(png_path)))
    assert_two_colours(load_image(png_path))


def test_bytes_bytearray_and_file_objects(png_path):
    data = png_path.read_bytes()
    assert_two_colours(load_image(data))
    assert_two_colours(load_image(bytearray(data)))
    assert_two_colours(load_image(io.BytesIO(data)))
    with open(png_path, "rb") as file:
        assert_two_colours(load_image(file))


def test_pil_input_returns_a_converted_copy_and_leaves_the_original_alone():
    original = two_colour_image().convert("RGBA")
    loaded = load_image(original)
    assert loaded is not original
    assert original.mode == "RGBA"
    assert_two_colours(loaded)


def test_returned_image_does_not_hold_the_file_open(png_path):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd (Linux)")
    image = load_image(png_path)
    open_files = {os.path.realpath(fd_dir / fd) for fd in os.listdir(fd_dir) if (fd_dir / fd).exists()}
    assert str(png_path.resolve()) not in open_files
    png_path.unlink()
    assert image.getpixel((2, 2)) == RED  # pixels are in memory


# --- normalisation ----------------------------------------------------------------------------------


def test_transparent_pixels_become_white_and_half_transparent_ones_are_blended(tmp_path):
    image = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "alpha.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # a plain convert("RGB") would give black
    assert loaded.getpixel((1, 0)) == (0, 0, 0)
    assert all(120 <= channel <= 135 for channel in loaded.getpixel((2, 0)))


def test_palette_image_with_transparent_colour_becomes_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette index 0 (black) is transparent
    loaded = load_image(png_bytes(image))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == RED


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    gray = load_image(Image.new("L", (3, 3), 200))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (200, 200, 200)
    cmyk_path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk_path, quality=100)
    cmyk = load_image(cmyk_path)
    assert cmyk.mode == "RGB"
    red, green, blue = cmyk.getpixel((4, 4))
    assert red > 200 and green < 50 and blue < 50


def test_16_bit_32_bit_and_float_greyscale_are_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips: a 16-bit scan's black-to-white ramp came out 99.6% white."""
    ramp = numpy.tile(numpy.linspace(0, 65535, 256).astype(numpy.uint16), (4, 1))
    for suffix in ("png", "tiff"):
        Image.fromarray(ramp).save(tmp_path / f"scan.{suffix}")
        loaded = numpy.asarray(load_image(tmp_path / f"scan.{suffix}"))
        assert loaded.shape == (4, 256, 3) and (loaded[0, :, 0] == numpy.arange(256)).all(), suffix
    assert numpy.asarray(load_image(Image.fromarray(numpy.full((2, 2), 0.5, dtype=numpy.float32))))[0, 0, 0] == 128
    assert numpy.asarray(load_image(Image.fromarray(numpy.full((2, 2), 30000, dtype=numpy.int32))))[0, 0, 0] == 117
    assert numpy.asarray(load_image(Image.fromarray(numpy.full((2, 2), 200, dtype=numpy.int32))))[0, 0, 0] == 200
    Image.fromarray(numpy.array([[0, 65535], [30000, 0]], dtype=numpy.uint16)).save(tmp_path / "t.png", transparency=0)
    assert numpy.asarray(load_image(tmp_path / "t.png"))[..., 0].tolist() == [[255, 255], [117, 255]]  # transparent: white
    floats = numpy.array([[0, 1000], [numpy.nan, numpy.inf]], dtype=numpy.float32)  # scaled by the finite values
    assert numpy.asarray(load_image(Image.fromarray(floats)))[..., 0].tolist() == [[0, 255], [0, 255]]


def test_data_urls_are_read_and_an_empty_path_is_named(png_path):
    import base64

    url = "data:image/png;base64," + base64.b64encode(png_path.read_bytes()).decode()
    assert load_image(url).size == load_image(png_path).size
    with pytest.raises(ImageLoadError, match="damaged"):
        load_image(url[:-3] + "!!!")
    with pytest.raises(ImageLoadError, match="Only base64"):
        load_image("data:image/svg+xml,<svg/>")
    with pytest.raises(ImageLoadError, match="path is empty"):
        load_image("  ")


ORIENTATION = 0x0112  # the EXIF tag


def phone_photo(tmp_path) -> Path:
    """A 40x20 JPEG stored sideways, with Orientation 6: "rotate 90 degrees clockwise to display", and its
    stored size in the Exif IFD (PixelXDimension, PixelYDimension), as cameras write them."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif.get_ifd(0x8769).update({0xA002: 40, 0xA003: 20})
    path = tmp_path / "phone.jpg"
    two_colour_image().save(path, exif=exif, quality=100)
    return path


def test_exif_orientation_is_applied(tmp_path):
    loaded = load_image(phone_photo(tmp_path))
    assert loaded.size == (20, 40)  # width and height swapped
    top, bottom = loaded.getpixel((10, 3)), loaded.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_a_pil_image_straight_from_image_open_is_turned_upright(tmp_path):
    with Image.open(phone_photo(tmp_path)) as opened:
        assert opened.format == "JPEG" and opened.size == (40, 20)
        assert load_image(opened).size == (20, 40)
        assert opened.size == (40, 20)  # the caller's image is left as it is


def test_a_pil_image_the_user_turned_is_not_turned_again(tmp_path):
    """Pillow copies the EXIF data, Orientation tag included, into a transposed or rotated image: a photo
    the user had already turned upright was turned a second time, back to sideways."""
    with Image.open(phone_photo(tmp_path)) as opened:
        turned = [opened.transpose(Image.Transpose.ROTATE_270), opened.rotate(-90, expand=True),
                  opened.rotate(-90, expand=True).resize((30, 60))]
        for image in turned:
            assert image.format is None and image.getexif().get(ORIENTATION) == 6  # the tag came along
            assert load_image(image).size == image.size


def test_a_pil_image_the_user_converted_resized_or_cropped_is_still_turned_upright(tmp_path):
    """Its pixels are still stored sideways: the tag is followed, as for the file."""
    with Image.open(phone_photo(tmp_path)) as opened:
        for image in (opened.convert("RGB"), opened.resize((80, 40)), opened.crop((2, 0, 38, 20))):
            assert load_image(image).size == image.size[::-1]
        without_size = opened.convert("RGB")
        without_size.info["exif"] = b""  # no recorded size: the tag alone decides
        without_size.getexif().clear()
        without_size.getexif()[ORIENTATION] = 6
        assert load_image(without_size).size == (20, 40)


# --- errors for local sources -----------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="No file at") as info:
        load_image(missing)
    assert str(missing) in str(info.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_zero_byte_file_and_empty_bytes_are_refused(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_a_pipe_or_a_device_is_named_not_called_empty(tmp_path):
    """``--image <(curl ...)`` or a FIFO: before, "is empty (0 bytes). Re-save or re-download the image"."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(ImageLoadError, match=r"is not a regular file \(it is a pipe, such as <\(\.\.\.\), or a device\)"):
            load_image(path)


def test_corrupt_and_truncated_data_raise_image_load_error(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(bad)
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(data[: len(data) // 2])


def test_unsupported_type_says_what_is_accepted():
    with pytest.raises(ImageLoadError, match="cannot read a int.*file path.*URL.*uint8 numpy array"):
        load_image(42)


def test_numpy_arrays_are_read_as_the_image_processor_reads_them():
    """ask(..., images=array) goes through load_image: it refused the arrays that generate_batch (the
    processor) takes."""
    assert_two_colours(load_image(numpy.asarray(two_colour_image())))
    grey = load_image(numpy.full((3, 5), 200, numpy.uint8))
    assert grey.size == (5, 3) and grey.getpixel((0, 0)) == (200, 200, 200)
    transparent = numpy.zeros((2, 2, 4), numpy.uint8)
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)  # as for any image: onto white
    sideways = numpy.asarray(two_colour_image()).transpose(2, 0, 1)  # channels first: (3, 20, 40)
    with pytest.raises(ImageLoadError, match=r"shape \(3, 20, 40\) .*use array\.transpose\(1, 2, 0\)"):
        load_image(sideways)


def test_a_torch_tensor_is_refused_with_the_conversion_to_use():
    with pytest.raises(ImageLoadError, match=r"cannot read a torch Tensor \(shape \(3, 10, 10\)\)") as caught:
        load_image(torch.zeros(3, 10, 10, dtype=torch.uint8))
    message = str(caught.value)
    assert "Image.fromarray(tensor.permute(1, 2, 0).numpy())" in message


@pytest.mark.parametrize("tensor", [torch.rand(3, 10, 12), (torch.rand(3, 10, 12) * 255).byte()])
def test_the_conversions_a_torch_tensor_is_told_to_use_work_without_torchvision(tensor):
    """Each expression the refusal names, run as written, gives an image load_image reads (before: the advice
    named torchvision's to_pil_image first, and torchvision is not installed)."""
    with pytest.raises(ImageLoadError) as caught:
        load_image(tensor)
    expressions = re.findall(r"Image\.fromarray\(.*?numpy\(\)\)", str(caught.value))
    assert len(expressions) == 2
    kind = "float" if tensor.is_floating_point() else "uint8"
    wanted = [e for e in expressions if ("clamp" in e) == (kind == "float")]
    image = eval(wanted[0], {"Image": Image, "tensor": tensor})  # noqa: S307 (the message's own code)
    assert load_image(image).size == (12, 10)


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """The ftyp box that starts an ISO base media file (HEIC, AVIF, MP4), then bytes that are no image."""
    box = b"ftyp" + major + b"\0\0\0\0" + b"".join(compatible)
    return (4 + len(box)).to_bytes(4, "big") + box + b"\0" * 64


SVG_ADVICE = "SVG is not supported: convert it to PNG"
HEIC_ADVICE = ("HEIC/HEIF is not supported by Pillow: convert it to JPEG or PNG, or install pillow-heif and register "
               "it (pip install pillow-heif, then import pillow_heif; pillow_heif.register_heif_opener())")
UNSUPPORTED = [
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', SVG_ADVICE),
    (b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- Inkscape -->\n<!DOCTYPE svg>\n<SVG width="1"/>', SVG_ADVICE),
    (ftyp(b"heic", b"mif1", b"heic"), HEIC_ADVICE),
    (ftyp(b"mif1", b"heic"), HEIC_ADVICE),
    (ftyp(b"msf1", b"hevc"), HEIC_ADVICE),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "it is a PDF, a document, not an image"),
]


@pytest.mark.parametrize(("data", "advice"), UNSUPPORTED, ids=["svg", "svg-xml", "heic", "heif", "heif-sequence",
                                                                 "pdf"])
def test_formats_pillow_cannot_read_are_named_with_what_to_do(tmp_path, data, advice):
    """They got the advice for corrupt data ("corrupt, truncated or not an image at all")."""
    path = tmp_path / "picture"
    path.write_bytes(data)
    for source, name in ((path, f"'{path}'"), (data, f"the {len(data)} bytes you passed"),
                         (io.BytesIO(data), "the file object you passed")):
        message = str(pytest.raises(ImageLoadError, load_image, source).value)
        assert message.startswith(f"Could not read {name}: it is ") and advice in message
        assert "corrupt" not in message
    assert advice in str(pytest.raises(ImageLoadError, count_pages, path).value)


def test_a_damaged_avif_is_not_called_heic_and_a_real_one_loads(tmp_path):
    """AVIF shares HEIF's container and its brand mif1; Pillow 13 reads it."""
    for data in (ftyp(b"avif", b"mif1", b"miaf"), ftyp(b"mif1", b"avif")):
        message = str(pytest.raises(ImageLoadError, load_image, data).value)
        assert "HEIC" not in message and "corrupt" in message
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    path = tmp_path / "photo.avif"
    Image.new("RGB", (16, 8), RED).save(path, quality=100)
    loaded = load_image(path)
    assert loaded.size == (16, 8) and loaded.getpixel((8, 4))[0] > 200


def test_other_url_schemes_are_refused():
    with pytest.raises(ImageLoadError, match="only http:// and https://"):
        load_image("ftp://example.com/cat.png")


RAISE_THE_LIMIT = "In your own Python code, if you trust this file, you can raise PIL.Image.MAX_IMAGE_PIXELS first."


def test_an_image_pillow_only_warns_about_is_loaded_without_the_warning(monkeypatch, tmp_path):
    """Pillow opens images of up to twice MAX_IMAGE_PIXELS (it warns above once), and so does the original
    pipeline (Image.open + processor); load_image refused them (a 108-megapixel phone photo). Here 1600
    pixels lie between a limit of 1000 and twice it; so does the second page of the TIFF."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path, scan = tmp_path / "big.png", tmp_path / "scan.tif"
    Image.new("RGB", (40, 40)).save(path)
    Image.new("L", (10, 10)).save(scan, save_all=True, append_images=[Image.new("L", (40, 40))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test
        assert load_image(path).size == (40, 40)
        assert load_image(path.read_bytes()).size == (40, 40)
        assert load_page(scan, 2).size == (40, 40)


def test_an_image_pillow_refuses_to_open_is_refused_as_very_large(monkeypatch, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)  # 10,000 pixels: beyond twice the limit, where Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    message = str(pytest.raises(ImageLoadError, load_image, path).value)
    assert message.startswith(f"Refusing to decode '{path}': it is a very large image (10,000 pixels, more than "
                              "Pillow opens: 2 x PIL.Image.MAX_IMAGE_PIXELS = 2,000; ")
    assert message.endswith(RAISE_THE_LIMIT)


def test_the_pixel_limit_error_says_what_to_do_with_and_without_python(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    check_pixel_count(40, 50, "the page")  # 2000 pixels, twice the limit: allowed, as Pillow opens it
    with pytest.raises(ImageLoadError) as caught:
        check_pixel_count(40, 51, "the image")
    message = str(caught.value)
    assert message.startswith("Refusing to decode the image: it is a very large image (40 x 51 = 2,040 pixels, "
                              "more than Pillow opens: 2 x PIL.Image.MAX_IMAGE_PIXELS = 2,000; ")
    assert "Use a smaller image (scale it down, or cut it into parts)." in message
    assert message.endswith(RAISE_THE_LIMIT)
    with pytest.raises(ImageLoadError) as caught:
        check_pixel_count(40, 51, "page 3", remedy="Split the PDF")
    assert "look like this). Split the PDF. In your own Python code" in str(caught.value)
    assert "Use a smaller image" not in str(caught.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    check_pixel_count(10**6, 10**6, "anything")  # None: no limit


# --- URLs (a tiny HTTP server on 127.0.0.1) ---------------------------------------------------------

IMAGE_BYTES = png_bytes(two_colour_image())


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status, body, content_type, length=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/image.png":
            self._send(200, IMAGE_BYTES, "image/png")
        elif self.path == "/missing.png":
            self._send(404, b"not found", "text/plain")
        elif self.path == "/page.html":
            self._send(200, b"<html><img src='x.png'></html>", "text/html; charset=utf-8")
        elif self.path == "/garbage":
            self._send(200, b"\x00\x01 definitely not an image", "application/octet-stream")
        elif self.path == "/big-announced":
            self._send(200, b"x" * 5000, "image/png")
        elif self.path == "/big-unannounced":
            self._send(200, b"x" * 5000, "image/png", length=False)  # HTTP/1.0: body ends at close
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, IMAGE_BYTES, "image/png")
        elif self.path == "/stalls":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE_BYTES)))
            self.end_headers()
            self.wfile.write(IMAGE_BYTES[:20])
            self.wfile.flush()
            time.sleep(3)


@pytest.fixture(scope="module")
def server():
    with serve(_Handler) as url:
        yield url


def test_url_image_is_downloaded_and_decoded(server):
    assert_two_colours(load_image(f"{server}/image.png"))


def test_http_error_status_is_reported(server):
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        load_image(f"{server}/missing.png")


def test_web_page_is_not_an_image(server):
    with pytest.raises(ImageLoadError, match="text/html, not an image"):
        load_image(f"{server}/page.html")


def test_undecodable_download_names_the_url(server):
    url = f"{server}/garbage"
    with pytest.raises(ImageLoadError, match="Could not read") as info:
        load_image(url)
    assert url in str(info.value)


@pytest.mark.parametrize("path", ["/big-announced", "/big-unannounced"])
def test_downloads_over_max_bytes_are_refused(server, path):
    with pytest.raises(ImageLoadError, match="too large.*max_bytes=1,000"):
        load_image(f"{server}{path}", max_bytes=1000)
    assert_two_colours(load_image(f"{server}/image.png", max_bytes=len(IMAGE_BYTES)))  # the limit is inclusive


@pytest.mark.parametrize("path", ["/slow", "/stalls"], ids=["no-answer", "stalls-mid-body"])
def test_timeouts_raise_image_download_timeout(server, path):
    start = time.monotonic()
    with pytest.raises(ImageDownloadTimeout, match="did not answer within 0.5 s") as info:
        load_image(f"{server}{path}", timeout=0.5)
    assert time.monotonic() - start < 2.5
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, ImageLoadError)


def test_connection_refused_is_a_load_error_not_a_timeout():
    with socket.socket() as probe:  # find a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ImageLoadError, match="Could not download") as info:
        load_image(f"http://127.0.0.1:{port}/image.png", timeout=2)
    assert not isinstance(info.value, ImageDownloadTimeout)


def test_the_message_for_data_that_is_no_image_does_not_show_pillows_file_object(tmp_path):
    """The chat box's upload of a .json file said "cannot identify image file <_io.BytesIO object at 0x7f...>",
    a text file "<_io.BufferedReader name='...'>"."""
    (tmp_path / "notes.txt").write_text("hello")
    for source in (b'{"a": 1}' * 40, tmp_path / "notes.txt"):
        with pytest.raises(ImageLoadError) as caught:
            load_image(source)
        assert "cannot identify image file)" in str(caught.value) and "<_io." not in str(caught.value)


def test_a_password_in_an_image_url_is_not_repeated_in_the_error():
    """http://user:secret@host/...: the refusal names the address with ***@ in place of the user and
    password (an error text goes to the screen, notebooks and predict's results file)."""
    with pytest.raises(ImageLoadError) as caught:
        load_image("http://reader:s3cr3t@127.0.0.1:9/photo.png", timeout=2)
    message = str(caught.value)
    assert "s3cr3t" not in message and "reader" not in message
    assert "http://***@127.0.0.1:9/photo.png" in message


def test_a_home_folder_of_a_user_that_does_not_exist_is_an_image_load_error():
    """~nouser/x.png (a shell leaves it as typed when there is no such user): ImageLoadError saying what to
    write, not pathlib's bare RuntimeError; count_pages too."""
    from phi_helpers.api.images import count_pages

    for read in (load_image, count_pages):
        with pytest.raises(ImageLoadError, match=r"no user 'nouser-phi' on this machine\. Write ~/"):
            read("~nouser-phi/x.png")


def test_a_loop_of_links_and_a_link_to_nothing_are_named_as_such(tmp_path):
    """load_image says why nothing can be read (before: "No file at" for both, though ls shows the name)."""
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(ImageLoadError, match="leads through a loop of symbolic links"):
        load_image(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match=r"is a symbolic link to '.*deleted\.png', where there is nothing"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match="No file at"):
        load_image(tmp_path / "never.png")
