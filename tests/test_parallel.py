"""Devices, meshes and processes: the same losses on any of them; FSDP shards what it should."""

import jax
import pytest

from configs import tiny
from mae_jax import trainer
from runs import FIVE_STEPS, free_port, losses, run_main, tiny_setup

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset


@pytest.mark.long
def test_losses_do_not_depend_on_devices_mesh_or_processes(tmp_path):
    runs = {"1 device": run_main(tmp_path / "a", *FIVE_STEPS, devices=1)}
    # 2 x 4 (data x fsdp) on this process's 8 devices: main.py's run of the same overrides, in-process.
    config = tiny.get_config()
    config.update_from_flattened_dict({k[len("--config."):]: int(v) for k, v in (a.split("=") for a in FIVE_STEPS)})
    config.mesh.data, config.mesh.fsdp = 2, 4
    trainer.train_and_evaluate(config, tmp_path / "c")
    port = free_port()
    procs = [run_main(tmp_path / "d", *FIVE_STEPS, devices=4, wait=False, env={
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "over 2 process(es)" in outputs[0][0]
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    reference = losses(tmp_path / "a")
    assert sorted(reference) == [1, 2, 3, 4, 5]
    print("losses on 1 device:", [reference[s] for s in sorted(reference)])
    for name, workdir in [("2 x 4 data x fsdp", "c"), ("2 processes x 4 devices", "d")]:
        other = losses(tmp_path / workdir)
        assert sorted(other) == sorted(reference), name
        diff = max(abs(other[s] - reference[s]) for s in reference)
        print(f"{name}: max |loss - 1-device loss| = {diff:.2e}")
        assert diff < 1e-5, name


def test_fsdp_shards_large_kernels():
    assert jax.device_count() == 8
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    state = tiny_setup(config).init_state()
    kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # [32, 128]
    mu = state.opt_state[0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
    for array in (kernel, mu):
        assert len(array.addressable_shards) == 8
        assert {s.data.shape for s in array.addressable_shards} == {(8, 128)}  # a quarter of the input dim
        # The four fsdp devices of one data row hold the four different slices.
        rows = {s.index[0].start for s in array.addressable_shards}
        assert rows == {0, 8, 16, 24}
    # Small arrays (biases, LayerNorm, tokens) stay replicated.
    bias = state.params["blocks_0"]["mlp"]["fc1"]["bias"]
    assert {s.data.shape for s in bias.addressable_shards} == {(128,)}
