"""The training skeleton shared by every task: state, random streams, sharded init, the compiled step, the loop.

A task (pretraining: `mae_jax/train.py`) supplies what differs: how variables are initialised, the optimizer,
a pure `step_fn(state, batch) -> (state, metrics)`, its batches, and hooks. This module owns what does not
differ: the `TrainState`, its shardings and initialisation straight into them, ahead-of-time compilation with
the state donated, and `Loop` (metrics averaged over each logging window, progress and profiling by clu's
periodic actions, checkpoints, preemption, the non-finite guard).

Random streams. A run has one base key, `jax.random.key(config.seed)`, kept in the state. Every use draws from
its own named stream of it, derived in one place (`rng_stream`): `stream = fold_in(base, crc32(name))`, and a
per-step stream is `fold_in(stream, step)`. The names in use are listed in `RNG_STREAMS`; a new use adds a name,
never reuses one, so no two uses ever share random numbers (parameter initialisation and step 0's masks did).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import signal
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from mae_jax import checkpoints, models, parallel

PyTree = Any
StepFn = Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]]

# Named random streams of a run (see the module docstring). "params": initialisation; "masking": the MAE's
# per-example masks, per step. Reserved for the downstream recipes: "dropout", "drop_path", "mixup".
RNG_STREAMS = ("params", "masking", "dropout", "drop_path", "mixup")


def rng_stream(rng: jax.Array, name: str, step: jax.Array | int | None = None) -> jax.Array:
    """The key of stream `name` of the run key `rng` (and of `step` of it, if given)."""
    if name not in RNG_STREAMS:
        raise ValueError(f"random stream {name!r} is not one of {RNG_STREAMS}")
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return key if step is None else jax.random.fold_in(key, step)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: PyTree  # trained
    frozen: PyTree  # variables that are not trained (fixed position tables), checkpointed with the rest
    opt_state: PyTree
    rng: jax.Array  # uint32 key data of the run's base key; see rng_stream
    nonfinite_step: jax.Array  # int32 []: first step (1-based, as logged) with a non-finite loss or gradient, else -1


# -------------------------------------------------------------------------------------------------------
# State: initialisation straight into its shardings.
# -------------------------------------------------------------------------------------------------------

InitFn = Callable[[jax.Array], Mapping[str, PyTree]]  # key -> {"params", "frozen"}


def init_state(init_variables: InitFn, tx: optax.GradientTransformation, seed) -> TrainState:
    """A fresh state: variables from the run's "params" stream, the optimizer's initial state."""
    rng = jax.random.key(seed)
    variables = init_variables(rng_stream(rng, "params"))
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      frozen=variables.get("frozen", {}), opt_state=tx.init(variables["params"]),
                      rng=jax.random.key_data(rng), nonfinite_step=jnp.full((), -1, jnp.int32))


def abstract_state(init_variables: InitFn, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct`s); nothing is allocated."""
    return jax.eval_shape(functools.partial(init_state, init_variables, tx), 0)


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """Parameters and their optimizer moments by `parallel.FSDP_RULES`; everything else replicated."""
    replicated = parallel.replicated(mesh)
    params = parallel.param_shardings(abstract.params, mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves of a partial optimizer: no state
    opt_state = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, abstract.opt_state, params,
                                      transform_non_params=lambda _: replicated, is_leaf=masked)
    return TrainState(step=replicated, params=params,
                      frozen=jax.tree_util.tree_map(lambda _: replicated, abstract.frozen),
                      opt_state=opt_state, rng=replicated, nonfinite_step=replicated)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying their shardings (what Orbax restores into and `jit.lower` takes)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                  shardings)


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs of the arrays in `tree`, with their shardings (to lower a function for them)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def create_state(init_variables: InitFn, tx: optax.GradientTransformation, seed: int,
                 mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shardings (no host copy). Returns (state, its shardings)."""
    shardings = state_shardings(abstract_state(init_variables, tx), tx, mesh)
    init = jax.jit(init_state, static_argnums=(0, 1), out_shardings=shardings)
    return init(init_variables, tx, seed), shardings


def lower_step(step_fn: StepFn, abstract: TrainState, shardings: TrainState, batch: Sequence[int] | PyTree,
               mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    """`step_fn` jitted with the state donated and explicit shardings, lowered for a global batch: `batch` is
    the shape of a float32 image batch, or a tree of `jax.ShapeDtypeStruct`s (e.g. {"images", "labels"}),
    every leaf split over the mesh's batch axes. `.compile()` it. A compiled step accepts exactly these shapes
    and shardings: anything else is an error, never a silent recompilation."""
    batch_sharding = parallel.batch_sharding(mesh)
    if isinstance(batch, (tuple, list)) and all(isinstance(d, int) for d in batch):
        batch = jax.ShapeDtypeStruct(tuple(batch), jnp.float32)
    batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), batch)
    step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    return step.lower(with_shardings(abstract, shardings), batch)


def apply_gradients(state: TrainState, loss: jax.Array, grads: PyTree, tx: optax.GradientTransformation,
                    **replace: PyTree) -> tuple[TrainState, jax.Array]:
    """One optimizer update of `state` (and `replace`'s fields, e.g. updated batch statistics), unless the loss
    or the gradient is non-finite. Returns (new state, global gradient norm).

    After a non-finite loss the state stops changing, so what the host saves or reports is the last good
    state; `nonfinite_step` records the (1-based) step and the loop raises at its next check, naming it.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

    def update(operands):
        grads, params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A cond rather than a select of new and old values: the update then reads each donated buffer once and
    # writes it in place (a select made XLA copy the whole optimizer state first, 6% of the CPU step).
    params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[1:],
                                     (grads, state.params, state.opt_state))
    replace = {name: jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), value,
                                            getattr(state, name)) for name, value in replace.items()}
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, **replace,
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step))
    return new_state, grad_norm


# -------------------------------------------------------------------------------------------------------
# Metrics.
# -------------------------------------------------------------------------------------------------------


def read_metrics(path: epath.Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
            logging.warning("%s: ignoring a torn last line (the run was killed while writing it).", path)
    return records


class MetricsLog:
    """metrics.jsonl + TensorBoard events (process 0 only), and a progress line on the log.

    On resume, metrics.jsonl is cut back to the checkpoint's step with an atomic rewrite (a temporary file,
    then a rename), so that a kill at any moment leaves either the old or the new history.
    """

    def __init__(self, workdir: epath.Path, total_steps: int, resume_step: int):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if not self.active:
            return
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        if len(kept) != len(records) or (self.path.exists() and not records):
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        from clu import metric_writers  # imports tensorflow for the event files

        self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir / "tensorboard")))

    def write(self, step: int, scalars: Mapping[str, float], eta_seconds: float | None = None) -> None:
        """Appends a record to metrics.jsonl and TensorBoard and logs it as a step line (with the ETA, if given)."""
        if not self.active:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        first = [k for k in ("loss", "lr", "eval_top1", "eval_top5", "eval_loss") if k in record]
        shown = first + sorted(k for k in record if k not in ("step", "images_per_sec", *first))
        details = " | ".join(f"{k} {record[k]:.5f}" if k == "loss" else f"{k} {record[k]:.3e}" if k == "lr"
                             else f"{k} {record[k]:.4f}" if k.startswith("eval_") else f"{k} {record[k]:.3f}"
                             for k in shown)
        speed = f" | {record['images_per_sec']:.1f} img/s" if "images_per_sec" in record else ""
        if eta_seconds is not None and step < self.total_steps:
            speed += f" | ETA {datetime.timedelta(seconds=round(eta_seconds))}"
        logging.info("step %d/%d | %s%s", step, self.total_steps, details, speed)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An [H, W, 3] uint8 image to TensorBoard."""
        if self.active:
            self.writer.write_images(step, {name: image[None]})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


@jax.jit
def _add_metrics(total: dict[str, jax.Array], metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree_util.tree_map(jnp.add, total, metrics)


_param_norm = jax.jit(optax.tree.norm)


class Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT) -> save at a step boundary and exit; a second Ctrl-C stops at once.

    One process: Python signal handlers. Several: JAX's preemption service (started by jax.distributed), which
    makes every process stop at the same step on SIGTERM.
    """

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
            self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C
        logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting%s.",
                        signal.Signals(signum).name, " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        return self.requested

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def nonfinite_message(step: int, manager) -> str:
    latest = manager.latest_step()
    kept = f"the last good checkpoint (step {latest}) is intact" if latest is not None else "no checkpoint was written"
    return (f"non-finite loss or gradient at step {step}: stopping; {kept}. Lower base_lr, raise warmup_epochs "
            f"or use float32 (model.dtype)")


# -------------------------------------------------------------------------------------------------------
# The loop.
# -------------------------------------------------------------------------------------------------------

Hook = Callable[[int, TrainState], None]  # called after every step with (step, state)


@dataclasses.dataclass
class Loop:
    """Steps a compiled `step_fn` until `total_steps` or preemption; logs, checkpoints and runs hooks.

    Metrics: every step's metrics are summed on the device (no host transfer); on logging steps their means
    over the steps since the previous log line are written (`lr`: its value at the last step), with
    `param_norm` after the update and `images_per_sec`. Progress (steps/s, ETA) and optional profiler traces
    come from clu's periodic actions.
    """

    step_fn: StepFn  # compiled: (state, global batch) -> (state, metrics)
    batches: Iterator[tuple[jax.Array, Any]]  # (global batch, input position after it)
    manager: Any  # orbax CheckpointManager
    log: MetricsLog
    total_steps: int
    batch_size: int  # global, for images/s
    log_every_steps: int
    checkpoint_every_steps: int  # 0: only at the end and on preemption
    model_fields: Mapping[str, Any]  # saved with every checkpoint
    hooks: Sequence[Hook] = ()
    profile_dir: epath.Path | None = None  # a profiler trace of `profile_steps` steps goes here
    profile_steps: int = 0
    profile_first_step: int = 10
    step: int = dataclasses.field(default=0, init=False)  # the last step run

    def run(self, state: TrainState, start_step: int) -> dict[str, float]:
        """Runs from `start_step`; returns the last logged metrics."""
        preemption = Preemption()
        try:
            return self._run(state, start_step, preemption)
        finally:
            preemption.restore()

    def _every(self, n: int, step: int) -> bool:
        return bool(n) and step % n == 0

    def _run(self, state: TrainState, start_step: int, preemption: Preemption) -> dict[str, float]:
        actions = [periodic_actions.ReportProgress(num_train_steps=self.total_steps, writer=self.log.writer,
                                                   every_steps=self.log_every_steps, every_secs=None)]
        if self.profile_steps and jax.process_index() == 0 and self.profile_dir is not None:
            actions.append(periodic_actions.Profile(
                logdir=self.profile_dir, num_profile_steps=self.profile_steps, profile_duration_ms=0,
                first_profile=max(self.profile_first_step, start_step + 1), every_steps=None, every_secs=None))
        step, last, total = start_step, {}, None
        if step < self.total_steps:
            batch, input_state = next(self.batches)
        mark_time, mark_step = time.perf_counter(), step
        while step < self.total_steps:
            # Dispatching the step and feeding the next batch never wait on the device: any device-to-host
            # transfer here would raise. The host reads results only on logging and saving steps.
            with jax.transfer_guard_device_to_host("disallow_explicit"):
                state, metrics = self.step_fn(state, batch)
                total = metrics if total is None else _add_metrics(total, metrics)
                step += 1
                consumed = input_state  # the input position after the batch this step used
                if step < self.total_steps:
                    batch, input_state = next(self.batches)  # overlaps the device's work on this step
            for action in actions:
                action(step)
            if self._every(self.log_every_steps, step) or step == self.total_steps:
                last = self._log(step, state, total, metrics, step - mark_step, time.perf_counter() - mark_time)
                mark_time, mark_step, total = time.perf_counter(), step, None
            for hook in self.hooks:
                hook(step, state)
            preempted = preemption.reached(step)
            checkpoints.raise_if_failed(self.manager)  # a background save that failed: stop now, not at the next save
            if step == self.total_steps or preempted or self._every(self.checkpoint_every_steps, step):
                bad = int(jax.device_get(state.nonfinite_step))
                if bad >= 0:
                    raise FloatingPointError(nonfinite_message(bad, self.manager))
                checkpoints.save(self.manager, step, state, self.model_fields, consumed)
            self.step = step
            if preempted:
                logging.warning("Preempted: saved step %d; re-run the same command to resume.", step)
                break
        return last

    def _log(self, step: int, state: TrainState, total: dict, metrics: dict, steps: int,
             seconds: float) -> dict[str, float]:
        total, lr, bad = jax.device_get((total, metrics.get("lr"), state.nonfinite_step))
        if int(bad) >= 0:
            raise FloatingPointError(nonfinite_message(int(bad), self.manager))
        scalars = {k: float(v) / steps for k, v in total.items()}
        if lr is not None:
            scalars["lr"] = float(lr)
        scalars["param_norm"] = float(_param_norm(state.params))
        scalars["images_per_sec"] = self.batch_size * steps / seconds
        self.log.write(step, scalars, eta_seconds=(self.total_steps - step) * seconds / steps)
        return scalars


@contextlib.contextmanager
def open_workdir(workdir: epath.Path, config, keep_checkpoints: int) -> Iterator[Any]:
    """Takes the workdir for this run and yields its Orbax CheckpointManager (closed, waiting for a save in
    flight, on exit).

    One run per workdir (a lock held by process 0, see mae_jax/workdir.py); a resume with another model or lr
    schedule is refused before config.json is overwritten, and every start's config is kept.
    """
    from mae_jax import workdir as workdir_lib

    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(workdir_lib.acquire_lock(workdir))
        workdir_lib.check_and_record_config(workdir, config, resuming=checkpoints.latest_step(
            workdir / "checkpoints") is not None, record=jax.process_index() == 0)
        manager = checkpoints.make_manager(workdir / "checkpoints", max_to_keep=keep_checkpoints)
        stack.callback(manager.close)
        yield manager


def restore_or_init(manager, init_variables: InitFn, tx: optax.GradientTransformation, seed: int,
                    mesh: jax.sharding.Mesh) -> tuple[int | None, TrainState, TrainState]:
    """(step restored or None, state, its shardings): the newest checkpoint that restores, straight into the
    shardings (a damaged one is moved aside with a warning, and the one before it tried), else a fresh state."""
    if manager.latest_step() is not None:
        abstract = abstract_state(init_variables, tx)
        shardings = state_shardings(abstract, tx, mesh)
        restored = checkpoints.restore_latest(manager, with_shardings(abstract, shardings))
        if restored is not None:
            return restored[0], restored[1], shardings
    return None, *create_state(init_variables, tx, seed, mesh)


# -------------------------------------------------------------------------------------------------------
# The run: what every task does between the command line and the summary.
# -------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An impossible setting: the message names the setting, its value and what is allowed."""


def validate_common(config, num_devices: int, process_count: int) -> tuple[int, int]:
    """One-line ConfigErrors for the fields every task shares (run length, schedule, logging, mesh, batch);
    returns the mesh shape (data, fsdp)."""
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
    try:
        data, fsdp = parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    return data, fsdp


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-step linear warmup from 0, then half-cycle cosine to min_lr (the official `lr_sched`, shared by
    pretraining, fine-tuning and the linear probe).

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


class Stages:
    """Start-up, visibly staged: each stage's line says what is happening and the time since the start."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str, *args) -> None:
        logging.info("[%5.1f s] " + message, time.perf_counter() - self.start, *args)


@dataclasses.dataclass
class RunContext:
    """What a task's hooks and summary may need of the run."""

    config: Any
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    log: MetricsLog
    total_steps: int
    steps_per_epoch: int
    stage: Stages


class Task:
    """What differs between pretraining, fine-tuning and the linear probe; `run` does the rest.

    Subclasses set `model`, and implement `init_fn`, `make_optimizer`, `compile_step`;
    the others have working defaults.
    """

    model: Any
    total_steps_hint = "raise total_steps or num_epochs to train longer"

    def init_fn(self) -> InitFn:
        """key -> {"params", "frozen"}: a fresh initialisation."""
        raise NotImplementedError

    def open_input(self, config, input_state: dict | None) -> Iterator[dict]:
        """The training input from `input_state` (None: the start); has `num_examples` and `get_state()`."""
        from mae_jax import input_pipeline  # TensorFlow, only when a run starts

        return input_pipeline.create_train_iterator(
            config.input, image_shape=self.model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(), state=input_state)

    def make_optimizer(self, config, schedule: optax.Schedule) -> optax.GradientTransformation:
        raise NotImplementedError

    def compile_step(self, config, tx, schedule, mesh, shardings) -> jax.stages.Compiled:
        raise NotImplementedError

    def init_from(self, path: str, state: TrainState, shardings: TrainState) -> TrainState:
        """Replaces the fresh variables by pretrained or converted weights (optimizer state kept)."""
        base = jax.device_get({"params": state.params, "frozen": state.frozen})
        from mae_jax import convert  # lazy: reading PyTorch files imports torch

        variables = convert.load_variables(path, self.model, base)
        logging.info("Initialised params from %s", path)
        return state.replace(params=jax.device_put(variables["params"], shardings.params),
                             frozen=jax.device_put(variables.get("frozen", state.frozen), shardings.frozen))

    def batches(self, data_iter, mesh: jax.sharding.Mesh) -> Iterator[tuple[PyTree, Any]]:
        """(global batch, input position after it) from this process's batches."""
        sharding = parallel.batch_sharding(mesh)
        while True:
            local = next(data_iter)
            yield jax.tree_util.tree_map(lambda x: parallel.global_batch(x, sharding), local), data_iter.get_state()

    def hooks(self, context: RunContext, state: TrainState) -> list[Hook]:
        return []

    def before_training(self, context: RunContext, state: TrainState, resume_step: int | None) -> bool:
        """Runs after the state is ready and before the step is compiled; False ends the run (e.g. eval_only)."""
        return True

    def summary(self, context: RunContext, last: dict[str, float]) -> None:
        """The closing lines after "Done", checkpoints, metrics and TensorBoard: what else was written, and
        the next command to run."""


def _run_length(config, num_examples: int, mesh_shape: tuple[int, int]) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over `num_examples` training examples, logged; warns when the
    run ends inside the lr warmup."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_examples} training examples")
    total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
    peak_lr = config.base_lr * config.batch_size / 256
    logging.info("%s: %d examples, %d steps/epoch, %d steps, peak lr %.3e, mesh data=%d x fsdp=%d over %d "
                 "process(es).", config.input.dataset, num_examples, steps_per_epoch, total_steps, peak_lr,
                 *mesh_shape, jax.process_count())
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if total_steps < warmup_steps:
        logging.warning("The run ends inside the lr warmup: step %d of %d warmup steps, lr %.3e of the peak %.3e "
                        "(raise total_steps or lower warmup_epochs).", total_steps, warmup_steps,
                        peak_lr * total_steps / warmup_steps, peak_lr)
    return steps_per_epoch, total_steps


def run(config, workdir: str | os.PathLike, task: Task, mesh_shape: tuple[int, int]) -> dict[str, float]:
    """Trains (or resumes) `task` in `workdir`: the workdir lock and config record, the input and its
    position, the schedule, the state (restored, or fresh and optionally `config.init_from`), the compiled step,
    the loop and the closing summary. Returns the last logged metrics."""
    stage = Stages()
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.create_mesh(*mesh_shape)
    parallel.process_batch_rows(parallel.batch_sharding(mesh), config.batch_size)

    with contextlib.ExitStack() as cleanup:
        manager = cleanup.enter_context(open_workdir(workdir, config, config.keep_checkpoints))
        resume_step = checkpoints.latest_step(manager.directory)  # complete steps only (Orbax lists any folder)

        def open_input(step):  # its length fixes the schedule; its position comes with the checkpoint
            return task.open_input(config, None if step is None else checkpoints.restore_input_state(manager, step))

        eval_only = config.get("eval_only", False)
        if eval_only:  # only the weights are evaluated: the training input is neither opened nor needed
            data_iter, steps_per_epoch, total_steps = None, 1, max(config.total_steps, 1)
        else:
            stage("Opening the input (%s)...", config.input.dataset)
            data_iter = open_input(resume_step)
            steps_per_epoch, total_steps = _run_length(config, data_iter.num_examples, mesh_shape)
            if resume_step is not None and resume_step >= total_steps:
                logging.info("Already complete: the checkpoint in %s is at step %d of %d; nothing to do (%s).",
                             manager.directory, resume_step, total_steps, task.total_steps_hint)
                return {}
        schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
        tx = task.make_optimizer(config, schedule)

        if resume_step is not None:
            stage("Restoring step %d from %s...", resume_step, manager.directory)
        else:
            stage("Initialising %s params...", f"{models.count_params(abstract_state(task.init_fn(), tx).params):,}")
        restored_step, state, shardings = restore_or_init(manager, task.init_fn(), tx, config.seed, mesh)
        if restored_step != resume_step:  # the latest step was damaged: the input continues from the one restored
            resume_step, data_iter = restored_step, None if eval_only else open_input(restored_step)
        if resume_step is None and config.init_from:
            state = task.init_from(config.init_from, state, shardings)

        log = MetricsLog(workdir, total_steps, resume_step or 0)
        cleanup.callback(log.close)
        context = RunContext(config=config, workdir=workdir, mesh=mesh, log=log, total_steps=total_steps,
                             steps_per_epoch=steps_per_epoch, stage=stage)
        if not task.before_training(context, state, resume_step):
            return {}
        stage("Compiling the train step (compilation cache: %s)...", jax.config.jax_compilation_cache_dir or "off")
        # The checkpoint's checks compile meanwhile on another core (one process: several must stay in step).
        pool = cleanup.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        saving = pool.submit(checkpoints.prepare_save, state) if jax.process_count() == 1 else None
        step_fn = task.compile_step(config, tx, schedule, mesh, shardings)
        hooks = task.hooks(context, state)
        saving.result() if saving else checkpoints.prepare_save(state)
        loop = Loop(
            step_fn=step_fn, batches=task.batches(data_iter, mesh), manager=manager, log=log,
            total_steps=total_steps, batch_size=config.batch_size, log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps, model_fields=models.constructor_fields(task.model),
            hooks=hooks, profile_dir=workdir / "tensorboard", profile_steps=config.profile_steps,
            profile_first_step=config.profile_first_step)
        stage("Training from step %d of %d.", resume_step or 0, total_steps)
        last = loop.run(state, int(resume_step or 0))
    if jax.process_index() == 0 and last:
        seconds = time.perf_counter() - stage.start
        loss = f", loss {last['loss']:.4f} (mean of the last logging window)" if "loss" in last else ""
        logging.info("Done: step %d/%d%s, %.0f s in all.", loop.step, total_steps, loss, seconds)
        logging.info("  checkpoints: %s   metrics: %s", workdir / "checkpoints", workdir / "metrics.jsonl")
        logging.info("  TensorBoard: tensorboard --logdir %s", workdir / "tensorboard")
        task.summary(context, last)
    return last
