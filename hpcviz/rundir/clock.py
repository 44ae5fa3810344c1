"""The one timestamp format of a run's records (manifest, plan, lock, shards)."""
from __future__ import annotations

import time

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


def now() -> str:
    """The local time as every record in a run writes it."""
    return time.strftime(TIME_FORMAT)
