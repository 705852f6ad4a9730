r"""A tiny MAE on synthetic images: trains in seconds on a CPU (for tests and for trying the mechanics).

  python main.py --config configs/tiny.py --workdir /tmp/mae_tiny
"""

import ml_collections

from configs import vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = vit_base.get_config()
    config.model = models.variant("test/8", image_size=(32, 32), norm_pix_loss=True)
    config.input.dataset = "synthetic"
    config.input.synthetic_num_examples = 16 * 10
    config.batch_size = 16
    config.num_epochs = 6
    config.warmup_epochs = 1
    config.base_lr = 1.5e-2  # lr 1e-3 at batch 16
    config.log_every_steps = 5
    config.checkpoint_every_steps = 20
    config.visualize_every_steps = 30
    config.visualize_num_images = 4
    return config
