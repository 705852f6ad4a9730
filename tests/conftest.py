"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, and one persistent compilation
cache for the session (in-process and subprocess runs of the same program compile it once; the cached
executable is the one XLA would build again); LLVM at -O0 (runs.TEST_XLA_FLAGS: half the compile time)."""

import atexit
import os
import shutil
import tempfile

from runs import TEST_XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if TEST_XLA_FLAGS not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + TEST_XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu may be installed (tests/test_plan.py): no TPU probing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_collection_modifyitems(config, items):
    """The tests of a minute or more (marked `long`) first: the two workers of `-n 2` then end on short tests
    together, rather than one finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
