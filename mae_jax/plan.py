r"""Plan a run for a TPU slice (or GPUs) from any machine: compile the run's own programs for it and report them.

  python -m mae_jax.plan --config configs/vit_large.py --topology v3:8x8 [--config.field=value ...] [--dump DIR]
  python -m mae_jax.plan --config configs/vit_base.py --topology h100:8     # 8 H100 SXM on one host (see GPUs)
  python -m mae_jax.plan --topology help          # the known chips and slices

Nothing runs and no TPU is needed: libtpu (`pip install -e ".[tpu]"`) compiles for a topology it describes
(`jax.experimental.topologies`), and `trainer.build` builds the run's programs for those devices exactly as a
run on the slice would (pretraining: the train step and the reconstructions; fine-tuning and the probe: the train
and evaluation steps). For each program: per-device memory (arguments, temporaries, total) against the chip's
HBM, FLOPs per device, the step time by XLA's TPU cost model and by the roofline (FLOPs at the chip's bf16 peak,
bytes at its HBM bandwidth; an implausible cost-model figure, negative or below the roofline, is flagged and the
roofline used), the collectives by kind and element type, the compile time, and the largest temporary buffers.
Then images/s on the slice and the configured run's wall-clock. These are XLA's estimates, not measurements.

A config that does not fit exits 1 with one line naming the shortfall and the settings that fit, found by
compiling them (activation rematerialisation, gradient accumulation, FSDP, a smaller batch). `--dump DIR` writes
each program's optimized HLO (`DIR/<program>.hlo.txt`) and the figures (`DIR/plan.json`).

FLOPs: XLA's cost analysis of a compiled module counts a loop body (a scan over blocks, gradient accumulation)
once, so the FLOPs here are those of the same program lowered unrolled (blocks unrolled, one micro-batch; the
remat policy kept), divided over the devices; the compiled module's bytes are scaled by its loops' trip counts
(`hlo.analyze`).

GPUs: `--topology h100:8` (8 H100 SXM on one host; `h100:2x8`: 2 hosts of 8; also `a100`). JAX's CUDA plugin
(`pip install -e ".[gpu]"`: jax-cuda12-plugin and CUDA's ptxas and libdevice from nvidia-cuda-nvcc-cu12) compiles
for a GPU it is only described to (XLA's target description of the chip, `GPUS`), without a GPU or a driver. XLA
has no cost model for these executables: the step time is the roofline's, its bytes read from the optimized HLO
(`hlo.kernel_traffic`), float32 matmuls at the TF32 peak (JAX's default precision on GPUs). Nothing is autotuned
without a GPU, and XLA's untuned Triton GEMM tiling refuses some of the model's matmuls ("Couldn't find output tile
sizes"), so GPU programs are compiled with cuBLAS GEMMs (`xla_gpu_enable_triton_gemm=False`). HBM is what JAX's
allocator takes of the device memory (XLA_CLIENT_MEM_FRACTION, default 0.75).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

_LIBTPU_QUIET = {  # libtpu on a host without a TPU: no metadata-server probes, no start-up warnings
    "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def configure() -> None:
    """For programs that plan (this module's command line, tests): libtpu started for compiling only, quietly, and
    JAX's own devices kept on the CPU. Call before JAX starts its backends; training entry points never call it."""
    for name, value in _LIBTPU_QUIET.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if _cuda_plugin() and "jax" not in sys.modules:
        with _native_stderr_hidden():  # each CUDA library jax loads says "Could not find cuda drivers"
            import jax  # noqa: F401


def _cuda_plugin() -> str | None:
    """The installed CUDA plugin of JAX (jax-cuda12-plugin or jax-cuda13-plugin), if any."""
    return next((name for name in ("jax_cuda12_plugin", "jax_cuda13_plugin") if importlib.util.find_spec(name)),
                None)


@contextlib.contextmanager
def _native_stderr_hidden():
    """Hides what native code writes to file descriptor 2 (Python's exceptions still propagate)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---------------------------------------------------------------------------------------------------------
# Chips and slices.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures (REFERENCE.md, "Wall-clock and hardware"), and how libtpu lists its devices."""

    name: str
    devices_per_chip: int  # JAX devices per chip as compiled here (v3: two TensorCores; megacore chips: one)
    hbm_gib: float  # per chip
    bf16_tflops: float  # per chip, dense
    hbm_gbps: float  # per chip, GB/s
    chip_config: str  # libtpu's chip_config_name
    slices: tuple[str, ...]  # topologies offered (libtpu compiles others too)

    def per_device(self, value: float) -> float:
        return value / self.devices_per_chip

    def matmul_tflops(self, dtype: str) -> float:
        """The dense matmul peak of a chip for a model computing in `dtype` (TPUs: bf16 passes either way)."""
        return self.bf16_tflops

    def usable_bytes(self) -> float:
        """HBM a device's programs may use."""
        return self.per_device(self.hbm_gib) * 2**30


CHIPS = {
    "v3": Chip("TPU v3", 2, 32, 123, 900, "default", ("2x2", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v4": Chip("TPU v4", 1, 32, 275, 1228, "megacore", ("2x2x1", "2x2x2", "2x2x4", "4x4x4", "4x4x8", "8x8x8")),
    "v5e": Chip("TPU v5e", 1, 16, 197, 819, "default", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v5p": Chip("TPU v5p", 1, 95, 459, 2765, "megacore", ("2x2x1", "2x2x2", "2x2x4", "4x4x4", "4x4x8", "8x8x8")),
    "v6e": Chip("TPU v6e", 1, 32, 918, 1640, "default", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "16x16")),
}


@dataclasses.dataclass(frozen=True)
class GpuChip(Chip):
    """A GPU (one JAX device each): public dense peaks, and XLA's description of it to compile for."""

    tf32_tflops: float  # dense: float32 matmuls at JAX's default precision use TF32 on Ampere and later
    target_config: str  # XLA's GpuTargetConfigProto, text format

    def matmul_tflops(self, dtype: str) -> float:
        return self.tf32_tflops if dtype == "float32" else self.bf16_tflops

    def usable_bytes(self) -> float:
        """The share of the device memory that JAX's allocator takes (XLA_CLIENT_MEM_FRACTION, default 0.75)."""
        fraction = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        return self.hbm_gib * 2**30 * float(fraction or 0.75)


def _gpu_spec(device: str, compute_capability: int, cores: int, fpus: int, shared_per_core: int,
              shared_optin: int, bandwidth: int, l2: int, ghz: float, memory: int) -> str:
    """XLA's target description of a CUDA GPU: the fields of its spec files that differ between the chips."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {shared_per_core} threads_per_core_limit: 2048 core_count: {cores} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {ghz} device_memory_size: {memory}
  shared_memory_per_block_optin: {shared_optin} cuda_compute_capability {{ major: {compute_capability} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{device}"
"""


# Per chip: HBM (the device memory XLA's spec gives), dense bf16 and TF32 peaks and HBM bandwidth from NVIDIA's
# datasheets; the target descriptions transcribed from XLA's xla/tools/hlo_opt/gpu_specs/{h100_sxm,a100_sxm_80}.txtpb
# (openxla/xla, Apache-2.0).
GPUS = {
    "h100": GpuChip("H100 SXM", 1, 84_978_434_048 / 2**30, 989, 3350, "", ("1", "8", "2x8", "4x8"), 495,
                    _gpu_spec("NVIDIA H100 80GB HBM3", 9, 132, 128, 233472, 232448, 3_352_320_000_000, 52_428_800,
                              1.98, 84_978_434_048)),
    "a100": GpuChip("A100 SXM4 80GB", 1, 85_100_068_864 / 2**30, 312, 2039, "", ("1", "8", "2x8", "4x8"), 156,
                    _gpu_spec("NVIDIA A100-SXM4-80GB", 8, 108, 64, 167936, 166912, 2_039_040_000_000, 41_943_040,
                              1.41, 85_100_068_864)),
}


class PlanError(ValueError):
    """A plan that cannot be made or a config that does not fit: one line naming what and why."""


@dataclasses.dataclass
class Topology:
    name: str  # e.g. "v5e:4x4"
    chip: Chip
    devices: list
    num_processes: int

    @property
    def num_chips(self) -> int:
        return len(self.devices) // self.chip.devices_per_chip

    @property
    def platform(self) -> str:
        """The platform the programs are compiled for ("tpu", "gpu"), as a run on these devices would."""
        return self.devices[0].platform


def topology(name: str) -> Topology:
    """The compile-only devices of a TPU slice named "<generation>:<chips per dimension>", e.g. "v5e:4x4", or of
    GPUs named "<gpu>:<per host>" or "<gpu>:<hosts>x<per host>", e.g. "h100:8"."""
    generation, _, shape = name.partition(":")
    if generation in GPUS:
        return gpu_topology(name)
    if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise PlanError(f"--topology {name!r}: expected <generation>:<shape> with generation one of {sorted(CHIPS)}, "
                        f"e.g. v5e:4x4, v4:4x4x8, v3:8x8, or a GPU {sorted(GPUS)}, e.g. h100:8 (--topology help "
                        "lists them)")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("planning for a TPU needs libtpu, which compiles for TPUs without one: pip install -e "
                        "\".[tpu]\" (or pip install \"jax[tpu]\")") from None
    from jax.experimental import topologies

    chip = CHIPS[generation]
    try:
        devices = topologies.get_topology_desc(name, platform="tpu", chip_config_name=chip.chip_config).devices
    except Exception as e:  # noqa: BLE001 - libtpu's errors are bare runtime errors
        raise PlanError(f"--topology {name!r}: libtpu does not know it ({' '.join(str(e).split())[:200]})") from None
    return Topology(name, chip, list(devices), len({d.process_index for d in devices}))


def gpu_topology(name: str) -> Topology:
    """The compile-only devices of hosts of GPUs, "<gpu>:<GPUs per host>" or "<gpu>:<hosts>x<GPUs per host>"."""
    gpu, _, shape = name.partition(":")
    match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    if gpu not in GPUS or not match or int(match.group(2)) < 1 or int(match.group(1) or 1) < 1:
        raise PlanError(f"--topology {name!r}: expected <gpu>:<GPUs per host> or <gpu>:<hosts>x<GPUs per host> with "
                        f"gpu one of {sorted(GPUS)}, e.g. h100:8, a100:2x8")
    hosts, per_host = int(match.group(1) or 1), int(match.group(2))
    plugin = _cuda_plugin()
    if plugin is None:
        raise PlanError("planning for a GPU needs JAX's CUDA plugin, which compiles for GPUs without one: pip install "
                        "-e \".[gpu]\" (jax-cuda12-plugin and nvidia-cuda-nvcc-cu12)")
    if not _ptxas_found(plugin):
        raise PlanError("planning for a GPU needs CUDA's ptxas and libdevice: pip install nvidia-cuda-nvcc-cu12 (in "
                        "the gpu extra), or a CUDA toolkit in /usr/local/cuda or on PATH")
    from jax.experimental import topologies

    chip = GPUS[gpu]
    try:
        with _native_stderr_hidden():  # the plugin's start says "Could not find cuda drivers" when there is no GPU
            devices = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                                   target_config=chip.target_config).devices
    except NotImplementedError:  # the plugin did not register: its start-up check of the CUDA libraries failed
        raise PlanError(f"--topology {name!r}: JAX's CUDA plugin did not start (JAX_PLATFORMS="
                        f"{os.environ.get('JAX_PLATFORMS', '')!r}: its check of the CUDA libraries runs unless "
                        "JAX_PLATFORMS=cpu, which planning sets when JAX_PLATFORMS is not set)") from None
    except Exception as e:  # noqa: BLE001 - the plugin's errors are bare runtime errors
        raise PlanError(f"--topology {name!r}: JAX's CUDA plugin cannot describe it "
                        f"({' '.join(str(e).split())[:200]})") from None
    return Topology(name, chip, list(devices), len({d.process_index for d in devices}))


def _ptxas_found(plugin: str) -> bool:
    """Whether XLA will find ptxas: where it looks (the nvidia-cuda-nvcc package, a CUDA toolkit, PATH)."""
    import shutil

    package = "nvidia.cuda_nvcc" if plugin == "jax_cuda12_plugin" else "nvidia.cu13"
    try:
        if importlib.util.find_spec(package):
            return True
    except ModuleNotFoundError:
        pass
    flag = re.search(r"--xla_gpu_cuda_data_dir=(\S+)", os.environ.get("XLA_FLAGS", ""))
    roots = [flag.group(1)] if flag else []
    return bool(shutil.which("ptxas")) or any(os.path.exists(os.path.join(root, "bin", "ptxas"))
                                              for root in roots + ["/usr/local/cuda", "/opt/cuda"])


def describe_topologies() -> str:
    lines = ["Known TPU generations (per chip: HBM, dense bf16 FLOP/s, HBM bandwidth) and example slices; any",
             "<generation>:<shape> that libtpu knows works (chips per dimension, e.g. v5e:4x4 is 16 chips):"]
    for generation, chip in CHIPS.items():
        lines.append(f"  {generation:4} {chip.name}: {chip.hbm_gib:g} GiB, {chip.bf16_tflops:g} TFLOP/s, "
                     f"{chip.hbm_gbps:g} GB/s; {chip.devices_per_chip} device(s) per chip; slices "
                     + ", ".join(f"{generation}:{s}" for s in chip.slices))
    lines.append("GPUs (per GPU: HBM, dense bf16 / TF32 FLOP/s, HBM bandwidth), <gpu>:<GPUs per host> or "
                 "<gpu>:<hosts>x<GPUs per host>")
    lines.append("(compiled by JAX's CUDA plugin without a GPU: pip install -e \".[gpu]\"):")
    for gpu, chip in GPUS.items():
        lines.append(f"  {gpu:4} {chip.name}: {chip.hbm_gib:.1f} GiB (JAX's allocator takes 75% by default), "
                     f"{chip.bf16_tflops:g} / {chip.tf32_tflops:g} TFLOP/s, {chip.hbm_gbps:g} GB/s; e.g. "
                     + ", ".join(f"{gpu}:{s}" for s in chip.slices))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Compiling and measuring one program.
# ---------------------------------------------------------------------------------------------------------

# Datasets whose size and classes are known without preparing them here (tfds metadata needs the data).
KNOWN_DATASETS = {"imagenet2012": {"train": 1_281_167, "validation": 50_000, "num_classes": 1000}}


@dataclasses.dataclass
class ProgramReport:
    name: str
    compile_seconds: float
    hbm_bytes: float  # per device
    fits: bool
    error: str | None = None  # the compiler's refusal, shortened
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # per device
    flops: float = 0.0  # per device, loops counted fully (see the module docstring)
    bytes_accessed: float = 0.0  # per device, loops counted fully
    cost_model_seconds: float | None = None  # XLA's TPU cost model (its loop bodies once)
    roofline_seconds: float = 0.0
    seconds: float = 0.0  # the step time used: the cost model's, or the roofline's when that is implausible
    note: str = ""  # why the cost model was not used
    loop_trip_counts: list[int] = dataclasses.field(default_factory=list)
    collectives: list[dict] = dataclasses.field(default_factory=list)
    largest_buffers: list[dict] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0  # temporaries live at the program's memory peak (XLA's live ranges)
    peak_by_part: dict[str, int] = dataclasses.field(default_factory=dict)  # ... by the part of the model

    @property
    def total_bytes(self) -> int:
        return self.memory.get("total", 0)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "outputs_not_aliased": m.output_size_in_bytes - m.alias_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["total"] = sum(out.values())
    return out


def _shortfall(message: str) -> str:
    """The compiler's out-of-memory refusal in one short clause, e.g. "temporaries need 24.04G, 15.75G of HBM
    available"."""
    text = " ".join(message.split())
    found = re.search(r"memory required for ([\w ]+?) \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)",
                      text)
    if found:
        what = found.group(1).replace("HLO temporaries", "temporaries")
        return f"{what} need {found.group(2)}, {found.group(3)} of HBM available"
    return re.sub(r"^RESOURCE_EXHAUSTED: ", "", text)[:240]


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and "hbm" in text.lower()


@contextlib.contextmanager
def _past_the_compilation_cache():
    """Compiles inside skip JAX's persistent compilation cache, if a caller (main.py, a notebook) turned it on: a
    deviceless executable cannot be read back from it (JAX warns "PjRtCompiler must be constructed with a
    Client"), and the plan's compile times are measured cold. The cache works as before afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used: decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _compile(program, hbm_bytes: float, dump_dir: str | None) -> tuple[Any, ProgramReport]:
    from mae_jax import parallel

    start = time.perf_counter()
    lowered = program.lower()
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True} if dump_dir else None
    if parallel.platform(program.mesh) == "gpu":  # untuned Triton GEMMs fail to tile (module docstring)
        options = {**(options or {}), "xla_gpu_enable_triton_gemm": False}
    try:
        with _past_the_compilation_cache():
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises a bare runtime error
        if not _is_out_of_memory(e):
            raise
        return None, ProgramReport(program.description, time.perf_counter() - start, hbm_bytes, False,
                                   _shortfall(str(e)))
    seconds = time.perf_counter() - start
    memory = _memory(compiled)
    return compiled, ProgramReport(program.description, seconds, hbm_bytes, memory["total"] <= hbm_bytes,
                                   memory=memory)


def by_part(buffers) -> dict[str, int]:
    """Bytes of `hlo.Buffer`s by the part of the model whose operation wrote them ("decoder attention", "encoder
    MLP", "backward: decoder MLP", ...; else the operation's last name), largest first."""
    parts: dict[str, int] = {}
    for b in buffers:
        where = next((w for key, w in (("decoder", "decoder"), ("encoder", "encoder"), (r"blocks", "encoder"),
                                       ("head", "head")) if re.search(rf"\b{key}", b.op_name)), "")
        what = next((label for key, label in (("attn", "attention"), ("mlp", "MLP"), ("norm", "norms"))
                     if re.search(rf"\b{key}", b.op_name)), "")
        name = " ".join(filter(None, [where, what])) or b.op_name.split("/")[-1] or "unnamed"
        if b.op_name.startswith("backward: ") and not name.startswith("backward: "):
            name = "backward: " + name
        parts[name] = parts.get(name, 0) + b.bytes
    return dict(sorted(parts.items(), key=lambda item: -item[1]))


def _measure(report: ProgramReport, compiled, global_flops: float, topo: Topology, dump_dir: str | None,
             dtype: str = "bfloat16") -> str:
    """Fills in FLOPs, bytes, step times, collectives and buffers of a compiled program computing in `dtype`;
    returns its HLO text."""
    from mae_jax import hlo

    chip = topo.chip
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    analysis = hlo.analyze(text)
    report.loop_trip_counts = analysis.loop_trip_counts
    report.flops = global_flops / len(topo.devices)
    if "bytes accessed" in cost:
        report.bytes_accessed = float(cost["bytes accessed"]) * analysis.loop_factor
    else:  # XLA:GPU's compile-only executables have no cost analysis
        report.bytes_accessed = hlo.kernel_traffic(text)
    peak = chip.per_device(chip.matmul_tflops(dtype)) * 1e12
    bandwidth = chip.per_device(chip.hbm_gbps) * 1e9
    report.roofline_seconds = max(report.flops / peak, report.bytes_accessed / bandwidth)
    modelled = cost.get("optimal_seconds")
    report.cost_model_seconds = None if modelled is None else float(modelled)
    looped = any(n > 1 for n in analysis.loop_trip_counts)
    if modelled is None:
        report.note = "no cost-model figure: roofline"
    elif modelled <= 0:
        report.note = "cost model negative: roofline"
    elif looped and modelled < report.roofline_seconds:
        report.note = "cost model counts loop bodies once: roofline"
    elif modelled < report.roofline_seconds:
        report.note = "cost model below the roofline: roofline"
    report.seconds = report.roofline_seconds if report.note else float(modelled)
    report.collectives = [dataclasses.asdict(c) for c in analysis.collectives]
    if dump_dir:
        found = sorted(f for f in os.listdir(dump_dir) if f.endswith("after_optimizations-buffer-assignment.txt"))
        if found:
            with open(os.path.join(dump_dir, found[-1])) as f:
                report.largest_buffers = [dataclasses.asdict(b) for b in hlo.largest_buffers(f.read(), text)]
        found = sorted(f for f in os.listdir(dump_dir) if f.endswith("after_optimizations-live-range.txt"))
        if found:
            with open(os.path.join(dump_dir, found[-1])) as f:
                peak, buffers = hlo.peak_buffers(f.read(), text)
            report.peak_bytes, report.peak_by_part = peak, by_part(buffers)
    return text


# ---------------------------------------------------------------------------------------------------------
# A plan.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    topology: str
    chip: str
    num_chips: int
    num_devices: int
    num_processes: int
    model: str
    dtype: str
    batch_size: int
    mesh: dict[str, int]
    num_examples: int
    steps_per_epoch: int
    total_steps: int
    programs: dict[str, ProgramReport]
    state_bytes: int = 0  # per device: parameters, optimizer state and the rest of the train state, as sharded
    train_step_shares: dict[str, float] = dataclasses.field(default_factory=dict)  # of the steps, per train step
    evaluations: int = 0  # evaluation passes of the run (fine-tuning, probe)
    eval_batches: int = 0  # eval steps per pass
    data_note: str = ""  # where the dataset sizes came from
    suggestions: list[dict] = dataclasses.field(default_factory=list)  # settings that fit, when this does not

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs.values())

    @property
    def step_seconds(self) -> float:
        """The mean step time: over the train steps of a multi-scale run, each by its share of the steps."""
        shares = {name: share for name, share in self.train_step_shares.items() if name in self.programs}
        if not shares:
            return self.programs["train_step"].seconds
        return sum(self.programs[name].seconds * share for name, share in shares.items()) / sum(shares.values())

    @property
    def images_per_sec(self) -> float:
        return self.batch_size / self.step_seconds if self.step_seconds else 0.0

    @property
    def wall_seconds(self) -> float:
        evaluation = self.programs.get("eval_step")
        eval_seconds = self.evaluations * self.eval_batches * evaluation.seconds if evaluation else 0.0
        return self.total_steps * self.step_seconds + eval_seconds


def _model_name(fields) -> str:
    sizes = {768: "B", 1024: "L", 1280: "H", 384: "S", 192: "Ti"}
    return f"ViT-{sizes.get(fields['embed_dim'], str(fields['embed_dim']))}/{fields['patch_size']}"


def _data(config) -> tuple[int, int | None, str]:
    """(training examples, eval examples or None, a note on where they came from), without reading the data."""
    from mae_jax import input_pipeline

    try:
        num_examples = input_pipeline.num_train_examples(config.input)
        return num_examples, None, ""
    except ValueError:
        known = KNOWN_DATASETS.get(config.input.dataset)
        if known is None or config.input.train_split not in known:
            raise
        return known[config.input.train_split], known.get(config.input.eval_split), \
            f"{config.input.dataset} not prepared here: its published size"


def _task(config, platform: str):
    """The config's task for `platform`; a classifier of a known dataset that is not prepared here gets its
    published number of classes."""
    from mae_jax import trainer

    cls = trainer.task_class(config)
    known = KNOWN_DATASETS.get(config.input.dataset)
    if config.get("task", "pretrain") != "pretrain" and not config.model.num_classes and known:
        try:
            return cls(config, platform)
        except ValueError:
            config.model.num_classes = known["num_classes"]
    return cls(config, platform)


def _unrolled_flops(config, num_examples: int, platform: str = "tpu",
                    programs: Sequence[str] | None = None) -> dict[str, float]:
    """Global FLOPs of each program (of `programs`, None: all) as written for `platform`: lowered (not compiled)
    with blocks unrolled and one micro-batch, for one CPU device (lowering is target-independent; compile-only
    clients have no cost analysis)."""
    import jax

    from mae_jax import trainer

    config = copy.deepcopy(config)
    config.model.scan_blocks = False
    config.grad_accum_steps = 1
    config.mesh.data, config.mesh.fsdp = -1, 1
    task = _task(config, platform)  # the target's ops, lowered for the CPU only to count them
    setup = trainer.build(config, task, jax.devices("cpu")[:1], num_examples)
    flops = {}
    for name, program in setup.programs.items():
        if programs is not None and name not in programs:
            continue
        cost = program.lower().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[name] = float(cost["flops"])
    return flops


def plan(config, topo: Topology, *, num_examples: int | None = None, dump: str | None = None,
         suggest: int = 2, programs: Sequence[str] | None = None) -> Plan:
    """Compiles `config`'s programs for `topo` and reports them (see the module docstring). Raises PlanError for
    a config that does not fit, naming up to `suggest` settings that do (0: none are tried); `programs` limits
    the programs compiled (default: all of the run's)."""
    from mae_jax import config_lib, trainer

    config = copy.deepcopy(config)
    config_lib.resolve(config)
    cls = trainer.task_class(config)
    try:
        cls.validate(config, len(topo.devices), topo.num_processes)
    except ValueError as e:
        raise PlanError(f"on {topo.name} ({len(topo.devices)} devices, {topo.num_processes} hosts): {e}") from None
    found, eval_examples, data_note = _data(config)
    num_examples = num_examples or found
    task = _task(config, topo.platform)
    setup = trainer.build(config, task, topo.devices, num_examples)
    hbm = topo.chip.usable_bytes()
    flops = _unrolled_flops(config, num_examples, topo.platform, programs)
    reports = {}
    for name, program in setup.programs.items():
        if programs is not None and name not in programs:
            continue
        program_dump = os.path.join(dump, name) if dump else tempfile.mkdtemp(prefix=f"mae_jax_plan_{name}_")
        compiled, report = _compile(program, hbm, program_dump)
        if compiled is not None:
            text = _measure(report, compiled, flops[name], topo, program_dump, str(config.model.dtype))
            if dump:
                with open(os.path.join(dump, f"{name}.hlo.txt"), "w") as f:
                    f.write(text)
        if not dump:
            import shutil

            shutil.rmtree(program_dump, ignore_errors=True)
        reports[name] = report
    result = Plan(
        topology=topo.name, chip=topo.chip.name, num_chips=topo.num_chips, num_devices=len(topo.devices),
        num_processes=topo.num_processes, model=_model_name(config.model), dtype=str(config.model.dtype),
        batch_size=config.batch_size, mesh=dict(setup.mesh.shape), num_examples=num_examples,
        steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps, programs=reports,
        state_bytes=_state_bytes(setup.abstract), train_step_shares=_train_step_shares(config, setup.train_steps),
        data_note=data_note)
    if "eval_step" in reports:
        every = config.eval_every_steps or setup.steps_per_epoch
        result.evaluations = setup.total_steps // every + (setup.total_steps % every > 0)
        eval_examples = eval_examples or _eval_examples(config)
        result.eval_batches = -(-eval_examples // config.eval_batch_size) if eval_examples else 0
    if not result.fits and suggest > 0:
        result.suggestions = _suggestions(config, topo, num_examples, result, suggest)
    if dump:
        with open(os.path.join(dump, "plan.json"), "w") as f:
            json.dump(as_dict(result), f, indent=1)
    return result


def _train_step_shares(config, names) -> dict[str, float]:
    """The fraction of the steps each train step program runs: all of them, or with `input.image_sizes` each
    size's share of the list (the largest size is "train_step", the others "train_step_<size>")."""
    sizes = list(config.input.get("image_sizes", ()) or ())
    if len(names) == 1 or not sizes:
        return {names[0]: 1.0}
    size_of = {name: max(sizes) if name == "train_step" else int(name.rsplit("_", 1)[1]) for name in names}
    return {name: sizes.count(size) / len(sizes) for name, size in size_of.items()}


def _state_bytes(abstract) -> int:
    """Bytes of the train state on one device, from its leaves' shapes and shardings."""
    import jax

    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def _eval_examples(config) -> int | None:
    from mae_jax import datasets

    if config.input.dataset == "synthetic":
        return int(config.input.synthetic_num_eval_examples)
    try:
        return datasets.get_builder(config.input).info.splits[config.input.eval_split].num_examples
    except (ValueError, KeyError):
        return None


def _candidates(config, result: Plan) -> list[dict[str, Any]]:
    """Single changes that lower the train step's memory, cheapest in speed first; FSDP first when the train
    state alone fills half the memory (activations are not the problem then)."""
    report = result.programs["train_step"]
    need = report.total_bytes or 2 * report.hbm_bytes
    shortfall = max(need / report.hbm_bytes, 1.0)
    times = 2 ** math.ceil(math.log2(shortfall + 0.25))
    per_device = config.batch_size // result.num_devices
    candidates = []
    remat = config.model.get("remat", "none")
    for policy in ("dots", "full"):
        if remat != policy and not (remat == "full"):
            candidates.append({"model.remat": policy})
    if config.get("task", "pretrain") == "pretrain":
        for accum in sorted({times, 2 * times}):
            if per_device % accum == 0 and accum > config.grad_accum_steps:
                candidates.append({"grad_accum_steps": accum})
    fsdp = result.mesh["fsdp"]
    sharded = [{"mesh.fsdp": size} for size in (2, 4, 8, 16)
               if size > fsdp and result.num_devices % size == 0 and size >= fsdp * 2 * result.state_bytes /
               report.hbm_bytes][:1]
    if per_device % times == 0 and per_device > 1:
        candidates.append({"batch_size": config.batch_size // times})
    return sharded + candidates if result.state_bytes > report.hbm_bytes / 2 else candidates + sharded


def _suggestions(config, topo: Topology, num_examples: int, result: Plan, limit: int) -> list[dict]:
    found = []
    for change in _candidates(config, result):
        variant = copy.deepcopy(config)
        variant.update_from_flattened_dict(change)
        try:
            candidate = plan(variant, topo, num_examples=num_examples, suggest=0, programs=("train_step",))
        except (PlanError, ValueError):
            continue
        if candidate.fits:
            step = candidate.programs["train_step"]
            found.append({"change": change, "total_bytes": step.total_bytes, "seconds": step.seconds,
                          "images_per_sec": candidate.images_per_sec})
            if len(found) >= limit:
                break
    return sorted(found, key=lambda s: s["seconds"])


def as_dict(result: Plan) -> dict:
    out = dataclasses.asdict(result)
    out.update(fits=result.fits, step_seconds=result.step_seconds if "train_step" in result.programs else None,
               images_per_sec=result.images_per_sec if "train_step" in result.programs else None,
               wall_hours=result.wall_seconds / 3600 if "train_step" in result.programs else None)
    return out


# ---------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _override(change: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in change.items())


def shortfall_message(result: Plan) -> str:
    """The one line of a plan that does not fit: what is short, and what fits (measured)."""
    parts = []
    for name, report in result.programs.items():
        if report.fits:
            continue
        if report.error:
            parts.append(f"{name}: the compiler refused it ({report.error})")
        else:
            parts.append(f"{name}: {_gib(report.total_bytes)} GiB per device (temporaries "
                         f"{_gib(report.memory['temporaries'])}), {_gib(report.hbm_bytes)} GiB of HBM")
    fits = "; ".join(f"{_override(s['change'])} ({_gib(s['total_bytes'])} GiB, {s['seconds']:.3f} s/step)"
                     for s in result.suggestions)
    what = f"it fits with {fits}" if fits else "none of remat, gradient accumulation, FSDP or a smaller batch fit " \
        "alone (try a larger slice)" if result.suggestions == [] else ""
    return (f"{result.model} {result.dtype} batch {result.batch_size} does not fit on {result.topology} "
            f"({result.chip}): {'; '.join(parts)}; {what}")


def format_plan(result: Plan) -> str:
    per_device = result.batch_size // result.num_devices
    lines = [
        f"{result.model} {result.dtype}, batch {result.batch_size} ({per_device} per device), mesh "
        f"data={result.mesh['data']} x fsdp={result.mesh['fsdp']} on {result.topology}: {result.num_chips} "
        f"{result.chip} chips, {result.num_devices} devices, {result.num_processes} host"
        f"{'s' if result.num_processes > 1 else ''}",
        f"run: {result.total_steps:,} steps ({result.steps_per_epoch:,} per epoch of {result.num_examples:,} examples"
        f"{'; ' + result.data_note if result.data_note else ''})",
        "",
        f"{'program':<16}{'compile':>9}{'args':>7}{'temp':>7}{'total':>7}{'HBM':>7}  {'TFLOP':>7}"
        f"{'cost model':>12}{'roofline':>10}{'step (s)':>10}",
        f"{'':<16}{'(s)':>9}{'(GiB per device)':>28}  {'/device':>7}{'(s)':>12}{'(s)':>10}",
    ]
    for name, r in result.programs.items():
        if r.error:
            lines.append(f"{name:<16}{r.compile_seconds:>9.0f}  does not fit: {r.error}")
            continue
        cost = "n/a" if r.cost_model_seconds is None else f"{r.cost_model_seconds:.4g}"
        lines.append(f"{name:<16}{r.compile_seconds:>9.0f}{_gib(r.memory['arguments']):>7}"
                     f"{_gib(r.memory['temporaries']):>7}{_gib(r.total_bytes):>7}{_gib(r.hbm_bytes):>7}  "
                     f"{r.flops / 1e12:>7.3f}{cost:>12}{r.roofline_seconds:>10.4f}{r.seconds:>10.4f}"
                     f"{'  (' + r.note + ')' if r.note else ''}{'' if r.fits else '  DOES NOT FIT'}")
    from mae_jax import hlo

    for name, r in result.programs.items():
        if r.collectives:
            lines.append(f"{name} collectives per step: " + hlo.format_collectives(
                hlo.Collective(**c) for c in r.collectives))
        if r.loop_trip_counts:
            lines.append(f"{name} loops (trip counts): {r.loop_trip_counts}")
        if r.peak_by_part:
            parts = ", ".join(f"{part} {size / 2**30:.2f}" for part, size in list(r.peak_by_part.items())[:6])
            lines.append(f"{name} at its memory peak, {r.peak_bytes / 2**30:.2f} GiB of temporaries (GiB): {parts}")
        if r.largest_buffers:
            lines.append(f"{name} largest temporaries: " + "; ".join(
                f"{b['bytes'] / 2**30:.2f} GiB {b['shape']} ({b['op_name']})" for b in r.largest_buffers[:3]))
    if "train_step" in result.programs and result.programs["train_step"].seconds:
        hours = result.wall_seconds / 3600
        evals = f", evaluation included ({result.evaluations} passes)" if result.evaluations else ""
        lines.append(f"estimate: {result.images_per_sec:,.0f} images/s on the slice; the run: {hours:,.1f} h"
                     f"{evals}. XLA's cost-model / roofline estimates, not measurements.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    configure()
    from absl import flags, logging
    from ml_collections import config_flags

    from mae_jax import runtime

    runtime.configure(compilation_cache=False)  # compile times are measured cold
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training configuration file, e.g. configs/vit_large.py.",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x4, v4:4x4x8, v3:8x8, or GPUs, e.g. h100:8, "
                        "a100:2x8; 'help' lists them.",
                        flag_values=flag_values)
    flags.DEFINE_string("dump", None, "Write each program's optimized HLO and plan.json here.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_examples", None, "Training examples (default: the dataset's).", flag_values=flag_values)
    flags.DEFINE_integer("suggest", 2, "When it does not fit: how many fitting settings to find by compiling "
                         "(0: none).", flag_values=flag_values)
    prog = "python -m mae_jax.plan"
    try:
        flag_values(argv)
    except flags.Error as e:
        print(runtime.error_line(prog, e), file=sys.stderr)
        return 2
    if flag_values.topology in (None, "help"):
        print(describe_topologies())
        return 0 if flag_values.topology == "help" else 2
    if flag_values.config is None:
        print(runtime.error_line(prog, "--config is required (e.g. configs/vit_base.py)"), file=sys.stderr)
        return 2
    logging.use_absl_handler()  # (app.run is not used: the flags are this function's own)
    runtime.quiet_logs()
    logging.get_absl_handler().python_handler.stream = sys.stdout
    try:
        topo = topology(flag_values.topology)
        if flag_values.dump:
            os.makedirs(flag_values.dump, exist_ok=True)
        result = plan(flag_values.config, topo, num_examples=flag_values.num_examples, dump=flag_values.dump,
                      suggest=flag_values.suggest)
    except ValueError as e:
        print(runtime.error_line(prog, e), file=sys.stderr)
        return 1
    print(format_plan(result))
    if not result.fits:
        print(runtime.error_line(prog, shortfall_message(result)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
