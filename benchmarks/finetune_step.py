r"""Times the fine-tuning train step and the evaluation step (and, with --compare torch, Hugging Face's).

  python benchmarks/finetune_step.py --config configs/finetune_vit_base.py --config.batch_size=8 \
      --config.model.drop_path_rate=0 --config.mixup=0 --config.cutmix=0 --compare torch
  python benchmarks/finetune_step.py --config configs/finetune_vit_base.py --config.batch_size=8 --task linprobe

The JAX side is what `main.py` compiles for a fine-tuning config (`mae_jax/finetune.py`):
the "train_step" and "eval_step" programs of `trainer.build` (`finetune.Classification`), compiled, on a fresh
state, with random uint8 images and labels (`--num_classes`, 1000), the evaluation on a batch of
`--eval_batch_size` (64). The PyTorch side is `transformers.ViTForImageClassification` of the same shapes
(exact GELU, the config's LayerNorm eps, dropout 0) + `torch.optim.AdamW` (the config's peak lr, betas and
weight decay; no decay on biases, norms, cls token and position table), cross-entropy with the config's label
smoothing, in train mode; evaluation in eval mode under `torch.inference_mode()`. HF's head reads the cls
token of the final LayerNorm, ours (global_pool=True) the mean of the patch tokens through `fc_norm`: the
FLOPs differ by < 0.1%. HF has neither stochastic depth nor Mixup/CutMix: with --compare torch the config
must turn them off (the overrides above), or the run stops.

Prints JSON lines, each with `cpu`: `finetune_train_step` (or `linprobe_train_step`) and `eval_step`. Each
has images/s (the median over `--rounds` alternating runs of each framework in fresh processes), the runs,
and the fastest run's details: seconds per step (median, min, max), compile seconds, FLOPs per image (XLA's
cost analysis of the lowered step with blocks unrolled and no remat), achieved FLOP/s, the float32 matmul
peak measured in the same process (a 2048^3 `jnp.dot`) and MFU, memory.

`--task linprobe` times the linear probe's step instead (`config.task = "linprobe"`, the encoder frozen, a
BatchNorm + linear head trained with LARS) and reports its FLOPs per image next to the fine-tuning step's and
the forward's: the probe should cost about a forward (no encoder backward). A config with
`task = "linprobe"` (configs/linprobe_*.py) is taken as the probe as it is.
"""

import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402  (standard library only: JAX is imported by the JAX worker)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/finetune_vit_base.py", "Fine-tuning configuration.",
                                lock_config=True)
flags.DEFINE_enum("task", "finetune", ["finetune", "linprobe"],
                  "The train step to time: fine-tuning, or the linear probe of the same encoder.")
flags.DEFINE_integer("steps", 10, "Timed train steps per run (after --warmup untimed steps).")
flags.DEFINE_integer("eval_steps", 5, "Timed evaluation steps per run (after --warmup untimed steps).")
flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones (the first runs the compiled code cold).")
flags.DEFINE_integer("eval_batch_size", 64, "Images per evaluation step (config.eval_batch_size).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head (model.num_classes).")
flags.DEFINE_enum("compare", None, ["torch"], "Also time ViTForImageClassification + torch.optim.AdamW.")
flags.DEFINE_integer("rounds", 3, "With --compare: alternating runs of each.")
flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: time one framework in this process.")

PROBE_FIELDS = ("frozen_encoder", "head_batch_norm")  # ViTClassifier fields the linear probe needs


# -------------------------------------------------------------------------------------------------------
# The two configs: the fine-tuning step and the probe of the same encoder.
# -------------------------------------------------------------------------------------------------------


def task_config(config, task: str):
    """`config` (a fine-tuning or probe config) as the fine-tuning step or as the linear probe of its encoder;
    the probe as configs/linprobe_*.py sets it (cls token, BatchNorm head, LARS, no smoothing or mixing)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        if task == "linprobe" and config.task != "linprobe":
            config.task = "linprobe"
            config.model.update(frozen_encoder=True, head_batch_norm=True, global_pool=False, drop_path_rate=0.0)
            config.update(mixup=0.0, cutmix=0.0, label_smoothing=0.0, weight_decay=0.0)
        elif task == "finetune" and config.task != "finetune":
            config.task = "finetune"
            config.model.update({name: False for name in PROBE_FIELDS if name in config.model})
            config.model.global_pool = True
    return config


# -------------------------------------------------------------------------------------------------------
# JAX.
# -------------------------------------------------------------------------------------------------------


def _build(config, num_classes: int):
    """`common.build` of the classification task with `num_classes` classes."""
    with config.unlocked():
        config.model.num_classes = num_classes
    return common.build(config)


def step_flops(config, num_classes: int, program: str = "train_step") -> float:
    """FLOPs of one step as written (`common.model_flops_per_step`), of the task with `num_classes` classes."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.num_classes = num_classes
    return common.model_flops_per_step(config, program)


def time_jax(config, task_name: str, num_classes: int, steps: int, eval_steps: int, warmup: int) -> dict:
    from mae_jax import runtime

    # What main.py applies, except the compilation cache (compile_seconds is a cold compile).
    settings = runtime.configure(compilation_cache=False)
    import jax
    import numpy as np

    from mae_jax import parallel

    config.input.dataset = "synthetic"  # the timed batches are random arrays
    setup = _build(config, num_classes)
    model = setup.task.model
    state = setup.init_state()
    start = time.perf_counter()
    step = setup.programs["train_step"].lower().compile()
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()

    rng = np.random.default_rng(config.seed)
    sharding = parallel.batch_sharding(setup.mesh)

    def random_batch(size: int) -> dict:
        return {"images": parallel.global_batch(rng.integers(0, 256, (size, *model.image_shape), np.uint8), sharding),
                "labels": parallel.global_batch(rng.integers(0, num_classes, size, dtype=np.int32), sharding)}

    batch = random_batch(config.batch_size)
    metrics = None

    def train_step():
        nonlocal state, metrics
        state, metrics = step(state, batch)
        jax.block_until_ready(state)

    # Neither step touches the host: any transfer inside these blocks would raise.
    with jax.transfer_guard("disallow_explicit"):
        train_times = common.time_calls(train_step, steps, warmup)
    loss = float(jax.device_get(metrics["loss"]))
    assert np.isfinite(loss), loss

    start = time.perf_counter()
    evaluate = setup.programs["eval_step"].lower().compile()  # as a run compiles it
    eval_compile_seconds = time.perf_counter() - start
    eval_batch = {**random_batch(config.eval_batch_size),
                  "mask": parallel.global_batch(np.ones(config.eval_batch_size, np.bool_), sharding)}
    sums = None

    def eval_step():
        nonlocal sums
        sums = jax.block_until_ready(evaluate(state.variables, eval_batch))

    with jax.transfer_guard("disallow_explicit"):
        eval_times = common.time_calls(eval_step, eval_steps, warmup)
    assert float(jax.device_get(sums["count"])) == config.eval_batch_size

    # FLOPs (lowering only, nothing compiled) and the peak, measured after the timed steps.
    train_flops = step_flops(config, num_classes) / config.batch_size
    forward_flops = step_flops(config, num_classes, "eval_step") / config.eval_batch_size
    peak = common.matmul_peak_flops()
    train = common.step_stats(train_times, config.batch_size)
    evaluation = common.step_stats(eval_times, config.eval_batch_size)
    train.update({
        "compile_seconds": compile_seconds,
        "flops_per_image": train_flops,
        "achieved_flops_per_sec": train_flops * train["images_per_sec"],
        "matmul_peak_flops_per_sec": peak,
        "mfu": train_flops * train["images_per_sec"] / peak,
        "loss": loss,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
    })
    if task_name == "linprobe":
        finetune_flops = step_flops(task_config(config, "finetune"), num_classes) / config.batch_size
        train.update({"finetune_flops_per_image": finetune_flops, "forward_flops_per_image": forward_flops,
                      "probe_over_forward": train_flops / forward_flops,
                      "probe_over_finetune": train_flops / finetune_flops})
    evaluation.update({
        "compile_seconds": eval_compile_seconds,
        "flops_per_image": forward_flops,
        "achieved_flops_per_sec": forward_flops * evaluation["images_per_sec"],
        "matmul_peak_flops_per_sec": peak,
        "mfu": forward_flops * evaluation["images_per_sec"] / peak,
    })
    return {
        "framework": "jax",
        "train": train,
        "eval": evaluation,
        "devices": jax.device_count(),
        "peak_host_memory_mb": common.peak_host_memory_mb(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory": settings.host_memory,  # mae_jax/host_memory.py (MAE_JAX_KEEP_HOST_MEMORY=0: off)
        "model": {k: config.model.get(k) for k in (
            "embed_dim", "depth", "patch_size", "image_size", "dtype", "attention", "ops", "remat", "scan_blocks",
            "global_pool", "drop_path_rate", *PROBE_FIELDS)},
        "recipe": {k: config.get(k) for k in ("task", "label_smoothing", "mixup", "cutmix", "layer_decay",
                                              "weight_decay")},
    }


# -------------------------------------------------------------------------------------------------------
# PyTorch.
# -------------------------------------------------------------------------------------------------------


def time_torch(config, num_classes: int, steps: int, eval_steps: int, warmup: int, train: bool) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    m = config.model
    image_size = (m.image_size, m.image_size) if isinstance(m.image_size, int) else tuple(m.image_size)
    hf_config = transformers.ViTConfig(
        image_size=image_size[0] if image_size[0] == image_size[1] else image_size, patch_size=m.patch_size,
        num_channels=m.num_channels, hidden_size=m.embed_dim, num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads, intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu",
        layer_norm_eps=m.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=num_classes)
    model = transformers.ViTForImageClassification(hf_config)
    generator = torch.Generator().manual_seed(config.seed)

    def random_batch(size: int):
        return (torch.randn(size, m.num_channels, *image_size, generator=generator),
                torch.randint(0, num_classes, (size,), generator=generator))

    result = {"framework": "torch", "train": None}
    if train:
        model.train()
        # The fine-tuning recipe's weight-decay groups: none for biases, norms, cls token and position table.
        no_decay = lambda name, p: p.ndim <= 1 or "cls_token" in name or "position_embeddings" in name
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": config.weight_decay},
             {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}],
            lr=config.base_lr * config.batch_size / 256, betas=(config.b1, config.b2))
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        pixels, labels = random_batch(config.batch_size)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(pixel_values=pixels).logits, labels).backward()
            optimizer.step()

        result["train"] = common.step_stats(common.time_calls(train_step, steps, warmup), config.batch_size)

    model.eval()
    eval_pixels, _ = random_batch(config.eval_batch_size)

    def eval_step():
        with torch.inference_mode():
            model(pixel_values=eval_pixels).logits

    result["eval"] = common.step_stats(common.time_calls(eval_step, eval_steps, warmup), config.eval_batch_size)
    result.update({"attention": model.config._attn_implementation, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "peak_host_memory_mb": common.peak_host_memory_mb()})
    return result


# -------------------------------------------------------------------------------------------------------
# The driver: workers in fresh processes, alternating; one JSON line per step.
# -------------------------------------------------------------------------------------------------------


def _run_worker(framework: str) -> dict:
    return common.run_worker(os.path.abspath(__file__), [
        f"--worker={framework}", f"--task={FLAGS.task}", f"--steps={FLAGS.steps}",
        f"--eval_steps={FLAGS.eval_steps}", f"--warmup={FLAGS.warmup}", f"--eval_batch_size={FLAGS.eval_batch_size}",
        f"--num_classes={FLAGS.num_classes}", f"--config={FLAGS['config'].config_filename}",
        *common.config_overrides(sys.argv)])


def _line(name: str, part: str, runs: dict[str, list[dict]]) -> dict:
    """The JSON line of one step (`part`: "train" or "eval") from every framework's runs."""
    results = {framework: [r[part] for r in rs if r[part] is not None] for framework, rs in runs.items()}
    results = {framework: rs for framework, rs in results.items() if rs}
    line = {"cpu": common.cpu_info(), "benchmark": name, "batch_size": results["jax"][0]["batch_size"]}
    for framework, rs in results.items():
        line[f"{framework}_images_per_sec"] = common.median_of(rs)
    if "torch" in results:
        line["speedup_vs_torch"] = line["jax_images_per_sec"] / line["torch_images_per_sec"]
    for framework, rs in results.items():
        line[f"{framework}_runs"] = [r["images_per_sec"] for r in rs]
    line["jax_mfu_runs"] = [r["mfu"] for r in results["jax"]]
    for framework, rs in results.items():
        fastest = runs[framework][max(range(len(rs)), key=lambda i: rs[i]["images_per_sec"])]
        line[framework] = {**fastest[part], **{k: v for k, v in fastest.items() if k not in ("train", "eval")}}
    return line


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        config.eval_batch_size = FLAGS.eval_batch_size
    if FLAGS.worker == "jax":
        print(json.dumps(time_jax(task_config(config, FLAGS.task), FLAGS.task, FLAGS.num_classes, FLAGS.steps,
                                  FLAGS.eval_steps, FLAGS.warmup)))
        return
    if FLAGS.worker == "torch":
        print(json.dumps(time_torch(config, FLAGS.num_classes, FLAGS.steps, FLAGS.eval_steps, FLAGS.warmup,
                                    train=FLAGS.task == "finetune")))
        return
    name = f"{FLAGS.task}_train_step"
    if FLAGS.compare == "torch":
        extras = {k: v for k, v in (("model.drop_path_rate", config.model.drop_path_rate), ("mixup", config.mixup),
                                    ("cutmix", config.cutmix)) if v}
        if FLAGS.task == "finetune" and extras:
            raise app.UsageError(
                f"--compare torch: {extras} are on in the JAX step, and ViTForImageClassification has neither "
                "stochastic depth nor Mixup/CutMix; add --config.model.drop_path_rate=0 --config.mixup=0 "
                "--config.cutmix=0")
    workers = {"jax": lambda: _run_worker("jax")}
    if FLAGS.compare == "torch":
        workers["torch"] = lambda: _run_worker("torch")
    runs = common.alternate(FLAGS.rounds if FLAGS.compare else 1, workers)
    print(json.dumps(_line(name, "train", runs)))
    print(json.dumps(_line("eval_step", "eval", runs)))


if __name__ == "__main__":
    app.run(main)
