r"""Times the project's real train step (and, with --compare torch, the PyTorch reference) on this machine.

  python benchmarks/train_step.py --config configs/vit_base.py --config.batch_size=8
  python benchmarks/train_step.py --config configs/vit_base.py --config.batch_size=8 --compare torch
  python benchmarks/train_step.py --config configs/vit_base.py --config.batch_size=8 --compare unmasked

Prints one JSON line. The JAX figures: images/s, seconds per step (median, min, max), compile seconds,
model FLOPs per image (XLA's cost analysis of the step as written: blocks unrolled, no remat), achieved
FLOP/s, this machine's measured float32 matmul peak (a 2048 x 2048 `jnp.dot`) and their ratio (MFU), the
compiled step's memory analysis, and peak host memory. With `--compare torch`, Hugging Face `ViTMAEForPreTraining` + `torch.optim.AdamW`
run on the same shapes; JAX and PyTorch run in separate processes (one process slows the other),
alternating `--rounds` times, and the ratio of the medians is reported. `--compare unmasked` does the same
against our own step at mask ratio 0 (the encoder sees every patch): the speed-up MAE gets from masking.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402  (standard library only: JAX is imported by the JAX worker)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/vit_base.py", "Training configuration.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps per run (after --warmup untimed steps).")
flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones (the first runs the compiled code cold).")
flags.DEFINE_enum("compare", None, ["torch", "unmasked"],
                  "Also time the PyTorch reference (torch) or the same step at mask ratio 0 (unmasked).")
flags.DEFINE_integer("rounds", 3, "With --compare: alternating runs of each.")
flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: time one framework in this process.")


def time_jax(config, steps: int, warmup: int) -> dict:
    from mae_jax import runtime

    # What main.py applies, except the compilation cache (compile_seconds is a cold compile).
    settings = runtime.configure(compilation_cache=False)
    import jax
    import numpy as np

    from mae_jax import input_pipeline, parallel

    config.input.dataset = "synthetic"
    setup = common.build(config)
    model, program = setup.task.model, setup.programs["train_step"]
    state = setup.init_state()
    start = time.perf_counter()
    step = program.lower().compile()
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()
    batch = next(input_pipeline.create_train_iterator(
        config.input, image_shape=model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
        process_index=0, process_count=1))
    images = {"images": parallel.global_batch(batch["images"], parallel.batch_sharding(setup.mesh))}
    metrics = None

    def one_step():
        nonlocal state, metrics
        state, metrics = step(state, images)
        jax.block_until_ready(state)

    # The step never touches the host: any transfer inside this block would raise.
    with jax.transfer_guard("disallow_explicit"):
        times = common.time_calls(one_step, steps, warmup)
    loss = float(jax.device_get(metrics["loss"]))
    assert np.isfinite(loss)
    median = statistics.median(times)
    flops_per_step = common.model_flops_per_step(config)
    peak = common.matmul_peak_flops()
    return {
        "framework": "jax",
        **common.step_stats(times, config.batch_size),
        "devices": jax.device_count(),
        "compile_seconds": compile_seconds,
        "flops_per_image": flops_per_step / config.batch_size,
        "achieved_flops_per_sec": flops_per_step / median,
        "matmul_peak_flops_per_sec": peak,
        "mfu": flops_per_step / median / peak,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "peak_host_memory_mb": common.peak_host_memory_mb(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory": settings.host_memory,  # mae_jax/host_memory.py (MAE_JAX_KEEP_HOST_MEMORY=0: off)
        "model": {k: config.model.get(k) for k in ("embed_dim", "depth", "patch_size", "mask_ratio", "dtype",
                                                    "attention", "ops", "remat", "scan_blocks")},
    }


def time_torch(config, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    m = config.model
    height, width = (m.image_size, m.image_size) if isinstance(m.image_size, int) else m.image_size
    hf_config = transformers.ViTMAEConfig(
        image_size=height, patch_size=m.patch_size, num_channels=m.num_channels, hidden_size=m.embed_dim,
        num_hidden_layers=m.depth, num_attention_heads=m.num_heads, intermediate_size=int(m.embed_dim * m.mlp_ratio),
        decoder_hidden_size=m.decoder_embed_dim, decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio), mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss, layer_norm_eps=m.layer_norm_eps)
    model = transformers.ViTMAEForPreTraining(hf_config).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(config.b1, config.b2))
    pixels = torch.randn(config.batch_size, m.num_channels, height, width)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        model(pixels).loss.backward()
        optimizer.step()

    times = common.time_calls(one_step, steps, warmup)
    return {
        "framework": "torch",
        **common.step_stats(times, config.batch_size),
        "attention": model.config._attn_implementation,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_host_memory_mb": common.peak_host_memory_mb(),
    }


def _run_worker(framework: str, extra: tuple[str, ...] = ()) -> dict:
    return common.run_worker(os.path.abspath(__file__), [
        f"--worker={framework}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
        f"--config={FLAGS['config'].config_filename}", *common.config_overrides(sys.argv), *extra])


# What --compare times against the project's step: (worker, extra config overrides).
BASELINES = {"torch": ("torch", ()), "unmasked": ("jax", ("--config.model.mask_ratio=0.0",))}


def main(argv):
    del argv
    if FLAGS.worker == "jax":
        print(json.dumps(time_jax(FLAGS.config, FLAGS.steps, FLAGS.warmup)))
        return
    if FLAGS.worker == "torch":
        print(json.dumps(time_torch(FLAGS.config, FLAGS.steps, FLAGS.warmup)))
        return
    if FLAGS.compare is None:
        print(json.dumps({"cpu": common.cpu_info(), **_run_worker("jax")}))
        return
    runs = common.alternate(FLAGS.rounds, {"jax": lambda: _run_worker("jax"),
                                           FLAGS.compare: lambda: _run_worker(*BASELINES[FLAGS.compare])})
    ips = {name: common.median_of(rs) for name, rs in runs.items()}
    print(json.dumps({
        "cpu": common.cpu_info(),
        "jax_images_per_sec": ips["jax"],
        f"{FLAGS.compare}_images_per_sec": ips[FLAGS.compare],
        f"speedup_vs_{FLAGS.compare}": ips["jax"] / ips[FLAGS.compare],
        "jax_runs": [r["images_per_sec"] for r in runs["jax"]],
        f"{FLAGS.compare}_runs": [r["images_per_sec"] for r in runs[FLAGS.compare]],
        "jax": max(runs["jax"], key=lambda r: r["images_per_sec"]),
        FLAGS.compare: max(runs[FLAGS.compare], key=lambda r: r["images_per_sec"]),
    }))


if __name__ == "__main__":
    app.run(main)
