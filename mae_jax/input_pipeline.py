"""Input pipelines: per-process batches of augmented, normalised images.

Interface used by the trainer (`mae_jax.train`):

    it = create_train_iterator(config, global_batch_size=..., process_index=..., process_count=..., state=None)
    it.num_examples          # examples in the training split (for steps per epoch)
    batch = next(it)         # {"images": np.ndarray [global_batch_size // process_count, H, W, C] float32}
    it.get_state()           # JSON-able position after the last batch returned; pass it back as `state`
                             # to continue exactly where it stopped

`config.dataset` selects the source: "synthetic" (random smooth images, for mechanics tests and benchmarks),
"demo" (crops of scikit-image's sample photographs, offline), "folder" (`config.image_folder`) or any tfds
image dataset by name ("imagenet2012"); see `mae_jax.datasets`. `load_eval_images` gives a few fixed held-out
images (center crops) for reconstructions.

Augmentation, the official recipe: RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3)) with torchvision's box
sampling (`crop_box_from_uniforms`), cropped while decoding JPEGs (`tf.image.decode_and_crop_jpeg`), resized
bicubic with antialiasing (PIL's bicubic, which torchvision uses on PIL images, within 0.3/255 on average),
horizontal flip with p = 0.5, ImageNet mean/std normalisation; NHWC float32.

Determinism and resume. Each process reads its own sub-split (`tfds.split_for_jax_process`: disjoint, together
the whole split) as one endless stream of epochs. Epoch e of a process is a pure function of (seed, e):
  1. its shard files (tfds file instructions) in an order permuted with (seed, e);
  2. their records interleaved deterministically, then shuffled in a buffer of `config.shuffle_buffer` encoded
     images seeded with (seed, e). Epochs never mix: a new order every epoch, like the reference's
     `sampler.set_epoch(epoch)`;
  3. every example augmented with stateless random ops keyed by (seed, e, example id), the id being the
     example's index in the dataset's files: the augmentation depends neither on the position in the stream
     nor on the number of processes or threads.
Batches run on across epoch boundaries, so no example is dropped. The position is the number of examples each
process has consumed (the same on every process); `get_state()` returns it. On resume a process rebuilds its
stream from epoch `consumed // local_examples` and skips `consumed % local_examples` records before decoding
anything: the continuation is exactly the uninterrupted run, and no shuffle buffer is ever checkpointed. The
price is re-reading (not decoding) at most one epoch of the process's own share once per resume, about a
minute for a single host's full ImageNet, seconds on a pod where each host holds a slice.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mae_jax import datasets

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a central crop
_ORDER, _AUGMENT = 1, 2  # separate random streams for the epoch order and the per-example augmentation
_SYNTHETIC_EVAL_BATCH = 2**40  # a batch index that no synthetic training run reaches: held-out images


def _image_size(config) -> tuple[int, int]:
    size = config.model.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _num_channels(config) -> int:
    return int(config.model.get("num_channels", 3))  # 3 is MaskedAutoencoderViT's default


def _normalisation(num_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of images in [0, 1]: ImageNet's for RGB, (0.5, 0.25) otherwise."""
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return np.full(num_channels, 0.5, np.float32), np.full(num_channels, 0.25, np.float32)


class SyntheticIterator(Iterator[dict]):
    """Smooth random images, normalised like ImageNet photographs.

    The image at global row r of batch b is a pure function of (seed, b, r), so a batch is the same
    however it is split over processes, and any position can be resumed exactly. Low-frequency content
    makes the masked patches predictable, so the loss of a working trainer falls.
    """

    def __init__(self, *, seed: int, image_size: tuple[int, int], num_channels: int, global_batch_size: int,
                 process_index: int, process_count: int, num_examples: int, state: dict | None = None):
        self.seed = seed
        self.height, self.width = image_size
        self.num_channels = num_channels
        self.local_batch_size = global_batch_size // process_count
        self.row_offset = process_index * self.local_batch_size
        self.num_examples = num_examples
        self.batch_index = int(state["batch_index"]) if state else 0

    def __next__(self) -> dict:
        rows = np.arange(self.row_offset, self.row_offset + self.local_batch_size)
        images = np.stack([self._image(self.batch_index, r) for r in rows])
        self.batch_index += 1
        return {"images": images}

    def _image(self, batch_index: int, row: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, batch_index, row])
        y = np.linspace(0.0, 1.0, self.height, dtype=np.float32)[:, None, None]
        x = np.linspace(0.0, 1.0, self.width, dtype=np.float32)[None, :, None]
        fy, fx, py, px = rng.uniform(0.5, 3.0, size=(4, self.num_channels)).astype(np.float32) * [[6], [6], [1], [1]]
        image = 0.5 + 0.4 * np.sin(fy * y + py) * np.cos(fx * x + px)  # [H, W, C] in (0.1, 0.9)
        mean, std = IMAGENET_MEAN[:self.num_channels], IMAGENET_STD[:self.num_channels]
        if self.num_channels != 3:
            mean, std = np.float32(0.5), np.float32(0.25)
        return ((image - mean) / std).astype(np.float32)

    def get_state(self) -> dict:
        return {"batch_index": self.batch_index}


# ---------------------------------------------------------------------------------------------------------
# Augmentation: pure TensorFlow functions of the encoded image and a stateless key.
# ---------------------------------------------------------------------------------------------------------


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


def example_key(seed: int, epoch, example_id) -> tf.Tensor:
    """Stateless key [2] of one example's augmentation in one epoch."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, _AUGMENT], tf.int64), epoch, alg="philox")
    return tf.random.experimental.stateless_fold_in(key, example_id, alg="philox")


def _normalise(image: tf.Tensor, num_channels: int) -> tf.Tensor:
    """[..., C] float pixel values in [0, 255] (clipped) -> normalised float32."""
    mean, std = _normalisation(num_channels)
    return (tf.clip_by_value(image, 0.0, 255.0) / 255.0 - mean) / std


def preprocess_for_train(encoded: tf.Tensor, key: tf.Tensor, *, image_size: tuple[int, int], num_channels: int,
                         scale: Sequence[float] = (0.2, 1.0),
                         ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP -> RandomResizedCrop, random horizontal flip, normalise: [H, W, C] float32.

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
    image = tf.image.resize(tf.cast(crop, tf.float32), image_size, method="bicubic", antialias=True)
    flip = tf.random.stateless_uniform([], seed=flip_key, alg="philox") < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    image = _normalise(image, num_channels)
    image.set_shape([*image_size, num_channels])
    return image


def center_crop(image: tf.Tensor, image_size: tuple[int, int], num_channels: int) -> tf.Tensor:
    """[h, w, C] uint8 -> the largest central box of the target aspect, resized: [H, W, C] normalised float32."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    target = float(image_size[0]) / float(image_size[1])  # height / width
    crop_h = tf.minimum(shape[0], tf.round(shape[1] * target))
    crop_w = tf.minimum(shape[1], tf.round(shape[0] / target))
    top, left = tf.cast((shape[0] - crop_h) // 2, tf.int32), tf.cast((shape[1] - crop_w) // 2, tf.int32)
    crop = image[top:top + tf.cast(crop_h, tf.int32), left:left + tf.cast(crop_w, tf.int32)]
    resized = tf.image.resize(tf.cast(crop, tf.float32), image_size, method="bicubic", antialias=True)
    return _normalise(resized, num_channels)


# ---------------------------------------------------------------------------------------------------------
# tfds sources.
# ---------------------------------------------------------------------------------------------------------


def _image_key(builder: tfds.core.DatasetBuilder) -> str:
    features = builder.info.features
    keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if "image" in keys or len(keys) == 1:
        return "image" if "image" in keys else keys[0]
    raise ValueError(f"dataset {builder.name!r} has {'no' if not keys else 'several'} top-level image features "
                     f"({sorted(features.keys())}): the pipeline reads one, named 'image' or the only one")


def _check_split(builder: tfds.core.DatasetBuilder, split: str, setting: str) -> None:
    try:
        builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"config.{setting}={split!r} is not a split of {builder.name}: it has "
                         f"{sorted(builder.info.splits.keys())} ({e})") from None


def _file_instructions(builder: tfds.core.DatasetBuilder, split) -> list[tuple[str, int, int, int]]:
    """(file, skip, take, id of the first example read) of a (sub-)split, ids unique over the dataset."""
    first_id, offset = {}, 0
    for name in sorted(builder.info.splits.keys()):
        for instruction in builder.info.splits[name].file_instructions:
            first_id[instruction.filename] = offset
            offset += instruction.examples_in_shard
    return [(fi.filename, fi.skip, fi.take, first_id[fi.filename] + fi.skip)
            for fi in builder.info.splits[split].file_instructions if fi.take > 0]


def _keep_tf_off_accelerators() -> None:
    try:  # the host pipeline must not take GPU memory from JAX (a no-op with tensorflow-cpu)
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices
        pass


def train_dataset(builder: tfds.core.DatasetBuilder, split, *, seed: int, start: int, batch_size: int,
                  image_size: tuple[int, int], num_channels: int, shuffle_buffer: int,
                  crop_scale: Sequence[float], crop_ratio: Sequence[float], prefetch_batches: int = 2,
                  threads: int = 0) -> tf.data.Dataset:
    """The endless, batched training stream of (sub-)split `split`, from its `start`-th example.

    Elements: {"images" [B, H, W, C] float32, "epoch" [B] int64, "example_id" [B] int64}. See the module
    docstring for the order, the keys and resuming.
    """
    files = _file_instructions(builder, split)
    num_local = sum(take for _, _, take, _ in files)
    if num_local == 0:
        raise ValueError(f"split {split} of {builder.name} is empty")
    filenames, skips, takes, first_ids = (tf.constant(list(column)) for column in zip(*files))
    skips, takes, first_ids = (tf.cast(t, tf.int64) for t in (skips, takes, first_ids))
    image_key = _image_key(builder)

    def read_file(filename, skip, take, first_id):
        records = tf.data.TFRecordDataset(filename, buffer_size=1 << 20).skip(skip).take(take)
        return tf.data.Dataset.zip(tf.data.Dataset.range(first_id, first_id + take), records)

    def parse(example_id, record):
        return example_id, tf.io.parse_single_example(record, {image_key: tf.io.FixedLenFeature([], tf.string)})[
            image_key]

    def one_epoch(epoch):
        order_key = tf.random.experimental.stateless_fold_in(tf.constant([seed, _ORDER], tf.int64), epoch,
                                                             alg="philox")
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=order_key, alg="philox")
        ds = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in (filenames, skips, takes,
                                                                                     first_ids)))
        ds = ds.interleave(read_file, cycle_length=min(len(files), 16), block_length=1,
                           num_parallel_calls=min(len(files), 16), deterministic=True)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle_buffer > 1:
            shuffle_seed = tf.random.stateless_uniform([], seed=order_key, minval=None, maxval=None,
                                                       dtype=tf.int64, alg="philox")
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda example_id, encoded: (epoch, example_id, encoded))

    first_epoch, skip = divmod(start, num_local)
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch).skip(skip)

    def augment(epoch, example_id, encoded):
        image = preprocess_for_train(encoded, example_key(seed, epoch, example_id), image_size=image_size,
                                     num_channels=num_channels, scale=crop_scale, ratio=crop_ratio)
        return {"images": image, "epoch": epoch, "example_id": example_id}

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch_batches < 0 else prefetch_batches)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallelism comes from the parallel map, not from ops
    if threads > 0:
        options.threading.private_threadpool_size = threads
    return ds.with_options(options)


class TfdsIterator(Iterator[dict]):
    """This process's batches of a tfds dataset (catalog, folder or demo); see the module docstring.

    Besides `num_examples` and `get_state()`: `local_num_examples` (this process's share of the split),
    `num_skipped_files` (undecodable image files left out when a folder was prepared), and the epoch and
    example id of every row of the last batch (`last_epochs`, `last_example_ids`).
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, config, *, global_batch_size: int, process_index: int,
                 process_count: int, state: dict | None = None):
        _check_split(builder, config.train_split, "train_split")
        self.seed = int(config.seed)
        self.process_count = process_count
        self.local_batch_size = global_batch_size // process_count
        self.num_examples = builder.info.splits[config.train_split].num_examples
        self.num_skipped_files = datasets.num_skipped_files(builder)
        if self.num_skipped_files:
            logging.warning("%s: %d image files could not be decoded and were left out when it was prepared "
                            "(listed in %s/metadata.json).", builder.name, self.num_skipped_files, builder.data_dir)
        local_split = tfds.split_for_jax_process(config.train_split, process_index=process_index,
                                                 process_count=process_count)
        self.local_num_examples = builder.info.splits[local_split].num_examples
        if self.local_num_examples == 0:
            raise ValueError(f"{builder.name} {config.train_split} has {self.num_examples} examples: too few for "
                             f"{process_count} processes")
        self.examples_consumed = self._restore(state)
        if self.examples_consumed % self.local_num_examples:
            logging.info("Resuming %s at epoch %d: skipping %d encoded examples before decoding.", builder.name,
                         self.examples_consumed // self.local_num_examples,
                         self.examples_consumed % self.local_num_examples)
        dataset = train_dataset(
            builder, local_split, seed=self.seed, start=self.examples_consumed, batch_size=self.local_batch_size,
            image_size=_image_size(config), num_channels=_num_channels(config),
            shuffle_buffer=config.shuffle_buffer, crop_scale=tuple(config.crop_scale),
            crop_ratio=tuple(config.crop_ratio), prefetch_batches=config.prefetch_batches,
            threads=config.data_threads)
        self._iterator = dataset.as_numpy_iterator()
        self.last_epochs = self.last_example_ids = None

    def _restore(self, state: dict | None) -> int:
        if not state:
            return 0
        consumed = int(state["examples_per_process"])
        if int(state.get("seed", self.seed)) != self.seed:
            logging.warning("Input position was saved with seed %s, now seed %d: the data order changes.",
                            state["seed"], self.seed)
        saved_count = int(state.get("process_count", self.process_count))
        if saved_count != self.process_count:
            consumed = consumed * saved_count // self.process_count
            logging.warning("Input position was saved with %d processes, now %d: every process gets a new share, "
                            "so the run continues at the same fraction of the epoch, not the same examples.",
                            saved_count, self.process_count)
        return consumed

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self.examples_consumed += self.local_batch_size
        self.last_epochs, self.last_example_ids = batch["epoch"], batch["example_id"]
        return {"images": batch["images"]}

    def get_state(self) -> dict:
        return {"examples_per_process": self.examples_consumed, "process_count": self.process_count,
                "seed": self.seed}


# ---------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------


def create_train_iterator(config, *, global_batch_size: int, process_index: int, process_count: int,
                          state: dict | None = None) -> Iterator[dict]:
    """The training input for this process; see the module docstring."""
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} does not split evenly over {process_count} processes")
    if config.dataset == "synthetic":
        return SyntheticIterator(
            seed=config.seed, image_size=_image_size(config), num_channels=_num_channels(config),
            global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
            num_examples=config.synthetic_num_examples, state=state)
    _keep_tf_off_accelerators()
    return TfdsIterator(datasets.get_builder(config), config, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count, state=state)


def load_eval_images(config, num_images: int) -> np.ndarray:
    """The first `num_images` images of `config.eval_split` (the training split if the dataset has no such
    split), center-cropped to the model's size and normalised: [n, H, W, C] float32, the same every call."""
    image_size, num_channels = _image_size(config), _num_channels(config)
    if config.dataset == "synthetic":
        return SyntheticIterator(seed=config.seed, image_size=image_size, num_channels=num_channels,
                                 global_batch_size=num_images, process_index=0, process_count=1, num_examples=0,
                                 state={"batch_index": _SYNTHETIC_EVAL_BATCH}).__next__()["images"]
    _keep_tf_off_accelerators()
    builder = datasets.get_builder(config)
    split = config.eval_split
    if split not in builder.info.splits.keys():
        logging.warning("%s has no split %r (config.eval_split): taking eval images from %r, which training sees.",
                        builder.name, split, config.train_split)
        split = config.train_split
        _check_split(builder, split, "train_split")
    available = builder.info.splits[split].num_examples
    if available < num_images:
        raise ValueError(f"{num_images} eval images asked for, but {builder.name} {split} has only {available}")
    image_key = _image_key(builder)
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.take(num_images).map(lambda ex: center_crop(
        tf.io.decode_image(ex[image_key], channels=num_channels, expand_animations=False), image_size,
        num_channels))
    return np.stack(list(ds.as_numpy_iterator())).astype(np.float32)

