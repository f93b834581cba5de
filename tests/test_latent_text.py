"""The CoDi adapter on a text-conditioned latent U-Net (diffusers UNet2DConditionModel port) and
the latent space between images and latents (AutoencoderKL port): at initialisation the
conditional network equals the teacher with its stored prompt embedding to float precision, the
condition embedder maps the full-resolution condition to the latent resolution, and the latent
codec is the VAE's posterior mean times the scaling factor (both ports are checked against
diffusers itself in tests/test_diffusers_port.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_sd import TOKENS, WIDTH, tiny_unet, tiny_vae

from cdd_jax.models.apply import conditional_apply_fn
from cdd_jax.models.backbone import model_config
from cdd_jax.models.control import ConditionalUNet, control_config, init_from_teacher
from cdd_jax.models.latent import LatentSpace
from cdd_jax.parallel.sharding import unbox
from cdd_jax.train.state import param_labels

FACTOR = 4  # condition pixels per latent pixel


@pytest.fixture(scope="module")
def setup():
    teacher, teacher_params = tiny_unet()
    mcfg = model_config()
    mcfg.family = "unet2d_condition"
    mcfg.diffusers_config = teacher.config_json
    ccfg = control_config()
    ccfg.cond_embed_ch = (8, 8, 16)
    model = ConditionalUNet.from_config(mcfg, ccfg, image_size=8 * FACTOR, latent_factor=FACTOR,
                                        prompt_tokens=TOKENS)
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    cond = jax.random.uniform(jax.random.key(1), (2, 8 * FACTOR, 8 * FACTOR, 3), minval=-1)
    # The real init (zero gates); an rbg key compiles ~4x faster than threefry here.
    key = jax.random.key(2, impl="rbg")
    fresh = unbox(jax.jit(model.init)(key, z, jnp.zeros((2,)), cond)["params"])
    embeds = jax.random.normal(jax.random.key(3), (1, TOKENS, WIDTH))
    params = init_from_teacher(fresh, teacher_params, embeds)
    return teacher, teacher_params, model, params, embeds, z, cond


def test_conditional_text_network_equals_teacher_at_init(setup):
    teacher, teacher_params, model, params, embeds, z, cond = setup
    t = jnp.array([0.3, 0.8])
    ctx = jnp.broadcast_to(embeds, (2, TOKENS, WIDTH))
    ref = jax.jit(teacher.apply)({"params": teacher_params}, z, t * 1000.0, ctx)
    apply = jax.jit(conditional_apply_fn(model), static_argnums=4)
    got = apply(params, z, t, cond, None)
    assert float(jnp.abs(ref).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # The prompt embedding matters: another one gives another output.
    other = dict(params, text={"embeds": embeds + 1.0})
    assert float(jnp.abs(apply(other, z, t, cond, None) - ref).max()) > 1e-3


@pytest.mark.slow
def test_condition_reaches_the_latent_resolution_once_gates_open(setup):
    _, _, model, params, _, z, cond = setup
    apply = conditional_apply_fn(model)
    t = jnp.array([0.5, 0.5])

    @jax.jit
    def out(p, c):
        return apply(p, z, t, c, None)

    grads = jax.jit(jax.grad(lambda p: jnp.sum(out(p, cond) ** 2)))(params)
    for name in ("gate_middle", "gate_skip_0", "input_gate"):
        g = jax.tree.leaves(grads["control"][name])
        assert max(float(jnp.abs(x).max()) for x in g) > 0, name
    opened = jax.tree.map(lambda x: x, params)
    opened["control"] = dict(params["control"])
    opened["control"]["input_gate"] = jax.tree.map(lambda x: x + 0.05,
                                                   params["control"]["input_gate"])
    a, b = out(opened, cond), out(opened, -cond)
    assert float(jnp.abs(a - b).max()) > 1e-4
    emb = params["control"]["cond_embed"]
    assert emb["conv_2"]["Conv_0"]["kernel"].shape[-1] == 16  # (8, 8, 16): two stride-2 convs
    assert a.shape == z.shape


def test_a_latent_condition_enters_at_the_latent_size_and_equals_teacher_at_init(setup):
    """control.cond_space="latent": the condition is a VAE latent of z_t's size, the embedder
    has no stride-2 conv, and the network is the teacher at init; a pixel condition is named."""
    teacher, teacher_params, _, _, embeds, z, _ = setup
    mcfg = model_config()
    mcfg.family = "unet2d_condition"
    mcfg.diffusers_config = teacher.config_json
    ccfg = control_config()
    ccfg.update(cond_embed_ch=(8, 8, 16), cond_space="latent")
    model = ConditionalUNet.from_config(mcfg, ccfg, image_size=8 * FACTOR, latent_factor=FACTOR,
                                        prompt_tokens=TOKENS)
    cond = jax.random.normal(jax.random.key(4), z.shape)
    fresh = unbox(jax.jit(model.init)(jax.random.key(2, impl="rbg"), z, jnp.zeros((2,)),
                                      cond)["params"])
    params = init_from_teacher(fresh, teacher_params, embeds)
    t = jnp.array([0.3, 0.8])
    ref = jax.jit(teacher.apply)({"params": teacher_params}, z, t * 1000.0,
                                 jnp.broadcast_to(embeds, (2, TOKENS, WIDTH)))
    apply = jax.jit(conditional_apply_fn(model), static_argnums=4)
    np.testing.assert_array_equal(np.asarray(apply(params, z, t, cond, None)), np.asarray(ref))
    # No downsampling: the condition's size is z_t's (the embedder's output is added to z_t's
    # features, so a strided embedder would not even run).
    assert model.latent_factor == 1
    with pytest.raises(ValueError, match=r"spatial size \(2, 8, 8\)"):
        conditional_apply_fn(model)(params, z, t, jnp.zeros((2, 32, 32, 3)), None)


def test_prompt_embedding_never_trains_and_bad_shapes_are_named(setup):
    _, _, model, params, embeds, z, cond = setup
    labels = param_labels(params, freeze_backbone=False)
    assert labels["text"]["embeds"] == "frozen"
    assert set(jax.tree.leaves(labels["unet"])) == {"backbone"}
    with pytest.raises(ValueError, match=r"spatial size \(2, 32, 32\)"):
        conditional_apply_fn(model)(params, z, jnp.zeros(2), cond[:, :16, :16], None)
    with pytest.raises(ValueError, match="prompt embedding has shape"):
        init_from_teacher(params, params["unet"], embeds[:, :, :4])


@pytest.mark.slow
def test_latent_space_is_the_scaled_posterior_mean():
    vae, vae_params = tiny_vae()
    space = LatentSpace(vae)
    assert (space.factor, space.channels) == (2, 4)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1)
    params = {"vae": vae_params}
    lat = jax.jit(space.encode)(params, x)
    assert lat.shape == space.shape(x.shape) == (2, 8, 8, 4)
    mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)(vae_params, x)
    np.testing.assert_allclose(lat, mean * 0.18215, rtol=1e-6)
    rec = jax.jit(space.decode)(params, lat)
    ref = jax.jit(lambda p, m: vae.apply({"params": p}, m, method="decode"))(vae_params, mean)
    np.testing.assert_allclose(rec, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        space.shape((1, 17, 17, 3))


def test_per_example_prompt_embeds_replace_the_stored_one(setup):
    """A batch's per-example embeddings [B, T', D] override the stored one example by example:
    the stored embedding given per example reproduces the default output; another prompt for
    example 1 changes example 1 only; any token count; the width is checked."""
    _, _, model, params, embeds, z, cond = setup
    apply = jax.jit(conditional_apply_fn(model), static_argnums=4)
    t = jnp.array([0.3, 0.8])
    ref = np.asarray(apply(params, z, t, cond, None))
    same = jnp.broadcast_to(embeds, (2, TOKENS, WIDTH))
    got = apply(params, z, t, {"image": cond, "prompt_embeds": same}, None)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)
    other = same.at[1].set(jax.random.normal(jax.random.key(9), (TOKENS, WIDTH)))
    got = np.asarray(apply(params, z, t, {"image": cond, "prompt_embeds": other}, None))
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-6)
    assert float(np.abs(got[1] - ref[1]).max()) > 1e-3
    longer = jnp.concatenate([same, same], axis=1)  # 2 T tokens: attention averages the same
    got = apply(params, z, t, {"image": cond, "prompt_embeds": longer}, None)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"width=8.*got \(2, 3, 4\)"):
        conditional_apply_fn(model)(params, z, t, {"image": cond,
                                                   "prompt_embeds": same[..., :4]}, None)
