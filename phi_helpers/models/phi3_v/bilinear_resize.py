"""PIL's bilinear resize, byte for byte, with its work cut into strips that run on several threads.

PIL resizes in two separable passes and rounds to uint8 after each one:

    horizontal pass: each output row is made from one input row      (only the width changes)
    vertical pass:   each output column is made from one input column (only the height changes)

The weights of a pass depend only on the input and output sizes. So a pass can be cut into strips
across the lines it reads (row strips for the horizontal pass, column strips for the vertical one),
and each strip resized on its own gives the same bytes as the whole image. PIL releases the GIL
while it crops, resamples and pastes, so the strips run in parallel threads.

When the height scale is short in binary (3.0 for a 4032x3024 photo resized to 1344x1008, 1.5, 0.75),
a cheaper cut exists: bands of output rows, each resized by one PIL call from its own band of source
rows (``box=``), both passes at once and with no intermediate image (`exact_row_bands`).

The one choice that changes the bytes is the order of the two passes. Pillow 13 runs the vertical
pass first when the height shrinks by more than twice as many pixels as the width
(``ImagingResampleInner`` in Pillow's ``src/libImaging/Resample.c``). `pass_order` encodes that rule;
with any other Pillow major version it returns None and `resize_bilinear` calls PIL's own resize
(as it does for modes other than L and RGB).
``tests/test_image_processing.py`` checks the equality over sizes on both sides of the rule, and
``./run.sh test-latest`` runs it against the newest Pillow.
"""

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL
from PIL import Image

BILINEAR = Image.Resampling.BILINEAR
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
SPLIT_MODES = ("L", "RGB")  # resized as they are (PIL resizes RGBA/LA premultiplied: one pass only)
MIN_PIXELS_PER_THREAD = 750_000  # input pixels; below it a thread costs more than it saves (1000x700: one)


def pass_order(in_size: tuple[int, int], out_size: tuple[int, int]) -> str | None:
    """``"horizontal first"`` or ``"vertical first"``: the order of Pillow's passes when it resizes an
    image of ``in_size`` to ``out_size`` (both (width, height)); None for a Pillow whose rule we don't know."""
    if PILLOW_MAJOR != 13:
        return None
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    height_shrink = in_h - out_h
    vertical_first = height_shrink > 0 and height_shrink > 2 * (in_w - out_w)
    return "vertical first" if vertical_first else "horizontal first"


def resize_bilinear(
    image: Image.Image,
    size: tuple[int, int],
    *,
    as_transposed: bool = False,
    threads: int = 1,
    write: Callable[[np.ndarray, int, int], None] | None = None,
) -> Image.Image | None:
    """``image.resize(size, Image.BILINEAR)``, the same bytes, on up to ``threads`` threads.

    With ``as_transposed``, the bytes of ``image.transpose(TRANSPOSE).resize((h, w)).transpose(TRANSPOSE)``
    for ``size`` = (w, h), which is how the processor resizes portrait images, without the two copies.

    With ``write``, the output is handed over in strips instead of assembled into an image, and the
    function returns None: ``write(pixels, left, top)`` receives each strip as an (h, w, bands) uint8
    array and its place in the output, on the thread that made it. (A ``size`` equal to the image's
    hands over the image itself, in strips.)
    """
    image.load()  # a lazily opened file is decoded here, once, not by several threads at a time
    flip = (lambda pair: pair[::-1]) if as_transposed else (lambda pair: pair)
    order = pass_order(flip(image.size), flip(size)) if image.mode in SPLIT_MODES else None
    if order is None:  # PIL's own resize, on one thread
        if as_transposed:
            transposed = image.transpose(Image.Transpose.TRANSPOSE).resize(flip(size), BILINEAR)
            resized = transposed.transpose(Image.Transpose.TRANSPOSE)
        else:
            resized = image.resize(size, BILINEAR) if size != image.size else image
        return write(np.asarray(resized), 0, 0) if write else resized
    # PIL's horizontal pass of the transposed image is a vertical pass of this one, and vice versa.
    horizontal_first = (order == "horizontal first") != as_transposed
    threads = max(1, min(threads, image.width * image.height // MIN_PIXELS_PER_THREAD))
    bands = exact_row_bands(image.size, size, horizontal_first, threads) if threads > 1 else None
    if bands is not None:
        return _by_bands(image, size, bands, threads, write)
    first = (size[0], image.height) if horizontal_first else (image.width, size[1])
    return _one_pass(_one_pass(image, first, threads), size, threads, write)


def exact_row_bands(
    in_size: tuple[int, int], out_size: tuple[int, int], horizontal_first: bool, count: int
) -> list[tuple[int, int]] | None:
    """At most ``count`` bands ``(top, bottom)`` of output rows that PIL can resize one at a time, each
    from its own source rows, ``image.resize((out_w, bottom - top), box=(0, top * s, in_w, bottom * s))``
    with s = in_h / out_h, and give the rows of the whole resize, in the given pass order; None where
    that is not certain.

    PIL weighs the source rows of output row y by their distance to its centre: ``box_top + (y + 0.5) * s``
    in a band, ``(top + y + 0.5) * s`` in the whole image. The two are the same number, and so give the
    same weights, when every such product and sum is exact in floating point: when s has a short binary
    expansion and ``top * s`` is a whole number. PIL also picks the order of its passes from the
    band's height, so each band must get the order of the whole resize.
    """
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    if in_h == out_h:
        return None  # nothing to resize vertically, and a box would make PIL add a pass that copies
    step = (in_h / out_h).as_integer_ratio()[1]  # s = m / step, step a power of two: top * s is whole
    if 4 * (in_h + 1) * step >= 2**53:  # a centre or a distance would be rounded
        return None
    count = min(count, out_h // step)
    if count < 2:
        return None
    cuts = [out_h * i // count // step * step for i in range(count)] + [out_h]
    bands = list(zip(cuts, cuts[1:]))
    orders = {pass_order(in_size, (out_w, bottom - top)) for top, bottom in bands}
    return bands if orders == {"horizontal first" if horizontal_first else "vertical first"} else None


def _by_bands(image: Image.Image, size: tuple[int, int], bands, threads: int, write=None) -> Image.Image | None:
    """Resize band by band (`exact_row_bands`) on ``threads`` threads; see `resize_bilinear` for ``write``."""
    out = None if write else Image.new(image.mode, size, None)  # not initialised: every band is pasted
    scale = image.height / size[1]

    def band(top: int, bottom: int) -> None:
        part = image.resize((size[0], bottom - top), BILINEAR, box=(0, top * scale, image.width, bottom * scale))
        if write:
            write(np.asarray(part), 0, top)
        else:
            out.paste(part, (0, top))

    _on_threads(threads, band, *zip(*bands))
    return out


def _one_pass(image: Image.Image, size: tuple[int, int], threads: int, write=None) -> Image.Image | None:
    """Resize along the one axis whose length differs between ``image.size`` and ``size`` (PIL runs a
    single pass), cut into ``threads`` strips across that axis; see `resize_bilinear` for ``write``."""
    if write is None and (image.size == size or threads == 1):
        return image if image.size == size else image.resize(size, BILINEAR)
    horizontal = image.height == size[1]  # the width changes (or nothing does): cut into row strips
    across = image.height if horizontal else image.width
    threads = min(threads, across)  # no empty strips
    cuts = [across * i // threads for i in range(threads + 1)]
    out = None if write else Image.new(image.mode, size, None)  # not initialised: every pixel is pasted
    pixels = np.asarray(image) if image.size == size else None  # nothing to resize: hand over rows

    def strip(start: int, end: int) -> None:
        if pixels is not None:
            return write(pixels[start:end], 0, start)
        if horizontal:
            box, part_size, at = (0, start, image.width, end), (size[0], end - start), (0, start)
        else:
            box, part_size, at = (start, 0, end, image.height), (end - start, size[1]), (start, 0)
        part = image if (start, end) == (0, across) else crop(image, box)
        if part.size != part_size:
            part = part.resize(part_size, BILINEAR)
        if write:
            write(np.asarray(part), *at)
        else:
            out.paste(part, at)

    if threads == 1:
        strip(0, across)
    else:
        _on_threads(threads, strip, cuts[:-1], cuts[1:])
    return out


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``image.crop(box)`` for a whole-number ``box`` inside ``image``, without Pillow's decompression-bomb
    check: the same pixels, from the same C function (``Image.crop`` is this call after its checks).

    ``Image.crop`` checks the box against ``PIL.Image.MAX_IMAGE_PIXELS`` as if the strip were a file being
    opened: it warns above that and raises DecompressionBombError above twice that, which made a large
    image already in memory fail here, in a worker thread, where PIL's plain ``resize`` (the original)
    succeeds. The check guards decoding; these pixels are decoded already. (Switching the global limit
    off for the call is no way out: other threads read it.) Only this module's Pillow 13 path calls this.
    """
    return image._new(image.im.crop(box))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _on_threads(threads: int, work, *arguments) -> None:
    """``work`` called with each tuple of ``arguments`` on the process's resize threads; the first error
    is raised here. The calls are queued while the pool cannot be replaced: another thread that needs a
    larger pool meanwhile shuts this one down, and a shut-down pool still runs what was queued but
    takes nothing more."""
    with _POOL_LOCK:
        calls = [_pool(threads).submit(work, *one) for one in zip(*arguments)]
    for call in calls:
        call.result()


def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's resize threads (call with ``_POOL_LOCK`` held), kept from call to call: threads
    started afresh for every image made the 4032x3024 case 15% slower (their first allocations fault in
    fresh memory pages). Grows when more threads are asked for; a forked child process starts without it."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < threads:
        if _POOL is not None:
            _POOL.shutdown(wait=False)  # its idle threads end; work already queued still runs
        _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="phi_helpers-resize"), threads
    return _POOL


def _forget_pool_in_child() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()  # the parent's threads do not exist here


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_pool_in_child)


__all__ = ["exact_row_bands", "pass_order", "resize_bilinear"]
