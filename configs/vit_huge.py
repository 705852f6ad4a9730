r"""MAE ViT-H/14 pretraining on ImageNet-1k, the paper's recipe.

  python main.py --config configs/vit_huge.py --workdir /path/to/workdir
"""

import ml_collections

from configs import vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = vit_base.get_config()
    config.model = models.variant("H/14", image_size=(224, 224), mask_ratio=0.75, norm_pix_loss=True)
    return config
