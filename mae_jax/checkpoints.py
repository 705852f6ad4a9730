"""Orbax checkpoints: the training checkpoints under `workdir/checkpoints` and standalone weight exports.

Layout (one format for both, so that anything that reads weights reads either):

    <root>/<step>/state        PyTree: training state (`train_state.TrainState`: "step", "params",
                               "constants", "batch_stats", "opt_state", "rng", "nonfinite_step"), or only the
                               model's variables ({"params", "constants"?, "batch_stats"?}) in a weights export
    <root>/<step>/model        JSON: the model's constructor fields (enough to rebuild the architecture)
    <root>/<step>/input        JSON: the input pipeline's position (training checkpoints only)
    <root>/<step>/fingerprint  JSON: a uint32 checksum of every leaf of `state`, verified after restoring

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never
leaves a half-written checkpoint that the next run would pick up. A step folder counts only when it holds what a
finished save leaves (`COMPLETE_STEP_FILES`: Orbax's commit marker and metadata, our fingerprint item), which
`latest_step` decides without reading arrays: an empty folder or a partial copy named like a step is not the
latest step. What the files cannot tell (a copy interrupted half-way, a truncated or damaged file, flipped
bits) `restore_latest` finds: a step that is incomplete, does not restore or whose checksums differ is renamed
`<step>.corrupt-<reason>` (Orbax no longer sees it; nothing is deleted) with one warning, and the next newest
step is tried.

Write failures (read-only or full disk, permissions) raise one `CheckpointError` naming the directory and
the errno, and never leave the process waiting on Orbax's threads: the step directory is created in the
calling thread (`create_directories_asynchronously=False`). With Orbax's default, the directory is made by a
background thread while the other writer threads wait for its signal with a 20-minute timeout
(`AsyncOptions.timeout_secs`); when the mkdir fails no signal ever comes, and the interpreter's exit blocks
joining those non-daemon threads. That error is the only report of the failure: what Orbax's threads log and
TensorStore's callbacks print about it (`RuntimeError: Event loop is closed`) is held back or dropped
(`_OrbaxNoise`), unless absl's -v 1 asks for everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_lib
import gc
import logging as std_logging
import os
import re
import socket
import sys
import threading
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any
STATE, MODEL, INPUT, FINGERPRINT = "state", "model", "input", "fingerprint"
VARIABLES = ("params", "constants", "batch_stats")  # the collections of a model's variables (train_state)
LEGACY_COLLECTION = "frozen"  # before 0.2.0: the constants, or {"batch_stats": ...} of a classifier
CORRUPT_MARK = ".corrupt-"  # <step>.corrupt-<reason>: a step moved aside by restore_latest


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or used: a one-line message naming the directory, what was
    found and what to do."""


# -------------------------------------------------------------------------------------------------------
# The manager, and saving.
# -------------------------------------------------------------------------------------------------------


class CheckpointManager(ocp.CheckpointManager):
    """Orbax's CheckpointManager whose write failures, also those of a background save that surface while
    waiting or closing, are one `CheckpointError` (see `write_error`), and the only report of them: while it is
    open, what Orbax and TensorStore print about a failed background write is held back or dropped (`_NOISE`)."""

    in_flight: int | None = None  # the step whose (background) save was started last
    failed: bool = False  # a write failure was raised; Orbax then raises it again at every wait
    _open: bool = False

    def __init__(self, *args, **kwargs):
        _NOISE.enter()
        self._open = True
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._open = False
            _NOISE.exit()
            raise

    def failure(self, step: int | None, error: BaseException) -> CheckpointError:
        """The one `CheckpointError` of a failed write of `step`, to raise."""
        self.failed = True
        _NOISE.write_failed(epath.Path(self.directory), step)
        return write_error(epath.Path(self.directory), step, error)

    def save(self, step: int, *args, **kwargs) -> bool:
        saved = super().save(step, *args, **kwargs)  # first waits for the previous one: still `in_flight`
        self.in_flight = step
        return saved

    def wait_until_finished(self):
        try:
            with _quiet_orbax():
                super().wait_until_finished()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise bare Exceptions
            raise self.failure(self.in_flight, e) from None
        _NOISE.release_held()

    def raise_if_failed(self) -> None:
        """Raises now, as `wait_until_finished` would, if the background save in flight has already failed;
        returns at once otherwise (never waits). With several processes it does nothing: each would find out at
        its own step and leave the others waiting in the next step's collectives; the failure is raised at the
        next save instead."""
        if jax.process_count() > 1:
            return
        finalize = getattr(self, "_finalize_thread", None)  # Orbax's thread that waits for the save and commits it
        thread = finalize.get() if finalize is not None else None
        if thread is not None and not thread.is_alive() and getattr(thread, "exception", None) is not None:
            self.wait_until_finished()

    def close(self):
        """Waits for the save in flight, then closes. Its failure is raised as one `CheckpointError`, unless a
        failure was raised already: what closing meets then (the same failure again, a step metadata file that
        could not be written either) is its aftermath, and the first error stays the one reported."""
        if not self._open:
            return
        already_failed = self.failed
        try:
            self.wait_until_finished()
            with _quiet_orbax():
                super().close()
        except Exception as e:  # noqa: BLE001
            if already_failed:
                return
            if isinstance(e, CheckpointError):
                raise
            raise self.failure(self.in_flight, e) from None
        finally:
            self._open = False
            _NOISE.exit()


def make_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 enable_async: bool = True) -> CheckpointManager:
    """A CheckpointManager over `directory` (created if needed, and checked writable); saving is decided by
    the caller."""
    directory = epath.Path(directory).absolute()
    check_writable(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=enable_async,
        create=True,
        cleanup_tmp_directories=True,
        # In the calling thread: a failed mkdir then raises here instead of leaving Orbax's writer threads
        # waiting 20 minutes for its signal (module docstring).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    with _quiet_orbax():  # it lists the steps, reading their metadata
        return CheckpointManager(directory, options=options, item_names=(STATE, MODEL, INPUT, FINGERPRINT))


def check_writable(directory: str | os.PathLike) -> None:
    """Creates `directory` if needed and writes and removes a small probe file in it: a read-only, full or
    forbidden directory fails here, in one `CheckpointError`, before anything is compiled."""
    directory = epath.Path(directory)
    probe = directory / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise write_error(directory, None, e, probing=True) from None


def _errno_of(error: BaseException) -> int | None:
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(error))  # TensorStore's and Python's
    if found:
        return int(found.group(1) or found.group(2))
    if "RESOURCE_EXHAUSTED" in str(error):
        return errno_lib.ENOSPC
    if "PERMISSION_DENIED" in str(error):
        return errno_lib.EACCES
    return None


def write_error(directory: epath.Path, step: int | None, error: BaseException, *,
                probing: bool = False) -> CheckpointError:
    """One line for a failed checkpoint write: the directory, the errno, what is intact and what to do."""
    code = _errno_of(error)
    if code is not None:
        cause = f"{os.strerror(code)} ({errno_lib.errorcode.get(code, '?')}, errno {code})"
    else:
        cause = " ".join(str(error).split())[:300] or type(error).__name__
    where = getattr(error, "filename", None)
    if where is None:
        found = re.search(r'"(/[^"]+)"', str(error))
        where = found.group(1) if found else None
    at = f" at {where}" if where and os.fspath(where) != os.fspath(directory) else ""
    what = (f"cannot write checkpoints to {directory}" if probing else
            f"writing checkpoint step {step} to {directory} failed" if step is not None else
            f"writing a checkpoint to {directory} failed")
    latest = latest_step(directory)
    kept = f"the earlier checkpoints are intact (latest: step {latest})" if latest is not None else \
        "no checkpoint was written"
    return CheckpointError(f"{what}: {cause}{at}; {kept}. Make {directory} writable or free space on its disk, "
                           "then re-run the same command to resume")


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, model_fields: Mapping[str, Any],
         input_state: Mapping[str, Any] | None = None) -> None:
    """Saves (asynchronously if the manager is async) `state`, the model fields, the input position and the
    state's fingerprint. Refuses (FloatingPointError) to save a state holding non-finite values, so the last
    checkpoint stays the last good one; a write failure is one `CheckpointError`."""
    checksums, finite = _summary(state)
    bad = [name for name, ok in finite.items() if not ok]
    if bad:
        latest = latest_step(epath.Path(manager.directory))
        kept = f"the last checkpoint (step {latest}) is intact" if latest is not None else "no checkpoint was written"
        raise FloatingPointError(
            f"non-finite values at step {step} in {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}: "
            f"not saving them; {kept}. Lower base_lr, raise warmup_epochs or use float32 (model.dtype)")
    items = {STATE: ocp.args.StandardSave(state), MODEL: ocp.args.JsonSave(_jsonable(model_fields)),
             FINGERPRINT: ocp.args.JsonSave({"version": 1, "uint32_checksums": checksums})}
    if input_state is not None:
        items[INPUT] = ocp.args.JsonSave(dict(input_state))
    try:
        with _quiet_orbax():
            manager.save(step, args=ocp.args.Composite(**items), force=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        if isinstance(manager, CheckpointManager):
            raise manager.failure(step, e) from None
        _NOISE.write_failed(epath.Path(manager.directory), step)
        raise write_error(epath.Path(manager.directory), step, e) from None


def raise_if_failed(manager: ocp.CheckpointManager) -> None:
    """Raises the `CheckpointError` of a background save that has already failed, without waiting for one in
    flight (a no-op for other managers and with several processes): a loop that calls it every step stops at
    the step boundary after the failure, instead of training on until the next save only to fail there, while
    its other writes (metrics, TensorBoard) meet the same full or read-only disk."""
    if isinstance(manager, CheckpointManager):
        manager.raise_if_failed()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the state of `step` into the shapes, dtypes and shardings of `abstract_state` (unchecked:
    `restore_latest` verifies and falls back)."""
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]


# -------------------------------------------------------------------------------------------------------
# Fingerprints and finiteness, computed on the device.
# -------------------------------------------------------------------------------------------------------


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 [] of the bits of `x`, position-dependent. Integer sums wrap exactly, so the value does not
    depend on the reduction order: the same on any mesh, device count or host."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: [..., 2] halves
    index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    mixed = (bits ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)  # odd: a bijection mod 2^32
    return jnp.sum(mixed, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _summarize(leaves: list) -> tuple[list, list]:
    return [_checksum(x) for x in leaves], [_finite(x) for x in leaves]


def _summary(tree: PyTree) -> tuple[dict[str, int], dict[str, bool]]:
    """({leaf name: uint32 checksum}, {leaf name: all finite}) of `tree`, in one pass on the device."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [_leaf_name(path) for path, _ in flat]
    checksums, finite = jax.device_get(_summarize([leaf for _, leaf in flat]))
    return ({n: int(c) for n, c in zip(names, checksums)}, {n: bool(f) for n, f in zip(names, finite)})


def prepare_save(state: PyTree) -> None:
    """Compiles, by running it once, the fingerprint and finiteness check `save` computes for states like
    `state`, so that the first save (often a run's last act) does not wait for that compilation."""
    _summary(state)


# -------------------------------------------------------------------------------------------------------
# Restoring the newest intact step.
# -------------------------------------------------------------------------------------------------------


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step under `directory` (a checkpoints root), decided from its files without reading
    any array (`_incomplete`); None if none. Folders moved aside (`<step>.corrupt-<reason>`), Orbax's temporary
    folders and step folders that no finished save or copy left (empty, uncommitted, partial) are not steps."""
    directory = epath.Path(directory)
    try:
        steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((step for step in steps if _incomplete(directory / str(step)) is None), None)


class _Corrupt(Exception):
    """A step that cannot be restored: `slug` names the reason in the folder's new name."""

    def __init__(self, slug: str, reason: str):
        super().__init__(reason)
        self.slug, self.reason = slug, reason


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split(" See full TensorStore details")[0].split()) or type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


# What a finished save leaves in a step folder, besides the arrays: Orbax's commit marker (written last, before
# the temporary folder is renamed; on GCS the marker alone says the step is complete), its step and tree
# metadata, and our fingerprint item. A copy made file by file can lack any of them.
# The files every finished save leaves. (The fingerprint is verified where there is one: checkpoints written before
# 2026-11-23 have none.)
COMPLETE_STEP_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA", f"{STATE}/_METADATA")


def _incomplete(step_dir: epath.Path) -> _Corrupt | None:
    """Why `step_dir` is not a complete checkpoint (a `_Corrupt` naming the reason), or None; reads no array."""
    if not step_dir.is_dir():
        return _Corrupt("not-a-folder", "it is not a folder")
    names = sorted(p.name for p in step_dir.iterdir())
    if not names:
        return _Corrupt("empty", "the folder is empty (an interrupted copy?)")
    if STATE not in names:
        return _Corrupt("no-state", f"it has no '{STATE}' item (it has {names})")
    missing = [name for name in COMPLETE_STEP_FILES if not (step_dir / name).exists()]
    if missing:
        return _Corrupt("incomplete", f"it lacks {', '.join(missing)} (an interrupted save or copy)")
    return None


def _is_transient(error: BaseException) -> bool:
    """Failures that say nothing about the files: memory, permissions, interruptions."""
    text = str(error)
    return isinstance(error, (MemoryError, PermissionError, KeyboardInterrupt)) or \
        "RESOURCE_EXHAUSTED" in text or "PERMISSION_DENIED" in text


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """While we read or write: Orbax's own warnings and error logs (a 70-line traceback each), and the reports of
    TensorStore's never-awaited coroutines and closed event loops, are dropped: the failure is reported once, by
    us. Kept with absl's -v 1."""
    _NOISE.enter(quiet=True)
    try:
        yield
    finally:
        _NOISE.exit(quiet=True)


def _is_closed_loop_report(info) -> bool:
    """Whether an unraisable-exception report is TensorStore's `RuntimeError: Event loop is closed`: an operation
    ended after the asyncio loop awaiting it was closed, and handing its result over (`loop.call_soon_threadsafe`,
    in TensorStore's callback thread) failed. No object: TensorStore calls `PyErr_WriteUnraisable(NULL)`."""
    if info.object is not None or not isinstance(info.exc_value, RuntimeError) or \
            str(info.exc_value) != "Event loop is closed":
        return False
    tb = info.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


_ABANDONED = ("Task exception was never retrieved", "Future exception was never retrieved",
              "Task was destroyed but it is pending")


def _is_abandoned_orbax_task(record: std_logging.LogRecord) -> bool:
    """Whether an asyncio log record is about a task or future of Orbax's or TensorStore's that was abandoned
    with its loop (logged when the garbage collector meets it): its text or its error's frames name them."""
    text = record.getMessage()
    if not text.startswith(_ABANDONED):
        return False
    if "/orbax/" in text or "tensorstore" in text or "OCDBT" in text:
        return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if re.search(r"/orbax/|tensorstore", tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False


class _OrbaxNoise(std_logging.Filter):
    """What Orbax, TensorStore and asyncio print about a failed checkpoint read or write, besides our one line.

    A background save that fails (full disk, read-only folder) does so in Orbax's threads while training goes
    on. Orbax then logs the failure from each of its threads (an ERROR with a traceback), and ends the save's
    asyncio loop on the first failed write, closing it while TensorStore still runs the save's other writes; as
    each of those ends, TensorStore's callback thread finds the loop closed and reports `RuntimeError: Event loop
    is closed` to `sys.unraisablehook`, which prints a traceback: dozens of them, mixed with the step lines, and
    some after our error line, since they keep coming after the save was waited for; and when the garbage
    collector meets the abandoned tasks, asyncio logs "Task exception was never retrieved" with a traceback. A
    failed read (a damaged step that `restore_latest` moves aside) leaves the same behind. The failure itself is
    reported once by us: a `CheckpointError` raised when the save is waited for, a warning for a damaged step.

    So, while a manager is open or a `_quiet_orbax` block runs (`enter`/`exit`), unless absl's -v 1 asks for
    everything:
    - Orbax's ERROR records are held back until the next wait for a save: dropped if the save failed (its
      `CheckpointError` says it), else logged then, one line each; in `_quiet_orbax` blocks its warnings and
      errors are dropped, and so are TensorStore's reports of never-awaited coroutines;
    - the closed-loop reports (`_is_closed_loop_report`; even with -v 1: they say nothing) and asyncio's records of
      Orbax's abandoned tasks (`_is_abandoned_orbax_task`) are dropped;
    and for the rest of the process after a write or read failed (`write_failed`, `read_failed`), since the
    abandoned operations end, and are collected, later still, those reports and Orbax's warnings and errors that
    name the failed step's folder stay dropped. (After a failed read of a damaged step, a closed-loop report came
    1 time in 40 after its manager was closed, an asyncio record 2 times in 200; after a save failed in one item,
    another item's thread logged its own failure after the manager was closed, 1 time in 3.)
    Other records and reports pass unchanged. One instance per process (`_NOISE`): `sys.unraisablehook` is one.
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.RLock()
        self._users = 0  # open managers and _quiet_orbax blocks
        self._quiet = 0  # _quiet_orbax blocks
        self._after_failure = False
        self._held: list[std_logging.LogRecord] = []
        self._previous_hook = None
        self._attached: set[str] = set()  # the loggers this filter is on
        self._failed_steps: list[re.Pattern] = []  # the folders of failed reads and writes: `<root>/<step>[.tmp]`

    def filter(self, record: std_logging.LogRecord) -> bool:
        verbose = logging.get_verbosity() >= 1
        if record.name == "asyncio":
            return verbose or not _is_abandoned_orbax_task(record)
        if "/orbax/" not in record.pathname or getattr(record, "mae_jax_released", False) or verbose:
            return True
        if record.levelno >= std_logging.WARNING and self._failed_steps and \
                any(failed.search(record.getMessage()) for failed in self._failed_steps):
            return False
        if self._quiet:
            return record.levelno < std_logging.WARNING
        if record.levelno >= std_logging.ERROR and self._users:
            self._held.append(record)
            return False
        return True

    def __call__(self, info) -> None:  # as sys.unraisablehook
        if _is_closed_loop_report(info) or self._quiet and logging.get_verbosity() < 1 and (
                "coroutine" in repr(info.object) or "Event loop is closed" in str(info.exc_value)):
            return
        (self._previous_hook or sys.__unraisablehook__)(info)

    def _update(self) -> None:
        """Puts the filter on the loggers and the hook in place, or takes them away, as the state asks."""
        wanted = {"absl", "asyncio"} if self._users or self._after_failure else set()
        for name in wanted - self._attached:
            std_logging.getLogger(name).addFilter(self)
        for name in self._attached - wanted:
            std_logging.getLogger(name).removeFilter(self)
        self._attached = wanted
        if wanted and sys.unraisablehook is not self:
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self
        elif not wanted and sys.unraisablehook is self:
            sys.unraisablehook, self._previous_hook = self._previous_hook, None
        if not self._users:
            self._held.clear()

    def enter(self, quiet: bool = False) -> None:
        with self._lock:
            self._users += 1
            self._quiet += quiet
            self._update()

    def exit(self, quiet: bool = False) -> None:
        with self._lock:
            self._users -= 1
            self._quiet -= quiet
            self._update()

    def write_failed(self, directory: epath.Path, step: int | None) -> None:
        """A write of `step` under `directory` failed and is being raised: drops the records held back; see
        `read_failed`."""
        with self._lock:
            self._held.clear()
        self.read_failed(directory, step)

    def read_failed(self, directory: epath.Path, step: int | None) -> None:
        """A read or write of `step` under `directory` failed (and is reported by us): Orbax abandoned threads,
        TensorStore operations and asyncio tasks, which may end, log and be collected after the failure was
        reported; their reports stay dropped."""
        folder = re.escape(os.fspath(directory)) + (rf"/{step}(?![0-9])" if step is not None else "")
        with self._lock:
            self._failed_steps.append(re.compile(folder))
            self._after_failure = True
            self._update()

    def release_held(self) -> None:
        """A save finished well: logs the Orbax errors held back meanwhile, one line each (no traceback)."""
        with self._lock:
            held, self._held = self._held, []
        for record in held:
            record.exc_info, record.exc_text, record.mae_jax_released = None, None, True
            std_logging.getLogger("absl").handle(record)


_NOISE = _OrbaxNoise()


def _tree_shapes(tree: PyTree) -> dict[str, tuple]:
    return {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_fits(step_dir: epath.Path, abstract_state: PyTree) -> PyTree:
    """`abstract_state` in the layout the step stores (`_as_saved`), read from the state's metadata: Corrupt if
    that is unreadable; a CheckpointError (nothing moved) if it is readable but describes another model."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(step_dir / STATE)
        metadata = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        tree = getattr(metadata, "tree", metadata)
        if not isinstance(tree, dict):
            raise ValueError(f"metadata describes a {type(tree).__name__}")
        saved = _tree_shapes(tree)
    except Exception as e:  # noqa: BLE001
        if _is_transient(e):
            raise
        raise _Corrupt("unreadable-metadata", f"its state metadata is unreadable ({_first_line(e)})") from None
    target = _as_saved(tree, abstract_state)
    wanted = _tree_shapes(target)
    if saved != wanted:
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        differ = [f"{k} {list(saved[k])} (this run: {list(wanted[k])})" for k in sorted(set(saved) & set(wanted))
                  if saved[k] != wanted[k]]
        found = "; ".join(filter(None, [
            f"shapes differ: {', '.join(differ[:2])}" if differ else "",
            f"it lacks {', '.join(missing[:2])}" if missing else "",
            f"it has extra {', '.join(extra[:2])}" if extra else ""]))
        raise CheckpointError(
            f"checkpoint {step_dir} holds a state of another model ({found}): resume with the settings that wrote "
            f"it (workdir config.json), or use a new --workdir (config.init_from can start from its weights)")
    return target


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
    """The state and input position of `step`, verified against its fingerprint; raises _Corrupt."""
    step_dir = epath.Path(manager.directory) / str(step)
    incomplete = _incomplete(step_dir)
    if incomplete is not None:
        raise incomplete
    target = _check_fits(step_dir, abstract_state)
    items = {STATE: ocp.args.StandardRestore(target)}
    for name in (INPUT, FINGERPRINT):
        if (step_dir / name).exists():
            items[name] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        state = restored[STATE]
        jax.block_until_ready(state)
    except Exception as e:  # noqa: BLE001
        if _is_transient(e):
            raise
        raise _Corrupt("unreadable-data", f"it does not restore ({_first_line(e)})") from None
    if FINGERPRINT in items:
        saved = restored.get(FINGERPRINT)
        if not isinstance(saved, dict) or not isinstance(saved.get("uint32_checksums"), dict):
            raise _Corrupt("unreadable-fingerprint", f"its '{FINGERPRINT}' item is not the expected JSON")
        checksums, _ = _summary(state)
        differ = [name for name, value in saved["uint32_checksums"].items() if checksums.get(name) != value]
        if differ:
            raise _Corrupt("checksum-mismatch", f"the restored values differ from those saved (checksums of "
                           f"{', '.join(differ[:3])}{' and more' if len(differ) > 3 else ''}): damaged data files")
    else:
        logging.info("Checkpoint %s has no fingerprint (written before mae_jax recorded them): not verified.",
                     step_dir)
    return _from_saved(state, abstract_state), restored.get(INPUT) if INPUT in items else None


def _as_saved(tree: dict, abstract_state: PyTree) -> PyTree:
    """`abstract_state` in the layout of a step whose state metadata is `tree`: itself, or for a train state
    saved before 0.2.0 (no "constants" / "batch_stats" fields, a "frozen" one instead) a dict of the old fields."""
    if not dataclasses.is_dataclass(abstract_state) or not hasattr(abstract_state, "constants"):
        return abstract_state
    if LEGACY_COLLECTION not in tree:
        return abstract_state
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    constants, batch_stats = fields.pop("constants"), fields.pop("batch_stats")
    fields[LEGACY_COLLECTION] = {"batch_stats": batch_stats} if batch_stats else constants
    return fields


def _from_saved(state: PyTree, abstract_state: PyTree) -> PyTree:
    """The inverse of `_as_saved`: a train state of today's fields."""
    if not isinstance(state, dict) or LEGACY_COLLECTION not in state:
        return state
    return type(abstract_state)(**{"constants": {}, "batch_stats": {}, **_from_legacy(dict(state))})


def move_aside(step_dir: epath.Path, slug: str) -> epath.Path:
    """Renames `step_dir` to `<step>.corrupt-<slug>` (`-2`, `-3`... if taken), out of Orbax's sight."""
    target = step_dir.parent / f"{step_dir.name}{CORRUPT_MARK}{slug}"
    n = 1
    while target.exists():
        n += 1
        target = step_dir.parent / f"{step_dir.name}{CORRUPT_MARK}{slug}-{n}"
    step_dir.rename(target)
    return target


def _all_agree(ok: bool) -> bool:
    """Whether every process found `ok` (shards differ per process, so one may fail where others read)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: PyTree) -> tuple[int, PyTree, dict | None] | None:
    """(step, state, input position) of the newest step that restores and matches its fingerprint; None if
    there is no step at all.

    A step that does not restore (an empty, uncommitted or partial folder (`_incomplete`), unreadable metadata,
    a truncated, missing or damaged data file) is renamed `<step>.corrupt-<reason>` with one warning naming it
    and the reason, and the next newest is tried. A step that reads but describes another model is not moved: that is a
    `CheckpointError` (the settings changed). When every step is unreadable: one `CheckpointError`.
    Memory and permission errors propagate unchanged (they say nothing about the files).
    """
    directory = epath.Path(manager.directory)
    with _quiet_orbax():  # a damaged step-level metadata file makes Orbax log an ERROR per listing
        manager.reload()
        steps = sorted(manager.all_steps(), reverse=True)
    moved = []
    for step in steps:
        failure = None
        with _quiet_orbax():
            try:
                state, input_state = _restore_step(manager, step, abstract_state)
            except _Corrupt as e:
                failure = e
                _NOISE.read_failed(directory, step)
                gc.collect()  # the failed read's never-awaited coroutines, while their warnings are dropped
        if _all_agree(failure is None):
            if moved:
                with _quiet_orbax():
                    manager.reload()
            return step, state, input_state
        failure = failure or _Corrupt("unreadable-elsewhere", "another process could not restore it")
        if jax.process_index() == 0:
            target = move_aside(directory / str(step), failure.slug)
            logging.warning("Checkpoint %s is unusable: %s. Moved it aside to %s; trying the previous one.",
                            directory / str(step), failure.reason, target.name)
        moved.append(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mae_jax_move_aside_{step}")
    with _quiet_orbax():
        manager.reload()
    if not moved:
        return None
    raise CheckpointError(
        f"no checkpoint in {directory} can be restored: all {len(moved)} (steps {', '.join(map(str, moved))}) were "
        f"unusable and were moved aside to <step>{CORRUPT_MARK}<reason> (see the warnings above). Re-run to start "
        f"from scratch, or rename an intact copy back to <step>")


def _jsonable(fields: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in fields.items():
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif not isinstance(value, (int, float, str, bool, list, type(None))):
            value = str(np.dtype(value)) if key == "dtype" else str(value)
        out[key] = value
    return out


def _step_dir(path: epath.Path) -> epath.Path:
    """Resolves a workdir, a checkpoints root or a step directory to a step directory."""
    if (path / STATE).exists():
        return path
    if (path / "checkpoints").exists():
        path = path / "checkpoints"
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / STATE).exists()] \
        if path.exists() else []
    if not steps:
        raise FileNotFoundError(
            f"no mae_jax checkpoint under {path}: expected a workdir, its 'checkpoints' directory, "
            f"or one step directory holding '{STATE}'")
    return path / str(max(steps))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is (or holds) a checkpoint written by this module."""
    try:
        _step_dir(epath.Path(path))
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def load_variables(path: str | os.PathLike) -> tuple[dict | None, dict]:
    """Reads the model's variables ({"params", "constants"?, "batch_stats"?}) as host numpy arrays, and the
    model fields if recorded.

    `path` may be a workdir, its `checkpoints` directory (latest step), a step directory, or an export
    written by `save_variables`. The optimizer state is not read.
    """
    step_dir = _step_dir(epath.Path(path).absolute())  # Orbax finds no metadata under a relative path
    metadata = ocp.StandardCheckpointer().metadata(step_dir / STATE)
    metadata = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    tree = getattr(metadata, "tree", None)
    if not isinstance(tree, dict):
        raise ValueError(f"checkpoint {step_dir / STATE} has no readable Orbax metadata: expected a complete "
                         "checkpoint written by mae_jax (an interrupted copy?)")
    wanted = {k: tree[k] for k in (*VARIABLES, LEGACY_COLLECTION) if tree.get(k)}
    if "params" not in wanted:
        raise ValueError(f"checkpoint {step_dir} holds no 'params' (it has {sorted(tree)})")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    with ocp.PyTreeCheckpointer() as checkpointer:
        variables = checkpointer.restore(
            step_dir / STATE, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                          partial_restore=True))
    fields = None
    if (step_dir / MODEL).exists():
        fields = ocp.JsonCheckpointHandler().restore(step_dir / MODEL)
        if isinstance(fields.get("image_size"), list):
            fields["image_size"] = tuple(fields["image_size"])
    logging.info("Loaded weights from %s", step_dir)
    return fields, _from_legacy(variables)


def _from_legacy(variables: dict) -> dict:
    """Variables as written before 0.2.0, when a classifier's batch_stats and the MAE's constants were both kept
    under "frozen", in today's collections."""
    legacy = variables.pop(LEGACY_COLLECTION, None)
    if legacy:
        variables.update({"batch_stats": legacy["batch_stats"]} if "batch_stats" in legacy else {"constants": legacy})
    return variables


def save_variables(directory: str | os.PathLike, variables: PyTree, model_fields: Mapping[str, Any],
                   step: int = 0) -> epath.Path:
    """Writes a weights export (the model's variables + model fields) that `load_variables` and
    `config.init_from` read. Returns the step directory."""
    variables = {k: variables[k] for k in VARIABLES if variables.get(k)}
    variables = jax.tree_util.tree_map(np.asarray, variables)
    with make_manager(directory, max_to_keep=None, enable_async=False) as manager:
        save(manager, step, variables, model_fields)
        manager.wait_until_finished()
    return epath.Path(directory).absolute() / str(step)
