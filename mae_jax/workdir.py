"""The workdir of a run: one run at a time (a lock), and the settings of every start (config.json + history).

Lock. `acquire_lock(workdir)` holds `workdir/run.lock` for the life of the run; it records the holder's host,
pid and start time. A second run on the same workdir stops with one line naming the holder.
  - Local disks (and NFSv4): the lock is an `fcntl.flock` on that file, which the kernel releases when the
    holder exits in any way (SIGKILL, power loss of a client), so a lock is never stale: when the flock can
    be taken, the previous holder is gone, and its record is replaced (with a warning). Exclusive.
  - Object stores (gs://, s3://: no flock, no atomic create): best effort. A record naming a live process on
    this host refuses the start; any other record is replaced with a warning. Two starts within the same
    second on different hosts can both pass; nothing is ever deleted except the lock file itself.

Settings. `check_and_record_config(workdir, config, resuming=...)` compares the settings of a resumed run
with those that wrote the checkpoints (`workdir/config.json`) before overwriting it (`check_resume`), then
writes config.json (the latest start) and `config_history/<UTC time>.json` (every start), each atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Mapping

import ml_collections
from absl import logging
from etils import epath

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
CONFIG_HISTORY = "config_history"

# Model fields that change speed or memory, not the function learned: may change on resume (logged).
# scan_blocks stores the blocks' parameters stacked: a checkpoint of the other layout does not restore.
SPEED_FIELDS = ("dtype", "attention", "ops", "remat", "scan_blocks")
# Fields that change the learning-rate curve (peak = base_lr * batch_size / 256, warmup and cosine horizon in
# steps, the floor), or the steps per epoch that the curve is measured in: refused on resume unless
# config.allow_schedule_change. num_epochs counts only while total_steps is 0 (_schedule_keys).
SCHEDULE_FIELDS = ("batch_size", "base_lr", "min_lr", "warmup_epochs", "total_steps", "num_epochs",
                   "input.dataset", "input.image_folder", "input.train_split", "input.synthetic_num_examples")


class WorkdirError(ValueError):
    """A workdir this run cannot use as it stands (in use, or its checkpoints were written with other
    settings); the message is one line naming the holder or the fields, and what to do."""


# -------------------------------------------------------------------------------------------------------
# One run per workdir.
# -------------------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "a process that has not yet written its details"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('start_time')}"


@dataclasses.dataclass
class WorkdirLock:
    """The held lock; `release()` (or leaving a `with` block) removes it. Process exit releases it too."""

    path: epath.Path
    holder: dict
    fd: int | None = None  # the flock'ed descriptor (local files), else None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # before unlocking: a waiter that opened the old file re-checks the inode
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
        elif self.holder is not None:
            try:
                if json.loads(self.path.read_text()) == self.holder:
                    self.path.unlink()
            except (OSError, ValueError):
                pass
        self.holder = None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(read) -> dict | None:
    try:
        holder = json.loads(read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def acquire_lock(workdir: str | os.PathLike) -> WorkdirLock:
    """Holds `workdir/run.lock` for this process, or raises WorkdirError naming the run that holds it.

    Call it on process 0 only (the other processes of the same run share its lock).
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _utc_now()}
    if "://" in os.fspath(workdir):  # gs://, s3://: no flock
        return _acquire_best_effort(path, holder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            previous = _read_holder(lambda: os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"cannot lock {path}: {os.strerror(e.errno)} (errno {e.errno}): the file system "
                                   "does not support locks; use a workdir on a local disk or NFSv4") from None
            raise WorkdirError(f"workdir {workdir} is in use by another run ({_describe(previous)}; lock {path}): "
                               "wait for it to finish or stop it, or use another --workdir") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder released (and unlinked) it between our open and flock: try again
            os.close(fd)
            continue
        previous = _read_holder(lambda: os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous:
            logging.warning("Taking over the lock %s of a run that ended without releasing it (%s).", path,
                            _describe(previous))
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return WorkdirLock(path, holder, fd)


def _acquire_best_effort(path: epath.Path, holder: dict) -> WorkdirLock:
    previous = _read_holder(path.read_text) if path.exists() else None
    if previous:
        if previous.get("host") == holder["host"] and isinstance(previous.get("pid"), int) and \
                _pid_alive(previous["pid"]):
            raise WorkdirError(f"workdir {path.parent} is in use by another run ({_describe(previous)}; lock "
                               f"{path}): wait for it to finish or stop it, or use another --workdir")
        logging.warning("Replacing the lock %s of %s: on this storage a lock is best effort (the holder is on "
                        "another host or gone); if it still runs, stop one of the two.", path, _describe(previous))
    path.write_text(json.dumps(holder) + "\n")
    return WorkdirLock(path, holder)


# -------------------------------------------------------------------------------------------------------
# Settings of a resumed run.
# -------------------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Flat {dotted field: value} with JSON's types (tuples as lists), as config.json holds them."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    return _flatten(json.loads(json.dumps(config, default=str)))


def _schedule_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """SCHEDULE_FIELDS, but num_epochs only while both runs train for num_epochs (total_steps 0)."""
    fixed_steps = old.get("total_steps") or new.get("total_steps")
    return [k for k in SCHEDULE_FIELDS if not (k == "num_epochs" and fixed_steps)]


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], keys) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Compares the settings that wrote the checkpoints (`saved`, config.json) with this run's, and returns
    the allowed changes (already logged as warnings).

    Raises WorkdirError, naming every differing field with its old and new value, when the model differs
    (any field but SPEED_FIELDS), or when the lr schedule does (SCHEDULE_FIELDS) and the config does not set
    `allow_schedule_change=True`.
    """
    old, new = _plain(saved), _plain(config)
    model_keys = sorted({k for k in (*old, *new) if k.startswith("model.")})
    speed = {f"model.{f}" for f in SPEED_FIELDS}
    model = _changes(old, new, [k for k in model_keys if k not in speed])
    if model:
        raise WorkdirError(
            f"the checkpoints in this workdir were written by another model: {'; '.join(model)}. Resume with the "
            "old values, or use a new --workdir (config.init_from=<this workdir> starts from its weights)")
    schedule = _changes(old, new, _schedule_keys(old, new))
    allowed = bool(new.get("allow_schedule_change", False))
    if schedule and not allowed:
        raise WorkdirError(
            f"resuming with another learning-rate schedule: {'; '.join(schedule)}. Set "
            "--config.allow_schedule_change=True to continue with it from the checkpoint's step on, or resume "
            "with the old values")
    notes = [f"learning-rate schedule changed on resume (allow_schedule_change): {'; '.join(schedule)}"] \
        if schedule else []
    speed_changes = _changes(old, new, sorted(k for k in speed if k in old or k in new))
    if speed_changes:
        notes.append(f"model speed options changed on resume: {'; '.join(speed_changes)}")
    ignored = {*model_keys, *SCHEDULE_FIELDS, "allow_schedule_change"}
    other = _changes(old, new, sorted(k for k in {*old, *new} if k not in ignored))
    if other:
        notes.append(f"settings changed on resume: {'; '.join(other)}")
    for note in notes:
        logging.warning("%s.", note)
    return notes


def load_saved_config(workdir: str | os.PathLike) -> dict | None:
    """The settings of the latest start (`workdir/config.json`), or None if it is missing or unreadable
    (then with a warning: nothing can be compared)."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logging.warning("%s is unreadable (%s): the settings of the resumed run are not compared.", path, e)
        return None
    return saved if isinstance(saved, dict) else None


def _write_atomically(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # epath rename refuses an existing destination


def record_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> epath.Path:
    """Writes the settings of this start to `workdir/config.json` and `workdir/config_history/<UTC>.json`,
    each atomically (a temporary file, then a rename). Returns the history file."""
    workdir = epath.Path(workdir)
    text = config.to_json_best_effort(indent=2) + "\n"
    history = workdir / CONFIG_HISTORY
    history.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    entry = history / f"{stamp}.json"
    _write_atomically(entry, text)
    _write_atomically(workdir / CONFIG_FILE, text)
    return entry


def check_and_record_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
                            resuming: bool, record: bool = True) -> list[str]:
    """`check_resume` against config.json when resuming, then `record_config` (if `record`: on process 0 of
    a multi-process run, while every process checks). Returns the allowed changes."""
    notes = []
    if resuming:
        saved = load_saved_config(workdir)
        if saved is not None:
            notes = check_resume(saved, config)
    if record:
        record_config(workdir, config)
    return notes
