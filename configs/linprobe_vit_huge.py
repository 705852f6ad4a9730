r"""Linear probing of a pretrained MAE ViT-H/14 on ImageNet-1k (FINETUNE.md: as ViT-B but 50 epochs).

  python main.py --config configs/linprobe_vit_huge.py --workdir DIR --config.init_from=PRETRAINED
"""

import ml_collections

from configs import finetune_vit_base, linprobe_vit_base


def get_config() -> ml_collections.ConfigDict:
    config = linprobe_vit_base.get_config()
    config.model = finetune_vit_base.classifier_model(
        "H/14", drop_path_rate=0.0, global_pool=False, head_batch_norm=True, head_init_std=0.01,
        frozen_encoder=True)
    config.num_epochs = 50
    return config
