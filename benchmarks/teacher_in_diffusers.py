"""Does diffusers (PyTorch) load a teacher folder written by cdd_jax and compute what cdd_jax does?

Two sides, so that the package's environment needs no torch and the peer's needs no JAX:

    python benchmarks/teacher_in_diffusers.py jax   --teacher=cdd_jax/assets/teacher
    python benchmarks/teacher_in_diffusers.py torch --teacher=cdd_jax/assets/teacher

The jax side loads the U-Net with `cdd_jax.load_diffusers` and stores random inputs (NHWC),
timesteps in the checkpoint's units and its outputs. The torch side (the `peers` extra) loads the
folder with `diffusers.DDPMPipeline.from_pretrained`, runs its U-Net on the same inputs (NCHW),
prints the maximum relative error (max |a - b| / max |b|) and exits non-zero above `--tol`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def jax_side(teacher: str, npz: str, batch: int, seed: int) -> None:
    import jax.numpy as jnp

    from cdd_jax import load_diffusers

    module, params = load_diffusers(teacher, subfolder="unet")
    size = module.config["sample_size"] or 32
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, module.config["in_channels"]), np.float32)
    timesteps = rng.uniform(0, 999, batch).astype(np.float32)
    out = module.apply({"params": params}, jnp.asarray(sample), jnp.asarray(timesteps))
    np.savez(npz, sample=sample, timesteps=timesteps, out=np.asarray(out))
    print(f"jax side: {batch} x {size}px outputs written to {npz}")


def torch_side(teacher: str, npz: str, tol: float) -> int:
    import torch
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(teacher)
    data = np.load(npz)
    with torch.no_grad():
        x = torch.from_numpy(data["sample"]).permute(0, 3, 1, 2)
        t = torch.from_numpy(data["timesteps"])
        ref = pipe.unet(x, t).sample.permute(0, 2, 3, 1).numpy()
    err = float(np.abs(data["out"] - ref).max() / np.abs(ref).max())
    print(json.dumps({"teacher": teacher, "max_rel_err": err, "tol": tol,
                      "scheduler": type(pipe.scheduler).__name__,
                      "prediction_type": pipe.scheduler.config.prediction_type,
                      "beta_schedule": pipe.scheduler.config.beta_schedule}))
    return 0 if err <= tol else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("side", choices=("jax", "torch"))
    ap.add_argument("--teacher", default="cdd_jax/assets/teacher")
    ap.add_argument("--npz", default="/tmp/teacher_in_diffusers.npz")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.side == "jax":
        jax_side(args.teacher, args.npz, args.batch, args.seed)
        return 0
    return torch_side(args.teacher, args.npz, args.tol)


if __name__ == "__main__":
    sys.exit(main())
