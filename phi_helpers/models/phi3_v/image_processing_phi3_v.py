"""Image processor of Phi-3-vision / Phi-3.5-vision: the "HD transform" (spec §4).

One image becomes ``num_crops + 1`` tiles of 336x336 pixels:

    input image ──resize (keep ratio, width = s·336)──pad height to a multiple of 336 with white──▶ HD canvas
    HD canvas ──bicubic squash to 336x336──▶ global tile            (tile 0)
    HD canvas ──cut into h_c x w_c tiles, row by row──▶ local tiles (tiles 1 … h_c·w_c)
    zero tiles up to num_crops + 1                                  (ignored by the model)

Portrait images are processed as if transposed to landscape and back, so their white padding ends up
left and right. Every number here reproduces the original processor exactly: PIL bilinear resize (run
in strips on several threads, the same bytes: `bilinear_resize`), white padding, uint8 / 255,
(x - mean) / std in float32 (in place, on the resize threads), torch bicubic interpolate.
"""

import math

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from ...errors import ImageAspectRatioError, ImageLoadError, InvalidArgumentError, check_whole_number
from .bilinear_resize import resize_bilinear

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's normalisation, as in the original
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TILE = 336  # CLIP ViT-L/14-336 input size; every tile and the global image are TILE x TILE
TOKENS_PER_TILE = 144  # 24x24 patches merged 2x2 -> 12x12
TOKENS_PER_ROW = 12  # one separator (sub_GN) after each row of 12 merged patches
CONTEXT_LENGTH = 131072  # max_position_embeddings of both checkpoints (spec §1.1): no image may take more


def check_num_crops(num_crops, context_length: int = CONTEXT_LENGTH) -> int:
    """Return ``num_crops`` if it is a whole number >= 1 whose costliest image fits ``context_length``
    tokens; else raise InvalidArgumentError (before any tile is allocated: each costs 1.3 MB).

    >>> check_num_crops(16)
    16
    """
    num_crops = check_whole_number(num_crops, "num_crops", minimum=1)  # a plain int, also from numpy or torch
    if max_image_tokens(num_crops) > context_length:
        raise InvalidArgumentError(
            f"num_crops={num_crops} is too many: one image could take {max_image_tokens(num_crops):,} tokens, "
            f"more than the model's context of {context_length:,}. Use at most "
            f"{largest_num_crops(context_length)} (the checkpoints use 4 or 16)."
        )
    return num_crops


def max_image_tokens(num_crops: int) -> int:
    """Tokens of the costliest image at ``num_crops``: a tall one cut into a column of ``num_crops``
    tiles, each adding a tile (144) and a row separator (12) to the global image's 144 + 12 + 1."""
    return num_image_tokens(num_crops * TILE, TILE)


def largest_num_crops(context_length: int) -> int:
    """The largest ``num_crops`` whose costliest image fits ``context_length`` tokens (839 for 131072)."""
    return (context_length - max_image_tokens(0)) // (TOKENS_PER_TILE + TOKENS_PER_ROW)


def hd_canvas_size(width: int, height: int, num_crops: int) -> tuple[int, int, int, int]:
    """Size arithmetic of the HD transform, without touching pixels.

    Returns ``(resized_w, resized_h, canvas_w, canvas_h)`` in the *landscape* frame (width >= height;
    portrait images are transposed before and after). The resized width is ``s·336`` with ``s`` the
    largest integer such that ``s · ceil(s / ratio) <= num_crops``; the canvas pads the height up to a
    multiple of 336.

    >>> hd_canvas_size(1200, 675, 16)
    (1680, 945, 1680, 1008)
    """
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"The image is empty ({width}x{height} pixels). Check the file or URL.")
    check_num_crops(num_crops)
    size = f"{width}x{height}"
    long_side, short_side = ("wide", "tall") if width >= height else ("tall", "wide")
    if width < height:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    resized_w = scale * TILE
    resized_h = int(resized_w / ratio)
    if resized_h == 0:
        raise ImageAspectRatioError(
            f"An image of {size} pixels (aspect ratio {ratio:.0f}:1) is too elongated: resized to "
            f"{resized_w} pixels {long_side} it would be 0 pixels {short_side}. Crop it into pieces, pad it to "
            f"a less extreme shape, or raise num_crops (now {num_crops})."
        )
    canvas_h = math.ceil(resized_h / TILE) * TILE
    return resized_w, resized_h, resized_w, canvas_h


def num_image_tokens(canvas_h: int, canvas_w: int) -> int:
    """Number of `<|image|>` positions for an HD canvas of canvas_h x canvas_w pixels (spec §4.6).

    (h_c·w_c + 1)·144 local+global tokens, 1 separator between them (glb_GN), and (h_c + 1)·12
    row separators (sub_GN), with h_c x w_c the tile grid.
    """
    h_c, w_c = canvas_h // TILE, canvas_w // TILE
    return (h_c * w_c + 1) * TOKENS_PER_TILE + 1 + (h_c + 1) * TOKENS_PER_ROW


ARRAY_LAYOUT = "a uint8 numpy array of shape (height, width) or (height, width, 3 or 4): greyscale, RGB or RGBA"
TENSOR_ADVICE = (
    "Convert a torch tensor to a PIL image first: Image.fromarray(tensor.permute(1, 2, 0).numpy()) for a uint8 "
    "(3, height, width) tensor; Image.fromarray((tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()) "
    "for a float one in 0..1 (torchvision's to_pil_image(tensor) does either, where torchvision is installed)."
)


def image_from_array(array: np.ndarray) -> Image.Image:
    """``Image.fromarray(array)`` for the arrays that the processor and ``phi_helpers.load_image`` accept
    (`ARRAY_LAYOUT`); ImageLoadError for any other, naming its shape and dtype and the conversion to use.

    ``Image.fromarray`` alone guesses from the shape: a channels-first (3, h, w) array, what torchvision
    users hold, fails with a bare TypeError, and one that happens to end in 3 or 4, e.g. (3, 100, 4), is
    silently read as a 3-pixel-high RGBA image. Such a shape could be either layout, so it is refused too.
    """
    problem = _array_problem(array)
    if problem:
        raise ImageLoadError(
            f"Cannot use a numpy array of shape {tuple(array.shape)} and dtype {array.dtype} as an image: "
            f"{problem} Images are accepted as {ARRAY_LAYOUT}."
        )
    return Image.fromarray(array)


_TO_UINT8 = {  # numpy dtype kind -> how to turn such an array into uint8 pixels
    "f": "(array * 255).round().astype(numpy.uint8) for values in 0..1, array.astype(numpy.uint8) for 0..255",
    "b": "array.astype(numpy.uint8) * 255 (True is white)",
    "i": "array.astype(numpy.uint8) for values in 0..255, (array // 257).astype(numpy.uint8) for 16-bit values",
}


def _array_problem(array: np.ndarray) -> str:
    """What is wrong with ``array`` as an image, with the fix (a sentence); "" if it is usable."""
    shape = array.shape
    if array.dtype != np.uint8:
        return f"convert it to uint8 first: {_TO_UINT8.get(array.dtype.kind, _TO_UINT8['i'])}."
    if array.ndim == 2:
        return ""
    if array.ndim == 4 and shape[0] == 1:
        return "this is a batch of one image: pass array[0]."
    if array.ndim == 4:
        return "this is a batch of images: pass them as a list, list(array)."
    if array.ndim != 3:
        return f"an image has 2 or 3 dimensions, not {array.ndim}."
    channels_first = shape[0] in (1, 3, 4)
    if channels_first and shape[2] in (3, 4):
        return (f"it may be channels-first ({shape[0]} channels) or {shape[0]} pixels high. Channels-first: "
                f"use {'array[0]' if shape[0] == 1 else 'array.transpose(1, 2, 0)'}; an image that small: pass "
                "Image.fromarray(array).")
    if channels_first:
        fix = "array[0] (greyscale)" if shape[0] == 1 else "array.transpose(1, 2, 0)"
        return f"it looks channels-first ({shape[0]} channel{'s' * (shape[0] > 1)} first): use {fix}."
    if shape[2] == 1:
        return "it has one channel on the last axis: use array[..., 0] (greyscale)."
    if shape[2] not in (3, 4):
        return f"the last axis holds {shape[2]} values per pixel, not 3 (RGB) or 4 (RGBA)."
    return ""


def _to_pil(image) -> Image.Image:
    """``image`` as a PIL image: a PIL image itself, or an array that `image_from_array` accepts."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return image_from_array(image)
    if isinstance(image, torch.Tensor):
        raise ImageLoadError(f"Expected a PIL image or a numpy array, got a torch Tensor of shape "
                             f"{tuple(image.shape)}. {TENSOR_ADVICE}")
    raise ImageLoadError(
        f"Expected a PIL image (or {ARRAY_LAYOUT}), got {type(image).__name__}. "
        "Use phi_helpers.load_image(...) to read paths, URLs and bytes."
    )


def check_not_closed(image: Image.Image, source: str) -> None:
    """ImageLoadError for a PIL image whose pixels can no longer be read.

    ``Image.open`` reads only the header: the pixels are read from the file when they are first used
    (``image.tile`` lists the parts still to read, from ``image.fp``). An image returned from inside
    ``with Image.open(path) as image:`` has lost that file (``fp`` is None); ``image.close()`` also frees
    pixels already read (``image.im`` then raises). An image loaded before its file was closed is fine.
    """
    if getattr(image, "tile", None):  # pixels still in the file
        file = getattr(image, "fp", None)
        if file is None or getattr(file, "closed", False) is True:
            raise ImageLoadError(
                f"{source} cannot be read: its file was already closed (the `with Image.open(...) "
                "as im:` block ended, or im.close() was called) before Pillow read its pixels, which it does only "
                "when they are first used. Call im.load() or im.copy() inside the with block (before closing the "
                "image), or pass the path instead."
            )
        return
    try:
        image.im  # noqa: B018  (Image.close() leaves an error here in place of the pixels)
    except ValueError:
        raise ImageLoadError(
            f"{source} was closed (im.close() frees its pixels), so there is nothing left to read. "
            "Pass it before you close it, or pass im.copy() or the path instead."
        ) from None


def to_rgb(image, name: str | None = None) -> Image.Image:
    """``image`` as a decoded RGB PIL image; the original converts every image with ``.convert("RGB")``,
    which is a plain copy for an image that is RGB already, so only other modes are converted.

    ``name`` starts the error message about an image among several ("Image 2 of 3", "Prompt 2 of 2,
    image 1 of 1"); a lone image (None) is "Image 1", and an error about its type is not prefixed.
    """
    pil = checked_image(image, name)
    name = name or "Image 1"
    try:
        pil.load()  # decode a lazily opened file now, so a broken file fails here with a clear error
        return pil if pil.mode == "RGB" else pil.convert("RGB")
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"{name} could not be decoded ({error}). Is the file complete?") from error


def checked_image(image, name: str | None = None) -> Image.Image:
    """``image`` as a PIL image that is not closed, not yet decoded (its size is known from the file's header);
    errors named as in `to_rgb`."""
    try:
        pil = _to_pil(image)
    except ImageLoadError as error:
        if name is None:
            raise
        raise ImageLoadError(f"{name}: {error}") from None
    check_not_closed(pil, name or "Image 1")
    return pil


def image_name(position: int, count: int) -> str | None:
    """How errors name image ``position`` (from 1) of ``count`` images: None for a lone image (see `to_rgb`)."""
    return None if count == 1 else f"Image {position} of {count}"


def channel_values(values, name: str) -> np.ndarray:
    """Mean or std (``name``) as float32 numbers for the three channels: one number stands for all three,
    as in the original (torchvision's Normalize). InvalidArgumentError for anything else, and for a std
    that is not above 0 (the pixels would be divided by 0 or flipped)."""
    positive = name == "image_std"
    try:
        numbers = np.asarray(values, dtype=np.float32).reshape(-1)
        usable = numbers.size in (1, 3) and np.isfinite(numbers).all() and not (positive and (numbers <= 0).any())
    except (TypeError, ValueError):  # not numbers
        usable = False
    if not usable:
        raise InvalidArgumentError(
            f"{name} must be 3 {'positive ' * positive}numbers, one per channel (red, green, blue), or one number "
            f"for all three; got {values!r}. Phi-3-vision was trained with OpenAI CLIP's {name}, "
            f"{OPENAI_CLIP_STD if positive else OPENAI_CLIP_MEAN}, the default."
        )
    return np.broadcast_to(numbers, (3,))


def normalise_into(pixels: np.ndarray, out: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """``out[c] = (pixels[..., c] / 255 - mean[c]) / std[c]`` for uint8 (h, w, 3) ``pixels`` and a
    float32 (3, h, w) ``out``: the original's three float32 operations, each exactly rounded, so the
    numbers are its numbers bit for bit; in place, with no temporary arrays (NumPy releases the GIL)."""
    for channel in range(3):
        values = out[channel]
        np.divide(pixels[..., channel], np.float32(255), out=values, dtype=np.float32)
        np.subtract(values, mean[channel], out=values)
        np.divide(values, std[channel], out=values)


def flatten_images(images, where: str = "images") -> list:
    """``images`` (None, an image, or lists of images nested to any depth) as one flat list.

    A None inside a list is refused (ImageLoadError naming its place, ``images[1]``): it is usually an
    image that failed to load, and dropping it would give the next image its tag."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for index, element in enumerate(images):
        if element is None:
            raise ImageLoadError(
                f"{where}[{index}] is None, not an image. Leave it out of the list (a prompt without images takes "
                "an empty list []), or check the code that loaded it."
            )
        flat += flatten_images(element, f"{where}[{index}]")
    return flat


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    """The keyword arguments this image processor understands beyond transformers' standard ones."""

    num_crops: int
    num_img_tokens: int


class Phi3VImageProcessor(BaseImageProcessor):
    r"""Turns images into Phi-3-vision's ``pixel_values``, ``image_sizes`` and ``num_img_tokens``.

    Args:
        num_crops (int): the most 336x336 tiles one image may use (16 in Phi-3-vision's
            preprocessor_config.json, 4 in Phi-3.5-vision's). More tiles = more detail and more tokens.
        image_mean, image_std: normalisation (OpenAI CLIP's).
        do_convert_rgb (bool): kept from the checkpoint; images are always converted with PIL
            ``.convert("RGB")`` as in the original (alpha is dropped; `phi_helpers.load_image` composites
            transparency onto white before this).
        num_img_tokens (int): kept from the checkpoint's preprocessor_config.json; unused.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: list[float] = OPENAI_CLIP_MEAN,
        image_std: list[float] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        num_img_tokens: int = TOKENS_PER_TILE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_crops = check_num_crops(num_crops)
        channel_values(image_mean, "image_mean")  # refuses unusable values now, not at the first image
        channel_values(image_std, "image_std")
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.num_img_tokens = num_img_tokens

    # --- size arithmetic -------------------------------------------------------------------------

    def calc_num_image_tokens_from_image_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """How many tokens an image of width x height pixels costs at this ``num_crops``."""
        _, _, canvas_w, canvas_h = hd_canvas_size(width, height, self.num_crops if num_crops is None else num_crops)
        if width < height:
            canvas_w, canvas_h = canvas_h, canvas_w
        return num_image_tokens(canvas_h, canvas_w)

    def calc_num_image_tokens(self, images, num_crops: int | None = None) -> list[int]:
        """Token cost of each image in ``images`` (PIL images)."""
        return [self.calc_num_image_tokens_from_image_size(*_to_pil(im).size, num_crops) for im in flatten_images(images)]

    # --- pixels ----------------------------------------------------------------------------------

    def hd_canvas(self, image: Image.Image, num_crops: int, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
        """The HD canvas, normalised: float32 (3, canvas_h, canvas_w), portrait images left portrait.

        The bilinear resize runs in strips on ``torch.get_num_threads()`` threads and gives PIL's bytes
        (`bilinear_resize`); each thread normalises the strips it resized straight into the canvas
        (`normalise_into`). A portrait image is resized as the original does it (transposed to
        landscape and back) without the two transposed copies.
        """
        portrait = image.width < image.height
        resized_w, resized_h, canvas_w, canvas_h = hd_canvas_size(image.width, image.height, num_crops)  # landscape frame
        pad = (canvas_h - resized_h) // 2  # white above (left of a portrait); the rest goes below (right)
        if portrait:
            height, width, top, left, size = canvas_w, canvas_h, 0, pad, (resized_h, resized_w)
        else:
            height, width, top, left, size = canvas_h, canvas_w, pad, 0, (resized_w, resized_h)
        canvas = torch.empty(3, height, width)
        pixels = canvas.numpy()  # the same memory
        white = np.empty((3, 1, 1), np.float32)
        normalise_into(np.full((1, 1, 3), 255, np.uint8), white, mean, std)
        for channel, value in zip(pixels, white[:, 0, 0]):
            channel[:top], channel[top + size[1] :] = value, value
            channel[:, :left], channel[:, left + size[0] :] = value, value

        def write(strip: np.ndarray, x: int, y: int) -> None:  # strip: (h, w, 3) uint8, on a worker thread
            h, w = strip.shape[:2]
            normalise_into(strip, pixels[:, top + y : top + y + h, left + x : left + x + w], mean, std)

        resize_bilinear(image, size, as_transposed=portrait, threads=torch.get_num_threads(), write=write)
        return canvas

    def _write_tiles(self, image: Image.Image, num_crops: int, mean, std, out: torch.Tensor) -> list[int]:
        """Write one image's tiles into ``out`` (num_crops + 1, 3, 336, 336); return its [canvas_h, canvas_w].

        Tile 0 is the global image, tiles 1 … h_c·w_c the canvas cut row by row, the rest zero padding.
        """
        hd = self.hd_canvas(image, num_crops, mean, std)  # (3, H, W)
        _, h, w = hd.shape
        rows, cols = h // TILE, w // TILE
        out[0] = torch.nn.functional.interpolate(hd[None], size=(TILE, TILE), mode="bicubic")[0]
        out[1 : 1 + rows * cols].view(rows, cols, 3, TILE, TILE).copy_(
            hd.view(3, rows, TILE, cols, TILE).permute(1, 3, 0, 2, 4)  # (h_c, w_c, 3, 336, 336), row-major tiles
        )
        out[1 + rows * cols :].zero_()
        return [h, w]

    def preprocess(
        self, images, num_crops: int | None = None, image_mean=None, image_std=None, do_convert_rgb=None,
        return_tensors="pt", **kwargs
    ) -> BatchFeature:
        """Process one image or a list of images.

        ``num_crops``, ``image_mean`` and ``image_std`` override the processor's for this call;
        ``do_convert_rgb`` is accepted and has no effect, as in the original (which converts to RGB
        either way). Other options (``do_normalize``, ``size``...) are refused: the HD transform is
        how Phi-3-vision was trained.

        Returns a BatchFeature with ``pixel_values`` (N, num_crops + 1, 3, 336, 336) float32,
        ``image_sizes`` (N, 2) = [canvas_h, canvas_w] per image, and ``num_img_tokens`` (N,).
        """
        _refuse_options(kwargs)
        num_crops = self.num_crops if num_crops is None else num_crops
        mean = channel_values(self.image_mean if image_mean is None else image_mean, "image_mean")
        std = channel_values(self.image_std if image_std is None else image_std, "image_std")
        images = flatten_images(images)
        images = [to_rgb(image, image_name(position, len(images))) for position, image in enumerate(images, start=1)]
        if not images:
            raise ImageLoadError("No images were given to the image processor.")
        check_num_crops(num_crops)
        pixel_values = torch.empty(len(images), num_crops + 1, 3, TILE, TILE)  # every tile is written below
        sizes = [self._write_tiles(image, num_crops, mean, std, tiles) for image, tiles in zip(images, pixel_values)]
        data = {
            "pixel_values": pixel_values,
            "image_sizes": sizes,
            "num_img_tokens": [num_image_tokens(h, w) for h, w in sizes],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def _refuse_options(kwargs: dict) -> None:
    """InvalidArgumentError for an option `Phi3VImageProcessor.preprocess` does not read (``do_normalize=False``,
    ``size=...``), rather than an output that silently ignores it; None means "not set" and passes."""
    for name, value in kwargs.items():
        if value is not None:
            raise InvalidArgumentError(
                f"Phi3VImageProcessor does not take {name}={value!r}: it always resizes, pads and normalises images "
                "the way Phi-3-vision was trained (the HD transform). Its options are num_crops (the most 336x336 tiles "
                "per image), image_mean, image_std, do_convert_rgb and return_tensors."
            )


__all__ = ["Phi3VImageProcessor", "hd_canvas_size", "image_from_array", "num_image_tokens"]
