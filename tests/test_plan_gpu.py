"""Planning for GPUs without a GPU (mae_jax/plan.py): JAX's CUDA plugin compiles the run's real programs for H100
and A100 hosts described by XLA's target descriptions, on a machine with no GPU and no driver. The compiling tests
skip unless the plugin and CUDA's ptxas are installed (pip install -e '.[gpu]'); the HLO traffic count and the
refusals run everywhere. Tiny models only: each GPU compile takes 10-20 s here."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from configs import finetune_tiny, tiny
from mae_jax import config_lib, hlo, plan, trainer
from runs import ROOT, count_cpu_only_barriers

plan.configure()


def _gpu_missing() -> str | None:
    plugin = plan._cuda_plugin()
    if plugin is None:
        return "JAX's CUDA plugin compiles for GPUs without one: pip install -e '.[gpu]' (not installed)"
    if not plan._ptxas_found(plugin):
        return "CUDA's ptxas and libdevice are missing: pip install nvidia-cuda-nvcc-cu12 (the gpu extra)"
    return None


needs_gpu_compiler = pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))


# --------------------------------------------------------------------------------------------------------
# Runs everywhere: HBM traffic read from HLO, names and what is missing.
# --------------------------------------------------------------------------------------------------------

_MODULE = """HloModule m, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused_tanh (param_0: f32[64,256]) -> f32[64,256] {
  %param_0 = f32[64,256]{1,0} parameter(0)
  ROOT %tanh.1 = f32[64,256]{1,0} tanh(%param_0)
}

%body (p: (s32[], f32[64,256])) -> (s32[], f32[64,256]) {
  %p = (s32[], f32[64,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x.1 = f32[64,256]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y.1 = f32[64,256]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_tanh
  ROOT %t = (s32[], f32[64,256]{1,0}) tuple(%next, %y.1)
}

%cond (p.1: (s32[], f32[64,256])) -> pred[] {
  %p.1 = (s32[], f32[64,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[64,128], b: f32[128,256]) -> f32[64,256] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = f32[128,256]{1,0} parameter(1)
  %gemm = (f32[64,256]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %out = f32[64,256]{1,0} get-tuple-element(%gemm), index=0
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,256]{1,0}) tuple(%zero, %out)
  %loop = (s32[], f32[64,256]{1,0}) while(%init), condition=%cond, body=%body
  %x.2 = f32[64,256]{1,0} get-tuple-element(%loop), index=1
  %ar = f32[64,256]{1,0} all-reduce-start(%x.2), to_apply=%add
  ROOT %ard = f32[64,256]{1,0} all-reduce-done(%ar)
}
"""


def test_kernel_traffic_counts_each_kernel_once_per_run():
    """The gemm reads a and b and writes its result (not cuBLAS's 4 MiB workspace); the loop's fusion reads and
    writes 64 KiB on each of its 3 trips (the tanh inside it is not a kernel of its own), and so does the counter;
    the all-reduce counts at its start."""
    gemm = 64 * 128 * 4 + 128 * 256 * 4 + 64 * 256 * 4
    loop = 3 * (2 * 64 * 256 * 4 + 3 * 4)
    all_reduce = 2 * 64 * 256 * 4
    assert hlo.kernel_traffic(_MODULE) == gemm + loop + all_reduce


def test_gpu_names_and_what_is_missing_are_one_line(monkeypatch, capsys):
    for name in ("h100:0", "h100:2x", "h100:8x8x8", "h200:8"):
        with pytest.raises(plan.PlanError, match="expected") as error:
            plan.topology(name)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(plan, "_cuda_plugin", lambda: None)
    with pytest.raises(plan.PlanError, match=r"needs JAX's CUDA plugin.*pip install -e \"\.\[gpu\]\""):
        plan.topology("h100:8")
    monkeypatch.setattr(plan, "_cuda_plugin", lambda: "jax_cuda12_plugin")
    monkeypatch.setattr(plan, "_ptxas_found", lambda plugin: False)
    with pytest.raises(plan.PlanError, match="needs CUDA's ptxas and libdevice: pip install nvidia-cuda-nvcc-cu12"):
        plan.topology("a100:2x8")
    assert plan.main(["plan", "--topology", "help"]) == 0
    out = capsys.readouterr().out
    assert "h100:8" in out and "a100:2x8" in out


def test_gpu_memory_is_what_jax_allocates(monkeypatch):
    """JAX's allocator takes 75% of a GPU's memory unless XLA_CLIENT_MEM_FRACTION says otherwise; float32
    matmuls run at the TF32 peak (JAX's default precision), bfloat16 ones at the bf16 peak."""
    h100 = plan.GPUS["h100"]
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert h100.usable_bytes() == 0.75 * 84_978_434_048
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")
    assert h100.usable_bytes() == 0.9 * 84_978_434_048
    assert (h100.matmul_tflops("float32"), h100.matmul_tflops("bfloat16")) == (495, 989)
    assert plan.CHIPS["v5e"].matmul_tflops("float32") == plan.CHIPS["v5e"].bf16_tflops


# --------------------------------------------------------------------------------------------------------
# With the CUDA plugin: hosts of GPUs and the programs compiled for them.
# --------------------------------------------------------------------------------------------------------


@needs_gpu_compiler
@pytest.mark.parametrize("name,devices,hosts,kind", [("h100:8", 8, 1, "NVIDIA H100 80GB HBM3"),
                                                      ("a100:2x8", 16, 2, "NVIDIA A100-SXM4-80GB")])
def test_gpu_hosts_are_described_without_a_gpu(name, devices, hosts, kind):
    """Compile-only devices of the described GPU, grouped by host; every host's devices hold the block of the
    batch its input pipeline reads (data parallel and FSDP within a host)."""
    from mae_jax import parallel

    topo = plan.topology(name)
    assert (len(topo.devices), topo.num_processes, topo.platform) == (devices, hosts, "gpu")
    assert {d.device_kind for d in topo.devices} == {kind}
    for fsdp in (1, 4):
        mesh = parallel.create_mesh(topo.devices, -1, fsdp)
        parallel.check_batch_layout(mesh, 256)
        rows = [parallel.process_batch_rows(parallel.batch_sharding(mesh), 256, p) for p in range(hosts)]
        assert rows == [(p * 256 // hosts, (p + 1) * 256 // hosts) for p in range(hosts)]


@pytest.mark.slow
@needs_gpu_compiler
def test_tiny_pretraining_compiles_for_h100_with_cublas_and_tf32_roofline(tmp_path):
    """The train step compiled for Hopper (sm_90a PTX) with cuBLAS GEMMs, the generic ops (none of XLA:CPU's
    barriers), its gradients all-reduced in float32; the step time is the roofline with float32 at TF32's peak
    and the bytes read from the HLO."""
    config = tiny.get_config()
    config.update_from_flattened_dict({"batch_size": 32, "visualize_every_steps": 0})
    topo = plan.topology("h100:8")
    result = plan.plan(config, topo, suggest=0, dump=str(tmp_path), programs=("train_step",))
    report = result.programs["train_step"]
    assert result.fits and 0 < report.total_bytes < report.hbm_bytes == 0.75 * 84_978_434_048
    assert report.cost_model_seconds is None and report.note == "no cost-model figure: roofline"
    assert report.flops > 0 and report.bytes_accessed > 0
    assert report.seconds == report.roofline_seconds == max(report.flops / 495e12, report.bytes_accessed / 3350e9)
    assert {(c["kind"], c["dtype"]) for c in report.collectives} == {("all-reduce", "f32")}
    text = (tmp_path / "train_step.hlo.txt").read_text()
    assert "__cublas$lt$matmul" in text and "__triton_gemm" not in text
    ptx = list((tmp_path / "train_step").glob("*.ptx"))
    assert ptx and all(".target sm_90a" in f.read_text() for f in ptx)
    config_lib.resolve(config)
    task = trainer.task_class(config)(config, topo.platform)
    assert task.model.ops == "generic"
    setup = trainer.build(config, task, topo.devices, 160)
    assert count_cpu_only_barriers(setup.programs["train_step"].lower().as_text()) == 0


@pytest.mark.slow
@needs_gpu_compiler
def test_bfloat16_fsdp_finetuning_compiles_for_two_a100_hosts(tmp_path):
    """Fine-tuning in bfloat16 with FSDP over 4 GPUs on 2 hosts of 8 A100s (sm_80): the gradients reach their
    shards by reduce-scatter in float32, the parameters travel in bfloat16; train and eval steps both fit."""
    config = finetune_tiny.get_config()
    config.update_from_flattened_dict({"batch_size": 32, "eval_batch_size": 32, "model.dtype": "bfloat16",
                                       "mesh.fsdp": 4})
    result = plan.plan(config, plan.topology("a100:2x8"), suggest=0, dump=str(tmp_path))
    assert result.fits and (result.num_devices, result.num_processes) == (16, 2)
    assert sorted(result.programs) == ["eval_step", "train_step"]
    train = result.programs["train_step"]
    assert train.seconds == max(train.flops / 312e12, train.bytes_accessed / 2039e9) > 0
    kinds = {(c["kind"], c["dtype"]) for c in train.collectives}
    assert ("reduce-scatter", "f32") in kinds and ("all-gather", "bf16") in kinds, kinds
    assert {dtype for kind, dtype in kinds if kind in ("all-reduce", "reduce-scatter")} == {"f32"}, kinds
    ptx = list((tmp_path / "train_step").glob("*.ptx"))
    assert ptx and all(".target sm_80" in f.read_text() for f in ptx)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["topology"] == "a100:2x8" and saved["chip"] == "A100 SXM4 80GB"


@pytest.mark.slow
@needs_gpu_compiler
def test_command_line_plans_for_gpus_quietly(tmp_path):
    """In a fresh process (where the CUDA libraries' start-up lines would go): the table and nothing else on
    stderr; the CUDA plugin's "Could not find cuda drivers" lines are hidden."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "mae_jax.plan", "--config", "configs/tiny.py", "--topology", "h100:1",
         "--config.batch_size=16", "--config.visualize_every_steps=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on h100:1: 1 H100 SXM chips, 1 devices, 1 host" in result.stdout, result.stdout
    assert "train_step" in result.stdout and "no cost-model figure: roofline" in result.stdout
    assert result.stderr == "", result.stderr[-3000:]
    if ctypes.util.find_library("cuda"):
        return  # a CUDA driver: the plugin's own start-up check would pass
    # With JAX_PLATFORMS naming CUDA the plugin checks the CUDA libraries, fails and is not registered.
    env["JAX_PLATFORMS"] = "cpu,cuda"
    result = subprocess.run([sys.executable, "-m", "mae_jax.plan", "--config", "configs/tiny.py", "--topology",
                             "h100:8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and "JAX's CUDA plugin did not start" in result.stderr, result.stderr
