r"""A small MAE on scikit-learn's handwritten digits, offline: the pretraining of the digits example.

  python main.py --config configs/digits_pretrain.py --workdir /tmp/mae_digits

The data are the 1,437 training digits of dataset="digits" (8x8 scans upscaled to 32 x 32 RGB; labels unused).
Images are 32 x 32 (4 x 4 patches of 8 px, each 2 x 2 of the original pixels), the encoder 96 wide and 4 blocks deep. configs/digits_finetune.py and
configs/digits_linprobe.py build the same encoder, so this workdir loads into them with --config.init_from;
benchmarks/digits.py runs the whole comparison (pretrained vs random init, 3 seeds).
"""

import ml_collections

from configs import vit_base
from mae_jax import models

# The encoder, shared with configs/digits_finetune.py and configs/digits_linprobe.py.
ENCODER = dict(image_size=(32, 32), patch_size=8, embed_dim=96, depth=4, num_heads=4)


def get_config() -> ml_collections.ConfigDict:
    config = vit_base.get_config()
    config.model = models.variant("test/4", **ENCODER, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                                  mask_ratio=0.75, norm_pix_loss=False)
    config.input.dataset = "digits"
    config.input.eval_split = "test"  # reconstructions of held-out digits
    config.input.crop_scale = (0.5, 1.0)  # a digit fills the image: small crops would show strokes only
    config.input.hflip = 0.0  # digits are not mirror-symmetric
    config.batch_size = 64
    config.total_steps = 440  # 20 epochs of 22 steps
    config.warmup_epochs = 2
    config.base_lr = 6e-3  # lr 1.5e-3 at batch 64
    config.log_every_steps = 100
    config.checkpoint_every_steps = 0  # at the end only
    config.keep_checkpoints = 1
    config.visualize_every_steps = 0  # reconstructions: python -m mae_jax.visualize --checkpoint WORKDIR ...
    return config
