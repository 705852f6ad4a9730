"""mae_jax.host_memory: XLA:CPU's temporaries are not page-faulted in again on every execution."""

import os
import platform
import subprocess
import sys

import pytest

from mae_jax import host_memory

pytestmark = pytest.mark.slow  # fresh interpreters: not in the quick subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program with a 128 MB temporary (the exponentials are materialised for the reversed read), run
# 12 times; prints whether runtime.configure() changed the allocator and the page faults of the last four runs.
PROGRAM = """
import resource, time
from mae_jax import runtime
kept = "kept" in runtime.configure(compilation_cache=False).host_memory
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 1 << 25)
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) * jnp.flip(jnp.exp(x))))
faults = []
for _ in range(12):
    time.sleep(0.05)  # let the previous run's buffers be freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[-4:]))
"""
glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc on Linux")
TEMP_PAGES = (1 << 25) * 4 // 4096  # pages of one 128 MB buffer


def run_program(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host_memory.OPT_OUT)}
    env.update(JAX_PLATFORMS="cpu", **env_overrides)
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_temporaries_are_not_faulted_in_again():
    kept, faults = run_program()
    assert kept
    # The system default (opt-out) maps and zeroes the temporaries on every run: what the default avoids.
    kept_off, faults_off = run_program(**{host_memory.OPT_OUT: "0"})
    assert not kept_off
    assert faults_off > 4 * TEMP_PAGES, faults_off
    # Kept: at most an occasional growth of the heap (a run that starts before the last one freed).
    assert faults < 0.25 * faults_off, (faults, faults_off)


@glibc_only
def test_skip_reasons():
    base = {"JAX_PLATFORMS": "cpu"}
    assert "MAE_JAX_KEEP_HOST_MEMORY=0" == host_memory.skip_reason({**base, host_memory.OPT_OUT: "0"})
    assert "MALLOC_ARENA_MAX is set" == host_memory.skip_reason({**base, "MALLOC_ARENA_MAX": "4"})
    assert "GLIBC_TUNABLES" in host_memory.skip_reason({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert "preloaded" in host_memory.skip_reason({**base, "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert host_memory.skip_reason({"JAX_PLATFORMS": "tpu"}) == "JAX_PLATFORMS=tpu"
    # In this test process JAX has started, so the allocator is no longer changed; nothing else is off.
    import jax

    jax.devices()
    assert "already started" in host_memory.skip_reason(base)
    assert host_memory.keep_freed_memory() is False
