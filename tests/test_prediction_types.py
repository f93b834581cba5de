"""Epsilon-, v- and sample-prediction networks are first class: the conversions are exact, the
exact denoiser reads the same in every parameterisation, every objective is invariant to the
parameterisation it reads the network in (or, for the plain diffusion loss, changes exactly as
the weighting algebra says), and each objective whose optimum is known is zero there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdd_jax.config.presets import sr_config
from cdd_jax.config.validate import validate_config
from cdd_jax.diffusion import (
    PREDICTION_TYPES,
    denoise,
    get_schedule,
    output_from_x_eps_hat,
    prediction_target,
    sample,
)
from cdd_jax.diffusion.gaussian import gaussian_apply_fn, gaussian_v_params
from cdd_jax.distill import cm_loss, codi_loss, diffusion_loss, distill_config, gd_loss
from cdd_jax.distill.direct_cm import direct_cm_loss

KINDS = ("v_prediction", "epsilon")  # the two SD-class teachers
SCHEDULE = get_schedule("scaled_linear")  # SD's own discrete schedule; alpha(1) ~ 0.068
D = 6


def _f64_case(seed=0):
    rng = np.random.default_rng(seed)
    x, eps = rng.normal(size=(5, D)), rng.normal(size=(5, D))
    logsnr = rng.uniform(-6, 6, size=5)
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
    return x, eps, alpha, sigma


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_target_and_denoise_are_inverse_in_float64(kind):
    """prediction_target(x, eps) read back by denoise gives (x, eps) to float64 precision; the
    three targets are tied by v = alpha eps - sigma x."""
    x, eps, alpha, sigma = _f64_case()
    a, s = alpha[:, None], sigma[:, None]
    z = a * x + s * eps
    out = prediction_target(kind, x, eps, alpha, sigma)
    x_hat, eps_hat = denoise(kind, z, out, alpha, sigma)
    np.testing.assert_allclose(x_hat, x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eps_hat, eps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(output_from_x_eps_hat(kind, x_hat, eps_hat, alpha, sigma), out,
                               atol=1e-12)
    v = prediction_target("v_prediction", x, eps, alpha, sigma)
    np.testing.assert_allclose(v, a * eps - s * x, atol=1e-15)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="unknown prediction type 'flow'"):
        denoise("flow", 0.0, 0.0, 1.0, 0.0)


def _gaussian(seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D, D))
    cov = scale * a @ a.T / D + 0.05 * np.eye(D)
    return gaussian_v_params(cov, mean_b=rng.normal(size=D) * 0.5)


@pytest.mark.parametrize("kind", ("epsilon", "sample"))
def test_exact_denoiser_reads_the_same_in_every_parameterisation(kind):
    """E[x | z_t] and E[eps | z_t] of a Gaussian, from the network written as v and as `kind`,
    agree to float32 precision; and so does a 6-step DDIM / DPM-Solver++ sample from them."""
    params = _gaussian()
    t = jnp.linspace(0.02, 0.98, 8)
    z = jax.random.normal(jax.random.key(0), (8, D))
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    ref = denoise("v_prediction", z, gaussian_apply_fn(SCHEDULE)(params, z, t, None),
                  alpha[:, None], sigma[:, None])
    got = denoise(kind, z, gaussian_apply_fn(SCHEDULE, kind)(params, z, t, None),
                  alpha[:, None], sigma[:, None])
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-5)
    for sampler in ("ddim", "dpmpp_2m") if kind == "epsilon" else ():
        outs = [sample(lambda zz, tt, k=k: gaussian_apply_fn(SCHEDULE, k)(
                    params, zz, jnp.broadcast_to(tt, (8,)), None), z, schedule=SCHEDULE,
                    num_steps=6, sampler=sampler, prediction_type=k)
                for k in ("v_prediction", kind)]
        np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-4)


def _cfg(**kw):
    cfg = distill_config()
    cfg.num_grid_steps = 8
    cfg.per_example_t = True
    cfg.cm.per_example_t = True
    cfg.direct_cm.num_teacher_steps = 4
    cfg.update(kw)
    return cfg


def _batch(n=16, seed=3):
    x = jax.random.normal(jax.random.key(seed), (n, D)) * 0.5
    return {"image": x, "cond": None}


def _losses(kind, params, other, batch, rng, cfg):
    f = gaussian_apply_fn(SCHEDULE, kind)
    kw = dict(schedule=SCHEDULE, cfg=cfg, prediction_type=kind)
    return {
        "codi": codi_loss(f, params, other, batch, rng, **kw)[0],
        "cm": cm_loss(f, params, other, other, batch, rng, **kw)[0],
        "gd": gd_loss(f, params, other, batch, rng, **kw)[0],
        "direct_cm": direct_cm_loss(f, params, other, batch, rng, **kw)[0],
    }


def test_every_distillation_objective_is_invariant_to_the_parameterisation():
    """The same pair of networks (online = one Gaussian's exact denoiser, target / teacher =
    another's) written as v- or as eps-prediction gives the same CoDi, CM, GD and Direct CM loss
    (the objectives read x_hat and eps_hat; the parameterisation is only how they are stored)."""
    params, other = _gaussian(1), _gaussian(2, scale=0.8)
    batch, rng = _batch(), jax.random.key(5)
    for cfg in (_cfg(), _cfg(predictor="ddim", boundary="target", eps_weighting="min_snr")):
        v = _losses("v_prediction", params, other, batch, rng, cfg)
        e = _losses("epsilon", params, other, batch, rng, cfg)
        for name in v:
            assert float(v[name]) > 1e-4, name  # not trivially zero
            np.testing.assert_allclose(float(e[name]), float(v[name]), rtol=2e-4, err_msg=name)


@pytest.mark.parametrize("weighting", ("min_snr", "truncated_snr", "snr_plus_one"))
def test_diffusion_loss_weighting_means_the_same_in_eps_and_v(weighting):
    """|v - v_hat|^2 = (SNR + 1) / SNR |eps - eps_hat|^2, so a weighting named in its own space
    gives the same loss whether the network regresses v or eps; unweighted, the ratio of the
    per-example losses is exactly (SNR + 1) / SNR."""
    params, batch, rng = _gaussian(1), _batch(), jax.random.key(6)
    v, e = (diffusion_loss(gaussian_apply_fn(SCHEDULE, k), params, batch, rng, schedule=SCHEDULE,
                           weighting=weighting, prediction_type=k)[0] for k in KINDS)
    assert float(v) > 1e-3
    np.testing.assert_allclose(float(e), float(v), rtol=2e-4)


def test_unweighted_diffusion_loss_regresses_each_types_own_target():
    """Single example per t: eps-MSE / v-MSE = SNR / (SNR + 1) example by example."""
    params, batch = _gaussian(1), _batch(n=1)
    for seed in range(4):
        rng = jax.random.key(seed)
        t = jax.random.uniform(jax.random.split(rng, 3)[0], (1,))
        m = {k: diffusion_loss(gaussian_apply_fn(SCHEDULE, k), params, batch, rng,
                               schedule=SCHEDULE, prediction_type=k)[0] for k in KINDS}
        snr = float(SCHEDULE.snr(t)[0])
        np.testing.assert_allclose(float(m["epsilon"]) / float(m["v_prediction"]),
                                   snr / (snr + 1), rtol=3e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_losses_are_zero_at_the_known_optimum(kind):
    """Data = one point x0: the exact denoiser predicts x0 and the real noise at every t, so the
    CoDi loss (PREv, either boundary, lambda = 1), the plain diffusion loss and the GD loss are
    zero at a student set to it, in either parameterisation; a perturbed student is not."""
    x0 = jnp.linspace(-0.8, 0.9, D)
    point = gaussian_v_params(np.zeros((D, D)), mean_b=np.asarray(x0))
    batch, rng = {"image": jnp.broadcast_to(x0, (8, D)), "cond": None}, jax.random.key(2)
    f = gaussian_apply_fn(SCHEDULE, kind)
    kw = dict(schedule=SCHEDULE, prediction_type=kind)
    for boundary in ("real_noise", "target"):
        loss = codi_loss(f, point, point, batch, rng, cfg=_cfg(boundary=boundary), **kw)[0]
        assert float(loss) < 1e-8, (boundary, float(loss))
    assert float(diffusion_loss(f, point, batch, rng, **kw)[0]) < 1e-8
    assert float(gd_loss(f, point, point, batch, rng, cfg=_cfg(), **kw)[0]) < 1e-8
    off = dict(point, mean_b=point["mean_b"] + 0.1)
    assert float(codi_loss(f, off, point, batch, rng, cfg=_cfg(), **kw)[0]) > 1e-3


def test_config_checks_prediction_type():
    cfg = sr_config("tiny")
    cfg.diffusion.prediction_type = "eps"
    with pytest.raises(ValueError, match="diffusion.prediction_type"):
        validate_config(cfg)
    cfg = sr_config("tiny")
    cfg.diffusion.prediction_type = "epsilon"  # the teacher's pretraining section disagrees
    cfg.control.anchor_precision = 0.0
    with pytest.raises(ValueError, match="teacher.pretrain.diffusion.prediction_type"):
        validate_config(cfg)
    cfg.teacher.pretrain.diffusion.prediction_type = "epsilon"
    validate_config(cfg)
    cfg.control.anchor_precision = 4.0  # the anchor acts on v
    with pytest.raises(ValueError, match="anchor"):
        validate_config(cfg)
