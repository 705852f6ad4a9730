"""Running compiled steps: the training loop, its metrics log, preemption, and when periodic work is due.

`Loop` steps a compiled train step (or several, one per batch shape: `dispatch_by_batch_shapes`) over global
batches until the run's last step or a preemption: it sums the step's metrics on the device, logs their means
over each logging window (with what the run measures on the host at that step, e.g. the learning rate), saves
checkpoints, runs the task's hooks and stops on a non-finite loss. It knows no task: whatever metrics a step
returns are what it logs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from mae_jax import checkpoints
from mae_jax.train_state import TrainState

PyTree = Any
StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]
Hook = Callable[[int, TrainState], None]  # called after every step with (step, state)


def _shapes(batch: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves)


def _describe(batch: PyTree) -> str:
    """E.g. "images [16, 48, 48, 3] uint8"."""
    return ", ".join(f"{jax.tree_util.keystr(path, simple=True)} [{', '.join(map(str, x.shape))}] {np.dtype(x.dtype)}"
                     for path, x in jax.tree_util.tree_flatten_with_path(batch)[0])


def dispatch_by_batch_shapes(steps: Sequence[tuple[PyTree, StepFn]]) -> StepFn:
    """One step function over compiled steps that take batches of different shapes, given as (the batch they take,
    as arrays or ShapeDtypeStructs; the step): each batch runs on the step compiled for its shapes and dtypes. A
    single step is returned as it is."""
    if len(steps) == 1:
        return steps[0][1]
    by_shapes = {_shapes(spec): step for spec, step in steps}
    compiled_for = "; ".join(_describe(spec) for spec, _ in steps)

    def step_fn(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        step = by_shapes.get(_shapes(batch))
        if step is None:
            raise ValueError(f"a batch of {_describe(batch)} matches none of the compiled steps ({compiled_for})")
        return step(state, batch)

    return step_fn


def itstime(step: int, every_steps: int, total_steps: int) -> bool:
    """Whether periodic work is due after `step`: every `every_steps` steps (0: never) and after the last step."""
    return (every_steps > 0 and step % every_steps == 0) or step == total_steps


# -------------------------------------------------------------------------------------------------------
# Metrics.
# -------------------------------------------------------------------------------------------------------


def _read(path: epath.Path) -> tuple[list[dict], str | None]:
    """(records, the torn last line or None) of a metrics.jsonl: a last line that is unterminated or not JSON
    (a kill mid-write) is torn; any other bad line is an error."""
    if not path.exists():
        return [], None
    text = path.read_text()
    lines = text.split("\n")
    unterminated = lines.pop()  # "" when the file ends with a newline
    records, torn = [], unterminated or None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 or torn:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
            torn = line
    return records, torn


def read_metrics(path: epath.Path) -> list[dict]:
    """The records of a metrics.jsonl, without a torn last line (a kill mid-write)."""
    return _read(epath.Path(path))[0]


def _format(value: float) -> str:
    return f"{value:.5g}"


class MetricsLog:
    """metrics.jsonl + TensorBoard events (process 0 only), and a step line on the log for every record.

    On resume, metrics.jsonl is cut back to the checkpoint's step (and a torn last line dropped, with a warning)
    by an atomic rewrite (a temporary file, then a rename): a kill at any moment leaves the old or the new history,
    and every line stays one JSON record.
    """

    def __init__(self, workdir: epath.Path, total_steps: int, resume_step: int):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if not self.active:
            return
        records, torn = _read(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        if torn is not None:
            logging.warning("%s: dropping its torn last line %r (the run stopped while writing it).", self.path,
                            torn[:60] + ("..." if len(torn) > 60 else ""))
        if len(kept) != len(records) or torn is not None:
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        from clu import metric_writers  # imports tensorflow for the event files

        self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir / "tensorboard")))

    def write(self, step: int, scalars: Mapping[str, float], eta_seconds: float | None = None) -> None:
        """Appends a record to metrics.jsonl and TensorBoard and logs it as a step line: the loss first, the other
        scalars by name, `images_per_sec` as the speed, and the ETA if given."""
        if not self.active:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        names = sorted((k for k in record if k not in ("step", "images_per_sec")), key=lambda k: (k != "loss", k))
        details = " | ".join(f"{k} {_format(record[k])}" for k in names)
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


# -------------------------------------------------------------------------------------------------------
# Preemption.
# -------------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class Loop:
    """Steps a compiled `step_fn` until `total_steps` or preemption; logs, checkpoints and runs hooks.

    Metrics: every step's metrics are summed on the device (no host transfer); on logging steps their means over
    the steps since the previous log line are written, then what `measure(step, state)` returns (host-side
    values at that step) and `images_per_sec`. Progress (steps/s, ETA) and optional profiler traces come from
    clu's periodic actions.
    """

    step_fn: StepFn  # compiled: (state, global batch) -> (state, metrics)
    batches: Iterator[tuple[PyTree, Any]]  # (global batch, input position after it)
    manager: Any  # orbax CheckpointManager
    log: MetricsLog
    total_steps: int
    batch_size: int  # global, for images/s
    log_every_steps: int
    checkpoint_every_steps: int  # 0: only at the end and on preemption
    model_fields: Mapping[str, Any]  # saved with every checkpoint
    measure: Callable[[int, TrainState], Mapping[str, float]] = lambda step, state: {}
    hooks: Sequence[Hook] = ()
    profile_dir: epath.Path | None = None  # a profiler trace of `profile_steps` steps goes here
    profile_steps: int = 0
    profile_first_step: int = 10
    step: int = dataclasses.field(default=0, init=False)  # the last step run
    preempted: bool = dataclasses.field(default=False, init=False)  # stopped early, the last step saved

    def run(self, state: TrainState, start_step: int) -> dict[str, float]:
        """Runs from `start_step`; returns the last logged metrics."""
        preemption = Preemption()
        try:
            return self._run(state, start_step, preemption)
        finally:
            preemption.restore()

    def _run(self, state: TrainState, start_step: int, preemption: Preemption) -> dict[str, float]:
        actions = [periodic_actions.ReportProgress(num_train_steps=self.total_steps, writer=self.log.writer,
                                                   every_steps=self.log_every_steps, every_secs=None)]
        if self.profile_steps and jax.process_index() == 0 and self.profile_dir is not None:
            actions.append(periodic_actions.Profile(
                logdir=self.profile_dir, num_profile_steps=self.profile_steps, profile_duration_ms=0,
                first_profile=max(self.profile_first_step, start_step + 1), every_steps=None, every_secs=None))
        step, last, total = start_step, {}, None
        self.step = step
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
            if itstime(step, self.log_every_steps, self.total_steps):
                last = self._log(step, state, total, step - mark_step, time.perf_counter() - mark_time)
                mark_time, mark_step, total = time.perf_counter(), step, None
            for hook in self.hooks:
                hook(step, state)
            preempted = preemption.reached(step)
            checkpoints.raise_if_failed(self.manager)  # a background save that failed: stop now, not at the next
            if preempted or itstime(step, self.checkpoint_every_steps, self.total_steps):
                bad = int(jax.device_get(state.nonfinite_step))
                if bad >= 0:
                    raise FloatingPointError(nonfinite_message(bad, self.manager))
                checkpoints.save(self.manager, step, state, self.model_fields, consumed)
            self.step = step
            if preempted:
                self.preempted = True
                break
        return last

    def _log(self, step: int, state: TrainState, total: dict, steps: int, seconds: float) -> dict[str, float]:
        total, bad = jax.device_get((total, state.nonfinite_step))
        if int(bad) >= 0:
            raise FloatingPointError(nonfinite_message(int(bad), self.manager))
        scalars = {k: float(v) / steps for k, v in total.items()}
        scalars.update(self.measure(step, state))
        scalars["images_per_sec"] = self.batch_size * steps / seconds
        self.log.write(step, scalars, eta_seconds=(self.total_steps - step) * seconds / steps)
        return scalars
