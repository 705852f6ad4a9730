"""The paper's ablation switches of MaskedAutoencoderViT against PyTorch: a transcription of the official
`models_mae.py` on the official blocks (tests/official_mae.py) with "w/ [M]" (`encoder_mask_tokens`) and the
loss on all patches (`loss_on="all"`) added as the paper describes them. Loss, predictions and gradients."""

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests compare against PyTorch (pip install torch)")
pytest.importorskip("transformers", reason="torch_reference imports transformers (pip install transformers)")

import official_mae  # noqa: E402
from mae_jax import models  # noqa: E402

pytestmark = pytest.mark.slow  # PyTorch comparisons: not in the quick subset

torch.set_num_threads(2)


def _compare(fields, encoder_mask_tokens=False, loss_on_all=False, n=3, seed=0, mask_sampling="random"):
    """Loss, predictions and every gradient of ours and the official transcription, on the same weights and
    masks; returns (our loss, the largest gradient)."""
    fields = dict(fields, encoder_mask_tokens=encoder_mask_tokens, loss_on="all" if loss_on_all else "masked",
                  mask_sampling=mask_sampling)
    model = models.MaskedAutoencoderViT(**fields)
    ref = official_mae.official_mae(fields, encoder_mask_tokens, loss_on_all, seed=seed)
    variables = official_mae.to_flax(ref.state_dict(), model.depth, model.decoder_depth)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *model.image_shape)).astype(np.float32)
    noise = np.array(models.masking_noise(jax.random.key(seed), n, model))

    def loss_fn(params):
        out = model.apply({"params": params, "constants": variables["constants"]}, images, noise=noise)
        return out.loss, out

    (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    ref_loss, ref_pred, ref_mask, ref_latent = ref(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                   torch.from_numpy(noise), model.mask_ratio)
    ref_loss.backward()
    np.testing.assert_array_equal(np.asarray(out.mask), ref_mask.numpy())
    assert out.latent.shape == tuple(ref_latent.shape)
    np.testing.assert_allclose(np.asarray(out.pred), ref_pred.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), atol=1e-6, rtol=1e-6)
    ref_grads = official_mae.to_flax(official_mae.grads(ref), model.depth, model.decoder_depth)["params"]
    assert set(grads) == set(ref_grads)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)
    biggest = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads))
    assert biggest > 1e-3  # the comparison (atol 1e-5) is not between zeros
    return float(loss), grads, ref_grads


TINY = models.variant("test/8", image_size=32)


def test_transcription_equals_ours_by_default():
    """The transcription without switches is the official model: our default agrees with it (as with HF)."""
    _compare(dict(TINY, norm_pix_loss=True))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_encoder_mask_tokens_match_pytorch(norm_pix_loss):
    fields = dict(models.variant("test/8", image_size=48), norm_pix_loss=norm_pix_loss)
    _, grads, ref_grads = _compare(fields, encoder_mask_tokens=True)
    assert "encoder_mask_token" in grads and "mask_token" not in grads
    # Its gradient is small (~1e-4 here): also compared relative to its size.
    np.testing.assert_allclose(grads["encoder_mask_token"], ref_grads["encoder_mask_token"], rtol=1e-3, atol=1e-8)
    assert float(np.abs(grads["encoder_mask_token"]).max()) > 1e-5


def test_encoder_mask_tokens_with_block_masks_match_pytorch():
    _compare(dict(models.variant("test/8", image_size=64), norm_pix_loss=True), encoder_mask_tokens=True,
             mask_sampling="block")


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_on_all_patches_matches_pytorch(norm_pix_loss):
    loss, _, _ = _compare(dict(TINY, norm_pix_loss=norm_pix_loss), loss_on_all=True)
    masked, _, _ = _compare(dict(TINY, norm_pix_loss=norm_pix_loss))
    assert loss != masked  # the switch changes the loss


def test_both_switches_match_pytorch():
    _compare(dict(TINY, mask_ratio=0.5), encoder_mask_tokens=True, loss_on_all=True, n=2)
