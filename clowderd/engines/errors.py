"""Errors of the engines, in one place. Each has a `kind` so it crosses the host's socket and comes back
as the same class on the worker's side."""
from __future__ import annotations

from clowderd.errors import ClowderError


class EngineError(ClowderError):
    """An engine could not do what was asked."""
    kind = "engine_error"


class InvalidRequest(EngineError):
    """A generation request or one of its values is not acceptable (the caller can fix it)."""
    kind = "invalid_request"


class ModelLoadError(EngineError):
    """The model directory cannot be loaded: files missing, corrupt, or not a model this engine runs."""
    kind = "model_load_error"


class AdapterError(EngineError):
    """An EP layer (LoRA adapter) cannot be added or removed: unreadable, for another base, in use."""
    kind = "adapter_error"


class EngineUnavailable(EngineError):
    """The engine name is unknown, or its packages are not installed on this node."""
    kind = "engine_unavailable"


class EngineCrashed(EngineError):
    """The engine host process exited while it was expected to serve."""
    kind = "engine_crashed"

    def __init__(self, message: str, *, exit_status: int | None = None, stderr_tail: str = ""):
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


ERRORS_BY_KIND: dict[str, type[EngineError]] = {
    cls.kind: cls for cls in (EngineError, InvalidRequest, ModelLoadError, AdapterError, EngineUnavailable,
                              EngineCrashed)
}


def error_from_kind(kind: str, message: str) -> EngineError:
    return ERRORS_BY_KIND.get(kind, EngineError)(message)
