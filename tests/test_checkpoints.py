"""Checkpoints and interruptions: resume after SIGKILL continues exactly, SIGTERM saves and exits 0; damaged
checkpoints and folders without a complete checkpoint are moved aside and the previous step restored; write
failures end the run with one line (failures during background saves: tests/test_checkpoint_write_failures.py)."""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import checkpoints, loop
from runs import FIVE_STEPS, in_mount_namespace, losses, run_main

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset


LONG = ("--config.total_steps=300", "--config.log_every_steps=1", "--config.checkpoint_every_steps=50")


def _wait_for_checkpoint(proc, workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step))
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted LONG run every interrupted one is compared with: run once per session (under xdist the
    first worker to need it runs it, the others wait for it and read its workdir)."""
    import filelock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    workdir = root / "straight_long_run"
    with filelock.FileLock(str(root / "straight_long_run.lock")):
        if not (workdir / "done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            result = run_main(workdir, *LONG)
            assert result.returncode == 0, result.stderr[-3000:]
            (workdir / "done").write_text("")
    return workdir


def test_resume_after_sigkill_continues_exactly(tmp_path, straight):
    proc = run_main(tmp_path / "killed", *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path / "killed", 50)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = losses(tmp_path / "killed")
    assert max(before) < 300, "the run finished before it was killed"
    resumed = run_main(tmp_path / "killed", *LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring step 50 from" in resumed.stdout
    expected, got = losses(straight), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 301))
    assert got == expected  # bit for bit, every step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_exits_zero(tmp_path, signum):
    proc = run_main(tmp_path, *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path, 50)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    last_logged = max(losses(tmp_path))
    assert steps[-1] == last_logged < 300  # the checkpoint is the step it stopped at
    # Not "Done" and the next steps of a finished run: where it stopped, and the command that resumes it.
    assert f"Stopped at step {steps[-1]} of 300 (saved)" in stdout, stdout[-2000:]
    assert "To resume: python main.py --config configs/tiny.py" in stdout
    assert "Done:" not in stdout and "next:" not in stdout


def test_ctrl_c_during_start_up_says_nothing_was_saved(tmp_path):
    """Interrupted before training starts (here: while compiling), with no checkpoint yet: exit 130, and the one
    line says nothing was saved rather than promising a resume."""
    proc = run_main(tmp_path, *LONG, wait=False)
    for line in proc.stdout:
        if "Compiling the train step" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("main.py: interrupted before anything was saved; re-running the same "
                                               "command starts again"), stderr[-2000:]


def test_second_ctrl_c_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    preemption = loop.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reached(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is previous


# --------------------------------------------------------------------------------------------------------
# Damaged checkpoints: moved aside (never deleted), the previous step restored; write failures.
# --------------------------------------------------------------------------------------------------------


def _state(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.arange(1000, dtype=jnp.float32).reshape(10, 100) + value,
                                                 "b": jnp.full((7,), value, jnp.float32)}}


ABSTRACT = jax.eval_shape(lambda: _state(0))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    directory = tmp_path_factory.mktemp("three") / "checkpoints"
    with checkpoints.make_manager(directory) as manager:
        for step in (1, 2, 3):
            checkpoints.save(manager, step, _state(step), {"embed_dim": 4}, {"position": step})
    return directory


def _files(path):
    return sorted(os.path.relpath(p, path) for p in glob.glob(f"{path}/**", recursive=True) if os.path.isfile(p))


def _data_file(step_dir):  # the largest: the chunk of params/w
    return max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)


def _garbage(name):
    return lambda step_dir: open(f"{step_dir}/{name}", "wb").write(b"\x00not json{")


def _truncate(step_dir):
    path = _data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_a_byte(step_dir):
    path = _data_file(step_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


DAMAGE = {
    "garbage state/_METADATA": (_garbage("state/_METADATA"), "unreadable-metadata"),
    "garbage state/manifest.ocdbt": (_garbage("state/manifest.ocdbt"), "unreadable-metadata"),
    "garbage array metadata": (_garbage("state/array_metadatas/process_0"), "unreadable-data"),
    "garbage input item": (_garbage("input/metadata"), "unreadable-data"),
    "truncated data file": (_truncate, "unreadable-data"),
    "missing data file": (lambda d: os.remove(_data_file(d)), "unreadable-data"),
    "flipped byte in a data file": (_flip_a_byte, "checksum-mismatch"),
    "no state item": (lambda d: shutil.rmtree(f"{d}/state"), "no-state"),
    "empty step folder": (_empty, "empty"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(three_steps, tmp_path, damage, caplog,
                                                                          capfd):
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    damage_fn, slug = DAMAGE[damage]
    damage_fn(directory / "3")
    files_before = _files(directory / "3")
    with checkpoints.make_manager(directory) as manager, caplog.at_level(logging.WARNING):
        step, state, input_state = checkpoints.restore_latest(manager, ABSTRACT)
        assert manager.latest_step() == 2
    assert step == 2 and input_state == {"position": 2}
    np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
    moved = directory / f"3.corrupt-{slug}"
    assert sorted(os.listdir(directory)) == ["1", "2", moved.name]
    assert _files(moved) == files_before  # moved, nothing deleted
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"Checkpoint {directory / '3'} is unusable: " in warnings[0].getMessage()
    assert f"Moved it aside to {moved.name}" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err
    assert checkpoints.latest_step(directory) == 2


def _partial_copy(step_dir, target, *missing):
    """A copy of `step_dir` without the files or folders `missing` (relative paths): a copy cut short."""
    shutil.copytree(step_dir, target, ignore=lambda folder, names: [
        name for name in names if os.path.relpath(os.path.join(folder, name), step_dir) in missing])


# A folder named like a step, above the last good one: (how it was left, its new name, the reason). (A step
# without its fingerprint item is complete: checkpoints written before 2026-11-23 have none; its state is
# restored unverified, and a damaged one is caught when it does not restore.)
STRAYS = {
    "99": (lambda d, good: os.mkdir(d), "99.corrupt-empty", "the folder is empty (an interrupted copy?)"),
    "98": (lambda d, good: _partial_copy(good, d, "commit_success.txt"), "98.corrupt-incomplete",
           "it lacks commit_success.txt (an interrupted save or copy)"),
    "96": (lambda d, good: _partial_copy(good, d, "_CHECKPOINT_METADATA", "state/_METADATA"), "96.corrupt-incomplete",
           "it lacks _CHECKPOINT_METADATA, state/_METADATA (an interrupted save or copy)"),
}


def test_step_folders_without_a_complete_checkpoint_are_not_steps(three_steps, tmp_path, caplog):
    """Issue 26.1: an empty folder or a partial copy named with a step above the last good one is not the latest
    step (decided from the files, no array read); restoring moves each aside in one line and restores the last
    good step. Orbax alone counts them all."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    for name, (leave, _, _) in STRAYS.items():
        leave(directory / name, directory / "3")
    assert checkpoints.latest_step(directory) == 3
    with checkpoints.make_manager(directory) as manager, caplog.at_level(logging.WARNING):
        assert manager.latest_step() == 99
        step, state, input_state = checkpoints.restore_latest(manager, ABSTRACT)
        assert manager.latest_step() == 3
    assert step == 3 and input_state == {"position": 3}
    np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
    assert sorted(os.listdir(directory)) == sorted(["1", "2", "3", *(moved for _, moved, _ in STRAYS.values())])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"Checkpoint {directory / name} is unusable: {reason}. Moved it aside to {moved}; trying the previous one."
        for name, (_, moved, reason) in STRAYS.items()]


def test_every_step_unusable_is_one_error(three_steps, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    for step in (1, 2, 3):
        _flip_a_byte(directory / str(step))
    with checkpoints.make_manager(directory) as manager, pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.restore_latest(manager, ABSTRACT)
    assert str(error.value) == (
        f"no checkpoint in {directory} can be restored: all 3 (steps 3, 2, 1) were unusable and were moved aside to "
        "<step>.corrupt-<reason> (see the warnings above). Re-run to start from scratch, or rename an intact copy "
        "back to <step>")
    assert sorted(os.listdir(directory)) == [f"{s}.corrupt-checksum-mismatch" for s in (1, 2, 3)]
    assert checkpoints.latest_step(directory) is None


def test_state_of_another_model_is_an_error_and_moves_nothing(three_steps, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    other = jax.eval_shape(lambda: {**_state(0), "params": {"w": jnp.zeros((10, 50)), "b": jnp.zeros(7)}})
    with checkpoints.make_manager(directory) as manager, pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.restore_latest(manager, other)
    assert str(error.value).startswith(f"checkpoint {directory / '3'} holds a state of another model (shapes "
                                       "differ: params/w [10, 100] (this run: [10, 50])): resume with the settings")
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_no_checkpoint_is_none(tmp_path):
    with checkpoints.make_manager(tmp_path) as manager:
        assert checkpoints.restore_latest(manager, ABSTRACT) is None
    assert checkpoints.latest_step(tmp_path) is None and checkpoints.latest_step(tmp_path / "absent") is None


def test_non_finite_state_is_not_saved(tmp_path):
    state = _state(1)
    state["params"]["b"] = state["params"]["b"].at[3].set(jnp.nan)
    nonfinite = lambda tree: [name for name, ok in checkpoints._summary(tree)[1].items() if not ok]
    assert nonfinite(state) == ["params/b"]
    assert nonfinite(_state(1)) == []
    with checkpoints.make_manager(tmp_path) as manager:
        checkpoints.save(manager, 1, _state(1), {})
        manager.wait_until_finished()
        with pytest.raises(FloatingPointError, match="non-finite values at step 2 in params/b: not saving them; the "
                                                     r"last checkpoint \(step 1\) is intact"):
            checkpoints.save(manager, 2, state, {})
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_fingerprint_does_not_depend_on_the_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    w = _state(1)["params"]["w"]
    sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b", "a")))
    assert checkpoints._summary(sharded) == checkpoints._summary(np.asarray(w))
    one_ulp = w.at[3, 4].set(np.nextafter(np.float32(w[3, 4]), np.float32(np.inf)))  # the lowest bit
    assert checkpoints._summary(one_ulp) != checkpoints._summary(w)


# Write failures: a process that writes into a directory that turns read-only or full (a mount namespace of
# its own: root ignores file modes) ends within seconds with one line; earlier checkpoints stay.

WRITER = """
import os, subprocess, sys, time
import jax.numpy as jnp
import numpy as np
from mae_jax import checkpoints
directory, how = sys.argv[1], sys.argv[2]
manager = checkpoints.make_manager(directory)
checkpoints.save(manager, 1, {"w": jnp.ones(1000)}, {})
manager.wait_until_finished()
if how == "read-only":
    subprocess.run(["mount", "-o", "remount,bind,ro", directory], check=True)
size = 1000 if how == "read-only" else 2_000_000  # 8 MB of noise (no compression) into a 1 MB disk
try:
    checkpoints.save(manager, 2, {"w": jnp.asarray(np.random.default_rng(0).standard_normal(size, np.float32))}, {})
    time.sleep(2)  # "training": the background write fails meanwhile, and Orbax's threads log it
    manager.close()
except checkpoints.CheckpointError as e:
    sys.exit(f"error: {e}")
"""


def _in_mount_namespace(setup: str, command: list[str]) -> subprocess.CompletedProcess:
    return in_mount_namespace(f"{setup} && exec {' '.join(command)}", timeout=30)


@pytest.mark.parametrize("how, cause", [("read-only", "Read-only file system (EROFS, errno 30)"),
                                        ("full", "No space left on device (ENOSPC, errno 28)")])
def test_write_failure_ends_the_process_with_one_line(tmp_path, how, cause):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    setup = f"mount --bind {directory} {directory}" if how == "read-only" else \
        f"mount -t tmpfs -o size=1m tmpfs {directory}"
    (tmp_path / "writer.py").write_text(WRITER)
    result = _in_mount_namespace(setup, [sys.executable, str(tmp_path / "writer.py"), str(directory), how])
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: writing checkpoint step 2 to {directory} failed: {cause}"), lines[-5:]
    assert lines[-1].endswith("the earlier checkpoints are intact (latest: step 1). Make "
                              f"{directory} writable or free space on its disk, then re-run the same command to resume")
    assert "Traceback" not in result.stderr


def test_read_only_checkpoints_stop_main_at_once_and_keep_the_checkpoint(tmp_path):
    first = run_main(tmp_path, *FIVE_STEPS, "--config.visualize_every_steps=0")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(tmp_path / "checkpoints")
    checkpoints_dir = tmp_path / "checkpoints"
    result = _in_mount_namespace(
        f"mount --bind -o ro {checkpoints_dir} {checkpoints_dir}",
        [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
         "--config.total_steps=10", "--config.allow_schedule_change=True", "--config.visualize_every_steps=0"])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"main.py: error: cannot write checkpoints to {checkpoints_dir}: Read-only file system "
                           f"(EROFS, errno 30) at {checkpoints_dir}/.write-test-"), last
    assert last.endswith(f"; the earlier checkpoints are intact (latest: step 5). Make {checkpoints_dir} writable or "
                         "free space on its disk, then re-run the same command to resume"), last
    assert "Traceback" not in result.stderr
    assert _files(tmp_path / "checkpoints") == before


def test_metrics_history_survives_a_torn_line_and_is_rewritten_atomically(tmp_path, caplog):
    """A kill while appending leaves a torn last line: reads skip it; a resume drops it (saying so in one line)
    with the records past its step, by a rewrite through a temporary file and a rename (the old history is whole
    until the new one replaces it), so the next record starts a line of its own: every line stays JSON."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert [r["step"] for r in loop.read_metrics(path)] == [1, 2]
    renames = []
    original = type(path).replace

    def spy(self, target):
        renames.append((self.name, os.path.basename(str(target))))
        return original(self, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(path), "replace", spy)
        log = loop.MetricsLog(tmp_path, total_steps=10, resume_step=1)
    log.close()
    assert renames == [("metrics.jsonl.tmp", "metrics.jsonl")]
    assert [r["step"] for r in loop.read_metrics(path)] == [1] and not (tmp_path / "metrics.jsonl.tmp").exists()
    # The case: resumed at the last whole record, its next record appended after a torn line.
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 99, "lo')
    caplog.clear()
    caplog.set_level(logging.WARNING)
    log = loop.MetricsLog(tmp_path, total_steps=10, resume_step=2)
    log.write(3, {"loss": 0.8})
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # json.loads: every line is one record
    assert sum("dropping its torn last line" in r.getMessage() for r in caplog.records) == 1
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage in the middle is an error, not skipped
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        loop.read_metrics(path)


def test_stray_step_folders_do_not_end_a_run_and_the_resume_continues_exactly(tmp_path, straight):
    """Issue 26.1, end to end: a run stopped after its step-250 save (the uninterrupted run's workdir without step
    300), with an empty `999` above it (the re-run used to say "Already complete ... at step 999 of 300" and exit)
    and `275`, a copy of step 250 cut short before Orbax's commit marker. The re-run moves both aside, one line
    each, restores 250, and its metrics from then on equal the uninterrupted run's, bit for bit."""
    workdir = tmp_path / "strays"
    shutil.copytree(straight, workdir)
    directory = workdir / "checkpoints"
    shutil.rmtree(directory / "300")
    os.mkdir(directory / "999")
    _partial_copy(directory / "250", directory / "275", "commit_success.txt")
    resumed = run_main(workdir, *LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert [line.split("] ", 1)[1] for line in output.splitlines() if "is unusable" in line] == [
        f"Checkpoint {directory / '999'} is unusable: the folder is empty (an interrupted copy?). Moved it aside to "
        "999.corrupt-empty; trying the previous one.",
        f"Checkpoint {directory / '275'} is unusable: it lacks commit_success.txt (an interrupted save or copy). Moved "
        "it aside to 275.corrupt-incomplete; trying the previous one."]
    assert f"Restoring step 250 from {directory}" in output and "Already complete" not in output
    assert "Traceback" not in output
    expected, got = losses(straight), losses(workdir)
    assert sorted(got) == list(range(1, 301))
    assert got == expected  # steps 251-300 retrained, bit for bit
    assert {"300", "999.corrupt-empty", "275.corrupt-incomplete"} <= set(os.listdir(directory))


def test_recovery_from_a_damaged_latest_checkpoint_continues_exactly(tmp_path, straight):
    """A run stopped after its step-250 save (the uninterrupted run's workdir without step 300), whose step 250
    then took silent damage (a flipped byte): the re-run moves 250 aside, restores 200, and its metrics from then
    on equal the uninterrupted run's, bit for bit."""
    workdir = tmp_path / "damaged"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "checkpoints" / "300")
    _flip_a_byte(workdir / "checkpoints" / "250")
    damaged_files = _files(workdir / "checkpoints" / "250")
    resumed = run_main(workdir, *LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    # Where the middle of the largest data file falls depends on how that run's writes were packed: in raw array
    # bytes (the checksums differ) or in a zstd-compressed chunk (the read fails).
    slug = "checksum-mismatch" if "-checksum-mismatch" in output else "unreadable-data"
    reason = {"checksum-mismatch": "the restored values differ", "unreadable-data": "it does not restore"}[slug]
    assert f"Checkpoint {workdir / 'checkpoints' / '250'} is unusable: {reason}" in output
    assert f"Moved it aside to 250.corrupt-{slug}" in output and "Traceback" not in output
    assert _files(workdir / "checkpoints" / f"250.corrupt-{slug}") == damaged_files  # nothing deleted
    expected, got = losses(straight), losses(workdir)
    assert sorted(got) == list(range(1, 301))
    assert got == expected  # steps 201-300 retrained, bit for bit
    assert {"250", "300"} <= set(os.listdir(workdir / "checkpoints"))


def test_a_train_state_saved_before_the_constants_field_resumes(tmp_path):
    """Checkpoints written before 0.2.0 keep the MAE's position tables (or a probe's statistics) under "frozen":
    they restore into today's state (constants / batch_stats), verified by their fingerprint, nothing moved."""
    from configs import tiny
    from runs import tiny_setup

    config = tiny.get_config()
    config.visualize_every_steps = 0
    setup = tiny_setup(config, devices=1)
    state = setup.init_state()
    legacy = {"step": state.step, "params": state.params, "frozen": state.constants, "opt_state": state.opt_state,
              "rng": state.rng, "nonfinite_step": state.nonfinite_step}
    with checkpoints.make_manager(tmp_path, enable_async=False) as manager:
        checkpoints.save(manager, 5, legacy, dict(config.model), {"batch_index": 5})
    manager = checkpoints.make_manager(tmp_path)
    step, restored, position = checkpoints.restore_latest(manager, setup.abstract)
    manager.close()
    assert step == 5 and position == {"batch_index": 5} and sorted(os.listdir(tmp_path)) == ["5"]
    assert type(restored) is type(state) and restored.batch_stats == {}
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
