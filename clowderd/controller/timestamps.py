"""Times as the API carries them."""
from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out
