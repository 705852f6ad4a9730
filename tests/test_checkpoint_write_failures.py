"""A checkpoint write that fails in Orbax's background threads while training goes on (a full disk, a folder
turned read-only): the run ends with exactly one error line after its last step line (no Orbax error logs, no
TensorStore `Event loop is closed` tracebacks), exit 1, and a re-run on a roomy copy resumes from the step the
line reports. Real disks: a small tmpfs and a read-only bind mount in a private mount namespace (skipped, with
the reason, where mounting is not allowed); the runs are `python main.py` (the output and the exit status of
the process are what is tested), the resumes in-process."""

import logging
import re
import shutil
import sys

import pytest

from configs import tiny
from mae_jax import checkpoints, trainer
from runs import after_last_step, in_mount_namespace, read_metrics

pytestmark = pytest.mark.slow  # end-to-end runs

COMMON = {"log_every_steps": 1, "visualize_every_steps": 0, "keep_checkpoints": 5}
# A checkpoint of configs/tiny.py takes 660-724 KiB: a tmpfs of this size holds one, and the next save fails part
# of the way through its background writes.
DISK = "1168k"
# timing: checkpoint_every_steps, total_steps, the save that fails, the one before it (the step to resume from).
# Runs of one length share their compiled programs (the lr schedule is part of the step).
TIMINGS = {
    "mid-step": (40, 120, 80, 40),  # lands while steps 81-119 run: the loop stops at the next step boundary
    "at the next save": (1, 6, 2, 1),  # save 2 is still being written when step 3 saves and waits for it
    "at the final save": (60, 120, 120, 60),  # lands while the run closes its checkpoints
}


def _command(workdir, every: int, total: int) -> str:
    overrides = {**COMMON, "checkpoint_every_steps": every, "total_steps": total}
    return " ".join([sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
                     *(f"--config.{k}={v}" for k, v in overrides.items())])


def _check_one_error_line(output: str, returncode: int, checkpoints_dir, cause: str) -> tuple[int, int, int]:
    """Asserts the output ends, after its last step line, with exactly our error line; returns (last step
    logged, failed step, the latest step it reports as intact)."""
    assert returncode == 1, output[-3000:]
    for noise in ("Event loop is closed", "Traceback", "Exception ignored"):
        assert noise not in output, output[-5000:]
    assert not re.search(r"^[EF]\d{4} ", output, re.M), output[-5000:]  # absl's ERROR / FATAL lines
    last_step, after = after_last_step(output)
    assert len(after) == 1, after
    checkpoints_dir = re.escape(str(checkpoints_dir))
    found = re.fullmatch(  # the file, when the error names one, is in the failed save's temporary folder
        rf"main\.py: error: writing checkpoint step (\d+) to {checkpoints_dir} failed: {re.escape(cause)}"
        rf"(?: at {checkpoints_dir}/\1\.orbax-checkpoint-tmp\S*)?; the earlier checkpoints are intact \(latest: step "
        rf"(\d+)\)\. Make {checkpoints_dir} writable or free space on its disk, then re-run the same command to resume",
        after[0])
    assert found, after[0]
    return last_step, int(found.group(1)), int(found.group(2))


def _resume(workdir, every: int, total: int, caplog) -> str:
    """Re-runs the same settings in `workdir`, in this process; returns the log."""
    config = tiny.get_config()
    for key, value in {**COMMON, "checkpoint_every_steps": every, "total_steps": total}.items():
        setattr(config, key, value)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer.train_and_evaluate(config, workdir)
    return caplog.text


def _check_resumed(workdir, latest: int, total: int, log: str) -> None:
    assert f"Restoring step {latest} from {workdir / 'checkpoints'}" in log, log[-3000:]
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, total + 1))  # cut back to `latest`, then on
    assert checkpoints.latest_step(workdir / "checkpoints") == total
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the failed save, cleaned up


def test_full_disk_during_a_background_save_ends_with_one_line_and_resumes(tmp_path, caplog):
    script = []
    for i, (every, total, _, _) in enumerate(TIMINGS.values()):
        workdir = tmp_path / f"t{i}" / "w"
        script += [f"mkdir -p {workdir}/checkpoints && mount -t tmpfs -o size={DISK} tmpfs {workdir}/checkpoints",
                   f"{_command(workdir, every, total)} > {tmp_path}/t{i}/out 2>&1; echo $? > {tmp_path}/t{i}/rc",
                   f"cp -a {workdir} {tmp_path}/t{i}/roomy"]  # the tmpfs and what is on it vanish with the namespace
    result = in_mount_namespace("\n".join(script), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, (timing, (every, total, failed, latest)) in enumerate(TIMINGS.items()):
        output, returncode = (tmp_path / f"t{i}" / "out").read_text(), int((tmp_path / f"t{i}" / "rc").read_text())
        checkpoints_dir = tmp_path / f"t{i}" / "w" / "checkpoints"
        last_step, *reported = _check_one_error_line(output, returncode, checkpoints_dir,
                                                     "No space left on device (ENOSPC, errno 28)")
        assert reported == [failed, latest], (timing, reported)
        if timing == "mid-step":  # stopped soon after the failure, not trained on until the next save
            assert failed < last_step < failed + every, (timing, last_step)
        else:  # stopped by the save that waited for the failed one, or by the failed final save
            assert last_step == min(failed + every, total), (timing, last_step)
        roomy = tmp_path / f"t{i}" / "roomy"
        _check_resumed(roomy, latest, total, _resume(roomy, every, total, caplog))


def test_checkpoint_folder_turned_read_only_mid_run_ends_with_one_line_and_resumes(tmp_path, caplog):
    """The folder turns read-only as the second save starts: its background writes fail (or, when the mount
    lands before the save has created its item folders, the save itself does)."""
    every, total = 40, 120
    workdir = tmp_path / "w"
    checkpoints_dir = workdir / "checkpoints"
    checkpoints_dir.mkdir(parents=True)
    script = f"""
{_command(workdir, every, total)} > {tmp_path}/out 2>&1 &
pid=$!
while [ ! -d {checkpoints_dir}/{every} ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
while [ ! -d {checkpoints_dir}/{2 * every}.orbax-checkpoint-tmp ] && kill -0 $pid 2>/dev/null; do sleep 0.002; done
mount --bind -o ro {checkpoints_dir} {checkpoints_dir}
wait $pid; echo $? > {tmp_path}/rc
"""
    result = in_mount_namespace(script, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output, returncode = (tmp_path / "out").read_text(), int((tmp_path / "rc").read_text())
    _, failed, latest = _check_one_error_line(output, returncode, checkpoints_dir,
                                              "Read-only file system (EROFS, errno 30)")
    assert (failed, latest) in {(2 * every, every), (3 * every, 2 * every)}, (failed, latest)
    roomy = tmp_path / "roomy"
    shutil.copytree(workdir, roomy, symlinks=True)
    _check_resumed(roomy, latest, total, _resume(roomy, every, total, caplog))
