"""U-Net and control encoder: shapes, logical axis names, zero-init equivalence, errors; for both
backbone families ("unet2d": the diffusers UNet2DModel port, "cdd": the original U-Net)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdd_jax.diffusion import get_schedule
from cdd_jax.models.apply import unet_apply_fn
from cdd_jax.models.backbone import backbone_from_config, model_config, timestep_scale
from cdd_jax.models.control import (
    ConditionalUNet,
    control_config,
    init_from_teacher,
    lowpass,
)
from cdd_jax.models.unet import init_params

KNOWN_AXES = {"conv_h", "conv_w", "channels_in", "channels_out", "norm"}


def tiny_model_cfg(family="cdd"):
    cfg = model_config()
    cfg.family = family
    cfg.ch = 8
    cfg.ch_mult = (1, 2)
    cfg.attn_resolutions = (8,)
    cfg.num_groups = 4
    cfg.head_dim = 8
    return cfg


def _perturb(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def conditional(cfg, ccfg, schedule="cosine"):
    return ConditionalUNet.from_config(cfg, ccfg, schedule, image_size=16)


class Teacher:
    """A backbone with its apply in the job's units (t in [0, 1])."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = backbone_from_config(cfg, 16)
        self.apply = unet_apply_fn(self.model, timestep_scale(cfg))

    def __call__(self, params, z, t):
        return self.apply(params, z, t, None, None)


@pytest.fixture(scope="module", params=["unet2d", "cdd"])
def teacher(request):
    cfg = tiny_model_cfg(request.param)
    model = Teacher(cfg)
    boxed = init_params(model.model, jax.random.key(0), 16)
    # Zero-initialised output layers make a fresh U-Net output exactly 0; perturb every weight so
    # the equivalence test compares non-trivial functions.
    return cfg, model, boxed, _perturb(nn.meta.unbox(boxed), 1)


def test_unet_shapes_and_time_dependence(teacher):
    _, model, _, params = teacher
    z = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    out1 = model(params, z, jnp.full((3,), 0.2))
    out2 = model(params, z, jnp.full((3,), 0.8))
    assert out1.shape == z.shape and out1.dtype == jnp.float32
    assert float(jnp.abs(out1 - out2).max()) > 1e-4  # the time embedding is used
    # a scalar t broadcasts to the batch
    out3 = model(params, z, jnp.float32(0.2))
    np.testing.assert_allclose(out1, out3, rtol=1e-6, atol=1e-6)


def test_every_parameter_has_logical_axis_names(teacher):
    _, _, boxed, _ = teacher
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= KNOWN_AXES, leaf.names
    kernels = [x for x in leaves if x.value.ndim == 4]
    assert all(x.names == ("conv_h", "conv_w", "channels_in", "channels_out") for x in kernels)


def test_encoder_middle_decoder_are_separable_parts(teacher):
    cfg, _, _, params = teacher
    if cfg.family == "cdd":
        assert {"time_embed", "encoder", "middle", "decoder", "out_norm", "out_conv"} == set(params)
    else:  # diffusers' names, so that checkpoints map one to one
        assert {"time_embedding", "conv_in", "down_blocks_0", "down_blocks_1", "mid_block",
                "up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"} == set(params)


def test_input_size_must_fit_the_depth(teacher):
    _, model, _, params = teacher
    with pytest.raises(ValueError, match="divisible by 2"):
        model(params, jnp.zeros((1, 15, 15, 3)), jnp.zeros((1,)))


def test_remat_is_numerically_identical(teacher):
    cfg, _, _, params = teacher
    cfg = cfg.copy_and_resolve_references()
    cfg.remat = True
    remat_model = Teacher(cfg)
    plain_model = Teacher(tiny_model_cfg(cfg.family))
    z = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    t = jnp.array([0.3, 0.6])

    def loss(p, m):
        return jnp.sum(m(p, z, t) ** 2)

    g1 = jax.grad(loss)(params, plain_model)
    g2 = jax.grad(loss)(params, remat_model)
    # atol relative to the gradients' overall scale: remat reorders float32 sums, and some
    # gradients are analytically zero (a bias before a GroupNorm) and hold only rounding noise
    # (measured on the unet2d port: entries of 2e-6 vs -2e-7 there; 0.136 vs 0.13635 in a
    # gradient of max |46|).
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("gate", ["conv1x1", "scalar"])
@pytest.mark.parametrize("input_gate", [True, False])
def test_zero_initialised_conditional_network_equals_teacher(teacher, gate, input_gate):
    cfg, model, _, t_params = teacher
    ccfg = control_config()
    ccfg.gate = gate
    ccfg.input_gate = input_gate
    ccfg.cond_embed_ch = (8,)
    cmodel = conditional(cfg, ccfg)
    z = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    c = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
    t = jnp.array([0.1, 0.9])
    fresh = nn.meta.unbox(cmodel.init(jax.random.key(6), z, t, c)["params"])
    cparams = init_from_teacher(fresh, t_params)
    # The duplicated encoder really is a copy of the teacher's encoder.
    parts = (("time_embed", "encoder", "middle") if cfg.family == "cdd" else
             ("time_embedding", "conv_in", "down_blocks_0", "down_blocks_1", "mid_block"))
    assert set(parts) == set(cparams["control"]) & set(t_params)
    for part in parts:
        for a, b in zip(jax.tree.leaves(cparams["control"][part]),
                        jax.tree.leaves(t_params[part]), strict=True):
            np.testing.assert_array_equal(a, b)
    want = model(t_params, z, t)
    got = cmodel.apply({"params": cparams}, z, t, c)
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # ... and the condition matters as soon as the gates open (the test can fail).
    opened = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "gate" in jax.tree_util.keystr(p) else x, cparams
    )
    got2 = cmodel.apply({"params": opened}, z, t, c)
    got3 = cmodel.apply({"params": opened}, z, t, -c)
    assert float(jnp.abs(got2 - got3).max()) > 1e-4


def test_teacher_architecture_mismatch_is_named(teacher):
    cfg, _, _, t_params = teacher
    other = tiny_model_cfg(cfg.family)
    other.ch = 16
    cmodel = conditional(other, control_config())
    z = jnp.zeros((1, 16, 16, 3))
    fresh = nn.meta.unbox(cmodel.init(jax.random.key(0), z, jnp.zeros((1,)), z)["params"])
    with pytest.raises(ValueError, match="architecture mismatch"):
        init_from_teacher(fresh, t_params)


def test_condition_shape_mismatch_is_a_clear_error(teacher):
    cfg, _, _, _ = teacher
    cmodel = conditional(cfg, control_config())
    z = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match="condition must be an NHWC image"):
        cmodel.init(jax.random.key(0), z, jnp.zeros((2,)), jnp.zeros((2, 4, 4, 3)))


def test_lowpass_keeps_constants_and_rejects_bad_sizes():
    x = jnp.full((2, 16, 16, 3), 0.3)
    np.testing.assert_allclose(lowpass(x, 4), x, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        lowpass(jnp.zeros((1, 18, 16, 3)), 4)


def test_low_frequency_anchor_matches_its_formula(teacher):
    """x_hat' = x_hat + gamma_t (lp(c) - lp(x_hat)), gamma_t = p s^2 / (p s^2 + a^2), computed
    here from the un-anchored network's output; p = 0 is exactly the paper's network."""
    cfg, _, _, t_params = teacher
    ccfg = control_config()
    ccfg.cond_embed_ch = (8,)
    plain = conditional(cfg, ccfg)
    ccfg.anchor_precision = 4.0
    anchored = conditional(cfg, ccfg, "cosine")
    z = jax.random.normal(jax.random.key(4), (3, 16, 16, 3))
    c = jax.random.normal(jax.random.key(5), (3, 16, 16, 3))
    t = jnp.array([0.05, 0.5, 1.0])
    fresh = nn.meta.unbox(plain.init(jax.random.key(6), z, t, c)["params"])
    params = init_from_teacher(fresh, t_params)
    v = plain.apply({"params": params}, z, t, c)
    v_anchored = anchored.apply({"params": params}, z, t, c)
    a, s = (np.asarray(u).reshape(-1, 1, 1, 1) for u in get_schedule("cosine").alpha_sigma(t))
    x = a * np.asarray(z) - s * np.asarray(v)
    gamma = 4.0 * s**2 / (4.0 * s**2 + a**2)
    want = x + gamma * (np.asarray(lowpass(c, 4)) - np.asarray(lowpass(jnp.asarray(x), 4)))
    got = a * np.asarray(z) - s * np.asarray(v_anchored)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert float(np.abs(got - x).max()) > 1e-2  # the anchor really changed the prediction
    # At t = 1 the condition's low frequencies replace the network's almost entirely (gamma ~ 1).
    assert gamma[2].item() > 0.999 and gamma[0].item() < 0.05


def test_anchor_config_errors(teacher):
    cfg, _, _, _ = teacher
    ccfg = control_config()
    ccfg.anchor_precision = -1.0
    with pytest.raises(ValueError, match=r"control.anchor_precision must be in \[0"):
        conditional(cfg, ccfg)
    ccfg.anchor_precision = 1.0
    ccfg.anchor_factor = 0
    with pytest.raises(ValueError, match=r"control.anchor_factor must be in \[1"):
        conditional(cfg, ccfg)
