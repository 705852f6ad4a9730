"""Checkpoints and interruptions: resume after SIGKILL continues exactly, SIGTERM saves and exits 0."""

import os
import signal
import time

import pytest

from mae_jax import trainer
from runs import losses, run_main


LONG = ("--config.total_steps=400", "--config.log_every_steps=1", "--config.checkpoint_every_steps=50")


def _wait_for_checkpoint(proc, workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step))
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)


def test_resume_after_sigkill_continues_exactly(tmp_path):
    straight = run_main(tmp_path / "straight", *LONG)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = run_main(tmp_path / "killed", *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path / "killed", 50)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = losses(tmp_path / "killed")
    assert max(before) < 400, "the run finished before it was killed"
    resumed = run_main(tmp_path / "killed", *LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step" in resumed.stdout
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 401))
    assert got == expected  # bit for bit, every step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_exits_zero(tmp_path, signum):
    proc = run_main(tmp_path, *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path, 50)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Preempted: saved step" in stdout + stderr and "Traceback" not in stdout + stderr
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    last_logged = max(losses(tmp_path))
    assert steps[-1] == last_logged < 400  # the checkpoint is the step it stopped at


def test_second_ctrl_c_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    preemption = trainer.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reached(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is previous
