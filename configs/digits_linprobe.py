r"""A linear probe of the digits MAE (configs/digits_pretrain.py), evaluated on "test".

  python main.py --config configs/digits_pretrain.py --workdir /tmp/mae_digits
  python main.py --config configs/digits_linprobe.py --workdir /tmp/mae_digits_probe --config.init_from=/tmp/mae_digits

Without init_from the same probe reads a randomly initialised encoder (the baseline of benchmarks/digits.py).
The official probe (main_linprobe.py) scaled down: frozen encoder, cls token of the final norm, BatchNorm
without affine + linear head, LARS, plain cross-entropy.
"""

import ml_collections

from configs import digits_finetune, linprobe_vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = linprobe_vit_base.get_config()
    finetune = digits_finetune.get_config()

    # Model: digits_pretrain's encoder, frozen; the head reads the cls token of the final norm.
    config.model = {**models.classifier_fields({**finetune.model, "num_classes": 10}, drop_path_rate=0.0,
                                               global_pool=False, head_batch_norm=True, head_init_std=0.01,
                                               frozen_encoder=True), "num_classes": 0}

    # Data: as fine-tuning (crop and flip only, the whole image for evaluation).
    config.input = finetune.input

    # Optimisation: LARS on the head; lr = base_lr * batch_size / 256. 10x the official peak lr (6.4): this run
    # is 200 steps, not 90 epochs of 16384 (at lr 6.4 the probe ends at 60% top-1, at 64 at 72%).
    config.batch_size = 128
    config.total_steps = 200  # fixed, whatever the split's size (about 18 epochs of all labels)
    config.warmup_epochs = 2
    config.base_lr = 128.0  # lr 64 at batch 128

    # Evaluation at the end only; logs and a single checkpoint, also at the end.
    for name in ("eval_every_steps", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints"):
        config[name] = finetune[name]
    return config
