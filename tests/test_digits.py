"""The digits example (benchmarks/digits.py): its pieces on a shrunk setting, its table, its configs.

The full example (3 seeds, minutes) is never run here; `--scale` shortens every run to a few steps.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from runs import ROOT, read_metrics, run_main, xla_flags

sys.path.insert(0, ROOT)

from benchmarks import digits  # noqa: E402


def test_table_has_a_row_per_protocol_and_mean_and_spread_per_label_budget():
    top1 = {row: {"all": [0.9, 0.92, 0.94], "10%": [0.5, 0.6, 0.7]} for row, _ in digits.ROWS}
    top1["pixels"] = {"all": [0.96] * 3, "10%": [0.8] * 3}
    lines = digits.table({"top1": top1}).splitlines()
    assert lines[0].startswith("| test top-1 (%)") and lines[1] == "|---|---|---|"
    assert len(lines) == 2 + len(digits.ROWS)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["linear probe, MAE-pretrained encoder"] == ["92.0 ± 2.0", "60.0 ± 10.0 |"]
    assert rows["logistic regression, raw pixels (floor)"] == ["96.0", "80.0 |"]  # deterministic: no spread
    top1["probe_random"]["10%"] = []
    assert "| linear probe, random encoder | 92.0 ± 2.0 | not run |" in digits.table({"top1": top1})


def test_raw_pixel_floor_uses_the_datasets_split():
    full, tenth = digits.raw_pixels("all"), digits.raw_pixels("10%")
    assert 0.93 < full < 1.0  # scikit-learn's digits: a linear model on 64 pixels is already good
    assert 0.7 < tenth < full


def test_configs_share_the_encoder_so_pretraining_loads():
    from configs import digits_finetune, digits_pretrain

    encoder = ("image_size", "patch_size", "embed_dim", "depth", "num_heads")
    pretrain, finetune = digits_pretrain.get_config(), digits_finetune.get_config()
    for name in encoder:
        assert tuple(np.atleast_1d(pretrain.model[name])) == tuple(np.atleast_1d(finetune.model[name])), name
    for config in (pretrain, finetune):
        assert config.input.dataset == "digits" and config.input.eval_split == "test" and config.input.hflip == 0
    assert finetune.input.labels and finetune.total_steps > 0
    with pytest.raises(ValueError, match="total_steps"):
        digits._scaled(_without_steps(), 0.1)


def _without_steps():
    from configs import digits_finetune

    config = digits_finetune.get_config()
    config.total_steps = 0
    return config


@pytest.mark.slow
@pytest.mark.long
def test_example_command_runs_shrunk_and_writes_the_table(tmp_path):
    """The README's command, `python benchmarks/digits.py`, at 2% of the steps and 1 seed."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.run([sys.executable, "benchmarks/digits.py", "--workdir", str(tmp_path), "--seeds", "1",
                           "--scale", "0.02"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(digits.ROWS), proc.stdout
    assert any(line.startswith("wall time ") and " min on " in line for line in lines), proc.stdout
    results = json.load(open(tmp_path / "results.json"))
    for row, _ in digits.ROWS:
        for labels in digits.LABELS:
            values = results["top1"][row][labels]
            if row.startswith("probe") and labels not in digits.PROBE_LABELS:
                assert values == [], (row, labels)
                continue
            assert len(values) == 1 and 0.0 <= values[0] <= 1.0, (row, labels, values)
    # Every run has its workdir; the fine-tunes from the MAE started from seed 0's pretraining.
    assert (tmp_path / "pretrain_s0" / "metrics.jsonl").exists()
    evals = [r for r in read_metrics(tmp_path / "finetune_mae_10_s0") if "eval_top1" in r]
    assert evals and evals[-1]["eval_top1"] == results["top1"]["finetune_mae"]["10%"][0]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.long
def test_main_commands_of_the_digits_configs(tmp_path):
    """The README's single-run commands: configs/digits_pretrain.py (in-process), then configs/digits_finetune.py
    and configs/digits_linprobe.py from its workdir with main.py (a few steps each)."""
    few = ("--config.total_steps=3", "--config.log_every_steps=1")
    from configs import digits_pretrain
    from mae_jax import trainer

    config = digits_pretrain.get_config()  # in-process: the first command, shortened as the others
    config.total_steps, config.log_every_steps = 3, 1
    trainer.train_and_evaluate(config, tmp_path / "pt")
    for config in ("configs/digits_finetune.py", "configs/digits_linprobe.py"):
        proc = run_main(tmp_path / os.path.basename(config), *few, f"--config.init_from={tmp_path / 'pt'}",
                        "--config.input.train_split=train[:10%]", config=config)
        assert proc.returncode == 0, (config, proc.stderr[-3000:])
        evals = [r for r in read_metrics(tmp_path / os.path.basename(config)) if "eval_top1" in r]
        assert [r["step"] for r in evals] == [3] and 0 <= evals[0]["eval_top1"] <= 1
