"""Default configuration of the distillation objectives and its validation."""

from __future__ import annotations

import numbers

import ml_collections

OBJECTIVES = ("codi", "pe_codi", "finetune", "cm", "gd")
PREDICTORS = ("prev", "ddim")
EPS_WEIGHTINGS = ("none", "min_snr", "truncated_snr")
DIFFUSION_WEIGHTINGS = ("none", "min_snr", "truncated_snr", "snr_plus_one")
DISTANCES = ("l2", "l1", "pseudo_huber")
EMA_WARMUPS = ("none", "consistency", "power")
BOUNDARIES = ("target", "real_noise")
GD_WEIGHTINGS = ("none", "truncated_snr")


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


_ema_config = ema_config  # old private name, still imported by callers


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
    return c


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"distill.{name} must be one of {choices}, got {value!r}")


def _check_number(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"distill.{name} must be a number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"distill.{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"distill.{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def _check_keys(cfg, ref, prefix: str) -> None:
    unknown = sorted(set(cfg.keys()) - set(ref.keys()))
    missing = sorted(set(ref.keys()) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown config keys under {prefix}: {unknown}")
    if missing:
        raise ValueError(f"missing config keys under {prefix}: {missing}")
    for key in ref.keys():
        if isinstance(ref[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                raise TypeError(f"{prefix}.{key} must be a ConfigDict, got {cfg[key]!r}")
            _check_keys(cfg[key], ref[key], f"{prefix}.{key}")


def validate_distill_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ValueError/TypeError naming the first bad or unknown field; returns `cfg`."""
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(f"distill config must be an ml_collections.ConfigDict, got {type(cfg)}")
    _check_keys(cfg, distill_config(), "distill")
    _check_choice("objective", cfg.objective, OBJECTIVES)
    n = cfg.num_grid_steps
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"distill.num_grid_steps must be an integer >= 1, got {n!r}")
    if cfg.objective == "gd" and n % 2:
        raise ValueError(f"distill.num_grid_steps must be even for objective 'gd', got {n}")
    _check_choice("predictor", cfg.predictor, PREDICTORS)
    _check_choice("boundary", cfg.boundary, BOUNDARIES)
    _check_number("lambda_x", cfg.lambda_x, lo=0.0)
    _check_choice("eps_weighting", cfg.eps_weighting, EPS_WEIGHTINGS)
    _check_choice("diffusion_weighting", cfg.diffusion_weighting, DIFFUSION_WEIGHTINGS)
    _check_number("snr_gamma", cfg.snr_gamma, lo=0.0, lo_open=True)
    _check_choice("d_eps", cfg.d_eps, DISTANCES)
    _check_choice("d_x", cfg.d_x, DISTANCES)
    _check_number("pseudo_huber_c", cfg.pseudo_huber_c, lo=0.0, lo_open=True)
    for name in ("target_ema", "eval_ema"):
        ema = cfg[name]
        _check_number(f"{name}.decay", ema.decay, lo=0.0, hi=1.0, hi_open=True)
        _check_choice(f"{name}.warmup", ema.warmup, EMA_WARMUPS)
        _check_number(f"{name}.power", ema.power, lo=0.0, lo_open=True)
        _check_number(f"{name}.inv_gamma", ema.inv_gamma, lo=0.0, lo_open=True)
    _check_number("cm.sigma_data", cfg.cm.sigma_data, lo=0.0, lo_open=True)
    _check_number("cm.time_scale", cfg.cm.time_scale, lo=0.0, lo_open=True)
    _check_number("cm.eps_t_min", cfg.cm.eps_t_min, lo=0.0, hi=1.0, hi_open=True)
    _check_choice("cm.distance", cfg.cm.distance, DISTANCES)
    _check_choice("gd.weighting", cfg.gd.weighting, GD_WEIGHTINGS)
    for name in ("per_example_t", "cm.per_example_t", "gd.per_example_t"):
        value = cfg
        for part in name.split("."):
            value = value[part]
        if not isinstance(value, bool):
            raise TypeError(f"distill.{name} must be a bool, got {value!r}")
    return cfg
