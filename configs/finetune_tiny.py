r"""Fine-tuning a tiny classifier on synthetic labelled images: seconds on a CPU (tests and quick tries).

Its encoder is configs/tiny.py's, so a tiny pretraining workdir loads into it:

  python main.py --config configs/tiny.py --workdir /tmp/mae_tiny
  python main.py --config configs/finetune_tiny.py --workdir /tmp/mae_tiny_ft --config.init_from=/tmp/mae_tiny
"""

import ml_collections

from configs import finetune_vit_base, tiny
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = finetune_vit_base.get_config()
    config.model = {**models.classifier_fields(tiny.get_config().model.to_dict(), num_classes=1000,
                                               drop_path_rate=0.1), "num_classes": 0}
    config.input.dataset = "synthetic"
    config.input.synthetic_num_examples = 16 * 8
    config.input.synthetic_num_classes = 10
    config.input.synthetic_num_eval_examples = 100
    config.input.rand_augment = ""  # synthetic images come augmentation-free
    config.input.random_erasing = 0.0
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 5
    config.warmup_epochs = 1
    config.base_lr = 1.6e-2  # lr 1e-3 at batch 16
    config.log_every_steps = 5
    config.checkpoint_every_steps = 20
    return config
