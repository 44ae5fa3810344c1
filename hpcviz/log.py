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


class TaskProgress:
    """Progress of an array task over its work units (image passes): a rich bar on a terminal; in a log file
    a line at the first update and at each new stage, else at most every `every_s` seconds, with what it is
    doing and an ETA from the rate so far."""

    def __init__(self, total: float, title: str, every_s: float = 20.0) -> None:
        self.total, self.title, self.every_s = max(total, 1e-9), title, every_s
        self.start = time.perf_counter()
        self.last = self.start - every_s  # the first update is logged at once
        self.done, self.bar, self.stage = 0.0, None, ""
        if sys.stderr.isatty():
            from rich.progress import Progress
            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=self.total)

    def update(self, done: float, text: str, stage: str = "") -> None:
        """`done` units of `total` finished; `text` says what runs now (images, step k of m); a new `stage` is
        logged at once."""
        self.done = min(done, self.total)
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=f"{self.title}: {text}")
        elif now - self.last >= self.every_s or stage != self.stage:
            self.last, self.stage = now, stage
            elapsed = now - self.start
            eta = elapsed * (self.total - self.done) / self.done if self.done > 0 else float("nan")
            logging.getLogger(LOGGER).info("%s: %s; %.0f%% done, %s elapsed, ETA %s", self.title, text,
                                           100 * self.done / self.total, _clock(elapsed), _clock(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: not known yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{s}s")
