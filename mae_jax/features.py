r"""Encoder features and labels of a dataset split, for linear probes or k-NN run elsewhere:

  python -m mae_jax.features --checkpoint PATH --dataset NAME [--data_dir D] [--split S] [--image_folder F] \
      --output feats.npz [--batch_size N] [--pool cls|mean]

Writes (np.savez) `features` [N, D] float32 and `labels` [N] int64, each example of the split once in the input
pipeline's order, plus the strings `pool` and `checkpoint`. The features are `models.ViTClassifier.features`:
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

import argparse
import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from absl import app, logging
from absl.flags import argparse_flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import config_lib, convert, models, pixels, runtime

POOLS = ("cls", "mean")
LOG_EVERY_SECONDS = 30.0


def load_encoder(path: str | os.PathLike, pool: str | None = None,
                 variant: str | None = None) -> tuple[models.ViTClassifier, dict]:
    """(ViTClassifier, variables) whose `features` are the requested pooling (see the module docstring).

    `pool` None: a classifier checkpoint's own, else "cls". A pretraining checkpoint's encoder goes into a
    classifier (its decoder dropped, a fresh head that `features` never uses).
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
    fields = models.classifier_fields(models.constructor_fields(model), num_classes=1,
                                      global_pool=pool == "mean")
    classifier = models.ViTClassifier(**fields)
    # In memory, not from the file again: the pretraining model's official state dict into the classifier.
    return classifier, convert.from_torch_variables(convert.to_torch(variables, model), classifier)


def extract(model: models.ViTClassifier, variables: dict, batches: Iterable[dict],
            devices: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] float32 and labels [N] int64 of the rows of `batches` whose "mask" is True.

    `batches` yields {"images" [B, H, W, C], "labels" [B], "mask" [B]} of one size B (the last one padded), as
    `create_eval_iterator`; each batch is split over `devices` (default: this process's), the variables
    replicated. The next batch is dispatched before the previous one is fetched.
    """
    devices = devices or jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)
    features_fn = jax.jit(lambda v, x: model.apply(v, pixels.model_input(x), method=model.features).astype(
        np.float32), out_shardings=replicated)
    features, labels = [], []
    pending, done, start, last_log = None, 0, time.time(), time.time()

    def collect(item):
        out, batch = item
        keep = np.asarray(batch["mask"], bool)
        features.append(np.asarray(out)[keep])
        labels.append(np.asarray(batch["labels"])[keep].astype(np.int64))
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
    return np.concatenate(features), np.concatenate(labels)


def write(path: str | os.PathLike, features: np.ndarray, labels: np.ndarray, **strings: str) -> None:
    """np.savez of features, labels and `strings` to `path` exactly (no ".npz" added), atomically."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path} is a directory: expected the name of the .npz file to write")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, labels=labels, **{k: np.asarray(v) for k, v in strings.items()})
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


def run(args: argparse.Namespace) -> None:
    """The command: load, extract, write."""
    from mae_jax import input_pipeline  # TensorFlow: only when reading data

    if jax.process_count() > 1:
        raise ValueError(f"python -m mae_jax.features runs on one process, not {jax.process_count()}")
    if not hasattr(input_pipeline, "create_eval_iterator"):
        raise ValueError("this mae_jax.input_pipeline has no create_eval_iterator (labelled eval batches): update "
                         "mae_jax")
    model, variables = load_encoder(args.checkpoint, args.pool, args.variant)
    pool = "mean" if model.global_pool else "cls"
    logging.info("Features: %s pooling of a %d-wide encoder, %s split %r", pool, model.embed_dim, args.dataset,
                 args.split)
    config = eval_input_config(args.dataset, args.split, args.data_dir, args.image_folder)
    batches: Iterator[dict] = input_pipeline.create_eval_iterator(
        config, image_shape=model.image_shape, global_batch_size=args.batch_size, process_index=0, process_count=1)
    features, labels = extract(model, variables, batches)
    write(args.output, features, labels, pool=pool, checkpoint=os.path.abspath(args.checkpoint))
    logging.info("Wrote features %s and labels %s to %s", list(features.shape), list(labels.shape), args.output)


def _parse_flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse_flags.ArgumentParser(
        prog="python -m mae_jax.features",
        description="Encoder features and labels of a dataset split, written as .npz. Errors are one line; -v 1 "
                    "also shows third-party logs and an error's traceback.")
    parser.add_argument("--checkpoint", required=True,
                        help="official .pth, Hugging Face directory or our checkpoint")
    parser.add_argument("--dataset", required=True, help="a tfds name (imagenet2012), 'folder' or 'demo'")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds' own)")
    parser.add_argument("--split", default="validation", help="the split to read, e.g. train or validation")
    parser.add_argument("--image_folder", default="", help="--dataset folder: root/<class>/<image>")
    parser.add_argument("--output", required=True, help=".npz file to write")
    parser.add_argument("--batch_size", type=int, default=256, help="images per batch (a multiple of the devices)")
    parser.add_argument("--pool", choices=POOLS, default=None,
                        help="cls: cls token of norm (linear probe); mean: fc_norm of the mean patch token "
                             "(fine-tuning). Default: a classifier's own, else cls")
    parser.add_argument("--variant", default=None, help="architecture, e.g. B/16, when the checkpoint cannot tell")
    args = parser.parse_args(argv[1:])
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size} must be positive")
    return args


def main(args: argparse.Namespace) -> None:
    verbose = runtime.quiet_logs()
    try:
        run(args)
    except (ValueError, OSError) as e:  # bad input or output: one line, no traceback (unless -v 1)
        if verbose:
            raise
        sys.exit(f"python -m mae_jax.features: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
