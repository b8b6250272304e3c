"""Pixels: the one conversion between the [0, 1] float images models make and the 8-bit pixels that rewards,
judges, grids, files and HTTP bodies take."""
from flowgrpo.media.images import pil_images, to_pixels, to_uint8

__all__ = ["pil_images", "to_pixels", "to_uint8"]
