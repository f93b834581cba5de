"""The CoDi objective: conditional consistency distillation in noise space with PREv.

Mei et al., "Conditional Diffusion Distillation" (CVPR 2024), eq. 11-12 and Algorithm 1:

    t = k / N, k ~ U{1..N} (one per batch), s = t - 1/N,   z_t = alpha_t x + sigma_t eps
    x_hat_t, eps_hat_t  <- online network at (z_t, t, c), read in its prediction type
    z_hat_s = alpha_s x_hat_t + sigma_s eps                        (PREv: the REAL noise)
    eps_hat_minus       <- sg(target v_hat_theta_minus(sg(z_hat_s), s, c))
    L = w(t) d_eps(eps_hat_t, eps_hat_minus) + lambda d_x(x, x_hat_t)

At s = 0 (k = 1) the target's noise prediction is ill-posed (the noise is invisible in z_0);
cfg.boundary = "real_noise" (default) uses the PREv noise eps there instead, "target" keeps the
literal target-network evaluation.

Every objective reads the network in the teacher's own parameterisation (`prediction_type`:
"v_prediction", "epsilon" or "sample", `cdd_jax.diffusion.denoise`); the student keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.diffusion import Schedule, add_noise, bcast, denoise, loss_weight
from cdd_jax.distill.config import BOUNDARIES, DISTANCES, EPS_WEIGHTINGS, PREDICTORS

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None, jax.Array | None], jax.Array]


def unpack_batch(batch: Mapping[str, Any]) -> tuple[jax.Array, Any]:
    """Returns (x, cond) from a batch dict with 'image' (NHWC in [-1, 1]), optional 'cond' (the
    condition image) and optional 'prompt_embeds' ([B, T, D] per-example prompt embeddings of a
    text-conditioned network). With prompt embeddings, cond is the mapping
    {"image": batch['cond'], "prompt_embeds": ...} that the conditional apply_fn reads;
    otherwise the condition image itself."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch must be a dict with an 'image' entry, got {keys}")
    x = jnp.asarray(batch["image"])
    if x.ndim < 2:
        raise ValueError(f"batch['image'] must have a batch axis and data axes, got {x.shape}")
    if batch.get("prompt_embeds") is None:
        return x, batch.get("cond")
    if batch.get("cond") is None:
        raise ValueError("batch['prompt_embeds'] needs a condition image batch['cond']")
    return x, {"image": batch["cond"], "prompt_embeds": batch["prompt_embeds"]}


def condition_image(cond: Any) -> jax.Array | None:
    """The condition image of `cond` (an image, or the mapping `unpack_batch` makes)."""
    return cond["image"] if isinstance(cond, Mapping) else cond


def unconditional(cond: Any) -> Any:
    """`cond` without its per-example prompt embeddings: the network then reads its stored
    prompt embedding (the empty prompt's), the unconditional branch of classifier-free guidance.
    The condition image stays: guidance is over the text only."""
    return condition_image(cond)


def guided_output(apply_fn: ApplyFn, params: Any, z: jax.Array, t: jax.Array, cond: Any,
                  scale: float) -> jax.Array:
    """The network's deterministic output under classifier-free guidance (float32):

        out_uncond + scale * (out_cond - out_uncond)

    with out_cond read with the per-example prompt embeddings and out_uncond with the stored
    (empty-prompt) one. Guidance is affine with weights summing to one and `denoise` is affine
    in the output, so guiding the output guides x_hat and eps_hat alike. scale 1: the plain
    conditional output (one network call)."""
    out_cond = apply_fn(params, z, t, cond, None).astype(jnp.float32)
    if scale == 1.0:
        return out_cond
    if not isinstance(cond, Mapping) or cond.get("prompt_embeds") is None:
        raise ValueError(f"classifier-free guidance (distill.guidance_scale={scale}) needs "
                         "per-example prompt embeddings (a 'prompt_embeds' batch entry); with "
                         "the stored prompt alone the conditional and unconditional outputs are "
                         "the same")
    out_uncond = apply_fn(params, z, t, unconditional(cond), None).astype(jnp.float32)
    return out_uncond + scale * (out_cond - out_uncond)


def as_model_fn(apply_fn: ApplyFn, params: Any, cond: jax.Array | None, batch_size: int):
    """The samplers' `model_fn(z, t) -> output` (float32), t broadcast to (B,); deterministic."""

    def model_fn(z, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch_size,))
        return apply_fn(params, z, t, cond, None).astype(jnp.float32)

    return model_fn


def distance(kind: str, a: jax.Array, b: jax.Array, *, huber_c: float = 0.00054) -> jax.Array:
    """Per-example distance, shape (B,): mean over all non-batch axes.

    "l2": mean((a - b)^2); "l1": mean(|a - b|); "pseudo_huber": sqrt(mean((a - b)^2) + c^2) - c.
    """
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; valid: {DISTANCES}")
    diff = (a - b).astype(jnp.float32)
    axes = tuple(range(1, diff.ndim))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=axes)
    mse = jnp.mean(jnp.square(diff), axis=axes)
    if kind == "l2":
        return mse
    return jnp.sqrt(mse + huber_c**2) - huber_c


def eps_weight(kind: str, logsnr: jax.Array, gamma: float = 5.0) -> jax.Array:
    """w(t) of the noise-space term: "none" 1, "min_snr" min(SNR, gamma) / SNR,
    "truncated_snr" max(SNR, 1) / SNR (the x-space truncated-SNR weight for an eps loss)."""
    if kind not in EPS_WEIGHTINGS:
        raise ValueError(f"unknown eps weighting {kind!r}; valid: {EPS_WEIGHTINGS}")
    if kind == "truncated_snr":
        return jnp.maximum(1.0, jnp.exp(-jnp.asarray(logsnr, jnp.float32)))
    return loss_weight(kind, logsnr, gamma)


def sample_codi_times(
    rng: jax.Array, batch_size: int, num_grid_steps: int, per_example: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(t, s), each float32 of shape (B,): t = k / N, k ~ U{1..N}, s = t - 1/N.

    per_example=False draws ONE k for the whole batch (the paper's choice); True draws one each.
    """
    if int(num_grid_steps) < 1:
        raise ValueError(f"num_grid_steps must be >= 1, got {num_grid_steps!r}")
    shape = (batch_size,) if per_example else ()
    k = jax.random.randint(rng, shape, 1, num_grid_steps + 1)
    k = jnp.broadcast_to(k, (batch_size,)).astype(jnp.float32)
    return k / num_grid_steps, (k - 1.0) / num_grid_steps


def prev_predictor(
    x_hat_t: jax.Array, noise: jax.Array, alpha_s: jax.Array, sigma_s: jax.Array
) -> jax.Array:
    """z_hat_s = alpha_s x_hat_t + sigma_s noise.

    PREv (eq. 12) passes the real noise eps that made z_t; the DDIM predictor passes eps_hat_t.
    """
    return bcast(alpha_s, x_hat_t.ndim) * x_hat_t + bcast(sigma_s, x_hat_t.ndim) * noise


def _d_x_pair(cfg, batch, x, x_hat_t, decode):
    """(x, x_hat_t) in the space d_x compares them: as given, or decoded to pixels."""
    if cfg.get("d_x_space", "latent") != "pixel":
        return x, x_hat_t
    if decode is None or "pixels" not in batch:
        raise ValueError("distill.d_x_space='pixel' needs the autoencoder's decoder and the "
                         "clean pixels (batch['pixels']): a latent teacher's job provides both")
    return jnp.asarray(batch["pixels"], jnp.float32), decode(batch, x_hat_t).astype(jnp.float32)


def codi_loss(
    apply_fn: ApplyFn,
    params: Any,
    target_params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    cfg: ml_collections.ConfigDict,
    prediction_type: str = "v_prediction",
    decode: Callable[[Mapping[str, Any], jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CoDi loss (Algorithm 1). `target_params` is theta_minus (the target EMA); no gradient
    reaches it. The target network runs deterministically (rng None). `prediction_type`: what
    the network outputs (the teacher's own parameterisation). `decode(batch, latents) -> images`
    (latent teachers with cfg.d_x_space "pixel"): d_x compares decode(x_hat_t) with
    batch["pixels"], the clean image the latents x were encoded from. Returns (loss, metrics)."""
    if cfg.predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {cfg.predictor!r}; valid: {PREDICTORS}")
    if cfg.boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary {cfg.boundary!r}; valid: {BOUNDARIES}")
    x, cond = unpack_batch(batch)
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)

    # 1. One t per batch on the N-step grid, s one grid step earlier.
    t, s = sample_codi_times(rng_t, x.shape[0], cfg.num_grid_steps, cfg.per_example_t)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    # 2. Diffuse the data.
    eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
    z_t = add_noise(x, eps, alpha_t, sigma_t)
    # 3. Online prediction.
    out = apply_fn(params, z_t, t, cond, rng_drop).astype(jnp.float32)
    x_hat_t, eps_hat_t = denoise(prediction_type, z_t, out, alpha_t, sigma_t)
    # 4. PREv: one DDIM step to s with the real noise (or eps_hat_t for the "ddim" option).
    noise = eps if cfg.predictor == "prev" else eps_hat_t
    z_hat_s = jax.lax.stop_gradient(prev_predictor(x_hat_t, noise, alpha_s, sigma_s))
    # 5. Target noise prediction by theta_minus at (z_hat_s, s, c).
    #    Text: the target guided by its stored (empty-prompt) embedding, cfg.guidance_scale.
    out_minus = guided_output(apply_fn, jax.lax.stop_gradient(target_params), z_hat_s, s, cond,
                              cfg.get("guidance_scale", 1.0))
    _, eps_hat_minus = denoise(prediction_type, z_hat_s, out_minus, alpha_s, sigma_s)
    if cfg.boundary == "real_noise":
        eps_hat_minus = jnp.where(bcast(s == 0.0, x.ndim), eps, eps_hat_minus)
    eps_hat_minus = jax.lax.stop_gradient(eps_hat_minus)
    # 6. L = w(t) d_eps(eps_hat_t, eps_hat_minus) + lambda d_x(x, x_hat_t).
    w = eps_weight(cfg.eps_weighting, schedule.logsnr(t), cfg.snr_gamma)
    d_eps = distance(cfg.d_eps, eps_hat_t, eps_hat_minus, huber_c=cfg.pseudo_huber_c)
    d_x = distance(cfg.d_x, *_d_x_pair(cfg, batch, x, x_hat_t, decode),
                   huber_c=cfg.pseudo_huber_c)
    loss = jnp.mean(w * d_eps + cfg.lambda_x * d_x)
    metrics = {"loss": loss, "d_eps": d_eps.mean(), "d_x": d_x.mean(), "t_mean": t.mean()}
    return loss, metrics
