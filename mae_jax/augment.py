"""The paper's training augmentation and the evaluation crop, as pure TensorFlow functions of one image.

RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3)) with torchvision's box sampling (`crop_box_from_uniforms`),
cropped while decoding JPEGs, resized bicubic with antialiasing (PIL's bicubic, which torchvision applies to
PIL images, within 0.3/255 on average) and held as uint8 as PIL holds it; horizontal flip with p = 0.5. The
ImageNet mean/std normalisation happens on the device, in the compiled step (`pixels.model_input`): uint8
batches are a quarter of float32's bytes from host to device. Randomness comes from a stateless key, so the same
key always gives the same image.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from mae_jax import pixels

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a central crop


def crop_box_from_uniforms(height, width, u_area, u_log_ratio, u_top, u_left,
                           scale: Sequence[float] = (0.2, 1.0),
                           ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """torchvision's RandomResizedCrop.get_params, driven by given uniforms in [0, 1).

    Attempt k draws an area fraction in `scale` (`u_area[k]`) and a log aspect ratio (width / height) in
    log(`ratio`) (`u_log_ratio[k]`), rounds the box to whole pixels and takes the first that fits; its
    corner is uniform over the positions that fit (`u_top`, `u_left`). When no attempt fits, the central
    crop of the whole image clamped to `ratio`. Returns int32 [top, left, crop_height, crop_width].
    """
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * tf.cast(u_area, tf.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * tf.cast(u_log_ratio, tf.float64))
    w = tf.round(tf.sqrt(target_area * aspect))  # round half to even, as Python's round()
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first attempt that fits (0 if none)

    def sampled():
        ch, cw = h[first], w[first]
        top = tf.floor(tf.cast(u_top, tf.float64) * (height - ch + 1))
        left = tf.floor(tf.cast(u_left, tf.float64) * (width - cw + 1))
        return tf.stack([top, left, ch, cw])

    def central():
        in_ratio = width / height
        ch = tf.where(in_ratio < min(ratio), tf.round(width / min(ratio)), height)
        cw = tf.where(in_ratio > max(ratio), tf.round(height * max(ratio)), width)
        return tf.stack([tf.floor((height - ch) / 2), tf.floor((width - cw) / 2), ch, cw])

    return tf.cast(tf.cond(tf.reduce_any(fits), sampled, central), tf.int32)


def sample_crop_box(height, width, key, scale: Sequence[float] = (0.2, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """The RandomResizedCrop box [top, left, crop_height, crop_width] of an image, for a stateless key [2]."""
    u = tf.random.stateless_uniform([2 * CROP_ATTEMPTS + 2], seed=key, dtype=tf.float64, alg="philox")
    return crop_box_from_uniforms(height, width, u[:CROP_ATTEMPTS], u[CROP_ATTEMPTS:2 * CROP_ATTEMPTS],
                                  u[-2], u[-1], scale, ratio)


def _normalise(image: tf.Tensor, num_channels: int) -> tf.Tensor:
    """[..., C] float pixel values in [0, 255] (clipped) -> normalised float32."""
    return pixels.normalise(tf.clip_by_value(image, 0.0, 255.0) / 255.0, num_channels)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """[H, W, C] uint8, or float in 0..255 (rounded and clipped, as Pillow would hold it) -> uint8."""
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.uint8)


def _is_static(image_size) -> bool:
    return not any(tf.is_tensor(side) for side in image_size)


def resize_bicubic(image: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """[h, w, C] -> [H, W, C] float32, bicubic with antialiasing (PIL's). A crop already of the output size is
    only cast: the resize is exactly the identity there (each output pixel's kernel weights are 1 on its own
    input pixel and 0 elsewhere), and skipping it makes small datasets' pipelines (e.g. digits) a third faster.
    `image_size` (H, W): ints, or scalar int32 tensors (a size chosen in the graph: multi-scale pretraining)."""
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    channels = image.shape[-1]
    size = tf.constant(image_size, tf.int32) if _is_static(image_size) else tf.stack(image_size)
    return tf.cond(tf.reduce_all(shape[:2] == size),
                   lambda: tf.reshape(image, [*image_size, channels if channels is not None else shape[2]]),
                   lambda: tf.image.resize(image, size, method="bicubic", antialias=True))


def preprocess_for_train(encoded: tf.Tensor, key: tf.Tensor, *, image_size: tuple[int, int], num_channels: int,
                         scale: Sequence[float] = (0.2, 1.0),
                         ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP -> RandomResizedCrop, random horizontal flip: [H, W, C] uint8.

    `hflip` is the flip's probability (the paper's 0.5; 0 for images that are not mirror-symmetric, e.g. digits).
    `image_size` (H, W): ints, or scalar int32 tensors (then the output's static shape is [None, None, C]).

    JPEGs are cropped while decoding (only the box's rows and blocks are decoded); other formats are decoded
    whole and then cropped. Both give the same pixels. The same key gives the same output.
    """
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg="philox"))

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        top, left, height, width = tf.unstack(sample_crop_box(shape[0], shape[1], crop_key, scale, ratio))
        # With subsampled chroma, libjpeg's upsampling replicates the window's edge columns instead of reading
        # their neighbours (up to ~20 levels off there); one more column on each side makes it exact.
        window_left, window_right = tf.maximum(left - 1, 0), tf.minimum(left + width + 1, shape[1])
        window = tf.stack([top, window_left, height, window_right - window_left])
        decoded = tf.image.decode_and_crop_jpeg(encoded, window, channels=num_channels)
        return decoded[:, left - window_left:left - window_left + width]

    def other():
        image = tf.io.decode_image(encoded, channels=num_channels, expand_animations=False)
        shape = tf.shape(image)
        box = sample_crop_box(shape[0], shape[1], crop_key, scale, ratio)
        return image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image = resize_bicubic(crop, image_size)
    if hflip > 0:  # (with hflip <= 0 the draw below is never under it: skipping it changes nothing)
        flip = tf.random.stateless_uniform([], seed=flip_key, alg="philox") < hflip
        image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    image = to_uint8(image)
    image.set_shape([*image_size, num_channels] if _is_static(image_size) else [None, None, num_channels])
    return image


def center_crop(image: tf.Tensor, image_size: tuple[int, int], num_channels: int) -> tf.Tensor:
    """[h, w, C] uint8 -> the largest central box of the target aspect, resized: [H, W, C] normalised float32."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    target = float(image_size[0]) / float(image_size[1])  # height / width
    crop_h = tf.minimum(shape[0], tf.round(shape[1] * target))
    crop_w = tf.minimum(shape[1], tf.round(shape[0] / target))
    top, left = tf.cast((shape[0] - crop_h) // 2, tf.int32), tf.cast((shape[1] - crop_w) // 2, tf.int32)
    crop = image[top:top + tf.cast(crop_h, tf.int32), left:left + tf.cast(crop_w, tf.int32)]
    return _normalise(resize_bicubic(crop, image_size), num_channels)
