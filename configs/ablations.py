r"""The paper's ablations (He et al. 2022, Table 1c, 1d, 1f): ViT-L/16, 800 epochs on ImageNet-1k, one row each.

  python main.py --config configs/ablations.py:block75 --workdir /path/to/workdir
  python main.py --config configs/ablations.py:block75,tiny --workdir /tmp/mae_block75   # a quick look, seconds

The argument is a row (none: `baseline`), and optionally `tiny`: the row's switches on configs/tiny.py (the tiny model on synthetic
images; its reconstructions under workdir/reconstructions show the row's masks). Every row starts from the
paper's default, gray in Table 1: random masking at 75%, the encoder without mask tokens, the pixel target
without normalisation, the loss on the removed patches; ViT-L/16 with the 512-wide 8-block decoder and
configs/vit_large.py's recipe (batch 4096, base lr 1.5e-4, 40 warmup epochs, 800 epochs). Rows:

  baseline     the default itself: Table 1c "w/o [M]", 1d "pixel (w/o norm)", 1f "random 75"
  mask_tokens  Table 1c "w/ [M]": model.encoder_mask_tokens=True
  pixel_norm   Table 1d "pixel (w/ norm)": model.norm_pix_loss=True (the recipe of the released models)
  random75     Table 1f "random 75": the baseline
  block50      Table 1f "block 50": model.mask_sampling="block", model.mask_ratio=0.5
  block75      Table 1f "block 75": model.mask_sampling="block"
  grid75       Table 1f "grid 75": model.mask_sampling="grid"
  loss_all     Sec. 3 (no table row): model.loss_on="all", the loss on every patch

The paper's fine-tuning / linear-probing top-1 for each row is in README.md ("Variants").
"""

import ml_collections

from configs import tiny, vit_large

# row -> model fields changed from the baseline
ROWS = {
    "baseline": {},
    "mask_tokens": {"encoder_mask_tokens": True},
    "pixel_norm": {"norm_pix_loss": True},
    "random75": {},
    "block50": {"mask_sampling": "block", "mask_ratio": 0.5},
    "block75": {"mask_sampling": "block"},
    "grid75": {"mask_sampling": "grid"},
    "loss_all": {"loss_on": "all"},
}
# Table 1's default, from which every row starts
BASELINE = {"mask_ratio": 0.75, "mask_sampling": "random", "encoder_mask_tokens": False, "norm_pix_loss": False,
            "loss_on": "masked"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    row, *options = (arg or "baseline").split(",")
    if row not in ROWS or any(option != "tiny" for option in options):
        raise ValueError(f"configs/ablations.py:{arg}: expected ROW or ROW,tiny with ROW one of {', '.join(ROWS)}")
    config = tiny.get_config() if options else vit_large.get_config()
    config.model.update(BASELINE)
    config.model.update(ROWS[row])
    return config
