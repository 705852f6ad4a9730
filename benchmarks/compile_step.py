r"""Compiles the real train step of ViT-B/L/H and reports compile time, FLOPs and per-device memory.

  # compile time on one device, blocks unrolled and scanned (target: ViT-H with scan within 1.5x of ViT-B)
  python benchmarks/compile_step.py --variants B/16,L/16,H/14 --scan_blocks false,true

  # the sharded step on 8 simulated CPU devices (FSDP over all 8)
  python benchmarks/compile_step.py --devices 8 --fsdp 8 --per_device_batch 64 --dtype bfloat16 \
      --variants L/16,H/14 --scan_blocks true

Nothing runs on the devices: the step is compiled from abstract shapes (`trainer.build`'s "train_step"
program). One JSON line per (variant, scan): compile seconds (lowering + XLA, no compilation cache), model
FLOPs per image (`common.model_flops_per_step`), and the compiled step's `memory_analysis()` per device
(arguments = sharded state + batch shard, temporaries, outputs aliased to the donated state). These are XLA:CPU's
figures; for a TPU slice's own compiler, memory and step time, use `python -m mae_jax.plan` (README, "Planning a
TPU run"), which replaced this script's old `--estimate`.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax import runtime  # noqa: E402

runtime.configure(compilation_cache=False)  # what main.py applies, but compile times are measured cold

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from mae_jax import models  # noqa: E402

flags.DEFINE_list("variants", ["B/16", "L/16", "H/14"], "Model variants.")
flags.DEFINE_list("scan_blocks", ["false", "true"], "Compile with blocks unrolled (false) and/or scanned (true).")
flags.DEFINE_integer("devices", 1, "Simulated host devices (sets --xla_force_host_platform_device_count).")
flags.DEFINE_integer("fsdp", 1, "Size of the mesh's fsdp axis (the rest is data parallel).")
flags.DEFINE_integer("per_device_batch", 8, "Images per device per step.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (model.dtype).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "Rematerialisation (model.remat).")
FLAGS = flags.FLAGS


def compile_one(variant: str, scan: bool) -> dict:
    config = common.CONFIGS[variant]()
    config.batch_size = FLAGS.per_device_batch * jax.device_count()
    config.model.scan_blocks = scan
    config.model.dtype = FLAGS.dtype
    config.model.remat = FLAGS.remat
    config.mesh.fsdp = FLAGS.fsdp
    config.visualize_every_steps = 0
    setup = common.build(config)
    start = time.perf_counter()
    step = setup.programs["train_step"].lower().compile()
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()
    flops = common.model_flops_per_step(config)
    per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes)
    return {
        "cpu": common.cpu_info(),
        "variant": variant,
        "scan_blocks": scan,
        "devices": jax.device_count(),
        "mesh": dict(setup.mesh.shape),
        "batch_size": config.batch_size,
        "dtype": FLAGS.dtype,
        "remat": FLAGS.remat,
        "params": models.count_params(setup.abstract.params),
        "compile_seconds": round(compile_seconds, 2),
        "flops_per_image": flops / config.batch_size,
        "memory_per_device_gib": {
            "arguments": memory.argument_size_in_bytes / 2**30,
            "temporaries": memory.temp_size_in_bytes / 2**30,
            "outputs_not_aliased": (memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**30,
            "total": per_device / 2**30,
        },
    }


def main(argv):
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    results = []
    for variant in FLAGS.variants:
        for scan in FLAGS.scan_blocks:
            result = compile_one(variant, scan.lower() in ("true", "1", "yes"))
            results.append(result)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # The device count must be fixed before jax initialises its backend.
    FLAGS(sys.argv)
    if FLAGS.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={FLAGS.devices}")
    app.run(main)
