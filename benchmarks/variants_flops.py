r"""FLOPs of Table 1c's "w/ [M]" (the encoder on all patches, masked ones as a mask token) against the default
encoder (visible patches only), from XLA's cost analysis of the compiled programs.

  python benchmarks/variants_flops.py                  # ViT-L/16 at 224, mask ratio 0.75
  python benchmarks/variants_flops.py --variant B/16

Compiles, for both models, the real train step (`trainer.build`'s "train_step" program: forward, backward,
AdamW, on one device) and the forward pass of the encoder alone (`model.encode`), and prints one JSON line per program with
`compiled.cost_analysis()["flops"]` per image and the ratio w/ [M] : default. Blocks are unrolled (XLA counts a
scanned loop body once). The paper (Table 1c) gives 3.3x for w/ [M].
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mae_jax import runtime  # noqa: E402

runtime.configure()  # what main.py applies (the persistent compilation cache makes a re-run quick)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from mae_jax import models  # noqa: E402

flags.DEFINE_string("variant", "L/16", "Model variant (B/16, L/16, H/14).")
flags.DEFINE_integer("batch_size", 8, "Images per step (FLOPs are reported per image).")
flags.DEFINE_string("ops", "generic", "model.ops: 'generic' is what GPUs and TPUs run.")
FLAGS = flags.FLAGS


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def measure(encoder_mask_tokens: bool) -> dict[str, float]:
    config = common.CONFIGS[FLAGS.variant]()
    config.batch_size = FLAGS.batch_size
    config.mesh.data = 1
    config.model.update(encoder_mask_tokens=encoder_mask_tokens, ops=FLAGS.ops, scan_blocks=False, remat="none")
    config.visualize_every_steps = 0
    setup = common.build(config)
    model = setup.task.model
    step = setup.programs["train_step"].lower().compile()
    variables = jax.eval_shape(functools.partial(models.init_variables, model), jax.random.key(0))
    images = jax.ShapeDtypeStruct((config.batch_size, *model.image_shape), jnp.float32)
    noise = jax.ShapeDtypeStruct((config.batch_size, model.num_patches), jnp.float32)
    encode = jax.jit(functools.partial(model.apply, method=model.encode)).lower(variables, images, noise).compile()
    return {"train_step": flops(step) / config.batch_size, "encoder_forward": flops(encode) / config.batch_size}


def main(argv):
    del argv
    default, with_tokens = measure(False), measure(True)
    for program in default:
        print(json.dumps({"variant": FLAGS.variant, "program": program, "ops": FLAGS.ops,
                          "gflops_per_image_default": round(default[program] / 1e9, 2),
                          "gflops_per_image_w_mask_tokens": round(with_tokens[program] / 1e9, 2),
                          "ratio": round(with_tokens[program] / default[program], 2)}), flush=True)


if __name__ == "__main__":
    app.run(main)
