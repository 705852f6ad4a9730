"""Input pipelines: per-process batches of augmented, normalised images.

Interface used by the trainer (`mae_jax.train`):

    it = create_train_iterator(config.input, image_shape=(H, W, C), seed=..., global_batch_size=...,
                               process_index=..., process_count=..., state=None)
    it.num_examples          # examples in the training split (for steps per epoch)
    batch = next(it)         # {"images": np.ndarray [global_batch_size // process_count, H, W, C] float32}
    it.get_state()           # JSON-able position after the last batch returned; pass it back as `state`
                             # to continue exactly where it stopped

`config` is the `config.input` group of a training config (data and augmentation settings, see
configs/vit_base.py); the model's image shape and the run's seed are passed separately. `config.dataset` selects the source: "synthetic" (random smooth images, for mechanics tests and benchmarks),
"demo" (crops of scikit-image's sample photographs, offline), "folder" (`config.image_folder`) or any tfds
image dataset by name ("imagenet2012"); see `mae_jax.datasets`. `load_eval_images` gives a few fixed held-out
images (center crops) for reconstructions.

Augmentation (`mae_jax.augment`), the official recipe: RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3)),
torchvision's box sampling, cropped while decoding JPEGs, bicubic; horizontal flip; ImageNet mean/std; NHWC
float32. Non-square `model.image_size` (H, W) works.

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
price is re-reading (not decoding) at most one epoch of the process's own share once per resume: minutes for
a single host's full ImageNet (~140 GB), seconds on a pod where each host holds a slice.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mae_jax import datasets, pixels
from mae_jax.datasets import DataError  # noqa: F401  (re-exported: what callers catch)
from mae_jax.augment import center_crop, preprocess_for_train

_ORDER, _AUGMENT = 1, 2  # separate random streams for the epoch order and the per-example augmentation
_SYNTHETIC_EVAL_BATCH = 2**40  # a batch index that no synthetic training run reaches: held-out images


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
        return pixels.normalise(image, self.num_channels).astype(np.float32)

    def get_state(self) -> dict:
        return {"batch_index": self.batch_index}


# ---------------------------------------------------------------------------------------------------------
# tfds sources.
# ---------------------------------------------------------------------------------------------------------


def example_key(seed: int, epoch, example_id) -> tf.Tensor:
    """Stateless key [2] of one example's augmentation in one epoch."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, _AUGMENT], tf.int64), epoch, alg="philox")
    return tf.random.experimental.stateless_fold_in(key, example_id, alg="philox")


def _image_key(builder: tfds.core.DatasetBuilder) -> str:
    features = builder.info.features
    keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if "image" in keys or len(keys) == 1:
        return "image" if "image" in keys else keys[0]
    raise DataError(f"dataset {builder.name!r} has {'no' if not keys else 'several'} top-level image features "
                    f"({sorted(features.keys())}): the pipeline reads one, named 'image' or the only one")


def _check_split(builder: tfds.core.DatasetBuilder, split: str, setting: str) -> None:
    try:
        builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
        raise DataError(f"config.{setting}={split!r} is not a split of {builder.name}: it has "
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
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "tfrecord":
        raise DataError(f"{builder.name} is stored as {file_format}; this pipeline reads TFRecord shards: prepare "
                        f"it with `tfds build {builder.name} --file_format=tfrecord`")
    files = _file_instructions(builder, split)
    num_local = sum(take for _, _, take, _ in files)
    if num_local == 0:
        raise DataError(f"split {split} of {builder.name} is empty")
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

    def __init__(self, builder: tfds.core.DatasetBuilder, config, *, image_shape: tuple[int, int, int], seed: int,
                 global_batch_size: int, process_index: int, process_count: int, state: dict | None = None):
        _check_split(builder, config.train_split, "train_split")
        self.seed = int(seed)
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
            raise DataError(f"{builder.name} {config.train_split} has {self.num_examples} examples: too few for "
                            f"{process_count} processes")
        self.examples_consumed = self._restore(state)
        if self.examples_consumed % self.local_num_examples:
            logging.info("Resuming %s at epoch %d: skipping %d encoded examples before decoding.", builder.name,
                         self.examples_consumed // self.local_num_examples,
                         self.examples_consumed % self.local_num_examples)
        dataset = train_dataset(
            builder, local_split, seed=self.seed, start=self.examples_consumed, batch_size=self.local_batch_size,
            image_size=tuple(image_shape[:2]), num_channels=image_shape[2],
            shuffle_buffer=config.shuffle_buffer, crop_scale=tuple(config.crop_scale),
            crop_ratio=tuple(config.crop_ratio), prefetch_batches=config.prefetch_batches,
            threads=config.threads)
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


def create_train_iterator(config, *, image_shape: Sequence[int], seed: int, global_batch_size: int,
                          process_index: int, process_count: int, state: dict | None = None) -> Iterator[dict]:
    """The training input for this process: `config` is `config.input`, `image_shape` the model's (H, W, C)."""
    if global_batch_size % process_count:
        raise DataError(f"batch size {global_batch_size} does not split evenly over {process_count} processes")
    if config.dataset == "synthetic":
        return SyntheticIterator(
            seed=seed, image_size=tuple(image_shape[:2]), num_channels=image_shape[2],
            global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
            num_examples=config.synthetic_num_examples, state=state)
    _keep_tf_off_accelerators()
    return TfdsIterator(datasets.get_builder(config), config, image_shape=tuple(image_shape), seed=seed,
                        global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count, state=state)


def load_eval_images(config, *, image_shape: Sequence[int], seed: int, num_images: int) -> np.ndarray:
    """The first `num_images` images of `config.eval_split` (the training split if the dataset has no such
    split), center-cropped to `image_shape` (H, W, C) and normalised: [n, H, W, C] float32, the same every
    call. `config` is `config.input`."""
    image_size, num_channels = tuple(image_shape[:2]), image_shape[2]
    if config.dataset == "synthetic":
        return SyntheticIterator(seed=seed, image_size=image_size, num_channels=num_channels,
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
        raise DataError(f"{num_images} eval images asked for, but {builder.name} {split} has only {available}")
    image_key = _image_key(builder)
    # No autocache: tfds caches small splits, and taking a few images from a cached dataset makes tf.data warn.
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.take(num_images).map(lambda ex: center_crop(
        tf.io.decode_image(ex[image_key], channels=num_channels, expand_animations=False), image_size,
        num_channels))
    return np.stack(list(ds.as_numpy_iterator())).astype(np.float32)

