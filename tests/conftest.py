"""Shared pytest fixtures. Keep this file small: define fixtures in modules and import them here."""
from tests.clowderd_proc import clowderd  # noqa: F401  (fixture: start a real clowderd process)
from tests.store_fixtures import store, tiny_llama  # noqa: F401  (fixtures: a content store, a tiny model)
