r"""The digits example: does MAE pretraining help a small ViT classify scikit-learn's handwritten digits?

  python benchmarks/digits.py --workdir /tmp/mae_digits_example            # 3 seeds, the README's table
  python benchmarks/digits.py --workdir /tmp/d --seeds 1 --scale 0.05      # a shrunk run (tests/test_digits.py)

Offline and in one process. One MAE pretrained on the 1,437 training digits (configs/digits_pretrain.py, seed 0,
labels unused; shared by the seeds to keep the example within minutes, so the spread is that of the downstream
runs), then for each seed, on the 360 test digits, the top-1 of
  - a linear probe (configs/digits_linprobe.py) of the MAE-pretrained encoder and of a randomly initialised one,
    with all training labels and with a class-balanced 10% of them (PROBE_LABELS),
  - fine-tuning (configs/digits_finetune.py) from the MAE-pretrained encoder and from a random initialisation,
    same recipe and steps, with all training labels and with a class-balanced 10% of them ("train[:10%]",
    144 digits),
and, as the floor, a logistic regression on the raw pixels with either budget (scikit-learn, deterministic). Prints a markdown table (mean ± std
over the seeds), the wall time and the machine, and writes WORKDIR/results.json. Workdirs of every run stay
under WORKDIR; re-running resumes (finished runs are not repeated).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_jax import runtime  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"all": "train", "10%": "train[:10%]"}  # the train splits of the two label budgets
PROBE_LABELS = ("all", "10%")  # the probes' label budgets
ROWS = (  # (row key, what it is): the table's rows, top to bottom
    ("probe_mae", "linear probe, MAE-pretrained encoder"),
    ("probe_random", "linear probe, random encoder"),
    ("pixels", "logistic regression, raw pixels (floor)"),
    ("finetune_mae", "fine-tuning from the MAE"),
    ("finetune_random", "fine-tuning from random init"),
)


def _scaled(config: ml_collections.ConfigDict, scale: float) -> ml_collections.ConfigDict:
    """The config with its run shortened to `scale` of its steps (at least 2), for quick checks."""
    if scale != 1.0:
        steps = config.total_steps or None
        if steps is None:
            raise ValueError("the digits configs fix total_steps")
        config.total_steps = max(2, int(round(steps * scale)))
    return config


def pretrain(workdir: str, seed: int, scale: float = 1.0, overrides: dict | None = None) -> str:
    """Pretrains configs/digits_pretrain.py (seed `seed`) in workdir/pretrain_s{seed}; returns that workdir."""
    from configs import digits_pretrain
    from mae_jax import trainer

    config = _scaled(digits_pretrain.get_config(), scale)
    config.seed = seed
    config.update_from_flattened_dict(overrides or {})
    path = os.path.join(workdir, f"pretrain_s{seed}")
    trainer.train_and_evaluate(config, path)
    return path


def classify(workdir: str, task: str, seed: int, labels: str, init_from: str | None, scale: float = 1.0,
             overrides: dict | None = None) -> float:
    """Fine-tunes (task "finetune") or probes ("linprobe") in `workdir` with the train split of `labels` (a key
    of LABELS), from `init_from` or a random initialisation; returns the test top-1."""
    from configs import digits_finetune, digits_linprobe
    from mae_jax import loop, trainer

    config = _scaled((digits_finetune if task == "finetune" else digits_linprobe).get_config(), scale)
    config.seed = seed
    config.input.train_split = LABELS[labels]
    config.init_from = init_from or ""
    config.update_from_flattened_dict(overrides or {})
    trainer.train_and_evaluate(config, workdir)
    evals = [r for r in loop.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "eval_top1" in r]
    return float(evals[-1]["eval_top1"])


def raw_pixels(labels: str) -> float:
    """Test top-1 of a logistic regression on the 64 raw pixels of the same digits (the floor)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from mae_jax import datasets

    digits = load_digits()
    split = datasets.digits_split_indices()
    # tfds' "train[:10%]": the first 10%, rounded to the closest example (144 of 1,437).
    train = split["train"][:round(len(split["train"]) / 10)] if labels == "10%" else split["train"]
    x = digits.data / 16.0
    clf = LogisticRegression(max_iter=5000, C=1.0).fit(x[train], digits.target[train])
    return float(clf.score(x[split["test"]], digits.target[split["test"]]))


def run_example(workdir: str, seeds: list[int], scale: float = 1.0, rows: tuple[str, ...] | None = None,
                pretrain_overrides: dict | None = None, overrides: dict | None = None,
                progress: Callable[[str], None] = print) -> dict:
    """Every row of ROWS (or `rows`) for every seed and label budget: {"top1": {row: {labels: [per seed]}},
    "seconds": {row: total}, ...}."""
    rows = rows or tuple(key for key, _ in ROWS)
    top1 = {row: {labels: [] for labels in LABELS} for row in rows}
    seconds = {row: 0.0 for row in (*rows, "pretrain")}
    start = time.perf_counter()
    for labels in LABELS:
        if "pixels" in rows:
            top1["pixels"][labels] = [raw_pixels(labels)] * len(seeds)
    mae = None
    if any(row.endswith("_mae") for row in rows):
        t = time.perf_counter()
        mae = pretrain(workdir, 0, scale, pretrain_overrides)
        seconds["pretrain"] += time.perf_counter() - t
        progress(f"pretraining: {seconds['pretrain']:.0f} s")
    for seed in seeds:
        for row in rows:
            if row == "pixels":
                continue
            task = "linprobe" if row.startswith("probe") else "finetune"
            for labels in PROBE_LABELS if task == "linprobe" else LABELS:
                t = time.perf_counter()
                name = f"{row}_{labels.rstrip('%')}_s{seed}"
                top1[row][labels].append(classify(
                    os.path.join(workdir, name), task, seed, labels, mae if row.endswith("_mae") else None,
                    scale, (overrides or {}).get(task)))
                seconds[row] += time.perf_counter() - t
                progress(f"{name}: test top-1 {top1[row][labels][-1]:.4f}")
    return {"top1": top1, "seconds": seconds, "wall_seconds": time.perf_counter() - start, "seeds": seeds,
            "scale": scale, "machine": machine()}


def machine() -> str:
    """The CPU model (lscpu's, with family/model), the number of cores and the load average."""
    model = platform.processor() or platform.machine()
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        model = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        pass
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def table(results: dict) -> str:
    """The markdown table of test top-1 (mean ± std over the seeds, in %)."""
    lines = ["| test top-1 (%), mean ± std over seeds | all labels (1,437) | 10% of the labels (144) |",
             "|---|---|---|"]
    for row, description in ROWS:
        if row not in results["top1"]:
            continue
        cells = []
        for labels in LABELS:
            values = 100 * np.asarray(results["top1"][row][labels])
            if not len(values):
                cells.append("not run")
                continue
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 and row != "pixels" else ""
            cells.append(f"{values.mean():.1f}{spread}")
        lines.append(f"| {description} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv):
    from absl import flags, logging

    del argv
    FLAGS = flags.FLAGS
    logging.get_absl_handler().python_handler.stream = sys.stdout
    runtime.quiet_logs()
    if FLAGS.verbosity < 1:  # the per-run narration (stages, step lines, summaries): -v 0 keeps it
        logging.set_verbosity(logging.WARNING)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    results = run_example(FLAGS.workdir, list(range(FLAGS.seeds)), FLAGS.scale)
    text = table(results)
    print(text)
    print(f"\nwall time {results['wall_seconds'] / 60:.1f} min on {results['machine']}")
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
    SETTINGS = runtime.configure()  # process-wide settings, before JAX and TensorFlow start
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Directory for every run's workdir and results.json.")
    flags.DEFINE_integer("seeds", 3, "Seeds 0 .. seeds - 1.")
    flags.DEFINE_float("scale", 1.0, "Fraction of every run's steps (e.g. 0.05 for a quick check).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
