"""Load an image from wherever a learner has it: a path, a URL, raw bytes, a file object, PIL or numpy.

    from phi_helpers import load_image
    image = load_image("notebooks/images/chart.png")   # (in a clone of the repository)
    image = load_image("https://example.com/photo.jpg")

Whatever the source, you get back the same thing: a fully loaded RGB ``PIL.Image.Image`` that is
upright, has no transparency (transparent pixels are painted onto white, which is what a person
looking at the image sees) and 8 bits per channel (16-bit greyscale is scaled, not clipped to white).
Anything that goes wrong becomes an ``ImageLoadError`` (or ``ImageDownloadTimeout``) that names the
source and says what to do; formats Pillow cannot read (SVG, HEIC/HEIF, PDF) are named as such.

Upright: the EXIF orientation tag of phone photos is applied, to files, URLs, bytes and PIL images
alike (a PIL image you converted or resized keeps the tag, and its pixels are still stored sideways).
One exception: Pillow also copies the tag into an image you turned yourself (``rotate``,
``transpose``), so a PIL image whose tag asks for a quarter turn (orientations 5-8) but whose shape is
nearer to the photo's turned shape than to its stored one (the EXIF records the stored width and
height) is taken as upright, not turned a second time. Only shapes tell, so a crop that changes the
shape, or a half turn of your own, can still be judged wrong: ``ImageOps.exif_transpose`` first (it
turns the photo and removes the tag) is the safe way to turn or crop a photo.
A numpy array (uint8, (height, width) or (height, width, 3 or 4)) has no orientation.

Size: an image is refused only where Pillow itself refuses to open one, above twice
``PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels by default), where a decompression bomb (a small
file that decodes to a huge image) is suspected. A 108-megapixel phone photo loads, and Pillow's
warning for images above once the limit is not printed. Raise ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no
limit) to open larger files you trust. A service that takes uploads from strangers can set a lower
limit per call, ``load_image(upload, max_pixels=25_000_000)``: an image above it is refused from its
header, before its pixels are decoded (a 1 MB PNG can hold 13,000 x 13,000 pixels, about 4 GB of work).

A multi-page TIFF (a scanned fax, a multi-page scan) is a document: ``load_image`` gives its first
page, ``load_page(path, n)`` page ``n`` (with the same checks) and ``count_pages(path)`` how many it has;
``phi-helpers predict --image scan.tif`` answers every page. An animated GIF, PNG or WebP is one
picture: its first frame.

``decode_bytes(data, source)`` decodes bytes as ``load_image`` does, with messages that name them as
``source`` says (the notebooks' chat widget: "the uploaded file 'receipt.png'").

Note: this friendly conversion is done here, in the user-facing loader. The model's own image
processor stays faithful to the original and would turn transparent pixels black (and clip 16-bit
greyscale) instead.
"""

import base64
import binascii
import contextlib
import errno
import io
import math
import numbers
import os
import re
import stat
import struct
import threading
import time
import urllib.parse
import unicodedata
import warnings
from pathlib import Path

import numpy
import requests
import torch
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDownloadTimeout, ImageLoadError, InvalidArgumentError, check_whole_number, expand_home
from ..models.phi3_v.image_processing_phi3_v import ARRAY_LAYOUT, TENSOR_ADVICE, check_not_closed, image_from_array

_USER_AGENT = "phi_helpers/0.1 (Phi-3-vision tutorial notebooks)"
_CHUNK_SIZE = 64 * 1024
_SMALLER_IMAGE = "Use a smaller image (scale it down, or cut it into parts)"  # what to do about too many pixels
# Errors Pillow raises for data it cannot decode (it is not consistent about which one).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, TypeError,
                  KeyError, IndexError)  # KeyError, IndexError: Pillow on a TIFF page with a damaged header


def load_image(src, *, timeout: float = 20, max_bytes: int = 50_000_000, max_seconds: float = 120,
               max_pixels: int | None = None) -> Image.Image:
    """Return ``src`` as an upright, fully loaded RGB PIL image.

    A multi-page TIFF gives its first page (``load_page`` reads any page; ``phi-helpers predict`` runs
    every page, one line each), an animated GIF, PNG or WebP its first frame.

    Upright means: the EXIF orientation tag is applied, except to a PIL image that you already turned
    (``rotate``/``transpose`` keep the tag): one whose shape is the photo's stored shape (recorded in its
    EXIF) turned by the quarter turn the tag asks for.

    Args:
        src: a file path (``str`` or ``pathlib.Path``), an ``http://`` / ``https://`` URL, a base64
            ``data:`` URL, the image file's content as ``bytes``/``bytearray``, an open binary file
            object, a PIL image (a converted copy is returned; your image is not changed), or a uint8
            numpy array of shape (height, width) or (height, width, 3 or 4). A torch tensor is refused
            with the conversion to use. A str is a path or a URL, never base64 image data: pass
            ``base64.b64decode(text)`` for that.
            Transparency becomes white; 16-bit greyscale (scans, scientific cameras) is scaled to 8 bits.
        timeout: seconds to wait for a URL's server to answer, and for each piece of the download
            (a number above 0: there is no "wait forever").
        max_bytes: largest download accepted, in bytes (protects you from a wrong link to a huge file).
        max_seconds: the whole download must be over within this many seconds, however steadily a
            (slow or hostile) server keeps sending (a number above 0).
        max_pixels: refuse an image of more pixels (width x height) than this, judged from its header
            before its pixels are decoded; None: only Pillow's own limit (see below). For a service
            that loads uploads or URLs it does not control.

    Raises:
        ImageLoadError: missing, empty or corrupt file, a format Pillow cannot read (SVG, HEIC), a
            failed download, an image above twice ``PIL.Image.MAX_IMAGE_PIXELS`` (which Pillow refuses
            to open) or above ``max_pixels``, or an unsupported ``src`` type. The message says which
            source and what to do.
        ImageDownloadTimeout: the URL did not answer within ``timeout`` seconds, or the download
            took longer than ``max_seconds``.
        InvalidArgumentError: ``timeout``, ``max_seconds``, ``max_bytes`` or ``max_pixels`` is not a
            number above 0 (checked before anything is read or downloaded).
    """
    _check_seconds(timeout, "timeout")
    _check_seconds(max_seconds, "max_seconds")
    max_bytes = check_whole_number(max_bytes, "max_bytes", minimum=1, hint=" (a number of bytes: 50_000_000 is 50 MB)")
    if max_pixels is not None:
        max_pixels = check_whole_number(max_pixels, "max_pixels", minimum=1,
                                        hint=" (width x height: 25_000_000 is 25 megapixels), or None")
    if isinstance(src, Image.Image):  # not turned again if the user turned it already (_turned_already)
        check_not_closed(src, "The PIL image you passed")
        return _decode(lambda: src, "the PIL image you passed", upright=not _turned_already(src), max_pixels=max_pixels)
    if isinstance(src, numpy.ndarray):
        return _decode(lambda: image_from_array(src), "the numpy array you passed", upright=False,
                       max_pixels=max_pixels)
    if isinstance(src, torch.Tensor):
        raise ImageLoadError(f"load_image() cannot read a torch Tensor (shape {tuple(src.shape)}). {TENSOR_ADVICE}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_given_bytes(bytes(src), max_pixels=max_pixels)
    if isinstance(src, str) and _is_url(src):
        url = src.strip()  # a line read from a file ends in "\n": _is_url strips it, so must the download
        data = _download(url, timeout=timeout, max_bytes=max_bytes, max_seconds=max_seconds)
        return decode_bytes(data, _shortened(shown_url(url)), max_pixels=max_pixels)
    if isinstance(src, str) and src.lstrip().lower().startswith("data:"):
        return decode_bytes(_data_url_bytes(src), "the data: URL you passed", max_pixels=max_pixels)
    if isinstance(src, str) and not src.strip():
        raise ImageLoadError("The image path is empty. Pass the path of an image file, a URL, bytes or a PIL image.")
    if isinstance(src, (str, os.PathLike)):
        return _from_path(src, max_pixels=max_pixels)
    if hasattr(src, "read"):
        _check_binary_and_open(src)
        source = "the file object you passed"
        if not _seekable(src):  # a socket's or a pipe's stream: read whole here, where no lock is held (_open)
            with _decoding(source):
                data = src.read()
            return decode_bytes(data, source, max_pixels=max_pixels)
        _check_not_empty(src)
        return _decode(lambda: _open(src), source, head=lambda: _first_bytes(src), max_pixels=max_pixels)
    raise ImageLoadError(
        f"load_image() cannot read a {type(src).__name__}. Pass a file path, an http(s) URL, bytes, "
        f"an open binary file, a PIL image or {ARRAY_LAYOUT}."
    )


def _check_seconds(value, name: str) -> None:
    """InvalidArgumentError unless ``value`` is a number of seconds above 0 (not a bool, not infinite:
    every download has a limit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise InvalidArgumentError(f"{name} must be a number of seconds above 0 (every download has a time limit), "
                                   f"got {value!r}.")


def _seekable(file) -> bool:
    """Whether an open file can be read again from its start (its ``seekable()`` says so and ``seek(0)``
    works). Pillow's Image.open reads a file that cannot whole, and a stalled stream would then stall
    every thread's Image.open (_open holds a lock around it)."""
    try:
        if not file.seekable():
            return False
        file.seek(0)
    except (OSError, ValueError, AttributeError):  # no seekable() or seek(), or seek refused
        return False
    return True


def _check_not_empty(file) -> None:
    """ImageLoadError for an open, seekable binary file that holds no bytes (0 bytes from its start, where
    Pillow reads it from); a file that cannot be read (opened for writing only) is left to Pillow."""
    try:
        file.seek(0)
        empty = file.read(1) == b""
    except (OSError, ValueError, AttributeError):  # not readable
        return
    if empty:
        raise ImageLoadError(
            f"The file object you passed ({type(file).__name__}) is empty (0 bytes), so there is no image to read. "
            "Check that the image was written into it; a BytesIO made from a stream that had already been read "
            "to its end (a second .read() of an upload) is empty."
        )


def _check_binary_and_open(file) -> None:
    """ImageLoadError for a file object that cannot give an image's bytes: a closed one, or one that
    reads text (``open(path)`` without ``"rb"``, ``io.StringIO``)."""
    if getattr(file, "closed", False) is True:
        raise ImageLoadError(
            f"The file object you passed ({type(file).__name__}) is closed (its `with` block ended, or .close() "
            "was called), so there is nothing to read. Pass it while it is still open, or pass the path instead."
        )
    if isinstance(file, io.TextIOBase):
        raise ImageLoadError(
            f"The file object you passed ({type(file).__name__}) reads text, not bytes: an image file must be "
            'opened in binary mode. Open it with open(path, "rb") instead of open(path), or pass the path itself.'
        )


WEB_SCHEMES = ("http", "https")  # the URLs load_image downloads
PDF_SIGNATURE = b"%PDF-"  # how every PDF file begins


def url_scheme(text: str) -> str | None:
    """The scheme of a URL, lower case (``"https"``, ``"s3"``...), or None for a path: anything with
    ``://`` is a URL. The one place where the package tells paths and URLs apart."""
    return text.strip().split("://", 1)[0].lower() if "://" in text else None


def _is_url(text: str) -> bool:
    """True for a web address; ImageLoadError for a URL of another scheme, which load_image cannot fetch."""
    scheme = url_scheme(text)
    if scheme in WEB_SCHEMES:
        return True
    if scheme is not None:
        raise ImageLoadError(
            f"Cannot load {_shortened(text)!r}: only http:// and https:// URLs are supported, not {scheme}://. "
            "Download the file yourself and pass its path."
        )
    return False


def _data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (``data:image/png;base64,iVBOR...``, as browsers copy images).
    Line breaks and blanks in the base64 part are left out: the ``base64`` tool and mail clients wrap it
    at 76 characters; any other character that is not base64 is refused."""
    header, _, data = url.strip().partition(",")
    if not header.lower().endswith(";base64"):
        raise ImageLoadError("Only base64 data: URLs are supported (data:image/png;base64,...).")
    data = re.sub(_BLANKS, "", data)
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ImageLoadError("The data: URL's base64 part is damaged; copy the image again.") from None


_BLANKS = r"[ \t\r\n]"  # what base64 text may hold besides its own characters (it is often wrapped at 76)
# How image files (and PDF documents) begin; a WebP file begins with RIFF, its size, then WEBP.
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
                    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP", PDF_SIGNATURE: "PDF"}


_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")  # base64's alphabet, with its padding at the end


def _base64_image_format(text: str) -> str | None:
    """The format ("PNG", "JPEG"...) of the image whose base64 ``text`` is, judged by the signature its
    first bytes decode to; None for text that is not such base64 (a path), or too short to tell.

    Strict, because a missing file's name may be base64 by chance: the whole text (blanks left out: base64
    is often wrapped) must be base64, a whole number of groups of 4 characters (a name with an extension,
    or with a character outside ASCII, never is), and start with a known signature. Where the signature is
    shorter than 4 bytes (BMP's "BM", JPEG's 3 bytes), the next header bytes must check out too. Only the
    start is decoded."""
    data = re.sub(_BLANKS, "", text)
    if len(data) % 4 or not _BASE64_TEXT.fullmatch(data):
        return None
    head = base64.b64decode(data[:64])  # whole groups of 4 characters: 48 bytes
    if len(head) < 12:  # the smallest image file has more; 12 bytes tell a WebP file
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    image_format = next((name for signature, name in IMAGE_SIGNATURES.items() if head.startswith(signature)), None)
    if image_format == "BMP" and head[6:10] != bytes(4):  # a BMP file's reserved header fields are zero
        return None
    if image_format == "JPEG" and head[3] < 0xC0:  # a JPEG's signature is followed by a marker, 0xC0 or above
        return None
    return image_format


def _base64_error(text: str, image_format: str) -> ImageLoadError:
    """The error for base64 image data passed where a path goes (a JSON upload's field, as it came)."""
    mime = "application/pdf" if image_format == "PDF" else f"image/{image_format.lower()}"
    return ImageLoadError(
        f"There is no file at '{_shortened(text)}': this text ({len(text):,} characters) looks like "
        f"base64-encoded {image_format} data, not a path, and load_image reads a str as a path (or URL). Pass the "
        f"bytes instead, load_image(base64.b64decode(text)), or a data: URL, \"data:{mime};base64,\" + text."
    )


_SHOWN_CHARS = 400  # the most characters of a path or other text that the caller passed a message shows:
# real paths are shown whole (a typo may be anywhere in them); an image's base64 does not flood the message


def _shortened(text) -> str:
    """``text`` (a path, a URL, any text the caller passed) as messages show it: whole, or if it is longer
    than _SHOWN_CHARS its start and end around "…", so that a long string passed by mistake (an image's
    base64) does not flood the message; the end keeps a file's name."""
    text = str(text)
    if len(text) <= _SHOWN_CHARS:
        return text
    half = (_SHOWN_CHARS - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def load_page(src, page: int) -> Image.Image:
    """Page ``page`` (counting from 1) of the multi-page TIFF at path ``src``, or in the bytes ``src``, as
    ``load_image`` returns images: the same checks (a missing, empty or unreadable file, the pixel
    limit: every page is checked, not only the first, which is all that Pillow checks on opening), the
    same conversion to upright 8-bit RGB. ``count_pages`` says how many pages there are; page 1 of
    any other image is the image (an animated GIF's first frame).

    Raises ImageLoadError as ``load_image`` does, and for a page the file does not have;
    InvalidArgumentError for a ``page`` that is not a whole number of at least 1.
    """
    page = check_whole_number(page, "page", minimum=1)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_given_bytes(bytes(src), page)
    if isinstance(src, str) and _is_url(src):
        raise ImageLoadError(f"load_page() reads a file, not a URL ({_shortened(src)}). Download the file and pass "
                             "its path.")
    if not isinstance(src, (str, os.PathLike)):
        raise ImageLoadError(f"load_page() cannot read a {type(src).__name__}. Pass a file path or the file's bytes "
                             "(for a PIL image, call image.seek(page - 1) and pass it to load_image).")
    return _from_path(src, page)


def count_pages(src) -> int:
    """How many pages the image file at path ``src`` (or in the bytes ``src``) has: a TIFF's pages, 1 for
    any other image.

    Only the headers are read, no pixels (a TIFF's pages are a chain of directories that give each
    page's size and place in the file): listing a folder of large scans stays quick. An animated GIF,
    PNG or WebP counts as one page: its frames are one moving picture, not a document's pages. Raises
    ImageLoadError, with the advice of ``load_image``, for a file that cannot be read.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        with _decoding(_given_bytes(data), head=lambda: data[:_SNIFF_BYTES]):
            return _page_count(_open(io.BytesIO(data)))
    path = expand_home(src, "image path", ImageLoadError)
    with _open_file(path, src) as file, _decoding(f"'{_shortened(path)}'", head=lambda: _first_bytes(file)):
        return _page_count(_open(file))


def _page_count(image: Image.Image) -> int:
    """A TIFF's pages (``_page_frames``); 1 for any other image."""
    return len(_page_frames(image))


REDUCED_RESOLUTION = 1  # bit 0 of a TIFF image's NewSubfileType (tag 254): a thumbnail or overview of another


def _page_frames(image: Image.Image) -> list[int]:
    """The frames of ``image`` that are pages: a TIFF's images except reduced-resolution copies of another
    (thumbnails, the overview levels of a pyramid); frame 0 of any other image. Only headers are read."""
    if image.format != "TIFF":
        return [0]
    frames = []
    for frame in range(image.n_frames):
        image.seek(frame)
        if not int(image.tag_v2.get(254, 0)) & REDUCED_RESOLUTION:
            frames.append(frame)
    image.seek(0)
    return frames or [0]


def _from_path(src, page: int | None = None, *, max_pixels: int | None = None) -> Image.Image:
    """Open the local file at path ``src`` (page ``page`` of it, if given) and decode it."""
    path = expand_home(src, "image path", ImageLoadError)
    with _open_file(path, src) as file:  # closed on return: the decoded image does not need the file
        return _decode(lambda: _open(file), f"'{_shortened(path)}'", page, head=lambda: _first_bytes(file),
                       max_pixels=max_pixels)


def _open_file(path: Path, given):
    """``open(path, "rb")``, with a specific message for each way a path can be wrong. ``given`` is the
    path as the caller passed it: text that is no path but an image's base64 is named as such."""
    try:
        status = path.stat()
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name, which no file has
        if isinstance(given, str) and (image_format := _base64_image_format(given)):
            raise _base64_error(given, image_format) from None
        if isinstance(error, OSError) and not is_missing(error):
            raise unreadable_error(path, error) from None
        raise missing_error(path, "file") from None
    shown = _shortened(path)
    if stat.S_ISDIR(status.st_mode):
        raise ImageLoadError(f"'{shown}' is a directory, not an image file. Pass the path of one image inside it.")
    if not stat.S_ISREG(status.st_mode):  # a pipe (<(...), mkfifo), a device, a socket: its size says nothing
        raise ImageLoadError(
            f"'{shown}' is not a regular file (it is a pipe, such as <(...), or a device): write the image to a "
            "file first (e.g. ... > image.png) and pass that file's path."
        )
    if status.st_size == 0:
        raise ImageLoadError(f"'{shown}' is empty (0 bytes). Re-save or re-download the image.")
    try:
        return open(path, "rb")
    except OSError as error:
        raise unreadable_error(path, error) from None


# What pathlib's exists() takes for "nothing there"; any other OSError (permission denied, an I/O
# error) means that something may be there but cannot be seen, which needs another remedy.
_MISSING_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP}


def is_missing(error: OSError) -> bool:
    """Whether ``error`` (from stat or open) means that nothing is at the path, not that it cannot be seen."""
    return error.errno in _MISSING_ERRNOS


def missing_error(path, what: str = "file") -> ImageLoadError:
    """The ImageLoadError for a ``path`` where nothing can be read (``what``: "file", "file or folder"):
    a loop of symbolic links, a symbolic link to nothing, or no such name, each with its remedy."""
    shown = _shortened(path)
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return ImageLoadError(f"'{shown}' leads through a loop of symbolic links (a link that points back to "
                                  "itself, directly or through other links; ls -l shows where each points). Point it "
                                  "at a file.")
    except ValueError:  # a NUL in the name
        pass
    if os.path.islink(path):
        return ImageLoadError(f"'{shown}' is a symbolic link to '{_shortened(os.readlink(path))}', where there is "
                              "nothing. Point it at a file, or give the file itself.")
    other_form = _in_another_unicode_form(path)
    if other_form is not None:
        return ImageLoadError(
            f"No {what} at '{shown}', but its folder holds {ascii(other_form.name)}: the same letters, written in another "
            "Unicode form (macOS writes accents as separate marks, NFD). Pass that name as it is (e.g. from a folder "
            "or glob pattern), or rename the file."
        )
    return ImageLoadError(
        f"No {what} at '{shown}'. Check the spelling; relative paths start from the current "
        f"directory, which is '{Path.cwd()}'."
    )


def _in_another_unicode_form(path) -> Path | None:
    """The file in ``path``'s folder whose name is ``path``'s name in another Unicode normalization form (NFC
    "café" is 4 code points, NFD "café" 5: a folder copied from macOS keeps NFD names), or None."""
    path = Path(path)
    name = unicodedata.normalize("NFC", path.name)
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if entry.name != path.name and unicodedata.normalize("NFC", entry.name) == name:
                    return path.parent / entry.name
    except (OSError, ValueError):
        pass
    return None


def unreadable_error(path, error: OSError, folder: bool = False) -> ImageLoadError:
    """The ImageLoadError for a file (or, with ``folder``, a folder to list) that the system would not
    let us read: it names the path and the system's reason, and says what to check. A path too long
    for the system to look up is no path at all: it says so."""
    shown, reason = _shortened(path), error.strerror or type(error).__name__
    if error.errno == errno.ENAMETOOLONG:
        return ImageLoadError(
            f"'{shown}' is too long to be a path ({len(str(path)):,} characters; a file or folder name has at most "
            f"255 bytes, a whole path {_LONGEST_PATH:,}). Pass the path of an image file."
        )
    if folder:
        return ImageLoadError(f"Could not list the folder '{shown}' ({reason}), so none of its files were run. Check "
                              "that you may read and enter it and every folder above it (ls -ld), then run again.")
    return ImageLoadError(f"Could not read '{shown}' ({reason}). Check that you may read it and enter every folder "
                          "above it (ls -ld), then run again.")


_LONGEST_PATH = 4096  # bytes in the longest path Linux opens (PATH_MAX)


def _from_given_bytes(data: bytes, page: int | None = None, *, max_pixels: int | None = None) -> Image.Image:
    """Decode bytes the caller passed (page ``page`` of them, if given); bytes that are no image but the
    text of a path (``b"photo.png"``, a name from ``os.listdir(b".")``) are named as such."""
    source = _given_bytes(data)
    try:
        return decode_bytes(data, source, page, max_pixels=max_pixels)
    except ImageLoadError:
        path = _path_in(data)
        if path is None:
            raise
        shown = repr(_shortened(path))
        raise ImageLoadError(
            f"Could not read {source} as an image: they are the text {shown}, a file path (or URL) given as "
            f"bytes. Pass it as a str or a pathlib.Path instead ({shown}, not {_shortened(repr(data))}; "
            "bytes.decode() turns bytes into a str)."
        ) from None


def _given_bytes(data: bytes) -> str:
    """How messages name bytes the caller passed ("the 1234 bytes you passed"); ImageLoadError if there
    are none."""
    if not data:
        raise ImageLoadError(
            "The bytes you passed are empty (0 bytes), so there is no image to read. Pass the image file's "
            "content (e.g. Path(\"photo.png\").read_bytes()); if the bytes came from an upload or a download, "
            "check that it arrived whole."
        )
    return f"the {len(data)} bytes you passed"


def _path_in(data: bytes) -> str | None:
    """The path (or URL) that ``data`` spells, or None: short printable text on one line, not a format
    that ``_unsupported_format`` names (an SVG drawing has "/" too), that names an existing file, or has a
    folder separator or ends in a file extension (".png")."""
    if len(data) > _LONGEST_PATH or _unsupported_format(data):
        return None
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        return None
    if not text or not text.isprintable():
        return None
    looks_like_path = "/" in text or "\\" in text or re.search(r"\.[A-Za-z][A-Za-z0-9]{1,4}$", text)
    return text if looks_like_path or os.path.exists(text) else None


def decode_bytes(data: bytes, source: str, page: int | None = None, *, max_pixels: int | None = None) -> Image.Image:
    """Decode an image held in memory (bytes passed in, an upload, or a finished download) as
    ``load_image`` does; ``source`` names the data in error messages ("the uploaded file 'a.png'")."""
    if not data:
        raise ImageLoadError(f"{source} is empty (0 bytes); there is no image to read.")
    return _decode(lambda: _open(io.BytesIO(data)), source, page, head=lambda: data[:_SNIFF_BYTES],
                   max_pixels=max_pixels)


def _decode(open_image, source: str, page: int | None = None, *, upright: bool = True, head=bytes,
            max_pixels: int | None = None) -> Image.Image:
    """Call ``open_image()``, turn to page ``page`` if given, read all pixels, and normalise the result
    to RGB, upright unless ``upright`` is False (the page's own EXIF orientation: Pillow reloads it on
    each page). ``head()`` gives the data's first bytes (none by default), to name a format Pillow
    cannot read. An image of more than ``max_pixels`` pixels is refused before its pixels are read."""
    with _decoding(source if page is None else f"page {page} of {source}", head):
        image = open_image()
        if page is not None:
            _turn_to(image, page, source)
        if max_pixels is not None and image.width * image.height > max_pixels:
            shown = source if page is None else f"page {page} of {source}"
            raise ImageLoadError(
                f"Refusing to decode {shown}: it has {image.width:,} x {image.height:,} = "
                f"{image.width * image.height:,} pixels, more than max_pixels={max_pixels:,} allows. "
                f"{_SMALLER_IMAGE}, or raise max_pixels if you trust it."
            )
        _load(image)
        if not image.width or not image.height:  # Image.new("RGB", (0, 0)), a numpy array of shape (0, 5, 3)
            raise ImageLoadError(f"{source[:1].upper()}{source[1:]} is empty ({image.width}x{image.height} pixels): "
                                 "there is no picture to look at. Check how it was made.")
        image = _upright(image) if upright else image
        try:
            return _to_rgb_on_white(image)
        except ValueError as error:  # a mode Pillow has no conversion for ("La": luminance, premultiplied alpha)
            raise ImageLoadError(
                f"Could not convert {source} to RGB: Pillow cannot convert images of mode {image.mode!r} "
                f"({error}). Convert it to RGB, RGBA, L or LA yourself first (try image.convert(\"RGBA\") or "
                "image.convert(\"LA\")) and pass that."
            ) from None


def _turn_to(image: Image.Image, page: int, source: str) -> None:
    """Make page ``page`` (from 1) of ``image`` the one that is read. Pillow checks the pixel count of
    the first page only, when it opens the file: a later page is checked here, before it is decoded."""
    frames = _page_frames(image)
    pages = len(frames)
    if page > pages:
        raise ImageLoadError(f"{source} has {pages} page{'s' * (pages != 1)}, so there is no page {page}. Ask for a "
                             "page from 1 to that count; if the file was replaced since its pages were counted, run again.")
    image.seek(frames[page - 1])
    check_pixel_count(*image.size, f"page {page} of {source}")


@contextlib.contextmanager
def _decoding(source: str, head=bytes):
    """Turn what Pillow raises while it reads ``source`` into an ImageLoadError that names it; data
    Pillow cannot identify is named by its first bytes, ``head()``, if it is a known format Pillow
    cannot read (`_unsupported_format`).

    Pillow refuses to open an image of more than twice MAX_IMAGE_PIXELS (DecompressionBombError), and
    only warns between once and twice that: the same limit as ``Image.open`` + the processor, the
    original pipeline, so a 108-megapixel phone photo loads (``_open`` and ``_load`` leave the warning out).
    """
    try:
        yield
    except ImageLoadError:  # ours, with its advice; a ValueError, which would be taken for Pillow's below
        raise
    except Image.DecompressionBombError as error:
        raise _too_many_pixels_error(source, _pixel_count_in(str(error))) from None
    except _DECODE_ERRORS as error:
        unsupported = _unsupported_format(head()) if isinstance(error, UnidentifiedImageError) else ""
        if unsupported:
            raise ImageLoadError(f"Could not read {source}: {unsupported}") from None
        detail = re.sub(r" <_io\.\w+ [^>]*>", "", str(error))  # Pillow names its file object (the source is named)
        raise ImageLoadError(
            f"Could not read {source} as an image ({type(error).__name__}: {detail}). The data may be "
            "corrupt, truncated or not an image at all; open it in an image viewer, or re-save it as PNG/JPEG."
        ) from None


# Pillow warns (DecompressionBombWarning) about an image of more than MAX_IMAGE_PIXELS when it opens it,
# and some formats (TIFF) again when they start decoding it. load_image uses such an image, so the
# warning is silenced there, with warnings.catch_warnings. That swaps one list of filters shared by the
# whole process, and (before Python 3.14) two threads whose swaps overlap leave one's filter in place
# for good: the program's own Image.open would never warn again. So each swap holds this lock, around
# Image.open (which reads only the header: load_image reads a stream that cannot seek, which Pillow would
# read whole here, beforehand) and the decoding of an image above the limit (rare); threads decode other
# images in parallel.
_BOMB_WARNING_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_bomb_warning():
    """Leave Pillow's DecompressionBombWarning out, one thread at a time (_BOMB_WARNING_LOCK)."""
    with _BOMB_WARNING_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _open(file) -> Image.Image:
    """``Image.open(file)``, without the warning for an image above once MAX_IMAGE_PIXELS."""
    with _without_bomb_warning():
        return Image.open(file)


def _load(image: Image.Image) -> None:
    """``image.load()``: read all pixels; for an image above once MAX_IMAGE_PIXELS, without the
    warning that some formats give again here (TIFF)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or image.width * image.height <= limit:
        image.load()
        return
    with _without_bomb_warning():
        image.load()


_SNIFF_BYTES = 4096  # enough for an XML declaration, comments and a DOCTYPE before an SVG's <svg tag
# ISO base media (ftyp) brands of HEIC/HEIF stills and sequences; AVIF shares the container and "mif1",
# but Pillow 13 reads it, so a file whose brands include avif/avis is never called HEIC.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}


def _unsupported_format(head: bytes) -> str:
    """What to do with data whose first bytes ``head`` show a format Pillow cannot read (SVG, HEIC/HEIF,
    PDF) or a web page (HTML, whatever Content-Type its server sent), as sentences; "" for anything else
    (corrupt data keeps the general advice)."""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # a UTF-8 byte order mark, then blanks
    if text.startswith((b"<!doctype html", b"<html")):  # before SVG: a web page may hold an <svg> drawing
        return ("it is a web page (HTML), not an image: probably the page that shows the image. Open it in a "
                "browser, right-click the image and copy the image address (or save the image) instead.")
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!--", b"<!doctype")) and b"<svg" in text):
        return ("it is an SVG file (a vector drawing). SVG is not supported: convert it to PNG (export it from "
                "Inkscape or a browser, or use cairosvg) and load that.")
    if _heif_brands(head):
        return ("it is a HEIC/HEIF image (the format of iPhone photos). HEIC/HEIF is not supported by Pillow: "
                "convert it to JPEG or PNG, or install pillow-heif and register it (pip install pillow-heif, then "
                "import pillow_heif; pillow_heif.register_heif_opener()) before loading it.")
    if head.startswith(PDF_SIGNATURE):
        return ("it is a PDF, a document, not an image. Render its pages as images first (with pypdfium2), or "
                "run phi-helpers predict --image on the file: it answers each page.")
    return ""


def _heif_brands(head: bytes) -> bool:
    """Whether ``head`` starts with an ISO base media ``ftyp`` box whose major brand is HEIC/HEIF's and
    none of whose brands is AVIF's."""
    if head[4:8] != b"ftyp":
        return False
    size = int.from_bytes(head[:4], "big")
    brands = {head[at : at + 4] for at in range(16, min(size, len(head)) - 3, 4)} | {head[8:12]}
    return head[8:12] in HEIF_BRANDS and not brands & AVIF_BRANDS


def _first_bytes(file) -> bytes:
    """The first bytes of an open binary file (Pillow reads it from the start too), or b"" if it cannot
    be read again."""
    try:
        file.seek(0)
        head = file.read(_SNIFF_BYTES)
    except (OSError, ValueError, AttributeError):  # not seekable, closed
        return b""
    return head if isinstance(head, bytes) else b""


def check_pixel_count(width: int, height: int, source: str, remedy: str = _SMALLER_IMAGE) -> None:
    """Raise ImageLoadError if a ``width`` x ``height`` image has more pixels than ``load_image``
    accepts: more than Pillow opens, twice ``PIL.Image.MAX_IMAGE_PIXELS`` (``None`` there means no
    limit). Used before producing pixels another way, e.g. before rendering a PDF page or decoding a
    later page of a TIFF. ``remedy`` says what the user can do about it (a sentence without its full
    stop), before the advice for Python code."""
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise _too_many_pixels_error(source, f"{width:,} x {height:,} = {width * height:,} pixels", remedy)


def pixel_limit() -> int | None:
    """The most pixels an image may have: Pillow's own refusal threshold, 2 x ``PIL.Image.MAX_IMAGE_PIXELS``
    (read at each call: a program may raise it), None for no limit. Between once and twice that, Pillow
    only warns, and the original pipeline (``Image.open`` + processor) goes on."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _pixel_count_in(message: str) -> str:
    """"N pixels" from the message of Pillow's DecompressionBombError ("Image size (N pixels) exceeds
    ..."), the whole message if it is worded otherwise."""
    found = re.search(r"\((\d+) pixels\)", message)
    return f"{int(found[1]):,} pixels" if found else message


def _too_many_pixels_error(source: str, detail: str, remedy: str = _SMALLER_IMAGE) -> ImageLoadError:
    """The error for an image over the pixel limit: ``remedy`` works from the command line too; raising
    the limit is only possible in Python code."""
    return ImageLoadError(
        f"Refusing to decode {source}: it is a very large image ({detail}, more than Pillow opens: "
        f"2 x PIL.Image.MAX_IMAGE_PIXELS = {pixel_limit() or 0:,}; decompression-bomb attacks look like this). "
        f"{remedy}. In your own Python code, if you trust this file, you can raise PIL.Image.MAX_IMAGE_PIXELS first."
    )


ORIENTATION = 0x0112  # the EXIF tag that says how to turn the stored pixels for display
_EXIF_IFD, _PIXEL_X, _PIXEL_Y = 0x8769, 0xA002, 0xA003  # the stored width and height, in the Exif IFD
_QUARTER_TURNS = {5, 6, 7, 8}  # orientations that swap width and height


def _turned_already(image: Image.Image) -> bool:
    """Whether a PIL image the caller passed is upright already although its EXIF orientation tag asks for
    a quarter turn: its shape is nearer to the stored shape turned (the EXIF's PixelXDimension x
    PixelYDimension, swapped) than to the stored shape. Pillow copies the tag into ``rotate`` and
    ``transpose`` results; a converted or resized image keeps the stored shape and is turned.
    Without the recorded size (or for a square one) the tag is followed."""
    try:
        exif = image.getexif()
        if exif.get(ORIENTATION) not in _QUARTER_TURNS:
            return False
        stored = exif.get_ifd(_EXIF_IFD)
        width, height = int(stored.get(_PIXEL_X, 0)), int(stored.get(_PIXEL_Y, 0))
    except Exception:  # noqa: BLE001  (broken EXIF data: follow the tag, as _upright does)
        return False
    if width <= 0 or height <= 0 or width == height or image.width == 0 or image.height == 0:
        return False
    shape, stored_shape = image.width / image.height, width / height
    return abs(math.log(shape * stored_shape)) < abs(math.log(shape / stored_shape))


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are often stored sideways with such a tag)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF data should not stop an otherwise fine image
        return image


def _to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Return an RGB copy of ``image``; transparent parts are composited onto a white background, and
    16-bit, 32-bit and floating-point greyscale is scaled to 8 bits (``_to_8_bit``)."""
    if image.mode in WIDE_GREYSCALE:
        return _to_8_bit(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


WIDE_GREYSCALE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow's modes of more than 8 bits per pixel


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits as 8-bit greyscale ("L"), its values scaled, not clipped.

    Pillow's ``convert`` clips them: a 16-bit scan (0-65535) would come out almost all white. 16-bit
    values are divided by 257 (65535 -> 255); 32-bit integers above 255 too, as 16-bit data (scaled from
    their range if they exceed it); floating point in 0..1 is multiplied by 255, other floats are scaled
    from the range of their finite values (NaN and -inf become black, +inf white). A transparent value
    (PNG's ``transparency``) becomes white, as transparent pixels do in ``load_image``.
    """
    raw = numpy.asarray(image)
    high = int(raw.max()) if raw.size and image.mode == "I" else 0
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < high <= 65535 and raw.min() >= 0):
        eight = ((raw.astype(numpy.uint32) + 128) // 257).astype(numpy.uint8)  # round(v / 257), in integers
    else:
        values = raw.astype(numpy.float32)
        finite = numpy.isfinite(values)
        low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
        if image.mode == "F" and 0 <= low and high <= 1:
            values *= 255
        elif low < 0 or high > 255:
            values = (values - low) * (255 / (high - low)) if high > low else numpy.zeros_like(values)
        values = numpy.where(finite, values, numpy.where(values > 0, 255, 0))
        eight = numpy.clip(numpy.rint(values), 0, 255).astype(numpy.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        eight[raw == transparent] = 255
    return Image.fromarray(eight)


def shown_url(url: str) -> str:
    """``url`` as messages and records may show it: a user name and password in it
    (``https://user:secret@host/a.png``) become ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "http://[::1/a.png" (an IPv6 host without its "]"): the user part read by hand
        return re.sub(r"^([^:/?#]+://)[^/?#]*@", r"\1***@", url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _download(url: str, *, timeout: float, max_bytes: int, max_seconds: float) -> bytes:
    """Fetch ``url`` and return its body, stopping as soon as it grows beyond ``max_bytes`` or the
    download has taken ``max_seconds`` (headers included)."""
    deadline, name = time.monotonic() + max_seconds, _shortened(shown_url(url))  # without a password
    try:
        with _get_within(url, name, timeout, deadline, max_seconds) as response:
            _check_response(response, name, max_bytes)
            return _read_capped(response, name, max_bytes, deadline, max_seconds)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        if _is_timeout(error):
            raise _timeout_error(name, timeout) from None
        raise ImageLoadError(
            f"Could not download {name} ({type(error).__name__}: {error}). Check the address and your "
            "internet connection, or download the image yourself and pass its path."
        ) from None


def _get_within(url: str, name: str, timeout: float, deadline: float, max_seconds: float) -> requests.Response:
    """``requests.get(url, stream=True)``: connect, send, read the status line and the headers, given
    up at ``deadline`` even if the server keeps trickling header bytes (the error names the URL as ``name``,
    without a password).

    The request runs in a daemon thread; if the deadline passes first, the caller gets the timeout
    and the abandoned request ends by itself (its response, if one ever comes, is closed).
    """
    outcome = {}  # "response" or "error", and "abandoned" once the caller has given up
    lock = threading.Lock()  # the caller takes the response or abandons it, never both

    def fetch():
        try:
            response = requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": _USER_AGENT})
        except BaseException as error:  # noqa: BLE001  (handed to the caller)
            outcome["error"] = error
            return
        with lock:
            outcome["response"] = response
            if "abandoned" in outcome:
                response.close()

    thread = threading.Thread(target=fetch, name=f"phi_helpers download {shown_url(url)}", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    with lock:
        if "response" not in outcome and "error" not in outcome:
            outcome["abandoned"] = True
            raise _deadline_error(name, max_seconds, 0)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def _is_timeout(error: Exception) -> bool:
    """True for timeouts, including a read timeout in the middle of the body, which requests reports
    as a ConnectionError wrapping urllib3's ReadTimeoutError."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return True
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in error.args)


def _check_response(response: requests.Response, url: str, max_bytes: int) -> None:
    """Refuse HTTP errors and bodies announced as too large before reading them."""
    if response.status_code >= 400:
        raise ImageLoadError(
            f"Downloading {url} failed: HTTP {response.status_code} {response.reason or ''}".rstrip()
            + ". Check that the address is right and the image is public (open it in a browser)."
        )
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit() and int(announced) > max_bytes:
        raise _too_large_error(url, max_bytes, f"the server says it is {int(announced):,} bytes")
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type.startswith(("text/", "application/json")):
        raise ImageLoadError(
            f"{url} returned {content_type}, not an image: this is probably a web page that shows the "
            "image. Right-click the image and copy the image address instead."
        )


def _read_capped(response: requests.Response, url: str, max_bytes: int, deadline: float, max_seconds: float) -> bytes:
    """Read a streamed body piece by piece, refusing it once more than ``max_bytes`` have arrived or
    the clock passes ``deadline``.

    ``read1`` returns what one read of the socket brings (each read waits at most ``timeout``), so
    the deadline is checked however slowly the bytes trickle in; ``iter_content`` would wait for a
    whole chunk.
    """
    body = bytearray()
    while chunk := response.raw.read1(_CHUNK_SIZE, decode_content=True):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large_error(url, max_bytes, f"more than {max_bytes:,} bytes arrived")
        if time.monotonic() > deadline:
            raise _deadline_error(url, max_seconds, len(body))
    return bytes(body)


def _deadline_error(url: str, max_seconds: float, received: int) -> ImageDownloadTimeout:
    return ImageDownloadTimeout(
        f"Downloading {url} took longer than max_seconds={max_seconds} ({received:,} bytes of the image arrived "
        "so far). The server is too slow; download the image yourself and pass its path, or pass a larger max_seconds."
    )


def _too_large_error(url: str, max_bytes: int, detail: str) -> ImageLoadError:
    return ImageLoadError(
        f"{url} is too large ({detail}; the limit is max_bytes={max_bytes:,}). Check that the link "
        "points to an image, or pass a larger max_bytes if you really want this file."
    )


def _timeout_error(url: str, timeout: float) -> ImageDownloadTimeout:
    return ImageDownloadTimeout(
        f"{url} did not answer within {timeout} s. Try again, pass a larger timeout=..., or download "
        "the image yourself and pass its path."
    )


__all__ = ["load_image", "load_page", "count_pages", "check_pixel_count", "pixel_limit"]
