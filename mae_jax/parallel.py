"""Devices: multi-host start-up, the ("data", "fsdp") mesh, parameter sharding rules, global batches.

Every host runs the same program. The batch is split over both mesh axes; parameters and optimizer state
are replicated over "data" and, when `mesh.fsdp` > 1, sharded over "fsdp" by the short rule list below
(ZeRO-3 / FSDP: XLA gathers each kernel when it is used and reduce-scatters its gradient).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device

# FSDP rules, first match wins: (regex on the "/"-joined parameter path, dimension to shard counted from
# the end). Dense kernels [..., in, out] shard their input dimension; everything else is small and
# replicated. A stacked (nn.scan) kernel [depth, in, out] matches the same rule.
FSDP_RULES: Sequence[tuple[str, int | None]] = (
    (r"(^|/)kernel$", -2),
    (r".*", None),
)
FSDP_MIN_SIZE = 2**12  # arrays smaller than this stay replicated: sharding them saves nothing


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

    Recognised: `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (any cluster,
    and several processes on one machine); multi-host Cloud TPU VMs; SLURM and Open MPI jobs of more
    than one task (jax detects their parameters). Must run before anything touches the devices.
    """
    if jax.distributed.is_initialized():
        return
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    cluster = (len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
               or (_env_int("SLURM_NTASKS") or 1) > 1 or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)
    if not explicit and not cluster:
        return
    # Collectives between CPU processes (ignored on TPU and GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if num_processes is None or process_id is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID too")
        jax.distributed.initialize(explicit, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves -1 ("all remaining devices") and checks that data x fsdp covers every device."""
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"{name} {size} must be a positive device count or -1 (all remaining devices)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: at most one axis may take the remaining devices")
    known = max(data, 1) * max(fsdp, 1)
    if num_devices % known:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // known if data == -1 else data
    fsdp = num_devices // known if fsdp == -1 else fsdp
    if data * fsdp != num_devices:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
                         f"{num_devices}: the mesh must use every device (set one axis to -1)")
    return data, fsdp


def create_mesh(data: int, fsdp: int) -> Mesh:
    """A ("data", "fsdp") mesh over all devices of all processes."""
    shape = mesh_shape(data, fsdp, jax.device_count())
    return Mesh(mesh_utils.create_device_mesh(shape, allow_split_physical_axes=True), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_partition_spec(path: str, shape: Sequence[int], fsdp_size: int) -> P:
    """PartitionSpec of one parameter under FSDP_RULES (replicated when fsdp_size == 1)."""
    if fsdp_size == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
        return P()
    for pattern, dim in FSDP_RULES:
        if re.search(pattern, path):
            if dim is None or len(shape) < -dim or shape[dim] % fsdp_size:
                return P()
            spec = [None] * len(shape)
            spec[len(shape) + dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(abstract_params: PyTree, mesh: Mesh) -> PyTree:
    """NamedShardings for a params pytree (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_partition_spec(_path_str(path), x.shape, fsdp_size)),
        abstract_params)


def process_batch_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows that this process feeds.

    The data pipelines hand each process one contiguous block of rows, in process order; this checks that
    the mesh places exactly that block on this process's devices.
    """
    local_rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        local_rows.update(range(*index[0].indices(global_batch_size)))
    start, stop = min(local_rows), max(local_rows) + 1
    expected = global_batch_size // jax.process_count()
    if stop - start != len(local_rows) or len(local_rows) != expected or start != jax.process_index() * expected:
        raise ValueError(f"the mesh places batch rows {sorted(local_rows)[:4]}... on process "
                         f"{jax.process_index()}; expected the contiguous block starting at "
                         f"{jax.process_index() * expected}")
    return start, stop


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One global array from every process's local rows (`make_array_from_process_local_data`)."""
    return jax.make_array_from_process_local_data(sharding, local)
