"""Encode latents in the step or cache them ahead? (issue 18, "Latent-space CoDi".)

The latent job encodes each batch with the teacher's VAE right before its train step
(`Job.prepare_batch`, applied by the loop). Caching the latents ahead as a dataset can save at
most the encoding's share of a step; it also fixes each image's crop and augmentation once (the
on-the-fly degradation and random crops would then see a finite set of latents). This measures
that share on the benchmark's SD-style job ("sd_small": SD 1.5's block structure at small widths,
256 px crops, batch 4, `benchmarks/contenders.py`): the prepared-batch call and the compiled CoDi
step, alternated, each blocked until ready.

    python benchmarks/sd_encode_share.py [--variant=sd_small] [--rounds=5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="sd_small")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import jax

    from benchmarks import contenders
    from cdd_jax.train.loop import prepared_batch

    config = contenders.sd_bench_config(args.variant)
    contender = contenders.build_contender("sd", config)
    job = contenders.contender_job("sd", config, contenders.real_batch(config, "sd"))
    raw = contender.step.global_batch(contenders.real_batch(config, "sd"))
    jax.block_until_ready(prepared_batch(job, raw))  # compile the encoder
    encode, step = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(prepared_batch(job, raw))
        encode.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(contender.step_once())
        step.append(time.perf_counter() - t0)
    out = {"variant": args.variant, "encode_s": encode, "step_s": step,
           "encode_median_s": statistics.median(encode), "step_median_s": statistics.median(step),
           "load": os.getloadavg()}
    out["encode_share"] = out["encode_median_s"] / (out["encode_median_s"] + out["step_median_s"])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
