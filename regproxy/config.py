"""The config: frozen dataclasses, loaded from one YAML file plus ``REGPROXY_*`` overrides.

Every key is optional. ``load_config`` validates everything and raises :class:`ConfigError`
naming the key, the value and what is allowed; nothing else in regproxy reads the environment
for settings.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from regproxy import config_values as values
from regproxy.config_values import SizeLimit as SizeLimit
from regproxy.config_values import parse_duration as parse_duration
from regproxy.config_values import parse_size as parse_size
from regproxy.errors import ConfigError, ConfigMissing

DEFAULT_PORT: Final = 30003


# --- dataclasses -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    #: the table key: a registry host (``docker.io``, ``host:5000``), a pattern (``*.pkg.dev``), or ``*``
    pattern: str
    url: str = ""
    mirrors: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    auth_file: str | None = None
    tls_verify: bool = True
    ca_file: str | None = None
    alias: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: more targets this upstream's requests may reach although their address is not public
    #: (``host:port``, ``host`` or ``*.domain``, with or without ``:port``): the private object
    #: storage an on-site registry redirects blob GETs to, a token server on another port
    allow_redirect_to: tuple[str, ...] = ()
    #: a transfer (blob, manifest, tags page, token) averaging less than this (bytes/s) over
    #: ``min_rate_window`` is dropped: a stall detector, not a speed test. 0 turns it off.
    min_rate: float = 1024.0
    min_rate_window: float = 60.0
    #: no single transfer from this upstream (its mirrors too) takes longer than this
    max_transfer_time: float = 6 * 3600.0
    #: requests in flight at once to this upstream; more wait in a fair queue
    max_connections: int = 16
    #: requests started per second at most (0: no limit); more wait in the same queue
    max_requests_per_second: float = 0.0
    #: below this many pulls left (Docker Hub's ratelimit-remaining), tags are served stale
    #: instead of re-fetched with GET (0: never)
    ratelimit_reserve: int = 10

    def url_for(self, host: str) -> str:
        """The base URL for a concrete host this entry matched."""
        if self.url:
            return self.url.rstrip("/")
        return f"https://{host}"

    def matches(self, host: str) -> bool:
        if self.pattern == "*":
            return True
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(host, self.pattern)
        return host == self.pattern


@dataclass(frozen=True, slots=True)
class StorageConfig:
    root: Path
    max_size: SizeLimit = SizeLimit()
    min_free: SizeLimit = SizeLimit(fraction=0.05)
    #: where eviction stops once above max_size: bytes, or a fraction of max_size
    evict_to: SizeLimit = SizeLimit(fraction=0.9)
    upload_ttl: float = 86400.0
    evict_interval: float = 60.0
    #: how often the daemon removes blob files no index row names (a crash's); 0: never
    orphan_sweep_interval: float = 86400.0
    #: a blob written (pulled, pushed, imported) larger than this leaves the page cache behind
    #: its writer: bytes, or a fraction of the host's memory; 0: every blob stays cached
    drop_behind_above: SizeLimit = SizeLimit(bytes=512 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class PeersConfig:
    urls: tuple[str, ...] = ()
    dns: str | None = None
    port: int = DEFAULT_PORT
    scheme: str = "http"
    refresh: float = 30.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 2.0
    #: a home host per digest and tag (rendezvous hashing): the cluster fetches once
    home_hosts: bool = True


@dataclass(frozen=True, slots=True)
class AuthConfig:
    htpasswd: str | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    anonymous_pull: bool = True
    realm: str = "regproxy"
    #: refused logins per client address per minute before 429 (0: no budget)
    login_failures_per_minute: int = 10


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str | None = None
    key: str | None = None
    #: threads that do the handshakes and the encryption (regproxy.tls_relay); None: one per
    #: CPU (at most 8); 0: the event loop does TLS itself
    workers: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    images: tuple[str, ...] = ()
    interval: float = 3600.0
    platforms: tuple[str, ...] = ()
    required_for_ready: bool = False
    #: take each image's referrers along (signatures, SBOMs, attestations, and theirs)
    referrers: bool = True


ENFORCEMENT_POINTS: Final = ("pull-through", "import", "push")
REQUIREMENTS: Final = ("none", "sigstore")


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """``match`` a glob over ``<upstream>/<path>`` (or a project path); ``require`` none|sigstore."""

    match: str
    require: str = "none"
    #: trusted public keys (regproxy.cosign.PublicKey), loaded and checked at start-up
    keys: tuple[Any, ...] = ()

    def __str__(self) -> str:
        keys = ", ".join(str(k) for k in self.keys)
        return f"{self.match} -> {self.require}" + (f" [{keys}]" if keys else "")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The signature policy: first matching rule wins; no match allows."""

    rules: tuple[PolicyRule, ...] = ()
    enforce: tuple[str, ...] = ("pull-through",)

    @property
    def active(self) -> bool:
        return any(r.require != "none" for r in self.rules)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Limits on what one client connection may hold (README "Connections and slow clients")."""

    #: a new connection must have sent its first request's headers within this
    header_timeout: float = 10.0
    #: an idle connection between requests is closed after this
    keepalive_timeout: float = 75.0
    #: a response that makes no progress for this long is dropped
    write_timeout: float = 60.0
    #: a request body that makes no progress for this long fails with 408
    read_timeout: float = 60.0
    #: a request body must arrive at this many bytes/s averaged over ``body_min_rate_window``
    #: (a stall detector: a drip of a byte now and then is cut with 408); 0 turns it off
    body_min_rate: float = 1024.0
    body_min_rate_window: float = 60.0
    #: above this many open connections new ones get 503; 0 = sized from RLIMIT_NOFILE
    max_connections: int = 0
    #: cached manifest GETs answered in front of aiohttp's parser (regproxy.fastpath)
    fast_path: bool = True


@dataclass(frozen=True, slots=True)
class UploadsConfig:
    #: open upload sessions at once; a POST beyond this gets 429 TOOMANYREQUESTS
    max_sessions: int = 1000


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"
    access: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    storage: StorageConfig
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    sync_enable: bool = True
    project: str = "spectro-images"
    upstreams: tuple[UpstreamConfig, ...] = ()
    default_upstream: str | None = None
    tag_ttl: float = 300.0
    peers: PeersConfig = PeersConfig()
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig = TLSConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    log: LogConfig = LogConfig()
    shutdown_timeout: float = 30.0
    policy: PolicyConfig = PolicyConfig()
    http: HttpConfig = HttpConfig()
    uploads: UploadsConfig = UploadsConfig()

    def upstream_for(self, host: str) -> UpstreamConfig | None:
        """The entry for a host: exact names first, then patterns, then ``*``."""
        exact = [u for u in self.upstreams if u.pattern == host or u.alias == host]
        if exact:
            return exact[0]
        patterns = [u for u in self.upstreams if u.pattern != "*" and u.matches(host)]
        if patterns:
            return patterns[0]
        star = [u for u in self.upstreams if u.pattern == "*"]
        return star[0] if star else None


def default_storage_root() -> Path:
    """Somewhere the current user may write: systemd's StateDirectory, /var/lib, or XDG."""
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        return Path(state_dir.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/regproxy")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "regproxy"


# --- the schema: key path -> parser ------------------------------------------------------------
Parser = Callable[[Any], Any]
_SCHEMA: Final[dict[str, Any]] = {
    "listen": values.listen,
    "content": {"sync": {"enable": values.boolean}, "projects": {"images": values.string}},
    "storage": {
        "root": values.string,
        "max_size": values.size_limit,
        "min_free": values.size_limit,
        "evict_to": values.size_limit,
        "upload_ttl": parse_duration,
        "evict_interval": parse_duration,
        "orphan_sweep_interval": parse_duration,
        "drop_behind_above": values.size_limit,
    },
    "upstreams": "UPSTREAMS",
    "default_upstream": values.optional_string,
    "tag_ttl": parse_duration,
    "peers": {
        "urls": values.str_list,
        "dns": values.optional_string,
        "port": int,
        "scheme": values.string,
        "refresh": parse_duration,
        "username": values.optional_string,
        "password": values.optional_string,
        "timeout": parse_duration,
        "home_hosts": values.boolean,
    },
    "auth": {
        "htpasswd": values.optional_string,
        "users": values.users,
        "anonymous_pull": values.boolean,
        "realm": values.string,
        "login_failures_per_minute": values.count,
    },
    "tls": {
        "cert": values.optional_string,
        "key": values.optional_string,
        "workers": values.count_up_to(64),
    },
    "prefetch": {
        "images": values.images,
        "interval": parse_duration,
        "platforms": values.str_list,
        "required_for_ready": values.boolean,
        "referrers": values.boolean,
    },
    "log": {"level": values.log_level, "format": values.log_format, "access": values.boolean},
    "shutdown_timeout": parse_duration,
    "policy": "POLICY",
    "http": {
        "header_timeout": values.timeout,
        "keepalive_timeout": values.timeout,
        "write_timeout": values.timeout,
        "read_timeout": values.timeout,
        "body_min_rate": values.rate,
        "body_min_rate_window": values.timeout,
        "max_connections": values.count,
        "fast_path": values.boolean,
    },
    "uploads": {"max_sessions": values.positive_count},
}
_UPSTREAM_SCHEMA: Final[dict[str, Parser]] = {
    "url": values.string,
    "mirrors": values.str_list,
    "username": values.optional_string,
    "password": values.optional_string,
    "auth_file": values.optional_string,
    "tls_verify": values.boolean,
    "ca_file": values.optional_string,
    "alias": values.optional_string,
    "connect_timeout": parse_duration,
    "read_timeout": parse_duration,
    "allow_redirect_to": values.targets,
    "min_rate": values.rate,
    "min_rate_window": parse_duration,
    "max_transfer_time": parse_duration,
    "max_connections": values.positive,
    "max_requests_per_second": values.per_second,
    "ratelimit_reserve": values.count,
}
_HOST_PATTERN_RE: Final = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?)$")


def _walk(raw: Any, schema: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "(top)", "must be a mapping")
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(path, f"unknown key (allowed here: {allowed})")
        spec = schema[key]
        if spec == "UPSTREAMS":
            out[path] = _upstreams(value)
        elif spec == "POLICY":
            out[path] = _policy(value)
        elif isinstance(spec, dict):
            _walk(value, spec, f"{path}.", out)
        else:
            out[path] = _parse(path, spec, value)


def _parse(path: str, parser: Parser, value: Any) -> Any:
    try:
        return parser(value)
    except (ValueError, TypeError, OverflowError) as exc:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise ConfigError(path, f"{shown} {exc}") from None


def _upstreams(raw: Any) -> tuple[UpstreamConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("upstreams", "must map registry hosts to settings")
    out = []
    for host, settings in raw.items():
        key = f"upstreams.{host}"
        if not isinstance(host, str) or not _HOST_PATTERN_RE.match(host):
            raise ConfigError(key, "must be a registry host, host:port, *.domain or *")
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(key, "must be a mapping of url, mirrors, credentials, ...")
        kwargs: dict[str, Any] = {}
        for k, v in settings.items():
            if k not in _UPSTREAM_SCHEMA:
                allowed = ", ".join(sorted(_UPSTREAM_SCHEMA))
                raise ConfigError(f"{key}.{k}", f"unknown key (allowed here: {allowed})")
            kwargs[k] = _parse(f"{key}.{k}", _UPSTREAM_SCHEMA[k], v)
        for k in ("url", *()):
            if k in kwargs and not str(kwargs[k]).startswith(("http://", "https://")):
                raise ConfigError(
                    f"{key}.{k}", f"{kwargs[k]!r} must start with http:// or https://"
                )
        for m in kwargs.get("mirrors", ()):
            if not m.startswith(("http://", "https://")):
                raise ConfigError(f"{key}.mirrors", f"{m!r} must start with http:// or https://")
        if host == "*" and kwargs.get("url"):
            raise ConfigError(key, "the '*' entry cannot have a url: it reaches the named host")
        if (username := kwargs.get("username")) and not kwargs.get("password"):
            raise ConfigError(f"{key}.password", f"username {username!r} given without password")
        out.append(UpstreamConfig(pattern=host, **kwargs))
    return tuple(out)


def _policy(raw: Any) -> PolicyConfig:
    """``policy: {rules: [{match, require, keys}], enforce: [...]}``; key files are read here,
    so an unusable one stops start-up with one line naming it."""
    if raw is None:
        return PolicyConfig()
    if not isinstance(raw, dict):
        raise ConfigError("policy", "must be a mapping with rules and enforce")
    for key in raw:
        if key not in ("rules", "enforce"):
            raise ConfigError(f"policy.{key}", "unknown key (allowed here: enforce, rules)")
    enforce = _parse("policy.enforce", values.str_list, raw.get("enforce", ["pull-through"]))
    for point in enforce:
        if point not in ENFORCEMENT_POINTS:
            raise ConfigError(
                "policy.enforce", f"{point!r} is not one of {', '.join(ENFORCEMENT_POINTS)}"
            )
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError("policy.rules", "must be a list of {match, require, keys}")
    from regproxy.cosign import KeyFileError, load_public_key  # pure; only the policy needs it

    rules = []
    for i, item in enumerate(rules_raw):
        where = f"policy.rules[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, "must be a mapping of match, require, keys")
        for key in item:
            if key not in ("match", "require", "keys"):
                raise ConfigError(
                    f"{where}.{key}", "unknown key (allowed here: keys, match, require)"
                )
        match = _parse(f"{where}.match", values.string, item.get("match"))
        require = _parse(f"{where}.require", values.string, item.get("require", "none")).lower()
        if require not in REQUIREMENTS:
            raise ConfigError(f"{where}.require", f"{require!r} is not one of none, sigstore")
        paths = _parse(f"{where}.keys", values.str_list, item.get("keys"))
        if require == "sigstore" and not paths:
            raise ConfigError(f"{where}.keys", "require: sigstore needs at least one public key")
        if require == "none" and paths:
            raise ConfigError(f"{where}.keys", "keys are only for require: sigstore")
        keys = []
        for path in paths:
            try:
                keys.append(load_public_key(Path(path).expanduser()))
            except KeyFileError as exc:
                raise ConfigError(f"{where}.keys", str(exc)) from None
        rules.append(PolicyRule(match, require, tuple(keys)))
    return PolicyConfig(tuple(rules), tuple(dict.fromkeys(enforce)))


def _env_overrides(schema: dict[str, Any], prefix: str, env: Mapping[str, str]) -> dict[str, Any]:
    """``REGPROXY_<SECTION>_<KEY>`` for every leaf key (upstreams and policy are file-only)."""
    found: dict[str, Any] = {}
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            found.update(_env_overrides(spec, f"{path}.", env))
        elif spec not in ("UPSTREAMS", "POLICY"):
            name = "REGPROXY_" + path.replace(".", "_").upper()
            if name in env:
                found[path] = _parse(f"{path} (from {name})", _from_env(spec), env[name])
    return found


def _from_env(parser: Parser) -> Parser:
    """Parse an environment variable as the text it is (a path with ``#``, a password with
    ``: ``, a date-like project name stay what they are); only the two structured keys
    (auth.users, prefetch.images) are read as YAML, and bad YAML there is a bad value."""

    def parse(text: Any) -> Any:
        if parser not in (values.users, values.images):
            return parser(text)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError("is not valid YAML") from None
        return parser(value)

    return parse


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the config; ``path=None`` means defaults plus the environment."""
    env = os.environ if env is None else env
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigMissing(str(p), "no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            # one line: PyYAML's own message spans several, with a snippet of the file
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(str(p), f"not valid YAML{where}: {problem}") from None
    flat: dict[str, Any] = {}
    _walk(raw, _SCHEMA, "", flat)
    flat.update(_env_overrides(_SCHEMA, "", env))
    return _build(flat)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a config from a mapping as it would appear in YAML (tests, tools)."""
    flat: dict[str, Any] = {}
    _walk(raw, _SCHEMA, "", flat)
    return _build(flat)


def _build(flat: dict[str, Any]) -> Config:
    def sub(prefix: str) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}

    storage = sub("storage.")
    root = Path(storage.pop("root", None) or default_storage_root()).expanduser()
    upstreams = flat.get("upstreams", ())
    host, port = flat.get("listen", ("0.0.0.0", DEFAULT_PORT))
    tls = TLSConfig(**sub("tls."))
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("tls", "cert and key must be given together")
    project = flat.get("content.projects.images", "spectro-images")
    from regproxy.oci import NAME_RE  # local: oci imports errors only; config stays a leaf

    if "/" in project or not NAME_RE.match(project):
        raise ConfigError("content.projects.images", f"{project!r} must be one name component")
    default_up = flat.get("default_upstream")
    aliases = [u.alias for u in upstreams if u.alias]
    if len(set(aliases)) != len(aliases):
        raise ConfigError("upstreams", "two upstreams share an alias")
    peers = sub("peers.")
    if peers.get("scheme", "http") not in ("http", "https"):
        raise ConfigError("peers.scheme", "must be http or https")
    if len((peers.get("password") or "").encode()) > 72:
        # the peers check it with bcrypt, which reads 72 bytes; regproxy refuses longer ones
        raise ConfigError("peers.password", "is longer than 72 bytes, which no login accepts")
    low, high = storage.get("evict_to", SizeLimit()), storage.get("max_size", SizeLimit())
    if low.bytes and high.bytes and low.bytes > high.bytes:
        raise ConfigError("storage.evict_to", f"{low.bytes} bytes is above max_size ({high.bytes})")
    return Config(
        storage=StorageConfig(root=root, **storage),
        listen_host=host,
        listen_port=port,
        sync_enable=flat.get("content.sync.enable", True),
        project=project,
        upstreams=upstreams,
        default_upstream=default_up,
        tag_ttl=flat.get("tag_ttl", 300.0),
        peers=PeersConfig(**peers),
        auth=AuthConfig(**sub("auth.")),
        tls=tls,
        prefetch=PrefetchConfig(**sub("prefetch.")),
        log=LogConfig(**sub("log.")),
        shutdown_timeout=flat.get("shutdown_timeout", 30.0),
        policy=flat.get("policy", PolicyConfig()),
        http=HttpConfig(**sub("http.")),
        uploads=UploadsConfig(**sub("uploads.")),
    )
