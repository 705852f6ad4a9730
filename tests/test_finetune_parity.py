"""The fine-tuning train step against the official one, in PyTorch: models_vit.VisionTransformer (transcribed in
tests/torch_reference.py), timm's LabelSmoothingCrossEntropy and torch.optim.AdamW over the official
param_groups_lrd groups (transcribed in tests/test_optimizers.py), lr set per group as util/lr_sched.py does."""

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="the reference train step is PyTorch's (pip install torch)")
pytest.importorskip("transformers", reason="tests/torch_reference.py imports transformers (pip install transformers)")

import torch_reference  # noqa: E402
from test_optimizers import NO_WEIGHT_DECAY_LIST, param_groups_lrd  # noqa: E402

from configs import finetune_tiny  # noqa: E402
from mae_jax import convert, finetune, models, train_state  # noqa: E402

pytestmark = pytest.mark.slow
torch.set_num_threads(2)

TINY = models.variant("test/8", image_size=32)


def label_smoothing_cross_entropy(x, target, smoothing):
    """timm 0.3.2 timm/loss/cross_entropy.py LabelSmoothingCrossEntropy.forward."""
    confidence = 1. - smoothing
    logprobs = torch.nn.functional.log_softmax(x, dim=-1)
    nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1))
    nll_loss = nll_loss.squeeze(1)
    smooth_loss = -logprobs.mean(dim=-1)
    loss = confidence * nll_loss + smoothing * smooth_loss
    return loss.mean()


@pytest.mark.parametrize("global_pool", [True, False])
def test_two_train_steps_equal_official_adamw_with_layer_decay(global_pool):
    """Drop path and mixup off, label smoothing 0.1, layer decay 0.65, wd 0.05: the loss and every parameter
    after two steps equal PyTorch's within 1e-5."""
    num_classes, lr, steps = 10, 2e-3, 2
    config = finetune_tiny.get_config()
    config.layer_decay, config.weight_decay, config.label_smoothing = 0.65, 0.05, 0.1
    reference = torch_reference.official_vit(TINY, num_classes=num_classes, global_pool=global_pool)
    sd = torch_reference.randomize_(reference, seed=3)
    model = models.ViTClassifier(**models.classifier_fields(TINY, num_classes=num_classes, global_pool=global_pool))
    variables = convert.from_torch_variables(sd, model)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=8).astype(np.int32)

    groups, _ = param_groups_lrd(reference, config.weight_decay, NO_WEIGHT_DECAY_LIST, config.layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(config.b1, config.b2), eps=1e-8)
    reference.train()
    torch_losses = []
    for _ in range(steps):
        for group in opt.param_groups:  # util/lr_sched.adjust_learning_rate: lr * lr_scale
            group["lr"] = lr * group["lr_scale"]
        loss = label_smoothing_cross_entropy(reference(torch.from_numpy(images).permute(0, 3, 1, 2)),
                                             torch.from_numpy(labels).long(), config.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    schedule = optax.constant_schedule(lr)
    tx = finetune.make_optimizer(config, schedule, model)
    state = train_state.TrainState(step=np.int32(0), params=variables["params"], constants={}, batch_stats={},
                                   opt_state=tx.init(variables["params"]),
                                   rng=jax.random.key_data(jax.random.key(0)), nonfinite_step=np.int32(-1))
    step = jax.jit(lambda s, b: finetune.train_step(s, b, model=model, tx=tx, mix=None,
                                                    label_smoothing=config.label_smoothing))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, {"images": images, "labels": labels})
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, torch_losses, atol=1e-5, rtol=0)

    ours = convert.to_torch({"params": state.params}, model, format="official")
    theirs = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    moved = max(float(np.abs(theirs[k] - sd[k]).max()) for k in theirs)
    assert moved > 1e-3  # the steps moved the parameters far beyond the tolerance
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5, rtol=0, err_msg=k)
