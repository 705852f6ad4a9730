r"""Fine-tuning a pretrained MAE ViT-H/14 on ImageNet-1k: the official recipe (the paper: 86.9% top-1).

FINETUNE.md: 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.3.

  python main.py --config configs/finetune_vit_huge.py --workdir DIR --config.init_from=PRETRAINED
"""

import ml_collections

from configs import finetune_vit_base


def get_config() -> ml_collections.ConfigDict:
    config = finetune_vit_base.get_config()
    config.model = finetune_vit_base.classifier_model("H/14", drop_path_rate=0.3)
    config.num_epochs = 50
    config.base_lr = 1e-3
    config.layer_decay = 0.75
    return config
