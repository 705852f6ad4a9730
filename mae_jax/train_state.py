"""The training state every task shares: its fields, random streams, shardings, the update, the lr schedule.

Variables. One shape everywhere: flax's variables dict, what `model.apply` takes and what checkpoints, exports
and the converters hold. Its collections, each with one meaning:
  params       trained by the optimizer;
  constants    fixed, never updated: the MAE's sin-cos position tables (kept as variables so that converted
               or interpolated tables survive checkpoints);
  batch_stats  updated by the train step itself, not by the optimizer: the linear probe's BatchNorm statistics.
`TrainState` keeps each collection in its own field (flax's imagenet example keeps `batch_stats` the same way);
`TrainState.variables` is the dict again.

Random streams. A run has one base key, `jax.random.key(config.seed)`, kept in the state. Every use draws from
its own named stream of it (`rng_stream`): `stream = fold_in(base, crc32(name))`, and a per-step stream is
`fold_in(stream, step)`. The names in use are `RNG_STREAMS`; a new use adds a name, never reuses one, so no two
uses ever share random numbers.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from mae_jax import parallel

PyTree = Any
InitFn = Callable[[jax.Array], Mapping[str, PyTree]]  # key -> variables {"params", "constants"?, "batch_stats"?}
COLLECTIONS = ("params", "constants", "batch_stats")

# "params": initialisation; "masking": the MAE's per-example masks; "drop_path": stochastic depth; "mixup":
# Mixup / CutMix draws; "random_erasing": the noise that fills RandomErasing's boxes (fine-tuning).
RNG_STREAMS = ("params", "masking", "drop_path", "mixup", "random_erasing")


def rng_stream(rng: jax.Array, name: str, step: jax.Array | int | None = None) -> jax.Array:
    """The key of stream `name` of the run key `rng` (and of `step` of it, if given)."""
    if name not in RNG_STREAMS:
        raise ValueError(f"random stream {name!r} is not one of {RNG_STREAMS}")
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return key if step is None else jax.random.fold_in(key, step)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken
    params: PyTree  # trained by the optimizer
    constants: PyTree  # never updated (the MAE's position tables); {} if the model has none
    batch_stats: PyTree  # updated by the step, not the optimizer (the probe's BatchNorm); {} if none
    opt_state: PyTree
    rng: jax.Array  # uint32 key data of the run's base key; see rng_stream
    nonfinite_step: jax.Array  # int32 []: first step (1-based, as logged) with a non-finite loss or gradient, else -1

    @property
    def variables(self) -> dict[str, PyTree]:
        """The flax variables dict (`model.apply`'s first argument): the non-empty collections."""
        return {name: getattr(self, name) for name in COLLECTIONS if name == "params" or getattr(self, name)}

    def replace_variables(self, variables: Mapping[str, PyTree]) -> "TrainState":
        """The state with `variables`' collections replacing its own (the optimizer state is kept)."""
        return self.replace(**_collections(variables))


def _collections(variables: Mapping[str, PyTree]) -> dict[str, PyTree]:
    unknown = set(variables) - set(COLLECTIONS)
    if unknown or "params" not in variables:
        raise ValueError(f"variables hold the collections {sorted(variables)}: expected 'params' and optionally "
                         f"{COLLECTIONS[1:]}")
    return {name: variables.get(name, {}) for name in COLLECTIONS}


# -------------------------------------------------------------------------------------------------------
# State: initialisation straight into its shardings.
# -------------------------------------------------------------------------------------------------------


def init_state(init_variables: InitFn, tx: optax.GradientTransformation, seed) -> TrainState:
    """A fresh state: variables from the run's "params" stream, the optimizer's initial state."""
    rng = jax.random.key(seed)
    variables = _collections(init_variables(rng_stream(rng, "params")))
    return TrainState(step=jnp.zeros((), jnp.int32), **variables, opt_state=tx.init(variables["params"]),
                      rng=jax.random.key_data(rng), nonfinite_step=jnp.full((), -1, jnp.int32))


def abstract_state(init_variables: InitFn, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state (`jax.ShapeDtypeStruct`s); nothing is allocated."""
    return jax.eval_shape(functools.partial(init_state, init_variables, tx), 0)


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """Parameters and their optimizer moments by `parallel.FSDP_RULES`; everything else replicated."""
    replicated = parallel.replicated(mesh)
    params = parallel.param_shardings(abstract.params, mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # leaves a partial optimizer does not train: no state
    opt_state = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, abstract.opt_state, params,
                                      transform_non_params=lambda _: replicated, is_leaf=masked)
    every = lambda tree: jax.tree_util.tree_map(lambda _: replicated, tree)
    return TrainState(step=replicated, params=params, constants=every(abstract.constants),
                      batch_stats=every(abstract.batch_stats), opt_state=opt_state, rng=replicated,
                      nonfinite_step=replicated)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying their shardings (what Orbax restores into and `jit.lower` takes)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                  shardings)


# -------------------------------------------------------------------------------------------------------
# The update.
# -------------------------------------------------------------------------------------------------------


def apply_gradients(state: TrainState, loss: jax.Array, grads: PyTree, tx: optax.GradientTransformation,
                    param_shardings: PyTree | None = None,
                    batch_stats: PyTree | None = None) -> tuple[TrainState, jax.Array]:
    """One optimizer update of `state` (and its `batch_stats`, if given), unless the loss or the gradient is
    non-finite. Returns (new state, global gradient norm).

    `param_shardings` (the parameters' shardings) pins the gradients to them: with FSDP, XLA then sums each
    gradient over the devices with a reduce-scatter into the shards each device updates, instead of an
    all-reduce of the whole gradient followed by a slice.

    After a non-finite loss the state stops changing, so what the host saves or reports is the last good
    state; `nonfinite_step` records the (1-based) step and the loop raises at its next check, naming it.
    """
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

    def update(operands):
        grads, params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A cond rather than a select of new and old values: the update then reads each donated buffer once and
    # writes it in place (a select made XLA copy the whole optimizer state first, 6% of the CPU step).
    params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[1:],
                                     (grads, state.params, state.opt_state))
    if batch_stats is None:
        batch_stats = state.batch_stats
    else:
        batch_stats = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), batch_stats,
                                             state.batch_stats)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step))
    return new_state, grad_norm


# -------------------------------------------------------------------------------------------------------
# The learning-rate schedule (shared by pretraining, fine-tuning and the linear probe).
# -------------------------------------------------------------------------------------------------------


def peak_lr(config) -> float:
    """The official linear scaling rule: base_lr * batch_size / 256."""
    return config.base_lr * config.batch_size / 256


def warmup_steps(config, steps_per_epoch: int) -> int:
    """Steps of the linear warmup: warmup_epochs of steps_per_epoch, rounded."""
    return int(round(config.warmup_epochs * steps_per_epoch))


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-step linear warmup from 0, then half-cycle cosine to min_lr (the official `lr_sched`).

    Step s is at epoch s / steps_per_epoch, as the official code adjusts the lr at every iteration.
    """
    peak, warmup = peak_lr(config), warmup_steps(config, steps_per_epoch)
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1), alpha=config.min_lr / peak)
    if warmup == 0:
        return cosine
    # Not optax.linear_schedule: its `end - end * (1 - t)` form loses ~1e-4 relative in float32 early on.
    ramp = lambda step: peak * jnp.minimum(step, warmup).astype(jnp.float32) / warmup
    return optax.join_schedules([ramp, cosine], [warmup])
