"""Two formulations of the layers that dominate the CPU train step, timed side by side.

Why the CoDi step on XLA:CPU is not faster (docs/PERFORMANCE.md) was narrowed down by asking, for
the two kinds of layer that carry most of its time, whether another formulation XLA compiles
better exists. Each candidate is checked against the framework's own layer (same outputs and
gradients) before it is timed:

  conv      3x3 "SAME" convolution, forward + gradients w.r.t. input and kernel:
            `lax.conv_general_dilated` (what `cdd_jax.models.layers.Conv` runs) vs im2col (nine
            shifted slices concatenated, one matmul; the weight gradient becomes a plain dot).
  groupnorm GroupNorm + SiLU, forward + gradients w.r.t. input, scale and bias:
            flax `nn.GroupNorm` differentiated by JAX vs a hand-written VJP (closed-form
            backward: two reductions per group instead of autodiff's chain).

Shapes: the default U-Net's layers at batch 16 (one XLA:CPU device's half of the batch of 32).
Calls alternate round by round; medians of `--reps` calls per round.

    python benchmarks/layer_alternatives.py [--rounds=3] [--reps=20]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402

GN_EPS = 1e-6  # flax nn.GroupNorm's default epsilon

CONV_SHAPES = ((16, 32, 32, 32), (16, 32, 64, 32), (16, 16, 64, 64), (16, 8, 64, 64))  # N,S,Ci,Co
GN_SHAPES = ((16, 32, 32, 32), (16, 32, 32, 64), (16, 16, 16, 64), (16, 8, 8, 64))  # N,H,W,C


def conv_xla(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_im2col(x, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = [xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)]
    return jnp.einsum("nhwk,ko->nhwo", jnp.concatenate(cols, axis=-1), w.reshape(9 * c, -1))


def group_norm_flax(x, scale, bias, groups: int):
    import flax.linen as nn

    m = nn.GroupNorm(num_groups=groups, epsilon=GN_EPS)
    return m.apply({"params": {"scale": scale, "bias": bias}}, x)


def _gn_forward(x, scale, bias, groups):
    n, h, w, c = x.shape
    xg = x.reshape(n, h * w, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg), axis=(1, 3), keepdims=True) - jnp.square(mean)
    r = jax.lax.rsqrt(jnp.maximum(var, 0.0) + GN_EPS)
    xhat = ((xg - mean) * r).reshape(x.shape)
    return xhat * scale + bias, (xhat, r, scale)


def _gn_backward(groups, res, dy):
    xhat, r, scale = res
    n, h, w, c = dy.shape
    g = (dy * scale).reshape(n, h * w, groups, c // groups)
    xg = xhat.reshape(g.shape)
    mean_g = jnp.mean(g, axis=(1, 3), keepdims=True)
    mean_gx = jnp.mean(g * xg, axis=(1, 3), keepdims=True)
    dx = (r * (g - mean_g - xg * mean_gx)).reshape(dy.shape)
    return dx, jnp.sum(dy * xhat, axis=(0, 1, 2)), jnp.sum(dy, axis=(0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def group_norm_hand_vjp(x, scale, bias, groups: int):
    return _gn_forward(x, scale, bias, groups)[0]


group_norm_hand_vjp.defvjp(_gn_forward, _gn_backward)


def conv_case(shape):
    n, s, ci, co = shape
    k = jax.random.split(jax.random.key(0), 2)
    args = (jax.random.normal(k[0], (n, s, s, ci)), 0.1 * jax.random.normal(k[1], (3, 3, ci, co)))

    def grads(f):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))

    return {"xla": grads(conv_xla), "im2col": grads(conv_im2col)}, args


def gn_case(shape, groups: int = 32):
    k = jax.random.split(jax.random.key(1), 4)
    c = shape[-1]
    x = 2.0 * jax.random.normal(k[0], shape) + 0.5
    args = (x, 1 + 0.1 * jax.random.normal(k[1], (c,)), 0.1 * jax.random.normal(k[2], (c,)))
    cot = jax.random.normal(k[3], shape)

    def grads(f):
        loss = lambda x, s, b: jnp.sum(jax.nn.silu(f(x, s, b, groups)) * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    return {"flax": grads(group_norm_flax), "hand_vjp": grads(group_norm_hand_vjp)}, args


def max_rel_err(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(p)))
        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def time_ms(f, args, reps: int) -> float:
    ts = common.time_calls(lambda: jax.block_until_ready(f(*args)), reps)[0]
    return 1e3 * statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out_dir", default=common.RESULTS_DIR)
    args = p.parse_args()
    machine = common.machine_info()
    cases = [("conv", s, *conv_case(s)) for s in CONV_SHAPES]
    cases += [("groupnorm", s, *gn_case(s)) for s in GN_SHAPES]
    rows = []
    for layer, shape, fns, fargs in cases:
        ref, alt = list(fns)
        err = max_rel_err(fns[ref](*fargs), fns[alt](*fargs))  # also compiles both
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[name].append(time_ms(fns[name], fargs, args.reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"layer": layer, "shape": list(shape), "reference": ref, "alternative": alt,
                     "max_rel_err": err, "ms": med, "ms_per_round": times,
                     "alternative_speed": med[ref] / med[alt]})
        print(f"{layer} {shape}: {ref} {med[ref]:.2f} ms, {alt} {med[alt]:.2f} ms, "
              f"rel. err {err:.1e}", flush=True)
    md = [
        "# Layer formulations on XLA:CPU: forward + backward, the framework's vs an alternative",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; jax {machine['versions']['jax']}; "
        f"devices {jax.devices()}; load {machine['load_average']}. {args.rounds} alternating "
        f"rounds x {args.reps} calls, medians. conv shapes are (batch, size, C_in, C_out) of a "
        "3x3 conv; groupnorm shapes are NHWC with 32 groups, followed by SiLU. The alternative "
        "is checked against the reference (max relative error over outputs' gradients) first.",
        "",
        common.md_table(
            ["layer", "shape", "reference ms", "alternative", "alternative ms",
             "alternative / reference speed", "max rel. err"],
            [[r["layer"], tuple(r["shape"]), r["ms"][r["reference"]], r["alternative"],
              r["ms"][r["alternative"]], r["alternative_speed"], f"{r['max_rel_err']:.1e}"]
             for r in rows],
        ),
    ]
    common.write_results(
        "layer_alternatives", {"machine": machine, "args": vars(args), "rows": rows},
        "\n".join(md), args.out_dir,
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
