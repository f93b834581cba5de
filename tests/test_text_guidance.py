"""Text-guided CoDi (issue 18): per-example prompt embeddings in the batch, classifier-free
guidance of the CoDi target and the pixel-space d_x option, checked on known networks whose
outputs are exact small numbers, so each identity holds bit for bit.

The known network (epsilon-prediction, or "sample" for the d_x checks) outputs, at every pixel,
the mean of the prompt embedding it reads: the batch's per-example one, or its stored one
(`params["stored"]`, the empty prompt's) when the condition carries none. With the stored
embedding 1 and the per-example ones 3 and 5 (the two examples), cond = (3, 5) and uncond = 1, so
guidance w gives 1 + w (cond - 1) and the swapped split (the released code's) 3 + w (1 - 3)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdd_jax.config import presets
from cdd_jax.config.validate import validate_config
from cdd_jax.diffusion import get_schedule
from cdd_jax.distill.codi import codi_loss, guided_output, unconditional, unpack_batch
from cdd_jax.distill.config import distill_config

SCHEDULE = get_schedule("scaled_linear")
B, H, C, T, D = 2, 4, 4, 3, 2


def known_net(params, z, t, cond, rng):
    """Output = the mean of the prompt embedding read (per example), at every pixel."""
    del t, rng
    if isinstance(cond, Mapping) and cond.get("prompt_embeds") is not None:
        e = jnp.mean(cond["prompt_embeds"], axis=(1, 2))
    else:
        e = jnp.broadcast_to(jnp.mean(params["stored"]), (z.shape[0],))
    return jnp.broadcast_to(e[:, None, None, None], z.shape) + params["bias"]


PARAMS = {"stored": jnp.ones((1, T, D)), "bias": jnp.zeros(())}
PROMPTS = jnp.stack([jnp.full((T, D), 3.0), jnp.full((T, D), 5.0)])


def _batch(with_prompts=True):
    batch = {"image": jax.random.normal(jax.random.key(0), (B, H, H, C)),
             "cond": jnp.zeros((B, 2 * H, 2 * H, 3))}
    if with_prompts:
        batch["prompt_embeds"] = PROMPTS
    return batch


def _cfg(**kw) -> ml_collections.ConfigDict:
    cfg = distill_config()
    cfg.update({"boundary": "target", "num_grid_steps": 10, "lambda_x": 0.0, **kw})
    return cfg


def test_batch_prompt_embeds_reach_the_network_and_uncond_drops_them():
    x, cond = unpack_batch(_batch())
    assert x.shape == (B, H, H, C) and set(cond) == {"image", "prompt_embeds"}
    z = jnp.zeros_like(x)
    np.testing.assert_array_equal(known_net(PARAMS, z, 0.5, cond, None)[:, 0, 0, 0], [3.0, 5.0])
    uncond = unconditional(cond)
    assert uncond is cond["image"]  # the condition image stays; the text goes
    np.testing.assert_array_equal(known_net(PARAMS, z, 0.5, uncond, None), 1.0)
    # Without prompt embeddings the condition is the image itself (every earlier job).
    assert not isinstance(unpack_batch(_batch(False))[1], Mapping)
    with pytest.raises(ValueError, match="needs a condition image"):
        unpack_batch({"image": x, "prompt_embeds": PROMPTS})


@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 7.5])
def test_guided_output_is_uncond_plus_w_times_the_difference(w):
    _, cond = unpack_batch(_batch())
    z = jnp.zeros((B, H, H, C))
    cond_out = known_net(PARAMS, z, 0.5, cond, None)
    uncond_out = known_net(PARAMS, z, 0.5, unconditional(cond), None)
    got = guided_output(known_net, PARAMS, z, 0.5, cond, w)
    np.testing.assert_array_equal(got, uncond_out + w * (cond_out - uncond_out))
    np.testing.assert_array_equal(got[:, 0, 0, 0], [1 + w * 2, 1 + w * 4])
    if w == 2.0:  # the known answer 2 cond - uncond; the swapped split gives 2 uncond - cond
        np.testing.assert_array_equal(got, 2 * cond_out - uncond_out)
        assert not np.array_equal(got, 2 * uncond_out - cond_out)


def test_guidance_needs_per_example_prompts():
    _, cond = unpack_batch(_batch(False))
    z = jnp.zeros((B, H, H, C))
    np.testing.assert_array_equal(guided_output(known_net, PARAMS, z, 0.5, cond, 1.0), 1.0)
    with pytest.raises(ValueError, match="needs per-example prompt embeddings"):
        guided_output(known_net, PARAMS, z, 0.5, cond, 3.0)


@pytest.mark.parametrize("w", [1.0, 2.0, 4.0])
def test_codi_target_is_the_guided_teacher(w):
    """Epsilon network: eps_hat_t = online output = cond (3, 5); the target's eps = the guided
    output 1 + w (cond - 1); so d_eps = (1 - w)^2 (cond - 1)^2 per example, zero at w = 1. The
    swapped split would give (cond - (cond + w (1 - cond)))^2 = w^2 (cond - 1)^2."""
    loss, m = jax.jit(lambda b: codi_loss(
        known_net, PARAMS, PARAMS, b, jax.random.key(1), schedule=SCHEDULE,
        cfg=_cfg(guidance_scale=w), prediction_type="epsilon"))(_batch())
    want = np.mean([(1 - w) ** 2 * 2.0**2, (1 - w) ** 2 * 4.0**2])
    np.testing.assert_allclose(float(m["d_eps"]), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=0)
    if w != 1.0:
        swapped = np.mean([w**2 * 2.0**2, w**2 * 4.0**2])
        assert abs(float(m["d_eps"]) - swapped) > 1.0


def test_pixel_d_x_compares_decoded_prediction_with_clean_pixels():
    """A "sample" network predicts x_hat_t = its output (1 here, the stored prompt); with the
    decoder `2 z` (latents -> pixels) d_x = mean((pixels - 2)^2) in pixel space and
    mean((x - 1)^2) in latent space."""
    batch = _batch(False)
    batch["pixels"] = jnp.full((B, 2 * H, 2 * H, 3), 0.5)

    def decode(b, z):
        assert "pixels" in b
        return jnp.repeat(jnp.repeat(2.0 * z[..., :3], 2, axis=1), 2, axis=2)

    def run(space):
        return codi_loss(known_net, PARAMS, PARAMS, batch, jax.random.key(2), schedule=SCHEDULE,
                         cfg=_cfg(d_x_space=space, lambda_x=1.0), prediction_type="sample",
                         decode=decode)[1]["d_x"]

    np.testing.assert_allclose(float(run("pixel")), (0.5 - 2.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(run("latent")), float(jnp.mean((batch["image"] - 1) ** 2)),
                               rtol=1e-6)
    # The gradient reaches the network through the decoder: d/d bias of mean((0.5 - 2 (1 +
    # bias))^2) at bias 0 is -4 (0.5 - 2) = 6.
    grad = jax.grad(lambda p: codi_loss(
        known_net, p, PARAMS, batch, jax.random.key(2), schedule=SCHEDULE,
        cfg=_cfg(d_x_space="pixel", lambda_x=1.0), prediction_type="sample",
        decode=decode)[1]["d_x"])(PARAMS)
    np.testing.assert_allclose(float(grad["bias"]), 6.0, rtol=1e-6)
    with pytest.raises(ValueError, match="d_x_space='pixel' needs"):
        codi_loss(known_net, PARAMS, PARAMS, _batch(False), jax.random.key(2),
                  schedule=SCHEDULE, cfg=_cfg(d_x_space="pixel"), prediction_type="sample",
                  decode=decode)


@pytest.mark.parametrize("overrides, message", [
    (dict(guidance_scale=2.0), "guides a text-conditioned"),
    (dict(d_x_space="pixel"), "already works in pixels"),
    (dict(objective="cm", guidance_scale=2.0), "does not read it"),
    (dict(d_x_space="latents"), "d_x_space"),
])
def test_config_names_guidance_and_pixel_d_x_misuse(overrides, message):
    c = presets.sr_config("tiny")
    c.distill.update(**overrides)
    with pytest.raises(ValueError, match=message):
        validate_config(c)


def test_a_network_without_text_refuses_prompt_embeds():
    from cdd_jax.stages.distill import conditional_model

    config = presets.sr_config("tiny")
    model, apply_fn = conditional_model(config)
    size = config.data.crop_size
    z, t = jnp.zeros((B, size, size, 3)), jnp.zeros((B,))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), z, t, z))["params"]
    with pytest.raises(ValueError, match="this network takes no text"):
        jax.eval_shape(apply_fn, params, z, t, {"image": z, "prompt_embeds": PROMPTS}, None)
