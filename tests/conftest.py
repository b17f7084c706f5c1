"""Shared pytest fixtures. Keep this file small: define fixtures in modules and import them here."""
from tests.clowderd_proc import clowderd  # noqa: F401  (fixture: start a real clowderd process)
from tests.store_fixtures import small_fs, store, tiny_llama  # noqa: F401  (fixtures: a content store, a tmpfs, a tiny model)
from tests.engine_fixtures import tiny_chat_llama, tiny_host  # noqa: F401  (fixtures: a tiny chat llama, an engine host on it)
from tests.oci_client import oci, oci_node  # noqa: F401  (fixtures: a storage node's OCI API, an httpx client for it)
from tests.registry_proc import docker_registry  # noqa: F401  (fixture: Debian's CNCF registry on a free port)
