"""main.py's flags as a user meets them: --help exits 0 and names the shipped configs; a missing or misspelt
--config is one line of ours (with the closest shipped config, when one is close)."""

import os
import subprocess
import sys

import pytest

from mae_jax import config_lib
from runs import ROOT

pytestmark = pytest.mark.slow  # fresh processes (each imports jax): not in the quick subset


def _main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_exits_0_and_lists_the_shipped_configs_one_line_each():
    configs = config_lib.shipped_configs(os.path.join(ROOT, "configs"))
    width = max(map(len, configs)) + len("configs/")
    for flag in ("--help", "-h"):
        result = _main(flag)
        assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
        lines = result.stdout.splitlines()
        assert lines[0] == "Pretrains, fine-tunes or linearly probes an MAE:"
        for name, summary in configs.items():
            assert [line for line in lines if line.split()[:1] == [f"configs/{name}"]] == \
                [f"  {'configs/' + name:<{width}}  {summary}"], name
        assert "  --workdir: Directory for checkpoints, metrics and TensorBoard events." in lines


def test_missing_and_misspelt_config_are_one_line():
    for args, message in [((), "--config is required: a config file, e.g. --config configs/demo.py (main.py --help "
                               "lists the shipped configs)"),
                          (("--config", "configs/vit_bse.py", "--workdir", "/tmp/w"),
                           "--config configs/vit_bse.py: no such file; did you mean configs/vit_base.py?"),
                          (("--config=config/tiny.py", "--show_config"),
                           "--config config/tiny.py: no such file; did you mean configs/tiny.py?")]:
        result = _main(*args)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [f"main.py: error: {message}"], result.stderr[-2000:]
