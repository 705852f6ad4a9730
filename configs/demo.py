r"""A small MAE on real photographs, offline: trains in a few minutes on a 2-core CPU with a falling loss.

  python main.py --config configs/demo.py --workdir /tmp/mae_demo

The data are 2,080 random crops of 13 photographs that scikit-image ships inside its wheel (dataset="demo",
prepared once in a few seconds under the tfds data_dir); reconstructions use crops of two photographs that
training never sees. Images are 64 x 64 (8 x 8 patches of 8 px), the encoder 128 wide and 4 blocks deep.
The loss is on plain normalised pixels (`norm_pix_loss=False`, unlike the paper's recipe): on this little data
it falls steadily through the run (logged means of 20 steps: about 1.3 to 0.5), where the per-patch normalised loss levels off near 0.67
after a hundred steps, and reconstructions can be shown as they are.
"""

import ml_collections

from configs import vit_base
from mae_jax import models


def get_config() -> ml_collections.ConfigDict:
    config = vit_base.get_config()
    config.model = models.variant("test/8", image_size=(64, 64), embed_dim=128, depth=4, num_heads=4,
                                  decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                                  mask_ratio=0.75, norm_pix_loss=False)
    config.input.dataset = "demo"
    config.batch_size = 64
    config.num_epochs = 10  # 32 steps an epoch: 320 steps, about 2 minutes on a 2-core CPU
    config.warmup_epochs = 1
    config.base_lr = 6e-3  # lr 1.5e-3 at batch 64
    config.log_every_steps = 20
    config.checkpoint_every_steps = 160
    config.visualize_every_steps = 80
    config.visualize_num_images = 4
    config.keep_checkpoints = 1
    return config
