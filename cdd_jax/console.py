"""What a job tells the person at the terminal.

The entry points (`python -m cdd_jax.main`, `cdd_jax.upscale`, `cdd_jax.evaluate`) set absl's
verbosity to WARNING unless `--verbosity` is given, so the libraries' INFO logs (orbax, JAX's
backend probing, the parameter table) stay out of the way. The package's own milestones go
through `note`: an INFO log line when INFO logs are on (as before, for log files and tests that
read them), otherwise one plain line on stderr. Long loops show one `progress` line with rate and
ETA instead of a log line per step. Only process 0 of a multi-host job speaks.
"""

from __future__ import annotations

import logging
import sys

import jax
from tqdm.auto import tqdm

_log = logging.getLogger("cdd_jax")


def _speaks() -> bool:
    return jax.process_index() == 0


def verbose() -> bool:
    """Whether INFO logs are on: under absl's `app.run` the root logger's level follows
    `--verbosity` (the entry points set WARNING unless it is given); a test's log capture at
    INFO turns them on too."""
    return _log.isEnabledFor(logging.INFO)


def note(message: str, *args) -> None:
    """A milestone (`%`-style args, like logging)."""
    if verbose():
        _log.info(message, *args)
    elif _speaks():
        tqdm.write(message % args if args else message, file=sys.stderr)


def progress(total: int, initial: int = 0, desc: str = "") -> tqdm:
    """One progress line over `total` steps (disabled when INFO logs report progress instead,
    on processes other than 0, and when nothing is left to do). Updates at most once a second
    on a terminal, once every 30 s in a log file."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                mininterval=1.0 if tty else 30.0, dynamic_ncols=True, leave=True,
                disable=verbose() or not _speaks() or initial >= total)
