"""Pieces of the training configs that the library owns: the input group and renamed fields.

`input_config()` is the `config.input` group (data and augmentation settings), handed whole to the input
pipeline. `RENAMED` maps fields that moved to their new place: each old name stays in the configs throughout
0.1.x (so `--config.dataset=...` keeps working) and `apply_renamed` moves a value given under it, with a
warning naming the new field. `describe` lists a config's fields with their values and meanings (main.py's
--show_config); `shipped_configs` names the configs of a configs/ directory (main.py's --help).
"""

from __future__ import annotations

import ast
import difflib
import os
import re

import ml_collections
from absl import logging

from mae_jax import models

# old top-level field -> new dotted field: the data settings moved into config.input during 0.1.0; the old
# names are still read (with a warning) throughout 0.1.x
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
    c.train_split = "train"  # the split training reads (a tfds split or slice, e.g. "train[:10%]")
    c.eval_split = "validation"  # held-out images for reconstructions (train_split if the dataset lacks it) and
    #   for evaluation
    c.labels = False  # batches carry "labels" (int32 class ids); fine-tuning and probing set True
    c.synthetic_num_examples = 1_281_167  # epoch length of dataset="synthetic"
    c.synthetic_num_classes = 10  # dataset="synthetic" with labels: classes (each its own wave orientation)
    c.synthetic_num_eval_examples = 100  # dataset="synthetic": examples of one evaluation pass
    c.shuffle_buffer = 10_000  # encoded images shuffled within an epoch (ImageNet: ~1.1 GB of host memory)
    c.crop_scale = (0.2, 1.0)  # RandomResizedCrop: range of the crop's area, as a fraction of the image's
    c.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop: range of the crop's aspect ratio, width / height
    c.hflip = 0.5  # probability of a random horizontal flip (0: never, for images such as digits)
    c.image_sizes = ()  # multi-scale pretraining: each step's images are S x S, S drawn uniformly from these
    #   by (seed, step), e.g. (224, 256, 288); () = off, every step at model.image_size (see README, Variants)
    c.rand_augment = ""  # timm RandAugment config string, e.g. "rand-m9-mstd0.5-inc1" ("": off)
    c.random_erasing = 0.0  # probability of timm's RandomErasing (mode "pixel"), after normalisation
    c.eval_crop_pct = 224 / 256  # evaluation: the shorter side is resized to size / eval_crop_pct, then center-cropped
    c.prefetch_batches = 2  # batches prepared ahead of the trainer on each host (-1: tf.data autotune, which
    #   also tunes the parallelism; its thread can hold the end of a run for tens of seconds, see input_pipeline)
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
        logging.warning("config.%s is now config.%s: using %r for it (the old name goes after the 0.1.x "
                        "releases).", old, new, value)
        config[group][field] = value
        config[old] = None


def resolve(config: ml_collections.ConfigDict) -> None:
    """Applies RENAMED, and reads `--config.model.image_size=448` (which the command line turns into the
    1-tuple (448,) of the pair field) as a square size. Raises a one-line ValueError for `input.image_sizes` in a
    config whose task is not pretraining (multi-scale training is implemented for pretraining only)."""
    apply_renamed(config)
    size = config.model.get("image_size")
    if isinstance(size, (tuple, list)) and len(size) == 1:
        config.model.image_size = (size[0], size[0])
    sizes, task = config.input.get("image_sizes"), config.get("task", "pretrain")
    if sizes and task != "pretrain":
        raise ValueError(f"input.image_sizes {tuple(sizes)}: multi-scale training is implemented for pretraining "
                         f"only; task {task!r} trains at model.image_size: leave input.image_sizes empty")


def _field_comments(source_files: list[str]) -> dict[str, str]:
    """field -> its comment in the config files (`config.x = ...  # meaning`, continued on the comment lines
    below that start "#   "), the input group's fields (`c.x` in this module) under "input.", and under
    "model." the fields of the models (models.py: a field's end-of-line comment, or the comment block right above
    it); whitespace collapsed to one line. The first file that describes a field wins."""
    comments = {}
    assignment = re.compile(r"^\s*(config|c)\.([\w.]+)\s*=[^#]*#\s*(.+)$")
    model_field = re.compile(r"^    (\w+): [^=#]+=[^#]*(?:#\s*(.*))?$")
    continuation = re.compile(r"^\s*#\s{2,}(\S.*)$")
    comment_only = re.compile(r"^\s*#\s?(.*)$")
    model_classes = ("_ViT", "MaskedAutoencoderViT", "ViTClassifier")
    for path in source_files:
        with open(path) as f:
            lines = f.read().splitlines()
        in_model, above = False, []
        for i, line in enumerate(lines):
            if line.startswith("class "):
                in_model = re.match(r"class (\w+)", line).group(1) in model_classes
            key = text = None
            if match := assignment.match(line):
                key, text = ("input." if match.group(1) == "c" else "") + match.group(2), match.group(3)
            elif path == models.__file__ and in_model and (match := model_field.match(line)):
                key, text = "model." + match.group(1), match.group(2) or " ".join(above)
            if key and text and text.strip():
                for following in lines[i + 1:]:
                    if not (more := continuation.match(following)):
                        break
                    text += " " + more.group(1)
                comments.setdefault(key, " ".join(text.split()))
            above = above + [comment_only.match(line).group(1)] if comment_only.match(line) else []
    return comments


def description_sources(config: ml_collections.ConfigDict, config_file: str, configs_dir: str) -> list[str]:
    """The files whose comments describe `config`'s fields, the general meanings first: the shipped pretraining
    base (configs_dir/vit_base.py), the fine-tuning one for configs with a `task`, this module (the input
    group), models.py (the model fields), then `config_file` (its own fields; its comments on inherited ones
    say why it changes them, which the general meaning comes before)."""
    bases = [os.path.join(configs_dir, "vit_base.py")]
    if config.get("task", "pretrain") != "pretrain":
        bases.append(os.path.join(configs_dir, "finetune_vit_base.py"))
    return [*bases, __file__, models.__file__, config_file]


def field_descriptions(config: ml_collections.ConfigDict, source_files: list[str]) -> dict[str, tuple[object, str]]:
    """Every field of `config` (dotted, in order; the old names of RENAMED left out) -> (value, meaning), the
    meaning from the comments of `source_files` (`description_sources`; "" where none says it)."""
    comments = _field_comments(source_files)
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(f"{prefix}{key}.", value)
            elif f"{prefix}{key}" not in RENAMED:
                flat[f"{prefix}{key}"] = (value, comments.get(f"{prefix}{key}", ""))

    walk("", config)
    return flat


def describe(config: ml_collections.ConfigDict, source_files: list[str]) -> str:
    """Every field of `config` with its value and meaning, one line each (see `field_descriptions`)."""
    flat = field_descriptions(config, source_files)
    width = max(map(len, flat))
    return "\n".join(f"{key:<{width}}  {value!r:<24}  {meaning}".rstrip() for key, (value, meaning) in flat.items())


def shipped_configs(configs_dir: str) -> dict[str, str]:
    """The configs in `configs_dir` (every .py but __init__.py, by name) -> the first line of each docstring."""
    configs = {}
    for name in sorted(os.listdir(configs_dir)):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(configs_dir, name)) as f:
                docstring = ast.get_docstring(ast.parse(f.read())) or ""
            configs[name] = docstring.strip().splitlines()[0] if docstring.strip() else ""
    return configs


def closest_config(path: str, configs_dir: str) -> str | None:
    """The shipped config whose file name is closest to `path`'s (difflib), as a path in `configs_dir`; None
    when none is close."""
    match = difflib.get_close_matches(os.path.basename(path), list(shipped_configs(configs_dir)), n=1)
    return os.path.join(configs_dir, match[0]) if match else None
