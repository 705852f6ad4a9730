"""One run per workdir (real concurrent processes), and the settings check of a resumed run."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from configs import tiny
from mae_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # concurrent processes and end-to-end runs: not in the quick subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys
from mae_jax import workdir
lock = workdir.acquire_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills us)
lock.release()
"""
TRY = """
import sys
from mae_jax import workdir
try:
    workdir.acquire_lock(sys.argv[1])
except workdir.WorkdirError as e:
    sys.exit(f"error: {e}")
print("locked")
"""


def _python(code, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True, **kwargs)


@pytest.fixture
def holder(tmp_path):
    proc = _python(HOLD, tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_process_is_refused_with_the_holder_named(tmp_path, holder):
    second = _python(TRY, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 1 and stdout == ""
    line = stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"workdir {tmp_path} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started 20" \
        in line and "use another --workdir" in line
    record = json.loads((tmp_path / "run.lock").read_text())  # the holder's record is untouched
    assert record["pid"] == holder.pid


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run.lock").exists()  # SIGKILL left the file behind
    with caplog.at_level(logging.WARNING):
        lock = workdir_lib.acquire_lock(tmp_path)
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing it" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_released_lock_is_free_again(tmp_path, holder):
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert not (tmp_path / "run.lock").exists()
    with workdir_lib.acquire_lock(tmp_path) as lock:
        assert lock.holder["pid"] == os.getpid()


def test_many_concurrent_starts_one_wins(tmp_path):
    procs = [_python(TRY, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    # A winner releases at exit, so a later one may win too; never two at once: every refusal names a live run.
    assert sum(out.strip() == "locked" for out, _ in results) >= 1
    for (out, err), p in zip(results, procs):
        assert (p.returncode, out.strip()) == (0, "locked") or "is in use by another run" in err


def test_best_effort_lock_refuses_a_live_holder_and_replaces_a_dead_one(tmp_path, caplog):
    path = tmp_path / "run.lock"
    live = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps(live))
    with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()}, started 2026-01-01"):
        workdir_lib._acquire_best_effort(path, dict(live, pid=1234567))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps(dict(live, pid=int(dead.stdout))))
    with caplog.at_level(logging.WARNING):
        lock = workdir_lib._acquire_best_effort(path, dict(live, pid=os.getpid()))
    assert "best effort" in caplog.text
    lock.release()
    assert not path.exists()


# -------------------------------------------------------------------------------------------------------
# Settings of a resumed run.
# -------------------------------------------------------------------------------------------------------


def _saved(config):
    return json.loads(config.to_json_best_effort())


def test_changed_architecture_is_refused_naming_the_fields():
    old, new = tiny.get_config(), tiny.get_config()
    new.model.embed_dim, new.model.depth = 64, 3
    with pytest.raises(workdir_lib.WorkdirError) as error:
        workdir_lib.check_resume(_saved(old), new)
    message = str(error.value)
    assert "\n" not in message
    assert f"model.depth {old.model.depth!r} -> 3" in message and f"model.embed_dim {old.model.embed_dim!r} -> 64" \
        in message and "new --workdir" in message


def test_speed_options_may_change(caplog):
    old, new = tiny.get_config(), tiny.get_config()
    new.model.dtype, new.model.remat = "bfloat16", "full"
    with caplog.at_level(logging.WARNING):
        notes = workdir_lib.check_resume(_saved(old), new)
    assert notes == ["model speed options changed on resume: model.dtype 'float32' -> 'bfloat16'; "
                     "model.remat 'none' -> 'full'"]
    assert "model speed options changed" in caplog.text


@pytest.mark.parametrize("field, value", [("batch_size", 32), ("base_lr", 1e-3), ("min_lr", 1e-6),
                                          ("warmup_epochs", 2), ("num_epochs", 12), ("total_steps", 100)])
def test_schedule_change_is_refused_unless_allowed(field, value):
    old, new = tiny.get_config(), tiny.get_config()
    new[field] = value
    with pytest.raises(workdir_lib.WorkdirError, match=f"{field} {old[field]!r} -> {value!r}.*"
                                                         "allow_schedule_change=True"):
        workdir_lib.check_resume(_saved(old), new)
    new.allow_schedule_change = True
    notes = workdir_lib.check_resume(_saved(old), new)
    assert notes == [f"learning-rate schedule changed on resume (allow_schedule_change): {field} {old[field]!r} -> "
                     f"{value!r}"]


def test_num_epochs_is_no_change_while_total_steps_is_fixed():
    old, new = tiny.get_config(), tiny.get_config()
    old.total_steps = new.total_steps = 50
    new.num_epochs, new.log_every_steps = 100, 1
    assert workdir_lib.check_resume(_saved(old), new) == ["settings changed on resume: log_every_steps 5 -> 1"]


def test_config_history_is_kept_and_a_refused_resume_overwrites_nothing(tmp_path):
    old = tiny.get_config()
    assert workdir_lib.check_and_record_config(tmp_path, old, resuming=False) == []
    first = (tmp_path / "config.json").read_text()
    assert json.loads(first)["batch_size"] == 16 and len(os.listdir(tmp_path / "config_history")) == 1
    new = tiny.get_config()
    new.batch_size = 32
    with pytest.raises(workdir_lib.WorkdirError, match="batch_size 16 -> 32"):
        workdir_lib.check_and_record_config(tmp_path, new, resuming=True)
    assert (tmp_path / "config.json").read_text() == first
    assert len(os.listdir(tmp_path / "config_history")) == 1
    new.batch_size, new.log_every_steps = 16, 1
    workdir_lib.check_and_record_config(tmp_path, new, resuming=True)
    history = sorted(os.listdir(tmp_path / "config_history"))
    assert len(history) == 2 and json.loads((tmp_path / "config.json").read_text())["log_every_steps"] == 1
    assert json.loads((tmp_path / "config_history" / history[0]).read_text())["log_every_steps"] == 5
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_unreadable_config_json_is_not_compared(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{torn")
    with caplog.at_level(logging.WARNING):
        assert workdir_lib.check_and_record_config(tmp_path, tiny.get_config(), resuming=True) == []
    assert "config.json is unreadable" in caplog.text
