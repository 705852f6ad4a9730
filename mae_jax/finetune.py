"""Fine-tuning and linear probing of an MAE encoder as an image classifier (the paper's downstream protocols).

`train_and_evaluate(config, workdir)` is what `main.py` runs for a config with `task = "finetune"` or
`"linprobe"` (configs/finetune_*.py, configs/linprobe_*.py). The run itself (workdir lock, input position,
schedule, restore or `init_from`, the loop, checkpoints, preemption, metrics) is the shared
`trainer.run`; this module supplies the classification task:

- fine-tuning (official `main_finetune.py` / `engine_finetune.py`): `models.ViTClassifier` with stochastic
  depth, AdamW with layer-wise lr decay (`optimizers.finetune_optimizer`), Mixup/CutMix with label smoothing
  (`mixup.Mixup`, drawn on the device from the run's "mixup" stream) or plain label smoothing when both
  alphas are 0, SoftTargetCrossEntropy; `trainable_blocks = k` trains only the last k blocks and what
  follows them (paper Fig. 9);
- linear probe (official `main_linprobe.py`): the encoder frozen (its features pass a stop-gradient, so no
  encoder backward is built), a BatchNorm without affine + linear head trained with LARS
  (`optimizers.lars`), plain cross-entropy;
- evaluation (official `engine_finetune.evaluate`): top-1, top-5 and cross-entropy over the whole
  `config.input.eval_split`, every example exactly once (the last batch padded and masked), every
  `eval_every_steps` (0: every epoch) and at the end, into metrics.jsonl / TensorBoard as `eval_top1`,
  `eval_top5`, `eval_loss` with the best top-1 so far (`eval_best_top1`); `eval_only` evaluates and exits.

Non-trained variables of the classifier (the probe's BatchNorm statistics, collection "batch_stats") live in
`TrainState.frozen` as {collection: tree}, are updated by the step and checkpointed with the rest.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mae_jax import config_lib, input_pipeline, mixup, models, optimizers, parallel, trainer
from mae_jax.trainer import ConfigError, TrainState

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
    def check(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

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
        return optimizers.freeze(optimizers.lars(schedule, weight_decay=config.weight_decay), head_only)
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


def loss_fn(params: PyTree, frozen: PyTree, model: models.ViTClassifier, images: jax.Array, targets: jax.Array,
            drop_path_key: jax.Array) -> tuple[jax.Array, PyTree]:
    """SoftTargetCrossEntropy of the classifier in training mode; returns (loss, updated non-trained variables)."""
    variables = {"params": params, **frozen}
    rngs = {"drop_path": drop_path_key}
    if frozen:  # the probe's BatchNorm statistics
        logits, updated = model.apply(variables, images, train=True, rngs=rngs, mutable=list(frozen))
    else:
        logits, updated = model.apply(variables, images, train=True, rngs=rngs), frozen
    return mixup.soft_target_cross_entropy(logits, targets), dict(updated)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.ViTClassifier,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mix: mixup.Mixup | None,
               label_smoothing: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch {"images" [B, H, W, C], "labels" [B]}. Pure; jit it with the
    state donated. Mixup and stochastic depth draw from the run's "mixup" and "drop_path" streams at this
    step: functions of the global batch, so the result does not depend on devices or processes."""
    rng = jax.random.wrap_key_data(state.rng)
    images, labels = batch["images"], batch["labels"]
    if mix is not None:
        images, targets = mix(trainer.rng_stream(rng, "mixup", state.step), images, labels)
    else:  # main_finetune.py: LabelSmoothingCrossEntropy (or plain cross-entropy at 0), the same loss
        targets = mixup.smooth_one_hot(labels, model.num_classes, label_smoothing)
    (loss, frozen), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.frozen, model, images, targets, trainer.rng_stream(rng, "drop_path", state.step))
    new_state, grad_norm = trainer.apply_gradients(state, loss, grads, tx, frozen=frozen)
    return new_state, {"loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm}


def eval_step(params: PyTree, frozen: PyTree, batch: dict[str, jax.Array], *,
              model: models.ViTClassifier) -> dict[str, jax.Array]:
    """Sums over the valid rows of one global eval batch {"images", "labels", "mask"}: cross-entropy, top-1
    and top-5 hits (top-k with k = min(5, num_classes)), and the number of rows."""
    logits = model.apply({"params": params, **frozen}, batch["images"], train=False)
    labels, mask = batch["labels"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # timm's accuracy: the label among the k highest logits (ties broken by index, as torch.topk does).
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
    rank = jnp.sum((logits > label_logit) | ((logits == label_logit) &
                                             (jnp.arange(logits.shape[1]) < labels[:, None])), axis=1)
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum((rank < 1) * mask),
            "top5": jnp.sum((rank < min(5, model.num_classes)) * mask), "count": jnp.sum(mask)}


class Evaluator:
    """The whole eval split through a compiled `eval_step`: {"eval_loss", "eval_top1", "eval_top5"} (means
    over the examples; each counted once on any number of devices and processes)."""

    def __init__(self, config: ml_collections.ConfigDict, model: models.ViTClassifier, mesh: jax.sharding.Mesh,
                 state: TrainState):
        self.data = input_pipeline.create_eval_iterator(
            config.input, image_shape=model.image_shape, global_batch_size=config.eval_batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        self.sharding = parallel.batch_sharding(mesh)
        batch = {"images": jax.ShapeDtypeStruct((config.eval_batch_size, *model.image_shape), jnp.float32,
                                                sharding=self.sharding),
                 "labels": jax.ShapeDtypeStruct((config.eval_batch_size,), jnp.int32, sharding=self.sharding),
                 "mask": jax.ShapeDtypeStruct((config.eval_batch_size,), jnp.bool_, sharding=self.sharding)}
        self.step = jax.jit(functools.partial(eval_step, model=model),
                            out_shardings=parallel.replicated(mesh)).lower(
            trainer.abstract_like(state.params), trainer.abstract_like(state.frozen), batch).compile()
        self.num_examples = self.data.num_examples

    def __call__(self, state: TrainState) -> dict[str, float]:
        total = None
        for local in self.data:
            batch = {k: parallel.global_batch(np.asarray(v), self.sharding) for k, v in local.items()}
            sums = self.step(state.params, state.frozen, batch)
            total = sums if total is None else trainer._add_metrics(total, sums)
        total = jax.device_get(total)
        count = float(total["count"])
        if count != self.num_examples:  # a broken pipeline, never a rounding matter
            raise RuntimeError(f"evaluation counted {count:.0f} examples, the split has {self.num_examples}")
        return {"eval_loss": float(total["loss"]) / count, "eval_top1": float(total["top1"]) / count,
                "eval_top5": float(total["top5"]) / count}


# -------------------------------------------------------------------------------------------------------
# The task.
# -------------------------------------------------------------------------------------------------------


def _split(variables: dict) -> dict:
    return {"params": variables["params"], "frozen": {k: v for k, v in variables.items() if k != "params"}}


class Classification(trainer.Task):
    """Fine-tuning or linear probing (`config.task`) as a `trainer.Task`."""

    total_steps_hint = "raise total_steps or num_epochs to train longer, or set eval_only=True to evaluate"

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        self.model = models.ViTClassifier(**{**config.model, "num_classes": num_classes})
        self.mix = make_mixup(config, num_classes)
        self.evaluator = None

    def init_fn(self):
        return lambda key: _split(models.init_variables(self.model, key))

    def make_optimizer(self, config, schedule):
        return make_optimizer(config, schedule, self.model)

    def lower_step(self, config, tx, schedule, mesh, shardings) -> jax.stages.Lowered:
        """The train step lowered for the global batch (what `compile_step` compiles; its cost analysis)."""
        step = functools.partial(train_step, model=self.model, tx=tx, schedule=schedule, mix=self.mix,
                                 label_smoothing=config.label_smoothing)
        abstract = trainer.abstract_state(self.init_fn(), tx)
        batch = {"images": jax.ShapeDtypeStruct((config.batch_size, *self.model.image_shape), jnp.float32),
                 "labels": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
        return trainer.lower_step(step, abstract, shardings, batch, mesh)

    def compile_step(self, config, tx, schedule, mesh, shardings):
        return self.lower_step(config, tx, schedule, mesh, shardings).compile()

    def init_from(self, path, state, shardings):
        from mae_jax import convert  # lazy: reading PyTorch files imports torch

        base = jax.device_get({"params": state.params, **state.frozen})
        variables = _split(convert.load_variables(path, self.model, base))
        frozen = {k: variables["frozen"].get(k, v) for k, v in jax.device_get(state.frozen).items()}
        logging.info("Initialised the classifier from %s", path)
        return state.replace(params=jax.device_put(variables["params"], shardings.params),
                             frozen=jax.device_put(frozen, shardings.frozen))

    def _evaluator(self, context: trainer.RunContext, state: TrainState) -> Evaluator:
        if self.evaluator is None:
            context.stage("Compiling the evaluation (%s %s, batch %d)...", context.config.input.dataset,
                          context.config.input.eval_split, context.config.eval_batch_size)
            self.evaluator = Evaluator(context.config, self.model, context.mesh, state)
        return self.evaluator

    def before_training(self, context, state, resume_step):
        if not context.config.eval_only:
            return True
        if resume_step is None and not context.config.init_from:
            logging.warning("eval_only with neither a checkpoint in %s nor init_from: evaluating random weights.",
                            context.workdir)
        evaluator = self._evaluator(context, state)
        results = evaluator(state)
        step = resume_step or 0
        context.log.write(step, results)
        logging.info("Evaluation of %s on %s %s (%d examples): top-1 %.4f, top-5 %.4f, loss %.4f.",
                     f"step {step} of {context.workdir}" if resume_step is not None else context.config.init_from
                     or "random weights", context.config.input.dataset, context.config.input.eval_split,
                     evaluator.num_examples, results["eval_top1"], results["eval_top5"], results["eval_loss"])
        return False

    def hooks(self, context, state):
        config = context.config
        every = config.eval_every_steps or context.steps_per_epoch
        evaluator = self._evaluator(context, state)
        best = max((r["eval_top1"] for r in trainer.read_metrics(context.workdir / "metrics.jsonl")
                    if "eval_top1" in r), default=0.0)

        def evaluate(step: int, state: TrainState) -> None:
            nonlocal best
            if step % every and step != context.total_steps:
                return
            results = evaluator(state)
            best = max(best, results["eval_top1"])
            context.log.write(step, {**results, "eval_best_top1": best})
            self.last_eval = results

        self.last_eval = None
        return [evaluate]

    def summary(self, context, last):
        if self.last_eval:
            logging.info("  eval (%s, %d examples): top-1 %.4f, top-5 %.4f, loss %.4f", context.config.input.eval_split,
                         self.evaluator.num_examples, self.last_eval["eval_top1"], self.last_eval["eval_top5"],
                         self.last_eval["eval_loss"])
        logging.info("  next: python -m mae_jax.convert %s classifier.pth --to official", context.workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Fine-tunes or probes (or resumes, or with eval_only evaluates) in `workdir`. Returns the last logged
    training metrics."""
    config_lib.resolve(config)
    parallel.maybe_initialize_distributed()
    mesh_shape = validate_config(config, jax.device_count(), jax.process_count())
    num_classes = resolve_num_classes(config)
    return trainer.run(config, workdir, Classification(config, num_classes), mesh_shape)
