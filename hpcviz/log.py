"""One logger: rich on a terminal, plain timestamped lines in scheduler logs; only rank 0 talks."""
from __future__ import annotations

import logging
import sys
import time

LOGGER = "hpcviz"


def _rank() -> tuple[int, bool]:
    """(rank, is rank 0): hpcviz.dist's view once a job has imported it, else this process alone. Commands
    never import it just to log: it imports torch, seconds before a bad option could be refused."""
    dist = sys.modules.get("hpcviz.dist")
    return (dist.rank(), dist.is_main()) if dist is not None else (0, True)


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Configure the 'hpcviz' logger for this process (idempotent). Ranks other than 0 only warn."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):  # ours from an earlier call; handlers others added (tests, apps) stay
        if getattr(h, "_hpcviz", False):
            logger.removeHandler(h)
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {_rank()[0]}] %(levelname)s %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    handler._hpcviz = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
    if _rank()[1]:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    return logger


class StepProgress:
    """Progress over the steps of an epoch: a rich bar on a terminal, a line every `every` steps otherwise."""

    def __init__(self, total: int, title: str, every: int = 50) -> None:
        self.total, self.title, self.every = total, title, max(1, every)
        self.start = time.perf_counter()
        self.bar = None
        if _rank()[1] and sys.stderr.isatty():
            from rich.progress import Progress
            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=total)

    def update(self, step: int, text: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"{self.title} {text}")
        elif _rank()[1] and (step % self.every == 0 or step == self.total):
            rate = step / max(time.perf_counter() - self.start, 1e-9)
            logging.getLogger(LOGGER).info("%s step %d/%d %s (%.1f steps/s)", self.title, step, self.total, text, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
