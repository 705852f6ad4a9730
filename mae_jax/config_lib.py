"""Pieces of the training configs that the library owns: the input group and renamed fields.

`input_config()` is the `config.input` group (data and augmentation settings), handed whole to the input
pipeline. `RENAMED` maps fields that moved to their new place: each old name stays in the configs for one
release (so `--config.dataset=...` keeps working) and `apply_renamed` moves a value given under it, with a
warning naming the new field.
"""

from __future__ import annotations

import re

import ml_collections
from absl import logging

from mae_jax import models

# old top-level field -> new dotted field (0.1.0 -> 0.2.0: the data settings moved into config.input)
RENAMED = {
    "dataset": "input.dataset",
    "data_dir": "input.data_dir",
    "image_folder": "input.image_folder",
    "train_split": "input.train_split",
    "eval_split": "input.eval_split",
    "synthetic_num_examples": "input.synthetic_num_examples",
    "shuffle_buffer": "input.shuffle_buffer",
    "crop_scale": "input.crop_scale",
    "crop_ratio": "input.crop_ratio",
    "prefetch_batches": "input.prefetch_batches",
    "data_threads": "input.threads",
}


def input_config() -> ml_collections.ConfigDict:
    """The data and augmentation settings (mae_jax/input_pipeline.py, mae_jax/datasets.py), ImageNet defaults."""
    c = ml_collections.ConfigDict()
    c.dataset = "imagenet2012"  # a tfds name, "folder" (image_folder), "demo" (offline photos), "digits"
    #   (scikit-learn's 8x8 digits as 32x32, labelled) or "synthetic"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (None: tfds' default,
    #   ~/tensorflow_datasets); folders and the demo are prepared (copied into TFRecords) here too
    c.image_folder = ""  # dataset="folder": root/<class>/<image>, a flat folder of JPEG/PNG files, or
    #   root/train/<class>/<image> + root/val/<class>/<image> (splits "train" and "validation")
    c.train_split = "train"
    c.eval_split = "validation"  # held-out images: reconstructions (train_split if the dataset lacks it), eval
    c.labels = False  # batches carry "labels" (int32 class ids) - fine-tuning / probing set True
    c.synthetic_num_examples = 1_281_167  # epoch length of dataset="synthetic"
    c.synthetic_num_classes = 10  # dataset="synthetic" with labels: classes (each its own wave orientation)
    c.synthetic_num_eval_examples = 100  # dataset="synthetic": examples of one evaluation pass
    c.shuffle_buffer = 10_000  # encoded images shuffled within an epoch (ImageNet: ~1.1 GB of host memory)
    c.crop_scale = (0.2, 1.0)  # RandomResizedCrop: range of the crop's area, as a fraction of the image's
    c.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop: range of the crop's aspect ratio, width / height
    c.hflip = 0.5  # probability of a random horizontal flip (0: never, for images such as digits)
    c.rand_augment = ""  # timm RandAugment config string, e.g. "rand-m9-mstd0.5-inc1" ("" off)
    c.random_erasing = 0.0  # probability, timm RandomErasing mode "pixel" after normalisation
    c.eval_crop_pct = 224 / 256  # eval: resize shorter side to size / crop_pct, center crop
    c.prefetch_batches = 2  # batches prepared ahead of the trainer on each host (-1: tf.data autotune, which
    # also tunes the parallelism; its thread can hold the end of a run for tens of seconds, see input_pipeline)
    c.threads = 0  # threads decoding and augmenting on each host (0: one per usable core)
    return c


def add_renamed(config: ml_collections.ConfigDict) -> None:
    """Adds the old names of RENAMED as unset placeholders, so that old command lines still parse."""
    defaults = input_config()
    for old, new in RENAMED.items():
        value = defaults[new.split(".", 1)[1]]
        config[old] = ml_collections.config_dict.placeholder(type(value) if value is not None else str)


def apply_renamed(config: ml_collections.ConfigDict) -> None:
    """Moves values given under old names to their new fields, with a warning naming the new field."""
    for old, new in RENAMED.items():
        value = config.get(old)
        if value is None:
            continue
        group, field = new.split(".", 1)
        logging.warning("config.%s is now config.%s: using %r for it (the old name will be removed in the next "
                        "release).", old, new, value)
        config[group][field] = value
        config[old] = None


def resolve(config: ml_collections.ConfigDict) -> None:
    """Applies RENAMED, and reads `--config.model.image_size=448` (which the command line turns into the
    1-tuple (448,) of the pair field) as a square size."""
    apply_renamed(config)
    size = config.model.get("image_size")
    if isinstance(size, (tuple, list)) and len(size) == 1:
        config.model.image_size = (size[0], size[0])


def _field_comments(source_files: list[str]) -> dict[str, str]:
    """field -> its end-of-line comment in the config files (`config.x = ...  # meaning`), the input group's
    fields (`c.x` in this module) under "input.", the model's dataclass fields (models.py) under "model."."""
    comments = {}
    pattern = re.compile(r"^\s*(config|c)\.([\w.]+)\s*=[^#]*#\s*(.+)$")
    field = re.compile(r"^    (\w+): [^=]+=[^#]*#\s*(.+)$")  # a model field in models.py
    for path in source_files:
        for line in open(path):
            match = pattern.match(line)
            if match:
                prefix = "input." if match.group(1) == "c" else ""
                comments.setdefault(prefix + match.group(2), match.group(3).strip())
            elif path == models.__file__ and (match := field.match(line)):
                comments.setdefault("model." + match.group(1), match.group(2).strip())
    return comments


def describe(config: ml_collections.ConfigDict, source_files: list[str]) -> str:
    """Every field of `config` with its value and, where the config files say it, its meaning."""
    comments = _field_comments([*source_files, __file__, models.__file__])
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(f"{prefix}{key}.", value)
            elif f"{prefix}{key}" not in RENAMED:
                flat[f"{prefix}{key}"] = value

    walk("", config)
    width = max(map(len, flat))
    return "\n".join(f"{key:<{width}}  {value!r:<24}  {comments.get(key, '')}".rstrip() for key, value in flat.items())
