"""What the command line prints: quiet by default (no INFO logs of absl, orbax or JAX, no
per-step log lines), the package's milestones (`cdd_jax.console.note`), one progress line and the
run's summary; `--verbosity=0` brings the INFO logs back.

The routing itself is checked in-process (fast); the slow test makes two real runs of the tiny
pretraining job in subprocesses (the second loads the first's compiled step from a persistent
cache in tmp_path)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdd_jax import console

REPO = Path(__file__).resolve().parent.parent
_ABSL_INFO = re.compile(r"^I\d{4} ", re.M)  # absl's INFO line prefix: I<MMDD> <time> ...


def _main(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", CDD_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"),
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "cdd_jax.main", "--config=configs/pretrain.py:tiny",
         f"--workdir={tmp_path / 'wd'}", "--config.train.num_steps=2",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.sample_every=0", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def verbosity():
    """Sets the root logger's level, as absl's `--verbosity` does under `app.run`."""
    root = logging.getLogger()
    before = root.level
    yield root.setLevel
    root.setLevel(before)


def test_notes_are_plain_lines_when_quiet_and_log_records_when_verbose(verbosity, capsys,
                                                                      caplog):
    verbosity(logging.WARNING)  # what the entry points set without --verbosity
    console.note("[job] compiled train step in %.1f s", 1.25)
    assert capsys.readouterr().err == "[job] compiled train step in 1.2 s\n"
    assert "compiled" not in caplog.text
    with console.progress(3, desc="[job]") as bar:
        assert not bar.disable
        bar.update(3)
    assert "3/3" in capsys.readouterr().err

    verbosity(logging.INFO)  # --verbosity=0
    with caplog.at_level("INFO"):
        console.note("[job] resumed from step %d", 7)
    assert "[job] resumed from step 7" in caplog.text
    assert capsys.readouterr().err == ""  # the log handler, not a second plain copy
    with console.progress(3, desc="[job]") as bar:
        assert bar.disable  # INFO logs report progress instead


@pytest.mark.slow
def test_main_is_quiet_by_default_and_verbosity_brings_the_logs_back(tmp_path):
    quiet = _main(tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    assert not _ABSL_INFO.search(text), _ABSL_INFO.search(text).group(0) + text[-2000:]
    assert "Unable to initialize backend" not in text  # JAX's backend probing (INFO)
    assert "| Name" not in text  # the parameter table (INFO)
    assert re.search(r"\[pretrain\] compiled train step in [0-9.]+ s", text), text[-2000:]
    assert re.search(r"\[pretrain\]:? +100%.*2/2", quiet.stderr), quiet.stderr[-2000:]
    assert f"done: everything is in {tmp_path / 'wd'}" in quiet.stdout
    # The same workdir again, with INFO logs: the finished run is restored, nothing retrained.
    loud = _main(tmp_path, "--verbosity=0")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert _ABSL_INFO.search(loud.stderr), loud.stderr[-2000:]
    assert "resumed from step 2" in loud.stderr
    assert "compiled train step: {" in loud.stderr  # the full JSON line of the step's numbers
