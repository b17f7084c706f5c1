"""A worker's [worker] pull_from setting decides which sources it may pull from."""
import pytest

from clowderd.config import build_config
from clowderd.distribution.policy import check_source
from clowderd.distribution.refs import parse_remote
from clowderd.errors import InvalidInput


def test_a_worker_pulls_only_from_storage_nodes_by_default(tmp_path):
    cfg = build_config(None, {})
    check_source(cfg.worker_pull_from, parse_remote("clowder://10.0.0.5:7071/tiny:v1"))
    with pytest.raises(InvalidInput, match="only from Clowder storage nodes"):
        check_source(cfg.worker_pull_from, parse_remote("ghcr.io/acme/tiny:v1"))


def test_pull_from_any_allows_oci_registries(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[worker]\npull_from = "any"\n')
    check_source(build_config(str(path), {}).worker_pull_from, parse_remote("ghcr.io/acme/tiny:v1"))


def test_an_unknown_pull_from_value_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[worker]\npull_from = "internet"\n')
    with pytest.raises(InvalidInput, match="worker.pull_from: 'internet' is not one of"):
        build_config(str(path), {})
