"""Records a background writer could not keep (its queue full, its disk failing): counted, and logged at
most every few seconds, so that a flood of drops does not become a flood of log lines."""
from __future__ import annotations

import logging
import time

LOG_INTERVAL_S = 10.0


class Dropped:
    def __init__(self, log: logging.Logger, message: str, **fields):
        self.log = log
        self.message = message
        self.fields = fields
        self.count = 0
        self._logged = 0.0

    def add(self, n: int = 1, **fields) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL_S:
            self._logged = now
            self.log.error(self.message, extra={**self.fields, **fields, "dropped": self.count})
