"""The paper's Table 1 at small scale: bicubic, fine-tuned model (DDIM / DPM-Solver++), CM-II,
GD-II, PE-CoDi, CoDi and Direct CM, all from the shipped teacher with the same budget; writes
DIR/table1.md, DIR/table1.json, DIR/table1_quality_vs_nfe.png and DIR/table1_grid.png.

    python -m cdd_jax.main --config=configs/table1.py --workdir=/tmp/table1
Variants: default (bundled photos, shipped teacher, about 2 hours on 2 CPU cores), tiny (tests).
Running the command again resumes: finished rows are skipped, partial ones resume.
"""

from cdd_jax.config.presets import table1_config


def get_config(variant: str | None = None):
    return table1_config(variant or "default")
