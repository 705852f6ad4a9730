r"""Compiles the real train step of ViT-B/L/H and reports compile time, FLOPs and per-device memory.

  # compile time on one device, blocks unrolled and scanned (target: ViT-H with scan within 1.5x of ViT-B)
  python benchmarks/compile_step.py --variants B/16,L/16,H/14 --scan_blocks false,true

  # the sharded step on 8 simulated devices (FSDP over all 8), and what it implies for TPU and GPU slices
  python benchmarks/compile_step.py --devices 8 --fsdp 8 --per_device_batch 64 --dtype bfloat16 \
      --variants L/16,H/14 --scan_blocks true --estimate

Nothing runs on the devices: the step is compiled from abstract shapes, so ViT-H at a pod's per-device
batch compiles on a laptop. One JSON line per (variant, scan): compile seconds (lowering + XLA, no
compilation cache), model FLOPs per image (common.model_flops_per_step), and the compiled step's
`memory_analysis()` per device (arguments = sharded state + batch shard, temporaries, outputs aliased to
the donated state). `--estimate` adds images/s per chip on accelerators at a stated MFU, and whether
the per-device memory fits their HBM. The memory figures are XLA:CPU's buffer assignment; the TPU and
GPU compilers fuse and schedule differently, so treat them as a guide (within tens of percent).
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
from mae_jax import models, train  # noqa: E402

flags.DEFINE_list("variants", ["B/16", "L/16", "H/14"], "Model variants.")
flags.DEFINE_list("scan_blocks", ["false", "true"], "Compile with blocks unrolled (false) and/or scanned (true).")
flags.DEFINE_integer("devices", 1, "Simulated host devices (sets --xla_force_host_platform_device_count).")
flags.DEFINE_integer("fsdp", 1, "Size of the mesh's fsdp axis (the rest is data parallel).")
flags.DEFINE_integer("per_device_batch", 8, "Images per device per step.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (model.dtype).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "Rematerialisation (model.remat).")
flags.DEFINE_bool("estimate", False, "Print accelerator estimates from the FLOPs and memory.")
flags.DEFINE_float("mfu", None, "MFU assumed by --estimate (default: the paper's, derived from its ViT-L time).")
FLAGS = flags.FLAGS

# Dense bf16 peak FLOP/s and HBM per chip, from the vendors' data sheets.
ACCELERATORS = {
    "TPU v3 (paper)": (123e12, 32 * 2**30),  # per chip (2 cores)
    "TPU v4": (275e12, 32 * 2**30),
    "TPU v5p": (459e12, 95 * 2**30),
    "H100 SXM": (989e12, 80 * 10**9),
}
# The paper: ViT-L/16, 800 epochs of ImageNet-1k (1,281,167 images) in 15.4 h on 128 TPU-v3 cores (64 chips).
PAPER_VIT_L = {"chips": 64, "hours": 15.4, "images": 800 * 1_281_167}


def compile_one(variant: str, scan: bool) -> dict:
    config = common.CONFIGS[variant]()
    config.batch_size = FLAGS.per_device_batch * jax.device_count()
    config.model.scan_blocks = scan
    config.model.dtype = FLAGS.dtype
    config.model.remat = FLAGS.remat
    config.mesh.fsdp = FLAGS.fsdp
    model, mesh, schedule, tx = common.setup(config)
    abstract = train.abstract_train_state(model, tx)
    shardings = train.state_shardings(abstract, tx, mesh)
    start = time.perf_counter()
    step = train.compile_train_step(model, tx, schedule, mesh, shardings, batch_size=config.batch_size,
                                    grad_accum_steps=config.grad_accum_steps)
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()
    flops = common.model_flops_per_step(config, tx, schedule, mesh)
    per_device = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes)
    return {
        "cpu": common.cpu_info(),
        "variant": variant,
        "scan_blocks": scan,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "dtype": FLAGS.dtype,
        "remat": FLAGS.remat,
        "params": models.count_params(abstract.params),
        "compile_seconds": round(compile_seconds, 2),
        "flops_per_image": flops / config.batch_size,
        "memory_per_device_gib": {
            "arguments": memory.argument_size_in_bytes / 2**30,
            "temporaries": memory.temp_size_in_bytes / 2**30,
            "outputs_not_aliased": (memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**30,
            "total": per_device / 2**30,
        },
    }


def estimate(result: dict, mfu: float) -> list[dict]:
    rows = []
    for name, (peak, hbm) in ACCELERATORS.items():
        per_chip = mfu * peak / result["flops_per_image"]
        rows.append({
            "variant": result["variant"], "accelerator": name, "mfu": round(mfu, 3),
            "images_per_sec_per_chip": round(per_chip, 1),
            "hours_800_epochs_on_64_chips": round(PAPER_VIT_L["images"] / (64 * per_chip) / 3600, 1),
            "hours_800_epochs_on_8_chips": round(PAPER_VIT_L["images"] / (8 * per_chip) / 3600, 1),
            "memory_per_device_gib": round(result["memory_per_device_gib"]["total"], 2),
            "fits_hbm": result["memory_per_device_gib"]["total"] * 2**30 < hbm,
        })
    return rows


def main(argv):
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    results = []
    for variant in FLAGS.variants:
        for scan in FLAGS.scan_blocks:
            result = compile_one(variant, scan.lower() in ("true", "1", "yes"))
            results.append(result)
            print(json.dumps(result), flush=True)
    if FLAGS.estimate:
        # The paper's ViT-L time implies its MFU on TPU v3, given our count of the step's FLOPs.
        paper_ips_per_chip = PAPER_VIT_L["images"] / (PAPER_VIT_L["hours"] * 3600) / PAPER_VIT_L["chips"]
        large = next((r for r in results if r["variant"] == "L/16"), None)
        mfu = FLAGS.mfu
        if large is not None:
            paper_mfu = paper_ips_per_chip * large["flops_per_image"] / ACCELERATORS["TPU v3 (paper)"][0]
            print(json.dumps({"paper_vit_l_images_per_sec_per_tpu_v3_chip": round(paper_ips_per_chip, 1),
                              "implied_mfu": round(paper_mfu, 3)}))
            mfu = mfu or paper_mfu
        if mfu is None:
            raise app.UsageError("--estimate needs L/16 among --variants or an explicit --mfu")
        for result in {r["variant"]: r for r in results}.values():  # one row set per variant (its last)
            for row in estimate(result, mfu):
                print(json.dumps(row))


if __name__ == "__main__":
    # The device count must be fixed before jax initialises its backend.
    FLAGS(sys.argv)
    if FLAGS.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={FLAGS.devices}")
    app.run(main)
