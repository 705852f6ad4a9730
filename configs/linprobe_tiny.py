r"""A linear probe of configs/tiny.py's encoder on synthetic labelled images: seconds on a CPU.

  python main.py --config configs/tiny.py --workdir /tmp/mae_tiny
  python main.py --config configs/linprobe_tiny.py --workdir /tmp/mae_tiny_probe --config.init_from=/tmp/mae_tiny
"""

import ml_collections

from configs import finetune_tiny, linprobe_vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = linprobe_vit_base.get_config()
    tiny = finetune_tiny.get_config()
    config.model = {**models.classifier_fields({**tiny.model, "num_classes": 10}, drop_path_rate=0.0,
                                               global_pool=False, head_batch_norm=True, head_init_std=0.01,
                                               frozen_encoder=True), "num_classes": 0}
    config.input = tiny.input
    config.input.crop_scale = (0.08, 1.0)
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 5
    config.warmup_epochs = 1
    config.base_lr = 1.6  # lr 0.1 at batch 16
    config.log_every_steps = 5
    config.checkpoint_every_steps = 20
    return config
