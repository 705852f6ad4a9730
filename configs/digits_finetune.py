r"""Fine-tuning the digits MAE (configs/digits_pretrain.py) as a 10-class classifier, evaluated on "test".

  python main.py --config configs/digits_pretrain.py --workdir /tmp/mae_digits
  python main.py --config configs/digits_finetune.py --workdir /tmp/mae_digits_ft --config.init_from=/tmp/mae_digits
  python main.py --config configs/digits_finetune.py --workdir /tmp/mae_digits_ft10 --config.init_from=/tmp/mae_digits \
      --config.input.train_split="train[:10%]"          # 144 labels (the train split is stored class-interleaved)

Without init_from the same recipe trains from a random initialisation (the baseline of benchmarks/digits.py).
The recipe is the paper's (AdamW, layer decay, label smoothing, drop path, global pool) scaled down to 1,437
32 x 32 digits; Mixup/CutMix and RandAugment are off (they cost more steps than this budget has).
"""

import ml_collections

from configs import digits_pretrain, finetune_vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = finetune_vit_base.get_config()
    pretrain = digits_pretrain.get_config()

    # Model: digits_pretrain's encoder (so its workdir loads strictly); mean-pooled patch tokens + fc_norm + head.
    config.model = {**models.classifier_fields(pretrain.model.to_dict(), num_classes=10, global_pool=True,
                                               drop_path_rate=0.1), "num_classes": 0}

    # Data: the digits, evaluated on the whole 360-image "test" split as they are (no resize, no crop).
    config.input = pretrain.input
    config.input.labels = True
    config.input.train_split = "train"  # "train[:10%]": a class-balanced tenth (144 digits)
    config.input.crop_scale = (1.0, 1.0)  # the whole digit: crops (0.5-1) cost 12 points of top-1 at 300 steps
    config.input.crop_ratio = (1.0, 1.0)
    config.input.hflip = 0.0  # digits are not mirror-symmetric: flips cost 12 points of top-1 at 300 steps
    config.input.rand_augment = ""
    config.input.random_erasing = 0.0
    config.input.eval_crop_pct = 1.0

    # Optimisation: lr = base_lr * batch_size / 256; AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay.
    config.batch_size = 64
    config.total_steps = 200  # fixed, whatever the split's size (about 9 epochs of all labels)
    config.warmup_epochs = 1
    config.base_lr = 8e-3  # lr 2e-3 at batch 64
    config.min_lr = 1e-6
    config.layer_decay = 0.9
    config.label_smoothing = 0.1
    config.mixup = 0.0
    config.cutmix = 0.0

    # Evaluation at the end only; logs and a single checkpoint, also at the end.
    config.eval_every_steps = 10_000
    config.eval_batch_size = 120  # 3 batches cover the 360 test digits
    config.log_every_steps = 100
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 1
    return config
