r"""Fine-tuning the demo's MAE (configs/demo.py) as a classifier, offline: the mechanics, in about a minute.

  python main.py --config configs/demo.py --workdir /tmp/mae_demo
  python main.py --config configs/demo_finetune.py --workdir /tmp/mae_demo_ft --config.init_from=/tmp/mae_demo

The encoder is the demo's (64 x 64 images, 8 px patches, 128 wide, 4 blocks). The demo's photographs carry no
labels, so the labelled data here are synthetic 64 x 64 images of 10 classes; with a folder of class folders of
your own (root/<class>/<image>) use `--config.input.dataset=folder --config.input.image_folder=DIR` instead.
"""

import ml_collections

from configs import demo, finetune_tiny
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = finetune_tiny.get_config()  # the offline fine-tuning recipe, on the demo's encoder and image size
    config.model = {**models.classifier_fields(demo.get_config().model.to_dict(), num_classes=1000,
                                               drop_path_rate=0.1), "num_classes": 0}
    config.input.synthetic_num_examples = 64 * 16
    config.input.synthetic_num_eval_examples = 256
    config.batch_size = 64
    config.eval_batch_size = 128
    config.base_lr = 4e-3  # lr 1e-3 at batch 64
    config.log_every_steps = 16
    config.checkpoint_every_steps = 0  # at the end only
    config.keep_checkpoints = 1
    return config
