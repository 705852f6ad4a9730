r"""Linear probing of a pretrained MAE ViT-B/16 on ImageNet-1k: the official recipe (main_linprobe.py).

FINETUNE.md "Linear probing". The paper: 68.0% top-1 (ViT-B/16), 75.8% (L), 76.6% (H, 14 px patches).

  python main.py --config configs/linprobe_vit_base.py --workdir DIR --config.init_from=PRETRAINED

The encoder is frozen (its features pass a stop-gradient: no backward is built for it); the head is
BatchNorm without affine (eps 1e-6) + Linear (trunc-normal std 0.01) on the cls token of the final norm,
trained with LARS.
"""

import ml_collections

from configs import finetune_vit_base


def get_config() -> ml_collections.ConfigDict:
    config = finetune_vit_base.get_config()
    config.task = "linprobe"
    config.model = finetune_vit_base.classifier_model(
        "B/16", drop_path_rate=0.0, global_pool=False, head_batch_norm=True, head_init_std=0.01,
        frozen_encoder=True)

    # Data: RandomResizedCrop (0.08-1, bicubic) + flip only; evaluation as fine-tuning.
    config.input.crop_scale = (0.08, 1.0)
    config.input.rand_augment = ""
    config.input.random_erasing = 0.0

    # Optimisation: LARS (momentum 0.9, trust coefficient 0.001) on the head; lr = base_lr * batch_size / 256.
    config.batch_size = 16384
    config.num_epochs = 90
    config.warmup_epochs = 10
    config.base_lr = 0.1
    config.min_lr = 0.0
    config.weight_decay = 0.0
    config.layer_decay = 1.0  # unused by the probe (only the head trains)
    config.label_smoothing = 0.0
    config.mixup = 0.0
    config.cutmix = 0.0
    config.eval_batch_size = 1024
    return config
