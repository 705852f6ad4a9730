r"""Encoder features and labels of a dataset split, for linear probes or k-NN run elsewhere:

  python -m mae_jax.features --checkpoint PATH --dataset NAME [--data_dir D] [--split S] [--image_folder F] \
      --output feats.npz [--batch_size N] [--pool cls|mean] [--variant B/16]

Writes (np.savez) `features` [N, D] float32, `labels` [N] int64 and `ids` [N] (each example's tfds id,
"<shard file>__<index>", as `tfds.ReadConfig(add_tfds_id=True)` gives it), each example of the split once, in
the split's stored order; `file_names` [N] too where the dataset has file names (`--dataset folder`: the
image's path, `--image_folder` joined with its path under it; ImageNet: its file name); and the strings `pool`
and `checkpoint`. The features are `models.ViTClassifier.features`:
  cls:  the cls token of the final `norm`, what main_linprobe.py probes (its default, --cls_token);
  mean: `fc_norm` of the mean of the patch tokens of the last block, before any norm: the official fine-tuning
        pool. A pretraining checkpoint has no `fc_norm`: it is then a fresh LayerNorm (scale 1, offset 0), i.e.
        the mean token standardised over its channels; the pretraining `norm` is not used (main_finetune.py
        drops it too).
`--checkpoint` is anything `mae_jax.convert.load_model` reads (official .pth, Hugging Face directory, our workdir
or export). A classifier checkpoint has its own pooling (the default; asking for the other one is an error); a
pretraining one defaults to cls. Images go through the eval transform of `input_pipeline.create_eval_iterator`.
One process; each batch is split over its devices (--batch_size a multiple of their number). Errors are one
line; `-v 1` also shows the traceback and third-party INFO logs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import config_lib, convert, models, pixels, runtime, torch_layout

POOLS = ("cls", "mean")
PROG = "python -m mae_jax.features"
LOG_EVERY_SECONDS = 30.0


def load_encoder(path: str | os.PathLike, pool: str | None = None,
                 variant: str | None = None) -> tuple[models.ViTClassifier, dict]:
    """(ViTClassifier, variables) whose `features` are the requested pooling (see the module docstring).

    `pool` None: a classifier checkpoint's own, else "cls". A pretraining checkpoint's encoder goes into a
    classifier: its decoder (and with mean pooling its `norm`) left out, a fresh `fc_norm` for mean pooling, and
    a zero head of one class that `features` never uses.
    """
    if pool not in (None, *POOLS):
        raise ValueError(f"pool {pool!r} is not one of {POOLS}")
    model, variables = convert.load_model(path, variant)
    if isinstance(model, models.ViTClassifier):
        own = "mean" if model.global_pool else "cls"
        if pool not in (None, own):
            raise ValueError(f"--pool {pool}: {os.fspath(path)} is a classifier with global_pool="
                             f"{model.global_pool} (its features are --pool {own}; the other pooling's norm is "
                             "not in it)")
        return model, variables
    mean = pool == "mean"
    classifier = models.ViTClassifier(**models.classifier_fields(models.constructor_fields(model), num_classes=1,
                                                                 global_pool=mean))
    # In memory, through the official names (which both models share), as a complete classifier: nothing for
    # the converter to drop or to initialise, so it logs nothing about a head that is never used.
    state_dict = {k: v for k, v in convert.to_torch(variables, model).items()
                  if not torch_layout.is_decoder(k) and not (mean and k.split(".")[0] == "norm")}
    width = model.embed_dim
    if mean:
        state_dict.update({"fc_norm.weight": np.ones(width, np.float32), "fc_norm.bias": np.zeros(width, np.float32)})
    state_dict.update({"head.weight": np.zeros((1, width), np.float32), "head.bias": np.zeros(1, np.float32)})
    return classifier, convert.from_torch_variables(state_dict, classifier)


def extract(model: models.ViTClassifier, variables: dict, batches: Iterable[dict],
            devices: list | None = None) -> dict[str, np.ndarray]:
    """{"features" [N, D] float32, "labels" [N] int64, and any other per-row entry of the batches (e.g. "ids")}
    of the rows of `batches` whose "mask" is True, in order.

    `batches` yields {"images" [B, H, W, C], "labels" [B], "mask" [B], ...} of one size B (the last one padded),
    as `create_eval_iterator`; each batch is split over `devices` (default: this process's), the variables
    replicated. The next batch is dispatched before the previous one is fetched.
    """
    devices = devices or jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)
    features_fn = jax.jit(lambda v, x: model.apply(v, pixels.model_input(x), method=model.features).astype(
        np.float32), out_shardings=replicated)
    columns: dict[str, list] = {}
    pending, done, start, last_log = None, 0, time.time(), time.time()

    def collect(item):
        out, batch = item
        keep = np.asarray(batch["mask"], bool)
        columns.setdefault("features", []).append(np.asarray(out)[keep])
        columns.setdefault("labels", []).append(np.asarray(batch["labels"])[keep].astype(np.int64))
        for key, value in batch.items():
            if key not in ("images", "labels", "mask"):
                columns.setdefault(key, []).append(np.asarray(value)[keep])
        return int(keep.sum())

    for batch in batches:
        images = np.asarray(batch["images"])  # uint8 pixels: normalised on the device
        if images.shape[0] % len(devices):
            raise ValueError(f"batch of {images.shape[0]} images does not split over {len(devices)} devices: use "
                             f"a batch size that is a multiple of {len(devices)}")
        out = features_fn(variables, jax.device_put(images, rows))  # asynchronous
        if pending is not None:
            done += collect(pending)
        pending = (out, batch)
        if time.time() - last_log > LOG_EVERY_SECONDS:
            last_log = time.time()
            logging.info("Features of %d examples (%.1f examples/s)", done, done / (last_log - start))
    if pending is not None:
        done += collect(pending)
    if not done:
        raise ValueError("the split yielded no examples")
    logging.info("Features of %d examples in %.1f s", done, time.time() - start)
    return {key: np.concatenate(values) for key, values in columns.items()}


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray], **strings: str) -> None:
    """np.savez of `arrays` and `strings` to `path` exactly (no ".npz" added), atomically."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path} is a directory: expected the name of the .npz file to write")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{k: np.asarray(v) for k, v in strings.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def eval_input_config(dataset: str, split: str, data_dir: str | None = None, image_folder: str = "") -> Any:
    """`config_lib.input_config()` for one labelled split, each example once (eval transform)."""
    config = config_lib.input_config()
    config.dataset = dataset
    config.data_dir = data_dir
    config.image_folder = image_folder
    config.eval_split = split
    config.labels = True
    return config


def run(*, checkpoint: str, dataset: str, output: str, split: str = "validation", data_dir: str | None = None,
        image_folder: str = "", batch_size: int = 256, pool: str | None = None,
        variant: str | None = None) -> dict[str, np.ndarray]:
    """The command (the flags of the same names): load, extract, write `output`; returns what was written."""
    from mae_jax import input_pipeline  # TensorFlow: only when reading data

    if jax.process_count() > 1:
        raise ValueError(f"python -m mae_jax.features runs on one process, not {jax.process_count()}")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: must be a positive number of images")
    model, variables = load_encoder(checkpoint, pool, variant)
    pool = "mean" if model.global_pool else "cls"
    what = "cls token of the final norm" if pool == "cls" else "mean patch token through fc_norm"
    logging.info("Features: the %s (--pool %s) of a %d-block, %d-wide encoder, of %s split %r", what, pool,
                 model.depth, model.embed_dim, f"the folder {image_folder}" if dataset == "folder" else dataset,
                 split)
    config = eval_input_config(dataset, split, data_dir, image_folder)
    batches: Iterator[dict] = input_pipeline.create_eval_iterator(
        config, image_shape=model.image_shape, global_batch_size=batch_size, process_index=0, process_count=1,
        with_ids=True)
    arrays = extract(model, variables, batches)
    arrays["ids"] = arrays["ids"].astype(str)
    file_names = arrays.pop("file_names").astype(str)
    if file_names.size and all(file_names):  # the dataset has file names
        arrays["file_names"] = np.asarray([os.path.join(os.path.abspath(os.path.expanduser(image_folder)), name)
                                           for name in file_names]) if dataset == "folder" else file_names
    write(output, arrays, pool=pool, checkpoint=os.path.abspath(checkpoint))
    logging.info("Wrote %s to %s", ", ".join(f"{key} {list(value.shape)}" for key, value in arrays.items()),
                 output)
    return arrays


FLAGS = flags.FLAGS
REQUIRED = {"checkpoint": "the checkpoint to read", "dataset": "the dataset to read",
            "output": "the .npz file to write"}


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Official .pth, Hugging Face directory, or our checkpoint or export.")
    flags.DEFINE_string("dataset", None, "A tfds name (imagenet2012), 'folder' (with --image_folder), 'demo' or "
                                         "'digits'.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: tfds' own, ~/tensorflow_datasets); folders are "
                                          "prepared (copied into TFRecords) there too.")
    flags.DEFINE_string("split", "validation", "The split to read, e.g. train or validation.")
    flags.DEFINE_string("image_folder", "", "--dataset folder: root/<class>/<image>, or root/train/<class>/<image> "
                                            "and root/val/<class>/<image>.")
    flags.DEFINE_string("output", None, "The .npz file to write.")
    flags.DEFINE_integer("batch_size", 256, "Images per batch (a multiple of the number of devices).")
    flags.DEFINE_enum("pool", None, POOLS, "cls: the cls token of norm (linear probe); mean: fc_norm of the mean "
                                           "patch token (fine-tuning). Default: a classifier's own, else cls.")
    flags.DEFINE_string("variant", None, "Architecture, e.g. B/16, when the checkpoint cannot tell it.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with one-line errors (a bad or missing flag names the flag, no usage dump) and a --help
    that exits 0 (absl's exits 1)."""
    if any(arg in ("-h", "--help", "-?", "--helpshort") for arg in argv[1:]):
        print(f"{__doc__.strip()}\n\nflags:\n{FLAGS.main_module_help()}")
        sys.exit(0)
    try:
        argv = FLAGS(argv)
    except flags.Error as e:
        sys.exit(runtime.error_line(PROG, e))
    missing = [name for name in REQUIRED if FLAGS[name].value is None]
    if missing:
        sys.exit(runtime.error_line(PROG, "; ".join(f"--{name} is required ({REQUIRED[name]})" for name in missing)))
    return argv


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(runtime.error_line(PROG, f"unexpected arguments {' '.join(argv[1:])} (flags are --name=value)"))
    logging.get_absl_handler().python_handler.stream = sys.stdout  # our lines, like main.py's, on stdout
    with runtime.one_line_errors(PROG):  # bad input or output
        run(checkpoint=FLAGS.checkpoint, dataset=FLAGS.dataset, output=FLAGS.output, split=FLAGS.split,
            data_dir=FLAGS.data_dir, image_folder=FLAGS.image_folder, batch_size=FLAGS.batch_size,
            pool=FLAGS.pool, variant=FLAGS.variant)


if __name__ == "__main__":
    runtime.configure()  # before TensorFlow starts: hides its C++ start-up lines
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
