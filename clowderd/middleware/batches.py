"""The queue of a background writer (the audit log, the query store): items are taken in batches,
whatever has queued up since the writer last looked, so that one write (an fsync, a transaction)
serves many records.

Once the first item of a batch has come, the writer lingers LINGER_S for others: it then wakes once for
many calls, not once for each, and takes the interpreter's lock from the calls in flight that much
less often (as Kafka's `linger.ms` does, for the same reason)."""
from __future__ import annotations

import queue
import time

CLOSE = object()  # queued last: the writer writes what came before it, then stops
LINGER_S = 0.02


def take_batch(q: queue.Queue, timeout: float | None = None) -> tuple[list, bool]:
    """The items queued now, waiting up to `timeout` seconds for the first (None: for as long as it
    takes), less CLOSE; and whether CLOSE was among them."""
    try:
        batch = [q.get(timeout=timeout)]
    except queue.Empty:
        return [], False
    if batch[0] is not CLOSE:
        time.sleep(LINGER_S)
    while True:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            break
    closing = CLOSE in batch
    return [item for item in batch if item is not CLOSE], closing
