"""Train-step speed of the SD-style latent CoDi job: cdd_jax vs diffusers in PyTorch.

The "sd" kind of `train_step.py` with its own defaults: the compiled CoDi step of the latent,
text-conditioned job (`configs/sr.py:sd`: epsilon, scaled_linear, ControlNet's condition
embedder, lambda 1) on an SD-style teacher folder written locally (`contenders.sd_teacher`)
against diffusers' UNet2DConditionModel + ControlNetModel.from_unet doing the same work per step
(`peer_torch.py`), alternated in one run. Variants: "sd_small" (SD 1.5's block structure at CPU
widths, 2 levels: latents 4x32x32 from 256 px images, batch 4, a [B, 77, 64] prompt embedding)
and "sd15" (SD 1.5's U-Net, 512 px, batch 4; only where a GPU is present, otherwise skipped with
a message). On the 2-core development machine the cdd_jax worker compiles the whole
"sd_small" step in ~95 s at ~4.3 GB (figures: docs/PERFORMANCE.md). The peer needs torch and
diffusers importable next to jax (e.g. PYTHONPATH with links to a torch venv's packages).
Neither side encodes with the VAE in the timed step (both encode the batch once at setup).

    python benchmarks/sd_train_step.py [--variants=sd_small,sd15] [--rounds=6] [--per_round=2]
        [--dtype=float32|bfloat16] [--batch_size=N] [--name=sd_train_step]

Every other `train_step.py` argument applies (`--threads=all,1`, `--experiments=...`, ...).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_step  # noqa: E402

DEFAULTS = dict(kinds="sd", variants="sd_small,sd15", threads="all", experiments="",
                name="sd_train_step")

if __name__ == "__main__":
    train_step.main(**DEFAULTS)
