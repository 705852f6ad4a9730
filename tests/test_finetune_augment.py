"""Tests of mae_jax.finetune_augment against a Pillow restatement of timm 0.3.2's fine-tuning transforms.

The oracle below restates, in Pillow calls, what timm 0.3.2 (`timm/data/auto_augment.py`,
`timm/data/random_erasing.py`) and MAE's `util/datasets.py` do. Two deliberate departures from calling
Pillow as timm does: Posterize with 0 bits is written as its lookup table (Pillow >= 10 refuses bits=0, the
Pillow of timm 0.3.2's time returned black), and box sampling of RandomErasing is restated with `random`.

Tolerances. Lookup-table ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd) must match
exactly: integer arithmetic on both sides. Blends (Color, Contrast, Brightness, Sharpness), the SMOOTH filter
and the affine ops (Rotate, Shear, Translate) truncate float results (float32 blends and filter, float64
sampling): they match exactly here too, but a build that contracts multiply-adds (FMA) may flip a value
lying on an integer to the level below, so they may differ by 1 level on at most 0.5% of the values.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import scipy.stats
import skimage.data
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mae_jax import augment, finetune_augment as fa, pixels

pytestmark = pytest.mark.slow  # traces the whole RandAugment graph: not in the quick subset

TIMM_FILL = (124, 116, 104)  # timm's img_mean: round(255 * (0.485, 0.456, 0.406))
LUT_OPS = {"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
           "Solarize", "SolarizeIncreasing", "SolarizeAdd"}
ALL_OPS = sorted(set(fa.INCREASING_OPS) | set(fa.DEFAULT_OPS) | {"PosterizeOriginal", "TranslateX", "TranslateY"})
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _photo(width: int = 48, height: int = 40) -> np.ndarray:
    """A small real photograph (uint8 [H, W, 3]), non-square so that rows and columns cannot be swapped."""
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC))


# ---------------------------------------------------------------------------------------------------------
# The oracle: timm 0.3.2's RandAugment op table, restated with Pillow.
# ---------------------------------------------------------------------------------------------------------


def _timm_level(name: str, magnitude: float, negate: bool, translate_const: float) -> tuple:
    """timm's LEVEL_TO_ARG: the magnitude (0..10) as the op's arguments; signed levels negated on request."""
    m = magnitude / 10.0
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * m * 30.0,)
    if name in ("ShearX", "ShearY"):
        return (sign * m * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * m * 0.45,)
    if name in ("TranslateX", "TranslateY"):
        return (sign * m * float(translate_const),)
    if name == "Posterize":
        return (int(m * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(m * 4),)
    if name == "PosterizeOriginal":
        return (int(m * 4) + 4,)
    if name == "Solarize":
        return (int(m * 256),)
    if name == "SolarizeIncreasing":
        return (256 - int(m * 256),)
    if name == "SolarizeAdd":
        return (int(m * 110),)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1 +- 0.9 m
        return (1.0 + sign * m * 0.9,)
    return (m * 1.8 + 0.1,)  # the plain enhancements: 0.1 .. 1.9


def _timm_op(img: Image.Image, name: str, magnitude: float, negate: bool, interpolation: str = "bicubic",
             translate_const: float = 250.0) -> Image.Image:
    """timm's AugmentOp(name) applied (probability aside) at one magnitude, with fill = img_mean."""
    args = _timm_level(name, magnitude, negate, translate_const)
    geometric = dict(resample=RESAMPLE[interpolation], fillcolor=TIMM_FILL)
    width, height = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name.startswith("Posterize"):
        bits = args[0]
        if bits >= 8:
            return img
        mask = ~(2 ** (8 - bits) - 1)
        return img.point([i & mask for i in range(256)] * 3)
    if name.startswith("SolarizeAdd"):
        return img.point([min(255, i + args[0]) if i < 128 else i for i in range(256)] * 3)
    if name.startswith("Solarize"):
        return ImageOps.solarize(img, args[0])
    if name == "Rotate":
        return img.rotate(args[0], **geometric)
    affine = {"ShearX": (1, args[0], 0, 0, 1, 0) if args else None,
              "ShearY": (1, 0, 0, args[0], 1, 0) if args else None,
              "TranslateX": (1, 0, args[0], 0, 1, 0) if args else None,
              "TranslateY": (1, 0, 0, 0, 1, args[0]) if args else None,
              "TranslateXRel": (1, 0, args[0] * width, 0, 1, 0) if args else None,
              "TranslateYRel": (1, 0, 0, 0, 1, args[0] * height) if args else None}
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name], **geometric)
    enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    return enhancer[name.replace("Increasing", "")](img).enhance(args[0])


def _assert_matches(name: str, ours, expected) -> None:
    ours, expected = np.asarray(ours).astype(np.int32), np.asarray(expected).astype(np.int32)
    assert ours.shape == expected.shape
    if name in LUT_OPS:
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        return
    difference = np.abs(ours - expected)
    assert difference.max() <= 1, (name, difference.max())
    assert np.mean(difference > 0) <= 0.005, (name, np.mean(difference > 0))


@tf.function
def _apply_op_graph(name, image, magnitude, negate, interpolation):
    return fa.apply_op(name, image, magnitude, negate, interpolation=interpolation, translate_const=17.0)


def box_mask(box: tf.Tensor, height, width) -> tf.Tensor:
    """[H, W, 1] bool: the pixels of `box` (top, left, height, width)."""
    rows = tf.range(height)[:, None, None]
    columns = tf.range(width)[None, :, None]
    return (rows >= box[0]) & (rows < box[0] + box[2]) & (columns >= box[1]) & (columns < box[1] + box[3])


@tf.autograph.experimental.do_not_convert
def random_erasing(image: tf.Tensor, key: tf.Tensor, probability: float = 0.25, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
                   mode: str = "pixel", min_count: int = 1, max_count: int | None = None) -> tf.Tensor:
    """timm's RandomErasing of one normalised float [H, W, C] image in TensorFlow (the reference the device's
    filling is tested against): the boxes of `random_erasing_boxes`, each filled with N(0, 1) per pixel
    ('pixel'), per channel ('rand') or zeros ('const')."""
    mode = mode.lower()
    if mode not in ("pixel", "rand", "const", ""):
        raise ValueError(f"mode={mode!r}; allowed: 'pixel', 'rand', 'const'")
    max_count = max_count or min_count
    image = tf.convert_to_tensor(image, tf.float32)
    shape = tf.shape(image)
    boxes = fa.random_erasing_boxes(key, shape[0], shape[1], probability, min_area, max_area, min_aspect,
                                    max_aspect, min_count, max_count)
    keys = fa._erasing_keys(key, max_count)
    for i in range(max_count):
        if mode == "pixel":
            noise = tf.random.stateless_normal(shape, seed=keys[1 + max_count + i], alg="philox")
        elif mode == "rand":
            noise = tf.random.stateless_normal([1, 1, shape[2]], seed=keys[1 + max_count + i], alg="philox")
        else:
            noise = tf.zeros([1, 1, shape[2]])
        image = tf.where(box_mask(boxes[i], shape[0], shape[1]), noise, image)
    return image


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_matches_pillow(name):
    image = _photo()
    pil = Image.fromarray(image)
    for magnitude in (0.0, 3.3, 8.61, 9.0, 10.0):
        for negate in (False, True):
            for interpolation in ("bicubic", "bilinear") if name in fa._GEOMETRIC_OPS else ("bicubic",):
                ours = _apply_op_graph(name, tf.constant(image), tf.constant(magnitude, tf.float64),
                                       tf.constant(negate), interpolation)
                expected = _timm_op(pil, name, magnitude, negate, interpolation, translate_const=17.0)
                _assert_matches(f"{name} m={magnitude} negate={negate} {interpolation}", ours, expected)


def test_ops_on_edge_cases():
    """Flat and two-level channels (Pillow's AutoContrast/Equalize identity cases), float input, 255s."""
    flat = np.full((6, 7, 3), 77, np.uint8)
    two_levels = np.zeros((6, 7, 3), np.uint8)
    two_levels[:, :3] = [10, 200, 255]
    for image in (flat, two_levels, np.full((6, 7, 3), 255, np.uint8)):
        pil = Image.fromarray(image)
        np.testing.assert_array_equal(fa.auto_contrast(image), ImageOps.autocontrast(pil))
        np.testing.assert_array_equal(fa.equalize(image), ImageOps.equalize(pil))
        np.testing.assert_array_equal(fa.contrast(image, 1.7), ImageEnhance.Contrast(pil).enhance(1.7))
    # float input in 0..255 is rounded the way Pillow would store it
    np.testing.assert_array_equal(fa.invert(tf.constant([[[0.4, 254.6, 300.0]]])), [[[255, 0, 0]]])


def test_affine_fill_and_identity():
    """Zero-magnitude geometric ops are the identity; what moves in from outside is img_mean."""
    image = _photo()
    np.testing.assert_array_equal(fa.geometric_op("Rotate", image, 0.0), image)
    np.testing.assert_array_equal(fa.geometric_op("ShearX", image, 0.0), image)
    shifted = np.asarray(fa.geometric_op("TranslateX", image, 10.0))
    np.testing.assert_array_equal(shifted[:, -10:], np.broadcast_to(TIMM_FILL, (40, 10, 3)))
    np.testing.assert_array_equal(shifted[:, :-10], image[:, 10:])  # whole-pixel shifts copy pixels
    assert fa.FILL == TIMM_FILL


# ---------------------------------------------------------------------------------------------------------
# RandAugment: the composition, the random choices, determinism.
# ---------------------------------------------------------------------------------------------------------


@tf.function
def _rand_augment_graph(image, key, interpolation):
    return fa.rand_augment(image, key, interpolation=interpolation)


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_rand_augment_matches_timm_given_its_draws(interpolation):
    """rand_augment(key) is timm's RandAugment replaying the draws `rand_augment_draws(key)` reports."""
    image = _photo()
    applied_ops = set()
    for seed in range(24):
        key = tf.constant([seed, 7], tf.int64)
        draws = {k: v.numpy() for k, v in fa.rand_augment_draws(key).items()}
        expected = Image.fromarray(image)
        for i in range(2):
            if not draws["applied"][i]:
                continue
            name = fa.INCREASING_OPS[draws["op_index"][i]]
            applied_ops.add(name)
            method = "bilinear" if interpolation == "random" and not draws["bicubic"][i] else "bicubic"
            expected = _timm_op(expected, name, float(draws["magnitude"][i]), bool(draws["negate"][i]), method)
        ours = _rand_augment_graph(tf.constant(image), key, interpolation)
        assert ours.dtype == tf.uint8
        _assert_matches("composition", ours, expected)
    assert len(applied_ops) >= 8  # the keys exercised many different ops


def _draws_of_many_keys(num_keys: int, **kwargs) -> dict[str, np.ndarray]:
    keys = tf.stack([tf.range(num_keys, dtype=tf.int64), tf.fill([num_keys], tf.constant(3, tf.int64))], axis=1)
    ds = tf.data.Dataset.from_tensor_slices(keys).map(lambda key: fa.rand_augment_draws(key, **kwargs))
    return {k: v.reshape(-1) for k, v in next(ds.batch(num_keys).as_numpy_iterator()).items()}


def test_rand_augment_draw_statistics():
    """2 layers x 12000 keys: op uniform over 15, applied 50%, magnitude N(9, 0.5) clipped to [0, 10], sign 50%."""
    draws = _draws_of_many_keys(12000)
    n = draws["op_index"].size
    counts = np.bincount(draws["op_index"], minlength=15)
    assert counts.size == 15
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts
    four_sigma = 4 * math.sqrt(0.25 / n)
    for flag in ("applied", "negate", "bicubic"):
        assert abs(draws[flag].mean() - 0.5) < four_sigma, flag
    magnitude = draws["magnitude"]
    assert magnitude.min() >= 0.0 and magnitude.max() == 10.0
    clipped = 1 - scipy.stats.norm.cdf(2.0)  # P(N(9, 0.5) > 10) = 2.3%
    assert abs(np.mean(magnitude == 10.0) - clipped) < 4 * math.sqrt(clipped * (1 - clipped) / n)
    # below the clip, the draws are the normal truncated at 10
    below = magnitude[magnitude < 10.0]
    truncated = scipy.stats.truncnorm(-np.inf, 2.0, loc=9.0, scale=0.5)
    assert scipy.stats.kstest(below, truncated.cdf).pvalue > 1e-3
    assert abs(below.mean() - truncated.mean()) < 0.02 and abs(below.std() - truncated.std()) < 0.02
    # the two layers draw independently: the same op twice as often as chance says (with replacement)
    pairs = draws["op_index"].reshape(-1, 2)
    assert abs(np.mean(pairs[:, 0] == pairs[:, 1]) - 1 / 15) < 4 * math.sqrt((1 / 15) * (14 / 15) / len(pairs))
    fixed = _draws_of_many_keys(100, magnitude_std=0.0)
    np.testing.assert_array_equal(fixed["magnitude"], 9.0)


def test_rand_augment_is_deterministic_and_runs_in_tf_data():
    """The same key gives the same image in a tf.function and in a parallel tf.data map."""
    image = tf.constant(_photo())
    keys = tf.constant([[1, 2], [1, 3], [5, 2], [9, 9]], tf.int64)
    traced = [_rand_augment_graph(image, key, "bicubic").numpy() for key in keys]
    # the map calls the traced function (a full trace costs seconds): the same graph, run by tf.data's threads
    ds = tf.data.Dataset.from_tensor_slices(keys).map(lambda key: _rand_augment_graph(image, key, "bicubic"),
                                                      num_parallel_calls=2, deterministic=True)
    for again, first in zip(ds.as_numpy_iterator(), traced, strict=True):
        np.testing.assert_array_equal(again, first)
    assert len({t.tobytes() for t in traced}) >= 3  # different keys, different images


def test_rand_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="interpolation"):
        fa.rand_augment(_photo(), tf.constant([0, 0], tf.int64), interpolation="nearest")
    with pytest.raises(ValueError, match="Blur"):
        fa.rand_augment(_photo(), tf.constant([0, 0], tf.int64), ops=("Blur",))


# ---------------------------------------------------------------------------------------------------------
# Random erasing.
# ---------------------------------------------------------------------------------------------------------


def _timm_erase_box(rng: random.Random, height: int, width: int, probability: float = 0.25,
                    min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
    """timm's RandomErasing._erase box sampling (count 1): (top, left, h, w), or None when nothing is erased."""
    if rng.random() > probability:
        return None
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def test_random_erasing_statistics_match_timm():
    height, width, n = 24, 40, 4000
    background = 1000.0  # erased values are N(0, 1): never this
    keys = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(11, tf.int64))], axis=1)
    ds = tf.data.Dataset.from_tensor_slices(keys).map(
        lambda key: random_erasing(tf.fill([height, width, 3], background), key))
    erased = next(ds.batch(n).as_numpy_iterator())
    mask = erased != background
    boxes, values = [], []
    for m, e in zip(mask, erased):
        if not m.any():
            continue
        rows, columns = np.nonzero(m.any(axis=(1, 2)))[0], np.nonzero(m.any(axis=(0, 2)))[0]
        top, left, h, w = rows[0], columns[0], rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1
        assert m[top:top + h, left:left + w].all() and m.sum() == 3 * h * w  # one solid box, all channels
        boxes.append((top, left, h, w))
        values.append(e[m])
    boxes = np.array(boxes)
    assert abs(len(boxes) / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    values = np.concatenate(values)
    assert abs(values.mean()) < 0.03 and abs(values.std() - 1.0) < 0.03  # per-pixel N(0, 1)
    top, left, h, w = boxes.T
    area = height * width
    # area in [0.02, 1/3] and aspect (h / w) in [0.3, 1 / 0.3], up to rounding h and w to whole pixels
    assert np.all((h + 0.5) * (w + 0.5) >= 0.02 * area) and np.all((h - 0.5) * (w - 0.5) <= area / 3)
    assert np.all((h + 0.5) / (w - 0.5) >= 0.3) and np.all((h - 0.5) / (w + 0.5) <= 1 / 0.3)
    assert np.all(h < height) and np.all(w < width) and np.all(top + h <= height) and np.all(left + w <= width)
    rng = random.Random(0)
    reference = np.array([b for b in (_timm_erase_box(rng, height, width) for _ in range(4 * n)) if b])
    for column, name in enumerate(("top", "left", "h", "w")):
        assert scipy.stats.ks_2samp(boxes[:, column], reference[:, column]).pvalue > 1e-3, name


def test_random_erasing_modes_and_determinism():
    image = tf.random.stateless_normal([16, 20, 3], seed=[0, 1])
    key = next(tf.constant([k, 0], tf.int64) for k in range(100)
               if np.any(random_erasing(image, tf.constant([k, 0], tf.int64), probability=1.0) != image))
    pixel = random_erasing(image, key, probability=1.0).numpy()
    np.testing.assert_array_equal(random_erasing(image, key, probability=1.0), pixel)
    inside = pixel != image.numpy()
    np.testing.assert_array_equal(np.asarray(random_erasing(image, key, probability=0.0)), image)
    const = random_erasing(image, key, probability=1.0, mode="const").numpy()
    np.testing.assert_array_equal(const[inside], 0.0)
    rand = random_erasing(image, key, probability=1.0, mode="rand").numpy()
    per_channel = rand[inside.all(axis=-1)]
    np.testing.assert_array_equal(per_channel, np.broadcast_to(per_channel[:1], per_channel.shape))
    with pytest.raises(ValueError, match="mode"):
        random_erasing(image, key, mode="blur")


# ---------------------------------------------------------------------------------------------------------
# Evaluation transform.
# ---------------------------------------------------------------------------------------------------------


def _mae_eval_pil(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """MAE's eval transform in PIL: torchvision Resize(int(size / crop_pct), BICUBIC) + CenterCrop(size), uint8."""
    pil = Image.fromarray(image)
    width, height = pil.size
    short_target = int(size / crop_pct)
    if width <= height:
        new_size = (short_target, int(short_target * height / width))
    else:
        new_size = (int(short_target * width / height), short_target)
    if min(width, height) != short_target:
        pil = pil.resize(new_size, Image.BICUBIC)
    top = int(round((pil.size[1] - size) / 2.0))
    left = int(round((pil.size[0] - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("shape,size,crop_pct", [((512, 512), 224, 224 / 256), ((375, 500), 224, 224 / 256),
                                                 ((256, 256), 224, 224 / 256), ((300, 410), 224, 224 / 256),
                                                 ((410, 300), 224, 224 / 256), ((256, 330), 224, 224 / 256),
                                                 ((200, 150), 64, 1.0)])
def test_eval_transform_matches_pil_resize_and_center_crop(shape, size, crop_pct):
    """Exactly PIL's pixels, in a tf.data map as the eval pipeline runs it: 512 x 512 -> 256 (every other
    output pixel is a tie that PIL rounds up), 500 x 375 -> 341 x 256, 256 x 256 (no resize), then the crop."""
    image = skimage.data.astronaut()[:shape[0], :shape[1]]
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: fa.preprocess_for_eval(x, size, crop_pct))
    ours = next(iter(ds)).numpy()
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8  # normalised on the device
    np.testing.assert_array_equal(ours, _mae_eval_pil(image, size, crop_pct))


@tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32),
                              tf.TensorSpec([4], tf.int32)])
def _resize_like_pil_graph(image, size, window):
    return fa.resize_bicubic_like_pil(image, size), fa.resize_bicubic_like_pil(image, size, window)


def test_resize_matches_pillow_exactly_up_and_down():
    """Image.resize(BICUBIC) to the level on random sizes, shrinking and enlarging either side, on a photograph
    and on noise (whose overshoots test the clipping); the height goes first where Pillow >= 13 puts it first.
    A window of the output (what the eval crop keeps) is those pixels of the whole."""
    rng = np.random.default_rng(0)
    pil_13 = int(Image.__version__.split(".")[0]) >= 13
    photo = skimage.data.astronaut()
    checked = 0
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 100, size=2))
        out_h, out_w = (int(v) for v in rng.integers(1, 130, size=2))
        if not pil_13 and h - out_h > 0 and h - out_h > 2 * (w - out_w):
            continue  # older Pillows resample the width first here
        image = photo[:h, :w] if trial % 2 else rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((out_w, out_h), Image.BICUBIC))
        top, left = int(rng.integers(0, out_h)), int(rng.integers(0, out_w))
        window = [top, left, int(rng.integers(1, out_h - top + 1)), int(rng.integers(1, out_w - left + 1))]
        ours, part = (x.numpy() for x in _resize_like_pil_graph(image, tf.constant([out_h, out_w]),
                                                                 tf.constant(window)))
        np.testing.assert_array_equal(ours, expected.astype(np.float32), err_msg=f"{(h, w)} -> {(out_h, out_w)}")
        np.testing.assert_array_equal(part, ours[top:top + window[2], left:left + window[3]], err_msg=str(window))
        checked += 1
    assert checked >= 40


def test_eval_transform_rejects_bad_crop_pct():
    with pytest.raises(ValueError, match="crop_pct"):
        fa.preprocess_for_eval(tf.zeros([8, 8, 3], tf.uint8), 8, 0.0)


def test_finetune_train_transform_composes_crop_randaugment_erasing():
    """preprocess_for_finetune_train = augment's crop and flip (uint8) -> rand_augment, and random_erasing's boxes,
    each with its own part of the key; deterministic, and in graph mode. The boxes are those `random_erasing`
    fills, and the device's fill (`mixup.fill_erased`) erases exactly their pixels with N(0, 1) noise."""
    encoded = tf.io.encode_png(skimage.data.astronaut()[:120, :150])
    key = tf.constant([4, 2], tf.int64)
    few_ops = dict(ops=("Equalize", "Rotate"), prob=1.0)  # a small graph: the full one is tested above
    transform = tf.function(lambda encoded, key: fa.preprocess_for_finetune_train(
        encoded, key, image_size=(40, 48), rand_augment_kwargs=few_ops, erase_probability=1.0))
    ours = {k: v.numpy() for k, v in transform(encoded, key).items()}
    assert ours["images"].shape == (40, 48, 3) and ours["images"].dtype == np.uint8
    assert ours["erase_boxes"].shape == (1, 4) and ours["erase_boxes"].dtype == np.int32
    for k, v in transform(encoded, key).items():
        np.testing.assert_array_equal(v, ours[k])
    crop_key, augment_key, erase_key = tf.unstack(tf.random.experimental.stateless_split(key, 3, alg="philox"))
    cropped = augment.preprocess_for_train(encoded, crop_key, image_size=(40, 48), num_channels=3,
                                           scale=(0.08, 1.0))
    augmented = fa.rand_augment(cropped, augment_key, **few_ops)
    np.testing.assert_array_equal(ours["images"], augmented.numpy())
    normalised = ((augmented.numpy() / 255.0 - pixels.IMAGENET_MEAN) / pixels.IMAGENET_STD).astype(np.float32)
    erased_by_tf = random_erasing(tf.constant(normalised), erase_key, probability=1.0).numpy()
    top, left, h, w = ours["erase_boxes"][0]
    inside = np.zeros((40, 48, 1), bool)
    inside[top:top + h, left:left + w] = True
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(erased_by_tf != normalised, np.broadcast_to(inside, normalised.shape))

    import jax
    from mae_jax import mixup

    on_device = np.asarray(mixup.fill_erased(normalised[None], ours["erase_boxes"][None], jax.random.key(0)))[0]
    np.testing.assert_array_equal(on_device[~inside[..., 0]], normalised[~inside[..., 0]])
    noise = on_device[inside[..., 0]]
    assert not np.any(noise == normalised[inside[..., 0]])
    assert abs(noise.mean()) < 4 / np.sqrt(noise.size) and abs(noise.std() - 1) < 0.1  # N(0, 1)
