"""The known-answer problem (benchmarks/known_answer.py): Gaussian data observed through a
linear degradation, the affine students, and the exact distances of their K-step samplers.

Data x ~ N(mu, Sigma) (8x8 greyscale patches of the bundled training photos), c = A x + n with
A the 2x2 area downsampling and n ~ N(0, NOISE_STD^2 I); the posterior, the teacher (the exact
unconditional denoiser) and the conditional PF-ODE map are exact (`cdd_jax.diffusion.gaussian`).
Every K-step sampler of an affine student is an affine map of (z_T, c, fresh noise), so the
distances to the posterior and to the ODE map are computed in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cdd_jax.diffusion import gaussian as gs
from cdd_jax.diffusion import get_schedule
from cdd_jax.distill import consistency_fn

SCHEDULE = get_schedule("cosine")
NOISE_STD = 0.02
STEPS_K = (1, 2, 4)  # sampling steps K of every student
FINETUNE_K = (1, 2, 4, 8, 20, 50, 200)  # ... and of the fine-tuned model and exact denoiser

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
