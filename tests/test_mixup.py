"""mae_jax.mixup against transcriptions of timm 0.3.2 `timm/data/mixup.py` and `timm/loss/cross_entropy.py`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from mae_jax import mixup

pytestmark = pytest.mark.slow  # statistics over many draws: not in the quick subset

# -------------------------------------------------------------------------------------------------------
# The oracle: timm 0.3.2, transcribed. np.random draws become arguments (the centre of rand_bbox, lam and
# use_cutmix of _params_per_batch); `device` is the CPU.
# -------------------------------------------------------------------------------------------------------


def timm_rand_bbox(img_shape, lam, cy, cx, margin=0.):
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + cut_h // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def timm_cutmix_bbox_and_lam(img_shape, lam, cy, cx, correct_lam=True):
    yl, yu, xl, xu = timm_rand_bbox(img_shape, lam, cy, cx)
    if correct_lam:
        bbox_area = (yu - yl) * (xu - xl)
        lam = 1. - bbox_area / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


def timm_mix_batch(x, lam, use_cutmix, cy, cx):
    """Mixup._mix_batch after _params_per_batch; x is a torch [N, C, H, W] tensor, mixed in place."""
    if lam == 1.:
        return 1.
    if use_cutmix:
        (yl, yh, xl, xh), lam = timm_cutmix_bbox_and_lam(x.shape, lam, cy, cx)
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        x_flipped = x.flip(0).mul_(1. - lam)
        x.mul_(lam).add_(x_flipped)
    return lam


def timm_one_hot(torch, x, num_classes, on_value=1., off_value=0., device='cpu'):
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value, device=device).scatter_(1, x, on_value)


def timm_mixup_target(torch, target, num_classes, lam=1., smoothing=0.0, device='cpu'):
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    y1 = timm_one_hot(torch, target, num_classes, on_value=on_value, off_value=off_value, device=device)
    y2 = timm_one_hot(torch, target.flip(0), num_classes, on_value=on_value, off_value=off_value, device=device)
    return y1 * lam + y2 * (1. - lam)


# -------------------------------------------------------------------------------------------------------
# The pure core.
# -------------------------------------------------------------------------------------------------------


def test_bbox_from_center_equals_rand_bbox_for_every_centre():
    img_h, img_w = 12, 10
    # Random float32 lams: timm takes int(size * sqrt(1 - lam)) in float64, we in float32; they can differ
    # only when size * sqrt(1 - lam) lies within float32 rounding of an integer, which these do not.
    lams = np.concatenate([[0., 0.75, 1.], np.random.default_rng(0).uniform(size=200)]).astype(np.float32)
    cy, cx = np.meshgrid(np.arange(img_h), np.arange(img_w), indexing="ij")
    ours = jax.jit(jax.vmap(lambda lam: mixup.bbox_from_center(cy, cx, lam, (img_h, img_w))))(lams)
    for i, lam in enumerate(lams):
        expected = timm_rand_bbox((img_h, img_w), float(lam), cy, cx)
        for name, a, b in zip("yl yh xl xh".split(), ours, expected):
            np.testing.assert_array_equal(np.asarray(a[i]), b, err_msg=f"{name} at lam {lam}")


CASES = [  # (lam as drawn, use_cutmix, centre y, centre x)
    (0.3, False, 0, 0),
    (0.8137, False, 0, 0),
    (0.4, True, 5, 4),
    (0.25, True, 0, 9),  # box clipped by the top and right borders: lam corrected
    (0.9, True, 11, 0),
    (1.0, False, 0, 0),  # no mixing
]


def assert_blend_close(ours, expected, lam, a, a_reversed, atol=0.0):
    """lam * a + (1 - lam) * a_reversed, ours vs timm's. XLA contracts it into a fused multiply-add (one
    rounding where torch also rounds the product), so the two differ by up to ~1.5 float32 ulps of the
    terms' size; we allow 2 (2**-22 relative). `atol` for a lam that timm holds in float64."""
    bound = 2.0**-22 * (np.abs(lam * a) + np.abs((1 - lam) * a_reversed)) + atol
    assert (np.abs(ours - expected) <= bound).all(), np.abs(ours - expected).max()


@pytest.mark.parametrize("lam,use_cutmix,cy,cx", CASES)
def test_mix_equals_timm_mix_batch_and_mixup_target(lam, use_cutmix, cy, cx):
    torch = pytest.importorskip("torch", reason="the oracle is timm's Mixup, written for torch tensors")
    n, c, h, w, classes, smoothing = 8, 3, 12, 10, 7, 0.1
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, h, w, c)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    lam = float(np.float32(lam))  # the lam we draw is float32; give timm the same number

    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    lam_timm = timm_mix_batch(x, lam, use_cutmix, cy, cx)
    target = timm_mixup_target(torch, torch.from_numpy(labels), classes, lam_timm, smoothing).numpy()

    box = mixup.bbox_from_center(jnp.int32(cy), jnp.int32(cx), jnp.float32(lam), (h, w))
    lam_ours = mixup.corrected_lam(box, (h, w)) if use_cutmix else jnp.float32(lam)
    assert np.float32(lam_ours) == np.float32(lam_timm)
    targets = mixup.smooth_one_hot(jnp.asarray(labels), classes, smoothing)
    mixed, mixed_targets = jax.jit(mixup.mix)(jnp.asarray(images), targets, lam_ours, box,
                                              jnp.asarray(use_cutmix))
    expected = x.numpy().transpose(0, 2, 3, 1)
    if use_cutmix or lam == 1.:  # a pure select: bit-exact
        np.testing.assert_array_equal(np.asarray(mixed), expected)
    else:
        assert_blend_close(np.asarray(mixed), expected, lam, images, images[::-1])
    # timm's corrected CutMix lam is float64 and so is its 1 - lam; ours is float32, within 2**-24 of it.
    y = np.asarray(targets)
    assert_blend_close(np.asarray(mixed_targets), target, float(lam_ours), y, y[::-1],
                       atol=2.0**-24 if use_cutmix else 0.0)


def test_cutmix_lam_correction_equals_timm():
    h, w = 12, 10
    for lam in np.random.default_rng(1).uniform(size=20).astype(np.float32):
        key = jax.random.key(int(lam * 1e6))
        (yl, yh, xl, xh), lam_ours = mixup.cutmix_bbox_and_lam(key, jnp.float32(lam), (h, w))
        # Recover the centre from the unclipped side of the box, then ask timm.
        ratio = np.sqrt(1 - float(lam))
        cy = int(yl) + int(h * ratio) // 2 if int(yl) > 0 else int(yh) - int(h * ratio) // 2
        cx = int(xl) + int(w * ratio) // 2 if int(xl) > 0 else int(xh) - int(w * ratio) // 2
        box, lam_timm = timm_cutmix_bbox_and_lam((h, w), float(lam), cy, cx)
        assert tuple(int(v) for v in (yl, yh, xl, xh)) == tuple(int(v) for v in box)
        np.testing.assert_allclose(float(lam_ours), lam_timm, rtol=0, atol=6e-8)  # float32 vs float64


def test_smooth_one_hot_equals_timm_one_hot():
    torch = pytest.importorskip("torch", reason="the oracle is timm's one_hot, written for torch tensors")
    labels = np.array([0, 3, 999, 17, 3, 500])
    for smoothing in (0.0, 0.1, 0.3):
        off = smoothing / 1000
        expected = timm_one_hot(torch, torch.from_numpy(labels), 1000, 1. - smoothing + off, off)
        np.testing.assert_array_equal(np.asarray(mixup.smooth_one_hot(jnp.asarray(labels), 1000, smoothing)),
                                      expected.numpy())


def test_soft_target_cross_entropy_equals_timm():
    torch = pytest.importorskip("torch", reason="the oracle is timm's SoftTargetCrossEntropy (torch)")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 10)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(10), size=8).astype(np.float32)
    x, t = torch.from_numpy(logits), torch.from_numpy(targets)
    expected = torch.sum(-t * torch.nn.functional.log_softmax(x, dim=-1), dim=-1).mean()
    np.testing.assert_allclose(float(mixup.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))),
                               float(expected), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------------------
# The random draws: statistics over many keys. Tolerances: 5 standard errors for proportions; the
# Kolmogorov-Smirnov statistic below its 0.1% critical value (1.95 / sqrt(n); two-sample
# 1.95 sqrt((n + m) / (n m))). The keys are fixed, so the tests are deterministic; the bounds say how
# unlikely a correct sampler would fail. Each Mixup setting compiles a Beta sampler (seconds): few settings.
# -------------------------------------------------------------------------------------------------------

N_DRAWS = 20000
IMAGE_HW = (32, 32)
RECIPE = mixup.Mixup(num_classes=10)  # mixup 0.8, cutmix 1.0, switch_prob 0.5, prob 1, smoothing 0.1


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draws(mix_fn, n, key):
    return jax.vmap(lambda k: mix_fn.sample(k, IMAGE_HW))(jax.random.split(key, n))


@functools.cache
def draws(mix_fn):
    """(lam, box, use_cutmix) of `mix_fn.sample(k, IMAGE_HW)` for k in split(key(0), N_DRAWS)."""
    lam, box, use_cutmix = _draws(mix_fn, N_DRAWS, jax.random.key(0))
    return np.asarray(lam, np.float64), [np.asarray(b) for b in box], np.asarray(use_cutmix)


def timm_cutmix_lams(m, alpha=1.0, seed=0):
    """timm's area-corrected CutMix lam: lam ~ Beta(alpha, alpha), a uniform integer centre (numpy)."""
    rng = np.random.default_rng(seed)
    raw = rng.beta(alpha, alpha, size=m)
    cy, cx = rng.integers(0, IMAGE_HW[0], size=m), rng.integers(0, IMAGE_HW[1], size=m)
    return np.array([timm_cutmix_bbox_and_lam(IMAGE_HW, *args)[1] for args in zip(raw, cy, cx)])


def assert_same_distribution(ours, theirs):
    n, m = ours.size, theirs.size
    assert scipy.stats.ks_2samp(ours, theirs).statistic < 1.95 * np.sqrt((n + m) / (n * m))
    assert abs(ours.mean() - theirs.mean()) < 5 * np.sqrt(ours.var() / n + theirs.var() / m)


def assert_beta(lam, alpha):
    assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).statistic < 1.95 / np.sqrt(lam.size)


def test_recipe_draws_switch_prob_and_lam_distributions():
    lam, _, use_cutmix = draws(RECIPE)
    assert abs(use_cutmix.mean() - 0.5) < 5 * np.sqrt(0.25 / N_DRAWS)
    assert_beta(lam[~use_cutmix], 0.8)  # Mixup's lam ~ Beta(0.8, 0.8)
    assert_same_distribution(lam[use_cutmix], timm_cutmix_lams(N_DRAWS))  # CutMix's corrected lam


def test_mixup_only_with_prob():
    lam, _, use_cutmix = draws(mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.3))
    assert not use_cutmix.any()
    mixed = lam < 1  # the batch is left alone (lam exactly 1) with probability 1 - prob
    assert abs(mixed.mean() - 0.3) < 5 * np.sqrt(0.21 / N_DRAWS)
    assert_beta(lam[mixed], 0.8)


def test_cutmix_only():
    lam, (yl, yh, xl, xh), use_cutmix = draws(mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0))
    assert use_cutmix.all()
    np.testing.assert_allclose(lam, 1 - (yh - yl) * (xh - xl) / np.prod(IMAGE_HW), rtol=0, atol=1e-7)
    assert_same_distribution(lam, timm_cutmix_lams(N_DRAWS, seed=1))


def test_box_centre_is_uniform():
    # With cut side 2 the box is [c - 1, c + 1) clipped, so its lower-right corner gives the centre c exactly.
    h, w = IMAGE_HW
    lam = jnp.float32(1 - (2.5 / h) ** 2)
    keys = jax.random.split(jax.random.key(3), N_DRAWS)
    yl, yh, xl, xh = jax.jit(jax.vmap(lambda k: mixup.cutmix_bbox_and_lam(k, lam, IMAGE_HW)[0]))(keys)
    assert (np.asarray(yh) - np.asarray(yl) <= 2).all()
    for centre, size in ((np.asarray(yh) - 1, h), (np.asarray(xh) - 1, w)):
        counts = np.bincount(centre, minlength=size)
        assert counts.size == size  # every centre in [0, size), none outside
        assert scipy.stats.chisquare(counts).pvalue > 1e-4  # a uniform histogram


# -------------------------------------------------------------------------------------------------------
# The whole batch: jit, devices, even size.
# -------------------------------------------------------------------------------------------------------

BATCH = 16
MIX_RECIPE = jax.jit(RECIPE)


def batch():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, *IMAGE_HW, 3)).astype(np.float32)
    labels = rng.integers(0, RECIPE.num_classes, size=BATCH).astype(np.int32)
    return images, labels


def test_mixup_call_equals_timm_for_its_draws():
    torch = pytest.importorskip("torch", reason="the oracle is timm's Mixup, written for torch tensors")
    images, labels = batch()
    keys = jax.random.split(jax.random.key(0), N_DRAWS)
    lams, (yl, yh, xl, xh), use_cutmix = draws(RECIPE)  # what sample(keys[i]) drew
    device = jax.devices()[0]
    for i in range(6):
        mixed, targets = MIX_RECIPE(keys[i], jax.device_put(images, device), jax.device_put(labels, device))
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        if use_cutmix[i]:  # timm's CutMix branch with our box (the centre is the only free draw)
            x[:, :, yl[i]:yh[i], xl[i]:xh[i]] = x.flip(0)[:, :, yl[i]:yh[i], xl[i]:xh[i]]
            np.testing.assert_array_equal(np.asarray(mixed), x.numpy().transpose(0, 2, 3, 1))
        else:
            timm_mix_batch(x, float(np.float32(lams[i])), False, 0, 0)
            assert_blend_close(np.asarray(mixed), x.numpy().transpose(0, 2, 3, 1), lams[i], images, images[::-1])
        target = timm_mixup_target(torch, torch.from_numpy(labels), RECIPE.num_classes, float(np.float32(lams[i])),
                                   RECIPE.label_smoothing).numpy()
        y = np.asarray(mixup.smooth_one_hot(labels, RECIPE.num_classes, RECIPE.label_smoothing))
        assert_blend_close(np.asarray(targets), target, lams[i], y, y[::-1])
    assert set(use_cutmix[:6]) == {True, False}  # both branches exercised


def test_result_does_not_depend_on_devices_or_sharding():
    devices = jax.devices()
    assert len(devices) == 8
    images, labels = batch()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    keys = jax.random.split(jax.random.key(0), N_DRAWS)
    worst = 0.0
    for i in range(6):  # both CutMix and Mixup among them (checked above)
        one = MIX_RECIPE(keys[i], jax.device_put(images, devices[0]), jax.device_put(labels, devices[0]))
        eight = MIX_RECIPE(keys[i], jax.device_put(images, sharded), jax.device_put(labels, sharded))
        assert len(eight[0].sharding.device_set) == 8
        for a, b in zip(one, eight):
            worst = max(worst, float(np.abs(np.asarray(a) - np.asarray(b)).max()))
    assert worst <= 1e-6


def test_odd_batch_and_bad_settings_raise():
    with pytest.raises(ValueError, match="even batch size, got 5"):
        mixup.Mixup(num_classes=3)(jax.random.key(0), jnp.zeros((5, 4, 4, 3)), jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="must be > 0"):
        mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)
