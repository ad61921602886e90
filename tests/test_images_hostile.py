"""load_image on a reviewer's hostile inputs: closed PIL images and file objects, text-mode files, a path given
as bytes, URLs with blanks around them, a web page sent without a Content-Type, and bad limits. Each gives a
typed error that says what to do (or, for the URL, simply works); threads that load images side by side;
an image's base64 passed as a path; empty uploads."""

import base64
import http.server
import io
import math
import re
import socket
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy
import pytest
from PIL import Image

from local_server import no_proxy, serve  # noqa: F401  (no_proxy: an autouse fixture)
from phi_helpers import Chat, ImageLoadError, ask, load_image
from phi_helpers.api.generation import generate_batch
from phi_helpers.api.images import count_pages, load_page
from phi_helpers.errors import ImageDownloadTimeout, InvalidArgumentError

RED = (255, 0, 0)


@pytest.fixture(params=["PNG", "JPEG", "GIF"])
def image_path(request, tmp_path):
    path = tmp_path / f"red.{request.param.lower()}"
    Image.new("RGB", (20, 10), RED).save(path, format=request.param)
    return path


def opened_in_a_with_block(path) -> Image.Image:
    """The mistake: the image leaves the block that closes its file before Pillow has read its pixels."""
    with Image.open(path) as image:
        return image


# --- PIL images whose file was closed -----------------------------------------------------------------


def test_an_image_returned_from_its_with_block_says_so_and_what_to_do(image_path):
    with pytest.raises(ImageLoadError, match=r"file was already closed \(the `with Image.open\(\.\.\.\) as im:` block "
                                             r"ended.*Call im\.load\(\) or im\.copy\(\) inside the with block"):
        load_image(opened_in_a_with_block(image_path))


def test_an_image_closed_before_its_pixels_were_read_says_so(image_path):
    image = Image.open(image_path)
    image.close()
    with pytest.raises(ImageLoadError, match=r"file was already closed .*or im\.close\(\) was called"):
        load_image(image)


def test_an_image_whose_file_object_was_closed_says_so(image_path):
    with open(image_path, "rb") as file:
        image = Image.open(file)
    with pytest.raises(ImageLoadError, match="file was already closed"):
        load_image(image)


def test_an_image_closed_after_loading_says_it_was_closed(image_path):
    image = Image.open(image_path)
    image.load()
    image.close()
    with pytest.raises(ImageLoadError, match=r"was closed \(im\.close\(\) frees its pixels\)"):
        load_image(image)


def test_an_image_loaded_before_its_file_was_closed_still_loads(image_path):
    with Image.open(image_path) as image:
        image.load()
    assert load_image(image).size == (20, 10)
    with Image.open(image_path) as image:
        copy = image.copy()
    assert load_image(copy).size == (20, 10)


def test_with_python_O_it_is_the_same_error_not_an_attribute_error(tmp_path):
    """Pillow's own check is an assert: under ``python -O`` the mistake was an AttributeError instead."""
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 10), RED).save(path)
    script = ("import sys\nfrom PIL import Image\nfrom phi_helpers import ImageLoadError, load_image\n"
              "with Image.open(sys.argv[1]) as image:\n    pass\n"
              "try:\n    load_image(image)\nexcept ImageLoadError as error:\n    print('typed:', error)\n")
    done = subprocess.run([sys.executable, "-O", "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("typed: ") and "file was already closed" in done.stdout


def test_chat_add_user_refuses_a_closed_image_and_adds_nothing(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 10), RED).save(path)
    chat = Chat()
    with pytest.raises(ImageLoadError, match="file was already closed"):
        chat.add_user("What colour is it?", images=[opened_in_a_with_block(path)])
    assert len(chat) == 0


def test_ask_and_generate_batch_refuse_a_closed_image(tmp_path, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 10), RED).save(path)
    with pytest.raises(ImageLoadError, match="file was already closed"):
        ask(model, processor, "What colour is it?", images=[opened_in_a_with_block(path)], max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="file was already closed"):
        generate_batch(model, processor, ["What colour is it?"], [[opened_in_a_with_block(path)]], max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="Image 1 cannot be read: its file was already closed"):  # the processor
        processor(text="<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", images=[opened_in_a_with_block(path)])


# --- file objects, modes and bytes that are not what they seem -----------------------------------------


@pytest.fixture
def png_path(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 10), RED).save(path)
    return path


def test_a_file_opened_in_text_mode_says_to_open_it_with_rb(png_path):
    with open(png_path) as file, pytest.raises(ImageLoadError, match=r'reads text, not bytes.*open\(path, "rb"\)'):
        load_image(file)
    with pytest.raises(ImageLoadError, match=r'reads text, not bytes.*open\(path, "rb"\)'):
        load_image(io.StringIO("not an image"))


def test_a_closed_file_object_says_it_is_closed(png_path):
    with open(png_path, "rb") as file:
        pass
    buffer = io.BytesIO(png_path.read_bytes())
    buffer.close()
    for closed in (file, buffer):
        with pytest.raises(ImageLoadError, match=r"is closed \(its `with` block ended, or \.close\(\) was called\)"):
            load_image(closed)


def test_a_mode_pillow_cannot_convert_is_named_not_called_corrupt():
    with pytest.raises(ImageLoadError, match=r"Pillow cannot convert images of mode 'La'.*image\.convert\(\"LA\"\)") as caught:
        load_image(Image.new("La", (4, 4)))
    assert "corrupt" not in str(caught.value)


@pytest.mark.parametrize("data", [b"red.png", b"photos/cat.jpg", b"C:\\pictures\\cat", b"red.png\n"], ids=repr)
def test_bytes_that_are_a_path_say_to_pass_a_str_or_path(png_path, monkeypatch, data):
    monkeypatch.chdir(png_path.parent)  # b"red.png" names a file that exists there; the others look like paths
    text = data.decode().strip()
    with pytest.raises(ImageLoadError, match=re.escape(f"they are the text {text!r}, a file path (or URL) given as bytes. "
                                                       "Pass it as a str or a pathlib.Path")):
        load_image(data)
    with pytest.raises(ImageLoadError, match="Pass it as a str or a pathlib.Path"):
        load_page(data, 1)


@pytest.mark.parametrize("data", [b"hello", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.7 a/b.png"], ids=repr)
def test_bytes_that_are_no_path_keep_their_own_message(data):
    with pytest.raises(ImageLoadError) as caught:
        load_image(data)
    assert "pathlib" not in str(caught.value)


def test_a_web_page_that_holds_a_drawing_is_called_a_web_page_not_an_svg():
    with pytest.raises(ImageLoadError, match=r"it is a web page \(HTML\), not an image"):
        load_image(b"<!DOCTYPE html><html><body><svg></svg></body></html>")


# --- URLs (a tiny HTTP server on 127.0.0.1 that counts the requests it gets) ---------------------------

PNG = io.BytesIO()
Image.new("RGB", (20, 10), RED).save(PNG, format="PNG")
PNG = PNG.getvalue()
PAGE = b"\n  <!DOCTYPE html><html><body><img src='red.png'></body></html>"


class _Handler(http.server.BaseHTTPRequestHandler):
    requests = 0

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        _Handler.requests += 1
        routes = {"/red.png": (PNG, "image/png"), "/page-without-type": (PAGE, None), "/page": (PAGE, "text/html")}
        if self.path not in routes:
            self.send_error(404)
            return
        body, content_type = routes[self.path]
        self.send_response(200)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    with serve(_Handler) as url:
        yield url


@pytest.mark.parametrize("around", [("", "\n"), ("  ", "  "), ("\t", "\r\n")], ids=repr)
def test_a_url_with_blanks_around_it_downloads_the_url_without_them(server, around):
    before, after = around
    assert load_image(f"{before}{server}/red.png{after}").getpixel((0, 0)) == RED


def test_a_web_page_without_a_content_type_is_called_a_web_page(server):
    with pytest.raises(ImageLoadError, match=r"web page.*copy the image address"):
        load_image(f"{server}/page")  # with the header: as before
    with pytest.raises(ImageLoadError, match=r"it is a web page \(HTML\), not an image.*copy the image address"):
        load_image(f"{server}/page-without-type")


BAD_LIMITS = [("timeout", 0), ("timeout", -1), ("timeout", "5"), ("timeout", None), ("timeout", math.nan),
              ("timeout", math.inf), ("timeout", True), ("max_seconds", None), ("max_seconds", 0),
              ("max_seconds", "120"), ("max_seconds", math.inf), ("max_bytes", None), ("max_bytes", 0),
              ("max_bytes", -1), ("max_bytes", 1.5), ("max_bytes", "1000")]


@pytest.mark.parametrize("name, value", BAD_LIMITS, ids=[f"{name}={value!r}" for name, value in BAD_LIMITS])
def test_a_bad_limit_is_refused_by_name_before_anything_is_downloaded(server, png_path, name, value):
    wording = "a whole number of at least 1" if name == "max_bytes" else "a number of seconds above 0"
    requests_before = _Handler.requests
    with pytest.raises(InvalidArgumentError, match=f"^{name} must be {wording}") as caught:
        load_image(f"{server}/red.png", **{name: value})
    assert str(caught.value).endswith(f"got {value!r}.")
    assert _Handler.requests == requests_before
    with pytest.raises(InvalidArgumentError, match=f"^{name} must be"):
        load_image(png_path, **{name: value})  # a bad argument whatever the source


def test_numpy_numbers_are_good_limits(server):
    image = load_image(f"{server}/red.png", timeout=numpy.int64(5), max_seconds=numpy.float64(30),
                       max_bytes=numpy.int64(len(PNG)))
    assert image.getpixel((0, 0)) == RED


def test_a_password_is_left_out_of_the_error_when_the_server_never_answers(monkeypatch):
    """The deadline passed before any header came: that error named the address with its password."""
    answer = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802  (answers nothing until the test is over)
            answer.wait(30)

    with serve(Silent) as url:
        try:
            with pytest.raises(ImageDownloadTimeout, match=r"took longer than max_seconds=0\.3") as caught:
                load_image(url.replace("http://", "http://reader:s3cr3t@") + "/photo.png", timeout=5, max_seconds=0.3)
        finally:
            answer.set()
    assert "s3cr3t" not in str(caught.value) and "http://***@127.0.0.1:" in str(caught.value)


# --- threads: Pillow's warning is left out without leaving a filter behind -------------------------------


def image_bytes(size, format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, RED).save(buffer, format=format)
    return buffer.getvalue()


def test_two_threads_whose_loads_overlap_leave_no_warning_filter_behind(monkeypatch):
    """Each load silenced Pillow's DecompressionBombWarning with warnings.catch_warnings, which saves and
    restores one list for the whole process (before Python 3.14). Thread 1 starts, thread 2 starts while
    thread 1 decodes, thread 1 ends first: thread 2 then restored the list it had saved, with thread 1's
    "ignore" filter in it, for good, and the program's own Image.open of a too-large image never warned
    again. Here the threads are made to overlap so every time (they wait for each other in _upright,
    the last step of decoding)."""
    from phi_helpers.api import images

    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    roles, upright = {}, images._upright

    def upright_in_turn(image):
        if roles[threading.get_ident()] == "first":
            first_inside.set()
            assert second_inside.wait(60)  # a guard: a lock held here would make this fail, not hang
        else:
            second_inside.set()
            assert first_done.wait(60)
        return upright(image)

    def load(role):
        roles[threading.get_ident()] = role
        if role == "second":
            assert first_inside.wait(60)
        load_image(PNG)
        if role == "first":
            first_done.set()

    monkeypatch.setattr(images, "_upright", upright_in_turn)
    before = list(warnings.filters)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(load, "first"), pool.submit(load, "second")]:
            future.result()
    assert warnings.filters == before


def test_threads_loading_images_side_by_side_print_no_warning_and_leave_the_filters(monkeypatch, recwarn):
    """8 threads x 50 loads, all 8 meeting in the middle of their decoding every round (a barrier in
    _upright: the threads decode side by side). Above once the limit (1,000 pixels here) no thread prints
    Pillow's warning (a TIFF warns again while it is decoded), and afterwards the program's own
    Image.open of such an image still does."""
    from phi_helpers.api import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    sources = [image_bytes((20, 10)), image_bytes((40, 40)), image_bytes((40, 40), "TIFF")]  # 200 and 1,600 pixels
    threads, rounds = 8, 50
    meeting = threading.Barrier(threads)
    upright = images._upright

    def meet_then_turn(image):
        meeting.wait(timeout=60)  # a guard: a load that held a lock here would break the barrier, not hang
        return upright(image)

    monkeypatch.setattr(images, "_upright", meet_then_turn)
    before = list(warnings.filters)
    with ThreadPoolExecutor(threads) as pool:
        loaded = list(pool.map(lambda thread: [load_image(sources[(thread + n) % 3]).size for n in range(rounds)],
                               range(threads)))
    assert sorted({size for sizes in loaded for size in sizes}) == [(20, 10), (40, 40)]
    assert warnings.filters == before
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    Image.open(io.BytesIO(sources[1]))
    assert [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --- text that is an image's base64, not a path; long text in messages -----------------------------------


def base64_text(format="PNG", size=(20, 10)) -> str:
    return base64.b64encode(image_bytes(size, format)).decode()


def noise_png(side=120) -> bytes:
    buffer = io.BytesIO()
    noise = numpy.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=numpy.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", ["short", "long"])
def test_base64_of_an_image_passed_as_a_path_says_to_decode_it(size):
    """The usual JSON upload: a short one said "No file at ... Check the spelling"; a long one (more than a
    path can be) gave a 54 KB message with the text twice, advising to check the folders' permissions."""
    text = base64_text() if size == "short" else base64.b64encode(noise_png()).decode()
    for read in (load_image, count_pages, lambda text: load_page(text, 1)):
        message = str(pytest.raises(ImageLoadError, read, text).value)
        assert "looks like base64-encoded PNG data, not a path" in message
        assert 'load_image(base64.b64decode(text)), or a data: URL, "data:image/png;base64," + text.' in message
        assert "ls -ld" not in message and "Check the spelling" not in message
        assert len(message) < 800 and (size == "short") == (text in message)
    assert load_image(base64.b64decode(text)).size in {(20, 10), (120, 120)}  # what the message says to do


@pytest.mark.parametrize("format, named", [("JPEG", "JPEG data"), ("GIF", "GIF data"), ("WEBP", "WebP data"),
                                           ("TIFF", "TIFF data"), ("BMP", "BMP data")])
def test_base64_of_other_image_formats_is_named_too(format, named):
    message = str(pytest.raises(ImageLoadError, load_image, base64_text(format)).value)
    assert f"looks like base64-encoded {named}, not a path" in message
    assert f'"data:image/{named.split()[0].lower()};base64," + text' in message


def test_a_pdfs_base64_is_named_and_a_path_that_is_no_base64_is_missing():
    pdf = base64.b64encode(b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF\n").decode()
    assert "looks like base64-encoded PDF data" in str(pytest.raises(ImageLoadError, load_image, pdf).value)
    # "BMabcd" is base64 too short to tell; the last is "hello world this is text"
    for path in ("photos/missing.png", "Qk1hYmNk", "aGVsbG8gd29ybGQgdGhpcyBpcyB0ZXh0"):
        message = str(pytest.raises(ImageLoadError, load_image, path).value)
        assert message.startswith(f"No file at '{path}'. Check the spelling") and "base64" not in message


@pytest.mark.parametrize("path", ["café.png", "фото.jpg", "写真.png"])
def test_a_missing_file_whose_name_is_not_ascii_is_missing(path):
    """The base64 check decoded the name: a bare ValueError ("string argument should contain only ASCII
    characters") instead of the missing file's message."""
    for read in (load_image, count_pages, lambda path: load_page(path, 1)):
        with pytest.raises(ImageLoadError, match=re.escape(f"No file at '{path}'. Check the spelling")):
            read(path)


@pytest.mark.parametrize("path", ["Qk2xReportFinal2024v123456789012",  # "BM" + bytes that are no BMP header
                                  "Qk2dataset/trainsplit/images/batch0001/pic00001/version2/final/x",
                                  "/9j/Report2024ab",  # JPEG's 3-byte signature, not followed by a marker
                                  "iVBORw0KGgoAAAANSUhEUgAA.png",  # a PNG's base64 start, with an extension
                                  "iVBORw0KGgoAAAANSUhEUgAAAAQ",  # not whole groups of 4 characters
                                  "R0lGODlhAQABAIAAAPdd-final_v2"])  # "-" and "_" are not base64
def test_a_missing_file_whose_name_is_base64_by_chance_is_missing(path):
    for read in (load_image, count_pages, lambda path: load_page(path, 1)):
        message = str(pytest.raises(ImageLoadError, read, path).value)
        assert message.startswith(f"No file at '{path}'. Check the spelling") and "base64" not in message


@pytest.mark.parametrize("format, named", [("PNG", "PNG"), ("JPEG", "JPEG"), ("BMP", "BMP"), ("GIF", "GIF"),
                                           ("WEBP", "WebP"), ("TIFF", "TIFF"), ("PDF", "PDF")])
def test_base64_wrapped_at_76_characters_is_named_too(format, named):
    """What the base64 tool and mail clients give: lines of 76 characters."""
    pdf = b"%PDF-1.7\n" + b"1 0 obj << >> endobj\n" * 5 + b"%%EOF\n"
    data = pdf if format == "PDF" else image_bytes((20, 10), format)
    wrapped = base64.encodebytes(data).decode()
    assert "\n" in wrapped.strip()
    for text in (wrapped, wrapped.replace("\n", "")):
        message = str(pytest.raises(ImageLoadError, load_image, text).value)
        assert f"looks like base64-encoded {named} data, not a path" in message


def test_a_long_path_is_shown_whole_and_a_longer_one_in_the_middle_of_the_message(tmp_path):
    """Shortened at 120 characters, a long real path lost its middle, where a typo often is."""
    folder = tmp_path / ("long-folder-name-" * 10)
    missing = folder / "photo.png"
    assert 120 < len(str(missing)) <= 400
    message = str(pytest.raises(ImageLoadError, load_image, str(missing)).value)
    assert message.startswith(f"No file at '{missing}'. Check the spelling")
    missing = tmp_path / "/".join(["long-folder-name-" * 10] * 3) / "photo.png"  # over 400 characters
    message = str(pytest.raises(ImageLoadError, load_image, str(missing)).value)
    assert message.startswith(f"No file at '{str(missing)[:199]}…{str(missing)[-199:]}'. Check the spelling")
    text = "x" * 5000  # not a path at all: longer than the system looks up
    message = str(pytest.raises(ImageLoadError, load_image, text).value)
    assert message == (f"'{'x' * 199}…{'x' * 199}' is too long to be a path (5,000 characters; a file or folder "
                       "name has at most 255 bytes, a whole path 4,096). Pass the path of an image file.")
    message = str(pytest.raises(ImageLoadError, load_image, "s3://bucket/" + "k" * 5000).value)
    assert len(message) < 600 and message.startswith("Cannot load 's3://bucket/kkk")


# --- empty uploads -----------------------------------------------------------------------------------------


def test_empty_bytes_and_an_empty_file_object_say_they_are_empty():
    """b"" said "the 0 bytes you passed is empty (0 bytes)"; an empty BytesIO "the data may be corrupt"."""
    bytes_message = ("The bytes you passed are empty (0 bytes), so there is no image to read. Pass the image file's "
                     "content (e.g. Path(\"photo.png\").read_bytes()); if the bytes came from an upload or a download, "
                     "check that it arrived whole.")
    for read in (load_image, count_pages, lambda data: load_page(data, 1)):
        assert str(pytest.raises(ImageLoadError, read, b"").value) == bytes_message
    message = str(pytest.raises(ImageLoadError, load_image, io.BytesIO()).value)
    assert message.startswith("The file object you passed (BytesIO) is empty (0 bytes), so there is no image to read. "
                              "Check that the image was written into it")
    assert "corrupt" not in message
    read_to_its_end = io.BytesIO(PNG)
    read_to_its_end.read()
    assert load_image(read_to_its_end).size == (20, 10)  # read from the start, as Pillow does


# --- streams that cannot be read again from their start (a socket's makefile("rb"), a pipe) -------------------


class _Stream:
    """A binary stream that can be read once, as a socket's or a pipe's: it has no seek. ``read()`` waits
    until ``go_on`` is set (a client that stalls in the middle of its upload), then gives ``data``."""

    def __init__(self, data: bytes, stalled: bool = False):
        self.data, self.reading, self.go_on = data, threading.Event(), threading.Event()
        if not stalled:
            self.go_on.set()

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, size=-1):
        self.reading.set()
        assert self.go_on.wait(60)  # a guard: the test lets it go
        data, self.data = self.data, b""
        return data


def test_a_stalled_stream_does_not_stop_other_threads_loading_images():
    """Pillow reads a stream it cannot seek in whole inside Image.open, which load_image called holding a
    lock that every load takes: one stalled upload stopped every other thread's load_image for good."""
    stalled, loaded = _Stream(PNG, stalled=True), []
    first = threading.Thread(target=lambda: loaded.append(load_image(stalled).size), daemon=True)
    first.start()
    assert stalled.reading.wait(60)  # the first thread waits for the stalled stream's bytes
    other = threading.Thread(target=lambda: loaded.append(load_image(PNG).size), daemon=True)
    other.start()
    other.join(60)  # a guard: before the fix it waited for the stalled stream, for good
    other_finished = not other.is_alive()
    stalled.go_on.set()
    first.join(60)
    other.join(60)
    assert other_finished, "load_image of bytes waited for another thread's stalled stream"
    assert loaded == [(20, 10), (20, 10)]  # the other thread first, then the stream once its bytes came


def test_a_stream_is_read_whole_and_named_as_other_file_objects_are():
    """An empty stream was "cannot identify image file ... may be corrupt"; an SVG was not named (Pillow had
    read the stream, so its first bytes could not be read again)."""
    message = str(pytest.raises(ImageLoadError, load_image, _Stream(b"")).value)
    assert message == "the file object you passed is empty (0 bytes); there is no image to read."
    message = str(pytest.raises(ImageLoadError, load_image, _Stream(b"<svg xmlns='http://www.w3.org/2000/svg'/>")).value)
    assert message.startswith("Could not read the file object you passed: it is an SVG file")

    class Reset(_Stream):
        def read(self, size=-1):
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(ImageLoadError, match=r"^Could not read the file object you passed as an image "
                                             r"\(ConnectionResetError: \[Errno 104\] Connection reset by peer\)"):
        load_image(Reset(PNG))
    reading, writing = socket.socketpair()
    with reading, writing:
        writing.sendall(PNG)
        writing.close()
        with reading.makefile("rb") as stream:
            assert load_image(stream).getpixel((0, 0)) == RED


# --- max_pixels: a service's own limit for uploads, judged from the header ---------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and whose pixel data is cut off after a few bytes:
    decoding it fails, so an error that is not about truncation proves the header alone decided."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()[:200]


def test_max_pixels_refuses_a_large_image_from_its_header_before_decoding(tmp_path):
    data = _png_header_only(4000, 3000)
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(data)  # without the limit, Pillow starts decoding and finds the data cut off
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    for src in (data, path, str(path), io.BytesIO(data), "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(ImageLoadError, match=r"4,000 x 3,000 = 12,000,000 pixels, more than max_pixels=1,000,000"):
            load_image(src, max_pixels=1_000_000)


def test_max_pixels_applies_to_images_already_in_memory_and_allows_the_limit_itself():
    image = Image.new("RGB", (100, 50), "red")
    assert load_image(image, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageLoadError, match="the PIL image you passed: it has 100 x 50"):
        load_image(image, max_pixels=4999)
    with pytest.raises(ImageLoadError, match="the numpy array you passed: it has 100 x 50"):
        load_image(numpy.zeros((50, 100, 3), numpy.uint8), max_pixels=4999)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_max_pixels_must_be_a_whole_number_above_zero(bad):
    with pytest.raises(InvalidArgumentError, match="max_pixels must be a whole number of at least 1"):
        load_image(Image.new("RGB", (4, 4)), max_pixels=bad)


def test_a_name_in_another_unicode_form_is_named_not_said_missing(tmp_path):
    """A folder copied from macOS keeps NFD names ("cafe" + U+0301): "café.png" typed (NFC) looked missing, and
    the message showed the very name that is there."""
    Image.new("RGB", (8, 8)).save(tmp_path / "cafe\u0301.png")
    with pytest.raises(ImageLoadError, match=re.escape("its folder holds 'cafe\\u0301.png': the same letters")):
        load_image(tmp_path / "caf\u00e9.png")
