r"""MAE ViT-B/16 pretraining on ImageNet-1k, the paper's recipe (800 epochs, batch 4096, mask 0.75).

Run (one process per host; every host runs the same command):

  python main.py --config configs/vit_base.py --workdir /path/to/workdir

Any field can be overridden, e.g. `--config.batch_size=1024 --config.mesh.fsdp=8`.
ImageNet must be prepared for tfds first (see README.md, "Data").
"""

import ml_collections

from mae_jax import config_lib, models


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "pretrain"  # what main.py runs: "pretrain", "finetune" or "linprobe" (mae_jax/trainer.py TASKS)

    # Model: constructor fields of models.MaskedAutoencoderViT, nothing else.
    config.model = models.variant("B/16", image_size=(224, 224), mask_ratio=0.75, norm_pix_loss=True)

    # Data and augmentation (mae_jax/input_pipeline.py, mae_jax/datasets.py), handed to the pipeline whole.
    config.input = config_lib.input_config()

    # Optimisation (PRETRAIN.md): lr = base_lr * batch_size / 256, AdamW(0.9, 0.95), wd 0.05.
    config.batch_size = 4096  # global batch per optimizer step, over all devices and hosts
    config.grad_accum_steps = 1  # split each step's batch into this many sequential micro-batches
    config.num_epochs = 800  # run length in epochs of the training split
    config.total_steps = 0  # > 0: train for exactly this many steps instead of num_epochs
    config.warmup_epochs = 40  # linear lr warmup from 0, per step
    config.base_lr = 1.5e-4  # peak lr = base_lr * batch_size / 256
    config.min_lr = 0.0  # the half-cycle cosine ends here
    config.weight_decay = 0.05  # AdamW's, on weight matrices and the cls/mask tokens only
    config.b1 = 0.9  # AdamW's beta1, the decay of the gradient's running mean
    config.b2 = 0.95  # AdamW's beta2, the decay of the squared gradient's running mean
    config.allow_schedule_change = False  # True: resume although batch_size or lr schedule fields changed (logged)
    config.seed = 0  # same config and seed: the same losses on any devices, hosts, or after resumes

    # Devices: axis sizes of the ("data", "fsdp") mesh; -1 takes all remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel axis (-1: all remaining devices)
    config.mesh.fsdp = 1  # shards parameters and optimizer state this many ways

    # Logging and checkpoints.
    config.log_every_steps = 100  # steps between metrics lines (each the means over the steps since the last one)
    config.checkpoint_every_steps = 1000  # steps between checkpoints (0: only at the end and on preemption)
    config.keep_checkpoints = 3  # the newest this many are kept
    config.visualize_every_steps = 2500  # steps between reconstruction figures of held-out images (0: never)
    config.visualize_num_images = 8  # held-out images in each reconstruction figure
    config.init_from = ""  # start from these weights (our checkpoint/export, official .pth, HF directory)
    config.profile_steps = 0  # > 0: a JAX profiler trace of this many steps into workdir/tensorboard (TensorBoard's
    #   Profile tab, or Perfetto), starting at step profile_first_step
    config.profile_first_step = 10  # the first step of the profile

    config_lib.add_renamed(config)  # old names of moved fields (e.g. config.dataset), for one release

    return config
