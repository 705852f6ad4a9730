"""MAE pretraining: train state, the pure train step, the loop, metrics and checkpoints.

`train_and_evaluate(config, workdir)` is everything `main.py` runs. Re-running the same command resumes
from the latest checkpoint in `workdir/checkpoints` and continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mae_jax import checkpoints, host_memory, input_pipeline, models, parallel

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: PyTree  # trained
    frozen: PyTree  # fixed position tables, checkpointed with the rest
    opt_state: PyTree
    rng: jax.Array  # uint32 key data of the run's base key; step s masks with fold_in(rng, s)
    nonfinite_step: jax.Array  # int32 []: first step (1-based, as logged) with a non-finite loss or gradient, else -1


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

    Masking noise: example i of the batch at step s draws from fold_in(fold_in(rng, s), i), so losses do
    not depend on devices, mesh shape, processes or gradient accumulation.
    """
    rng = jax.random.wrap_key_data(state.rng)
    noise = models.per_example_uniform(jax.random.fold_in(rng, state.step), images.shape[0], model.num_patches)
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
# State creation.
# -------------------------------------------------------------------------------------------------------


def _init_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation, seed) -> TrainState:
    rng = jax.random.key(seed)
    variables = models.init_variables(model, jax.random.fold_in(rng, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], frozen=variables["frozen"],
                      opt_state=tx.init(variables["params"]), rng=jax.random.key_data(rng),
                      nonfinite_step=jnp.full((), -1, jnp.int32))


def abstract_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct`s); nothing is allocated."""
    return jax.eval_shape(functools.partial(_init_state, model, tx), 0)


def create_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation, seed: int,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shardings. Returns (state, its shardings)."""
    shardings = state_shardings(abstract_train_state(model, tx), tx, mesh)
    init = jax.jit(_init_state, static_argnums=(0, 1), out_shardings=shardings)
    return init(model, tx, seed), shardings


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    replicated = parallel.replicated(mesh)
    params = parallel.param_shardings(abstract.params, mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params,
                      frozen=jax.tree_util.tree_map(lambda _: replicated, abstract.frozen),
                      opt_state=opt_state, rng=replicated, nonfinite_step=replicated)


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
# Metrics.
# -------------------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl + TensorBoard events (process 0 only), and a progress line on the log."""

    def __init__(self, workdir: epath.Path, total_steps: int, resume_step: int):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if not self.active:
            return
        if self.path.exists():  # a resumed run rewrites history after its checkpoint
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        from clu import metric_writers  # imports tensorflow for the event files

        self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir / "tensorboard")))

    def write(self, step: int, scalars: dict[str, float], seconds_per_step: float | None) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        eta = ""
        if seconds_per_step:
            remaining = int(seconds_per_step * (self.total_steps - step))
            eta = f" | ETA {remaining // 3600}:{remaining % 3600 // 60:02d}:{remaining % 60:02d}"
        logging.info("step %d/%d | loss %.5f | lr %.3e | grad_norm %.3f | %.1f img/s%s", step, self.total_steps,
                     record["loss"], record["lr"], record["grad_norm"], record.get("images_per_sec", 0.0), eta)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An [H, W, 3] uint8 image to TensorBoard."""
        if self.active:
            self.writer.write_images(step, {name: image[None]})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class _Preemption:
    """SIGTERM -> save at a step boundary. One process: a Python signal handler. Several: JAX's
    preemption service (started by jax.distributed), which makes every process stop at the same step."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def compile_train_step(config: ml_collections.ConfigDict, model: models.MaskedAutoencoderViT,
                       tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: jax.sharding.Mesh,
                       shardings: TrainState) -> jax.stages.Compiled:
    """`train_step` compiled ahead of time for the global batch of `config`, the state donated.

    A compiled step is called with exactly these shapes and shardings: anything else is an error, never
    a silent recompilation.
    """
    return lower_train_step(config, model, tx, schedule, mesh, shardings).compile()


def lower_train_step(config: ml_collections.ConfigDict, model: models.MaskedAutoencoderViT,
                     tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: jax.sharding.Mesh,
                     shardings: TrainState) -> jax.stages.Lowered:
    """The step of `compile_train_step`, lowered but not compiled (e.g. for its cost analysis)."""
    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                          grad_accum_steps=config.grad_accum_steps,
                          num_batch_shards=mesh.shape["data"] * mesh.shape["fsdp"]),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0)
    abstract_state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                            abstract_train_state(model, tx), shardings)
    images = jax.ShapeDtypeStruct((config.batch_size, *model_image_shape(model)), jnp.float32,
                                  sharding=batch_sharding)
    return step.lower(abstract_state, images)


# -------------------------------------------------------------------------------------------------------
# The loop.
# -------------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Pretrains (or resumes) in `workdir`. Returns the last logged metrics."""
    parallel.maybe_initialize_distributed()
    data, fsdp = validate_config(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    model = models.MaskedAutoencoderViT(**config.model)
    mesh = parallel.create_mesh(data, fsdp)
    parallel.process_batch_rows(parallel.batch_sharding(mesh), config.batch_size)

    with contextlib.ExitStack() as cleanup:
        manager = checkpoints.make_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        cleanup.callback(manager.close)  # waits for a save in flight
        resume_step = manager.latest_step()

        # Input first: its length fixes the schedule.
        data_iter = input_pipeline.create_train_iterator(
            config, global_batch_size=config.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(),
            state=None if resume_step is None else checkpoints.restore_input_state(manager, resume_step))
        steps_per_epoch = data_iter.num_examples // config.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"batch_size {config.batch_size} exceeds the {data_iter.num_examples} training "
                              "examples")
        total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
        schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
        tx = make_optimizer(config, schedule)
        logging.info("%s: %d examples, %d steps/epoch, %d steps, peak lr %.3e, mesh data=%d x fsdp=%d over %d "
                     "process(es).", config.dataset, data_iter.num_examples, steps_per_epoch, total_steps,
                     config.base_lr * config.batch_size / 256, data, fsdp, jax.process_count())

        state, shardings = create_train_state(model, tx, config.seed, mesh)
        logging.info("Model: %s params.", f"{models.count_params(state.params):,}")
        if jax.default_backend() == "cpu":
            logging.info("Host memory: %s.", "freed memory kept for reuse (mae_jax/host_memory.py)"
                         if host_memory.KEPT else f"system malloc settings ({host_memory.skip_reason()})")
        if resume_step is not None:
            state = checkpoints.restore(manager, resume_step, jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings))
            logging.info("Resumed from step %d of %s.", resume_step, manager.directory)
        elif config.init_from:
            state = _init_from(config.init_from, model, state, shardings)

        start = time.perf_counter()
        step_fn = compile_train_step(config, model, tx, schedule, mesh, shardings)
        logging.info("Compiled the train step in %.1f s.", time.perf_counter() - start)

        log = MetricsLog(workdir, total_steps, resume_step or 0)
        cleanup.callback(log.close)
        preemption = _Preemption()
        cleanup.callback(preemption.restore)
        reconstructions = None
        if config.visualize_every_steps:
            from mae_jax import visualize  # PIL, only when asked for

            reconstructions = visualize.TrainingReconstructions(
                model, input_pipeline.load_eval_images(config, config.visualize_num_images), mesh,
                workdir / "reconstructions", seed=config.seed)
        return _loop(config, state, step_fn, data_iter, mesh, manager, log, preemption, reconstructions,
                     start_step=int(resume_step or 0), total_steps=total_steps, model=model)


_param_norm = jax.jit(optax.tree.norm)


def _loop(config, state, step_fn, data_iter, mesh, manager, log, preemption, reconstructions, *, start_step,
          total_steps, model) -> dict[str, float]:
    """Steps until `total_steps` or preemption; logs, visualises and checkpoints on their schedules."""
    batch_sharding = parallel.batch_sharding(mesh)
    model_fields = models.constructor_fields(model)

    def next_batch():
        local = next(data_iter)["images"]
        return parallel.global_batch(local, batch_sharding), data_iter.get_state()

    def every(n: int) -> bool:
        return bool(n) and step % n == 0

    step, last = start_step, {}
    if step < total_steps:
        batch, input_state = next_batch()
    mark_time, mark_step = time.perf_counter(), step
    while step < total_steps:
        # Dispatching the step and feeding the next batch never wait on the device: any device-to-host
        # transfer here would raise. The host reads results only on logging, visualisation and saving steps.
        with jax.transfer_guard_device_to_host("disallow_explicit"):
            state, metrics = step_fn(state, batch)
            step += 1
            consumed = input_state  # the input position after the batch this step used
            if step < total_steps:
                batch, input_state = next_batch()  # overlaps the device's work on this step
        if every(config.log_every_steps) or step == total_steps:
            metrics, bad = jax.device_get((metrics, state.nonfinite_step))
            if int(bad) >= 0:
                raise FloatingPointError(_nonfinite_message(int(bad), manager))
            metrics["param_norm"] = _param_norm(state.params)
            now = time.perf_counter()
            seconds_per_step = (now - mark_time) / (step - mark_step)
            last = {k: float(v) for k, v in metrics.items()}
            last["images_per_sec"] = config.batch_size / seconds_per_step
            log.write(step, last, seconds_per_step)
            mark_time, mark_step = now, step
        if reconstructions is not None and (every(config.visualize_every_steps) or step == total_steps):
            image = reconstructions(step, {"params": state.params, "frozen": state.frozen})
            log.write_image(step, "reconstructions", image)
        preempted = preemption.reached(step)
        if step == total_steps or preempted or every(config.checkpoint_every_steps):
            bad = int(jax.device_get(state.nonfinite_step))
            if bad >= 0:
                raise FloatingPointError(_nonfinite_message(bad, manager))
            checkpoints.save(manager, step, state, model_fields, consumed)
        if preempted:
            logging.warning("Preempted: saved step %d; re-run the same command to resume.", step)
            break
    return last


def model_image_shape(model: models.MaskedAutoencoderViT) -> tuple[int, int, int]:
    h, w = model.grid_size
    return h * model.patch_size, w * model.patch_size, model.num_channels


def _nonfinite_message(step: int, manager) -> str:
    latest = manager.latest_step()
    kept = f"the last good checkpoint (step {latest}) is intact" if latest is not None else "no checkpoint was written"
    return (f"non-finite loss or gradient at step {step}: stopping; {kept}. Lower base_lr, raise warmup_epochs "
            f"or use float32 (model.dtype)")
