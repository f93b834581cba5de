"""Known-answer benchmark: every objective trained where the right answer is known exactly.

Data x ~ N(mu, Sigma), Sigma the covariance of 8x8 greyscale patches of the bundled training
photos (so its spectrum is natural), observed as c = A x + n: A the 2x2 area downsampling to
4x4, n ~ N(0, 0.02^2 I). The teacher is the EXACT unconditional denoiser E[x | z_t]
(`cdd_jax.diffusion.gaussian`); the posterior N(m(c), S) and the conditional PF-ODE map are
exact. Students are affine in (z_t, c) at each time, v_hat = W(t) z_t + U(t) c + b(t), with
(W, U, b) a table on the training grid t = k / N (linear in t between knots), so every K-step
sample given c is Gaussian with a covariance that does not depend on c, and the distances are
exact (no sampling):

    w2_to_posterior  sqrt(E_c W2(law of x_K | c, N(m(c), S))^2)
    mean_error       sqrt(E_c |E[x_K | c] - m(c)|^2)
    ode_map_error    sqrt(E |x_K(z_T, c, noise) - ODE(z_T, c)|^2), the same z_T ~ N(0, I)

(all in data units, summed over the 64 pixels; E_c over the marginal of c). Every objective is
the project's own function from `cdd_jax.distill`, trained with optax Adam (cosine-decayed
learning rate) to its plateau. Conditional fine-tuning (`diffusion_loss`, continuous t) trains
a model of the exact Gaussian-denoiser form with learned (covariance square root L, mean map
G, g), which contains the posterior denoiser, and is the frozen teacher of CM, Direct CM and GD.

    python benchmarks/known_answer.py [--quick] [--from_json=results/known_answer.json]
    python benchmarks/known_answer.py --convergence=24000,96000 [--per_example_t] [--set=k=v]

Writes benchmarks/results/known_answer.{json,md,png} (known_answer_convergence*.* with
--convergence).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cdd_jax.diffusion import gaussian as gs  # noqa: E402
from cdd_jax.diffusion import get_schedule  # noqa: E402
from cdd_jax.distill import (  # noqa: E402
    cm_loss,
    codi_loss,
    consistency_fn,
    diffusion_loss,
    distill_config,
    ema_decay,
    ema_update,
    gd_loss,
)
from cdd_jax.distill.direct_cm import direct_cm_loss  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEDULE = get_schedule("cosine")
NOISE_STD = 0.02
N_GRID = 20  # CoDi / CM / Direct CM grid t = k / N
STEPS_K = (1, 2, 4)
FINETUNE_K = (1, 2, 4, 8, 20, 50, 200)

# ----------------------------------------------------------------------------- the problem


def patch_statistics(size: int = 8, per_image: int = 3000, seed: int = 0):
    """(mu, Sigma) of random size x size greyscale patches in [-1, 1] of the training photos."""
    from cdd_jax.data.bundled import TRAIN_IMAGES, load_bundled_image

    rng = np.random.default_rng(seed)
    patches = []
    for name in TRAIN_IMAGES:
        image = load_bundled_image(name).astype(np.float64).mean(-1) / 127.5 - 1.0
        ys = rng.integers(0, image.shape[0] - size, per_image)
        xs = rng.integers(0, image.shape[1] - size, per_image)
        crops = [image[y:y + size, x:x + size].ravel() for y, x in zip(ys, xs, strict=True)]
        patches.append(np.stack(crops))
    data = np.concatenate(patches)
    return data.mean(0), np.cov(data.T)


def area_downsampling(size: int = 8, factor: int = 2) -> np.ndarray:
    """A: (size/f)^2 x size^2, the mean of each f x f block (row-major pixels)."""
    low = size // factor
    A = np.zeros((low * low, size * size))
    for i in range(size):
        for j in range(size):
            A[(i // factor) * low + j // factor, i * size + j] = 1.0 / factor**2
    return A


class Problem:
    """x ~ N(mu, Sigma), c = A x + N(0, s^2): the exact posterior and the marginal of c."""

    def __init__(self, mu, Sigma, A, noise_std: float = NOISE_STD, schedule=SCHEDULE):
        self.mu, self.Sigma, self.A, self.noise_std = mu, Sigma, A, noise_std
        self.schedule = schedule
        self.d, self.dc = A.shape[1], A.shape[0]
        self.post = gs.posterior(mu, Sigma, A, noise_std)
        self.c_mean = A @ mu
        self.c_cov = A @ Sigma @ A.T + noise_std**2 * np.eye(self.dc)
        self.chol = np.linalg.cholesky(Sigma)
        self.teacher = gs.gaussian_v_params(Sigma, mean_b=mu, cond_dim=self.dc)
        self.exact_conditional = gs.gaussian_v_params(self.post.S, self.post.G, self.post.g)
        self._whitening_consts = self._whitening()

    def batch(self, rng, batch_size: int) -> dict:
        """A batch {"image": x (B, d), "cond": c (B, d_c)}, float32."""
        kx, kn = jax.random.split(rng)
        x = jnp.asarray(self.mu, jnp.float32) + jax.random.normal(
            kx, (batch_size, self.d), jnp.float32) @ jnp.asarray(self.chol.T, jnp.float32)
        n = self.noise_std * jax.random.normal(kn, (batch_size, self.dc), jnp.float32)
        return {"image": x, "cond": x @ jnp.asarray(self.A.T, jnp.float32) + n}

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        a, s = self.schedule.alpha_sigma(np.float64(t))
        return float(a), float(s)

    def ode(self):
        """The exact conditional ODE map z_1 -> x_0: (M, H, h)."""
        return gs.conditional_ode_map(self.post, *self.alpha_sigma(1.0))

    # Students see whitened inputs: zeta = Lambda_t^-1/2 Q^T (z_t - alpha_t mu) with Sigma =
    # Q Lambda Q^T, Lambda_t = alpha_t^2 Lambda + sigma_t^2, and gamma = C_c^-1/2 (c - E c).
    # The function class (affine in z_t, c at each t) and so every optimum are unchanged; only
    # the conditioning of the least-squares problems, hence Adam's speed, is.

    def _whitening(self):
        lam, q = np.linalg.eigh(self.Sigma)
        c_root = gs.sqrtm_psd(self.c_cov)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return f32(q), f32(lam), f32(self.mu), f32(self.c_mean), f32(np.linalg.inv(c_root)), \
            f32(c_root)

    def student_apply(self, params, z, t, cond, rng=None):
        """A table student (`table_apply`) on the whitened inputs (zeta, gamma)."""
        q, lam, mu, c_mean, c_white, _ = self._whitening_consts
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        zeta = ((z - alpha * mu) @ q) * jax.lax.rsqrt(alpha**2 * lam + sigma**2)
        gamma = None if cond is None else (cond - c_mean) @ c_white
        return table_apply(params, zeta, t, gamma, rng)

    def student_from(self, apply_fn, params, knots: int) -> dict:
        """The `student_apply` table equal to the affine network `apply_fn(params)` at the
        knots t = k / knots."""
        q, lam, mu, c_mean, _, c_root = self._whitening_consts
        W, U, b = [], [], []
        for k in range(knots + 1):
            t = jnp.full((1,), k / knots, jnp.float32)
            alpha, sigma = self.schedule.alpha_sigma(t)
            scale = jnp.sqrt(alpha**2 * lam + sigma**2)

            def g(zeta, gamma, t=t, alpha=alpha, scale=scale):
                z = alpha * mu + (zeta * scale) @ q.T
                return apply_fn(params, z, t, c_mean + gamma @ c_root, None)

            J, H, h = affine_of(g, self.d, self.dc)
            W.append(J), U.append(H), b.append(h)
        stacked = (np.stack(a) for a in (W, U, b))
        return {name: jnp.asarray(a, jnp.float32) for name, a in zip("WUb", stacked, strict=True)}


def default_problem() -> Problem:
    mu, Sigma = patch_statistics()
    return Problem(mu, Sigma, area_downsampling())


# ----------------------------------------------------------------------------- students


def table_apply(params, z, t, cond, rng=None):
    """v_hat = W(t) z + U(t) c + b(t), the table linear in t between knots k / (len - 1)."""
    del rng
    n = params["W"].shape[0] - 1
    u = jnp.asarray(t, jnp.float32) * n
    w = jnp.maximum(0.0, 1.0 - jnp.abs(u[:, None] - jnp.arange(n + 1)))  # hat weights (B, n+1)
    v = jnp.einsum("bk,bki->bi", w, jnp.einsum("bj,kij->bki", z, params["W"])) + w @ params["b"]
    if cond is not None:
        v = v + jnp.einsum("bk,bki->bi", w, jnp.einsum("bj,kij->bki", cond, params["U"]))
    return v


def affine_jax(fn, d: int, dc: int):
    """(J, H, h) of an affine fn(z (1, d), c (1, dc)) -> (1, d), as jax arrays (traceable)."""
    g = lambda z, c: fn(z[None], c[None])[0]
    z0, c0 = jnp.zeros(d, jnp.float32), jnp.zeros(dc, jnp.float32)
    J, H = jax.jacfwd(g, argnums=(0, 1))(z0, c0)
    return J, H, g(z0, c0)


def affine_of(fn, d: int, dc: int):
    """affine_jax in float64 numpy."""
    return tuple(np.asarray(a, np.float64) for a in affine_jax(fn, d, dc))


def table_from(apply_fn, params, knots: int, d: int, dc: int) -> dict:
    """A table student equal to the affine network `apply_fn(params)` at t = k / knots."""
    W, U, b = [], [], []
    for k in range(knots + 1):
        t = jnp.full((1,), k / knots, jnp.float32)
        J, H, h = affine_of(lambda z, c, t=t: apply_fn(params, z, t, c, None), d, dc)
        W.append(J), U.append(H), b.append(h)
    stacked = (np.stack(a) for a in (W, U, b))
    return {name: jnp.asarray(a, jnp.float32) for name, a in zip("WUb", stacked, strict=True)}


def pe_apply_fn(backbone: dict, apply_fn=table_apply):
    """PE-CoDi's affine student: the frozen backbone W(t) z + b(t) (the teacher's z path) plus
    the trainable condition path U(t) c + b_a(t) (zero at init): only the mean can move."""

    def pe_apply(control, z, t, cond, rng=None):
        return apply_fn({"W": backbone["W"], "U": control["U"],
                         "b": backbone["b"] + control["b"]}, z, t, cond, rng)

    return pe_apply


def finetune_apply_fn(problem: Problem):
    """The fine-tuned model: the exact denoiser of N(m(c), C) as a v-prediction with learned
    C = R L L^T R (R = Sigma^1/2 fixed, L = I at init) and m(c) = g + G gamma (gamma the
    whitened condition), in float64 (needs jax_enable_x64, which `main` sets):
        v_hat = alpha sigma (I - C) P^-1 z - sigma P^-1 m,  P = alpha^2 C + sigma^2 I."""
    R = jnp.asarray(gs.sqrtm_psd(problem.Sigma), jnp.float64)
    c_mean = jnp.asarray(problem.c_mean, jnp.float64)
    c_white = jnp.asarray(np.linalg.inv(gs.sqrtm_psd(problem.c_cov)), jnp.float64)

    def apply_fn(params, z, t, cond, rng=None):
        del rng
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        alpha, sigma = alpha.astype(jnp.float64)[:, None], sigma.astype(jnp.float64)[:, None]
        RL = R @ params["L"].astype(jnp.float64)
        C = RL @ RL.T
        gamma = (cond.astype(jnp.float64) - c_mean) @ c_white
        m = params["g"].astype(jnp.float64) + gamma @ params["G"].astype(jnp.float64).T
        eye = jnp.eye(C.shape[0])
        P = (alpha**2)[..., None] * C + (sigma**2)[..., None] * eye
        sol = jnp.linalg.solve(P, jnp.stack([z.astype(jnp.float64), m], -1))
        v = alpha * sigma * (sol[..., 0] @ (eye - C)) - sigma * sol[..., 1]
        return v.astype(jnp.float32)

    return apply_fn


def finetune_init(problem: Problem) -> dict:
    """The unconditional teacher in `finetune_apply_fn`'s parameters (C = Sigma, m = mu)."""
    d, dc = problem.d, problem.dc
    return {"L": jnp.eye(d, dtype=jnp.float32), "G": jnp.zeros((d, dc), jnp.float32),
            "g": jnp.asarray(problem.mu, jnp.float32)}


def finetune_to_eigen(problem: Problem, params) -> dict:
    """The same fine-tuned model in `gaussian_apply_fn`'s (cheap) eigen form."""
    RL = gs.sqrtm_psd(problem.Sigma) @ np.asarray(params["L"], np.float64)
    c_white = np.linalg.inv(gs.sqrtm_psd(problem.c_cov))
    G = np.asarray(params["G"], np.float64) @ c_white  # m = g + G c_white (c - E c)
    g = np.asarray(params["g"], np.float64) - G @ problem.c_mean
    return gs.gaussian_v_params(RL @ RL.T, G, g)


def x_predictor(apply_fn, params, kind: str = "x_hat", cm_cfg=None):
    """fn(z, t, c) -> the student's clean estimate: x_hat from v_hat, or the consistency
    function f (kind "f", CM and Direct CM students)."""
    if kind == "f":
        return lambda z, t, c: consistency_fn(apply_fn, params, z, t, c, None, schedule=SCHEDULE,
                                              cm_cfg=cm_cfg)

    def x_hat(z, t, c):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        return alpha[:, None] * z - sigma[:, None] * apply_fn(params, z, t, c, None)

    return x_hat


# ----------------------------------------------------------------------------- exact distances


def sampler_map(x_maps, alphas, sigmas, sampler: str):
    """The K-step sampler as an affine map x = P z_T + Q c + r + sum_j R_j n_j.

    x_maps[k] = (J, H, h): the clean estimate J z + H c + h at the k-th (positive, descending)
    time, whose alpha, sigma are alphas[k], sigmas[k]. "ddim": z <- alpha' x + sigma' eps_hat,
    eps_hat = (z - alpha x) / sigma; "fresh": z <- alpha' x + sigma' n with new noise n.
    Returns (P, Q, r, [R_j]).
    """
    d = x_maps[0][0].shape[0]
    P, Q, r, R = np.eye(d), np.zeros_like(x_maps[0][1]), np.zeros(d), []
    xP, xQ, xr, xR = P, Q, r, R  # the clean estimate of the previous step
    for k, (J, H, h) in enumerate(x_maps):
        if k > 0 and sampler == "fresh":
            P, Q, r = alphas[k] * xP, alphas[k] * xQ, alphas[k] * xr
            R = [alphas[k] * Rj for Rj in xR] + [sigmas[k] * np.eye(d)]
        elif k > 0:  # DDIM from time k-1 to k
            a0, s0, a1, s1 = alphas[k - 1], sigmas[k - 1], alphas[k], sigmas[k]
            cx, cz = a1 - s1 * a0 / s0, s1 / s0
            P, Q, r = cx * xP + cz * P, cx * xQ + cz * Q, cx * xr + cz * r
        xP, xQ, xr, xR = J @ P, J @ Q + H, J @ r + h, [J @ Rj for Rj in R]
    return xP, xQ, xr, xR


def distances(problem: Problem, P, Q, r, R) -> dict:
    """w2_to_posterior, mean_error, ode_map_error of the affine sampler map (module docstring)."""
    post = problem.post
    cov = P @ P.T + sum((Rj @ Rj.T for Rj in R), np.zeros_like(P))
    mean_sq = gs.expected_sq_norm(Q - post.G, r - post.g, problem.c_mean, problem.c_cov)
    w2_cov = gs.w2_gaussian(np.zeros(problem.d), cov, np.zeros(problem.d), post.S)
    M, H, h = problem.ode()
    ode_sq = (np.sum((P - M) ** 2) + sum(np.sum(Rj**2) for Rj in R)
              + gs.expected_sq_norm(Q - H, r - h, problem.c_mean, problem.c_cov))
    return {"w2_to_posterior": float(np.sqrt(mean_sq + w2_cov**2)),
            "mean_error": float(np.sqrt(mean_sq)), "ode_map_error": float(np.sqrt(ode_sq))}


def clean_maps(problem: Problem, xpred, times) -> dict:
    """{t: (J, H, h)} of the student's clean estimate `xpred(z, t, c)` at each time."""

    def one(t):
        return affine_jax(lambda z, c: xpred(z, jnp.full((1,), t, jnp.float32), c),
                          problem.d, problem.dc)

    maps = jax.jit(jax.vmap(one))
    J, H, h = (np.asarray(a, np.float64) for a in maps(jnp.asarray(times, jnp.float32)))
    return {float(t): (J[i], H[i], h[i]) for i, t in enumerate(times)}


def evaluate(problem: Problem, xpred, steps: int, sampler: str, maps: dict | None = None) -> dict:
    """Distances of the K-step sampler ("ddim" or "fresh") of a student's clean estimate
    `xpred(z, t, c)` on the uniform grid linspace(1, 0, K + 1)."""
    times = [float(t) for t in np.linspace(1.0, 0.0, steps + 1)[:-1]]
    maps = maps if maps is not None else clean_maps(problem, xpred, times)
    alphas, sigmas = zip(*(problem.alpha_sigma(t) for t in times), strict=True)
    return distances(problem, *sampler_map([maps[t] for t in times], alphas, sigmas, sampler))


# ----------------------------------------------------------------------------- training


def train(problem: Problem, loss_fn, params, *, steps: int, lr: float, batch_size: int,
          seed: int, target_ema=None, chunk: int = 250):
    """Adam with a cosine-decayed learning rate on loss_fn(params, target, batch, rng).

    With `target_ema` (a distill EMA section) a target EMA theta_minus is kept as in the train
    step; without it `target` is None. Returns (params, target, loss per chunk of steps).
    """
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=1e-3))
    target = params if target_ema is not None else None

    def one(carry, n):
        params, target, opt_state = carry
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), n)
        batch = problem.batch(jax.random.fold_in(rng, 1), batch_size)
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, target, batch, rng)
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        if target_ema is not None:
            mu = ema_decay(n, target_ema.decay, target_ema.warmup, power=target_ema.power,
                           inv_gamma=target_ema.inv_gamma)
            target = ema_update(target, params, mu)
        return (params, target, opt_state), loss

    @jax.jit
    def run_chunk(carry, start):
        carry, losses = jax.lax.scan(one, carry, start + jnp.arange(chunk))
        return carry, losses.mean()

    carry, curve = (params, target, opt.init(params)), []
    for start in range(0, steps, chunk):
        carry, loss = run_chunk(carry, start)
        curve.append(float(loss))
    return carry[0], carry[1], curve


def codi_cfg(**kw):
    cfg = distill_config()
    cfg.num_grid_steps = N_GRID
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ----------------------------------------------------------------------------- the runs


def run(quick: bool = False) -> dict:
    t_start = time.time()
    problem = default_problem()
    d, dc = problem.d, problem.dc
    gauss_apply = gs.gaussian_apply_fn(SCHEDULE)
    student = problem.student_apply
    scale = 0.1 if quick else 1.0
    S = lambda n: max(250, int(round(n * scale / 250)) * 250)
    batch = 128 if quick else 256
    rows, training = [], {}

    def add_rows(name, xpred, ks=STEPS_K, samplers=("ddim", "fresh")):
        times = sorted({float(t) for k in ks for t in np.linspace(1.0, 0.0, k + 1)[:-1]})
        maps = clean_maps(problem, xpred, times)
        for sampler in samplers:
            for k in ks:
                rows.append({"objective": name, "steps": k, "sampler": sampler,
                             **evaluate(problem, xpred, k, sampler, maps)})

    def record(name, curve, steps):
        training[name] = {"train_steps": steps, "loss_first_chunk": curve[0],
                          "loss_mid": curve[len(curve) // 2], "loss_last_chunk": curve[-1],
                          "loss_curve": curve}
        print(f"  {name}: {steps} steps, loss {curve[0]:.4g} -> {curve[len(curve) // 2]:.4g} "
              f"-> {curve[-1]:.4g}  ({time.time() - t_start:.0f} s)", flush=True)

    # References: the exact ODE map, the posterior mean, the exact conditional denoiser sampled.
    M, H, h = problem.ode()
    rows.append({"objective": "exact_ode_map", "steps": 0, "sampler": "exact",
                 **distances(problem, M, H, h, [])})
    zero = np.zeros((d, d))
    rows.append({"objective": "posterior_mean", "steps": 0, "sampler": "exact",
                 **distances(problem, zero, problem.post.G, problem.post.g, [])})
    add_rows("exact_conditional_denoiser",
             x_predictor(gauss_apply, problem.exact_conditional), FINETUNE_K, ("ddim",))
    add_rows("exact_conditional_denoiser", x_predictor(gauss_apply, problem.exact_conditional),
             STEPS_K, ("fresh",))
    add_rows("unconditional_teacher", x_predictor(gauss_apply, problem.teacher), (4, 200),
             ("ddim",))

    # Conditional fine-tuning (diffusion loss), from the unconditional teacher.
    ft_apply = finetune_apply_fn(problem)
    steps = S(6000)
    ft, _, curve = train(problem, lambda p, _, b, r: diffusion_loss(ft_apply, p, b, r,
                                                                    schedule=SCHEDULE),
                         finetune_init(problem), steps=steps, lr=1e-2, batch_size=batch, seed=1)
    record("finetune", curve, steps)
    finetuned = finetune_to_eigen(problem, ft)
    add_rows("finetune", x_predictor(gauss_apply, finetuned), FINETUNE_K, ("ddim",))
    add_rows("finetune", x_predictor(gauss_apply, finetuned), STEPS_K, ("fresh",))

    # CoDi and its ablations, from the exact unconditional teacher.
    teacher_table = problem.student_from(gauss_apply, problem.teacher, N_GRID)
    codi_runs = {
        "codi": {},
        "codi_ddim_predictor": {"predictor": "ddim"},
        "codi_per_example_t": {"per_example_t": True},
        "codi_lambda0": {"lambda_x": 0.0},
        "codi_lambda100": {"lambda_x": 100.0},
        "codi_boundary_target": {"boundary": "target"},
    }
    steps = S(6000)
    for name, overrides in codi_runs.items():
        cfg = codi_cfg(**overrides)
        loss = functools.partial(codi_loss, student, schedule=SCHEDULE, cfg=cfg)
        _, target, curve = train(problem, loss, teacher_table, steps=steps, lr=1e-2,
                                 batch_size=batch, seed=2, target_ema=cfg.target_ema)
        record(name, curve, steps)
        add_rows(name, x_predictor(student, target))
    cfg = codi_cfg()
    pe = pe_apply_fn(teacher_table, student)
    control0 = {"U": jnp.zeros_like(teacher_table["U"]), "b": jnp.zeros_like(teacher_table["b"])}
    _, target, curve = train(problem, functools.partial(codi_loss, pe, schedule=SCHEDULE, cfg=cfg),
                             control0, steps=steps, lr=1e-2, batch_size=batch, seed=2,
                             target_ema=cfg.target_ema)
    record("pe_codi", curve, steps)
    add_rows("pe_codi", x_predictor(pe, target))
    # Convergence check: the default CoDi with twice the steps.
    cfg = codi_cfg()
    _, target, curve = train(problem, functools.partial(codi_loss, student, schedule=SCHEDULE,
                                                        cfg=cfg),
                             teacher_table, steps=2 * steps, lr=1e-2, batch_size=batch, seed=2,
                             target_ema=cfg.target_ema)
    record("codi_2x_steps", curve, 2 * steps)
    add_rows("codi_2x_steps", x_predictor(student, target))

    # CM and Direct CM of the fine-tuned model, students initialised from it.
    student0 = problem.student_from(gauss_apply, finetuned, N_GRID)
    cfg = codi_cfg()
    steps = S(6000)
    cm = lambda p, tgt, b, r: cm_loss(student, p, tgt, finetuned, b, r, schedule=SCHEDULE,
                                      cfg=cfg, finetuned_apply_fn=gauss_apply)
    _, target, curve = train(problem, cm, student0, steps=steps, lr=1e-2, batch_size=batch,
                             seed=3, target_ema=cfg.target_ema)
    record("cm", curve, steps)
    add_rows("cm", x_predictor(student, target, "f", cfg.cm))
    dcm = lambda p, _, b, r: direct_cm_loss(student, p, finetuned, b, r, schedule=SCHEDULE,
                                            cfg=cfg, finetuned_apply_fn=gauss_apply)
    params, _, curve = train(problem, dcm, student0, steps=steps, lr=1e-2, batch_size=batch,
                             seed=4)
    record("direct_cm", curve, steps)
    add_rows("direct_cm", x_predictor(student, params, "f", cfg.cm))

    # GD (progressive distillation of the fine-tuned model): 64 -> 32 -> ... -> 1 steps.
    teacher_apply, teacher_params = gauss_apply, finetuned
    params = problem.student_from(gauss_apply, finetuned, 32)
    steps, total = S(1500), 0
    for n_teacher in (64, 32, 16, 8, 4, 2):
        cfg = codi_cfg(num_grid_steps=n_teacher)
        gd = lambda p, _, b, r, tp=teacher_params, ta=teacher_apply, cfg=cfg: gd_loss(
            student, p, tp, b, r, schedule=SCHEDULE, cfg=cfg, finetuned_apply_fn=ta)
        params, _, curve = train(problem, gd, params, steps=steps, lr=1e-2, batch_size=batch,
                                 seed=5 + n_teacher)
        total += steps
        record(f"gd_round_{n_teacher}_to_{n_teacher // 2}", curve, steps)
        if n_teacher // 2 in STEPS_K:
            add_rows("gd", x_predictor(student, params), (n_teacher // 2,))
        teacher_apply, teacher_params = student, params

    rows.sort(key=lambda r: (r["objective"], r["sampler"], r["steps"]))
    return {"rows": rows, "training": training, "quick": quick,
            "wall_s": round(time.time() - t_start, 1),
            "problem": {"data": "8x8 greyscale patches of the bundled training photos",
                        "d": d, "d_c": dc, "noise_std": NOISE_STD, "schedule": "cosine",
                        "num_grid_steps": N_GRID, "batch_size": batch,
                        "tr_Sigma": float(np.trace(problem.Sigma)),
                        "tr_S": float(np.trace(problem.post.S))}}


def convergence(steps_list, per_example_t: bool = False, overrides: dict | None = None) -> dict:
    """CoDi (the defaults, or with `overrides` of the distill config; optionally one t per
    example) trained for each of `steps_list`: how far its distances still move."""
    problem = default_problem()
    gauss_apply = gs.gaussian_apply_fn(SCHEDULE)
    teacher_table = problem.student_from(gauss_apply, problem.teacher, N_GRID)
    overrides = overrides or {}
    cfg = codi_cfg(per_example_t=per_example_t, **overrides)
    loss = functools.partial(codi_loss, problem.student_apply, schedule=SCHEDULE, cfg=cfg)
    name = "_".join(["codi"] + [f"{k}_{v}" for k, v in overrides.items()]
                    + (["per_example_t"] if per_example_t else []))
    rows, training = [], {}
    for steps in steps_list:
        _, target, curve = train(problem, loss, teacher_table, steps=steps, lr=1e-2,
                                 batch_size=256, seed=2, target_ema=cfg.target_ema)
        training[f"{name}_{steps}"] = {"train_steps": steps, "loss_first_chunk": curve[0],
                                       "loss_mid": curve[len(curve) // 2],
                                       "loss_last_chunk": curve[-1], "loss_curve": curve}
        xpred = x_predictor(problem.student_apply, target)
        for sampler in ("ddim", "fresh"):
            for k in STEPS_K:
                rows.append({"objective": f"{name}_{steps}_steps", "steps": k, "sampler": sampler,
                             **evaluate(problem, xpred, k, sampler)})
        print(f"  {name} {steps} steps done", flush=True)
    return {"rows": rows, "training": training, "quick": False, "wall_s": 0.0,
            "problem": {"d": problem.d, "d_c": problem.dc, "noise_std": NOISE_STD,
                        "tr_Sigma": float(np.trace(problem.Sigma)),
                        "tr_S": float(np.trace(problem.post.S))}}


# ----------------------------------------------------------------------------- outputs


def pivot(result: dict, key: str, ks=STEPS_K) -> list[str]:
    """One line per objective: `key` at K = ks for the ddim and the fresh sampler."""
    head = " | ".join(f"{s} K={k}" for s in ("ddim", "fresh") for k in ks)
    lines = [f"| objective | {head} |", "|---|" + "---|" * (2 * len(ks))]
    table = {(r["objective"], r["sampler"], r["steps"]): r[key] for r in result["rows"]}
    for name in dict.fromkeys(r["objective"] for r in result["rows"] if r["steps"] > 0):
        cells = [table.get((name, s, k)) for s in ("ddim", "fresh") for k in ks]
        if any(c is not None for c in cells):
            lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.3f}"
                                                     for c in cells) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = []
    for key in ("w2_to_posterior", "mean_error", "ode_map_error"):
        lines += [f"**{key}**", ""] + pivot(result, key) + [""]
    many = [r for r in result["rows"] if r["sampler"] == "ddim" and r["steps"] in FINETUNE_K
            and r["objective"] in ("finetune", "exact_conditional_denoiser")]
    lines += ["**DDIM at many steps** (W2 to posterior / ODE-map error)", "",
              "| objective | " + " | ".join(f"K={k}" for k in FINETUNE_K) + " |",
              "|---|" + "---|" * len(FINETUNE_K)]
    for name in ("finetune", "exact_conditional_denoiser"):
        cells = {r["steps"]: r for r in many if r["objective"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[k]['w2_to_posterior']:.3f} / {cells[k]['ode_map_error']:.3f}"
            if k in cells else "" for k in FINETUNE_K) + " |")
    lines.append("")
    lines += ["All rows:", "",
              "| objective | steps | sampler | W2 to posterior | mean error | ODE-map error |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['objective']} | {r['steps']} | {r['sampler']} | "
                     f"{r['w2_to_posterior']:.4f} | {r['mean_error']:.4f} | "
                     f"{r['ode_map_error']:.4f} |")
    lines += ["", "| training run | steps | loss (first chunk) | loss (middle) | loss (last) |",
              "|---|---|---|---|---|"]
    for name, t in result["training"].items():
        lines.append(f"| {name} | {t['train_steps']} | {t['loss_first_chunk']:.5g} | "
                     f"{t['loss_mid']:.5g} | {t['loss_last_chunk']:.5g} |")
    p = result["problem"]
    lines += ["", f"d = {p['d']}, d_c = {p['d_c']}, s = {p['noise_std']}, tr Sigma = "
              f"{p['tr_Sigma']:.3f}, tr S = {p['tr_S']:.4f} (W2 of the posterior mean = "
              f"sqrt(tr S) = {np.sqrt(p['tr_S']):.4f}); wall {result['wall_s']} s"
              + (" (--quick)" if result["quick"] else "")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("w2_to_posterior", "mean_error", "ode_map_error")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharey="col")
    names = sorted({r["objective"] for r in result["rows"] if r["steps"] > 0})
    cmap = plt.get_cmap("tab20")
    for row, sampler in enumerate(("ddim", "fresh")):
        for col, key in enumerate(keys):
            ax = axes[row, col]
            for i, name in enumerate(names):
                pts = sorted((r["steps"], r[key]) for r in result["rows"]
                             if r["objective"] == name and r["sampler"] == sampler)
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o-", color=cmap(i % 20), label=name, ms=3)
            ax.axhline(np.sqrt(result["problem"]["tr_S"]), color="k", ls=":", lw=0.8)
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_title(f"{key} ({sampler})", fontsize=9)
            ax.set_xlabel("sampling steps K")
    axes[0, 2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Known-answer benchmark (dotted: sqrt(tr S), the posterior mean's W2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    # The fine-tuned model solves in float64 inside; set here, not at import, so that importing
    # this module (the tests do) leaves the process's dtype defaults alone.
    jax.config.update("jax_enable_x64", True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~10x shorter smoke run")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--from_json", default=None, help="re-render the .md and .png of a result")
    ap.add_argument("--convergence", default="",
                    help="comma-separated step counts: train only the default CoDi for each")
    ap.add_argument("--per_example_t", action="store_true", help="with --convergence")
    ap.add_argument("--set", action="append", default=[],
                    help="with --convergence: a distill config override, e.g. predictor=ddim")
    args = ap.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        suffix = os.path.basename(args.from_json)[len("known_answer"):-len(".json")]
    elif args.convergence:
        t0 = time.time()
        steps = [int(n) for n in args.convergence.split(",")]
        overrides = {}
        for item in args.set:
            key, value = item.split("=")
            overrides[key] = type(distill_config()[key])(value)
        result = convergence(steps, args.per_example_t, overrides)
        result["wall_s"] = round(time.time() - t0, 1)
        suffix = "_convergence" + "".join(f"_{k}_{v}" for k, v in overrides.items()) + (
            "_per_example_t" if args.per_example_t else "")
    else:
        result = run(quick=args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "known_answer" + suffix)
    if not args.from_json:
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, stem + ".png")
    print(markdown(result))


if __name__ == "__main__":
    main()
