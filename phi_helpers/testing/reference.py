"""The image processor's pixel path written plainly, the way the original computes it, for tests and
benchmarks to hold the fast path to: serial PIL resize of a transposed portrait image, white canvas,
out-of-place normalisation, bicubic global tile, tiles by reshape, ``torch.cat`` and ``torch.stack``.
"""

import numpy as np
import torch
from PIL import Image

from ..models.phi3_v.image_processing_phi3_v import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TILE, hd_canvas_size


def reference_hd_canvas(image: Image.Image, num_crops: int) -> Image.Image:
    """Transpose a portrait image, PIL's bilinear resize, paste on a white canvas, transpose back."""
    portrait = image.width < image.height
    if portrait:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized_w, resized_h, canvas_w, canvas_h = hd_canvas_size(image.width, image.height, num_crops)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(image.resize((resized_w, resized_h), Image.Resampling.BILINEAR), (0, (canvas_h - resized_h) // 2))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if portrait else canvas


def reference_pixel_values(images: list[Image.Image], num_crops: int) -> torch.Tensor:
    """(len(images), num_crops + 1, 3, 336, 336) float32, computed the plain way."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    tiles = []
    for image in images:
        hd = reference_hd_canvas(image.convert("RGB"), num_crops)
        pixels = torch.from_numpy(np.array(hd, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
        hd = (pixels - mean) / std
        _, h, w = hd.shape
        global_tile = torch.nn.functional.interpolate(hd[None], size=(TILE, TILE), mode="bicubic")
        local = hd.reshape(3, h // TILE, TILE, w // TILE, TILE).permute(1, 3, 0, 2, 4).reshape(-1, 3, TILE, TILE)
        padding = torch.zeros(num_crops - local.shape[0], 3, TILE, TILE)
        tiles.append(torch.cat([global_tile, local, padding]))
    return torch.stack(tiles)


__all__ = ["reference_hd_canvas", "reference_pixel_values"]
