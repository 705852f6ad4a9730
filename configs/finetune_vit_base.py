r"""Fine-tuning a pretrained MAE ViT-B/16 on ImageNet-1k: the official recipe (FINETUNE.md, main_finetune.py).

  python main.py --config configs/finetune_vit_base.py --workdir DIR --config.init_from=PRETRAINED
  python main.py --config configs/finetune_vit_base.py --workdir DIR --config.init_from=mae_finetuned_vit_base.pth \
      --config.eval_only=True

PRETRAINED: our pretraining workdir or export, an official mae_pretrain_vit_base.pth, or a Hugging Face
ViTMAE directory. The paper's result with this recipe: 83.6% top-1 (ViT-B/16, 100 epochs).
"""

import ml_collections

from configs import vit_base
from mae_jax import models


def classifier_model(variant: str, drop_path_rate: float, **overrides) -> dict:
    """ViTClassifier fields of an MAE variant; num_classes 0: from the dataset's metadata."""
    overrides = {"global_pool": True, **overrides}
    fields = models.classifier_fields(models.variant(variant, image_size=(224, 224)), num_classes=1000,
                                      drop_path_rate=drop_path_rate, **overrides)
    return {**fields, "num_classes": 0}


def get_config() -> ml_collections.ConfigDict:
    config = vit_base.get_config()  # the shared fields (mesh, logging, checkpoints, seed), then the recipe's
    for name in ("visualize_every_steps", "visualize_num_images"):
        del config[name]
    config.task = "finetune"  # "finetune" or "linprobe" (mae_jax/finetune.py)

    # Model: constructor fields of models.ViTClassifier; the encoder must match the pretrained checkpoint.
    config.model = classifier_model("B/16", drop_path_rate=0.1)

    # Data: labelled batches, the fine-tuning augmentation (timm's create_transform as util/datasets.py builds it).
    config.input.labels = True
    config.input.crop_scale = (0.08, 1.0)
    config.input.rand_augment = "rand-m9-mstd0.5-inc1"
    config.input.random_erasing = 0.25
    config.input.eval_split = "validation"

    # Optimisation: lr = base_lr * batch_size / 256; AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay.
    config.batch_size = 1024
    config.num_epochs = 100
    config.warmup_epochs = 5
    config.base_lr = 5e-4
    config.min_lr = 1e-6
    config.weight_decay = 0.05
    config.b1 = 0.9
    config.b2 = 0.999
    config.layer_decay = 0.65  # block i's lr is scaled by layer_decay ** (depth - i); embeddings by ** (depth + 1)
    config.trainable_blocks = -1  # k >= 0: train only the last k blocks, the final norm and the head (-1: all)
    config.label_smoothing = 0.1  # cross-entropy targets: 1 - s + s / classes for the true class, s / classes elsewhere
    config.mixup = 0.8  # Mixup alpha (0: off)
    config.cutmix = 1.0  # CutMix alpha (0: off)
    config.mixup_prob = 1.0  # probability of mixing a batch at all
    config.mixup_switch_prob = 0.5  # probability of CutMix rather than Mixup when both are on

    # Evaluation: top-1 / top-5 / loss over the whole eval split.
    config.eval_every_steps = 0  # steps between evaluations (0: every epoch); always at the end too
    config.eval_batch_size = 1024  # examples per evaluation batch, over all devices and hosts
    config.eval_only = False  # True: evaluate the checkpoint (or init_from) and exit
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return config
