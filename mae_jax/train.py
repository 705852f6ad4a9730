"""MAE pretraining: config checks, the lr schedule, AdamW, the pure train step, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` is everything `main.py` runs. Re-running the same command resumes
from the latest checkpoint in `workdir/checkpoints` and continues exactly as if it had never stopped. The
state, its sharded initialisation, compilation and the loop are the shared skeleton in `mae_jax/trainer.py`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from mae_jax import config_lib, input_pipeline, models, parallel, trainer
from mae_jax.trainer import TrainState

PyTree = Any


# -------------------------------------------------------------------------------------------------------
# Configuration checks, schedule, optimizer.
# -------------------------------------------------------------------------------------------------------


ConfigError = trainer.ConfigError
learning_rate_schedule = trainer.learning_rate_schedule


def validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> tuple[int, int]:
    """One-line ConfigErrors for impossible settings, before anything is compiled. Returns the mesh shape."""
    data, fsdp = trainer.validate_common(config, num_devices, process_count)
    try:
        models.MaskedAutoencoderViT(**config.model)  # the model checks its own fields
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return data, fsdp


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where the official recipe decays: every weight matrix and the cls/mask tokens; not biases
    nor LayerNorm scales (timm `add_weight_decay`: ndim <= 1 or `.bias` -> no decay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8, weight_decay=config.weight_decay,
                       mask=weight_decay_mask)


# -------------------------------------------------------------------------------------------------------
# The step.
# -------------------------------------------------------------------------------------------------------


def loss_fn(params: PyTree, frozen: PyTree, model: models.MaskedAutoencoderViT, images: jax.Array,
            noise: jax.Array) -> jax.Array:
    return model.apply({"params": params, "frozen": frozen}, images, noise=noise).loss


def _microbatches(x: jax.Array, accum: int, num_shards: int) -> jax.Array:
    """[B, ...] -> [accum, B / accum, ...] such that every micro-batch takes an equal slice of each
    device's rows (no data moves between devices)."""
    b = x.shape[0]
    x = x.reshape(num_shards, accum, b // (num_shards * accum), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum, b // accum, *x.shape[3:])


def train_step(state: TrainState, images: jax.Array, *, model: models.MaskedAutoencoderViT,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int,
               num_batch_shards: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the global batch `images` [B, H, W, C]. Pure; jit it with the state donated.

    Masking noise: example i of the batch at step s draws from fold_in(rng_stream(rng, "masking", s), i), so
    losses do not depend on devices, mesh shape, processes or gradient accumulation.
    """
    rng = trainer.rng_stream(jax.random.wrap_key_data(state.rng), "masking", state.step)
    noise = models.masking_noise(rng, images.shape[0], model)
    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
        loss, grads = grad_fn(state.params, state.frozen, model, images, noise)
    else:
        micro = (_microbatches(images, grad_accum_steps, num_batch_shards),
                 _microbatches(noise, grad_accum_steps, num_batch_shards))

        def accumulate(carry, batch):
            loss, grads = grad_fn(state.params, state.frozen, model, *batch)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))

    new_state, grad_norm = trainer.apply_gradients(state, loss, grads, tx)
    # Only what is cheap: a norm lowers to a reduction over every parameter, and on the CPU each costs as
    # much as a tenth of the ViT-B step. The loop adds param_norm on logging steps only.
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": grad_norm}
    return new_state, metrics


# -------------------------------------------------------------------------------------------------------
# State and compiled step of the MAE.
# -------------------------------------------------------------------------------------------------------


def _init_fn(model: models.MaskedAutoencoderViT):
    return functools.partial(models.init_variables, model)


def abstract_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct`s); nothing is allocated."""
    return trainer.abstract_state(_init_fn(model), tx)


def create_train_state(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation, seed: int,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shardings. Returns (state, its shardings)."""
    return trainer.create_state(_init_fn(model), tx, seed, mesh)


state_shardings = trainer.state_shardings


def lower_train_step(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation,
                     schedule: optax.Schedule, mesh: jax.sharding.Mesh, shardings: TrainState, *,
                     batch_size: int, grad_accum_steps: int = 1) -> jax.stages.Lowered:
    """`train_step` jitted for the global batch, the state donated, lowered but not compiled."""
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, grad_accum_steps=grad_accum_steps,
                             num_batch_shards=mesh.shape["data"] * mesh.shape["fsdp"])
    return trainer.lower_step(step, abstract_train_state(model, tx), shardings, (batch_size, *model.image_shape),
                              mesh)


def compile_train_step(model: models.MaskedAutoencoderViT, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: jax.sharding.Mesh, shardings: TrainState, *,
                       batch_size: int, grad_accum_steps: int = 1) -> jax.stages.Compiled:
    """`lower_train_step(...).compile()`: called with exactly these shapes and shardings, never recompiled."""
    return lower_train_step(model, tx, schedule, mesh, shardings, batch_size=batch_size,
                            grad_accum_steps=grad_accum_steps).compile()


# -------------------------------------------------------------------------------------------------------
# The run.
# -------------------------------------------------------------------------------------------------------


class Pretraining(trainer.Task):
    """MAE pretraining as a `trainer.Task`: masked-patch reconstruction on unlabelled images."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.model = models.MaskedAutoencoderViT(**config.model)

    def init_fn(self):
        return _init_fn(self.model)

    def batches(self, data_iter, mesh):
        for batch, input_state in super().batches(data_iter, mesh):
            yield batch["images"], input_state

    def make_optimizer(self, config, schedule):
        return make_optimizer(config, schedule)

    def compile_step(self, config, tx, schedule, mesh, shardings):
        return compile_train_step(self.model, tx, schedule, mesh, shardings, batch_size=config.batch_size,
                                  grad_accum_steps=config.grad_accum_steps)

    def hooks(self, context: trainer.RunContext, state: TrainState) -> list[trainer.Hook]:
        config = context.config
        if not config.visualize_every_steps:
            return []
        context.stage("Compiling the reconstructions of %d held-out images...", config.visualize_num_images)
        return [_reconstruction_hook(config, self.model, context.mesh, context.workdir, context.log,
                                     context.total_steps, state)]

    def summary(self, context: trainer.RunContext, last: dict[str, float]) -> None:
        if context.config.visualize_every_steps:
            logging.info("  reconstructions: %s", context.workdir / "reconstructions")
        logging.info("  next: python -m mae_jax.visualize --checkpoint %s --image YOUR_IMAGE.jpg --output out.png",
                     context.workdir)
        logging.info("  or fine-tune: python main.py --config configs/finetune_vit_base.py --workdir FT_DIR "
                     "--config.init_from=%s", context.workdir)


def _reconstruction_hook(config, model, mesh, workdir: epath.Path, log: trainer.MetricsLog, total_steps: int,
                         state: TrainState):
    """Reconstructions of held-out images every visualize_every_steps and at the end (PNG + TensorBoard),
    compiled now, so that the last one does not delay the end of the run."""
    from mae_jax import visualize  # PIL, only when asked for

    images = input_pipeline.load_eval_images(config.input, image_shape=model.image_shape, seed=config.seed,
                                             num_images=config.visualize_num_images)
    variables = trainer.abstract_like({"params": state.params, "frozen": state.frozen})
    reconstructions = visualize.TrainingReconstructions(model, images, mesh, workdir / "reconstructions",
                                                        seed=config.seed, variables=variables)

    def hook(step: int, state: TrainState) -> None:
        if step % config.visualize_every_steps == 0 or step == total_steps:
            log.write_image(step, "reconstructions", reconstructions(step, {"params": state.params,
                                                                            "frozen": state.frozen}))

    return hook


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Pretrains (or resumes) in `workdir`. Returns the last logged metrics."""
    config_lib.resolve(config)
    parallel.maybe_initialize_distributed()
    mesh_shape = validate_config(config, jax.device_count(), jax.process_count())
    return trainer.run(config, workdir, Pretraining(config), mesh_shape)
