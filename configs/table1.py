"""The paper's Table 1 at small scale: bicubic, fine-tuned model (DDIM / DPM-Solver++), CM,
GD (distillation-first by default, `table1.gd_order`), PE-CoDi, CoDi and Direct CM, all from the
shipped teacher with the same budget per row, each for every seed of `table1.seeds`; writes
DIR/table1.md, DIR/table1.json (seed means, 95% t-intervals, per-seed values),
DIR/table1_per_seed.json, DIR/table1_quality_vs_nfe.png and DIR/table1_grid.png; every row is also
evaluated on the bundled validation and test photos (`evaluate.photos`: 128 px centre crops through
the Upscaler's tiled path), aggregated in DIR/table1_photos_<split>.json and table1.md, and the
paper's claims are checked on `table1.claims_split` (default "test").

    python -m cdd_jax.main --config=configs/table1.py --workdir=/tmp/table1
Variants: default (bundled photos, shipped teacher, three seeds: about 2.5 hours per seed on 2
CPU cores, half of it the Direct CM row), tiny (tests, one seed).
Running the command again resumes: finished rows of each seed are skipped, partial ones resume;
finished rows without photo results get them from their final checkpoints (never retrained).
"""

from cdd_jax.config.presets import table1_config


def get_config(variant: str | None = None):
    return table1_config(variant or "default")
