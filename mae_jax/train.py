"""MAE pretraining: config checks, the lr schedule, AdamW, the pure train step, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` is everything `main.py` runs. Re-running the same command resumes
from the latest checkpoint in `workdir/checkpoints` and continues exactly as if it had never stopped. The
state, its sharded initialisation, compilation and the loop are the shared skeleton in `mae_jax/trainer.py`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from mae_jax import checkpoints, config_lib, input_pipeline, models, parallel, trainer
from mae_jax.trainer import TrainState

PyTree = Any


# -------------------------------------------------------------------------------------------------------
# Configuration checks, schedule, optimizer.
# -------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An impossible setting: the message names the setting, its value and what is allowed."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> tuple[int, int]:
    """One-line ConfigErrors for impossible settings, before anything is compiled. Returns the mesh shape."""
    try:
        return _validate_config(config, num_devices, process_count)
    except ConfigError:
        raise
    except ValueError as e:  # raised by the model's or the mesh's own checks
        raise ConfigError(str(e)) from None


def _validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> tuple[int, int]:
    def check(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    check(isinstance(config.total_steps, int) and config.total_steps >= 0,
          f"total_steps {config.total_steps} must be >= 0 (0: train for num_epochs)")
    check(config.total_steps > 0 or config.num_epochs > 0,
          f"num_epochs {config.num_epochs} must be > 0 when total_steps is 0")
    check(config.warmup_epochs >= 0, f"warmup_epochs {config.warmup_epochs} must be >= 0")
    check(config.base_lr > 0, f"base_lr {config.base_lr} must be > 0")
    check(0 <= config.min_lr <= config.base_lr * config.batch_size / 256,
          f"min_lr {config.min_lr} must be in [0, base_lr * batch_size / 256]")
    check(config.weight_decay >= 0, f"weight_decay {config.weight_decay} must be >= 0")
    check(config.log_every_steps >= 1, f"log_every_steps {config.log_every_steps} must be >= 1")
    check(config.checkpoint_every_steps >= 0,
          f"checkpoint_every_steps {config.checkpoint_every_steps} must be >= 0 (0: only at the end)")
    check(config.profile_steps >= 0, f"profile_steps {config.profile_steps} must be >= 0 (0: no profile)")
    check(config.grad_accum_steps >= 1, f"grad_accum_steps {config.grad_accum_steps} must be >= 1")
    data, fsdp = parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
    batch, accum = config.batch_size, config.grad_accum_steps
    check(batch > 0, f"batch_size {batch} must be > 0")
    check(batch % process_count == 0,
          f"batch_size {batch} is not divisible by the {process_count} processes")
    check(batch % (data * fsdp) == 0,
          f"batch_size {batch} is not divisible by the {data * fsdp} devices of the "
          f"data={data} x fsdp={fsdp} mesh")
    check(batch % (data * fsdp * accum) == 0,
          f"batch_size {batch} is not divisible by grad_accum_steps {accum} x {data * fsdp} devices: "
          f"each micro-batch must split evenly over the devices")
    try:
        models.MaskedAutoencoderViT(**config.model)  # the model checks its own fields
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return data, fsdp


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """Per-step linear warmup from 0, then half-cycle cosine to min_lr (the official `lr_sched`).

    Peak lr = base_lr * batch_size / 256. Step s is at epoch s / steps_per_epoch, as the official code
    adjusts the lr at every iteration.
    """
    peak = config.base_lr * config.batch_size / 256
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup_steps, 1),
                                         alpha=config.min_lr / peak)
    if warmup_steps == 0:
        return cosine
    # Not optax.linear_schedule: its `end - end * (1 - t)` form loses ~1e-4 relative in float32 early on.
    warmup = lambda step: peak * jnp.minimum(step, warmup_steps).astype(jnp.float32) / warmup_steps
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where the official recipe decays: every weight matrix and the cls/mask tokens; not biases
    nor LayerNorm scales (timm `add_weight_decay`: ndim <= 1 or `.bias` -> no decay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8, weight_decay=config.weight_decay,
                       mask=weight_decay_mask)


# -------------------------------------------------------------------------------------------------------
# The step.
# -------------------------------------------------------------------------------------------------------


def loss_fn(params: PyTree, frozen: PyTree, model: models.MaskedAutoencoderViT, images: jax.Array,
            noise: jax.Array) -> jax.Array:
    return model.apply({"params": params, "frozen": frozen}, images, noise=noise).loss


def _microbatches(x: jax.Array, accum: int, num_shards: int) -> jax.Array:
    """[B, ...] -> [accum, B / accum, ...] such that every micro-batch takes an equal slice of each
    device's rows (no data moves between devices)."""
    b = x.shape[0]
    x = x.reshape(num_shards, accum, b // (num_shards * accum), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum, b // accum, *x.shape[3:])


def train_step(state: TrainState, images: jax.Array, *, model: models.MaskedAutoencoderViT,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int,
               num_batch_shards: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the global batch `images` [B, H, W, C]. Pure; jit it with the state donated.

    Masking noise: example i of the batch at step s draws from fold_in(rng_stream(rng, "masking", s), i), so
    losses do not depend on devices, mesh shape, processes or gradient accumulation.
    """
    rng = trainer.rng_stream(jax.random.wrap_key_data(state.rng), "masking", state.step)
    noise = models.per_example_uniform(rng, images.shape[0], model.num_patches)
    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
        loss, grads = grad_fn(state.params, state.frozen, model, images, noise)
    else:
        micro = (_microbatches(images, grad_accum_steps, num_batch_shards),
                 _microbatches(noise, grad_accum_steps, num_batch_shards))

        def accumulate(carry, batch):
            loss, grads = grad_fn(state.params, state.frozen, model, *batch)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

    def update(operands):
        grads, params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # After a non-finite loss the state stops changing, so what the host saves or reports is the last
    # good state; the loop raises at its next check, naming the step. A cond rather than a select of new
    # and old values: the update then reads each donated buffer once and writes it in place (a select
    # made XLA copy the whole optimizer state first, 6% of the CPU step).
    params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[1:],
                                     (grads, state.params, state.opt_state))
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step),
    )
    # Only what is cheap: a norm lowers to a reduction over every parameter, and on the CPU each costs as
    # much as a tenth of the ViT-B step. The loop adds param_norm on logging steps only.
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm}
    return new_state, metrics


# -------------------------------------------------------------------------------------------------------
# State and compiled step of the MAE.
# -------------------------------------------------------------------------------------------------------


def _init_fn(model: models.MaskedAutoencoderViT):
    return functools.partial(models.init_variables, model)


def abstract_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct`s); nothing is allocated."""
    return trainer.abstract_state(_init_fn(model), tx)


def create_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation, seed: int,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shardings. Returns (state, its shardings)."""
    return trainer.create_state(_init_fn(model), tx, seed, mesh)


state_shardings = trainer.state_shardings


def lower_train_step(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation,
                     schedule: optax.Schedule, mesh: jax.sharding.Mesh, shardings: TrainState, *,
                     batch_size: int, grad_accum_steps: int = 1) -> jax.stages.Lowered:
    """`train_step` jitted for the global batch, the state donated, lowered but not compiled."""
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, grad_accum_steps=grad_accum_steps,
                             num_batch_shards=mesh.shape["data"] * mesh.shape["fsdp"])
    return trainer.lower_step(step, abstract_train_state(model, tx), shardings, (batch_size, *model.image_shape),
                              mesh)


def compile_train_step(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: jax.sharding.Mesh, shardings: TrainState, *,
                       batch_size: int, grad_accum_steps: int = 1) -> jax.stages.Compiled:
    """`lower_train_step(...).compile()`: called with exactly these shapes and shardings, never recompiled."""
    return lower_train_step(model, tx, schedule, mesh, shardings, batch_size=batch_size,
                            grad_accum_steps=grad_accum_steps).compile()


def _init_from(path: str, model: models.MaskedAutoencoderViT, state: TrainState,
               shardings: TrainState) -> TrainState:
    """Replaces params and position tables by pretrained or converted weights (optimizer state kept)."""
    base = jax.device_get({"params": state.params, "frozen": state.frozen})
    from mae_jax import convert  # lazy: reading PyTorch files imports torch

    variables = convert.load_variables(path, model, base)
    logging.info("Initialised params from %s", path)
    return state.replace(params=jax.device_put(variables["params"], shardings.params),
                         frozen=jax.device_put(variables["frozen"], shardings.frozen))


# -------------------------------------------------------------------------------------------------------
# The run.
# -------------------------------------------------------------------------------------------------------


def _batches(data_iter, mesh: jax.sharding.Mesh):
    """(global batch, input position after it) from this process's batches."""
    sharding = parallel.batch_sharding(mesh)
    while True:
        local = next(data_iter)["images"]
        yield parallel.global_batch(local, sharding), data_iter.get_state()


def _reconstruction_hook(config, model, mesh, workdir: epath.Path, log: trainer.MetricsLog, total_steps: int,
                         state: TrainState):
    """Reconstructions of held-out images every visualize_every_steps and at the end (PNG + TensorBoard),
    compiled now, so that the last one does not delay the end of the run."""
    from mae_jax import visualize  # PIL, only when asked for

    images = input_pipeline.load_eval_images(config.input, image_shape=model.image_shape, seed=config.seed,
                                             num_images=config.visualize_num_images)
    variables = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                       {"params": state.params, "frozen": state.frozen})
    reconstructions = visualize.TrainingReconstructions(model, images, mesh, workdir / "reconstructions",
                                                        seed=config.seed, variables=variables)

    def hook(step: int, state: TrainState) -> None:
        if step % config.visualize_every_steps == 0 or step == total_steps:
            log.write_image(step, "reconstructions", reconstructions(step, {"params": state.params,
                                                                            "frozen": state.frozen}))

    return hook


class _Stages:
    """Start-up, visibly staged: each stage's line says what is happening and the time since the start."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str, *args) -> None:
        logging.info("[%5.1f s] " + message, time.perf_counter() - self.start, *args)


def _summary(workdir: epath.Path, last: dict[str, float], steps: int, total_steps: int, seconds: float,
             reconstructions: bool) -> None:
    """The closing lines: what ran, where everything is, and what to run next."""
    loss = f", loss {last['loss']:.4f} (mean of the last logging window)" if "loss" in last else ""
    logging.info("Done: step %d/%d%s, %.0f s in all.", steps, total_steps, loss, seconds)
    logging.info("  checkpoints: %s   metrics: %s", workdir / "checkpoints", workdir / "metrics.jsonl")
    if reconstructions:
        logging.info("  reconstructions: %s", workdir / "reconstructions")
    logging.info("  TensorBoard: tensorboard --logdir %s", workdir / "tensorboard")
    logging.info("  next: python -m mae_jax.visualize --checkpoint %s --image YOUR_IMAGE.jpg --output out.png",
                 workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Pretrains (or resumes) in `workdir`. Returns the last logged metrics."""
    stage = _Stages()
    config_lib.resolve(config)
    parallel.maybe_initialize_distributed()
    data, fsdp = validate_config(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = models.MaskedAutoencoderViT(**config.model)
    mesh = parallel.create_mesh(data, fsdp)
    parallel.process_batch_rows(parallel.batch_sharding(mesh), config.batch_size)

    with contextlib.ExitStack() as cleanup:
        manager = cleanup.enter_context(trainer.open_workdir(workdir, config, config.keep_checkpoints))
        resume_step = manager.latest_step()

        def open_input(step):  # its length fixes the schedule; its position comes with the checkpoint
            return input_pipeline.create_train_iterator(
                config.input, image_shape=model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                state=None if step is None else checkpoints.restore_input_state(manager, step))

        stage("Opening the input (%s)...", config.input.dataset)
        data_iter = open_input(resume_step)
        steps_per_epoch = data_iter.num_examples // config.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"batch_size {config.batch_size} exceeds the {data_iter.num_examples} training "
                              "examples")
        total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
        peak_lr = config.base_lr * config.batch_size / 256
        logging.info("%s: %d examples, %d steps/epoch, %d steps, peak lr %.3e, mesh data=%d x fsdp=%d over %d "
                     "process(es).", config.input.dataset, data_iter.num_examples, steps_per_epoch, total_steps,
                     peak_lr, data, fsdp, jax.process_count())
        if resume_step is not None and resume_step >= total_steps:
            logging.info("Already complete: the checkpoint in %s is at step %d of %d; nothing to do (raise "
                         "total_steps or num_epochs to train longer).", manager.directory, resume_step, total_steps)
            return {}
        warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
        if total_steps < warmup_steps:
            logging.warning("The run ends inside the lr warmup: step %d of %d warmup steps, lr %.3e of the peak %.3e "
                            "(raise total_steps or lower warmup_epochs).", total_steps, warmup_steps,
                            peak_lr * total_steps / warmup_steps, peak_lr)
        schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
        tx = make_optimizer(config, schedule)

        if resume_step is not None:
            stage("Restoring step %d from %s...", resume_step, manager.directory)
        else:
            stage("Initialising %s params...", f"{models.count_params(abstract_train_state(model, tx).params):,}")
        restored_step, state, shardings = trainer.restore_or_init(manager, _init_fn(model), tx, config.seed, mesh)
        if restored_step != resume_step:  # the latest step was damaged: the input continues from the one restored
            resume_step, data_iter = restored_step, open_input(restored_step)
        if resume_step is None and config.init_from:
            state = _init_from(config.init_from, model, state, shardings)

        stage("Compiling the train step (compilation cache: %s)...", jax.config.jax_compilation_cache_dir or "off")
        step_fn = compile_train_step(model, tx, schedule, mesh, shardings, batch_size=config.batch_size,
                                     grad_accum_steps=config.grad_accum_steps)

        log = trainer.MetricsLog(workdir, total_steps, resume_step or 0)
        cleanup.callback(log.close)
        hooks = []
        if config.visualize_every_steps:
            stage("Compiling the reconstructions of %d held-out images...", config.visualize_num_images)
            hooks.append(_reconstruction_hook(config, model, mesh, workdir, log, total_steps, state))
        loop = trainer.Loop(
            step_fn=step_fn, batches=_batches(data_iter, mesh), manager=manager, log=log, total_steps=total_steps,
            batch_size=config.batch_size, log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps, model_fields=models.constructor_fields(model),
            hooks=hooks, profile_dir=workdir / "tensorboard", profile_steps=config.profile_steps,
            profile_first_step=config.profile_first_step)
        stage("Training from step %d of %d.", resume_step or 0, total_steps)
        last = loop.run(state, int(resume_step or 0))
    if jax.process_index() == 0 and last:
        _summary(workdir, last, loop.step, total_steps, time.perf_counter() - stage.start,
                 bool(config.visualize_every_steps))
    return last
