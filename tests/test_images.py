"""load_image: every kind of source, normalisation to upright RGB, and clear errors."""

import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy
import pytest
from PIL import Image

from phi_helpers import ImageDownloadTimeout, ImageLoadError, load_image
from phi_helpers.api.images import check_pixel_count

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


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    two_colour_image().save(path, exif=exif, quality=100)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # width and height swapped
    top, bottom = loaded.getpixel((10, 3)), loaded.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


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


def test_corrupt_and_truncated_data_raise_image_load_error(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(bad)
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(data[: len(data) // 2])


def test_unsupported_type_says_what_is_accepted():
    with pytest.raises(ImageLoadError, match="cannot read a int.*file path.*URL"):
        load_image(42)


def test_other_url_schemes_are_refused():
    with pytest.raises(ImageLoadError, match="only http:// and https://"):
        load_image("ftp://example.com/cat.png")


@pytest.mark.parametrize("size", [(40, 40), (100, 100)], ids=["bomb-warning-range", "bomb-error-range"])
def test_decompression_bombs_are_refused(monkeypatch, tmp_path, size):
    path = tmp_path / "bomb.png"
    Image.new("RGB", size).save(path)
    # 1600 pixels is between the limit and twice the limit, where Pillow would only warn;
    # 10000 pixels is beyond twice the limit, where Pillow raises DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS"):
        load_image(path)


def test_the_pixel_limit_error_says_what_to_do_with_and_without_python(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    check_pixel_count(40, 25, "the page")  # 1000 pixels: allowed
    with pytest.raises(ImageLoadError) as caught:
        check_pixel_count(40, 26, "the image")
    message = str(caught.value)
    assert message.startswith("Refusing to decode the image: ") and "(40 x 26 = 1,040 pixels)" in message
    assert "Use a smaller image (scale it down, or cut it into parts)." in message
    assert message.endswith("In your own Python code, if you trust this file, you can raise PIL.Image.MAX_IMAGE_PIXELS first.")
    with pytest.raises(ImageLoadError) as caught:
        check_pixel_count(40, 26, "page 3", remedy="Split the PDF")
    assert "pixels). Split the PDF. In your own Python code" in str(caught.value)
    assert "Use a smaller image" not in str(caught.value)


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
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Make sure requests talks to 127.0.0.1 directly, whatever proxy the machine has configured."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


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
