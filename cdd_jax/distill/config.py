"""Default configuration of the distillation objectives and its validation."""

from __future__ import annotations

import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.diffusion import PREDICTION_TYPES, SCHEDULES
from cdd_jax.distill.ema import WARMUPS as EMA_WARMUPS

OBJECTIVES = ("codi", "pe_codi", "finetune", "cm", "gd", "direct_cm")
PREDICTORS = ("prev", "ddim")
EPS_WEIGHTINGS = ("none", "min_snr", "truncated_snr")
DIFFUSION_WEIGHTINGS = ("none", "min_snr", "truncated_snr", "snr_plus_one")
DISTANCES = ("l2", "l1", "pseudo_huber")
BOUNDARIES = ("target", "real_noise")
GD_WEIGHTINGS = ("none", "truncated_snr")
D_X_SPACES = ("latent", "pixel")


def ema_config(decay: float, warmup: str) -> ml_collections.ConfigDict:
    """An EMA config section (decay, warmup, power, inv_gamma), as read by `ema.ema_decay`."""
    c = ml_collections.ConfigDict()
    c.decay = decay  # Final EMA decay mu: ema <- mu * ema + (1 - mu) * params.
    # Warm-up of the decay at step n: "none" (mu); "consistency": min(mu, (1 + n) / (10 + n));
    # "power": min(mu, 1 - (1 + n / inv_gamma) ** -power).
    c.warmup = warmup
    c.power = 2.0 / 3.0  # Exponent of the "power" warm-up.
    c.inv_gamma = 1.0  # Step scale of the "power" warm-up.
    return c



def distill_config() -> ml_collections.ConfigDict:
    """Default `distill` config section: the CoDi objective of the paper (Algorithm 1)."""
    c = ml_collections.ConfigDict()
    # Which loss trains the network: "codi" (all parameters), "pe_codi" (same loss; the trainer
    # freezes the backbone), "finetune" (plain v-prediction diffusion loss on the conditional
    # network), "cm" (consistency distillation of a fine-tuned teacher), "gd" (guided /
    # progressive distillation of a teacher).
    c.objective = "codi"
    # N: time grid t = k / N, k in {1..N}, s = t - 1/N (codi, cm). For "gd" N is the TEACHER's
    # number of steps in the current round; the student learns N/2 steps (next round: N/2).
    c.num_grid_steps = 20
    c.per_example_t = False  # False: ONE t per batch (the paper's choice); True: one per example.
    # One-step predictor of z_s from the online prediction at t: "prev" (paper eq. 12,
    # alpha_s x_hat_t + sigma_s eps with the real eps) or "ddim" (sigma_s eps_hat_t).
    c.predictor = "prev"
    # Target noise when s = 0 (k = 1). "real_noise" (default): the PREv noise eps itself, the
    # eps-space analogue of the consistency boundary f(z, t_min) = z. "target": the EMA network
    # at s = 0 like any other s (literal Algorithm 1); the network is never trained at t = 0
    # during distillation and its noise prediction there is ill-posed (sigma_0 ~ 0), and on toy
    # problems this variant ruins small-t predictions (see the distill report / docs).
    c.boundary = "real_noise"
    c.lambda_x = 1.0  # lambda: weight of the signal term d_x(x, x_hat_t).
    # w(t) on the noise term: "none" (1), "min_snr" (min(SNR, gamma) / SNR), "truncated_snr"
    # (max(SNR, 1) / SNR, the x-space truncated-SNR weight written for an eps loss).
    c.eps_weighting = "none"
    c.snr_gamma = 5.0  # gamma of the min-SNR weighting (here and in the fine-tuning loss).
    # Weighting of the v-MSE for "finetune": "none" | "min_snr" | "truncated_snr" | "snr_plus_one".
    c.diffusion_weighting = "none"
    c.d_eps = "l2"  # Distance on noise predictions: "l2" (MSE) | "l1" | "pseudo_huber".
    c.d_x = "l2"  # Distance on signal predictions: "l2" (MSE) | "l1" | "pseudo_huber".
    # Where d_x compares for a latent teacher (model.family "unet2d_condition"): "latent" (the
    # paper's choice: x and x_hat_t in the autoencoder's latent space) or "pixel" (x_hat_t
    # decoded through the teacher's VAE inside the loss, compared with the clean image).
    c.d_x_space = "latent"
    # Classifier-free guidance of the CoDi target (codi / pe_codi, text-guided tasks): the
    # target's output is uncond + w (cond - uncond), cond read with the batch's per-example
    # prompt embeddings and uncond with the teacher's stored (empty-prompt) embedding.
    # 1.0 = off (one target call; SR with the stored prompt needs nothing else).
    c.guidance_scale = 1.0
    # c of the pseudo-Huber distance sqrt(mean((a - b)^2) + c^2) - c (per example); this is the
    # improved-consistency-training form sqrt(||a - b||^2 + c'^2) - c' with c' = c sqrt(dim),
    # divided by sqrt(dim), so c = 0.00054 is that paper's default.
    c.pseudo_huber_c = 0.00054
    # EMA that serves as the CoDi / CM target theta_minus; warmed up so that it tracks the online
    # network at CPU-scale step counts (see docs on the target EMA).
    c.target_ema = ema_config(decay=0.99, warmup="consistency")
    # EMA of the weights used for evaluation and sampling: separate from the target EMA.
    c.eval_ema = ema_config(decay=0.999, warmup="consistency")

    c.cm = ml_collections.ConfigDict()
    c.cm.sigma_data = 0.5  # sigma_data of the boundary scalings c_skip, c_out.
    c.cm.time_scale = 10.0  # t' = time_scale * t in the scalings (latent-consistency form).
    c.cm.eps_t_min = 0.0  # t_min: boundary time with f(z, t_min) = z; grid starts there.
    c.cm.distance = "l2"  # Distance between f_theta and the target f_theta_minus.
    c.cm.per_example_t = True  # One t per example (standard for consistency distillation).

    c.gd = ml_collections.ConfigDict()
    c.gd.weighting = "truncated_snr"  # x-space weight: "truncated_snr" max(SNR, 1) | "none".
    c.gd.per_example_t = True  # One t per example (as in progressive distillation).

    # Direct CM (distill/direct_cm.py): CM's consistency function regressed onto the fine-tuned
    # model's M-step DDIM solve from t to cm.eps_t_min; shares the rest of the `cm` section.
    c.direct_cm = ml_collections.ConfigDict()
    c.direct_cm.num_teacher_steps = 32  # M: teacher DDIM steps of the target's ODE solve.
    return c


def diffusion_config() -> ml_collections.ConfigDict:
    """The `diffusion` section: the noise schedule and the pretraining loss weighting."""
    c = ml_collections.ConfigDict()
    c.schedule = "cosine"  # "cosine" | "linear" | "scaled_linear" (see cdd_jax.diffusion).
    # What the network outputs, in diffusers' names: "v_prediction" | "epsilon" | "sample". Every
    # loss and sampler reads the network in it; a diffusers teacher's scheduler config must agree
    # (checked by `stages.teacher.resolve_teacher` before anything is built).
    c.prediction_type = "v_prediction"
    # Diffusion-loss weighting (in the space it names, applied to the output's MSE):
    # "none" | "min_snr" | "truncated_snr" | "snr_plus_one".
    c.weighting = "none"
    c.snr_gamma = 5.0  # gamma of the min-SNR weighting.
    return c


def validate_diffusion_config(cfg: ml_collections.ConfigDict) -> None:
    checks.check_keys(cfg, diffusion_config(), "diffusion.")
    checks.choice(cfg, "schedule", tuple(SCHEDULES), prefix="diffusion.")
    checks.choice(cfg, "weighting", DIFFUSION_WEIGHTINGS, prefix="diffusion.")
    checks.choice(cfg, "prediction_type", PREDICTION_TYPES, prefix="diffusion.")
    checks.number(cfg, "snr_gamma", 0, lo_open=True, prefix="diffusion.")


def validate_ema_config(cfg: ml_collections.ConfigDict, prefix: str) -> None:
    """An EMA section (`ema.`, `distill.target_ema.`, ...)."""
    checks.check_keys(cfg, ema_config(0.999, "none"), prefix)
    checks.number(cfg, "decay", 0, 1, hi_open=True, prefix=prefix)
    checks.choice(cfg, "warmup", EMA_WARMUPS, prefix=prefix)
    for key in ("power", "inv_gamma"):
        checks.number(cfg, key, 0, lo_open=True, prefix=prefix)


def validate_distill_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ValueError/TypeError naming the first bad or unknown field; returns `cfg`."""
    p = "distill."
    checks.check_keys(cfg, distill_config(), p)
    checks.choice(cfg, "objective", OBJECTIVES, prefix=p)
    checks.number(cfg, "num_grid_steps", 1, integer=True, prefix=p)
    checks.number(cfg, "direct_cm.num_teacher_steps", 1, integer=True, prefix=p)
    if cfg.objective == "gd" and cfg.num_grid_steps % 2:
        raise ValueError(f"distill.num_grid_steps must be even for objective 'gd', "
                         f"got {cfg.num_grid_steps}")
    for key, valid in (("predictor", PREDICTORS), ("boundary", BOUNDARIES),
                       ("eps_weighting", EPS_WEIGHTINGS),
                       ("diffusion_weighting", DIFFUSION_WEIGHTINGS), ("d_eps", DISTANCES),
                       ("d_x", DISTANCES), ("cm.distance", DISTANCES),
                       ("gd.weighting", GD_WEIGHTINGS)):
        checks.choice(cfg, key, valid, prefix=p)
    checks.number(cfg, "lambda_x", 0, prefix=p)
    checks.choice(cfg, "d_x_space", D_X_SPACES, prefix=p)
    checks.number(cfg, "guidance_scale", 0, prefix=p)
    if cfg.guidance_scale != 1.0 and cfg.objective not in ("codi", "pe_codi"):
        raise ValueError(f"distill.guidance_scale={cfg.guidance_scale} guides the CoDi target; "
                         f"objective {cfg.objective!r} does not read it (set it to 1.0)")
    if cfg.d_x_space == "pixel" and cfg.objective not in ("codi", "pe_codi"):
        raise ValueError(f"distill.d_x_space='pixel' is a CoDi option; objective "
                         f"{cfg.objective!r} has no d_x (set it to 'latent')")
    for key in ("snr_gamma", "pseudo_huber_c", "cm.sigma_data", "cm.time_scale"):
        checks.number(cfg, key, 0, lo_open=True, prefix=p)
    checks.number(cfg, "cm.eps_t_min", 0, 1, hi_open=True, prefix=p)
    for name in ("target_ema", "eval_ema"):
        validate_ema_config(cfg[name], f"{p}{name}.")
    for key in ("per_example_t", "cm.per_example_t", "gd.per_example_t"):
        checks.boolean(cfg, key, prefix=p)
    return cfg
