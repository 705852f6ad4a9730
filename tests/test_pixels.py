"""mae_jax.pixels: the normalisation constants are the official ones, and denormalise inverts normalise."""

import numpy as np

from mae_jax import pixels


def test_constants_are_the_official_ones():
    # facebookresearch/mae main_pretrain.py: transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    np.testing.assert_array_equal(pixels.mean_std(3)[0], np.float32([0.485, 0.456, 0.406]))
    np.testing.assert_array_equal(pixels.mean_std(3)[1], np.float32([0.229, 0.224, 0.225]))
    np.testing.assert_array_equal(pixels.mean_std(1)[0], [0.5])
    np.testing.assert_array_equal(pixels.mean_std(1)[1], [0.25])


def test_denormalise_inverts_normalise():
    rng = np.random.default_rng(0)
    for c in (1, 3, 4):
        x = rng.uniform(size=(2, 5, 5, c)).astype(np.float32)
        y = pixels.normalise(x, c)
        assert not np.allclose(y, x)
        np.testing.assert_allclose(pixels.denormalise(y, c), x, atol=1e-6)
