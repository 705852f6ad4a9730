"""Keeps freed host memory mapped, so that XLA:CPU does not page-fault its temporaries in on every step.

XLA:CPU allocates the temporaries of each execution as one block (1.24 GB for the ViT-B/16 train step at
batch 8) with `malloc` on a worker thread and frees it when the step ends. glibc serves a block that large
from a fresh `mmap` (worker threads use their own arenas, which always map large blocks) and unmaps it on
`free`, so every step the kernel maps and zeroes ~300k pages again: about 0.3 s of a 2.1 s ViT-B step on
the 2-core development machine, and any large CPU program pays in proportion. Serving every allocation
from the main heap (`M_ARENA_MAX=1`, `M_MMAP_MAX=0`) and not trimming it (`M_TRIM_THRESHOLD`) keeps those
pages: the step then runs with no page faults (measured in `benchmarks/README.md`, tested in
tests/test_host_memory.py). The price is that freed memory stays with the process, which a training run
reuses (ViT-B at batch 8: 5-6 GB resident instead of about 4).

`mae_jax.runtime.configure()` (called by main.py and the benchmarks, never by importing mae_jax) applies this
when JAX will run on the CPU (glibc on Linux, no GPU/TPU plugin installed or `JAX_PLATFORMS=cpu`) unless the
environment already chooses: set
`MAE_JAX_KEEP_HOST_MEMORY=0` to opt out, and any of `MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_`,
`MALLOC_TRIM_THRESHOLD_`, a `glibc.malloc` entry in `GLIBC_TUNABLES` or an `LD_PRELOAD`ed allocator
(jemalloc, tcmalloc, mimalloc) is left alone. It must run before JAX starts its CPU client (the client's
threads pick their arena when they start): call it before anything uses JAX.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

OPT_OUT = "MAE_JAX_KEEP_HOST_MEMORY"
# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _jax_backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")  # not imported: JAX has not started
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def _accelerator_plugin() -> bool:
    """libtpu or a jax_plugins entry point (CUDA, ROCm): JAX will not run on the CPU, and the host
    memory it allocates is small next to the input pipeline's, which is better served by many arenas."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def skip_reason(environ=os.environ) -> str | None:
    """Why keep_freed_memory() would not change the allocator, or None if it would."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT}={environ[OPT_OUT]}"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc on Linux"
    for name in _USER_SETTINGS:
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if any(a in environ.get("LD_PRELOAD", "") for a in _ALLOCATORS):
        return "another allocator is preloaded"
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms and platforms.split(",")[0].strip() != "cpu":
        return f"JAX_PLATFORMS={platforms}"
    if not platforms and _accelerator_plugin():
        return "a GPU/TPU plugin for JAX is installed"
    if _jax_backend_started():
        return "JAX's CPU client has already started (configure before using JAX)"
    return None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap and no trimming; True if it did. Idempotent."""
    if skip_reason() is not None:
        return False
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never trim
