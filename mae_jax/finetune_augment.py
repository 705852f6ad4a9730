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
  - RandomErasing: probability 0.25, mode 'pixel', on the normalised [H, W, C] image; the input pipeline draws
    its boxes here (`random_erasing_boxes`) and the device fills them after normalising (`mixup.fill_erased`).
  - Evaluation (`preprocess_for_eval`): Resize(int(size / crop_pct), bicubic) of the shorter side, then
    CenterCrop(size), as uint8; crop_pct = 224 / 256 (MAE uses 1.0 for input sizes above 224).
  - The whole training transform (`preprocess_for_finetune_train`): RandomResizedCrop(scale (0.08, 1)) and
    flip from `mae_jax.augment`, RandAugment, as uint8, and RandomErasing's boxes (normalisation and the
    erasing's noise follow on the device).
Pixel ops are functions of (image, argument) (`posterize(image, bits)`, `color(image, factor)`, ...); the
geometric ones are `geometric_op(name, image, argument)`; `apply_op(name, image, magnitude, negate)` maps a
magnitude to the argument as timm does.
Randomness comes from stateless keys [2], so the same key always gives the same image.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from mae_jax import augment, pixels
from mae_jax.augment import preprocess_for_train

# Everything here is plain TensorFlow with no tensor-dependent Python control flow: AutoGraph's conversion
# (in tf.function and tf.data map) would only add work, ~10 s of tracing for rand_augment.
_graph_only = tf.autograph.experimental.do_not_convert

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are on a 0..10 scale
FILL = tuple(min(255, round(255 * float(m))) for m in pixels.IMAGENET_MEAN)  # timm's img_mean: (124, 116, 104)
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


to_uint8 = _graph_only(augment.to_uint8)


def _float64(value) -> tf.Tensor:
    """A scalar as float64; Python floats go straight to float64 (tf.cast would round them to float32 first)."""
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray, np.generic)):
        return tf.cast(value, tf.float64)
    return tf.constant(value, tf.float64)


def _opaque(value: float) -> tf.Tensor:
    """A float64 constant that Grappler's constant folding cannot merge into the arithmetic around it.

    In a tf.function, constant folding rewrites x / c as x * (1 / c) and (x * c1) * c2 as x * (c1 * c2):
    an ulp away from Pillow's and timm's double arithmetic, enough to flip truncated pixels that sit on an
    integer (e.g. a whole-pixel translation). PlaceholderWithDefault is not folded; eagerly it is `value`.
    """
    return tf.raw_ops.PlaceholderWithDefault(input=tf.constant(value, tf.float64), shape=[])


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


@_graph_only
def invert(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.invert: 255 - x."""
    return 255 - to_uint8(image)


@_graph_only
def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """ImageOps.posterize: keep the `bits` most significant bits (0 keeps none: black); 8 or more is a no-op."""
    image = to_uint8(image)
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


@_graph_only
def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """ImageOps.solarize: values >= threshold become 255 - x."""
    image = to_uint8(image)
    return tf.where(tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32), image, 255 - image)


@_graph_only
def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
    """timm's solarize_add: values below threshold get min(255, x + addition)."""
    x = tf.cast(to_uint8(image), tf.int32)
    added = tf.minimum(255, x + tf.cast(addition, tf.int32))
    return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


@_graph_only
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


@_graph_only
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


@_graph_only
def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Image.blend(degenerate, image, factor): in1 + factor * (in2 - in1) in float32, clipped, truncated."""
    in1 = tf.cast(degenerate, tf.int32)
    diff = tf.cast(tf.cast(image, tf.int32) - in1, tf.float32)
    value = tf.cast(in1, tf.float32) + tf.cast(factor, tf.float32) * diff  # Pillow's C float arithmetic
    return tf.cast(tf.clip_by_value(value, 0.0, 255.0), tf.uint8)  # the cast truncates, as C's (UINT8)


@_graph_only
def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Color: blend with the grey (L -> RGB) image; 0 gives grey, 1 the image."""
    image = to_uint8(image)
    grey = tf.repeat(_luminance(image)[..., None], 3, axis=-1)
    return blend(grey, image, factor)


@_graph_only
def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with a flat image of the rounded mean luminance."""
    image = to_uint8(image)
    mean = tf.reduce_mean(tf.cast(_luminance(image), tf.float64))
    flat = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.int32))
    return blend(flat, image, factor)


@_graph_only
def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    image = to_uint8(image)
    return blend(tf.zeros_like(image), image, factor)


@_graph_only
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


@_graph_only
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


@_graph_only
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
    inside = ((x_in >= 0.0) & (x_in < tf.cast(width, tf.float64))
              & (y_in >= 0.0) & (y_in < tf.cast(height, tf.float64)))
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
    return tf.round(value * _opaque(1e15)) / _opaque(1e15)


@_graph_only
def rotation_matrix(degrees: tf.Tensor, height, width) -> tuple:
    """The affine matrix (a, b, c, d, e, f) Image.rotate(degrees) samples with (about the centre, same size)."""
    # Pillow: angle = -math.radians(degrees % 360.0)
    angle = -(tf.math.floormod(_float64(degrees), _opaque(360.0)) * _opaque(math.pi / 180.0))
    cos, sin = _pil_round15(tf.cos(angle)), _pil_round15(tf.sin(angle))
    centre_x, centre_y = tf.cast(width, tf.float64) / 2.0, tf.cast(height, tf.float64) / 2.0
    # Pillow maps output to input about the centre: matrix[2], matrix[5] = M @ (-centre) + centre.
    c = cos * -centre_x + sin * -centre_y + 0.0 + centre_x
    f = -sin * -centre_x + cos * -centre_y + 0.0 + centre_y
    return cos, sin, c, -sin, cos, f


_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


@_graph_only
def geometric_matrix(name: str, arg: tf.Tensor, height, width) -> tuple:
    """The affine matrix of timm's geometric op `name` (one of _GEOMETRIC_OPS) with level argument `arg`."""
    if name == "Rotate":
        return rotation_matrix(arg, height, width)
    arg = _float64(arg)
    if name == "TranslateXRel":  # as timm: pixels = pct * img.size[0], not rounded
        name, arg = "TranslateX", arg * tf.cast(width, tf.float64)
    if name == "TranslateYRel":
        name, arg = "TranslateY", arg * tf.cast(height, tf.float64)
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
    return {"ShearX": (one, arg, zero, zero, one, zero), "ShearY": (one, zero, zero, arg, one, zero),
            "TranslateX": (one, zero, arg, zero, one, zero), "TranslateY": (one, zero, zero, zero, one, arg)}[name]


@_graph_only
def geometric_op(name: str, image: tf.Tensor, arg: tf.Tensor, interpolation: str = "bicubic",
                 fill: Sequence[int] = FILL) -> tf.Tensor:
    """timm's geometric op `name` with level argument `arg` on a uint8 [H, W, 3] image, as Pillow computes it.

    Rotate: Image.rotate(arg degrees, counter-clockwise about the centre); ShearX / ShearY: affine
    (1, arg, 0, 0, 1, 0) / (1, 0, 0, arg, 1, 0); TranslateX / TranslateY: (1, 0, arg, 0, 1, 0) /
    (1, 0, 0, 0, 1, arg) (the content moves left / up by arg pixels); TranslateXRel / TranslateYRel: the same
    by arg * width / arg * height pixels, not rounded. Resampled with `interpolation`, filled with `fill`.
    """
    if name not in _GEOMETRIC_OPS:
        raise ValueError(f"geometric op {name!r}; known: {_GEOMETRIC_OPS}")
    image = to_uint8(image)
    matrix = geometric_matrix(name, arg, tf.shape(image)[0], tf.shape(image)[1])
    return affine_transform(image, matrix, interpolation, fill)


# ---------------------------------------------------------------------------------------------------------
# Magnitude -> op argument (timm's LEVEL_TO_ARG), and RandAugment.
# ---------------------------------------------------------------------------------------------------------


@_graph_only
def level_to_arg(name: str, magnitude: tf.Tensor, negate: tf.Tensor, *, translate_pct: float = 0.45,
                 translate_const: float = 250.0) -> tf.Tensor | None:
    """timm's LEVEL_TO_ARG[name](magnitude) as a float64 scalar (None for argument-free ops).

    `magnitude` is on timm's 0..10 scale; `negate` (bool) is the outcome of timm's _randomly_negate for the
    signed levels (Rotate, Shear*, Translate*, *Increasing enhancements) and ignored by the others.
    """
    c = _opaque  # every constant opaque, so the level is computed exactly as timm's Python does
    m = _float64(magnitude) / c(MAX_LEVEL)

    def signed(level):
        return tf.where(negate, -level, level)

    def trunc(level):  # Python's int() of a non-negative level
        return tf.floor(level)

    table: dict[str, Callable[[], tf.Tensor]] = {
        "Rotate": lambda: signed(m * c(30.0)),
        "Posterize": lambda: trunc(m * c(4.0)),
        "PosterizeIncreasing": lambda: c(4.0) - trunc(m * c(4.0)),
        "PosterizeOriginal": lambda: trunc(m * c(4.0)) + c(4.0),
        "Solarize": lambda: trunc(m * c(256.0)),
        "SolarizeIncreasing": lambda: c(256.0) - trunc(m * c(256.0)),
        "SolarizeAdd": lambda: trunc(m * c(110.0)),
        "ShearX": lambda: signed(m * c(0.3)),
        "ShearY": lambda: signed(m * c(0.3)),
        "TranslateX": lambda: signed(m * c(float(translate_const))),
        "TranslateY": lambda: signed(m * c(float(translate_const))),
        "TranslateXRel": lambda: signed(m * c(translate_pct)),
        "TranslateYRel": lambda: signed(m * c(translate_pct)),
    }
    for enhancement in ("Color", "Contrast", "Brightness", "Sharpness"):
        table[enhancement] = lambda: m * c(1.8) + c(0.1)
        table[enhancement + "Increasing"] = lambda: c(1.0) + signed(m * c(0.9))
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name not in table:
        known = sorted([*table, "AutoContrast", "Equalize", "Invert"])
        raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")
    return table[name]()


@_graph_only
def apply_op(name: str, image: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor, *,
             interpolation: str = "bicubic", fill: Sequence[int] = FILL, translate_pct: float = 0.45,
             translate_const: float = 250.0) -> tf.Tensor:
    """timm's AugmentOp(name) at a given magnitude and sign, always applied: uint8 [H, W, 3]."""
    arg = level_to_arg(name, magnitude, negate, translate_pct=translate_pct, translate_const=translate_const)
    pixel_ops = {"Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color,
                 "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}
    if name in ("AutoContrast", "Equalize", "Invert"):
        return {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert}[name](image)
    if name in _GEOMETRIC_OPS:
        return geometric_op(name, image, arg, interpolation, fill)
    base = name.replace("Increasing", "").replace("Original", "")
    return pixel_ops[base](image, arg)


@_graph_only
def rand_augment_draws(key: tf.Tensor, num_ops: int = 2, num_choices: int = len(INCREASING_OPS),
                       magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
                       magnitude_max: float = MAX_LEVEL) -> dict[str, tf.Tensor]:
    """rand_augment's random choices for a stateless key [2], each [num_ops]: op_index (int32, uniform over
    num_choices), applied (bool, probability `prob`), magnitude (float64, N(magnitude, magnitude_std) clipped
    to [0, magnitude_max]; U(0, magnitude) when magnitude_std is inf, as timm's mstd > 100), negate (bool,
    50%) and bicubic (bool, 50%; used by interpolation="random" only).

    timm draws the magnitude, sign and interpolation only when an op is applied; drawing them always and
    ignoring them otherwise gives the same distribution.
    """
    u = tf.random.stateless_uniform([num_ops, 4], seed=key, dtype=tf.float64, alg="philox")
    noise_key = tf.random.experimental.stateless_fold_in(key, 1, alg="philox")
    noise = tf.random.stateless_normal([num_ops], seed=noise_key, dtype=tf.float64, alg="philox")
    if math.isinf(magnitude_std):  # timm's random.uniform(0, magnitude)
        uniform = tf.random.stateless_uniform([num_ops], seed=noise_key, dtype=tf.float64, alg="philox")
        level = magnitude * uniform
    else:
        level = magnitude + magnitude_std * noise if magnitude_std > 0 else tf.fill([num_ops], _float64(magnitude))
    return {
        "op_index": tf.minimum(tf.cast(u[:, 0] * num_choices, tf.int32), num_choices - 1),
        "applied": u[:, 1] < prob,  # timm skips the op when random() > prob
        "magnitude": tf.clip_by_value(level, 0.0, float(magnitude_max)),
        "negate": u[:, 2] > 0.5,  # timm's _randomly_negate
        "bicubic": u[:, 3] < 0.5,  # timm's random.choice((BILINEAR, BICUBIC))
    }


@_graph_only
def rand_augment(image: tf.Tensor, key: tf.Tensor, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, ops: Sequence[str] = INCREASING_OPS,
                 interpolation: str = "bicubic", fill: Sequence[int] = FILL, translate_pct: float = 0.45,
                 translate_const: float | None = None, magnitude_max: float = MAX_LEVEL) -> tf.Tensor:
    """timm's RandAugment (default: rand-m9-mstd0.5-inc1, bicubic, fill img_mean) of a [H, W, 3] image: uint8.

    Layer i draws an op uniformly (with replacement) from `ops`, applies it with probability `prob`, with
    magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (no noise when magnitude_std <= 0;
    U(0, magnitude) when it is inf), the sign
    of signed levels (50%) and, for interpolation="random", bilinear or bicubic (50%): see
    `rand_augment_draws`. `translate_const` (absolute TranslateX/Y only, not in the increasing set) defaults
    to timm's int(0.45 * min(H, W)). `key` is a stateless key [2]; the same key gives the same image.
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
    draws = rand_augment_draws(key, num_ops, len(ops), magnitude, magnitude_std, prob, magnitude_max)
    levels = dict(translate_pct=translate_pct, translate_const=translate_const)
    is_geometric = tf.constant([name in _GEOMETRIC_OPS for name in ops])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    identity = tuple(tf.constant(v, tf.float64) for v in (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    for i in range(num_ops):
        op_index, level, negate = draws["op_index"][i], draws["magnitude"][i], draws["negate"][i]

        # All geometric ops are affine: one sampler per layer, fed the chosen op's matrix, keeps the graph
        # (and its tracing time) small.
        def matrix_branch(name, level=level, negate=negate):
            if name not in _GEOMETRIC_OPS:
                return lambda: identity
            return lambda: tuple(geometric_matrix(name, level_to_arg(name, level, negate, **levels), height, width))

        def pixel_branch(name, image=image, level=level, negate=negate):
            if name in _GEOMETRIC_OPS:
                return lambda: image
            return lambda: apply_op(name, image, level, negate, **levels)

        def run_geometric(image=image, op_index=op_index, bicubic=draws["bicubic"][i], branches=matrix_branch):
            matrix = tf.switch_case(op_index, [branches(name) for name in ops])
            if interpolation == "random":
                return tf.cond(bicubic, lambda: affine_transform(image, matrix, "bicubic", fill),
                               lambda: affine_transform(image, matrix, "bilinear", fill))
            return affine_transform(image, matrix, interpolation, fill)

        def run_pixel(op_index=op_index, branches=pixel_branch):
            return tf.switch_case(op_index, [branches(name) for name in ops])

        def run(op_index=op_index, run_geometric=run_geometric, run_pixel=run_pixel):
            return tf.cond(tf.gather(is_geometric, op_index), run_geometric, run_pixel)

        shape = image.shape
        image = tf.cond(draws["applied"][i], run, lambda image=image: image)
        image.set_shape(shape)
    return image


# ---------------------------------------------------------------------------------------------------------
# Random erasing and the evaluation transform.
# ---------------------------------------------------------------------------------------------------------

ERASE_ATTEMPTS = 10  # timm's RandomErasing tries 10 boxes per erasure, then gives up


def _erasing_keys(key: tf.Tensor, max_count: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(key, 1 + 2 * max_count, alg="philox")  # [0]; boxes; noise


@_graph_only
def random_erasing_boxes(key: tf.Tensor, height, width, probability: float = 0.25, min_area: float = 0.02,
                         max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
                         min_count: int = 1, max_count: int | None = None) -> tf.Tensor:
    """The boxes timm's RandomErasing erases in an image of `height` x `width`: [max_count, 4] int32 rows (top,
    left, box height, box width), a row of zeros for a box not drawn (defaults: MAE's reprob 0.25).

    With probability `probability`: count ~ U{min_count..max_count} boxes; each tries up to 10 times a box of
    area U(min_area, max_area) * H * W / count and log-uniform aspect (height / width) in
    [min_aspect, max_aspect or 1 / min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
    kept if h < H and w < W, at a uniform position. The fine-tuning input hands them to the device, which fills
    them there (`mixup.fill_erased`), after the normalisation.
    """
    max_count = max_count or min_count
    if not 1 <= min_count <= max_count:
        raise ValueError(f"min_count={min_count}, max_count={max_count}: need 1 <= min_count <= max_count")
    max_aspect = max_aspect or 1.0 / min_aspect
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    keys = _erasing_keys(key, max_count)
    u = tf.random.stateless_uniform([2], seed=keys[0], dtype=tf.float64, alg="philox")
    erase = u[0] < probability  # timm skips when random() > probability
    count = min_count + tf.minimum(tf.cast(u[1] * (max_count - min_count + 1), tf.int32), max_count - min_count)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    boxes = []
    for i in range(max_count):
        draws = tf.random.stateless_uniform([2 * ERASE_ATTEMPTS + 2], seed=keys[1 + i], dtype=tf.float64,
                                            alg="philox")
        target_area = (min_area + (max_area - min_area) * draws[:ERASE_ATTEMPTS]) * height * width / tf.cast(
            count, tf.float64)
        aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[ERASE_ATTEMPTS:2 * ERASE_ATTEMPTS])
        h = tf.round(tf.sqrt(target_area * aspect))  # half to even, as Python's round()
        w = tf.round(tf.sqrt(target_area / aspect))
        fits = (w < width) & (h < height)
        first = tf.argmax(tf.cast(fits, tf.int32))
        box_h, box_w = h[first], w[first]
        top = tf.floor(draws[-2] * (height - box_h + 1))  # randint(0, H - h)
        left = tf.floor(draws[-1] * (width - box_w + 1))
        drawn = erase & tf.reduce_any(fits) & (i < count)
        boxes.append(tf.where(drawn, tf.cast(tf.stack([top, left, box_h, box_w]), tf.int32), tf.zeros([4], tf.int32)))
    return tf.stack(boxes)


_PIL_PRECISION_BITS = 22  # Resample.c's PRECISION_BITS (32 - 8 - 2): fixed-point weights of 8-bit images


def _pil_bicubic(x: tf.Tensor) -> tf.Tensor:
    """Resample.c's bicubic_filter (Keys, a = -0.5), in its order of operations."""
    x = tf.abs(x)
    inner = ((1.5 * x - 2.5) * x) * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tf.where(x < 1.0, inner, tf.where(x < 2.0, outer, tf.zeros_like(x)))


def _pil_weights(in_size: tf.Tensor, out_size: tf.Tensor, start: tf.Tensor,
                 count: tf.Tensor) -> tuple[tf.SparseTensor, tf.Tensor, tf.Tensor]:
    """Output pixels start..start+count of Pillow's bicubic resampling of one axis from in_size to out_size:
    (matrix, first, used), the sparse [count, used] matrix of their fixed-point weights over input pixels
    first..first+used, the only ones they read.

    Resample.c's precompute_coeffs (support 2 x max(1, in / out) input pixels around each output pixel's
    centre, weights normalised to sum 1 in doubles, summed in Pillow's order) and normalize_coeffs_8bpc (each
    weight x 2^22, rounded half away from zero). The weights are integers held in float64.
    """
    in_f, out_f = tf.cast(in_size, tf.float64), tf.cast(out_size, tf.float64)
    scale = in_f / out_f
    filterscale = tf.maximum(scale, 1.0)
    support = 2.0 * filterscale
    ksize = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
    outputs = tf.range(tf.cast(start, tf.float64), tf.cast(start + count, tf.float64), dtype=tf.float64)
    center = (outputs + 0.5) * scale  # [count]
    # (int) truncation of Pillow's "+ 0.5" rounding; a negative start is clamped to 0 either way.
    first = tf.maximum(tf.floor(center - support + 0.5), 0.0)
    taps_used = tf.minimum(tf.floor(center + support + 0.5), in_f) - first  # [count] taps of each output pixel
    taps = tf.range(tf.cast(ksize, tf.float64), dtype=tf.float64)  # [K]
    valid = taps[None, :] < taps_used[:, None]  # [count, K]
    positions = first[:, None] + taps[None, :]  # [count, K] input pixel indices
    weights = tf.where(valid, _pil_bicubic((positions - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    # Pillow sums the weights left to right, as a running sum does (a tree reduction could differ in the last bit).
    total = tf.math.cumsum(weights, axis=1)[:, -1]
    weights = tf.where(tf.not_equal(total, 0.0)[:, None], weights / total[:, None], weights)
    fixed = tf.sign(weights) * tf.floor(tf.abs(weights) * float(1 << _PIL_PRECISION_BITS) + 0.5)
    lowest = tf.reduce_min(first)  # the windows only move right: the first output's, and the last output's end
    used = tf.reduce_max(first + taps_used) - lowest
    rows = tf.broadcast_to(tf.range(tf.cast(count, tf.int64))[:, None], tf.shape(valid))
    columns = tf.cast(positions - lowest, tf.int64)
    indices = tf.stack([tf.boolean_mask(rows, valid), tf.boolean_mask(columns, valid)], axis=1)
    matrix = tf.SparseTensor(indices, tf.boolean_mask(fixed, valid),
                             tf.stack([tf.cast(count, tf.int64), tf.cast(used, tf.int64)]))
    return matrix, tf.cast(lowest, tf.int32), tf.cast(used, tf.int32)


def _pil_support(in_size, out_size, start, count) -> tuple[tf.Tensor, tf.Tensor]:
    """(first, used): the input pixels that outputs start..start+count of a `_pil_pass` read."""
    def resampled():
        _, first, used = _pil_weights(in_size, out_size, start, count)
        return first, used

    return tf.cond(tf.equal(in_size, out_size), lambda: (start, count), resampled)


def _pil_pass(x: tf.Tensor, in_size, out_size, start, count, x_first=0) -> tf.Tensor:
    """Output pixels start..start+count of one Pillow pass along axis 0 (in_size -> out_size pixels), from x
    (float64 uint8 levels [n, ...], input pixels x_first..x_first+n, which must hold the ones read):
    [count, ...] levels. A pass of the same size is the identity (Pillow skips it).

    Sums of weight x level are integers below 2^31 (Pillow's int32 accumulator), exact in float64 in any order;
    Pillow then adds 2^21, shifts right by 22 (floor) and clips to 0..255: rounding half up.
    """
    def resampled():
        matrix, first, used = _pil_weights(in_size, out_size, start, count)
        read = x[first - x_first:first - x_first + used]
        sums = tf.sparse.sparse_dense_matmul(matrix, tf.reshape(read, [used, -1]))
        half = float(1 << (_PIL_PRECISION_BITS - 1))
        levels = tf.clip_by_value(tf.floor((sums + half) / float(1 << _PIL_PRECISION_BITS)), 0.0, 255.0)
        return tf.reshape(levels, tf.concat([[count], tf.shape(x)[1:]], axis=0))

    return tf.cond(tf.equal(in_size, out_size), lambda: x[start - x_first:start - x_first + count], resampled)


def _transposed(function: Callable, x: tf.Tensor, *args, **kwargs) -> tf.Tensor:
    """`function` along axis 1 of [h, w, C] `x` (a pass over the width)."""
    return tf.transpose(function(tf.transpose(x, [1, 0, 2]), *args, **kwargs), [1, 0, 2])


@_graph_only
def resize_bicubic_like_pil(image: tf.Tensor, size: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
    """PIL's Image.resize(BICUBIC) of a [h, w, C] image of uint8 levels to `size` [H, W]: float32 levels.

    Exactly Pillow's arithmetic (Resample.c): fixed-point weights, an integer sum per output pixel, rounded
    half up and stored as uint8 after each pass. As Pillow does, a pass whose size does not change is skipped
    (it would be exactly the identity), and the width is resampled first unless the height loses more than
    twice as many pixels as the width (Pillow >= 13's order; older Pillows always start with the width, which
    differs only on images shrunk to less than half their height). `window` [top, left, height, width]: only
    that part of the output, computed from only the input pixels it reads, equal to the same pixels of the
    whole (what a center crop after the resize keeps: `preprocess_for_eval`).
    """
    image = tf.cast(image, tf.float64)
    size = tf.cast(size, tf.int32)
    shape = tf.shape(image)
    in_h, in_w, out_h, out_w = shape[0], shape[1], size[0], size[1]
    top, left, height, width = tf.unstack(tf.cast(window, tf.int32) if window is not None else
                                          tf.stack([0, 0, out_h, out_w]))

    def width_first():  # the rows the height pass reads, resampled along the width
        first, used = _pil_support(in_h, out_h, top, height)
        x = _transposed(_pil_pass, image[first:first + used], in_w, out_w, left, width)
        return _pil_pass(x, in_h, out_h, top, height, x_first=first)

    def height_first():
        first, used = _pil_support(in_w, out_w, left, width)
        x = _pil_pass(image[:, first:first + used], in_h, out_h, top, height)
        return _transposed(_pil_pass, x, in_w, out_w, left, width, x_first=first)

    height_loss, width_loss = in_h - out_h, in_w - out_w
    resized = tf.cond((height_loss > 0) & (height_loss > 2 * width_loss), height_first, width_first)
    return tf.cast(resized, tf.float32)


@_graph_only
def preprocess_for_eval(image: tf.Tensor, image_size: int | Sequence[int] = 224,
                        crop_pct: float = 224 / 256) -> tf.Tensor:
    """MAE's eval transform of a uint8 [h, w, C] image: Resize(int(image_size / crop_pct), bicubic) of the
    shorter side, CenterCrop(image_size): [H, W, C] uint8 (ToTensor and Normalize follow on the device).

    Sizes and offsets follow torchvision: the longer side becomes int(size * long / short); the crop starts at
    int(round((side - image_size) / 2)). Resizing is exactly PIL's bicubic (`resize_bicubic_like_pil`).
    A non-square `image_size` (H, W) (the official code has none) generalises this: the image is scaled, its
    aspect kept, just enough to cover int(H / crop_pct) x int(W / crop_pct), then center-cropped to H x W; for
    H == W that is exactly the square rule.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1]")
    out_h, out_w = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else \
        (int(image_size[0]), int(image_size[1]))
    cover_h, cover_w = int(out_h / crop_pct), int(out_w / crop_pct)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    # Which side reaches its cover size last decides the scale; the other side is int(cover * side / side')
    # in doubles, as torchvision's Python arithmetic (for a square target: the shorter side becomes the size).
    height_decides = cover_h * w64 >= cover_w * h64
    new_height = tf.where(height_decides, cover_h, tf.cast(tf.floor(cover_w * h64 / w64), tf.int32))
    new_width = tf.where(height_decides, tf.cast(tf.floor(cover_h * w64 / h64), tf.int32), cover_w)
    top = tf.cast(tf.round(tf.cast(new_height - out_h, tf.float64) / 2.0), tf.int32)  # half to even
    left = tf.cast(tf.round(tf.cast(new_width - out_w, tf.float64) / 2.0), tf.int32)
    # Only the crop is resampled (the same pixels as PIL's whole resize); an image already of the new size comes
    # back unchanged, as from torchvision (both passes are skipped).
    crop = resize_bicubic_like_pil(image, tf.stack([new_height, new_width]), tf.stack([top, left, out_h, out_w]))
    num_channels = image.shape[-1] or 3
    return tf.ensure_shape(to_uint8(crop), [out_h, out_w, num_channels])


@_graph_only
def preprocess_for_finetune_train(encoded: tf.Tensor, key: tf.Tensor, *, image_size: tuple[int, int],
                                  scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                                  rand_augment_kwargs: dict | None = None,
                                  erase_probability: float = 0.25, hflip: float = 0.5) -> dict[str, tf.Tensor]:
    """MAE's fine-tuning transform of an encoded RGB image: {"images": [H, W, 3] uint8} and, with
    `erase_probability` > 0, "erase_boxes": [1, 4] int32.

    timm's transforms_imagenet_train as build_transform configures it: RandomResizedCrop(scale (0.08, 1),
    bicubic) and horizontal flip (probability `hflip`; `augment.preprocess_for_train`), held as uint8 as PIL holds
    it, RandAugment (`rand_augment`, default rand-m9-mstd0.5-inc1); then ToTensor + Normalize and
    RandomErasing('pixel', `erase_probability`), which follow on the device: the box comes from here
    (`random_erasing_boxes`), its N(0, 1) pixels from the step's random stream (`mixup.fill_erased`). The same
    key gives the same image and box.
    """
    crop_key, augment_key, erase_key = tf.unstack(tf.random.experimental.stateless_split(key, 3, alg="philox"))
    cropped = preprocess_for_train(encoded, crop_key, image_size=image_size, num_channels=3, scale=scale,
                                   ratio=ratio, hflip=hflip)
    image = tf.ensure_shape(rand_augment(cropped, augment_key, **(rand_augment_kwargs or {})), [*image_size, 3])
    if erase_probability <= 0:
        return {"images": image}
    return {"images": image, "erase_boxes": random_erasing_boxes(erase_key, image_size[0], image_size[1],
                                                                  probability=erase_probability)}
