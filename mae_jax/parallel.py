"""Devices: multi-host start-up, the ("data", "fsdp") mesh, parameter sharding rules, global batches.

Every host runs the same program. The batch is split over both mesh axes; parameters and optimizer state
are replicated over "data" and, when `mesh.fsdp` > 1, sharded over "fsdp" by the short rule list below
(ZeRO-3 / FSDP: XLA gathers each kernel when it is used and reduce-scatters its gradient).
"""

from __future__ import annotations

import functools
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


def create_mesh(devices: Sequence[jax.Device], data: int, fsdp: int) -> Mesh:
    """A ("data", "fsdp") mesh over `devices`: a process's real devices (`jax.devices()`) or the compile-only
    devices of a TPU topology (`jax.experimental.topologies`), which need not exist on this machine.

    The batch is split over the flattened mesh, so row block k lives on `mesh.devices.flat[k]`. The devices are
    laid out process by process, so that every process's devices hold one contiguous block of the batch rows,
    in process order: the block its input pipeline reads (`process_batch_rows`). Within a process they follow
    the physical layout (`mesh_utils.create_device_mesh`), so an fsdp group that fits in one host is made of
    neighbouring chips; a larger one spans consecutive hosts.
    """
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    groups: dict[int, list] = {}
    for device in devices:
        groups.setdefault(device.process_index, []).append(device)
    local = {len(g) for g in groups.values()}
    if len(local) != 1:
        raise ValueError(f"processes hold different numbers of devices ({sorted(local)}): every host of a run must "
                         "have the same devices")
    (local,) = local
    array = None
    if local % fsdp == 0 and _physical_layout(devices) is not None:
        array = mesh_utils.create_hybrid_device_mesh(
            (local // fsdp, fsdp), (len(groups), 1), devices, process_is_granule=True,
            allow_split_physical_axes=True)
    if array is None:
        ordered = [d for p in sorted(groups) for d in _physical_order(groups[p])]
        array = np.array(ordered, dtype=object).reshape(data, fsdp)
    return Mesh(array, MESH_AXES)


def _physical_layout(devices: Sequence[jax.Device]) -> np.ndarray | None:
    """`devices` in `mesh_utils.create_device_mesh`'s physical order, or None where it cannot lay them out (it
    refuses e.g. TPU v4 TensorCores listed one by one instead of one device per megacore chip)."""
    try:
        return mesh_utils.create_device_mesh((len(devices),), devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return None


def _physical_order(devices: list) -> list:
    layout = _physical_layout(devices)
    return list(layout.flat) if layout is not None else sorted(devices, key=lambda d: d.id)


def platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "tpu", "gpu"), which the compiled programs are for."""
    return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_partition_spec(path: str, shape: Sequence[int], fsdp_size: int) -> P:
    """PartitionSpec of one parameter under FSDP_RULES (replicated when fsdp_size == 1). A kernel's size is that
    of one matrix (its last two dimensions), so a stacked (scanned) kernel shards as each of its blocks would."""
    if fsdp_size == 1:
        return P()
    for pattern, dim in FSDP_RULES:
        if re.search(pattern, path):
            if dim is None or len(shape) < -dim or shape[dim] % fsdp_size or \
                    int(np.prod(shape[-2:])) < FSDP_MIN_SIZE:
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


def process_batch_rows(sharding: NamedSharding, global_batch_size: int,
                       process_index: int | None = None) -> tuple[int, int]:
    """[start, stop) of the global batch rows that process `process_index` (default: this one) feeds.

    The data pipelines hand each process one contiguous block of rows, in process order; this checks that
    the sharding places exactly that block on the process's devices (any process: it needs no device of it).
    """
    process_index = jax.process_index() if process_index is None else process_index
    indices = sharding.devices_indices_map((global_batch_size,))
    process_count = len({device.process_index for device in indices})
    rows = set()
    for device, index in indices.items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(global_batch_size)))
    expected = global_batch_size // process_count
    start = process_index * expected
    if rows != set(range(start, start + expected)):
        shown = sorted(rows)
        raise ValueError(f"the mesh places batch rows {shown[:4]}{'...' if len(shown) > 4 else ''} on process "
                         f"{process_index} of {process_count}; its input pipeline reads rows [{start}, "
                         f"{start + expected})")
    return start, start + expected


def check_batch_layout(mesh: Mesh, global_batch_size: int) -> None:
    """`process_batch_rows` for every process of the mesh (a ValueError names the first that fails)."""
    sharding = batch_sharding(mesh)
    for process_index in sorted({device.process_index for device in mesh.devices.flat}):
        process_batch_rows(sharding, global_batch_size, process_index)


def sharded_gradient(kernel: jax.Array) -> jax.Array:
    """`kernel` [in, out] itself, whose gradient is pinned to the kernel's FSDP sharding (`param_partition_spec`)
    in the mesh the program is lowered under: XLA then sums it over the devices with a reduce-scatter into each
    device's shard, also inside a scan's body, where the sharding of the stacked parameters does not reach (it
    all-reduced the whole gradient there). Outside such a mesh, or without FSDP, nothing is added."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return kernel
    spec = param_partition_spec("kernel", kernel.shape, mesh.shape["fsdp"])
    return kernel if spec == P() else _pin_cotangent(kernel, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pin_cotangent(x: jax.Array, spec: P) -> jax.Array:
    return x


def _pin_cotangent_fwd(x, spec):
    return x, None


def _pin_cotangent_bwd(spec, _, g):
    return (jax.lax.with_sharding_constraint(g, spec),)


_pin_cotangent.defvjp(_pin_cotangent_fwd, _pin_cotangent_bwd)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` [N, ...] pinned to the batch sharding of the mesh the program is lowered under (`jax.set_mesh`, as
    `trainer.Program.lower` does); x itself outside one. Inside the blocks, this keeps XLA from re-sharding
    activations over the fsdp axis (all-to-alls) where it cannot see the batch layout, e.g. in a scan's body:
    under FSDP the parameters are gathered instead, as intended."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One global array from every process's local rows (`make_array_from_process_local_data`)."""
    return jax.make_array_from_process_local_data(sharding, local)
