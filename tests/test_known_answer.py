"""Known answers (cdd_jax.diffusion.gaussian, benchmarks/known_answer.py): the exact Gaussian
teacher, posterior, ODE map and W2 against the project's samplers and losses.

A small problem keeps this fast: 4x4 greyscale patches of the bundled photos (d = 16), 2x2 area
downsampling (d_c = 4), observation noise 0.05, the cosine schedule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import known_answer as ka
from cdd_jax.diffusion import ddim_step
from cdd_jax.diffusion import gaussian as gs
from cdd_jax.distill import (
    cm_loss,
    cm_scalings,
    codi_loss,
    diffusion_loss,
    few_step_sample,
    solver_sample,
)
from cdd_jax.distill.direct_cm import direct_cm_loss, teacher_ode_solve

SCHEDULE = ka.SCHEDULE
APPLY = gs.gaussian_apply_fn(SCHEDULE)


@pytest.fixture(scope="module")
def problem():
    mu, Sigma = ka.patch_statistics(size=4, per_image=1500)
    return ka.Problem(mu, Sigma, ka.area_downsampling(4), noise_std=0.05)


def _alpha_sigma(t):
    a, s = SCHEDULE.alpha_sigma(np.float64(t))
    return float(a), float(s)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ----------------------------------------------------------------------------- W2 identities


def test_w2_identities():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    c1, c2 = (q * a) @ q.T, (q * b) @ q.T
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    assert gs.w2_gaussian(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-6)
    assert gs.w2_gaussian(m1, c1, m2, c1) == pytest.approx(np.linalg.norm(m1 - m2), rel=1e-9)
    commuting = np.sqrt(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert gs.w2_gaussian(m1, c1, m2, c2) == pytest.approx(commuting, rel=1e-9)
    g = rng.normal(size=(5, 5))
    c3 = g @ g.T  # does not commute with c1
    assert gs.w2_gaussian(m1, c1, m2, c3) == pytest.approx(gs.w2_gaussian(m2, c3, m1, c1), 1e-7)
    assert gs.w2_gaussian([0.0], [[4.0]], [1.0], [[9.0]]) == pytest.approx(np.sqrt(2.0), 1e-12)


def test_w2_is_the_cost_of_the_linear_optimal_coupling_monte_carlo():
    """W2^2 = E|x - T x|^2 for x ~ N(0, C1) and the Brenier map T = C1^-1/2 (C1^1/2 C2 C1^1/2)^1/2
    C1^-1/2, which pushes N(0, C1) onto N(0, C2); estimated by Monte Carlo within 4 SE."""
    rng = np.random.default_rng(1)
    g1, g2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = g1 @ g1.T + 0.1 * np.eye(6), g2 @ g2.T + 0.1 * np.eye(6)
    r1 = gs.sqrtm_psd(c1)
    r1_inv = np.linalg.inv(r1)
    T = r1_inv @ gs.sqrtm_psd(r1 @ c2 @ r1) @ r1_inv
    np.testing.assert_allclose(T @ c1 @ T, c2, rtol=1e-8, atol=1e-8)
    x = rng.normal(size=(200_000, 6)) @ np.linalg.cholesky(c1).T
    cost = np.sum((x - x @ T.T) ** 2, axis=1)
    w2_sq = gs.w2_gaussian(np.zeros(6), c1, np.zeros(6), c2) ** 2
    assert abs(cost.mean() - w2_sq) < 4 * cost.std() / np.sqrt(cost.size), (cost.mean(), w2_sq)


# ----------------------------------------------------------------------------- exact teacher


def test_exact_denoisers_and_posterior_are_consistent(problem):
    post, d = problem.post, problem.d
    alpha, sigma = _alpha_sigma(0.3)
    # The v-prediction apply_fn equals the float64 denoiser matrices.
    J, H, h = gs.conditional_denoiser(post, alpha, sigma)
    f = lambda z, c: ka.x_predictor(APPLY, problem.exact_conditional)(
        z, jnp.full((1,), 0.3, jnp.float32), c)
    Jn, Hn, hn = ka.affine_of(f, d, problem.dc)
    np.testing.assert_allclose(Jn, J, atol=2e-5)
    np.testing.assert_allclose(Hn, H, atol=2e-5)
    np.testing.assert_allclose(hn, h, atol=2e-5)
    # E[x | z_t] = E[ E[x | z_t, c] | z_t ]: with c unknown, the conditional denoiser averaged
    # over c | z_t gives the unconditional one (a check of the posterior algebra).
    Ju, ju = gs.denoiser(problem.mu, problem.Sigma, alpha, sigma)
    # c | z_t is Gaussian with mean a z_t + b: regression of c on z_t.
    cov_cz = problem.A @ problem.Sigma * alpha
    cov_zz = alpha**2 * problem.Sigma + sigma**2 * np.eye(d)
    a = np.linalg.solve(cov_zz, cov_cz.T).T
    b = problem.c_mean - a @ (alpha * problem.mu)
    np.testing.assert_allclose(J + H @ a, Ju, atol=1e-9)
    np.testing.assert_allclose(H @ b + h, ju, atol=1e-9)


def test_ddim_1000_steps_of_the_exact_teacher_matches_the_exact_ode_map(problem):
    """The project's DDIM sampler with the exact denoiser as the network, 1000 steps, lands on
    the closed-form PF-ODE map of the same z_T: relative error < 2.5e-3 (measured 1.8e-3 and
    1.2e-3 for the unconditional and the conditional teacher); halving the steps roughly
    doubles the error (first order)."""
    rng, shape = jax.random.PRNGKey(0), (256, problem.d)
    z_T = np.asarray(jax.random.normal(rng, shape, jnp.float32), np.float64)
    batch = problem.batch(jax.random.PRNGKey(1), 256)
    cond = np.asarray(batch["cond"], np.float64)
    a1, s1 = _alpha_sigma(1.0)
    M, m = gs.ode_map(problem.mu, problem.Sigma, a1, s1)
    Mc, Hc, hc = problem.ode()
    exact = {"uncond": z_T @ M.T + m, "cond": z_T @ Mc.T + cond @ Hc.T + hc}
    errs = {}
    for name, params in (("uncond", problem.teacher), ("cond", problem.exact_conditional)):
        for k in (500, 1000):
            x = solver_sample(APPLY, params, batch["cond"], rng, schedule=SCHEDULE,
                               num_steps=k, shape=shape)
            errs[name, k] = _rel(x, exact[name])
    assert errs["uncond", 1000] < 2.5e-3 and errs["cond", 1000] < 2.5e-3, errs
    for name in ("uncond", "cond"):
        assert 1.6 < errs[name, 500] / errs[name, 1000] < 2.4, errs


def test_sampler_map_is_the_projects_ddim_sampler(problem):
    """The float64 affine composition `sampler_map` gives what `few_step_sample` computes."""
    table = ka.table_from(APPLY, problem.exact_conditional, 4, problem.d, problem.dc)
    table = jax.tree.map(lambda a: a * 1.05, table)  # not the exact denoiser
    batch = problem.batch(jax.random.PRNGKey(2), 64)
    rng = jax.random.PRNGKey(3)
    z_T = np.asarray(jax.random.normal(rng, (64, problem.d), jnp.float32), np.float64)
    xpred = ka.x_predictor(ka.table_apply, table)
    for k in (1, 2, 4):
        times = [float(t) for t in np.linspace(1, 0, k + 1)[:-1]]
        maps = ka.clean_maps(problem, xpred, times)
        alphas, sigmas = zip(*(_alpha_sigma(t) for t in times), strict=True)
        P, Q, r, R = ka.sampler_map([maps[t] for t in times], alphas, sigmas, "ddim")
        assert R == []
        x = few_step_sample(ka.table_apply, table, batch["cond"], rng, schedule=SCHEDULE,
                            num_steps=k, shape=(64, problem.d), renoise="ddim")
        want = z_T @ P.T + np.asarray(batch["cond"], np.float64) @ Q.T + r
        assert _rel(x, want) < 1e-5, k


def test_published_distances_agree_with_monte_carlo(problem):
    """w2_to_posterior, mean_error and ode_map_error of a 2-step "fresh" sampler, from the exact
    formulas, against Monte-Carlo estimates from the project's sampler (within 4 SE):
    mean_error^2 = E (x - m(c)).(x' - m(c)) for two samples x, x' given the same c;
    ode_map_error^2 = E |x - ODE(z_T, c)|^2 with the sampler's own z_T; the covariance part
    of W2^2 is the cost E|y - T y|^2 of the optimal coupling of the centred samples."""
    table = ka.table_from(APPLY, problem.exact_conditional, 4, problem.d, problem.dc)
    table = {"W": table["W"] * 1.02, "U": table["U"] * 0.9, "b": table["b"] + 0.02}
    xpred = ka.x_predictor(ka.table_apply, table)
    got = ka.evaluate(problem, xpred, 2, "fresh")
    times = [1.0, 0.5]
    maps = ka.clean_maps(problem, xpred, times)
    alphas, sigmas = zip(*map(_alpha_sigma, times), strict=True)
    P, Q, r, R = ka.sampler_map([maps[t] for t in times], alphas, sigmas, "fresh")
    n = 20_000
    cond = problem.batch(jax.random.PRNGKey(4), n)["cond"]
    c64 = np.asarray(cond, np.float64)
    draw = jax.jit(functools.partial(few_step_sample, ka.table_apply, table, schedule=SCHEDULE,
                                     num_steps=2, shape=(n, problem.d), renoise="fresh"))
    rng1, rng2 = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
    x1 = np.asarray(draw(cond, rng1), np.float64)
    x2 = np.asarray(draw(cond, rng2), np.float64)
    m_c = c64 @ problem.post.G.T + problem.post.g

    def check(samples, formula):
        est, se = samples.mean(), samples.std() / np.sqrt(samples.size)
        assert abs(est - formula) < 4 * se + 1e-9, (est, se, formula)

    check(np.sum((x1 - m_c) * (x2 - m_c), axis=1), got["mean_error"] ** 2)
    z_T = np.asarray(jax.random.normal(rng1, (n, problem.d), jnp.float32), np.float64)
    M, H, h = problem.ode()
    check(np.sum((x1 - (z_T @ M.T + c64 @ H.T + h)) ** 2, axis=1), got["ode_map_error"] ** 2)
    cov = P @ P.T + sum(Rj @ Rj.T for Rj in R)
    y = x1 - (c64 @ Q.T + r)  # centred samples ~ N(0, cov)
    r1 = gs.sqrtm_psd(cov)
    r1_inv = np.linalg.inv(r1)
    T = r1_inv @ gs.sqrtm_psd(r1 @ problem.post.S @ r1) @ r1_inv
    check(np.sum((y - y @ T.T) ** 2, axis=1),
          got["w2_to_posterior"] ** 2 - got["mean_error"] ** 2)


# ----------------------------------------------------------------------------- optima


def _sigma_points(problem):
    """2D equally weighted points of xi = (x, eps, n) with its exact mean and covariance, so
    the batch mean of any quadratic function of xi is its expectation."""
    d, dc = problem.d, problem.dc
    D = 2 * d + dc
    cov = np.zeros((D, D))
    cov[:d, :d] = problem.Sigma
    cov[d:2 * d, d:2 * d] = np.eye(d)
    cov[2 * d:, 2 * d:] = problem.noise_std**2 * np.eye(dc)
    root = gs.sqrtm_psd(cov) * np.sqrt(D)
    mean = np.concatenate([problem.mu, np.zeros(d + dc)])
    pts = np.concatenate([mean + root.T, mean - root.T])
    x, eps, noise = pts[:, :d], pts[:, d:2 * d], pts[:, 2 * d:]
    batch = {"image": jnp.asarray(x, jnp.float32),
             "cond": jnp.asarray(x @ problem.A.T + noise, jnp.float32)}
    return batch, jnp.asarray(eps, jnp.float32)


def _flat_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))))


def test_lambda_term_and_diffusion_loss_optimum_is_the_posterior_mean_denoiser(problem,
                                                                             monkeypatch):
    """At the exact conditional denoiser, the gradient of CoDi's lambda term (codi_loss with
    lambda_x = 1 minus lambda_x = 0, same draws) and of the diffusion loss vanish in
    expectation. The expectation is exact: the loss's noise draw is replaced by sigma points
    (quadrature exact for quadratic losses) and t is fixed per call. Relative to the gradient
    of a perturbed student it is zero to float32 precision."""
    batch, eps = _sigma_points(problem)
    real_normal, real_uniform = jax.random.normal, jax.random.uniform

    def fake_normal(key, shape=(), dtype=jnp.float32):
        if tuple(shape) == eps.shape:
            return eps.astype(dtype)
        return real_normal(key, shape, dtype)

    monkeypatch.setattr(jax.random, "normal", fake_normal)
    exact = ka.table_from(APPLY, problem.exact_conditional, 4, problem.d, problem.dc)
    bad = jax.tree.map(lambda a: a * 1.01, exact)
    cfg1, cfg0 = ka.codi_cfg(num_grid_steps=4), ka.codi_cfg(num_grid_steps=4, lambda_x=0.0)

    def lambda_grad(params, rng):
        g1 = jax.grad(lambda p: codi_loss(ka.table_apply, p, params, batch, rng,
                                          schedule=SCHEDULE, cfg=cfg1)[0])(params)
        g0 = jax.grad(lambda p: codi_loss(ka.table_apply, p, params, batch, rng,
                                          schedule=SCHEDULE, cfg=cfg0)[0])(params)
        return jax.tree.map(jnp.subtract, g1, g0)

    for seed in range(4):  # several t of the grid
        rng = jax.random.PRNGKey(seed)
        ratio = _flat_norm(lambda_grad(exact, rng)) / _flat_norm(lambda_grad(bad, rng))
        assert ratio < 2e-4, (seed, ratio)

    for t0 in (0.25, 0.5, 0.75):
        monkeypatch.setattr(jax.random, "uniform",
                            lambda key, shape=(), dtype=jnp.float32, *a, t0=t0, **k:
                            jnp.full(shape, t0, dtype))
        grad = lambda p: jax.grad(lambda q: diffusion_loss(ka.table_apply, q, batch,
                                                           jax.random.PRNGKey(0),
                                                           schedule=SCHEDULE)[0])(p)
        ratio = _flat_norm(grad(exact)) / _flat_norm(grad(bad))
        assert ratio < 2e-4, (t0, ratio)
    monkeypatch.setattr(jax.random, "uniform", real_uniform)


def _ddim_state_map(problem, times):
    """z_t0 -> z_tK: DDIM steps of the exact conditional denoiser along `times` (descending, the
    plain formula also on the last step), float64: (M, H, h)."""
    d = problem.d
    M, H, h = np.eye(d), np.zeros((d, problem.dc)), np.zeros(d)
    for t, s in zip(times[:-1], times[1:], strict=True):
        a0, s0 = _alpha_sigma(t)
        a1, s1 = _alpha_sigma(s)
        J, Hx, hx = gs.conditional_denoiser(problem.post, a0, s0)
        cx, cz = a1 - s1 * a0 / s0, s1 / s0
        M, H, h = cx * J @ M + cz * M, cx * (J @ H + Hx) + cz * H, cx * (J @ h + hx) + cz * h
    return M, H, h


def _table_with_consistency_maps(problem, f_maps, n, cm_cfg):
    """A table student whose consistency function at t = k / n is f_maps[k] = (M, H, h)."""
    base = ka.table_from(APPLY, problem.exact_conditional, n, problem.d, problem.dc)
    W, U, b = (np.array(base[k], np.float64) for k in "WUb")
    eye = np.eye(problem.d)
    for k in range(1, n + 1):
        t = k / n
        alpha, sigma = _alpha_sigma(t)
        c_skip, c_out = (float(v) for v in cm_scalings(t, sigma_data=cm_cfg.sigma_data,
                                                        time_scale=cm_cfg.time_scale,
                                                        t_min=cm_cfg.eps_t_min))
        M, H, h = f_maps[k]
        # f = c_skip z + c_out x_hat, x_hat = alpha z - sigma v.
        W[k] = (alpha * eye - (M - c_skip * eye) / c_out) / sigma
        U[k] = -H / (c_out * sigma)
        b[k] = -h / (c_out * sigma)
    return {"W": jnp.asarray(W, jnp.float32), "U": jnp.asarray(U, jnp.float32),
            "b": jnp.asarray(b, jnp.float32)}


def test_cm_and_direct_cm_optima_have_zero_loss_and_gradient(problem):
    """With the exact conditional teacher, CM's optimum on the grid t_k = k / N is the teacher's
    k-step DDIM map to t = 0 and Direct CM's is its M-step solve from t_k; a student set to it
    has loss and gradient zero to float32 precision (vs a perturbed student), and the M-step
    solve tends to the exact ODE map (first order in 1 / M: 0.7% at M = 1000 from t = 1)."""
    n, m_steps = 4, 8
    cfg = ka.codi_cfg(num_grid_steps=n)
    cfg.direct_cm.num_teacher_steps = m_steps
    batch = problem.batch(jax.random.PRNGKey(7), 512)
    rng = jax.random.PRNGKey(8)
    teacher = problem.exact_conditional
    cm_maps = {k: _ddim_state_map(problem, np.linspace(k / n, 0.0, k + 1)) for k in
               range(1, n + 1)}
    dcm_maps = {k: _ddim_state_map(problem, np.linspace(k / n, 0.0, m_steps + 1)) for k in
                range(1, n + 1)}
    cm = lambda p: cm_loss(ka.table_apply, p, p, teacher, batch, rng, schedule=SCHEDULE,
                           cfg=cfg, finetuned_apply_fn=APPLY)[0]
    cm_frozen_target = lambda p, tgt: cm_loss(ka.table_apply, p, tgt, teacher, batch, rng,
                                              schedule=SCHEDULE, cfg=cfg,
                                              finetuned_apply_fn=APPLY)[0]
    dcm = lambda p: direct_cm_loss(ka.table_apply, p, teacher, batch, rng, schedule=SCHEDULE,
                                   cfg=cfg, finetuned_apply_fn=APPLY)[0]
    for loss, maps in ((cm, cm_maps), (dcm, dcm_maps)):
        opt = _table_with_consistency_maps(problem, maps, n, cfg.cm)
        bad = jax.tree.map(lambda a: a * 1.01, opt)
        assert float(loss(opt)) < 1e-6 * float(loss(bad)), (float(loss(opt)), float(loss(bad)))
        if loss is cm:
            g_opt = jax.grad(cm_frozen_target)(opt, opt)
            g_bad = jax.grad(cm_frozen_target)(bad, opt)
        else:
            g_opt, g_bad = jax.grad(loss)(opt), jax.grad(loss)(bad)
        assert _flat_norm(g_opt) < 1e-3 * _flat_norm(g_bad)
    # The M-step solve from t = 1 tends to the exact ODE map onto t = 0 (first order).
    exact = gs.conditional_ode_map(problem.post, *_alpha_sigma(1.0), *_alpha_sigma(0.0))
    errs = [_rel(_ddim_state_map(problem, np.linspace(1.0, 0.0, k + 1))[0], exact[0])
            for k in (250, 500, 1000)]
    assert errs[2] < 1e-2 and 1.6 < errs[1] / errs[2] < 2.4, errs


def test_teacher_ode_solve_one_step_is_a_ddim_step_per_example_t(problem):
    z = problem.batch(jax.random.PRNGKey(9), 8)["image"]
    t = jnp.linspace(0.2, 1.0, 8)
    fn = lambda zz, tt: APPLY(problem.teacher, zz, jnp.broadcast_to(tt, (8,)), None, None)
    got = teacher_ode_solve(fn, z, t, 0.0, 1, SCHEDULE)
    want, _ = ddim_step(fn, z, t, jnp.zeros(8), SCHEDULE)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
