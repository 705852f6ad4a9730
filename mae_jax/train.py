"""MAE pretraining as a `trainer.Task`: config checks, AdamW, the pure train step, reconstructions.

`python main.py --config configs/vit_base.py --workdir DIR` runs it (`trainer.train_and_evaluate`);
re-running the same command resumes from the latest checkpoint in `DIR/checkpoints` and continues exactly as
if it had never stopped. The mesh, state, compilation and loop are the shared skeleton (`mae_jax/trainer.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from mae_jax import models, pixels, trainer, visualize
from mae_jax.train_state import TrainState, apply_gradients, rng_stream

PyTree = Any


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where the official recipe decays: every weight matrix and the cls/mask tokens; not biases
    nor LayerNorm scales (timm `add_weight_decay`: ndim <= 1 or `.bias` -> no decay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW as PRETRAIN.md: betas (b1, b2), eps 1e-8, decoupled weight decay on `weight_decay_mask`."""
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8, weight_decay=config.weight_decay,
                       mask=weight_decay_mask)


# -------------------------------------------------------------------------------------------------------
# The step.
# -------------------------------------------------------------------------------------------------------


def loss_fn(params: PyTree, constants: PyTree, model: models.MaskedAutoencoderViT, images: jax.Array,
            noise: jax.Array) -> jax.Array:
    return model.apply({"params": params, "constants": constants}, images, noise=noise).loss


def at_image_size(model: models.MaskedAutoencoderViT, constants: PyTree,
                  image_size: tuple[int, int]) -> tuple[models.MaskedAutoencoderViT, PyTree]:
    """(model, position tables) for images of `image_size` (H, W): the model and the state's tables at the model's
    own size; at any other size the model for that size and the exact sin-cos tables of its grid
    (`models.position_tables`: no interpolation). The parameters are the same at every size."""
    if tuple(image_size) == model.image_shape[:2]:
        return model, constants
    model = model.clone(image_size=tuple(image_size))
    return model, jax.tree_util.tree_map(jnp.asarray, models.position_tables(model))


def _microbatches(x: jax.Array, accum: int, num_shards: int) -> jax.Array:
    """[B, ...] -> [accum, B / accum, ...] such that every micro-batch takes an equal slice of each
    device's rows (no data moves between devices)."""
    b = x.shape[0]
    x = x.reshape(num_shards, accum, b // (num_shards * accum), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum, b // accum, *x.shape[3:])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.MaskedAutoencoderViT,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1, num_batch_shards: int = 1,
               param_shardings: PyTree | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the global batch {"images" [B, H, W, C]}: uint8 pixels (the input pipelines'; normalised
    here, on the device) or images already normalised (float). Pure; jit it with the state donated.

    Images of another size than the model's (multi-scale pretraining: each size is its own compiled program) go
    through the same parameters with the sin-cos position tables of their own patch grid (`at_image_size`).

    Masking noise: example i of the batch at step s draws from fold_in(rng_stream(rng, "masking", s), i), so
    losses do not depend on devices, mesh shape, processes or gradient accumulation. `param_shardings`: see
    `train_state.apply_gradients`.
    """
    images = pixels.model_input(batch["images"])
    model, constants = at_image_size(model, state.constants, images.shape[1:3])
    rng = rng_stream(jax.random.wrap_key_data(state.rng), "masking", state.step)
    noise = models.masking_noise(rng, images.shape[0], model)
    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
        loss, grads = grad_fn(state.params, constants, model, images, noise)
    else:
        micro = (_microbatches(images, grad_accum_steps, num_batch_shards),
                 _microbatches(noise, grad_accum_steps, num_batch_shards))

        def accumulate(carry, batch):
            loss, grads = grad_fn(state.params, constants, model, *batch)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))

    new_state, grad_norm = apply_gradients(state, loss, grads, tx, param_shardings)
    # Only what is cheap: a norm lowers to a reduction over every parameter, and on the CPU each costs as
    # much as a tenth of the ViT-B step. The loop measures param_norm on logging steps only.
    return new_state, {"loss": loss, "grad_norm": grad_norm}


# -------------------------------------------------------------------------------------------------------
# The task.
# -------------------------------------------------------------------------------------------------------


def image_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`config.input.image_sizes` (multi-scale pretraining; () = off), checked: one-line ConfigErrors for an
    entry that is not a positive int, not a multiple of the patch size, or that the model cannot take (e.g. a
    grid mask that does not tile its patch grid)."""
    sizes = tuple(config.input.get("image_sizes", ()) or ())
    patch = config.model.patch_size
    for size in sizes:
        trainer.check(isinstance(size, int) and not isinstance(size, bool) and size > 0,
                      f"input.image_sizes {sizes}: {size!r} is not a positive int (each entry is the side of a "
                      "step's square images, in pixels, e.g. (224, 256, 288))")
        trainer.check(size % patch == 0, f"input.image_sizes {sizes}: {size} is not divisible by model.patch_size "
                                         f"{patch}: each size must be a multiple of it")
        try:
            models.MaskedAutoencoderViT(**{**config.model, "image_size": (size, size)})
        except ValueError as e:
            raise trainer.ConfigError(f"input.image_sizes {sizes}: at {size} x {size}, model: {e}") from None
    return sizes


class Pretraining(trainer.Task):
    """MAE pretraining: masked-patch reconstruction on unlabelled images."""

    def __init__(self, config: ml_collections.ConfigDict, platform: str):
        self.model_fields = dict(config.model)
        self.model = models.MaskedAutoencoderViT(
            **{**self.model_fields, "ops": models.resolve_ops(config.model.ops, platform)})

    @classmethod
    def validate(cls, config, num_devices, process_count):
        mesh_shape = trainer.validate_common(config, num_devices, process_count)
        try:
            models.MaskedAutoencoderViT(**config.model)  # the model checks its own fields
        except ValueError as e:
            raise trainer.ConfigError(f"model: {e}") from None
        image_sizes(config)
        return mesh_shape

    def init_variables(self, rng):
        return models.init_variables(self.model, rng)

    def make_optimizer(self, config, schedule):
        return make_optimizer(config, schedule)

    def batch_spec(self, config, image_size: int | None = None):
        """{"images": uint8 [B, H, W, C]} at the model's size, or at `image_size` x `image_size`."""
        height, width, channels = self.model.image_shape
        if image_size is not None:
            height = width = image_size
        return {"images": jax.ShapeDtypeStruct((config.batch_size, height, width, channels), jnp.uint8)}

    def train_step_programs(self, setup):
        """One train step; with `input.image_sizes`, one per size, compiled up front: the largest is
        "train_step" (the plan's memory check then sees the worst case), the others "train_step_<size>"."""
        sizes = image_sizes(setup.config)
        if not sizes:
            return super().train_step_programs(setup)
        programs = {}
        for size in sorted(set(sizes), reverse=True):
            name = "train_step" if not programs else f"train_step_{size}"
            programs[name] = setup.train_step_program(f"the train step at {size} x {size}",
                                                      self.batch_spec(setup.config, size))
        return programs

    def train_step(self, setup):
        mesh = setup.mesh
        return functools.partial(train_step, model=self.model, tx=setup.tx,
                                 grad_accum_steps=setup.config.grad_accum_steps,
                                 num_batch_shards=mesh.shape["data"] * mesh.shape["fsdp"],
                                 param_shardings=setup.shardings.params)

    def programs(self, setup):
        config = setup.config
        if not config.visualize_every_steps:
            return {}
        images = jax.ShapeDtypeStruct((config.visualize_num_images, *self.model.image_shape), jnp.float32,
                                      sharding=setup.replicated)
        noise = jax.ShapeDtypeStruct((config.visualize_num_images, self.model.num_patches), jnp.float32,
                                     sharding=setup.replicated)
        return {"reconstructions": trainer.Program(
            f"the reconstructions of {config.visualize_num_images} held-out images", setup.mesh,
            functools.partial(visualize.reconstruct, self.model), (setup.abstract.variables, images, noise),
            out_shardings=setup.replicated)}

    def hooks(self, context):
        config = context.config
        if not config.visualize_every_steps:
            return []
        from mae_jax import input_pipeline  # TensorFlow: when a run starts, not when the task is built

        images = input_pipeline.load_eval_images(config.input, image_shape=self.model.image_shape, seed=config.seed,
                                                 num_images=config.visualize_num_images)
        reconstructions = visualize.TrainingReconstructions(
            self.model, images, context.setup.mesh, context.workdir / "reconstructions", seed=config.seed,
            compiled=context.compiled["reconstructions"])

        def hook(step: int, state: TrainState) -> None:
            if trainer.loop.itstime(step, config.visualize_every_steps, context.setup.total_steps):
                context.log.write_image(step, "reconstructions", reconstructions(step, state.variables))

        return [hook]

    def summary(self, context, last):
        config, workdir = context.config, context.workdir
        if config.visualize_every_steps:
            logging.info("  reconstructions: %s", workdir / "reconstructions")
        logging.info("  next: python -m mae_jax.visualize --checkpoint %s --image YOUR_IMAGE.jpg --output out.png",
                     workdir)
        logging.info("  or fine-tune: %s", finetune_command(config, workdir))


# Shipped fine-tuning configs whose encoder is a shipped pretraining config's, on data this machine has:
# (dataset, image size, embed_dim) of the pretraining config -> the fine-tuning config.
_FINETUNE_CONFIGS = {
    ("synthetic", (32, 32), 32): "configs/finetune_tiny.py",
    ("demo", (64, 64), 128): "configs/demo_finetune.py",
    ("digits", (32, 32), 96): "configs/digits_finetune.py",
}
_RECIPES = {768: "B", 1024: "L", 1280: "H"}  # embed_dim -> the paper's fine-tuning recipes (configs/finetune_vit_*)


def finetune_command(config, workdir) -> str:
    """The fine-tuning command that loads this pretraining's encoder: a shipped config made for it (the tiny,
    demo and digits models), else the paper's recipe of the nearest size with the encoder fields that differ
    from it, on ImageNet for ImageNet runs, on the same folder for a folder of class folders, else on a
    labelled folder of the user's."""
    model = config.model
    shipped = _FINETUNE_CONFIGS.get((config.input.dataset, tuple(model.image_size), model.embed_dim))
    command = "python main.py --config {} --workdir FT_DIR --config.init_from=" + str(workdir)
    if shipped:
        return command.format(shipped)
    size = _RECIPES.get(model.embed_dim, "B")
    recipe = models.variant(f"{size}/{16 if size != 'H' else 14}", image_size=(224, 224))
    fields = set(models.classifier_fields(recipe)) - {"dtype", "attention", "ops", "remat", "scan_blocks"}
    overrides = [f"--config.model.{k}={_flag_value(model[k])}" for k in sorted(fields)
                 if k in model and _flag_value(model[k]) != _flag_value(recipe[k])]
    if config.input.dataset != "imagenet2012":
        folder = config.input.image_folder if config.input.dataset == "folder" else "LABELLED_FOLDER"
        overrides += ["--config.input.dataset=folder", f"--config.input.image_folder={folder}"]
    name = {"B": "base", "L": "large", "H": "huge"}[size]
    return " ".join([command.format(f"configs/finetune_vit_{name}.py"), *overrides])


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return str(value[0]) if len(set(value)) == 1 else ",".join(map(str, value))
    return str(value)
