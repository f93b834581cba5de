"""How much PSNR can a model learn from the bundled training photos? A direct-regression probe.

A posterior sampler cannot beat the minimum-mean-squared-error estimate on PSNR, so a plain MSE
regression from the degraded input to the ground truth, trained on the same training photos and
degradation as the default SR job and scored on its held-out photos, shows the PSNR headroom
over bicubic that this data offers. The network works on the 8 px input (space-to-depth of the
bicubic condition, 6 residual blocks at 8x8, width `--width`) and predicts a residual on top of
the bicubic condition (it starts as bicubic). Two settings: plain, and with a random permutation
of the colour channels of each training pair (so that it cannot learn the photos' colours).

    python benchmarks/sr_regression_bound.py [--steps=3000] [--train_pairs=8192] [--width=64]

Writes benchmarks/results/sr_regression_bound.json and .md (PSNR on 1024 held-out crops every
500 steps; ~6 min per setting on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def make_pairs(split: str, n: int, seed: int | None) -> dict:
    """n degraded pairs of the default SR job's data config from `split` ("train" / "eval")."""
    from cdd_jax.config.presets import sr_config
    from cdd_jax.data.degradations import SRPairTransform
    from cdd_jax.data.pipeline import make_eval_set, make_source

    cfg = sr_config("default")
    return make_eval_set(cfg.data, task="sr", num_crops=n, seed=seed,
                         sr_transform=SRPairTransform(cfg.degradation, cfg.data.crop_size),
                         source=make_source(cfg.data, split))


def mean_psnr(pred, target) -> float:
    import numpy as np

    mse = np.mean((np.clip(pred, -1, 1) - target) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10))))


def train_probe(train: dict, held_out: dict, *, steps: int, width: int, shuffle: bool,
                log_every: int = 500, seed: int = 0) -> list[dict]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    class Net(nn.Module):
        @nn.compact
        def __call__(self, c):
            b, s = c.shape[0], c.shape[1] // 4
            lr = c.reshape(b, s, 4, s, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, s, s, 48)
            h = nn.Conv(width, (3, 3))(lr)
            for _ in range(6):
                h = h + nn.Conv(width, (3, 3))(nn.silu(nn.Conv(width, (3, 3))(nn.silu(h))))
            r = nn.Conv(48, (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(h))
            return c + r.reshape(b, s, s, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(c.shape)

    net = Net()
    params = net.init(jax.random.key(seed), train["cond"][:2])
    opt = optax.adam(optax.cosine_decay_schedule(1e-3, steps, 0.05))
    opt_state = opt.init(params)

    @jax.jit
    def step(p, s, c, x):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((net.apply(q, c) - x) ** 2))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    predict = jax.jit(net.apply)
    rng = np.random.default_rng(seed)
    log, t0 = [], time.time()
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(train["cond"]), 64)
        c, x = train["cond"][idx], train["image"][idx]
        if shuffle:
            perm = rng.permutation(3)
            c, x = c[..., perm], x[..., perm]
        params, opt_state, loss = step(params, opt_state, c, x)
        if i % log_every == 0 or i == steps:
            pred = np.concatenate([np.asarray(predict(params, held_out["cond"][j:j + 256]))
                                   for j in range(0, len(held_out["cond"]), 256)])
            log.append({"step": i, "train_loss": float(loss),
                        "heldout_psnr": mean_psnr(pred, held_out["image"])})
            print(f"  shuffle={shuffle} step {i}: held-out PSNR {log[-1]['heldout_psnr']:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--train_pairs", type=int, default=8192)
    p.add_argument("--eval_pairs", type=int, default=1024)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)

    train = make_pairs("train", args.train_pairs, seed=123)
    held_out = make_pairs("eval", args.eval_pairs, seed=None)
    bicubic = mean_psnr(held_out["cond"], held_out["image"])
    print(f"bicubic on {args.eval_pairs} held-out crops: {bicubic:.2f} dB", flush=True)
    runs = {name: train_probe(train, held_out, steps=args.steps, width=args.width,
                              shuffle=name == "channel shuffle")
            for name in ("plain", "channel shuffle")}
    payload = {"machine": common.machine_info(), "args": vars(args),
               "bicubic_heldout_psnr": bicubic, "runs": runs}
    steps = [r["step"] for r in runs["plain"]]
    table = common.md_table(
        ["training step"] + [f"{n}: held-out PSNR (dB)" for n in runs] + ["bicubic"],
        [[s] + [f"{runs[n][i]['heldout_psnr']:.2f}" for n in runs] + [f"{bicubic:.2f}"]
         for i, s in enumerate(steps)])
    md = "\n".join([
        "# Direct MSE regression from the bundled training photos (PSNR headroom probe)",
        "",
        f"{args.train_pairs} degraded training pairs (default SR data and degradation), "
        f"{args.eval_pairs} held-out crops; residual CNN on the 8 px input, width {args.width}, "
        f"Adam 1e-3 cosine, batch 64. Command: `python benchmarks/sr_regression_bound.py "
        f"--steps={args.steps}`.",
        "",
        table,
        "",
    ])
    common.write_results("sr_regression_bound", payload, md, args.out_dir)


if __name__ == "__main__":
    main()
