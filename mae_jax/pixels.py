"""Pixel normalisation, the one source of its constants: ImageNet mean/std for RGB, (0.5, 0.25) for grey.

NumPy only (no TensorFlow): the input pipeline, the synthetic data and the reconstruction figures all use it.
Works on NumPy, JAX and TensorFlow arrays alike, since it only broadcasts [C] constants.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # of [0, 1] pixels, per RGB channel
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
GREY_MEAN, GREY_STD = 0.5, 0.25  # images with other channel counts (grey): a fixed, roughly unit scale


def mean_std(num_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) [C] of [0, 1] pixels: ImageNet's for RGB, (0.5, 0.25) for any other C."""
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return np.full(num_channels, GREY_MEAN, np.float32), np.full(num_channels, GREY_STD, np.float32)


def normalise(pixels, num_channels: int):
    """[..., C] pixels in [0, 1] -> the model's input scale."""
    mean, std = mean_std(num_channels)
    return (pixels - mean) / std


def denormalise(images, num_channels: int):
    """The inverse of `normalise`: [..., C] model inputs -> pixels in [0, 1] (not clipped)."""
    mean, std = mean_std(num_channels)
    return images * std + mean


def model_input(images):
    """The model's input from a batch's images [..., C]: uint8 pixels (what the input pipelines deliver: a quarter
    of float32's bytes from host to device) are normalised here, in the compiled step; floating-point images are
    taken as normalised already."""
    if images.dtype == np.uint8:
        return normalise(images.astype(np.float32) / np.float32(255.0), images.shape[-1])
    return images
