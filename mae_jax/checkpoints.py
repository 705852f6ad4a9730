"""Orbax checkpoints: the training checkpoints under `workdir/checkpoints` and standalone weight exports.

Layout (one format for both, so that anything that reads weights reads either):

    <root>/<step>/state   PyTree: training state {"step", "params", "frozen", "opt_state", "rng"},
                          or only {"params", "frozen"} in a weights export
    <root>/<step>/model   JSON: the model's constructor fields (enough to rebuild the architecture)
    <root>/<step>/input   JSON: the input pipeline's position (training checkpoints only)

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never
leaves a half-written checkpoint that the next run would pick up.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any
STATE, MODEL, INPUT = "state", "model", "input"


def make_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 enable_async: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (created if needed); saving is decided by the caller."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=enable_async,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                                 item_names=(STATE, MODEL, INPUT))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, model_fields: Mapping[str, Any],
         input_state: Mapping[str, Any] | None = None) -> None:
    """Saves (asynchronously if the manager is async) `state`, the model fields and the input position."""
    items = {STATE: ocp.args.StandardSave(state), MODEL: ocp.args.JsonSave(_jsonable(model_fields))}
    if input_state is not None:
        items[INPUT] = ocp.args.JsonSave(dict(input_state))
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the state of `step` into the shapes, dtypes and shardings of `abstract_state`."""
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]


def restore_input_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The input pipeline position saved with `step` (None if it has none)."""
    if not (epath.Path(manager.directory) / str(step) / INPUT).exists():
        return None
    return manager.restore(step, args=ocp.args.Composite(**{INPUT: ocp.args.JsonRestore()}))[INPUT]


def _jsonable(fields: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in fields.items():
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif not isinstance(value, (int, float, str, bool, list, type(None))):
            value = str(np.dtype(value)) if key == "dtype" else str(value)
        out[key] = value
    return out


def _step_dir(path: epath.Path) -> epath.Path:
    """Resolves a workdir, a checkpoints root or a step directory to a step directory."""
    if (path / STATE).exists():
        return path
    if (path / "checkpoints").exists():
        path = path / "checkpoints"
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / STATE).exists()] \
        if path.exists() else []
    if not steps:
        raise FileNotFoundError(
            f"no mae_jax checkpoint under {path}: expected a workdir, its 'checkpoints' directory, "
            f"or one step directory holding '{STATE}'")
    return path / str(max(steps))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is (or holds) a checkpoint written by this module."""
    try:
        _step_dir(epath.Path(path))
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def load_variables(path: str | os.PathLike) -> tuple[dict | None, dict]:
    """Reads {"params", "frozen"} as host numpy arrays, and the model fields if recorded.

    `path` may be a workdir, its `checkpoints` directory (latest step), a step directory, or an export
    written by `save_variables`. The optimizer state is not read.
    """
    step_dir = _step_dir(epath.Path(path).absolute())  # Orbax finds no metadata under a relative path
    metadata = ocp.StandardCheckpointer().metadata(step_dir / STATE)
    metadata = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    tree = getattr(metadata, "tree", None)
    if not isinstance(tree, dict):
        raise ValueError(f"checkpoint {step_dir / STATE} has no readable Orbax metadata: expected a complete "
                         "checkpoint written by mae_jax (an interrupted copy?)")
    wanted = {k: tree[k] for k in ("params", "frozen") if k in tree}
    if "params" not in wanted:
        raise ValueError(f"checkpoint {step_dir} holds no 'params' (it has {sorted(tree)})")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    with ocp.PyTreeCheckpointer() as checkpointer:
        variables = checkpointer.restore(
            step_dir / STATE, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                          partial_restore=True))
    fields = None
    if (step_dir / MODEL).exists():
        fields = ocp.JsonCheckpointHandler().restore(step_dir / MODEL)
        if isinstance(fields.get("image_size"), list):
            fields["image_size"] = tuple(fields["image_size"])
    logging.info("Loaded weights from %s", step_dir)
    return fields, variables


def save_variables(directory: str | os.PathLike, variables: PyTree, model_fields: Mapping[str, Any],
                   step: int = 0) -> epath.Path:
    """Writes a weights export ({"params", "frozen"} + model fields) that `load_variables` and
    `config.init_from` read. Returns the step directory."""
    variables = {k: variables[k] for k in ("params", "frozen") if k in variables}
    variables = jax.tree_util.tree_map(np.asarray, variables)
    with make_manager(directory, max_to_keep=None, enable_async=False) as manager:
        save(manager, step, variables, model_fields)
        manager.wait_until_finished()
    return epath.Path(directory).absolute() / str(step)
