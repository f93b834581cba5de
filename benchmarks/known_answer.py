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
--convergence). The problem, the students and the exact distances are in
`benchmarks/known_answer_problem.py`, the tables and the plot in `known_answer_report.py`.
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

from benchmarks.known_answer_problem import (  # noqa: E402
    FINETUNE_K,
    NOISE_STD,
    SCHEDULE,
    STEPS_K,
    Problem,
    affine_of,
    area_downsampling,
    clean_maps,
    default_problem,
    distances,
    evaluate,
    finetune_apply_fn,
    finetune_init,
    finetune_to_eigen,
    patch_statistics,
    pe_apply_fn,
    sampler_map,
    table_apply,
    table_from,
    x_predictor,
)
from benchmarks.known_answer_report import markdown, plot  # noqa: E402
from cdd_jax.diffusion import gaussian as gs  # noqa: E402
from cdd_jax.distill import (  # noqa: E402
    cm_loss,
    codi_loss,
    diffusion_loss,
    distill_config,
    ema_decay,
    ema_update,
    gd_loss,
)
from cdd_jax.distill.direct_cm import direct_cm_loss  # noqa: E402

# The tests (tests/test_known_answer.py) reach the problem's parts through this module.
__all__ = ["Problem", "SCHEDULE", "affine_of", "area_downsampling", "clean_maps", "codi_cfg",
           "evaluate", "patch_statistics", "run", "sampler_map", "table_apply", "table_from",
           "x_predictor"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_GRID = 20  # CoDi / CM / Direct CM grid t = k / N

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


class _Run:
    """One benchmark run: the problem, its step budget, and the rows and training records so far."""

    def __init__(self, quick: bool):
        self.t_start = time.time()
        self.quick = quick
        self.problem = default_problem()
        self.gauss_apply = gs.gaussian_apply_fn(SCHEDULE)
        self.student = self.problem.student_apply
        self.batch = 128 if quick else 256
        self.rows, self.training = [], {}

    def steps(self, n: int) -> int:
        """n optimiser steps (a tenth with --quick), in whole chunks of 250."""
        scale = 0.1 if self.quick else 1.0
        return max(250, int(round(n * scale / 250)) * 250)

    def train(self, loss_fn, params, *, steps: int, seed: int, target_ema=None):
        """`train` with the benchmark's learning rate and batch size."""
        return train(self.problem, loss_fn, params, steps=steps, lr=1e-2, batch_size=self.batch,
                     seed=seed, target_ema=target_ema)

    def add_rows(self, name, xpred, ks=STEPS_K, samplers=("ddim", "fresh")):
        """The distances of `xpred`'s K-step samplers, K in `ks`, as rows of `name`."""
        times = sorted({float(t) for k in ks for t in np.linspace(1.0, 0.0, k + 1)[:-1]})
        maps = clean_maps(self.problem, xpred, times)
        for sampler in samplers:
            for k in ks:
                self.rows.append({"objective": name, "steps": k, "sampler": sampler,
                                  **evaluate(self.problem, xpred, k, sampler, maps)})

    def record(self, name, curve, steps):
        """The loss curve of training run `name`."""
        self.training[name] = {"train_steps": steps, "loss_first_chunk": curve[0],
                               "loss_mid": curve[len(curve) // 2], "loss_last_chunk": curve[-1],
                               "loss_curve": curve}
        print(f"  {name}: {steps} steps, loss {curve[0]:.4g} -> {curve[len(curve) // 2]:.4g} "
              f"-> {curve[-1]:.4g}  ({time.time() - self.t_start:.0f} s)", flush=True)


def _references(ctx: _Run) -> None:
    """The exact ODE map, the posterior mean, the exact conditional denoiser sampled, and the
    unconditional teacher sampled (ignoring c)."""
    problem, gauss_apply = ctx.problem, ctx.gauss_apply
    M, H, h = problem.ode()
    ctx.rows.append({"objective": "exact_ode_map", "steps": 0, "sampler": "exact",
                     **distances(problem, M, H, h, [])})
    zero = np.zeros((problem.d, problem.d))
    ctx.rows.append({"objective": "posterior_mean", "steps": 0, "sampler": "exact",
                     **distances(problem, zero, problem.post.G, problem.post.g, [])})
    exact = x_predictor(gauss_apply, problem.exact_conditional)
    ctx.add_rows("exact_conditional_denoiser", exact, FINETUNE_K, ("ddim",))
    ctx.add_rows("exact_conditional_denoiser", exact, STEPS_K, ("fresh",))
    ctx.add_rows("unconditional_teacher", x_predictor(gauss_apply, problem.teacher), (4, 200),
                 ("ddim",))


def _finetune(ctx: _Run):
    """Conditional fine-tuning (diffusion loss) from the unconditional teacher; returns the
    fine-tuned model in `gaussian_apply_fn`'s parameters (the teacher of CM, Direct CM, GD)."""
    problem = ctx.problem
    ft_apply = finetune_apply_fn(problem)
    steps = ctx.steps(6000)
    ft, _, curve = ctx.train(
        lambda p, _, b, r: diffusion_loss(ft_apply, p, b, r, schedule=SCHEDULE),
        finetune_init(problem), steps=steps, seed=1)
    ctx.record("finetune", curve, steps)
    finetuned = finetune_to_eigen(problem, ft)
    ctx.add_rows("finetune", x_predictor(ctx.gauss_apply, finetuned), FINETUNE_K, ("ddim",))
    ctx.add_rows("finetune", x_predictor(ctx.gauss_apply, finetuned), STEPS_K, ("fresh",))
    return finetuned


CODI_RUNS = {  # CoDi's defaults and the paper's ablations: distill config overrides
    "codi": {},
    "codi_ddim_predictor": {"predictor": "ddim"},
    "codi_per_example_t": {"per_example_t": True},
    "codi_lambda0": {"lambda_x": 0.0},
    "codi_lambda100": {"lambda_x": 100.0},
    "codi_boundary_target": {"boundary": "target"},
}


def _codi(ctx: _Run) -> None:
    """CoDi and its ablations, PE-CoDi, and the default CoDi with twice the steps, all from the
    exact unconditional teacher."""
    student = ctx.student
    teacher_table = ctx.problem.student_from(ctx.gauss_apply, ctx.problem.teacher, N_GRID)
    steps = ctx.steps(6000)
    for name, overrides in CODI_RUNS.items():
        cfg = codi_cfg(**overrides)
        loss = functools.partial(codi_loss, student, schedule=SCHEDULE, cfg=cfg)
        _, target, curve = ctx.train(loss, teacher_table, steps=steps, seed=2,
                                     target_ema=cfg.target_ema)
        ctx.record(name, curve, steps)
        ctx.add_rows(name, x_predictor(student, target))
    cfg = codi_cfg()
    pe = pe_apply_fn(teacher_table, student)
    control0 = {"U": jnp.zeros_like(teacher_table["U"]), "b": jnp.zeros_like(teacher_table["b"])}
    _, target, curve = ctx.train(functools.partial(codi_loss, pe, schedule=SCHEDULE, cfg=cfg),
                                 control0, steps=steps, seed=2, target_ema=cfg.target_ema)
    ctx.record("pe_codi", curve, steps)
    ctx.add_rows("pe_codi", x_predictor(pe, target))
    # Convergence check: the default CoDi with twice the steps.
    _, target, curve = ctx.train(functools.partial(codi_loss, student, schedule=SCHEDULE,
                                                   cfg=cfg),
                                 teacher_table, steps=2 * steps, seed=2, target_ema=cfg.target_ema)
    ctx.record("codi_2x_steps", curve, 2 * steps)
    ctx.add_rows("codi_2x_steps", x_predictor(student, target))


def _cm_and_direct_cm(ctx: _Run, finetuned) -> None:
    """CM and Direct CM of the fine-tuned model, students initialised from it."""
    student, gauss_apply = ctx.student, ctx.gauss_apply
    student0 = ctx.problem.student_from(gauss_apply, finetuned, N_GRID)
    cfg = codi_cfg()
    steps = ctx.steps(6000)
    cm = lambda p, tgt, b, r: cm_loss(student, p, tgt, finetuned, b, r, schedule=SCHEDULE,
                                      cfg=cfg, finetuned_apply_fn=gauss_apply)
    _, target, curve = ctx.train(cm, student0, steps=steps, seed=3, target_ema=cfg.target_ema)
    ctx.record("cm", curve, steps)
    ctx.add_rows("cm", x_predictor(student, target, "f", cfg.cm))
    dcm = lambda p, _, b, r: direct_cm_loss(student, p, finetuned, b, r, schedule=SCHEDULE,
                                            cfg=cfg, finetuned_apply_fn=gauss_apply)
    params, _, curve = ctx.train(dcm, student0, steps=steps, seed=4)
    ctx.record("direct_cm", curve, steps)
    ctx.add_rows("direct_cm", x_predictor(student, params, "f", cfg.cm))


def _gd(ctx: _Run, finetuned) -> None:
    """GD (progressive distillation of the fine-tuned model): 64 -> 32 -> ... -> 1 steps; the
    K-step row is the round whose student takes K steps."""
    student = ctx.student
    teacher_apply, teacher_params = ctx.gauss_apply, finetuned
    params = ctx.problem.student_from(ctx.gauss_apply, finetuned, 32)
    steps = ctx.steps(1500)
    for n_teacher in (64, 32, 16, 8, 4, 2):
        cfg = codi_cfg(num_grid_steps=n_teacher)
        gd = lambda p, _, b, r, tp=teacher_params, ta=teacher_apply, cfg=cfg: gd_loss(
            student, p, tp, b, r, schedule=SCHEDULE, cfg=cfg, finetuned_apply_fn=ta)
        params, _, curve = ctx.train(gd, params, steps=steps, seed=5 + n_teacher)
        ctx.record(f"gd_round_{n_teacher}_to_{n_teacher // 2}", curve, steps)
        if n_teacher // 2 in STEPS_K:
            ctx.add_rows("gd", x_predictor(student, params), (n_teacher // 2,))
        teacher_apply, teacher_params = student, params


def run(quick: bool = False) -> dict:
    """Every objective trained and measured; the result dict of known_answer.json."""
    ctx = _Run(quick)
    _references(ctx)
    finetuned = _finetune(ctx)
    _codi(ctx)
    _cm_and_direct_cm(ctx, finetuned)
    _gd(ctx, finetuned)
    problem = ctx.problem
    ctx.rows.sort(key=lambda r: (r["objective"], r["sampler"], r["steps"]))
    return {"rows": ctx.rows, "training": ctx.training, "quick": quick,
            "wall_s": round(time.time() - ctx.t_start, 1),
            "problem": {"data": "8x8 greyscale patches of the bundled training photos",
                        "d": problem.d, "d_c": problem.dc, "noise_std": NOISE_STD,
                        "schedule": "cosine", "num_grid_steps": N_GRID,
                        "batch_size": ctx.batch, "tr_Sigma": float(np.trace(problem.Sigma)),
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
