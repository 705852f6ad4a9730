"""Fine-tuning and linear probing of an MAE encoder as an image classifier (the paper's downstream protocols).

`Classification` is the `trainer.Task` of configs with `task = "finetune"` or `"linprobe"`
(configs/finetune_*.py, configs/linprobe_*.py); the run itself (workdir lock, input position, schedule, restore
or `init_from`, the loop, checkpoints, preemption, metrics) is the shared `trainer.run`:

- fine-tuning (official `main_finetune.py` / `engine_finetune.py`): `models.ViTClassifier` with stochastic
  depth, AdamW with layer-wise lr decay (`optimizers.finetune_optimizer`), Mixup/CutMix with label smoothing
  (`mixup.Mixup`, drawn on the device from the run's "mixup" stream) or plain label smoothing when both
  alphas are 0, SoftTargetCrossEntropy; `trainable_blocks = k` trains only the last k blocks and what
  follows them (paper Fig. 9);
- linear probe (official `main_linprobe.py`): the encoder frozen (its features pass a stop-gradient, so no
  encoder backward is built), a BatchNorm without affine + linear head trained with LARS
  (`optimizers.lars`) on the head alone, plain cross-entropy; the BatchNorm's running statistics are the
  state's `batch_stats`, updated by the step;
- evaluation (official `engine_finetune.evaluate`): top-1, top-5 and cross-entropy over the whole
  `config.input.eval_split`, every example exactly once (the last batch padded and masked), every
  `eval_every_steps` (0: every epoch) and at the end, into metrics.jsonl / TensorBoard as `eval_top1`,
  `eval_top5`, `eval_loss` with the best top-1 so far (`eval_best_top1`); `eval_only=True` evaluates the
  workdir's latest checkpoint (or `init_from`) and exits, without training or touching the run's settings.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from mae_jax import (checkpoints, convert, input_pipeline, loop, mixup, models, optimizers, parallel, pixels,
                     trainer)
from mae_jax import workdir as workdir_lib
from mae_jax.train_state import TrainState, apply_gradients, rng_stream, with_shardings
from mae_jax.trainer import ConfigError, check

PyTree = Any
TASKS = ("finetune", "linprobe")


# -------------------------------------------------------------------------------------------------------
# Configuration.
# -------------------------------------------------------------------------------------------------------


def resolve_num_classes(config: ml_collections.ConfigDict) -> int:
    """config.model.num_classes, or the dataset's number of classes when it is 0."""
    if config.model.num_classes:
        return int(config.model.num_classes)
    return int(input_pipeline.num_classes(config.input))


def validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> tuple[int, int]:
    """One-line ConfigErrors for impossible settings, before anything is compiled. Returns the mesh shape."""
    check(config.task in TASKS, f"task {config.task!r} must be one of {TASKS} (pretraining configs have no task)")
    data, fsdp = trainer.validate_common(config, num_devices, process_count)
    check(config.grad_accum_steps == 1, f"grad_accum_steps {config.grad_accum_steps}: fine-tuning and the "
          "linear probe take one batch per step (1); lower batch_size or use more devices")
    check(config.input.labels, "input.labels False: fine-tuning and the linear probe need labelled batches (True)")
    check(0 < config.layer_decay <= 1, f"layer_decay {config.layer_decay} must be in (0, 1] (1: no decay)")
    check(0 <= config.label_smoothing < 1, f"label_smoothing {config.label_smoothing} must be in [0, 1)")
    check(config.mixup >= 0 and config.cutmix >= 0,
          f"mixup {config.mixup} and cutmix {config.cutmix} must be >= 0 (0: off)")
    check(0 <= config.mixup_prob <= 1 and 0 <= config.mixup_switch_prob <= 1,
          f"mixup_prob {config.mixup_prob} and mixup_switch_prob {config.mixup_switch_prob} must be in [0, 1]")
    if config.mixup > 0 or config.cutmix > 0:
        check(config.batch_size % 2 == 0, f"batch_size {config.batch_size} must be even with mixup / cutmix "
              "(the batch is mixed with its reverse)")
    check(config.eval_every_steps >= 0, f"eval_every_steps {config.eval_every_steps} must be >= 0 (0: every epoch)")
    devices = data * fsdp
    check(config.eval_batch_size > 0 and config.eval_batch_size % devices == 0
          and config.eval_batch_size % process_count == 0,
          f"eval_batch_size {config.eval_batch_size} must be a positive multiple of the {devices} devices and "
          f"{process_count} processes")
    depth = config.model.depth
    check(-1 <= config.trainable_blocks <= depth,
          f"trainable_blocks {config.trainable_blocks} must be in [-1, depth {depth}] (-1: train every block)")
    if config.trainable_blocks not in (-1, 0, depth):
        check(not config.model.get("scan_blocks", False), f"trainable_blocks {config.trainable_blocks} needs "
              "model.scan_blocks=False: a scanned parameter holds every block")
    if config.task == "linprobe":
        check(config.model.get("frozen_encoder", False) and config.model.get("head_batch_norm", False),
              "task 'linprobe' trains a BatchNorm + linear head on a frozen encoder: set "
              "model.frozen_encoder=True and model.head_batch_norm=True (configs/linprobe_*.py do)")
        check(config.mixup == 0 and config.cutmix == 0,
              f"task 'linprobe': mixup {config.mixup} / cutmix {config.cutmix} must be 0 (the official probe "
              "uses plain cross-entropy)")
    try:
        models.ViTClassifier(**{**config.model, "num_classes": config.model.num_classes or 1})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    return data, fsdp


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   model: models.ViTClassifier) -> optax.GradientTransformation:
    """Fine-tuning: AdamW + layer decay + the official weight-decay groups (+ partial fine-tuning). Linear
    probe: LARS on the head alone (`main_linprobe.py` optimises `model.head.parameters()`)."""
    if config.task == "linprobe":
        head_only = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "head", params)
        return optimizers.train_only(optimizers.lars(schedule, weight_decay=config.weight_decay), head_only)
    return optimizers.finetune_optimizer(
        schedule, depth=model.depth, layer_decay=config.layer_decay, weight_decay=config.weight_decay,
        b1=config.b1, b2=config.b2, trainable_blocks=None if config.trainable_blocks < 0 else config.trainable_blocks)


def make_mixup(config: ml_collections.ConfigDict, num_classes: int) -> mixup.Mixup | None:
    """timm's Mixup as main_finetune.py builds it; None when mixup and cutmix are both off."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    return mixup.Mixup(num_classes=num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                       prob=config.mixup_prob, switch_prob=config.mixup_switch_prob,
                       label_smoothing=config.label_smoothing)


# -------------------------------------------------------------------------------------------------------
# The steps.
# -------------------------------------------------------------------------------------------------------


def loss_fn(params: PyTree, batch_stats: PyTree, model: models.ViTClassifier, images: jax.Array, targets: jax.Array,
            drop_path_key: jax.Array) -> tuple[jax.Array, PyTree]:
    """SoftTargetCrossEntropy of the classifier in training mode; returns (loss, updated batch_stats)."""
    rngs = {"drop_path": drop_path_key}
    if batch_stats:  # the probe's BatchNorm statistics
        logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True, rngs=rngs,
                                      mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
    else:
        logits = model.apply({"params": params}, images, train=True, rngs=rngs)
    return mixup.soft_target_cross_entropy(logits, targets), batch_stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.ViTClassifier,
               tx: optax.GradientTransformation, mix: mixup.Mixup | None, label_smoothing: float,
               param_shardings: PyTree | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch {"images" [B, H, W, C] (uint8 pixels, normalised here, or
    normalised floats), "labels" [B], and RandomErasing's "erase_boxes" [B, K, 4] if the input draws them}.
    Pure; jit it with the state donated. RandomErasing's noise, Mixup and stochastic depth draw from the run's
    "random_erasing", "mixup" and "drop_path" streams at this step: functions of the global batch, so the result
    does not depend on devices or processes. `param_shardings`: see `train_state.apply_gradients`."""
    rng = jax.random.wrap_key_data(state.rng)
    images, labels = pixels.model_input(batch["images"]), batch["labels"]
    if "erase_boxes" in batch:  # RandomErasing: after the normalisation, before Mixup (as timm's transform)
        images = mixup.fill_erased(images, batch["erase_boxes"], rng_stream(rng, "random_erasing", state.step))
    if mix is not None:
        images, targets = mix(rng_stream(rng, "mixup", state.step), images, labels)
    else:  # main_finetune.py: LabelSmoothingCrossEntropy (or plain cross-entropy at 0), the same loss
        targets = mixup.smooth_one_hot(labels, model.num_classes, label_smoothing)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, model, images, targets, rng_stream(rng, "drop_path", state.step))
    new_state, grad_norm = apply_gradients(state, loss, grads, tx, param_shardings, batch_stats=batch_stats)
    return new_state, {"loss": loss, "grad_norm": grad_norm}


def eval_step(variables: PyTree, batch: dict[str, jax.Array], *, model: models.ViTClassifier) -> dict[str, jax.Array]:
    """Sums over the valid rows of one global eval batch {"images", "labels", "mask"}: cross-entropy, top-1
    and top-5 hits (top-k with k = min(5, num_classes)), and the number of rows."""
    logits = model.apply(variables, pixels.model_input(batch["images"]), train=False)
    labels, mask = batch["labels"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # timm's accuracy: the label among the k highest logits (ties broken by index, as torch.topk does).
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
    rank = jnp.sum((logits > label_logit) | ((logits == label_logit) &
                                             (jnp.arange(logits.shape[1]) < labels[:, None])), axis=1)
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum((rank < 1) * mask),
            "top5": jnp.sum((rank < min(5, model.num_classes)) * mask), "count": jnp.sum(mask)}


def eval_batch_spec(config: ml_collections.ConfigDict, model: models.ViTClassifier) -> dict[str, jax.ShapeDtypeStruct]:
    """The global evaluation batch (the input pipeline's: uint8 images, int32 labels, a bool mask of real rows)."""
    b = config.eval_batch_size
    return {"images": jax.ShapeDtypeStruct((b, *model.image_shape), jnp.uint8),
            "labels": jax.ShapeDtypeStruct((b,), jnp.int32), "mask": jax.ShapeDtypeStruct((b,), jnp.bool_)}


class Evaluator:
    """The whole eval split through a compiled `eval_step`: {"eval_loss", "eval_top1", "eval_top5"} (means
    over the examples; each counted once on any number of devices and processes)."""

    def __init__(self, config: ml_collections.ConfigDict, model: models.ViTClassifier, mesh: jax.sharding.Mesh,
                 compiled: jax.stages.Compiled):
        self.data = input_pipeline.create_eval_iterator(
            config.input, image_shape=model.image_shape, global_batch_size=config.eval_batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        self.sharding = parallel.batch_sharding(mesh)
        self.step = compiled
        self.num_examples = self.data.num_examples

    def __call__(self, variables: PyTree) -> dict[str, float]:
        total = None
        for local in self.data:
            batch = {k: parallel.global_batch(np.asarray(v), self.sharding) for k, v in local.items()}
            sums = self.step(variables, batch)
            total = sums if total is None else loop._add_metrics(total, sums)
        total = jax.device_get(total)
        count = float(total["count"])
        if count != self.num_examples:  # a broken pipeline, never a rounding matter
            raise RuntimeError(f"evaluation counted {count:.0f} examples, the split has {self.num_examples}")
        return {"eval_loss": float(total["loss"]) / count, "eval_top1": float(total["top1"]) / count,
                "eval_top5": float(total["top5"]) / count}


def _eval_program(config, model: models.ViTClassifier, mesh: jax.sharding.Mesh, variables: PyTree) -> trainer.Program:
    """`eval_step` for the abstract `variables` (ShapeDtypeStructs with their shardings) on `mesh`."""
    sharding = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
             for k, v in eval_batch_spec(config, model).items()}
    return trainer.Program(
        f"the evaluation ({config.input.dataset} {config.input.eval_split}, batch {config.eval_batch_size})", mesh,
        functools.partial(eval_step, model=model), (variables, batch), out_shardings=parallel.replicated(mesh))


# -------------------------------------------------------------------------------------------------------
# The task.
# -------------------------------------------------------------------------------------------------------


class Classification(trainer.Task):
    """Fine-tuning or linear probing (`config.task`) as a `trainer.Task`."""

    total_steps_hint = "raise total_steps or num_epochs to train longer, or set eval_only=True to evaluate"

    def __init__(self, config: ml_collections.ConfigDict, platform: str):
        num_classes = resolve_num_classes(config)
        self.model_fields = {**config.model, "num_classes": num_classes}
        self.model = models.ViTClassifier(
            **{**self.model_fields, "ops": models.resolve_ops(config.model.ops, platform)})
        self.mix = make_mixup(config, num_classes)
        self.evaluator: Evaluator | None = None  # built by `hooks` when a run starts
        self.last_eval: dict[str, float] | None = None  # the latest evaluation's results, for `summary`

    @classmethod
    def validate(cls, config, num_devices, process_count):
        return validate_config(config, num_devices, process_count)

    def init_variables(self, rng):
        return models.init_variables(self.model, rng)

    def make_optimizer(self, config, schedule):
        return make_optimizer(config, schedule, self.model)

    def batch_spec(self, config):
        b = config.batch_size
        spec = {"images": jax.ShapeDtypeStruct((b, *self.model.image_shape), jnp.uint8),
                "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
        if config.input.random_erasing > 0:
            spec["erase_boxes"] = jax.ShapeDtypeStruct((b, 1, 4), jnp.int32)
        return spec

    def train_step(self, setup):
        return functools.partial(train_step, model=self.model, tx=setup.tx, mix=self.mix,
                                 label_smoothing=setup.config.label_smoothing, param_shardings=setup.shardings.params)

    def programs(self, setup):
        return {"eval_step": _eval_program(setup.config, self.model, setup.mesh, setup.abstract.variables)}

    def hooks(self, context):
        config, setup = context.config, context.setup
        every = config.eval_every_steps or setup.steps_per_epoch
        self.evaluator = Evaluator(config, self.model, setup.mesh, context.compiled["eval_step"])
        best = max((r["eval_top1"] for r in loop.read_metrics(context.workdir / "metrics.jsonl")
                    if "eval_top1" in r), default=0.0)

        def evaluate(step: int, state: TrainState) -> None:
            nonlocal best
            if not loop.itstime(step, every, setup.total_steps):
                return
            self.last_eval = self.evaluator(state.variables)
            best = max(best, self.last_eval["eval_top1"])
            context.log.write(step, {**self.last_eval, "eval_best_top1": best})

        return [evaluate]

    def summary(self, context, last):
        if self.last_eval:
            logging.info("  eval (%s, %d examples): top-1 %.4f, top-5 %.4f, loss %.4f", context.config.input.eval_split,
                         self.evaluator.num_examples, self.last_eval["eval_top1"], self.last_eval["eval_top5"],
                         self.last_eval["eval_loss"])
        logging.info("  next: python -m mae_jax.convert %s classifier.pth --to official", context.workdir)

    def run(self, config, workdir, devices, command=None):
        if config.eval_only:
            return self.evaluate(config, workdir, devices)
        return super().run(config, workdir, devices, command)

    def evaluate(self, config, workdir: str | os.PathLike, devices) -> dict[str, float]:
        """`eval_only`: the eval split through the weights of the workdir's latest checkpoint, else of
        `init_from`, else random ones (with a warning); one record in metrics.jsonl and one line. The run's
        settings (config.json) and the training state are neither read nor written."""
        stage = trainer.Stages()
        workdir = epath.Path(workdir)
        mesh = parallel.create_mesh(devices, config.mesh.data, config.mesh.fsdp)
        with workdir_lib.acquire_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            step = checkpoints.latest_step(workdir / "checkpoints")
            source = workdir / "checkpoints" if step is not None else config.init_from
            base = models.init_variables(self.model, jax.random.key(config.seed))
            if source:
                stage("Loading the weights of %s...", f"step {step} of {source}" if step is not None else source)
                variables = convert.load_variables(source, self.model, base)
            else:
                logging.warning("eval_only with neither a checkpoint in %s nor init_from: evaluating random weights.",
                                workdir)
                variables = base
            shardings = {name: parallel.param_shardings(tree, mesh) if name == "params" else
                         jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), tree)
                         for name, tree in variables.items()}
            abstract = with_shardings(variables, shardings)  # no copy of the weights: shapes only
            program = _eval_program(config, self.model, mesh, abstract)
            stage("Compiling %s...", program.description)
            evaluator = Evaluator(config, self.model, mesh, program.lower().compile())
            stage("Evaluating %d examples of %s %s...", evaluator.num_examples, config.input.dataset,
                  config.input.eval_split)
            results = evaluator(jax.device_put(variables, shardings))
            if jax.process_index() == 0:
                record = {"step": step or 0, **results}
                with (workdir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
        logging.info("Evaluation of %s on %s %s (%d examples): top-1 %.4f, top-5 %.4f, loss %.4f.",
                     f"step {step} of {workdir}" if step is not None else source or "random weights",
                     config.input.dataset, config.input.eval_split, evaluator.num_examples, results["eval_top1"],
                     results["eval_top5"], results["eval_loss"])
        return results
