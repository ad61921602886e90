"""Image processor against the worked examples and formulas of the specification (§4)."""

import multiprocessing
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from phi_helpers import ImageAspectRatioError, ImageLoadError
from phi_helpers.errors import InvalidArgumentError
from phi_helpers.models.phi3_v import bilinear_resize
from phi_helpers.models.phi3_v.image_processing_phi3_v import (
    Phi3VImageProcessor, check_num_crops, hd_canvas_size, largest_num_crops, max_image_tokens,
)
from phi_helpers.testing.reference import reference_pixel_values

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
WHITE = (1 - MEAN) / STD  # padding colour in normalised space ≈ (1.930336, 2.074884, 2.145897)


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - MEAN) / STD


# spec §4.7: (width, height, num_crops) -> (image_sizes [H, W], tokens, padding top/left, pixel_values dim 1)
WORKED_EXAMPLES = [
    ((1344, 1344, 16), ([1344, 1344], 2509, 17)),
    ((1344, 1344, 4), ([672, 672], 757, 5)),
    ((336, 336, 16), ([1344, 1344], 2509, 17)),
    ((1200, 675, 16), ([1008, 1680], 2353, 17)),
    ((640, 480, 16), ([1008, 1344], 1921, 17)),
    ((640, 480, 4), ([672, 672], 757, 5)),
    ((500, 1000, 16), ([1680, 1008], 2377, 17)),
    ((10000, 100, 16), ([336, 5376], 2473, 17)),
]


@pytest.mark.parametrize(("size", "expected"), WORKED_EXAMPLES, ids=[f"{w}x{h}@{n}" for (w, h, n), _ in WORKED_EXAMPLES])
def test_worked_examples(size, expected):
    width, height, num_crops = size
    image_sizes, tokens, tiles = expected
    processor = Phi3VImageProcessor(num_crops=num_crops)
    out = processor(Image.new("RGB", (width, height), (10, 120, 200)), return_tensors="pt")
    assert out["image_sizes"].tolist() == [image_sizes]
    assert out["num_img_tokens"].tolist() == [tokens]
    assert tuple(out["pixel_values"].shape) == (1, tiles, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.float32
    assert processor.calc_num_image_tokens_from_image_size(width, height) == tokens


def test_canvas_arithmetic_matches_spec_padding():
    # 1200x675 @16: scale 5 -> 1680x945, padded to 1008 tall: 31 rows on top, 32 below.
    assert hd_canvas_size(1200, 675, 16) == (1680, 945, 1680, 1008)
    assert hd_canvas_size(10000, 100, 16) == (5376, 53, 5376, 336)  # 141 top, 142 bottom


def test_white_padding_top_and_bottom_in_normalised_space():
    # 640x480 @4 -> resized 672x504, padded to 672x672: 84 white rows on top and 84 below.
    red = (220, 20, 60)
    out = Phi3VImageProcessor(num_crops=4)(Image.new("RGB", (640, 480), red))
    tiles = out["pixel_values"][0]  # global, then the 2x2 grid row by row
    top_left, bottom_left = tiles[1], tiles[3]
    assert torch.allclose(top_left[:, :84, :], WHITE[:, None, None].expand(3, 84, 336), atol=1e-6)
    assert torch.allclose(top_left[:, 84:, :], normalised(red)[:, None, None].expand(3, 252, 336), atol=1e-5)
    assert torch.allclose(bottom_left[:, 336 - 84 :, :], WHITE[:, None, None].expand(3, 84, 336), atol=1e-6)
    assert torch.allclose(WHITE, torch.tensor([1.930336, 2.074884, 2.145897]), atol=1e-5)


def test_portrait_is_padded_left_and_right():
    # 500x1000 @16 -> canvas 1008 wide: 84 white columns left and right, none on top.
    blue = (30, 60, 200)
    out = Phi3VImageProcessor(num_crops=16)(Image.new("RGB", (500, 1000), blue))
    tiles = out["pixel_values"][0]
    first, third = tiles[1], tiles[3]  # grid is 5 rows x 3 columns: tiles 1..3 form the top row
    assert torch.allclose(first[:, :, :84], WHITE[:, None, None].expand(3, 336, 84), atol=1e-6)
    assert torch.allclose(first[:, :, 84:], normalised(blue)[:, None, None].expand(3, 336, 252), atol=1e-5)
    assert torch.allclose(third[:, :, 336 - 84 :], WHITE[:, None, None].expand(3, 336, 84), atol=1e-6)


def test_padding_tiles_are_zero_and_global_is_a_squash():
    # 672x336 @4: two tiles used (left red, right blue), tiles 3 and 4 are zero padding.
    image = Image.new("RGB", (672, 336), (255, 0, 0))
    image.paste((0, 0, 255), (336, 0, 672, 336))
    tiles = Phi3VImageProcessor(num_crops=4)(image)["pixel_values"][0]
    assert tiles.shape[0] == 5
    assert torch.allclose(tiles[1], normalised((255, 0, 0))[:, None, None].expand(3, 336, 336), atol=1e-5)
    assert torch.allclose(tiles[2], normalised((0, 0, 255))[:, None, None].expand(3, 336, 336), atol=1e-5)
    assert torch.count_nonzero(tiles[3:]) == 0
    # the global tile squashes the 672-wide canvas: left half red, right half blue
    assert torch.allclose(tiles[0][:, :, :160], normalised((255, 0, 0))[:, None, None].expand(3, 336, 160), atol=1e-4)
    assert torch.allclose(tiles[0][:, :, 176:], normalised((0, 0, 255))[:, None, None].expand(3, 336, 160), atol=1e-4)


def test_small_hand_checked_image_is_upscaled_bilinearly():
    # A 2x1 image (black, white) at num_crops=1: scale 1 -> resized to 336x168, padded to 336x336.
    image = Image.new("RGB", (2, 1))
    image.putpixel((1, 0), (255, 255, 255))
    out = Phi3VImageProcessor(num_crops=1)(image)
    tile = out["pixel_values"][0, 1]
    assert out["image_sizes"].tolist() == [[336, 336]]
    row = tile[0, 168]  # a row inside the resized band (rows 84..251)
    assert row[0] == pytest.approx(float(normalised((0, 0, 0))[0]), abs=1e-5)  # left end stays black
    assert row[-1] == pytest.approx(float(normalised((255, 255, 255))[0]), abs=1e-5)  # right end white
    assert bool((row[1:] >= row[:-1] - 1e-6).all())  # bilinear: a monotone ramp in between
    assert torch.allclose(tile[:, :84], WHITE[:, None, None].expand(3, 84, 336), atol=1e-6)


def test_rgba_and_greyscale_are_converted_like_pil():
    rgba = Image.new("RGBA", (336, 336), (10, 20, 30, 0))  # transparent: PIL keeps the stored colour
    grey = Image.new("L", (336, 336), 128)
    processor = Phi3VImageProcessor(num_crops=1)
    assert torch.allclose(processor(rgba)["pixel_values"][0, 1, :, 0, 0], normalised((10, 20, 30)), atol=1e-5)
    assert torch.allclose(processor(grey)["pixel_values"][0, 1, :, 0, 0], normalised((128, 128, 128)), atol=1e-5)


def test_several_images_stack_in_order():
    images = [Image.new("RGB", (640, 480), (255, 0, 0)), Image.new("RGB", (336, 672), (0, 255, 0))]
    out = Phi3VImageProcessor(num_crops=4)(images)
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672], [672, 336]]
    assert out["num_img_tokens"].tolist() == [757, 469]


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageAspectRatioError, match="too elongated"):
        Phi3VImageProcessor(num_crops=1)(Image.new("RGB", (2000, 1)))


@pytest.mark.parametrize(
    ("width", "height", "shape"),
    [(65500, 2, "336 pixels wide it would be 0 pixels tall"), (2, 65500, "336 pixels tall it would be 0 pixels wide")],
)
def test_too_elongated_names_the_image_as_it_is(width, height, shape):
    for refuse in (lambda: hd_canvas_size(width, height, 1), lambda: Phi3VImageProcessor(num_crops=1)(Image.new("L", (width, height)))):
        with pytest.raises(ImageAspectRatioError) as caught:
            refuse()
        assert f"An image of {width}x{height} pixels (aspect ratio 32750:1)" in str(caught.value)
        assert shape in str(caught.value)


def test_unusable_inputs_are_clear_errors():
    with pytest.raises(ImageLoadError, match="load_image"):
        Phi3VImageProcessor()("not an image")
    with pytest.raises(ImageLoadError, match="empty"):
        hd_canvas_size(0, 10, 4)
    with pytest.raises(ImageLoadError, match="No images"):
        Phi3VImageProcessor()([])


# (shape, dtype, the advice): Image.fromarray raised a bare TypeError for the first two and read the third,
# which may be channels-first, as a 3-pixel-high RGBA image.
BAD_ARRAYS = [
    ((3, 300, 400), np.uint8, "looks channels-first (3 channels first): use array.transpose(1, 2, 0)."),
    ((300, 400, 1), np.uint8, "one channel on the last axis: use array[..., 0] (greyscale)."),
    ((3, 100, 4), np.uint8, "may be channels-first (3 channels) or 3 pixels high. Channels-first: use array.transpose"),
    ((1, 300, 400), np.uint8, "looks channels-first (1 channel first): use array[0] (greyscale)."),
    ((2, 30, 40, 3), np.uint8, "a batch of images: pass them as a list, list(array)."),
    ((300, 400, 2), np.uint8, "holds 2 values per pixel, not 3 (RGB) or 4 (RGBA)."),
    ((300, 400, 3), np.float32, "uint8 first: (array * 255).round().astype(numpy.uint8) for values in 0..1"),
    ((300, 400), np.uint16, "(array // 257).astype(numpy.uint8) for 16-bit values"),
]


@pytest.mark.parametrize(("shape", "dtype", "advice"), BAD_ARRAYS, ids=[f"{s}-{np.dtype(d)}" for s, d, _ in BAD_ARRAYS])
def test_arrays_in_another_layout_are_refused_with_the_conversion_to_use(shape, dtype, advice):
    with pytest.raises(ImageLoadError, match=re.escape(advice)) as caught:
        Phi3VImageProcessor(num_crops=4)(np.zeros(shape, dtype))
    message = str(caught.value)
    assert message.startswith(f"Cannot use a numpy array of shape {shape} and dtype {np.dtype(dtype)} as an image: ")
    assert message.endswith("Images are accepted as a uint8 numpy array of shape (height, width) or (height, width, "
                            "3 or 4): greyscale, RGB or RGBA.")


def test_greyscale_rgb_and_rgba_arrays_give_the_numbers_of_their_pil_images():
    processor = Phi3VImageProcessor(num_crops=4)
    rgb = np.asarray(noise(400, 300, seed=5))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    for array in (rgb, rgb[..., 0], rgba, rgb[::-1]):  # the last one is a view with negative strides
        assert torch.equal(processor(array)["pixel_values"], processor(Image.fromarray(array))["pixel_values"])


def test_a_torch_tensor_is_refused_with_the_conversion_to_use():
    with pytest.raises(ImageLoadError, match=r"got a torch Tensor of shape \(3, 30, 40\)\. .*Image\.fromarray\(tensor\.permute"):
        Phi3VImageProcessor(num_crops=4)(torch.zeros(3, 30, 40, dtype=torch.uint8))


def test_num_crops_must_leave_its_costliest_image_inside_the_context():
    # a column of n tiles: n·(144 + 12) + 144 + 12 + 1 tokens (spec §4.6); 131,072 is the checkpoints' context
    assert max_image_tokens(16) == (16 + 1) * 144 + 1 + (16 + 1) * 12 == 2653
    assert max_image_tokens(16) == Phi3VImageProcessor(num_crops=16).calc_num_image_tokens_from_image_size(100, 16 * 100)
    assert largest_num_crops(131072) == 839 and max_image_tokens(839) <= 131072 < max_image_tokens(840)
    assert check_num_crops(839) == 839 and check_num_crops(16, context_length=2653) == 16
    with pytest.raises(InvalidArgumentError, match="num_crops=17 is too many.* at most 16"):
        check_num_crops(17, context_length=2653)


@pytest.mark.parametrize("num_crops", [840, 10000])
def test_num_crops_beyond_the_context_is_refused(num_crops):
    message = f"num_crops={num_crops} is too many: one image could take {max_image_tokens(num_crops):,} tokens"
    with pytest.raises(InvalidArgumentError, match=message + r".* context of 131,072\. Use at most 839"):
        Phi3VImageProcessor(num_crops=num_crops)
    with pytest.raises(InvalidArgumentError, match=message):
        Phi3VImageProcessor(num_crops=4).calc_num_image_tokens_from_image_size(336, 336, num_crops)


def test_a_huge_num_crops_is_refused_before_its_tiles_are_allocated():
    with pytest.raises(InvalidArgumentError, match="num_crops=1000000000000 is too many"):
        Phi3VImageProcessor(num_crops=4)(Image.new("RGB", (336, 336)), num_crops=10**12)


def test_num_crops_zero_is_refused_and_normalisation_can_be_overridden():
    processor = Phi3VImageProcessor(num_crops=4)
    with pytest.raises(ValueError, match="at least 1"):
        processor(Image.new("RGB", (336, 336)), num_crops=0)
    plain = processor(Image.new("RGB", (336, 336), (255, 255, 255)), image_mean=[0, 0, 0], image_std=[1, 1, 1])
    assert torch.allclose(plain["pixel_values"][0, 1], torch.ones(3, 336, 336))
    one_value = processor(Image.new("RGB", (336, 336), (255, 255, 255)), image_mean=[0.5], image_std=[0.25])
    assert torch.equal(one_value["pixel_values"][0, 1], torch.full((3, 336, 336), 2.0))  # the same for each channel


# --- the fast pixel path gives exactly the numbers of the straightforward one --------------------


def noise(width, height, seed, mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "mode"),
    [
        (1344, 1344, 16, "RGB"),
        (4032, 3024, 16, "RGB"),
        (3024, 4032, 16, "RGB"),
        (1000, 700, 4, "RGB"),
        (700, 1000, 4, "RGB"),
        (500, 300, 1, "RGBA"),
    ],
)
def test_pixel_values_equal_the_reference_pipeline_bit_for_bit(width, height, num_crops, mode):
    image = noise(width, height, seed=width + height, mode=mode)
    got = Phi3VImageProcessor(num_crops=num_crops)(image)["pixel_values"]
    assert got.is_contiguous()
    assert torch.equal(got, reference_pixel_values([image], num_crops))


def test_several_images_equal_the_reference_pipeline_bit_for_bit():
    images = [noise(640, 480, 1), noise(300, 900, 2, "L"), noise(336, 336, 3)]
    got = Phi3VImageProcessor(num_crops=4)(images)["pixel_values"]
    assert torch.equal(got, reference_pixel_values(images, 4))


# --- the threaded resize gives PIL's bytes ----------------------------------------------------------

# (input size, output size): both pass orders of Pillow 13's rule and its boundary (the height shrinks
# by exactly / one more than twice the width's shrink), down- and upscaling, one axis only, odd sizes.
RESIZES = [
    ((4032, 3024), (1344, 1008)),
    ((3000, 2000), (2900, 1799)),  # height shrinks 201 > 2 x 100: vertical first
    ((3000, 2000), (2900, 1800)),  # 200 = 2 x 100: horizontal first
    ((2000, 3000), (1799, 2900)),
    ((1237, 2999), (1000, 1003)),
    ((333, 1501), (1344, 1007)),  # upscale the width, downscale the height
    ((2501, 999), (2501, 700)),  # the height only
    ((999, 2501), (700, 2501)),  # the width only
    ((4000, 30), (1344, 11)),
    ((50, 40), (1344, 1075)),
    ((5, 1), (3, 1)),  # fewer lines than threads
    ((1, 5), (1, 2)),
    ((2, 2), (7, 9)),
    # height scales short in binary: resized in bands of output rows (exact_row_bands)
    ((3000, 2016), (1344, 1344)),  # 1.5: band tops must be even
    ((1000, 750), (1344, 1000)),  # 0.75: upscale
    ((1201, 999), (400, 333)),  # 3, odd sizes
    ((900, 3000), (880, 1500)),  # 2, vertical first
    ((1000, 1200), (800, 800)),  # 1.5, horizontal first, but a band of 400 rows would go vertical first
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("in_size", "out_size"), RESIZES)
def test_threaded_resize_gives_pils_bytes(in_size, out_size, threads, monkeypatch):
    monkeypatch.setattr(bilinear_resize, "MIN_PIXELS_PER_THREAD", 1)  # strips even for small images
    image = noise(*in_size, seed=sum(in_size))
    got = bilinear_resize.resize_bilinear(image, out_size, threads=threads)
    assert np.array_equal(np.asarray(got), np.asarray(image.resize(out_size, Image.Resampling.BILINEAR)))
    transposed = bilinear_resize.resize_bilinear(image, out_size, as_transposed=True, threads=threads)
    expected = image.transpose(Image.Transpose.TRANSPOSE).resize(out_size[::-1], Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(transposed), np.asarray(expected.transpose(Image.Transpose.TRANSPOSE)))


def test_row_bands_only_where_they_give_the_same_bytes():
    bands = bilinear_resize.exact_row_bands
    assert bands((4032, 3024), (1344, 1008), True, 2) == [(0, 504), (504, 1008)]  # a 12 MP photo: 3x
    assert bands((3000, 2016), (1344, 1344), True, 3) == [(0, 448), (448, 896), (896, 1344)]  # 1.5x
    assert bands((4000, 3000), (1344, 1008), True, 2) is None  # 2.976...x: the row centres are rounded
    assert bands((1000, 1200), (800, 800), True, 2) is None  # PIL would run a band vertical first
    assert bands((2501, 999), (700, 999), True, 2) is None  # the height does not change


def test_pass_order_is_known_for_the_installed_pillow():
    """A new Pillow major version falls back to PIL's own resize (correct, one thread): when this
    fails, read ImagingResampleInner in Pillow's Resample.c and update ``pass_order``."""
    assert bilinear_resize.pass_order((3000, 2000), (2900, 1799)) == "vertical first"
    assert bilinear_resize.pass_order((3000, 2000), (2900, 1800)) == "horizontal first"


@pytest.mark.parametrize(("width", "height"), [(1500, 1000), (1000, 1500), (1344, 1008)])
def test_an_unknown_pillow_falls_back_to_pils_own_resize(width, height, monkeypatch):
    monkeypatch.setattr(bilinear_resize, "PILLOW_MAJOR", 99)
    assert bilinear_resize.pass_order((width, height), (672, 448)) is None
    image = noise(width, height, seed=width)
    got = Phi3VImageProcessor(num_crops=4)(image)["pixel_values"]
    assert torch.equal(got, reference_pixel_values([image], 4))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA"])
def test_other_modes_give_pils_bytes_too(mode, monkeypatch):
    monkeypatch.setattr(bilinear_resize, "MIN_PIXELS_PER_THREAD", 1)
    image = noise(1500, 1000, seed=7, mode=mode)
    got = bilinear_resize.resize_bilinear(image, (700, 333), threads=2)
    assert got.mode == mode
    assert np.array_equal(np.asarray(got), np.asarray(image.resize((700, 333), Image.Resampling.BILINEAR)))


def test_a_large_image_in_memory_is_resized_as_pil_resizes_it(monkeypatch):
    """``Image.crop`` checks its box against MAX_IMAGE_PIXELS as if it were opening a file: the strips of a
    large image already in memory (30000x30000, which PIL's own resize takes) raised DecompressionBombError
    in a worker thread, and at 14000x14000 printed Pillow's warning. A small limit here makes a small
    image count as large: every strip is beyond twice it."""
    monkeypatch.setattr(bilinear_resize, "MIN_PIXELS_PER_THREAD", 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image = noise(600, 400, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for size in [(500, 333), (590, 100), (1344, 1008)]:  # both pass orders, up and down: strips cropped
            expected = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
            got = bilinear_resize.resize_bilinear(image, size, threads=3)
            assert np.array_equal(np.asarray(got), expected)
            written = np.zeros_like(expected)

            def write(strip, x, y):
                written[y : y + strip.shape[0], x : x + strip.shape[1]] = strip

            bilinear_resize.resize_bilinear(image, size, threads=3, write=write)
            assert np.array_equal(written, expected)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        grey = noise(900, 500, seed=6, mode="L")
        assert torch.equal(Phi3VImageProcessor(num_crops=4)(grey)["pixel_values"], reference_pixel_values([grey], 4))


def test_a_pool_is_not_replaced_between_handing_it_out_and_queueing_on_it(monkeypatch):
    """Two threads resizing at once, the second needing more threads: the second replaces the pool and
    shuts the old one down. Before, that could happen after the first thread got the old pool and before
    it queued its strips: "cannot schedule new futures after shutdown" (a threaded server, at random)."""
    monkeypatch.setattr(bilinear_resize, "MIN_PIXELS_PER_THREAD", 1)
    monkeypatch.setattr(bilinear_resize, "_POOL", None)
    monkeypatch.setattr(bilinear_resize, "_POOL_SIZE", 0)
    image, bigger = noise(600, 400, seed=1), noise(900, 700, seed=2)
    others = []

    class Pool(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):  # the first strip: another thread needs a larger pool right now
            if not others:
                others.append(threading.Thread(target=bilinear_resize.resize_bilinear, args=(bigger, (300, 200)),
                                               kwargs={"threads": 3}))
                others[0].start()
                others[0].join(timeout=0.5)  # it waits for the lock (before: it shut this pool down)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(bilinear_resize, "ThreadPoolExecutor", Pool)
    got = bilinear_resize.resize_bilinear(image, (500, 400), threads=2)
    others[0].join()
    assert np.array_equal(np.asarray(got), np.asarray(image.resize((500, 400), Image.Resampling.BILINEAR)))


def _resize_in_child(queue):
    image = noise(1500, 1000, seed=3)
    got = bilinear_resize.resize_bilinear(image, (700, 333), threads=2)
    queue.put(np.array_equal(np.asarray(got), np.asarray(image.resize((700, 333), Image.Resampling.BILINEAR))))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_gets_its_own_threads(monkeypatch):
    """DataLoader workers fork: the parent's pool threads do not exist in the child."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(bilinear_resize, "MIN_PIXELS_PER_THREAD", 1)
    bilinear_resize.resize_bilinear(noise(600, 400, seed=2), (300, 200), threads=2)  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_resize_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5)


def test_num_crops_from_numpy_is_kept_as_a_plain_int(tmp_path):
    """A numpy count was stored as it came: repr, to_json_string and save_pretrained then failed."""
    processor = Phi3VImageProcessor(num_crops=np.int64(4))
    assert type(processor.num_crops) is int
    processor.save_pretrained(tmp_path)
    assert '"num_crops": 4' in processor.to_json_string()
