"""The known-answer benchmark's outputs: the Markdown tables and the plot of its result dict
(benchmarks/known_answer.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.known_answer_problem import FINETUNE_K, STEPS_K


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
