"""mae_jax.runtime: importing the library changes nothing process-wide; configure() applies the settings."""

import os
import platform
import subprocess
import sys

import pytest

from mae_jax import runtime

pytestmark = pytest.mark.slow  # fresh interpreters importing everything: not in the quick subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every module of the library (and starts JAX), then reports what that changed in the environment
# (beyond what the third-party libraries themselves set when imported: TensorFlow sets several variables) and
# whether a 64 MB malloc is served by mmap (glibc's default for blocks over 32 MB; never with M_MMAP_MAX=0).
# With CONFIGURE set, runtime.configure() runs first.
PROGRAM = r"""
import ctypes, json, os, pkgutil, importlib, sys
if os.environ.get("CONFIGURE"):
    from mae_jax import runtime
    runtime.configure()
import clu.metric_writers, flax, jax, optax, orbax.checkpoint, PIL.Image, tensorflow, tensorflow_datasets
before = dict(os.environ)
import mae_jax
for module in pkgutil.iter_modules(mae_jax.__path__):
    importlib.import_module(f"mae_jax.{module.name}")
import jax
jax.numpy.zeros(4).block_until_ready()

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
mmapped = libc.mallinfo2().hblkhd >= 64 << 20
libc.free(ctypes.c_void_p(block))
changed = {k: os.environ.get(k) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print(json.dumps({"environ_changed": changed, "mmapped": mmapped,
                  "cache_dir": jax.config.jax_compilation_cache_dir}))
"""
glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallinfo2 and mallopt are glibc's")
DROPPED = ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_COMPILATION_CACHE_DIR",
           "MAE_JAX_KEEP_HOST_MEMORY", runtime.CACHE_ENV)


def run_program(tmp_path, **env_overrides) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(JAX_PLATFORMS="cpu", HOME=str(tmp_path), **env_overrides)
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]), stderr=result.stderr)


@glibc_only
def test_import_changes_nothing_process_wide(tmp_path):
    out = run_program(tmp_path)
    assert out["environ_changed"] == {}
    assert out["mmapped"], "malloc no longer maps large blocks: something changed glibc's settings at import"
    assert not out["cache_dir"]


@glibc_only
def test_configure_applies_the_settings(tmp_path):
    out = run_program(tmp_path, CONFIGURE="1")
    assert not out["mmapped"], "configure() should keep large blocks in the heap (M_MMAP_MAX=0)"
    assert out["cache_dir"] == os.path.join(str(tmp_path), ".cache", "mae_jax", "jax_compilation_cache")
    # TensorFlow's import is silent: on CPUs where its oneDNN kernels are on by default (AVX-512 VNNI, AMX) it
    # otherwise prints "oneDNN custom operations are on" after absl's "All log messages before
    # absl::InitializeLog()", whatever TF_CPP_MIN_LOG_LEVEL says.
    assert "oneDNN" not in out["stderr"] and "InitializeLog" not in out["stderr"], out["stderr"][-2000:]
    # Each opt-out is honoured.
    out = run_program(tmp_path, CONFIGURE="1", MAE_JAX_KEEP_HOST_MEMORY="0", **{runtime.CACHE_ENV: "0"})
    assert out["mmapped"] and not out["cache_dir"]


def test_configure_reports_what_it_did(monkeypatch):
    # In this test process JAX has started: malloc is left alone, and the report says why.
    import jax

    jax.devices()
    monkeypatch.setenv(runtime.CACHE_ENV, "0")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    settings = runtime.configure()
    assert "already started" in settings.host_memory or "system malloc" in settings.host_memory
    assert settings.compilation_cache == "off"
    assert "host memory: " in str(settings)
