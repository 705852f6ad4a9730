"""Process-wide settings for programs that train or benchmark, applied only when asked for.

Importing `mae_jax` changes nothing in the process. The entry points (`main.py`, `benchmarks/`) call
`configure()` first thing, before JAX or TensorFlow start; a notebook or script of your own may do the same:

    from mae_jax import runtime
    settings = runtime.configure()    # before anything uses JAX; returns what was applied
    logging.info("%s", settings)

What it sets, each with its opt-out:
  - JAX's platform on a machine without a TPU where libtpu is installed (`pip install -e ".[tpu]"` for
    `mae_jax.plan`): `JAX_PLATFORMS=cpu`, so that JAX does not start libtpu, which looks for TPU chips and
    metadata servers and prints its start-up warnings. Set `JAX_PLATFORMS` yourself to choose otherwise; on a
    TPU machine (a Google TPU on the PCI bus) nothing is changed.
  - host memory (`mae_jax/host_memory.py`): glibc keeps freed memory for reuse when JAX runs on the CPU, so
    XLA:CPU's temporaries are not page-faulted in again on every step. `keep_host_memory=False` or the
    environment `MAE_JAX_KEEP_HOST_MEMORY=0` leaves malloc alone.
  - TensorFlow's C++ INFO lines (tf.data is the input pipeline) are hidden: `TF_CPP_MIN_LOG_LEVEL=1` unless
    the environment sets it. TensorFlow's oneDNN custom kernels are off (`TF_ENABLE_ONEDNN_OPTS=0` unless the
    environment sets it): TensorFlow only decodes and augments images here, and on CPUs where oneDNN is on by
    default it announces itself at import with two lines that no log level hides ("oneDNN custom operations
    are on ... slightly different numerical results"), besides making the augmentation's round-off depend on
    the CPU.
  - JAX's persistent compilation cache, so that a restarted run skips compilation: `JAX_COMPILATION_CACHE_DIR`
    if set, else `$MAE_JAX_COMPILATION_CACHE`, else `~/.cache/mae_jax/jax_compilation_cache`;
    `MAE_JAX_COMPILATION_CACHE=0` (or `compilation_cache=False`) turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Iterator

from absl import logging

from mae_jax import host_memory

CACHE_ENV = "MAE_JAX_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mae_jax", "jax_compilation_cache")
_OFF = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `configure()` applied, for the log."""

    host_memory: str  # "kept for reuse" or why malloc was left alone
    compilation_cache: str  # the cache directory, or why there is none
    platforms: str = ""  # what was set about JAX's platforms, if anything

    def __str__(self) -> str:
        platforms = f"; {self.platforms}" if self.platforms else ""
        return f"host memory: {self.host_memory}; compilation cache: {self.compilation_cache}{platforms}"


def _compilation_cache_dir(environ=os.environ) -> str | None:
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
    value = environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    return os.path.expanduser(value or DEFAULT_CACHE_DIR)


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what JAX itself looks for)


def has_tpu(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    """Whether this machine has TPU chips (a Google device on its PCI bus)."""
    try:
        entries = os.listdir(pci_devices)
    except OSError:
        return False
    for entry in entries:
        try:
            with open(os.path.join(pci_devices, entry, "vendor")) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _choose_platform(environ=os.environ) -> str:
    """JAX_PLATFORMS=cpu where libtpu is installed, the machine has no TPU and no other accelerator plugin is
    installed; returns what it did ("" if nothing)."""
    import importlib.metadata
    import importlib.util

    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return ""
    if has_tpu() or any(ep.name != "tpu" for ep in importlib.metadata.entry_points(group="jax_plugins")):
        return ""
    environ["JAX_PLATFORMS"] = "cpu"
    return "JAX_PLATFORMS=cpu (libtpu is installed, this machine has no TPU)"


def configure(*, keep_host_memory: bool = True, compilation_cache: bool = True) -> Settings:
    """Applies the process-wide settings of the module docstring; call before JAX and TensorFlow start.

    Idempotent. Returns what was applied.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    platforms = _choose_platform()
    if not keep_host_memory:
        memory = "system malloc settings (keep_host_memory=False)"
    elif host_memory.keep_freed_memory():
        memory = "freed memory kept for reuse (mae_jax/host_memory.py)"
    else:
        memory = f"system malloc settings ({host_memory.skip_reason()})"
    cache_dir = _compilation_cache_dir() if compilation_cache else None
    if cache_dir is None:
        cache = "off"
    else:
        import jax  # importing jax does not start its backends

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        cache = cache_dir
    return Settings(host_memory=memory, compilation_cache=cache, platforms=platforms)


def _is_third_party_chatter(record: std_logging.LogRecord) -> bool:
    """Orbax's narration of every save and restore, jax's report of each accelerator it does not find, tfds's
    narration of reading and preparing datasets, clu's "Setting work unit notes" (its progress report; our step
    lines carry the ETA), and two warnings that are not: Orbax's that a step has no
    metadata file (our exports never write one) and tfds's that a dataset being prepared has no info yet."""
    if re.search(r"/orbax/|xla_bridge|/tensorflow_datasets/|/clu/platform/", record.pathname) is None:
        return False
    return record.levelno < std_logging.WARNING or record.getMessage().startswith(
        ("Metadata file does not exist", "Variant folder "))


def error_line(prog: str, error: BaseException | str) -> str:
    """`prog: error: <message>`, the message on one line: how every command of this project reports bad input."""
    return f"{prog}: error: {' '.join(str(error).split())}"


@contextlib.contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...] = (ValueError, OSError),
                    exit: Callable[[str], Any] = sys.exit) -> Iterator[bool]:
    """For command-line entry points: hides third-party INFO chatter (`quiet_logs`), and turns an error of
    `errors` raised inside into `exit(error_line(prog, error))` (the line on stderr, exit status 1); with absl's
    `-v 1` the error propagates with its traceback instead. Yields whether `-v 1` was given."""
    verbose = quiet_logs()
    try:
        yield verbose
    except errors as e:
        if verbose:
            raise
        exit(error_line(prog, e))


def quiet_logs() -> bool:
    """For command-line entry points: hides third-party INFO chatter unless absl's `-v 1` (or more) was given.

    Our own INFO lines and real warnings stay. Returns whether the user asked for verbosity (then errors may
    show their traceback as well).
    """
    if logging.get_verbosity() >= 1:
        return True
    logging.get_absl_handler().addFilter(lambda record: not _is_third_party_chatter(record))
    return False
