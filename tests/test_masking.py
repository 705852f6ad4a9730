"""Tests of mask sampling (mae_jax/masking.py, models.masking_noise, models.mask_to_noise) and the variant fields'
checks: BEiT's block masks against two NumPy transcriptions of its MaskingGenerator (tests/beit_masking.py), grid
masks, exactly `len_keep` visible patches, the same masks on 1 and 8 devices, user-supplied masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import beit_masking
from mae_jax import masking, models


def _model(**overrides):
    return models.MaskedAutoencoderViT(**models.variant("test/16", **{"image_size": 224, **overrides}))


def _masks(noise, len_keep):
    """[N, L] noise -> [N, L] bool, True = removed, as `models.random_masking` decides."""
    noise = np.asarray(noise)
    removed = np.ones(noise.shape, bool)
    np.put_along_axis(removed, np.argsort(noise, axis=1, kind="stable")[:, :len_keep], False, axis=1)
    return removed


def _block_masks_and_tables(seed, n, grid, num_masking, rounds):
    """n JAX block masks [n, h, w] and the uniforms each read, [n, rounds, 10, 4]."""
    keys = jax.random.split(jax.random.key(seed), n)
    masks = jax.jit(jax.vmap(lambda k: masking.block_mask(k, grid, num_masking)))(keys)
    tables = jax.jit(jax.vmap(lambda k: jax.vmap(lambda r: masking.block_round_uniforms(k, r))(jnp.arange(rounds))))(
        keys)
    return np.asarray(masks), np.asarray(tables)


# --------------------------------------------------------------------------------------------------------
# Block masks.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, num_masking, n, distinct", [
    ((14, 14), 147, 1000, 0.99),  # ViT-B/16 at 224, mask ratio 0.75
    pytest.param((14, 14), 98, 1000, 0.99, marks=pytest.mark.slow),  # 0.5
    pytest.param((14, 14), 75, 1000, 0.99, marks=pytest.mark.slow),  # BEiT's own 75 of 196
    pytest.param((8, 12), 48, 1000, 0.9, marks=pytest.mark.slow),  # non-square
    pytest.param((4, 4), 12, 1000, 0.0, marks=pytest.mark.slow),  # smaller than BEiT's 16-patch minimum
])
def test_block_mask_equals_beit_fed_the_same_uniforms(grid, num_masking, n, distinct):
    """The same draws give the same masks as BEiT's MaskingGenerator code (transcribed to read a table)."""
    rounds = num_masking + 1  # a bound: every round but the last adds a patch
    masks, tables = _block_masks_and_tables(0, n, grid, num_masking, rounds)
    generator = beit_masking.TableMaskingGenerator(grid, num_masking, min_num_patches=16)
    for i in range(n):
        np.testing.assert_array_equal(masks[i], generator(tables[i]).astype(bool), err_msg=f"mask {i}")
    counts = masks.sum(axis=(1, 2))
    assert counts.max() == num_masking and (counts <= num_masking).all()  # never more than asked
    assert len({m.tobytes() for m in masks}) >= distinct * n  # and not one mask over and over


@pytest.mark.slow
def test_block_mask_distribution_matches_beit():
    """5,000 masks of ours and 5,000 of BEiT's code as written (Python's `random`): masked count, rectangles
    per mask and rectangle sizes agree (two-sample Kolmogorov-Smirnov). Ours are counted by the table
    transcription fed our uniforms, which the test above shows gives our masks exactly."""
    grid, num_masking, n = (14, 14), 147, 5000
    masks, tables = _block_masks_and_tables(1, n, grid, num_masking, 48)
    ours = beit_masking.TableMaskingGenerator(grid, num_masking, min_num_patches=16)
    for i in range(n):
        np.testing.assert_array_equal(masks[i], ours(tables[i]).astype(bool))
    import random

    random.seed(0)
    beit = beit_masking.MaskingGenerator(grid, num_masking, min_num_patches=16)
    theirs = np.stack([beit() for _ in range(n)])
    samples = {
        "masked count": (masks.sum(axis=(1, 2)), theirs.sum(axis=(1, 2))),
        "rectangles per mask": ([len(r) for r in ours.rectangles], [len(r) for r in beit.rectangles]),
        "rectangle sizes": (sum(ours.rectangles, []), sum(beit.rectangles, [])),
    }
    for name, (a, b) in samples.items():
        p = stats.ks_2samp(a, b).pvalue
        print(f"{name}: ours mean {np.mean(a):.3f}, BEiT {np.mean(b):.3f}, KS p = {p:.3f}")
        assert p > 0.01, (name, p)


@pytest.mark.parametrize("mask_sampling, mask_ratio", [
    pytest.param("block", 0.4, marks=pytest.mark.slow), pytest.param("block", 0.5, marks=pytest.mark.slow),
    ("block", 0.75), ("grid", 0.75), pytest.param("random", 0.75, marks=pytest.mark.slow)])
def test_exactly_len_keep_visible(mask_sampling, mask_ratio):
    model = _model(mask_sampling=mask_sampling, mask_ratio=mask_ratio)
    n, key = 64, jax.random.key(3)
    noise = np.asarray(jax.jit(lambda k: models.masking_noise(k, n, model))(key))
    assert noise.shape == (n, 196) and 0 <= noise.min() and noise.max() < 1
    removed = _masks(noise, model.len_keep)
    np.testing.assert_array_equal(removed.sum(axis=1), 196 - model.len_keep)
    if mask_sampling == "block":  # every block is removed (example i's from fold_in(key, i)); the rest at random
        blocks = jax.jit(jax.vmap(lambda i: masking.block_mask(
            jax.random.split(jax.random.fold_in(key, i))[0], (14, 14), 196 - model.len_keep)))(jnp.arange(n))
        blocks = np.asarray(blocks).reshape(n, 196)
        assert (removed | ~blocks).all() and blocks.sum(axis=1).min() > 0


def test_model_without_noise_draws_its_masks():
    """`model.apply` without `noise` draws `masking_noise` from its "masking" rng (a key flax derives from it)."""
    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=64, mask_sampling="grid"))
    variables = models.init_variables(model, jax.random.key(0))
    out = jax.jit(lambda k: model.apply(variables, np.zeros((4, 64, 64, 3), np.float32), rngs={"masking": k}))(
        jax.random.key(1))
    for mask in np.asarray(out.mask).reshape(4, 8, 8):
        rows, cols = np.nonzero(mask == 0)
        assert len(rows) == 16 and len({(r % 2, c % 2) for r, c in zip(rows, cols)}) == 1  # one per 2 x 2 cell


@pytest.mark.parametrize("mask_sampling", ["block", pytest.param("grid", marks=pytest.mark.slow),
                                           pytest.param("random", marks=pytest.mark.slow)])
def test_masks_identical_on_1_and_8_devices(mask_sampling):
    """The step's noise computed with the batch sharded over 8 devices equals the single-device result, and an
    example's noise depends only on its index in the global batch."""
    model = _model(mask_sampling=mask_sampling)
    key, n = jax.random.key(7), 32
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    fn = lambda k: models.masking_noise(k, n, model)  # noqa: E731
    on_eight = jax.jit(fn, out_shardings=sharded)(key)
    on_one = jax.jit(fn, out_shardings=one)(key)
    assert len(on_eight.sharding.device_set) == 8 and len(on_one.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(on_eight), np.asarray(on_one))
    tail = models.masking_noise(key, 8, model, offset=24)  # the last device's share, computed alone
    np.testing.assert_array_equal(np.asarray(tail), np.asarray(on_one)[24:])


# --------------------------------------------------------------------------------------------------------
# Grid masks.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, mask_ratio, cell", [(224, 0.75, 2), (96, 8 / 9, 3)])
def test_grid_keeps_one_patch_per_cell_at_a_uniform_offset(image_size, mask_ratio, cell):
    model = _model(image_size=image_size, mask_sampling="grid", mask_ratio=mask_ratio)
    h, w = model.grid_size
    assert model.len_keep == h * w // cell**2
    n = 4000
    removed = _masks(jax.jit(lambda k: models.masking_noise(k, n, model))(jax.random.key(0)), model.len_keep)
    offsets = []
    for mask in removed.reshape(n, h, w):
        rows, cols = np.nonzero(~mask)
        dy, dx = rows[0] % cell, cols[0] % cell
        expected = np.ones((h, w), bool)
        expected[dy::cell, dx::cell] = False  # one visible patch in every cell, at the same offset
        np.testing.assert_array_equal(mask, expected)
        offsets.append(dy * cell + dx)
    counts = np.bincount(offsets, minlength=cell * cell)
    p = stats.chisquare(counts).pvalue
    assert p > 0.001, (counts, p)


# --------------------------------------------------------------------------------------------------------
# User-supplied masks.
# --------------------------------------------------------------------------------------------------------


def test_mask_to_noise_reproduces_a_full_mask_and_completes_others():
    keep = np.zeros((14, 14), bool)
    keep[3:10, 3:10] = True  # a chosen region of 49 patches
    user = np.broadcast_to(~keep.reshape(-1), (2, 196))
    np.testing.assert_array_equal(_masks(models.mask_to_noise(user), 49), user)
    np.testing.assert_array_equal(_masks(models.mask_to_noise(user, jax.random.key(0)), 49), user)

    # Too few removed (only the top 4 rows): 49 of the 140 other patches stay, the rest are removed too.
    few = np.zeros((4000, 196), bool)
    few[:, :56] = True
    removed = _masks(models.mask_to_noise(few, jax.random.key(1)), 49)
    assert removed[:, :56].all() and (removed.sum(axis=1) == 147).all()
    p = stats.chisquare(removed[:, 56:].sum(axis=0)).pvalue  # which of the others: uniformly random
    assert p > 0.001, p
    # Without a key, deterministic: the first visible patches in patch order are kept.
    removed = _masks(models.mask_to_noise(few[:1]), 49)[0]
    assert not removed[56:105].any() and removed[105:].all()

    # Too many removed (all but 10): 39 of them are put back.
    many = np.ones((1, 196), bool)
    many[0, :10] = False
    removed = _masks(models.mask_to_noise(many, jax.random.key(2)), 49)[0]
    assert not removed[:10].any() and removed.sum() == 147


def test_random_sampling_is_per_example_uniform():
    """The default draws exactly what the train step drew before mask_sampling existed."""
    model = _model()
    key = jax.random.key(5)
    np.testing.assert_array_equal(models.masking_noise(key, 6, model),
                                  models.per_example_uniform(key, 6, model.num_patches))
    np.testing.assert_array_equal(models.masking_noise(key, 2, model, offset=4),
                                  models.per_example_uniform(key, 2, model.num_patches, offset=4))


# --------------------------------------------------------------------------------------------------------
# Fields.
# --------------------------------------------------------------------------------------------------------


def test_parameters_of_the_switches():
    default = jax.eval_shape(functools.partial(models.init_variables, _model()), jax.random.key(0))["params"]
    with_m = jax.eval_shape(functools.partial(models.init_variables, _model(encoder_mask_tokens=True)),
                            jax.random.key(0))["params"]
    assert "mask_token" in default and "encoder_mask_token" not in default
    assert "mask_token" not in with_m and with_m["encoder_mask_token"].shape == (1, 1, 32)
    assert set(default) - {"mask_token"} == set(with_m) - {"encoder_mask_token"}
    fields = models.variant("B/16")
    assert (fields["mask_sampling"], fields["encoder_mask_tokens"], fields["loss_on"]) == ("random", False, "masked")


@pytest.mark.parametrize("overrides, words", [
    (dict(mask_sampling="blocks"), ["mask_sampling", "'blocks'", "'random', 'block', 'grid'"]),
    (dict(mask_sampling="grid", mask_ratio=0.6), ["mask_ratio 0.6", "'grid'", "1 - 1/s^2", "0.75"]),
    (dict(mask_sampling="grid", image_size=208), ["'grid'", "2 x 2", "(13, 13)", "image_size 208"]),
    (dict(mask_sampling="block", image_size=(16, 224)), ["'block'", "2 x 2", "(1, 14)"]),
    (dict(encoder_mask_tokens="yes"), ["encoder_mask_tokens", "'yes'", "True or False"]),
    (dict(loss_on="visible"), ["loss_on", "'visible'", "'masked', 'all'"]),
])
def test_bad_variant_settings_fail_at_construction(overrides, words):
    with pytest.raises(ValueError) as info:
        _model(**overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
