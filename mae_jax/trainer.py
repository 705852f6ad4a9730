"""The skeleton every task shares: build the compiled programs of a run for a mesh, then run them.

A task (`Task`: pretraining in `mae_jax/train.py`, fine-tuning and the linear probe in `mae_jax/finetune.py`)
owns what differs: its model, variables, optimizer, the batch it takes and the pure step it runs on it, any
other program it compiles (an evaluation, reconstructions), its input, hooks and closing lines. This module
owns what does not differ, in two parts:

- `build(config, task, devices, num_examples)` -> `Setup`: the ("data", "fsdp") mesh over `devices` (a
  process's real devices, or the compile-only devices of a TPU topology: `mae_jax/plan.py` compiles a run for
  a pod slice from any machine), the run's length and lr schedule, the optimizer, the abstract state with its
  shardings, and every program of the run (`Program`: a function with the abstract arguments it is compiled
  for): the train step (one program per shape of batch the task's input delivers, `Task.train_step_programs`),
  then the task's others. Nothing is allocated or compiled; nothing reads `jax.devices()` or
  `jax.default_backend()`.
- `run(config, workdir, task)`: the workdir (lock, settings, resume), `build` for this process's devices,
  the state (restored, or fresh and optionally `config.init_from`), the input at its saved position, the
  programs compiled ahead of time, `loop.Loop`, the closing summary.

`train_and_evaluate(config, workdir)` is what `main.py` calls: the task named by `config.task` (`TASKS`).
Adding a task: a module with a `Task` subclass, and its name in `TASKS`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import os
import time
from typing import Any, Callable, ClassVar, Iterator, Mapping

import jax
import optax
from absl import logging
from etils import epath

from mae_jax import checkpoints, config_lib, convert, loop, models, parallel
from mae_jax import workdir as workdir_lib
from mae_jax.train_state import (TrainState, abstract_state, init_state, learning_rate_schedule, peak_lr,
                                 state_shardings, warmup_steps, with_shardings)

PyTree = Any

# config.task -> "module:Task subclass", imported when a run of it starts.
TASKS = {
    "pretrain": "mae_jax.train:Pretraining",
    "finetune": "mae_jax.finetune:Classification",
    "linprobe": "mae_jax.finetune:Classification",
}


class ConfigError(ValueError):
    """An impossible setting: the message names the setting, its value and what is allowed."""


def check(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def validate_common(config, num_devices: int, process_count: int) -> tuple[int, int]:
    """One-line ConfigErrors for the fields every task shares (run length, schedule, logging, mesh, batch);
    returns the mesh shape (data, fsdp)."""
    check(isinstance(config.total_steps, int) and config.total_steps >= 0,
          f"total_steps {config.total_steps} must be >= 0 (0: train for num_epochs)")
    check(config.total_steps > 0 or config.num_epochs > 0,
          f"num_epochs {config.num_epochs} must be > 0 when total_steps is 0")
    check(config.warmup_epochs >= 0, f"warmup_epochs {config.warmup_epochs} must be >= 0")
    check(config.base_lr > 0, f"base_lr {config.base_lr} must be > 0")
    check(0 <= config.min_lr <= peak_lr(config), f"min_lr {config.min_lr} must be in [0, base_lr * batch_size / 256]")
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
    check(batch % process_count == 0, f"batch_size {batch} is not divisible by the {process_count} processes")
    check(batch % (data * fsdp) == 0,
          f"batch_size {batch} is not divisible by the {data * fsdp} devices of the data={data} x fsdp={fsdp} mesh")
    check(batch % (data * fsdp * accum) == 0,
          f"batch_size {batch} is not divisible by grad_accum_steps {accum} x {data * fsdp} devices: "
          f"each micro-batch must split evenly over the devices")
    return data, fsdp


def run_length(config, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over `num_examples` training examples."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_examples} training examples")
    return steps_per_epoch, config.total_steps or int(config.num_epochs * steps_per_epoch)


# -------------------------------------------------------------------------------------------------------
# Build: everything up to the compiled programs, for any devices.
# -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """A function of a run and the abstract arguments it is compiled for (ShapeDtypeStructs carrying their
    shardings): `lower()` lowers it as `jax.jit` with those shardings, `.compile()` gives the executable.
    Called with arguments of other shapes or shardings, a compiled program raises; it never recompiles."""

    description: str  # what the start-up line says is being compiled, e.g. "the train step"
    mesh: jax.sharding.Mesh
    fn: Callable
    args: tuple
    out_shardings: PyTree
    donate_argnums: tuple[int, ...] = ()

    def lower(self) -> jax.stages.Lowered:
        """Lowered under the mesh (`jax.set_mesh`): the model's sharding constraints (`parallel.constrain_batch`)
        refer to its axes."""
        in_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.args)
        with jax.set_mesh(self.mesh):
            return jax.jit(self.fn, in_shardings=in_shardings, out_shardings=self.out_shardings,
                           donate_argnums=self.donate_argnums).lower(*self.args)


@dataclasses.dataclass
class Setup:
    """What `build` makes of a config for a mesh: everything a run needs before it has data or a state."""

    config: Any
    task: "Task"
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    abstract: TrainState  # the state's ShapeDtypeStructs, carrying their shardings
    shardings: TrainState
    programs: dict[str, Program] = dataclasses.field(default_factory=dict)  # "train_step" first
    train_steps: tuple[str, ...] = ("train_step",)  # the programs of `programs` the loop steps with

    def train_step_program(self, description: str, spec: Mapping[str, jax.ShapeDtypeStruct]) -> Program:
        """The task's train step compiled for global batches of `spec` (global shapes), the state donated."""
        return Program(description, self.mesh, self.task.train_step(self), (self.abstract, self.batch(spec)),
                       out_shardings=(self.shardings, self.replicated), donate_argnums=(0,))

    def batch(self, spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
        """`spec` (global shapes) with every leaf split over the mesh's batch axes."""
        sharding = parallel.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()}

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return parallel.replicated(self.mesh)

    def init_state(self) -> TrainState:
        """A fresh state (the run's seed), initialised directly into its shardings (no host copy)."""
        init = jax.jit(init_state, static_argnums=(0, 1), out_shardings=self.shardings)
        return init(self.task.init_variables, self.tx, self.config.seed)


def build(config, task: "Task", devices, num_examples: int) -> Setup:
    """The `Setup` of a run of `task` on `devices` (see the module docstring), over `num_examples` training
    examples; raises ConfigError if the mesh cannot feed every process its own rows of the batch."""
    mesh = parallel.create_mesh(devices, config.mesh.data, config.mesh.fsdp)
    try:
        parallel.check_batch_layout(mesh, config.batch_size)
    except ValueError as e:
        raise ConfigError(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}: {e}") from None
    steps_per_epoch, total_steps = run_length(config, num_examples)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = task.make_optimizer(config, schedule)
    abstract = abstract_state(task.init_variables, tx)
    shardings = state_shardings(abstract, tx, mesh)
    setup = Setup(config=config, task=task, mesh=mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  schedule=schedule, tx=tx, abstract=with_shardings(abstract, shardings), shardings=shardings)
    train_steps = task.train_step_programs(setup)
    setup.programs.update(train_steps)
    setup.train_steps = tuple(train_steps)
    setup.programs.update(task.programs(setup))
    return setup


# -------------------------------------------------------------------------------------------------------
# Tasks.
# -------------------------------------------------------------------------------------------------------


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
    setup: Setup
    compiled: dict[str, jax.stages.Compiled]  # the setup's programs, by name
    log: loop.MetricsLog


class Task:
    """What differs between pretraining, fine-tuning and the linear probe; `build` and `run` do the rest.

    A subclass sets `model` (for the platform its programs are compiled for: `models.resolve_ops`) and
    `model_fields` (the model as configured, recorded with every checkpoint) in `__init__`, and implements
    `init_variables`, `make_optimizer`, `batch_spec` and `train_step`; the other methods have working defaults.
    """

    model: Any
    model_fields: dict
    total_steps_hint: ClassVar[str] = "raise total_steps or num_epochs to train longer"

    def __init__(self, config, platform: str):
        raise NotImplementedError

    @classmethod
    def validate(cls, config, num_devices: int, process_count: int) -> tuple[int, int]:
        """One-line ConfigErrors for impossible settings, before anything is compiled; the mesh shape."""
        return validate_common(config, num_devices, process_count)

    def init_variables(self, rng: jax.Array) -> dict[str, PyTree]:
        """Fresh variables (see `mae_jax.train_state`) from `rng`."""
        raise NotImplementedError

    def make_optimizer(self, config, schedule: optax.Schedule) -> optax.GradientTransformation:
        raise NotImplementedError

    def batch_spec(self, config) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the train step takes, e.g. {"images": uint8 [B, H, W, C]}."""
        raise NotImplementedError

    def train_step(self, setup: Setup) -> loop.StepFn:
        """The pure step (state, batch) -> (state, metrics) that `build` compiles with the state donated."""
        raise NotImplementedError

    def train_step_programs(self, setup: Setup) -> dict[str, Program]:
        """The compiled train step(s), "train_step" first (`setup.train_step_program`): one by default, on
        `batch_spec`. A task whose input delivers batches of several shapes (pretraining over several image sizes)
        returns one program per shape; the loop runs each batch on the program compiled for its shapes."""
        return {"train_step": setup.train_step_program("the train step", self.batch_spec(setup.config))}

    def programs(self, setup: Setup) -> dict[str, Program]:
        """The run's other programs (compiled at start-up, and by the planner)."""
        return {}

    def num_train_examples(self, config) -> int:
        """Examples in the training split, from the dataset's metadata (the input is not opened)."""
        from mae_jax import input_pipeline  # TensorFlow

        return input_pipeline.num_train_examples(config.input)

    def open_input(self, config, input_state: dict | None) -> Iterator[dict]:
        """The training input from `input_state` (None: the start); has `num_examples` and `get_state()`."""
        from mae_jax import input_pipeline  # TensorFlow

        return input_pipeline.create_train_iterator(
            config.input, image_shape=self.model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(), state=input_state)

    def batches(self, data_iter, mesh: jax.sharding.Mesh) -> Iterator[tuple[PyTree, Any]]:
        """(global batch, input position after it) from this process's batches."""
        sharding = parallel.batch_sharding(mesh)
        while True:
            local = next(data_iter)
            yield jax.tree_util.tree_map(lambda x: parallel.global_batch(x, sharding), local), data_iter.get_state()

    def init_from(self, path: str, state: TrainState, setup: Setup) -> TrainState:
        """The state with pretrained or converted weights (`convert.load_variables`) for its variables; what
        the source lacks keeps its fresh value. The optimizer state is kept."""
        variables = convert.load_variables(path, self.model, jax.device_get(state.variables))
        logging.info("Initialised the %s from %s", type(self.model).__name__, path)
        return state.replace_variables(jax.device_put(variables, setup.shardings.variables))

    def hooks(self, context: RunContext) -> list[loop.Hook]:
        return []

    def summary(self, context: RunContext, last: dict[str, float]) -> None:
        """The closing lines of a finished run after "Done", checkpoints, metrics and TensorBoard: what else was
        written, and the next command to run."""

    def run(self, config, workdir: str | os.PathLike, devices, command: str | None = None) -> dict[str, float]:
        """Trains (or resumes) this task in `workdir`; see `trainer.run`."""
        return run(config, workdir, self, devices, command)


def task_class(config) -> type[Task]:
    """The Task subclass of `config.task` (pretraining configs may leave it out)."""
    name = config.get("task", "pretrain")
    if name not in TASKS:
        raise ConfigError(f"task {name!r} must be one of {sorted(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


# -------------------------------------------------------------------------------------------------------
# Run: build for this process's devices, then train.
# -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_workdir(workdir: epath.Path, config) -> Iterator[tuple[Any, int | None]]:
    """Takes the workdir for this run and yields (its Orbax CheckpointManager, closed, waiting for a save in
    flight, on exit; the step of its newest complete checkpoint or None). One run per workdir (a lock held by
    process 0, see mae_jax/workdir.py); a resume with another model or lr schedule is refused here, before
    anything is compiled or recorded."""
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(workdir_lib.acquire_lock(workdir))
        # Complete steps only (Orbax lists any step folder).
        resume_step = checkpoints.latest_step(workdir / "checkpoints")
        workdir_lib.check_and_record_config(workdir, config, resuming=resume_step is not None, record=False)
        manager = checkpoints.make_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        stack.callback(manager.close)
        yield manager, resume_step


def restore_or_init(manager, setup: Setup) -> tuple[int | None, TrainState, dict | None]:
    """(step restored or None, state, input position or None): the newest checkpoint that restores, straight
    into the shardings (a damaged one is moved aside with a warning, and the one before it tried), else a fresh
    state."""
    if manager.latest_step() is not None:
        restored = checkpoints.restore_latest(manager, setup.abstract)
        if restored is not None:
            return restored
    return None, setup.init_state(), None


def _log_run_length(config, length: tuple[int, int], num_examples: int, mesh_shape: tuple[int, int]):
    steps_per_epoch, total_steps = length
    logging.info("%s: %d examples, %d steps/epoch, %d steps, peak lr %.3e, mesh data=%d x fsdp=%d over %d "
                 "process(es).", config.input.dataset, num_examples, steps_per_epoch, total_steps, peak_lr(config),
                 *mesh_shape, jax.process_count())
    warmup = warmup_steps(config, steps_per_epoch)
    if total_steps < warmup:
        logging.warning("The run ends inside the lr warmup: step %d of %d warmup steps, lr %.3e of the peak %.3e "
                        "(raise total_steps or lower warmup_epochs).", total_steps, warmup,
                        peak_lr(config) * total_steps / warmup, peak_lr(config))


def run(config, workdir: str | os.PathLike, task: Task, devices, command: str | None = None) -> dict[str, float]:
    """Trains (or resumes) `task` in `workdir` on `devices`: the workdir lock and settings, completion decided
    from the dataset's metadata, `build`, the state (restored, or fresh and optionally `config.init_from`), the
    input at its saved position, every program compiled, the loop and the closing lines. `command` (the
    command line of this run) is what the closing lines tell to re-run. Returns the last logged metrics."""
    stage = Stages()
    workdir = epath.Path(workdir)
    resume_command = command or "the same command"
    with contextlib.ExitStack() as cleanup:
        manager, resume_step = cleanup.enter_context(open_workdir(workdir, config))
        num_examples = task.num_train_examples(config)
        length = run_length(config, num_examples)
        if resume_step is not None and resume_step >= length[1]:
            logging.info("Already complete: the checkpoint in %s is at step %d of %d; nothing to do (%s).",
                         manager.directory, resume_step, length[1], task.total_steps_hint)
            return {}
        if jax.process_index() == 0:
            workdir_lib.record_config(workdir, config)
        setup = build(config, task, devices, num_examples)
        _log_run_length(config, length, num_examples, (setup.mesh.shape["data"], setup.mesh.shape["fsdp"]))

        if resume_step is not None:
            stage("Restoring step %d from %s...", resume_step, manager.directory)
        else:
            stage("Initialising %s params...", f"{models.count_params(setup.abstract.params):,}")
        resume_step, state, input_state = restore_or_init(manager, setup)
        if resume_step is None and config.init_from:
            state = task.init_from(config.init_from, state, setup)

        stage("Opening the input (%s)...", config.input.dataset)
        data_iter = task.open_input(config, input_state)

        # The checkpoint's checks compile meanwhile on another core (one process: several must stay in step).
        pool = cleanup.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        saving = pool.submit(checkpoints.prepare_save, state) if jax.process_count() == 1 else None
        compiled = {}
        for name, program in setup.programs.items():
            stage("Compiling %s (compilation cache: %s)...", program.description,
                  jax.config.jax_compilation_cache_dir or "off")
            compiled[name] = program.lower().compile()
        saving.result() if saving else checkpoints.prepare_save(state)

        log = loop.MetricsLog(workdir, setup.total_steps, resume_step or 0)
        cleanup.callback(log.close)
        context = RunContext(config=config, workdir=workdir, setup=setup, compiled=compiled, log=log)
        param_norm = jax.jit(optax.tree.norm)
        step_fn = loop.dispatch_by_batch_shapes(
            [(setup.programs[name].args[1], compiled[name]) for name in setup.train_steps])
        runner = loop.Loop(
            step_fn=step_fn, batches=task.batches(data_iter, setup.mesh), manager=manager, log=log,
            total_steps=setup.total_steps, batch_size=config.batch_size, log_every_steps=config.log_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps, model_fields=task.model_fields,
            measure=lambda step, state: {"lr": float(setup.schedule(step - 1)),
                                         "param_norm": float(param_norm(state.params))},
            hooks=task.hooks(context), profile_dir=workdir / "tensorboard", profile_steps=config.profile_steps,
            profile_first_step=config.profile_first_step)
        stage("Training from step %d of %d.", resume_step or 0, setup.total_steps)
        last = runner.run(state, int(resume_step or 0))
    if jax.process_index() == 0:
        seconds = time.perf_counter() - stage.start
        if runner.preempted:
            logging.info("Stopped at step %d of %d (saved), %.0f s in all. To resume: %s", runner.step,
                         setup.total_steps, seconds, resume_command)
        elif last:
            loss = f", loss {last['loss']:.4f} (mean of the last logging window)" if "loss" in last else ""
            logging.info("Done: step %d/%d%s, %.0f s in all.", runner.step, setup.total_steps, loss, seconds)
            logging.info("  checkpoints: %s   metrics: %s", workdir / "checkpoints", workdir / "metrics.jsonl")
            logging.info("  TensorBoard: tensorboard --logdir %s", workdir / "tensorboard")
            task.summary(context, last)
    return last


def train_and_evaluate(config, workdir: str | os.PathLike, command: str | None = None) -> dict[str, float]:
    """Runs `config` (its task: `config.task`, pretraining if absent) in `workdir`: validates it, starts the
    processes of a multi-host job, and runs the task on this process's devices. `command`: the command line,
    for the lines that say how to resume. Returns the last logged metrics."""
    config_lib.resolve(config)
    cls = task_class(config)
    parallel.maybe_initialize_distributed()
    cls.validate(config, jax.device_count(), jax.process_count())
    devices = jax.devices()
    task = cls(config, platform=devices[0].platform)
    return task.run(config, workdir, devices, command)
