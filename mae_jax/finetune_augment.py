"""The fine-tuning recipe's image transforms, as pure TensorFlow functions of one image.

Semantics are those of timm 0.3.2 as the official MAE fine-tuning uses it (`util/datasets.py` build_transform):
  - RandAugment `rand-m9-mstd0.5-inc1` (`rand_augment`): `num_ops` ops drawn uniformly with replacement from
    the 15 "increasing" ops; each is applied with probability 0.5, and only then draws its magnitude
    N(9, 0.5) clipped to [0, 10] (a new draw per applied op) and the sign of a signed level (50%). Geometric
    ops fill with timm's `img_mean` = round(255 * ImageNet mean) = (124, 116, 104) and resample bicubic:
    MAE calls create_transform(interpolation='bicubic'), which timm passes to RandAugment (timm's own
    default, 'random', picks bilinear or bicubic per op call; `interpolation="random"` does that).
    Every op reproduces Pillow's arithmetic on uint8 images (its affine sampler is cubic convolution with
    a = -1 and truncates, blends truncate in float32, Equalize/AutoContrast are Pillow's lookup tables),
    and, as Pillow does, every op returns uint8.
  - RandomErasing (`random_erasing`): probability 0.25, mode 'pixel', on the normalised [H, W, C] image.
  - Evaluation (`preprocess_for_eval`): Resize(int(size / crop_pct), bicubic) of the shorter side, then
    CenterCrop(size), normalised; crop_pct = 224 / 256 (MAE uses 1.0 for input sizes above 224).
Randomness comes from stateless keys [2], so the same key always gives the same image.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from mae_jax.augment import IMAGENET_MEAN, _normalise

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are on a 0..10 scale
FILL = tuple(min(255, round(255 * float(m))) for m in IMAGENET_MEAN)  # timm's img_mean: (124, 116, 104)
INTERPOLATIONS = ("bilinear", "bicubic", "random")

# timm's _RAND_INCREASING_TRANSFORMS (rand-...-inc1) and _RAND_TRANSFORMS (inc0), in timm's order.
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
DEFAULT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


# ---------------------------------------------------------------------------------------------------------
# Pixel ops: uint8 [H, W, 3] in, uint8 [H, W, 3] out, as Pillow computes them.
# ---------------------------------------------------------------------------------------------------------


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """[H, W, C] uint8, or float in 0..255 (rounded and clipped, as Pillow would hold it) -> uint8."""
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.uint8)


def _float64(value) -> tf.Tensor:
    """A scalar as float64; Python floats go straight to float64 (tf.cast would round them to float32 first)."""
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray, np.generic)):
        return tf.cast(value, tf.float64)
    return tf.constant(value, tf.float64)


def _lookup(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
    """Pillow's Image.point: int lut [C, 256] (values clipped to 0..255) applied per channel."""
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
    index = tf.cast(image, tf.int32) + 256 * tf.range(tf.shape(image)[-1])  # channel c reads lut[c]
    return tf.gather(tf.reshape(lut, [-1]), index)


def _histograms(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histograms of a uint8 [H, W, C] image: int32 [C, 256]."""
    channels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, tf.shape(image)[-1]]))
    offsets = 256 * tf.range(tf.shape(channels)[0])[:, None]
    counts = tf.math.bincount(tf.reshape(channels + offsets, [-1]), minlength=256 * tf.shape(channels)[0])
    return tf.reshape(counts, [-1, 256])


def invert(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.invert: 255 - x."""
    return 255 - to_uint8(image)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """ImageOps.posterize: keep the `bits` most significant bits (0 keeps none: black); 8 or more is a no-op."""
    image = to_uint8(image)
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """ImageOps.solarize: values >= threshold become 255 - x."""
    image = to_uint8(image)
    return tf.where(tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
    """timm's solarize_add: values below threshold get min(255, x + addition)."""
    x = tf.cast(to_uint8(image), tf.int32)
    added = tf.minimum(255, x + tf.cast(addition, tf.int32))
    return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, stretch [min, max] to [0, 255] with Pillow's lookup table."""
    image = to_uint8(image)
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    # Pillow's table entry: int(ix * scale + offset) in doubles, the same operations in the same order.
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    offset = -lo * scale
    levels = tf.range(256, dtype=tf.float64)[None, :]
    lut = tf.cast(levels * scale[:, None] + offset[:, None], tf.int32)  # truncation, as Python's int()
    lut = tf.where((hi <= lo)[:, None], tf.range(256)[None, :], lut)  # a flat channel is left alone
    return _lookup(image, lut)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize: Pillow's per-channel histogram-equalisation lookup table."""
    image = to_uint8(image)
    hist = _histograms(image)
    nonzero = hist > 0
    last_index = 255 - tf.argmax(tf.cast(tf.reverse(nonzero, [1]), tf.int32), axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last_index, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)
    before = tf.cumsum(hist, axis=1, exclusive=True)  # pixels below each level
    lut = (safe_step[:, None] // 2 + before) // safe_step[:, None]
    identity = (tf.reduce_sum(tf.cast(nonzero, tf.int32), axis=1) <= 1) | (step == 0)
    lut = tf.where(identity[:, None], tf.range(256)[None, :], lut)
    return _lookup(image, lut)


def _luminance(image: tf.Tensor) -> tf.Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point, rounded): int32 [H, W]."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Image.blend(degenerate, image, factor): in1 + factor * (in2 - in1) in float32, clipped, truncated."""
    in1 = tf.cast(degenerate, tf.int32)
    diff = tf.cast(tf.cast(image, tf.int32) - in1, tf.float32)
    value = tf.cast(in1, tf.float32) + tf.cast(factor, tf.float32) * diff  # Pillow's C float arithmetic
    return tf.cast(tf.clip_by_value(value, 0.0, 255.0), tf.uint8)  # the cast truncates, as C's (UINT8)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Color: blend with the grey (L -> RGB) image; 0 gives grey, 1 the image."""
    image = to_uint8(image)
    grey = tf.repeat(_luminance(image)[..., None], 3, axis=-1)
    return blend(grey, image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with a flat image of the rounded mean luminance."""
    image = to_uint8(image)
    mean = tf.reduce_mean(tf.cast(_luminance(image), tf.float64))
    flat = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.int32))
    return blend(flat, image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    image = to_uint8(image)
    return blend(tf.zeros_like(image), image, factor)


def smooth(image: tf.Tensor) -> tf.Tensor:
    """ImageFilter.SMOOTH (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13) as Pillow filters uint8: border pixels kept."""
    image = to_uint8(image)
    x = tf.cast(image, tf.float32)
    side, centre = tf.constant(1.0 / 13.0, tf.float32), tf.constant(5.0 / 13.0, tf.float32)  # float32 kernel

    def row(r, middle_weight):  # one kernel row over columns x-1, x, x+1, summed left to right as Pillow does
        return (r[:, :-2] * side + r[:, 1:-1] * middle_weight) + r[:, 2:] * side

    # Pillow starts at offset + 0.5 (rounding), adds the rows y+1, y, y-1 and truncates.
    total = ((0.5 + row(x[2:], side)) + row(x[1:-1], centre)) + row(x[:-2], side)
    inner = tf.cast(tf.clip_by_value(total, 0.0, 255.0), tf.uint8)
    inner = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], inner, image[-1:]], axis=0)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image; 0 blurs, 2 sharpens."""
    image = to_uint8(image)
    return blend(smooth(image), image, factor)


# ---------------------------------------------------------------------------------------------------------
# Geometric ops: Pillow's Image.transform(AFFINE) with fillcolor, bilinear or bicubic.
# ---------------------------------------------------------------------------------------------------------


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro: cubic convolution with a = -1 through v2 (d = 0) and v3 (d = 1)."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine_transform(image: tf.Tensor, matrix: Sequence, interpolation: str = "bicubic",
                     fill: Sequence[int] = FILL) -> tf.Tensor:
    """Image.transform(size, AFFINE, matrix, resample, fillcolor=fill) of a uint8 [H, W, C] image.

    Output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f) with x' = x + 0.5,
    y' = y + 0.5 (pixel centres), in doubles; points outside [0, W) x [0, H) take `fill`; neighbours beyond
    the border are clamped to it; results are clipped to 0..255 and truncated, as Pillow's sampler does.
    """
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation={interpolation!r}: Pillow's affine sampler here is 'bilinear' or "
                         f"'bicubic'")
    image = to_uint8(image)
    a, b, c, d, e, f = (_float64(m) for m in matrix)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    channels = image.shape[-1] or 3
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float64) + 0.5, tf.range(width, dtype=tf.float64) + 0.5,
                         indexing="ij")
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    inside = (x_in >= 0.0) & (x_in < tf.cast(width, tf.float64)) & (y_in >= 0.0) & (y_in < tf.cast(height, tf.float64))
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = tf.floor(x_in), tf.floor(y_in)
    dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    flat = tf.reshape(tf.cast(image, tf.float64), [-1, channels])

    def pixel(row_offset, column_offset):  # [H, W, C] input values at (y0 + row_offset, x0 + column_offset)
        rows = tf.clip_by_value(y0 + row_offset, 0, height - 1)
        columns = tf.clip_by_value(x0 + column_offset, 0, width - 1)
        return tf.gather(flat, rows * width + columns)

    if interpolation == "bilinear":
        def along_row(r):
            left, right = pixel(r, 0), pixel(r, 1)
            return left + (right - left) * dx
        top, bottom = along_row(0), along_row(1)
        value = top + (bottom - top) * dy
    else:
        rows = [_cubic(*(pixel(r, k) for k in (-1, 0, 1, 2)), dx) for r in (-1, 0, 1, 2)]
        value = _cubic(*rows, dy)
    value = tf.cast(tf.clip_by_value(value, 0.0, 255.0), tf.uint8)  # truncates, as Pillow's (UINT8) cast
    fill = tf.broadcast_to(tf.constant(fill, tf.uint8)[:channels], tf.shape(value))
    return tf.where(inside[..., None], value, fill)


def _pil_round15(value: tf.Tensor) -> tf.Tensor:
    """Python's round(value, 15), which Image.rotate applies to cos and sin (to within one ulp)."""
    return tf.round(value * 1e15) / 1e15


def rotate(image: tf.Tensor, degrees: tf.Tensor, interpolation: str = "bicubic",
           fill: Sequence[int] = FILL) -> tf.Tensor:
    """Image.rotate(degrees) counter-clockwise about the image centre, same size, as an affine transform."""
    image = to_uint8(image)
    # Pillow: angle = -math.radians(degrees % 360.0)
    angle = -(tf.math.floormod(_float64(degrees), 360.0) * (math.pi / 180.0))
    cos, sin = _pil_round15(tf.cos(angle)), _pil_round15(tf.sin(angle))
    centre_x = tf.cast(tf.shape(image)[1], tf.float64) / 2.0
    centre_y = tf.cast(tf.shape(image)[0], tf.float64) / 2.0
    # Pillow maps output to input about the centre: matrix[2], matrix[5] = M @ (-centre) + centre.
    c = cos * -centre_x + sin * -centre_y + 0.0 + centre_x
    f = -sin * -centre_x + cos * -centre_y + 0.0 + centre_y
    return affine_transform(image, (cos, sin, c, -sin, cos, f), interpolation, fill)


def shear_x(image: tf.Tensor, factor: tf.Tensor, interpolation: str = "bicubic",
            fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's shear_x: affine (1, factor, 0, 0, 1, 0)."""
    return affine_transform(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), interpolation, fill)


def shear_y(image: tf.Tensor, factor: tf.Tensor, interpolation: str = "bicubic",
            fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's shear_y: affine (1, 0, 0, factor, 1, 0)."""
    return affine_transform(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), interpolation, fill)


def translate_x(image: tf.Tensor, pixels: tf.Tensor, interpolation: str = "bicubic",
                fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's translate_x_abs: affine (1, 0, pixels, 0, 1, 0), i.e. the content moves left by `pixels`."""
    return affine_transform(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), interpolation, fill)


def translate_y(image: tf.Tensor, pixels: tf.Tensor, interpolation: str = "bicubic",
                fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's translate_y_abs: affine (1, 0, 0, 0, 1, pixels)."""
    return affine_transform(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), interpolation, fill)


def translate_x_rel(image: tf.Tensor, fraction: tf.Tensor, interpolation: str = "bicubic",
                    fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's translate_x_rel: translate_x by fraction * width pixels (not rounded)."""
    width = tf.cast(tf.shape(image)[1], tf.float64)
    return translate_x(image, _float64(fraction) * width, interpolation, fill)


def translate_y_rel(image: tf.Tensor, fraction: tf.Tensor, interpolation: str = "bicubic",
                    fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's translate_y_rel: translate_y by fraction * height pixels (not rounded)."""
    height = tf.cast(tf.shape(image)[0], tf.float64)
    return translate_y(image, _float64(fraction) * height, interpolation, fill)


# ---------------------------------------------------------------------------------------------------------
# Magnitude -> op argument (timm's LEVEL_TO_ARG), and RandAugment.
# ---------------------------------------------------------------------------------------------------------


def level_to_arg(name: str, magnitude: tf.Tensor, negate: tf.Tensor, *, translate_pct: float = 0.45,
                 translate_const: float = 250.0) -> tf.Tensor | None:
    """timm's LEVEL_TO_ARG[name](magnitude) as a float64 scalar (None for argument-free ops).

    `magnitude` is on timm's 0..10 scale; `negate` (bool) is the outcome of timm's _randomly_negate for the
    signed levels (Rotate, Shear*, Translate*, *Increasing enhancements) and ignored by the others.
    """
    m = _float64(magnitude) / MAX_LEVEL

    def signed(level):
        return tf.where(negate, -level, level)

    def trunc(level):  # Python's int() of a non-negative level
        return tf.floor(level)

    table: dict[str, Callable[[], tf.Tensor]] = {
        "Rotate": lambda: signed(m * 30.0),
        "Posterize": lambda: trunc(m * 4.0),
        "PosterizeIncreasing": lambda: 4.0 - trunc(m * 4.0),
        "PosterizeOriginal": lambda: trunc(m * 4.0) + 4.0,
        "Solarize": lambda: trunc(m * 256.0),
        "SolarizeIncreasing": lambda: 256.0 - trunc(m * 256.0),
        "SolarizeAdd": lambda: trunc(m * 110.0),
        "ShearX": lambda: signed(m * 0.3),
        "ShearY": lambda: signed(m * 0.3),
        "TranslateX": lambda: signed(m * float(translate_const)),
        "TranslateY": lambda: signed(m * float(translate_const)),
        "TranslateXRel": lambda: signed(m * translate_pct),
        "TranslateYRel": lambda: signed(m * translate_pct),
    }
    for enhancement in ("Color", "Contrast", "Brightness", "Sharpness"):
        table[enhancement] = lambda: m * 1.8 + 0.1
        table[enhancement + "Increasing"] = lambda: 1.0 + signed(m * 0.9)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name not in table:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(table) + ['AutoContrast', 'Equalize', 'Invert']}")
    return table[name]()


def apply_op(name: str, image: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor, *,
             interpolation: str = "bicubic", fill: Sequence[int] = FILL, translate_pct: float = 0.45,
             translate_const: float = 250.0) -> tf.Tensor:
    """timm's AugmentOp(name) at a given magnitude and sign, always applied: uint8 [H, W, 3]."""
    arg = level_to_arg(name, magnitude, negate, translate_pct=translate_pct, translate_const=translate_const)
    geometric = {"Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
                 "TranslateY": translate_y, "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel}
    pixel_ops = {"Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color,
                 "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}
    if name in ("AutoContrast", "Equalize", "Invert"):
        return {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert}[name](image)
    if name in geometric:
        return geometric[name](image, arg, interpolation, fill)
    base = name.replace("Increasing", "").replace("Original", "")
    return pixel_ops[base](image, arg)


def rand_augment(image: tf.Tensor, key: tf.Tensor, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, ops: Sequence[str] = INCREASING_OPS,
                 interpolation: str = "bicubic", fill: Sequence[int] = FILL, translate_pct: float = 0.45,
                 translate_const: float | None = None) -> tf.Tensor:
    """timm's RandAugment (default: rand-m9-mstd0.5-inc1, bicubic, fill img_mean) of a [H, W, 3] image: uint8.

    Layer i draws an op uniformly (with replacement) from `ops`, applies it with probability `prob`, then
    draws magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10] (no noise when magnitude_std <= 0), the
    sign of signed levels (50%) and, for interpolation="random", bilinear or bicubic (50%).
    `translate_const` (absolute TranslateX/Y only, not in the increasing set) defaults to timm's
    int(0.45 * min(H, W)). `key` is a stateless key [2]; the same key gives the same image.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; allowed: {INTERPOLATIONS}")
    if num_ops < 0 or not ops:
        raise ValueError(f"num_ops={num_ops} and ops={ops!r}: need num_ops >= 0 and at least one op")
    for name in ops:
        level_to_arg(name, 0.0, False)  # raises early on unknown names
    image = to_uint8(image)
    if translate_const is None:
        if image.shape[0] is None or image.shape[1] is None:
            raise ValueError("translate_const must be given when the image size is not static")
        translate_const = int(min(image.shape[0], image.shape[1]) * 0.45)
    keys = tf.random.experimental.stateless_split(key, num_ops, alg="philox")
    for i in range(num_ops):
        u = tf.random.stateless_uniform([4], seed=keys[i], dtype=tf.float64, alg="philox")
        noise = tf.random.stateless_normal([], seed=tf.random.experimental.stateless_fold_in(keys[i], 1,
                                                                                             alg="philox"),
                                           dtype=tf.float64, alg="philox")
        op_index = tf.minimum(tf.cast(u[0] * len(ops), tf.int32), len(ops) - 1)
        applied = u[1] < prob  # timm skips when random() > prob
        level = magnitude + magnitude_std * noise if magnitude_std > 0 else tf.constant(magnitude, tf.float64)
        level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
        negate = u[2] > 0.5  # timm's _randomly_negate

        def branch(name, use_bicubic):
            kwargs = dict(fill=fill, translate_pct=translate_pct, translate_const=translate_const)
            return lambda: apply_op(name, image, level, negate,
                                    interpolation="bicubic" if use_bicubic else "bilinear", **kwargs)

        def run_op(image=image, level=level, negate=negate, op_index=op_index, u_interp=u[3]):
            if interpolation == "random":
                # the choice is drawn for every op (timm draws it in each call, geometric or not)
                return tf.cond(u_interp < 0.5,
                               lambda: tf.switch_case(op_index, [branch(n, False) for n in ops]),
                               lambda: tf.switch_case(op_index, [branch(n, True) for n in ops]))
            return tf.switch_case(op_index, [branch(n, interpolation == "bicubic") for n in ops])

        shape = image.shape
        image = tf.cond(applied, run_op, lambda: image)
        image.set_shape(shape)
    return image


# ---------------------------------------------------------------------------------------------------------
# Random erasing and the evaluation transform.
# ---------------------------------------------------------------------------------------------------------

ERASE_ATTEMPTS = 10  # timm's RandomErasing tries 10 boxes per erasure, then gives up


def random_erasing(image: tf.Tensor, key: tf.Tensor, probability: float = 0.25, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
                   mode: str = "pixel", min_count: int = 1, max_count: int | None = None) -> tf.Tensor:
    """timm's RandomErasing of one normalised float [H, W, C] image (defaults: MAE's reprob 0.25, 'pixel').

    With probability `probability`: count ~ U{min_count..max_count} boxes; each tries up to 10 times a box of
    area U(min_area, max_area) * H * W / count and log-uniform aspect (height / width) in
    [min_aspect, max_aspect or 1 / min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
    kept if h < H and w < W, at a uniform position; it is filled with N(0, 1) per pixel ('pixel'), per channel
    ('rand') or zeros ('const').
    """
    mode = mode.lower()
    if mode not in ("pixel", "rand", "const", ""):
        raise ValueError(f"mode={mode!r}; allowed: 'pixel', 'rand', 'const'")
    max_count = max_count or min_count
    if not 1 <= min_count <= max_count:
        raise ValueError(f"min_count={min_count}, max_count={max_count}: need 1 <= min_count <= max_count")
    max_aspect = max_aspect or 1.0 / min_aspect
    image = tf.convert_to_tensor(image, tf.float32)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    keys = tf.random.experimental.stateless_split(key, 2 + 2 * max_count, alg="philox")
    u = tf.random.stateless_uniform([2], seed=keys[0], dtype=tf.float64, alg="philox")
    erase = u[0] < probability  # timm skips when random() > probability
    count = min_count + tf.minimum(tf.cast(u[1] * (max_count - min_count + 1), tf.int32), max_count - min_count)
    rows = tf.range(shape[0])[:, None, None]
    columns = tf.range(shape[1])[None, :, None]
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    for i in range(max_count):
        draws = tf.random.stateless_uniform([2 * ERASE_ATTEMPTS + 2], seed=keys[2 + i], dtype=tf.float64,
                                            alg="philox")
        target_area = (min_area + (max_area - min_area) * draws[:ERASE_ATTEMPTS]) * height * width / tf.cast(
            count, tf.float64)
        aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[ERASE_ATTEMPTS:2 * ERASE_ATTEMPTS])
        h = tf.round(tf.sqrt(target_area * aspect))  # half to even, as Python's round()
        w = tf.round(tf.sqrt(target_area / aspect))
        fits = (w < width) & (h < height)
        first = tf.argmax(tf.cast(fits, tf.int32))
        box_h, box_w = h[first], w[first]
        top = tf.cast(tf.floor(draws[-2] * (height - box_h + 1)), tf.int32)  # randint(0, H - h)
        left = tf.cast(tf.floor(draws[-1] * (width - box_w + 1)), tf.int32)
        box_h, box_w = tf.cast(box_h, tf.int32), tf.cast(box_w, tf.int32)
        inside = (rows >= top) & (rows < top + box_h) & (columns >= left) & (columns < left + box_w)
        inside &= erase & tf.reduce_any(fits) & (i < count)
        if mode == "pixel":
            noise = tf.random.stateless_normal(shape, seed=keys[1 + max_count + i], alg="philox")
        elif mode == "rand":
            noise = tf.random.stateless_normal([1, 1, shape[2]], seed=keys[1 + max_count + i], alg="philox")
        else:
            noise = tf.zeros([1, 1, shape[2]])
        image = tf.where(inside, noise, image)
    return image


def preprocess_for_eval(image: tf.Tensor, image_size: int = 224, crop_pct: float = 224 / 256) -> tf.Tensor:
    """MAE's eval transform of a uint8 [h, w, C] image: Resize(int(image_size / crop_pct), bicubic) of the
    shorter side, CenterCrop(image_size), ToTensor, Normalize: [image_size, image_size, C] float32.

    Sizes and offsets follow torchvision: the longer side becomes int(size * long / short); the crop starts at
    int(round((side - image_size) / 2)). Resizing is PIL's antialiased bicubic (tf.image.resize with
    antialias=True), rounded to uint8 as PIL stores it.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1]")
    size = int(image_size / crop_pct)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # int(size * long / short) in doubles, as torchvision's Python arithmetic
    new_long = tf.cast(tf.floor(size * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
    new_height = tf.where(height <= width, size, new_long)
    new_width = tf.where(height <= width, new_long, size)
    unchanged = tf.equal(short, size)  # torchvision returns the image itself then

    def resize():
        resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_height, new_width]), method="bicubic",
                                  antialias=True)
        return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

    resized = tf.cond(unchanged, lambda: tf.cast(image, tf.float32), resize)
    top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float64) / 2.0), tf.int32)  # half to even
    left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float64) / 2.0), tf.int32)
    crop = resized[top:top + image_size, left:left + image_size]
    num_channels = image.shape[-1] or 3
    crop = tf.ensure_shape(crop, [image_size, image_size, num_channels])
    return _normalise(crop, num_channels)
