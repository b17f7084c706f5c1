"""clowderd settings: defaults, the TOML config file, and command-line overrides.

Precedence: built-in defaults < config file < command-line flags. Every error names where the bad
value came from (``FILE: key`` or ``--flag``) so the operator knows what to edit; the program exits
with status 2 on any of them before it starts anything.

The file (TOML, read with tomllib)::

    data_dir = "/var/lib/clowder"
    node_name = "gpu-01"
    roles = ["controller", "storage", "worker", "lb"]
    shutdown_grace_seconds = 10

    [labels]             # node labels reported to the controller (node_selector placement)
    zone = "rack-3"

    [log]
    level = "info"       # debug, info, warning, error
    format = "json"      # json, text

    [cluster]            # how a node without the controller role joins; one identity for all its roles
    controller = "10.0.0.2:7070"                # the controller's public listener
    join_token_file = "/etc/clowder/join-token"   # or join_token = "..." (default beside a controller: its file)
    insecure = false     # true: plain gRPC between roles, no certificates, no authorization (warned at start)

    [controller]
    listen = "127.0.0.1:7070"        # public: clowderctl (admin token) and joining nodes (join token); TLS
    cluster_listen = "127.0.0.1:7074"  # the nodes of the cluster (Membership), mutual TLS
    certificate_lifetime_seconds = 2592000   # node certificates (renewed at 2/3 of their life)
    heartbeat_interval_seconds = 5   # how often workers heartbeat (told to them when they join)
    heartbeat_grace_seconds = 15     # a node silent for this long is marked unreachable
    storage = "10.0.0.5:7071"        # storage node whose images are deployed (default: this process's)
    strategy = "binpack"             # or "spread": how replicas are placed, unless a deployment says
    [controller.deploy]              # deployments created at start when missing: name = "image"
    chat = "smollm2:135m-instruct"
    [storage]
    listen = "127.0.0.1:7071"
    http_listen = "127.0.0.1:5000"   # OCI Distribution API; "" turns it off
    tls_cert = "/etc/clowder/registry.crt"   # both or neither: HTTPS instead of HTTP
    tls_key = "/etc/clowder/registry.key"
    tokens_file = "/etc/clowder/registry-tokens.toml"   # without it the API is open to all
    anonymous_read = false           # with tokens_file: may clients without a token read?
    http_header_timeout_seconds = 20 # the request head must arrive within this (408 otherwise)
    http_body_timeout_seconds = 60   # a request body may pause this long between bytes
    http_max_header_bytes = 32768    # request line and headers together (431 above)
    [worker]
    listen = "127.0.0.1:7072"
    pull_from = "local-storage"      # or "any": also pull from remote OCI registries
    [lb]
    listen = "127.0.0.1:7073"
    http_listen = "127.0.0.1:7080"   # OpenAI-compatible HTTP API; "" turns it off
    tls_cert = "/etc/clowder/lb.crt"   # both or neither: HTTPS instead of HTTP
    tls_key = "/etc/clowder/lb.key"
    max_body_bytes = 4194304         # larger requests are answered 413
    keys_file = "/etc/clowder/lb-keys.toml"   # API keys (clowderctl apikey create); without it: no auth
    requests_per_minute = 600        # per caller, unless the keys file gives the user a limit
    middleware = ["acme-guard"]      # installed middleware (entry points), before the built-ins
    audit_log = "/var/lib/clowder/lb/audit.log"   # hash-chained; "" turns it off (default: in data_dir)
    secrets_file = "/etc/clowder/lb-secrets.toml" # [secrets] name = "..." for signing webhooks
    http_header_timeout_seconds = 20 # as in [storage], for the OpenAI-compatible HTTP API
    http_body_timeout_seconds = 60
    http_max_header_bytes = 32768
    [store]              # the content store of the storage and worker roles
    scrub_interval_seconds = 86400   # the scrub re-reads the whole store once per interval; 0 turns it off
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clowderd.errors import InvalidInput

# Canonical order; servers start and log in this order.
ROLES = ("controller", "storage", "worker", "lb")

# Default ports, one per role and the controller's cluster listener, consecutive so that a firewall
# rule is one range: 7070-7074.
DEFAULT_PORTS = {"controller": 7070, "storage": 7071, "worker": 7072, "lb": 7073}
DEFAULT_CLUSTER_PORT = 7074

# Listening on loopback by default is deliberate: a one-node install needs nothing else, and a node
# of a cluster says where it listens in /etc/clowder/clowderd.toml (`listen = "0.0.0.0:707x"`), a
# one-line, explicit decision (the example config shows it). The listeners between roles take only
# callers with a certificate of the cluster CA; the public ones take tokens.
DEFAULT_HOST = "127.0.0.1"

DEFAULT_DATA_DIR = "/var/lib/clowder"
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 5.0
DEFAULT_HEARTBEAT_GRACE_SECONDS = 15.0
DEFAULT_SCRUB_INTERVAL_SECONDS = 86400.0  # the whole store re-read once a day (clowderd.store.scrub)
# Written by the controller role, relative to its data dir, mode 0600: the token that admits
# new nodes, and the token of the admin API.
JOIN_TOKEN_FILE = "controller/join-token"
ADMIN_TOKEN_FILE = "controller/admin-token"
DEFAULT_CERTIFICATE_LIFETIME_SECONDS = 30 * 86400
# Keys that moved to [cluster]: every role of a node joins as one node, with one certificate.
MOVED_TO_CLUSTER = ("worker.controller", "worker.join_token", "worker.join_token_file", "lb.controller",
                    "lb.join_token", "lb.join_token_file")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
PULL_FROM = ("local-storage", "any")
STRATEGIES = ("binpack", "spread")
DEPLOYMENT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?$")


class ConfigError(InvalidInput):
    """A setting is missing, unknown or invalid. The message names the file and key or the flag."""


@dataclass(frozen=True)
class Address:
    """A "host:port" pair. IPv6 hosts are kept without brackets and printed with them."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class RoleConfig:
    listen: Address


@dataclass(frozen=True)
class HttpLimits:
    """What an HTTP server of clowderd (clowderd.httpserver) allows a client, as nginx's
    client_header_timeout, client_body_timeout and large_client_header_buffers do: a client that
    holds a connection without sending its request, or sends huge headers, costs the server memory
    and a connection slot."""
    header_timeout_seconds: float = 20.0   # from the connection (or the request's first byte) to its head's end
    body_timeout_seconds: float = 60.0     # the longest pause between two reads of a request body
    max_header_bytes: int = 32 * 1024      # the request line and headers together


# The storage role's OCI Distribution HTTP API (clowderd.storage.http).
DEFAULT_HTTP_PORT = 5000


@dataclass
class RegistryHTTPConfig:
    listen: Address | None  # None: the HTTP API is off
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens_file: str | None = None  # None: no authentication (every client may read and push)
    anonymous_read: bool = False  # with tokens_file: whether clients without a token may read
    limits: HttpLimits = field(default_factory=HttpLimits)


# The lb role's OpenAI-compatible HTTP API (clowderd.lb.openai_http).
DEFAULT_LB_HTTP_PORT = 7080
DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass
class LbHTTPConfig:
    listen: Address | None  # None: the HTTP API is off
    tls_cert: str | None = None
    tls_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keys_file: str | None = None  # None: callers are not authenticated
    requests_per_minute: int | None = None
    middleware: list[str] = field(default_factory=list)
    audit_log: str | None = ""    # "": <data_dir>/lb/audit.log; None: off
    secrets_file: str | None = None
    limits: HttpLimits = field(default_factory=HttpLimits)


@dataclass
class Config:
    data_dir: str = DEFAULT_DATA_DIR
    node_name: str = ""
    roles: tuple[str, ...] = ROLES
    shutdown_grace_seconds: float = DEFAULT_GRACE_SECONDS
    labels: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    log_format: str = "json"
    role: dict[str, RoleConfig] = field(default_factory=dict)
    # Where the worker pulls aimages from: "local-storage" (only the storage node it is told to
    # use, clowder://) or "any" (also remote OCI registries).
    worker_pull_from: str = "local-storage"
    # The controller's public listener, where this node joins; None: the controller role of this process.
    cluster_controller: Address | None = None
    # How the node proves it may join: the token itself, or a file holding it (read when it joins, so
    # that a rotated token is picked up). One of them, or neither with the controller role in this
    # process (then its JOIN_TOKEN_FILE).
    join_token: str | None = None
    join_token_file: str | None = None
    # Plain gRPC between roles: no certificates and no authorization between roles.
    insecure: bool = False
    # The controller's listener for the nodes of the cluster (mutual TLS).
    controller_cluster_listen: Address = field(default_factory=lambda: Address(DEFAULT_HOST, DEFAULT_CLUSTER_PORT))
    certificate_lifetime_seconds: float = DEFAULT_CERTIFICATE_LIFETIME_SECONDS
    # The storage node whose Registry service the controller resolves images at, and workers pull
    # from; None: the storage role of this process.
    controller_storage: Address | None = None
    controller_strategy: str = "binpack"
    # Deployment name -> image reference, created at the controller's start when missing.
    controller_deploy: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_seconds: float = DEFAULT_HEARTBEAT_INTERVAL_SECONDS
    heartbeat_grace_seconds: float = DEFAULT_HEARTBEAT_GRACE_SECONDS
    # The scrub of the store reads all of it once per this many seconds; 0: no scrub.
    store_scrub_interval_seconds: float = DEFAULT_SCRUB_INTERVAL_SECONDS
    registry_http: RegistryHTTPConfig = field(
        default_factory=lambda: RegistryHTTPConfig(Address(DEFAULT_HOST, DEFAULT_HTTP_PORT)))
    lb_http: LbHTTPConfig = field(default_factory=lambda: LbHTTPConfig(Address(DEFAULT_HOST, DEFAULT_LB_HTTP_PORT)))
    config_path: str | None = None
    # Dotted key -> where its value came from, for error messages: "FILE: key" or "--flag".
    sources: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """How to name the setting `key` in a message: the flag or "FILE: key"."""
        return self.sources.get(key) or f"{key} (default)"

    @property
    def standalone(self) -> bool:
        """A node of no cluster: a storage node (an OCI registry and a plain gRPC chunk API) or a worker driven
        by hand (Worker.LoadReplica), for development and tests. It joins nothing, which only insecure = true
        allows: without a cluster CA there is no certificate to ask callers for."""
        return self.insecure and set(self.roles) <= {"storage", "worker"} and self.cluster_controller is None


def parse_address(value: Any, where: str, *, allow_port_zero: bool) -> Address:
    """Parse "host:port" or "[v6]:port"; host is an IP literal or a DNS name."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string \"HOST:PORT\", got {_tname(value)}")
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d{1,5})", text) or \
        re.fullmatch(r"([^:\[\]\s]+):(\d{1,5})", text)
    if not m:
        raise ConfigError(f"{where}: {value!r} is not HOST:PORT (IPv6 as [ADDR]:PORT)")
    host, port = m.group(1), int(m.group(2))
    lo = 0 if allow_port_zero else 1
    if not lo <= port <= 65535:
        raise ConfigError(f"{where}: port {port} in {value!r} is out of range {lo}-65535")
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} in {value!r} is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME_RE.match(host):
                raise ConfigError(f"{where}: {host!r} in {value!r} is neither an IP address "
                                  "nor a host name") from None
    return Address(host, port)


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def parse_roles(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        items = [x.strip() for x in value]
    else:
        raise ConfigError(f"{where}: expected an array of role names, got {_tname(value)}")
    if not items:
        raise ConfigError(f"{where}: no roles given; choose from {', '.join(ROLES)}")
    for r in items:
        if r not in ROLES:
            raise ConfigError(f"{where}: unknown role {r!r}; choose from {', '.join(ROLES)}")
    return tuple(r for r in ROLES if r in items)


HTTP_LIMIT_KEYS = ("http_header_timeout_seconds", "http_body_timeout_seconds", "http_max_header_bytes")

# Schema of the file: key -> kind. A nested dict is a table.
_SCHEMA: dict[str, Any] = {
    "data_dir": "str",
    "node_name": "str",
    "roles": "roles",
    "shutdown_grace_seconds": "seconds",
    "labels": "labels",
    "log": {"level": "level", "format": "format"},
    "cluster": {"controller": "connect", "join_token": "str", "join_token_file": "path", "insecure": "bool"},
    "controller": {"listen": "listen", "cluster_listen": "listen", "heartbeat_interval_seconds": "seconds",
                   "heartbeat_grace_seconds": "seconds", "storage": "connect", "strategy": "strategy",
                   "deploy": "deployments", "certificate_lifetime_seconds": "seconds"},
    "storage": {"listen": "listen", "http_listen": "listen", "tls_cert": "path", "tls_key": "path",
                "tokens_file": "path", "anonymous_read": "bool", **{k: "http_limit" for k in HTTP_LIMIT_KEYS}},
    "worker": {"listen": "listen", "pull_from": "pull_from"},
    "lb": {"listen": "listen", "http_listen": "listen", "tls_cert": "path",
           "tls_key": "path", "max_body_bytes": "int", "keys_file": "path", "requests_per_minute": "int",
           "middleware": "names", "audit_log": "path", "secrets_file": "path",
           **{k: "http_limit" for k in HTTP_LIMIT_KEYS}},
    "store": {"scrub_interval_seconds": "seconds"},
}


def _check_tree(data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, file: str,
                out: dict[str, Any]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED_TO_CLUSTER:
            raise ConfigError(f"{file}: {dotted} moved to [cluster] {key}: every role of a node joins the cluster "
                              "as one node")
        if key not in schema:
            known = ", ".join(sorted(schema))
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            raise ConfigError(f"{file}: unknown key {dotted!r} (known keys in {where}: {known})")
        kind = schema[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{file}: {dotted}: expected a table [{dotted}], "
                                  f"got {_tname(value)}")
            _check_tree(value, kind, dotted + ".", file, out)
        else:
            out[dotted] = value


def load_file(path: str) -> dict[str, Any]:
    """Read and structurally check a config file; returns dotted key -> raw value."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"--config {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    out: dict[str, Any] = {}
    _check_tree(data, _SCHEMA, "", path, out)
    return out


def build_config(file_path: str | None, flags: Mapping[str, Any],
                 flag_names: Mapping[str, str] | None = None) -> Config:
    """Merge defaults, the file (if any) and flags (dotted key -> value, None = not given).

    Flag keys use the file's dotted names: "roles", "data_dir", "controller.listen", ...; a
    flag is named in messages as "--" + the key with "." and "_" as "-", unless flag_names says
    otherwise.
    """
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if file_path is not None:
        for k, v in load_file(file_path).items():
            raw[k] = v
            sources[k] = f"{file_path}: {k}"
    for k, v in flags.items():
        if v is None:
            continue
        raw[k] = v
        sources[k] = (flag_names or {}).get(k) or "--" + k.replace(".", "-").replace("_", "-")

    def w(key: str) -> str:
        return sources.get(key, key)

    cfg = Config(config_path=file_path, sources=sources)
    if "data_dir" in raw:
        v = raw["data_dir"]
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{w('data_dir')}: expected a non-empty path string, got {v!r}")
        cfg.data_dir = os.path.abspath(os.path.expanduser(v))
    if "node_name" in raw:
        v = raw["node_name"]
        if not isinstance(v, str) or not _NODE_NAME_RE.match(v):
            raise ConfigError(f"{w('node_name')}: {v!r} is not a valid node name (letters, digits, "
                              "'.', '-', '_'; starts and ends with a letter or digit)")
        cfg.node_name = v
    else:
        cfg.node_name = socket.gethostname() or "localhost"
    if "roles" in raw:
        cfg.roles = parse_roles(raw["roles"], w("roles"))
    if "shutdown_grace_seconds" in raw:
        v = raw["shutdown_grace_seconds"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
            raise ConfigError(f"{w('shutdown_grace_seconds')}: expected a number of seconds "
                              f"from 0 to 3600, got {v!r}")
        cfg.shutdown_grace_seconds = float(v)
    if "labels" in raw:
        v = raw["labels"]
        if not isinstance(v, dict):
            raise ConfigError(f"{w('labels')}: expected a table of strings, got {_tname(v)}")
        for lk, lv in v.items():
            if not LABEL_KEY_RE.match(lk):
                raise ConfigError(f"{w('labels')}.{lk}: invalid label key {lk!r}")
            if not isinstance(lv, str):
                raise ConfigError(f"{w('labels')}.{lk}: expected a string, got {_tname(lv)}")
        cfg.labels = dict(v)
    if "log.level" in raw:
        v = raw["log.level"]
        if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
            raise ConfigError(f"{w('log.level')}: {v!r} is not one of {', '.join(LOG_LEVELS)}")
        cfg.log_level = v.lower()
    if "log.format" in raw:
        v = raw["log.format"]
        if not isinstance(v, str) or v.lower() not in LOG_FORMATS:
            raise ConfigError(f"{w('log.format')}: {v!r} is not one of {', '.join(LOG_FORMATS)}")
        cfg.log_format = v.lower()

    # Listen addresses of every role are checked even when the role is not enabled, so that a
    # typo is found now rather than on the day the role is turned on.
    for role in ROLES:
        key = f"{role}.listen"
        if key in raw:
            listen = parse_address(raw[key], w(key), allow_port_zero=True)
        else:
            listen = Address(DEFAULT_HOST, DEFAULT_PORTS[role])
            sources.setdefault(key, f"{key} (default {listen})")
        cfg.role[role] = RoleConfig(listen=listen)
    if "controller.cluster_listen" in raw:
        cfg.controller_cluster_listen = parse_address(raw["controller.cluster_listen"], w("controller.cluster_listen"),
                                                      allow_port_zero=True)
    else:
        sources.setdefault("controller.cluster_listen",
                           f"controller.cluster_listen (default {cfg.controller_cluster_listen})")

    cfg.registry_http = _registry_http(raw, w)
    cfg.lb_http = _lb_http(raw, w)
    if "worker.pull_from" in raw:
        v = raw["worker.pull_from"]
        if v not in PULL_FROM:
            raise ConfigError(f"{w('worker.pull_from')}: {v!r} is not one of {', '.join(PULL_FROM)}")
        cfg.worker_pull_from = v
    _membership(cfg, raw, w, file_path)
    _deployments(cfg, raw, w)
    scrub = raw.get("store.scrub_interval_seconds", DEFAULT_SCRUB_INTERVAL_SECONDS)
    if isinstance(scrub, bool) or not isinstance(scrub, (int, float)) or scrub < 0:
        raise ConfigError(f"{w('store.scrub_interval_seconds')}: expected a number of seconds, or 0 for no "
                          f"scrub, got {scrub!r}")
    cfg.store_scrub_interval_seconds = float(scrub)

    seen: dict[Address, str] = {}
    listens = [(role + ".listen", cfg.role[role].listen, role) for role in cfg.roles]
    if "controller" in cfg.roles:
        listens.append(("controller.cluster_listen", cfg.controller_cluster_listen, "the controller's cluster listener"))
    if "storage" in cfg.roles and cfg.registry_http.listen is not None:
        listens.append(("storage.http_listen", cfg.registry_http.listen, "the storage HTTP API"))
    if "lb" in cfg.roles and cfg.lb_http.listen is not None:
        listens.append(("lb.http_listen", cfg.lb_http.listen, "the lb HTTP API"))
    for key, a, what in listens:
        if a.port != 0 and a in seen:
            raise ConfigError(f"{w(key)}: {a} is also the listen address of "
                              f"{seen[a]}; each role needs its own port")
        seen[a] = f"{what} ({cfg.where(key)})"
    return cfg


def _seconds(raw: Mapping[str, Any], w: Any, key: str, default: float, low: float, high: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ConfigError(f"{w(key)}: expected a number of seconds from {low:g} to {high:g}, got {v!r}")
    return float(v)


def _membership(cfg: Config, raw: Mapping[str, Any], w: Any, file_path: str | None) -> None:
    """The heartbeat timing and certificates of [controller], and [cluster]: where and how the node joins."""
    cfg.heartbeat_interval_seconds = _seconds(raw, w, "controller.heartbeat_interval_seconds",
                                              DEFAULT_HEARTBEAT_INTERVAL_SECONDS, 0.1, 300)
    cfg.heartbeat_grace_seconds = _seconds(raw, w, "controller.heartbeat_grace_seconds",
                                           DEFAULT_HEARTBEAT_GRACE_SECONDS, 0.2, 3600)
    if cfg.heartbeat_grace_seconds < 2 * cfg.heartbeat_interval_seconds:
        raise ConfigError(f"{w('controller.heartbeat_grace_seconds')}: {cfg.heartbeat_grace_seconds:g} is less "
                          f"than twice controller.heartbeat_interval_seconds ({cfg.heartbeat_interval_seconds:g}); "
                          "one late heartbeat would mark a node unreachable")
    cfg.certificate_lifetime_seconds = _seconds(raw, w, "controller.certificate_lifetime_seconds",
                                                DEFAULT_CERTIFICATE_LIFETIME_SECONDS, 10, 10 * 365 * 86400)
    insecure = raw.get("cluster.insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{w('cluster.insecure')}: expected true or false, got {insecure!r}")
    cfg.insecure = insecure
    if "cluster.controller" in raw:
        cfg.cluster_controller = parse_address(raw["cluster.controller"], w("cluster.controller"), allow_port_zero=False)
    token = raw.get("cluster.join_token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError(f"{w('cluster.join_token')}: expected the join token as a non-empty string")
    token_file = _paths(raw, w, "cluster", ("join_token_file",))["join_token_file"]
    if token is not None and token_file is not None:
        raise ConfigError(f"{w('cluster.join_token')}: set join_token or join_token_file, not both")
    if "controller" in cfg.roles:
        if token is None and token_file is None:
            token_file = os.path.join(cfg.data_dir, JOIN_TOKEN_FILE)
    elif not cfg.standalone:
        where = f"{file_path}: cluster" if file_path else "cluster"
        if cfg.cluster_controller is None:
            raise ConfigError(f"{where}: controller is required when this node runs without the controller role "
                              "(set [cluster] controller = \"HOST:7070\", the controller's public listener, or "
                              "--controller HOST:PORT; a storage node or worker of no cluster needs insecure = true)")
        if token is None and token_file is None:
            raise ConfigError(f"{where}: join_token or join_token_file is required when this node runs without the "
                              "controller role (`clowderctl token` on the controller prints it; it is also in the "
                              f"controller's DATA_DIR/{JOIN_TOKEN_FILE})")
    cfg.join_token, cfg.join_token_file = token, token_file


def _deployments(cfg: Config, raw: Mapping[str, Any], w: Any) -> None:
    """[controller] storage, strategy and deploy."""
    if "controller.storage" in raw:
        cfg.controller_storage = parse_address(raw["controller.storage"], w("controller.storage"),
                                               allow_port_zero=False)
    strategy = raw.get("controller.strategy", cfg.controller_strategy)
    if strategy not in STRATEGIES:
        raise ConfigError(f"{w('controller.strategy')}: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    cfg.controller_strategy = strategy
    cfg.controller_deploy = parse_deployments(raw.get("controller.deploy", {}), w("controller.deploy"))


def parse_deployments(value: Any, where: str) -> dict[str, str]:
    """A table of deployment name = "image reference"."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of deployment name = \"image\", got {_tname(value)}")
    for name, image in value.items():
        if not DEPLOYMENT_NAME_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a deployment name (lowercase letters, digits and '-', at "
                              "most 63, starting and ending with a letter or digit)")
        if not isinstance(image, str) or not image.strip():
            raise ConfigError(f"{where}: {name}: expected an image reference, got {image!r}")
    return dict(value)


def _http_listen(raw: Mapping[str, Any], w: Any, section: str, default_port: int) -> Address | None:
    key = f"{section}.http_listen"
    if key not in raw:
        return Address(DEFAULT_HOST, default_port)
    v = raw[key]
    return None if v == "" else parse_address(v, w(key), allow_port_zero=True)


def _paths(raw: Mapping[str, Any], w: Any, section: str, names: tuple[str, ...]) -> dict[str, str | None]:
    """Path settings of a section, absolute; tls_cert and tls_key both or neither when named."""
    paths: dict[str, str | None] = {}
    for name in names:
        k = f"{section}.{name}"
        v = raw.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"{w(k)}: expected a non-empty path string, got {v!r}")
        paths[name] = os.path.abspath(os.path.expanduser(v)) if v else None
    if "tls_cert" in paths and (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        given, missing = ("tls_cert", "tls_key") if paths["tls_cert"] else ("tls_key", "tls_cert")
        raise ConfigError(f"{w(f'{section}.{given}')}: set {section}.{missing} too; TLS needs the certificate "
                          "and its key")
    return paths


def _lb_http(raw: Mapping[str, Any], w: Any) -> LbHTTPConfig:
    """The [lb] keys of the OpenAI-compatible HTTP API and its middleware."""
    paths = _paths(raw, w, "lb", ("tls_cert", "tls_key", "keys_file", "secrets_file"))
    max_body = raw.get("lb.max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
        raise ConfigError(f"{w('lb.max_body_bytes')}: expected an integer of at least 1024, got {max_body!r}")
    rpm = raw.get("lb.requests_per_minute")
    if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 1):
        raise ConfigError(f"{w('lb.requests_per_minute')}: expected a positive integer, got {rpm!r}")
    middleware = raw.get("lb.middleware", [])
    if not isinstance(middleware, list) or not all(isinstance(m, str) and m for m in middleware):
        raise ConfigError(f"{w('lb.middleware')}: expected a list of installed middleware names, got {middleware!r}")
    audit_log = raw.get("lb.audit_log", "")
    if not isinstance(audit_log, str):
        raise ConfigError(f"{w('lb.audit_log')}: expected a path, or \"\" for none, got {audit_log!r}")
    if "lb.audit_log" in raw:
        audit_log = os.path.abspath(os.path.expanduser(audit_log)) if audit_log else None
    return LbHTTPConfig(_http_listen(raw, w, "lb", DEFAULT_LB_HTTP_PORT), paths["tls_cert"], paths["tls_key"],
                        max_body, paths["keys_file"], rpm, list(middleware), audit_log, paths["secrets_file"],
                        _http_limits(raw, w, "lb"))


def _http_limits(raw: Mapping[str, Any], w: Any, section: str) -> HttpLimits:
    """[section] http_header_timeout_seconds, http_body_timeout_seconds and http_max_header_bytes."""
    default = HttpLimits()
    key = f"{section}.http_max_header_bytes"
    max_header = raw.get(key, default.max_header_bytes)
    if isinstance(max_header, bool) or not isinstance(max_header, int) or not 1024 <= max_header <= 1 << 20:
        raise ConfigError(f"{w(key)}: expected a number of bytes from 1024 to 1048576, got {max_header!r}")
    return HttpLimits(
        _seconds(raw, w, f"{section}.http_header_timeout_seconds", default.header_timeout_seconds, 0.1, 3600),
        _seconds(raw, w, f"{section}.http_body_timeout_seconds", default.body_timeout_seconds, 0.1, 3600),
        max_header)


def _registry_http(raw: Mapping[str, Any], w: Any) -> RegistryHTTPConfig:
    """The [storage] keys of the OCI Distribution HTTP API."""
    listen = _http_listen(raw, w, "storage", DEFAULT_HTTP_PORT)
    paths = _paths(raw, w, "storage", ("tls_cert", "tls_key", "tokens_file"))
    anonymous_read = False
    if "storage.anonymous_read" in raw:
        v = raw["storage.anonymous_read"]
        if not isinstance(v, bool):
            raise ConfigError(f"{w('storage.anonymous_read')}: expected true or false, got {v!r}")
        if not v and paths["tokens_file"] is None:
            raise ConfigError(f"{w('storage.anonymous_read')}: false needs storage.tokens_file, else no "
                              "client could read; without tokens_file the API is open to all")
        anonymous_read = v
    return RegistryHTTPConfig(listen, paths["tls_cert"], paths["tls_key"], paths["tokens_file"], anonymous_read,
                              _http_limits(raw, w, "storage"))


def as_dict(cfg: Config) -> dict[str, Any]:
    """The effective settings, for a log line at startup."""
    d: dict[str, Any] = {
        "config": cfg.config_path, "data_dir": cfg.data_dir, "node_name": cfg.node_name,
        "roles": list(cfg.roles), "shutdown_grace_seconds": cfg.shutdown_grace_seconds,
        "labels": dict(cfg.labels), "log": {"level": cfg.log_level, "format": cfg.log_format},
    }
    d["cluster"] = {"controller": str(cfg.cluster_controller or "this process"), "insecure": cfg.insecure,
                    "join_token_file": cfg.join_token_file}  # the token itself stays out of logs
    for r in cfg.roles:
        d[r] = {"listen": str(cfg.role[r].listen)}
    if "controller" in cfg.roles:
        d["controller"].update({"cluster_listen": str(cfg.controller_cluster_listen),
                                "certificate_lifetime_seconds": cfg.certificate_lifetime_seconds,
                                "heartbeat_interval_seconds": cfg.heartbeat_interval_seconds,
                                "heartbeat_grace_seconds": cfg.heartbeat_grace_seconds,
                                "storage": str(cfg.controller_storage or "this process"),
                                "strategy": cfg.controller_strategy, "deploy": dict(cfg.controller_deploy)})
    if "lb" in cfg.roles:
        d["lb"].update({"http_listen": str(cfg.lb_http.listen) if cfg.lb_http.listen else "",
                        "tls": cfg.lb_http.tls_cert is not None, "max_body_bytes": cfg.lb_http.max_body_bytes})
    if "storage" in cfg.roles:
        h = cfg.registry_http
        d["storage"].update({"http_listen": str(h.listen) if h.listen else "", "tls": h.tls_cert is not None,
                             "tokens_file": h.tokens_file, "anonymous_read": h.anonymous_read})
    return d


def iter_enabled(cfg: Config) -> Iterable[tuple[str, RoleConfig]]:
    for r in cfg.roles:
        yield r, cfg.role[r]
