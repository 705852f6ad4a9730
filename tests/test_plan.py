"""Planning for TPU slices without a TPU (mae_jax/plan.py): the run's real programs compiled for topologies by
libtpu, what their HLO holds (no CPU-only ops, reduce-scatter under FSDP, float32 cross-device sums in bfloat16),
the batch layout of every host of multi-host slices, the refusal of a config that cannot fit, the command line.
Tiny models only: each TPU compile takes seconds."""

import json
import os

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

pytest.importorskip("libtpu", reason="libtpu compiles for TPUs (pip install -e '.[tpu]', as .ci/run does)")

from configs import finetune_tiny, linprobe_tiny, tiny  # noqa: E402
from mae_jax import config_lib, parallel, plan, trainer  # noqa: E402
from runs import count_cpu_only_barriers  # noqa: E402

plan.configure()  # libtpu's quiet settings, before the first topology is made

CONFIGS = {"pretrain": tiny, "finetune": finetune_tiny, "linprobe": linprobe_tiny}
REDUCTIONS = ("all-reduce", "reduce-scatter")


@pytest.fixture(scope="module")
def topologies():
    return {name: plan.topology(name) for name in ("v5e:2x2", "v4:2x2x2")}


def _config(task: str, **fields):
    config = CONFIGS[task].get_config()
    config.update_from_flattened_dict(fields)
    return config


# --------------------------------------------------------------------------------------------------------
# Hosts and their rows of the batch.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v5e:4x4", "v5p:4x4x8", "v3:8x8", "v4:4x4x8"])
def test_every_host_feeds_exactly_the_rows_its_devices_hold(name):
    """The mesh lays each process's devices out together, so every host's block of the batch is the block its
    input pipeline reads, on single- and multi-host slices, pure data parallel and with FSDP; checked for every
    process index. The layout JAX would choose for the topology alone fails this (so the check can fail)."""
    topo = plan.topology(name)
    assert topo.num_processes > 1
    for fsdp in (1, 4):
        mesh = parallel.create_mesh(topo.devices, -1, fsdp)
        parallel.check_batch_layout(mesh, 4096)
        rows = [parallel.process_batch_rows(parallel.batch_sharding(mesh), 4096, p) for p in range(topo.num_processes)]
        assert rows == [(p * 4096 // topo.num_processes, (p + 1) * 4096 // topo.num_processes)
                        for p in range(topo.num_processes)]
    physical = jax.sharding.Mesh(mesh_utils.create_device_mesh(
        (len(topo.devices), 1), topo.devices, allow_split_physical_axes=True), parallel.MESH_AXES)
    if name in ("v5e:4x4", "v5p:4x4x8"):  # the finding: a pod would stop at start-up
        with pytest.raises(ValueError, match="its input pipeline reads rows"):
            parallel.check_batch_layout(physical, 4096)


# --------------------------------------------------------------------------------------------------------
# The programs, compiled for a single-host and a multi-host slice.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe"])
@pytest.mark.parametrize("name", ["v5e:2x2", "v4:2x2x2"])
def test_tiny_steps_compile_for_tpu_without_cpu_only_ops(topologies, task, name):
    topo = topologies[name]
    config = _config(task, batch_size=32, **({} if task == "pretrain" else {"eval_batch_size": 32}))
    programs = ("train_step", "eval_step") if (task, name) == ("finetune", "v4:2x2x2") else ("train_step",)
    result = plan.plan(config, topo, suggest=0, programs=programs)
    assert result.fits and sorted(result.programs) == sorted(programs)
    assert (result.num_processes, result.num_devices) == ((2, 8) if name == "v4:2x2x2" else (1, 4))
    for report in result.programs.values():
        assert 0 < report.total_bytes < report.hbm_bytes and report.flops > 0 and report.seconds > 0
    # The ops follow the mesh's platform (a TPU), not the CPU this runs on: none of xla_cpu's barriers.
    config_lib.resolve(config)
    task_obj = trainer.task_class(config)(config, "tpu")
    assert task_obj.model.ops == "generic"
    setup = trainer.build(config, task_obj, topo.devices, 160)
    assert count_cpu_only_barriers(setup.programs["train_step"].lower().as_text()) == 0
    if task != "linprobe":  # (the probe has no backward through the blocks, where the barriers are)
        cpu = trainer.build(config, trainer.task_class(config)(config, "cpu"), jax.devices()[:4], 160)
        assert count_cpu_only_barriers(cpu.programs["train_step"].lower().as_text()) > 0  # what the check finds


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_bfloat16_fsdp_reduces_in_float32_with_reduce_scatter(topologies, task):
    """bfloat16 compute, float32 parameters: every cross-device sum is float32; under FSDP the gradients reach
    their shards by reduce-scatter (also inside a scan over blocks); the gathered parameters travel in bfloat16."""
    for scan in (False, True):
        config = _config(task, batch_size=32, **{"model.dtype": "bfloat16", "mesh.fsdp": 4,
                                                 "model.scan_blocks": scan})
        result = plan.plan(config, topologies["v5e:2x2"], suggest=0, programs=("train_step",))
        collectives = result.programs["train_step"].collectives
        kinds = {(c["kind"], c["dtype"]) for c in collectives}
        assert ("reduce-scatter", "f32") in kinds, (scan, kinds)
        assert {dtype for kind, dtype in kinds if kind in REDUCTIONS} == {"f32"}, (scan, kinds)
        assert ("all-gather", "bf16") in kinds, (scan, kinds)
        assert any(n > 1 for n in result.programs["train_step"].loop_trip_counts) == scan


@pytest.mark.slow
def test_bfloat16_data_parallel_sums_float32_gradients(topologies):
    """Without FSDP the gradients are all-reduced, in float32 (flax's Dense would sum bfloat16 ones)."""
    result = plan.plan(_config("pretrain", batch_size=32, **{"model.dtype": "bfloat16"}), topologies["v5e:2x2"],
                       suggest=0, programs=("train_step",))
    kinds = {(c["kind"], c["dtype"]) for c in result.programs["train_step"].collectives}
    assert kinds and {dtype for kind, dtype in kinds if kind in REDUCTIONS} == {"f32"}, kinds


# --------------------------------------------------------------------------------------------------------
# What does not fit; the command line.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_config_that_cannot_fit_is_refused_with_what_fits(topologies):
    """A 1.6-billion-parameter encoder, its AdamW state replicated on every v5e chip (19 GiB of 16): the plan
    names the shortfall and a setting that fits, found by compiling it (FSDP over the 4 chips), in one line."""
    config = _config("pretrain", batch_size=32, **{"model.embed_dim": 4096, "model.num_heads": 32,
                                                   "model.depth": 8, "visualize_every_steps": 0})
    result = plan.plan(config, topologies["v5e:2x2"], suggest=1, programs=("train_step",))
    assert not result.fits and result.state_bytes > 16 * 2**30
    message = plan.shortfall_message(result)
    assert "\n" not in message and "does not fit on v5e:2x2" in message, message
    assert result.suggestions and "it fits with --config.mesh.fsdp=" in message, message
    assert result.suggestions[0]["total_bytes"] < result.programs["train_step"].hbm_bytes


@pytest.mark.slow
def test_command_line_prints_the_table_and_dumps(tmp_path, capsys):
    code = plan.main(["plan", "--config", "configs/tiny.py", "--topology", "v5e:2x2", "--config.batch_size=32",
                      f"--dump={tmp_path}", "--config.visualize_every_steps=0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "train_step" in out.out and "estimate:" in out.out and "not measurements" in out.out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["topology"] == "v5e:2x2" and saved["fits"] and saved["programs"]["train_step"]["flops"] > 0
    assert "HloModule" in (tmp_path / "train_step.hlo.txt").read_text()
    step = saved["programs"]["train_step"]
    assert step["largest_buffers"]  # from the dumped buffer assignment
    # What fills the memory at its peak (XLA's live ranges), by part of the model: the buffers add up to it.
    assert step["peak_by_part"] and sum(step["peak_by_part"].values()) == step["peak_bytes"] > 0
    assert any(part.startswith(("encoder", "decoder")) for part in step["peak_by_part"])
    assert "at its memory peak" in out.out


def test_plans_compile_past_the_persistent_compilation_cache(topologies):
    """A deviceless TPU executable read back from JAX's persistent cache fails with a warning ("PjRtCompiler must
    be constructed with a Client") on a second plan in one process (a notebook, these tests): plans skip the
    cache, and CPU programs compiled afterwards are cached as before."""
    import warnings

    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(np.array(topologies["v5e:2x2"].devices), ("d",))
    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # two jits of one program: the second would find the first's cache entry
                step = jax.jit(lambda x: x * 2 + 1, in_shardings=NamedSharding(mesh, PartitionSpec("d")))
                with plan._past_the_compilation_cache():
                    step.lower(jax.ShapeDtypeStruct((8, 128), np.float32)).compile()
        assert not [w for w in caught if "compilation cache" in str(w.message)], [str(w.message) for w in caught]
        cache = jax.config.jax_compilation_cache_dir
        before = set(os.listdir(cache))
        jax.jit(lambda x: x * 3 - 0.5)(np.float32(1)).block_until_ready()
        assert set(os.listdir(cache)) - before  # the CPU program went into the cache
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)


def test_topology_help_and_bad_names(capsys):
    assert plan.main(["plan", "--topology", "help"]) == 0
    out = capsys.readouterr().out
    for generation in plan.CHIPS:
        assert f"{generation}:" in out
    with pytest.raises(plan.PlanError, match="expected <generation>:<shape>"):
        plan.topology("v9:2x2")
    assert np.isclose(plan.CHIPS["v3"].per_device(plan.CHIPS["v3"].hbm_gib), 16)
