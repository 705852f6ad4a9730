"""Input pipelines: per-process batches of augmented images, as uint8 pixels (normalised on the device).

Interface used by the trainer (`mae_jax.train`):

    it = create_train_iterator(config.input, image_shape=(H, W, C), seed=..., global_batch_size=...,
                               process_index=..., process_count=..., state=None)
    it.num_examples          # examples in the training split (for steps per epoch)
    batch = next(it)         # {"images": np.ndarray [global_batch_size // process_count, H, W, C] uint8}
    it.get_state()           # JSON-able position after the last batch returned; pass it back as `state`
                             # to continue exactly where it stopped

Fine-tuning and linear probing (`config.labels = True`): train batches also carry "labels" [local_b] int32 (the
dataset's ClassLabel feature "label"), which travel with their examples through shuffling and resume;
`num_classes(config.input)` is the number of classes, and

    evaluation = create_eval_iterator(config.input, image_shape=(H, W, C), global_batch_size=...,
                                      process_index=..., process_count=...)
    evaluation.num_examples, evaluation.num_batches    # whole config.eval_split; batches per pass, every process
    for batch in evaluation:  # a fresh, identical pass each time
        batch["images"], batch["labels"], batch["mask"]   # [local_b, H, W, C] uint8, [local_b] int32, bool

covers every example of `config.eval_split` exactly once over all processes and batches; rows with mask False
are padding. Eval transform: resize the shorter side to size / `config.eval_crop_pct` (bicubic), center crop.
Train transform: the fine-tuning recipe (RandomResizedCrop, flip, RandAugment `config.rand_augment`,
and the boxes of RandomErasing `config.random_erasing` as "erase_boxes" [local_b, 1, 4] int32, filled on the
device; `mae_jax.finetune_augment`) when either of those is set,
else the pretraining one below (the linear probe: crop_scale (0.08, 1)).

`config` is the `config.input` group of a training config (data and augmentation settings, see
configs/vit_base.py); the model's image shape and the run's seed are passed separately. `config.dataset` selects the source: "synthetic" (random smooth images, for mechanics tests and benchmarks),
"demo" (crops of scikit-image's sample photographs, offline), "folder" (`config.image_folder`) or any tfds
image dataset by name ("imagenet2012"), "digits" (scikit-learn's, labelled, offline); see `mae_jax.datasets`. `load_eval_images` gives a few fixed held-out
images (center crops) for reconstructions.

Augmentation (`mae_jax.augment`), the official recipe: RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3)),
torchvision's box sampling, cropped while decoding JPEGs, bicubic; horizontal flip; NHWC uint8 (the ImageNet
mean/std normalisation runs in the compiled step, `pixels.model_input`: a quarter of float32's bytes travel from
host to device). Non-square `model.image_size` (H, W) works.

Multi-scale pretraining (`config.image_sizes`, e.g. (224, 256, 288); empty: off). The batch of training step s
holds S x S images, S = `step_image_size(seed, s, config.image_sizes)`: a pure function of (seed, step), so every
process, and a resumed run, emits the same size at the same step. The crop is resized straight to S (one bicubic
resampling, as at a single size); the box, the flip and the data order do not depend on S. Batches of different
steps then differ in shape; the trainer compiles one train step per size and runs each batch on its size's.

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

import math
import os
import re
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mae_jax import datasets, finetune_augment, pixels
from mae_jax.datasets import DataError  # noqa: F401  (re-exported: what callers catch)
from mae_jax.augment import center_crop, preprocess_for_train

_ORDER, _AUGMENT = 1, 2  # separate random streams for the epoch order and the per-example augmentation
_SYNTHETIC_EVAL_BATCH = 2**40  # a batch index that no synthetic training run reaches: held-out images
_SYNTHETIC_EVAL_SEED = 0  # the labelled held-out stream is the same whatever the run's seed


# ---------------------------------------------------------------------------------------------------------
# Multi-scale: the image size of every step.
# ---------------------------------------------------------------------------------------------------------

_MASK64 = 2**64 - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # SplitMix64's increment
_IMAGE_SIZE_STREAM = zlib.crc32(b"image_size")  # keeps this stream apart from any other use of the seed


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on a 64-bit unsigned integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _image_size_key(seed: int) -> int:
    return _mix64((int(seed) * _GOLDEN64 + _IMAGE_SIZE_STREAM) & _MASK64)


def check_image_sizes(image_sizes: Sequence[int]) -> tuple[int, ...]:
    """`config.image_sizes` as a tuple of ints; a one-line DataError unless every entry is a positive int."""
    sizes = tuple(image_sizes)
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise DataError(f"config.input.image_sizes={sizes}: each entry must be a positive int (the side of the square "
                        "images of a step, in pixels), e.g. (224, 256, 288)")
    return tuple(int(s) for s in sizes)


def step_image_size(seed: int, step: int, image_sizes: Sequence[int]) -> int:
    """The image size (side of the square) of training step `step` (0-based: the step that takes the batch
    `step`) of a multi-scale run: `image_sizes[i]`, i = (h >> 32) mod len(image_sizes), where h is output number
    `step + 1` of a SplitMix64 generator seeded with a key of `seed` (h = mix64(key + (step + 1) * golden)).

    Distribution: uniform over the entries (a size listed twice is drawn twice as often), independently from step
    to step. A pure function of (seed, step): every host and a resumed run draw the same size at the same step;
    `_step_image_size_tf` computes the same in the tf.data graph.
    """
    h = _mix64((_image_size_key(seed) + (int(step) + 1) * _GOLDEN64) & _MASK64)
    return int(image_sizes[(h >> 32) % len(image_sizes)])


def _step_image_size_tf(seed: int, step: tf.Tensor, image_sizes: Sequence[int]) -> tf.Tensor:
    """`step_image_size` of an int64 step tensor, in TensorFlow (uint64 arithmetic wraps as the mask does)."""
    u64 = lambda x: tf.constant(x, tf.uint64)
    z = u64(_image_size_key(seed)) + (tf.cast(step, tf.uint64) + u64(1)) * u64(_GOLDEN64)
    xor_shift = lambda z, bits: tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u64(bits)))
    z = xor_shift(z, 30) * u64(0xBF58476D1CE4E5B9)
    z = xor_shift(z, 27) * u64(0x94D049BB133111EB)
    h = xor_shift(z, 31)
    index = tf.cast(tf.bitwise.right_shift(h, u64(32)), tf.int64) % len(image_sizes)
    return tf.gather(tf.constant(image_sizes, tf.int32), index)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[..., C] pixels in [0, 1] -> uint8 levels (rounded)."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


class SyntheticIterator(Iterator[dict]):
    """Smooth random images, as uint8 pixels.

    The image at global row r of batch b is a pure function of (seed, b, r), so a batch is the same
    however it is split over processes, and any position can be resumed exactly. Low-frequency content
    makes the masked patches predictable, so the loss of a working trainer falls.

    With `num_classes` (labelled data), row r's label is a pure function of (seed, b, r) too, and sets the
    orientation and frequency of the image's dominant wave (`labelled_image`): the class is learnable.

    With `image_sizes` (multi-scale pretraining), batch b holds S x S images, S = `step_image_size(seed, b,
    image_sizes)`: the same smooth patterns, sampled on that grid.
    """

    def __init__(self, *, seed: int, image_size: tuple[int, int], num_channels: int, global_batch_size: int,
                 process_index: int, process_count: int, num_examples: int, state: dict | None = None,
                 num_classes: int | None = None, image_sizes: Sequence[int] = ()):
        self.seed = seed
        self.height, self.width = image_size
        self.image_sizes = tuple(image_sizes)
        self.num_channels = num_channels
        self.local_batch_size = global_batch_size // process_count
        self.row_offset = process_index * self.local_batch_size
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.batch_index = int(state["batch_index"]) if state else 0

    def __next__(self) -> dict:
        rows = np.arange(self.row_offset, self.row_offset + self.local_batch_size)
        batch_index, self.batch_index = self.batch_index, self.batch_index + 1
        if self.image_sizes:
            size = step_image_size(self.seed, batch_index, self.image_sizes)
            return {"images": _to_uint8(np.stack([self._pixels(batch_index, r, (size, size)) for r in rows]))}
        if self.num_classes is None:
            return {"images": _to_uint8(np.stack([self._pixels(batch_index, r) for r in rows]))}
        images, labels = zip(*(self.labelled_pixels(batch_index, r) for r in rows))
        return {"images": _to_uint8(np.stack(images)), "labels": np.array(labels, np.int32)}

    def labelled_pixels(self, batch_index: int, row: int) -> tuple[np.ndarray, int]:
        """(image [H, W, C] float32 pixels in [0, 1], label) of row `row` of batch `batch_index`.

        Class c of K: a wave at angle pi * c / K with 1.5 + (c % 3) / 2 cycles over the image, its phase
        jittered by up to +-0.5 rad and its amplitude per channel in [0.6, 1], over a weaker random smooth
        pattern (the unlabelled stream's).
        """
        rng = np.random.default_rng([self.seed, batch_index, row, self.num_classes])
        label = int(rng.integers(self.num_classes))
        angle, cycles = np.pi * label / self.num_classes, 1.5 + (label % 3) / 2
        y = np.linspace(-0.5, 0.5, self.height, dtype=np.float32)[:, None, None]
        x = np.linspace(-0.5, 0.5, self.width, dtype=np.float32)[None, :, None]
        phase = rng.uniform(-0.5, 0.5)
        amplitude = rng.uniform(0.6, 1.0, size=self.num_channels).astype(np.float32)
        wave = np.cos(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        nuisance = self._pixels(batch_index, row) - 0.5  # in (-0.4, 0.4)
        image = 0.5 + 0.28 * amplitude * wave + 0.3 * nuisance  # in (0.1, 0.9)
        return image.astype(np.float32), label

    def _pixels(self, batch_index: int, row: int, size: tuple[int, int] | None = None) -> np.ndarray:
        height, width = size or (self.height, self.width)
        rng = np.random.default_rng([self.seed, batch_index, row])
        y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
        fy, fx, py, px = rng.uniform(0.5, 3.0, size=(4, self.num_channels)).astype(np.float32) * [[6], [6], [1], [1]]
        return 0.5 + 0.4 * np.sin(fy * y + py) * np.cos(fx * x + px)  # [H, W, C] in (0.1, 0.9)

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


def _label_key(builder: tfds.core.DatasetBuilder, why: str) -> str:
    """"label", when it is a ClassLabel feature of `builder`; else a DataError saying `why` it is needed."""
    features = builder.info.features
    if "label" not in features.keys() or not isinstance(features["label"], tfds.features.ClassLabel):
        raise DataError(f"{why} needs class labels, but {builder.name} has no ClassLabel feature 'label' (its "
                        f"features: {sorted(features.keys())}): use a labelled dataset (a tfds classification "
                        "dataset, 'folder' with class folders, 'digits' or 'synthetic')")
    return "label"


def _check_split(builder: tfds.core.DatasetBuilder, split: str, setting: str) -> None:
    try:
        builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
        reason = " ".join(str(e).split())[:200]  # one line
        raise DataError(f"config.input.{setting}={split!r} is not a split of {builder.name}: it has "
                        f"{sorted(builder.info.splits.keys())} ({reason})") from None


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


def _parallelism(threads: int, prefetch_batches: int) -> int:
    """The parallel maps' `num_parallel_calls`: `threads` (or one per usable core), or tf.data's autotune when
    `prefetch_batches` asks for it (-1)."""
    if prefetch_batches < 0:
        return tf.data.AUTOTUNE
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _batch_and_prefetch(ds: tf.data.Dataset, batch_size: int, prefetch_batches: int,
                        threads: int) -> tf.data.Dataset:
    """Batches `ds`, prefetches `prefetch_batches` batches (-1: autotuned) and applies `_options`."""
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch_batches < 0 else prefetch_batches)
    return ds.with_options(_options(threads, prefetch_batches))


def _options(threads: int, prefetch_batches: int) -> tf.data.Options:
    """Deterministic; tf.data's autotune only with `prefetch_batches=-1`. Its optimisation thread can miss the
    wake-up when an iterator is deleted: the deletion then holds the GIL until the thread's next round (20-40 s
    measured at the end of a run on a busy 2-core machine, longer in long runs), so by default the parallelism
    is fixed instead (`_parallelism`)."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = prefetch_batches < 0
    options.threading.max_intra_op_parallelism = 1  # parallelism comes from the parallel map, not from ops
    if threads > 0:
        options.threading.private_threadpool_size = threads
    return options


def train_dataset(builder: tfds.core.DatasetBuilder, split, *, seed: int, start: int, batch_size: int,
                  image_size: tuple[int, int], num_channels: int, shuffle_buffer: int,
                  crop_scale: Sequence[float], crop_ratio: Sequence[float], prefetch_batches: int = 2,
                  threads: int = 0, preprocess: Callable[..., tf.Tensor] | None = None,
                  label_key: str | None = None, image_sizes: Sequence[int] = (),
                  first_step: int = 0) -> tf.data.Dataset:
    """The endless, batched training stream of (sub-)split `split`, from its `start`-th example.

    Elements: {"images" [B, H, W, C] uint8, "epoch" [B] int64, "example_id" [B] int64}, and "labels" [B]
    int32 (the `label_key` feature) when given. `preprocess(encoded, key)` replaces the pretraining transform
    (`augment.preprocess_for_train` with crop_scale and crop_ratio); it returns the image, or a dict of the image
    ("images") and more per-example tensors (e.g. "erase_boxes") that the batches carry. See the module docstring
    for the order, the keys and resuming.

    With `image_sizes` (multi-scale), the batch of step `first_step + k` (the k-th batch of this stream) holds
    S x S images, S = `step_image_size(seed, first_step + k, image_sizes)`, and `preprocess(encoded, key,
    (S, S))` takes the size as a third argument (scalar int32 tensors).
    """
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "tfrecord":
        raise DataError(f"{builder.name} is stored as {file_format}; this pipeline reads TFRecord shards: prepare "
                        f"it with `tfds build {builder.name} --file_format=tfrecord`")
    files = _file_instructions(builder, split)
    num_local = sum(take for _, _, take, _ in files)
    if num_local == 0:
        raise DataError(f"split {split} of {builder.name} is empty")
    parallel = _parallelism(threads, prefetch_batches)
    filenames, skips, takes, first_ids = (tf.constant(list(column)) for column in zip(*files))
    skips, takes, first_ids = (tf.cast(t, tf.int64) for t in (skips, takes, first_ids))
    image_key = _image_key(builder)

    def read_file(filename, skip, take, first_id):
        records = tf.data.TFRecordDataset(filename, buffer_size=1 << 20).skip(skip).take(take)
        return tf.data.Dataset.zip(tf.data.Dataset.range(first_id, first_id + take), records)

    features = {image_key: tf.io.FixedLenFeature([], tf.string)}
    if label_key:
        features[label_key] = tf.io.FixedLenFeature([], tf.int64)

    def parse(example_id, record):
        example = tf.io.parse_single_example(record, features)
        label = tf.cast(example[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
        return example_id, example[image_key], label

    def one_epoch(epoch):
        order_key = tf.random.experimental.stateless_fold_in(tf.constant([seed, _ORDER], tf.int64), epoch,
                                                             alg="philox")
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=order_key, alg="philox")
        ds = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in (filenames, skips, takes,
                                                                                     first_ids)))
        ds = ds.interleave(read_file, cycle_length=min(len(files), 16), block_length=1,
                           num_parallel_calls=min(len(files), 16), deterministic=True)
        ds = ds.map(parse, num_parallel_calls=parallel, deterministic=True)
        if shuffle_buffer > 1:
            shuffle_seed = tf.random.stateless_uniform([], seed=order_key, minval=None, maxval=None,
                                                       dtype=tf.int64, alg="philox")
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda example_id, encoded, label: (epoch, example_id, encoded, label))

    first_epoch, skip = divmod(start, num_local)
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch).skip(skip)
    if preprocess is None:
        def preprocess(encoded, key, size=image_size):
            return preprocess_for_train(encoded, key, image_size=size, num_channels=num_channels,
                                        scale=crop_scale, ratio=crop_ratio)

    def augment(epoch, example_id, encoded, label, size=None):
        key = example_key(seed, epoch, example_id)
        out = preprocess(encoded, key) if size is None else preprocess(encoded, key, size)
        batch = {**(out if isinstance(out, dict) else {"images": out}), "epoch": epoch, "example_id": example_id}
        return {**batch, "labels": label} if label_key else batch

    if not image_sizes:
        ds = ds.map(augment, num_parallel_calls=parallel, deterministic=True)
        return _batch_and_prefetch(ds, batch_size, prefetch_batches, threads)

    def augment_at_size(index, element):
        # Element `index` of this stream goes into its batch number index // batch_size, of step first_step + that.
        size = _step_image_size_tf(seed, first_step + index // batch_size, tuple(image_sizes))
        return augment(*element, size=(size, size))

    ds = ds.enumerate().map(augment_at_size, num_parallel_calls=parallel, deterministic=True)
    return _batch_and_prefetch(ds, batch_size, prefetch_batches, threads)


class TfdsIterator(Iterator[dict]):
    """This process's batches of a tfds dataset (catalog, folder or demo); see the module docstring.

    Besides `num_examples` and `get_state()`: `local_num_examples` (this process's share of the split),
    `num_skipped_files` (undecodable image files left out when a folder was prepared), and the epoch and
    example id of every row of the last batch (`last_epochs`, `last_example_ids`). With `config.image_sizes`
    the state also counts the batches returned (`"batches"`: the next batch's step), which sets their sizes.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, config, *, image_shape: tuple[int, int, int], seed: int,
                 global_batch_size: int, process_index: int, process_count: int, state: dict | None = None):
        _check_split(builder, config.train_split, "train_split")
        label_key = _label_key(builder, f"config.input.labels=True (dataset {config.dataset!r})") \
            if config.get("labels", False) else None
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
        self.image_sizes = check_image_sizes(config.get("image_sizes", ()))
        preprocess = train_transform(config, tuple(image_shape[:2]), image_shape[2])
        if self.image_sizes:
            if label_key or config.get("rand_augment", "") or float(config.get("random_erasing", 0.0)):
                raise DataError(f"config.input.image_sizes={self.image_sizes}: per-step image sizes are implemented "
                                "for the pretraining input only (no labels, rand_augment or random_erasing)")
            # A batch's step is the number of batches before it in the run, counted from the start of the run
            # (not from the examples consumed: those stop counting steps when a resume changes the batch size).
            self.batches = int(state["batches"]) if state and "batches" in state \
                else self.examples_consumed // self.local_batch_size
            preprocess = lambda encoded, key, size: train_transform(config, size, image_shape[2])(encoded, key)
        if self.examples_consumed % self.local_num_examples:
            logging.info("Resuming %s at epoch %d: skipping %d encoded examples before decoding.", builder.name,
                         self.examples_consumed // self.local_num_examples,
                         self.examples_consumed % self.local_num_examples)
        dataset = train_dataset(
            builder, local_split, seed=self.seed, start=self.examples_consumed, batch_size=self.local_batch_size,
            image_size=tuple(image_shape[:2]), num_channels=image_shape[2],
            shuffle_buffer=config.shuffle_buffer, crop_scale=tuple(config.crop_scale),
            crop_ratio=tuple(config.crop_ratio), prefetch_batches=config.prefetch_batches,
            threads=config.threads, preprocess=preprocess, label_key=label_key, image_sizes=self.image_sizes,
            first_step=self.batches if self.image_sizes else 0)
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
        if self.image_sizes:
            self.batches += 1
        self.last_epochs, self.last_example_ids = batch["epoch"], batch["example_id"]
        return {k: v for k, v in batch.items() if k not in ("epoch", "example_id")}

    def get_state(self) -> dict:
        state = {"examples_per_process": self.examples_consumed, "process_count": self.process_count,
                 "seed": self.seed}
        return {**state, "batches": self.batches} if self.image_sizes else state


# ---------------------------------------------------------------------------------------------------------
# The fine-tuning transforms, and evaluation batches.
# ---------------------------------------------------------------------------------------------------------

_RAND_AUGMENT_SECTION = re.compile(r"^([a-z]+)(\d.*)$")  # timm: re.split(r'(\d.*)', section) -> key, value


def parse_rand_augment(config_str: str) -> dict:
    """timm's RandAugment config string (rand_augment_transform) -> `finetune_augment.rand_augment` kwargs.

    "rand" then "-"-separated sections in any order: m<int> magnitude (default 10), n<int> ops per image (2),
    mstd<float> magnitude noise (0; over 100: uniform in [0, m]), mmax<int> magnitude clip (10), p<float>
    probability of each op (0.5), inc<0|1> the "increasing" op set (timm's `bool(val)` takes inc0 for inc1
    as well; here inc0 means the default set). MAE: "rand-m9-mstd0.5-inc1". Weighted op choice (w<int>) and
    op lists (t...) are not supported; sections timm would skip silently (no number) are errors here.
    """
    setting = f"config.input.rand_augment={config_str!r}"
    sections = config_str.split("-")
    if sections[0] != "rand":
        raise DataError(f"{setting}: a RandAugment string starts with 'rand', e.g. 'rand-m9-mstd0.5-inc1'")
    kwargs = dict(num_ops=2, magnitude=10.0, magnitude_std=0.0, prob=0.5, ops=finetune_augment.DEFAULT_OPS,
                  magnitude_max=finetune_augment.MAX_LEVEL)
    numbers = dict(m=("magnitude", int), n=("num_ops", int), mstd=("magnitude_std", float),
                   mmax=("magnitude_max", int), p=("prob", float), inc=("ops", int))
    for section in sections[1:]:
        match = _RAND_AUGMENT_SECTION.match(section)
        if match and match.group(1) in ("w", "t"):
            raise DataError(f"{setting}: section {section!r} (weighted op choice) is not supported; allowed "
                            "sections: m<int>, n<int>, mstd<float>, mmax<int>, p<float>, inc<0|1>")
        if not match or match.group(1) not in numbers:
            raise DataError(f"{setting}: unknown section {section!r}; allowed: m<int>, n<int>, mstd<float>, "
                            "mmax<int>, p<float>, inc<0|1> (e.g. 'rand-m9-mstd0.5-inc1')")
        field, kind = numbers[match.group(1)]
        try:
            value = kind(match.group(2))
        except ValueError:
            raise DataError(f"{setting}: section {section!r} needs {'an integer' if kind is int else 'a number'} "
                            f"after {match.group(1)!r}") from None
        if field == "ops":
            if value not in (0, 1):
                raise DataError(f"{setting}: section {section!r}: inc is 0 or 1")
            value = finetune_augment.INCREASING_OPS if value else finetune_augment.DEFAULT_OPS
        kwargs[field] = value
    if kwargs["magnitude_std"] > 100:  # timm: uniform sampling in [0, magnitude]
        kwargs["magnitude_std"] = math.inf
    kwargs["magnitude"] = float(kwargs["magnitude"])
    if kwargs["num_ops"] < 0 or kwargs["magnitude"] < 0 or kwargs["magnitude_max"] < 0 or \
            not 0 <= kwargs["prob"] <= 1 or kwargs["magnitude_std"] < 0:
        raise DataError(f"{setting}: needs n >= 0, m >= 0, mmax >= 0, mstd >= 0 and 0 <= p <= 1")
    return kwargs


def train_transform(config, image_size: tuple[int, int], num_channels: int) -> Callable[[tf.Tensor, tf.Tensor],
                                                                                        tf.Tensor]:
    """(encoded image, key [2]) -> [H, W, C] uint8 (or a dict of it and "erase_boxes"): the fine-tuning recipe
    (`finetune_augment.preprocess_for_finetune_train`) when `config.rand_augment` or `config.random_erasing`
    is set, else the pretraining / linear-probe crop and flip (`augment.preprocess_for_train`); both with
    `config.crop_scale`, `config.crop_ratio` and the flip probability `config.hflip`. `config` is `config.input`."""
    scale, ratio = tuple(config.crop_scale), tuple(config.crop_ratio)
    rand_augment, erasing = config.get("rand_augment", ""), float(config.get("random_erasing", 0.0))
    hflip = float(config.get("hflip", 0.5))
    if not 0.0 <= erasing <= 1.0:
        raise DataError(f"config.input.random_erasing={erasing}: a probability, in [0, 1]")
    if not 0.0 <= hflip <= 1.0:
        raise DataError(f"config.input.hflip={hflip}: a probability, in [0, 1]")
    if not rand_augment and not erasing:
        return lambda encoded, key: preprocess_for_train(encoded, key, image_size=image_size,
                                                         num_channels=num_channels, scale=scale, ratio=ratio,
                                                         hflip=hflip)
    kwargs = parse_rand_augment(rand_augment) if rand_augment else dict(num_ops=0)
    if num_channels != 3:
        raise DataError(f"config.input.rand_augment={rand_augment!r} / random_erasing={erasing}: the fine-tuning "
                        f"augmentation works on RGB images; the model has {num_channels} channels")
    return lambda encoded, key: finetune_augment.preprocess_for_finetune_train(
        encoded, key, image_size=image_size, scale=scale, ratio=ratio, rand_augment_kwargs=kwargs,
        erase_probability=erasing, hflip=hflip)


class EvalIterator:
    """One process's evaluation batches of a whole split; iterate it for a fresh, identical pass each time.

    `num_examples`: examples in the split; `local_num_examples`: this process's share; `num_batches`: the
    batches of every pass, the same on every process (the largest share, rounded up to whole batches).
    Batches: {"images" [b, H, W, C] uint8, "labels" [b] int32, "mask" [b] bool}, b = global batch /
    process count; rows past the share are padding (zeros, label 0) with mask False.
    """

    def __init__(self, batches: Callable[[], Iterator[dict]], *, num_examples: int, local_num_examples: int,
                 num_batches: int):
        self._batches = batches
        self.num_examples, self.local_num_examples, self.num_batches = num_examples, local_num_examples, num_batches

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def __len__(self) -> int:
        return self.num_batches


def eval_dataset(builder: tfds.core.DatasetBuilder, split, *, batch_size: int, num_batches: int,
                 image_size: tuple[int, int], num_channels: int, crop_pct: float, prefetch_batches: int = 2,
                 threads: int = 0, with_ids: bool = False) -> tf.data.Dataset:
    """(Sub-)split `split` in stored order, eval-transformed (`finetune_augment.preprocess_for_eval`) and
    padded to `num_batches` batches of `batch_size` (see `EvalIterator`). `with_ids`: each row also carries
    "ids", its tfds id (what `tfds.ReadConfig(add_tfds_id=True)` gives: "<shard file>__<index>"), and
    "file_names", the dataset's `file_name` feature where it has one (b"" otherwise and on padding rows)."""
    files = _file_instructions(builder, split)
    image_key, label_key = _image_key(builder), _label_key(builder, "the evaluation input")
    features = {image_key: tf.io.FixedLenFeature([], tf.string), label_key: tf.io.FixedLenFeature([], tf.int64)}
    has_file_name = with_ids and "file_name" in builder.info.features.keys()
    if has_file_name:
        features["file_name"] = tf.io.FixedLenFeature([], tf.string)

    def decode(record, shard=None, index=None):
        example = tf.io.parse_single_example(record, features)
        image = tf.io.decode_image(example[image_key], channels=num_channels, expand_animations=False)
        out = {"images": finetune_augment.preprocess_for_eval(image, image_size, crop_pct),
               "labels": tf.cast(example[label_key], tf.int32), "mask": tf.constant(True)}
        if with_ids:
            out["ids"] = tf.strings.join([shard, tf.strings.as_string(index)], separator="__")
            out["file_names"] = example["file_name"] if has_file_name else tf.constant(b"")
        return out

    padding = {"images": tf.zeros([*image_size, num_channels], tf.uint8), "labels": tf.constant(0, tf.int32),
               "mask": tf.constant(False)}
    if with_ids:
        padding.update(ids=tf.constant(b""), file_names=tf.constant(b""))
    num_local = sum(take for _, _, take, _ in files)
    ds = tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch_size - num_local)
    if files:
        filenames, skips, takes, _ = (list(column) for column in zip(*files))
        records = tf.data.Dataset.from_tensor_slices((filenames, tf.constant(skips, tf.int64),
                                                      tf.constant(takes, tf.int64),
                                                      [os.path.basename(f) for f in filenames]))

        def read(filename, skip, take, shard):
            ds = tf.data.TFRecordDataset(filename, buffer_size=1 << 20).skip(skip).take(take)
            if not with_ids:
                return ds
            return tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensors(shard).repeat(),
                                        tf.data.Dataset.range(skip, skip + take)))

        ds = records.flat_map(read).map(decode, num_parallel_calls=_parallelism(threads, prefetch_batches),
                                        deterministic=True).concatenate(ds)
    return _batch_and_prefetch(ds, batch_size, prefetch_batches, threads)


def _synthetic_eval(config, *, image_shape, local_batch_size: int, process_index: int,
                    process_count: int) -> EvalIterator:
    """`config.synthetic_num_eval_examples` labelled held-out images: example i is row i of batch 2**40 of
    seed 0 (a stream no training run reads), shared over processes as tfds.even_splits shares a split."""
    n = config.synthetic_num_eval_examples
    shares = [n // process_count + (p < n % process_count) for p in range(process_count)]
    start, share = sum(shares[:process_index]), shares[process_index]
    num_batches = -(-max(shares) // local_batch_size)
    source = SyntheticIterator(seed=_SYNTHETIC_EVAL_SEED, image_size=tuple(image_shape[:2]),
                               num_channels=image_shape[2], global_batch_size=1, process_index=0, process_count=1,
                               num_examples=n, num_classes=config.synthetic_num_classes)

    def batches():
        for b in range(num_batches):
            rows = range(start + b * local_batch_size, start + min(share, (b + 1) * local_batch_size))
            examples = [source.labelled_pixels(_SYNTHETIC_EVAL_BATCH, r) for r in rows]
            images = np.zeros((local_batch_size, *image_shape), np.uint8)
            labels = np.zeros(local_batch_size, np.int32)
            if examples:
                images[:len(examples)] = _to_uint8(np.stack([image for image, _ in examples]))
                labels[:len(examples)] = [label for _, label in examples]
            yield {"images": images, "labels": labels, "mask": np.arange(local_batch_size) < len(examples)}

    return EvalIterator(batches, num_examples=n, local_num_examples=share, num_batches=num_batches)


# ---------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------


def create_train_iterator(config, *, image_shape: Sequence[int], seed: int, global_batch_size: int,
                          process_index: int, process_count: int, state: dict | None = None) -> Iterator[dict]:
    """The training input for this process: `config` is `config.input`, `image_shape` the model's (H, W, C) (with
    `config.image_sizes`, each batch's images are of its step's size instead, see the module docstring)."""
    if global_batch_size % process_count:
        raise DataError(f"batch size {global_batch_size} does not split evenly over {process_count} processes")
    if config.dataset == "synthetic":
        return SyntheticIterator(
            seed=seed, image_size=tuple(image_shape[:2]), num_channels=image_shape[2],
            global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
            num_examples=config.synthetic_num_examples, state=state,
            num_classes=num_classes(config) if config.get("labels", False) else None,
            image_sizes=_synthetic_image_sizes(config))
    _keep_tf_off_accelerators()
    return TfdsIterator(datasets.get_builder(config), config, image_shape=tuple(image_shape), seed=seed,
                        global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count, state=state)


def _synthetic_image_sizes(config) -> tuple[int, ...]:
    sizes = check_image_sizes(config.get("image_sizes", ()))
    if sizes and config.get("labels", False):
        raise DataError(f"config.input.image_sizes={sizes}: per-step image sizes are implemented for the pretraining "
                        "input only (unlabelled batches)")
    return sizes


def num_train_examples(config) -> int:
    """Examples in `config.train_split`, from the dataset's metadata (no pipeline is built; a folder or the demo
    is prepared on first use). `config` is `config.input`."""
    if config.dataset == "synthetic":
        return int(config.synthetic_num_examples)
    _keep_tf_off_accelerators()
    builder = datasets.get_builder(config)
    _check_split(builder, config.train_split, "train_split")
    return builder.info.splits[config.train_split].num_examples


def num_classes(config) -> int:
    """Classes of `config.dataset` (its ClassLabel feature "label"; synthetic: config.synthetic_num_classes).
    `config` is `config.input`."""
    if config.dataset == "synthetic":
        if config.synthetic_num_classes < 2:
            raise DataError(f"config.input.synthetic_num_classes={config.synthetic_num_classes}: needs at least 2")
        return int(config.synthetic_num_classes)
    _keep_tf_off_accelerators()
    builder = datasets.get_builder(config)
    return builder.info.features[_label_key(builder, f"num_classes (dataset {config.dataset!r})")].num_classes


def create_eval_iterator(config, *, image_shape: Sequence[int], global_batch_size: int, process_index: int,
                         process_count: int, with_ids: bool = False) -> EvalIterator:
    """This process's evaluation batches of `config.eval_split` (see `EvalIterator`): every example once over
    all processes and batches, in a fixed order, eval-transformed (resize the shorter side to size /
    `config.eval_crop_pct`, bicubic, center crop). `config` is `config.input`, `image_shape` the model's
    (H, W, C). `with_ids` (tfds datasets, not "synthetic"): batches also carry "ids" and "file_names" (bytes;
    see `eval_dataset`)."""
    if global_batch_size % process_count:
        raise DataError(f"eval batch size {global_batch_size} does not split evenly over {process_count} processes")
    local_batch_size = global_batch_size // process_count
    if config.dataset == "synthetic":
        num_classes(config)  # checks the setting
        if with_ids:
            raise DataError('dataset="synthetic" has no example ids: its images are generated, not stored')
        return _synthetic_eval(config, image_shape=tuple(image_shape), local_batch_size=local_batch_size,
                               process_index=process_index, process_count=process_count)
    crop_pct = float(config.eval_crop_pct)
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"config.input.eval_crop_pct={config.eval_crop_pct}: must be in (0, 1]")
    _keep_tf_off_accelerators()
    builder = datasets.get_builder(config)
    _check_split(builder, config.eval_split, "eval_split")
    _label_key(builder, f"evaluation (dataset {config.dataset!r})")
    shares = [builder.info.splits[tfds.split_for_jax_process(config.eval_split, process_index=p,
                                                            process_count=process_count)].num_examples
              for p in range(process_count)]
    num_batches = -(-max(shares) // local_batch_size)
    local_split = tfds.split_for_jax_process(config.eval_split, process_index=process_index,
                                             process_count=process_count)
    dataset = eval_dataset(builder, local_split, batch_size=local_batch_size, num_batches=num_batches,
                           image_size=tuple(image_shape[:2]), num_channels=image_shape[2], crop_pct=crop_pct,
                           prefetch_batches=config.prefetch_batches, threads=config.threads, with_ids=with_ids)
    return EvalIterator(dataset.as_numpy_iterator, num_examples=builder.info.splits[config.eval_split].num_examples,
                        local_num_examples=shares[process_index], num_batches=num_batches)


def load_eval_images(config, *, image_shape: Sequence[int], seed: int, num_images: int) -> np.ndarray:
    """The first `num_images` images of `config.eval_split` (the training split if the dataset has no such
    split), center-cropped to `image_shape` (H, W, C) and normalised: [n, H, W, C] float32, the same every
    call. `config` is `config.input`."""
    image_size, num_channels = tuple(image_shape[:2]), image_shape[2]
    if config.dataset == "synthetic":
        images = SyntheticIterator(seed=seed, image_size=image_size, num_channels=num_channels,
                                   global_batch_size=num_images, process_index=0, process_count=1, num_examples=0,
                                   state={"batch_index": _SYNTHETIC_EVAL_BATCH}).__next__()["images"]
        return pixels.model_input(images).astype(np.float32)
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

