"""regproxy.config: every key optional, REGPROXY_* overrides, one clear ConfigError per bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from regproxy.config import (
    DEFAULT_PORT,
    Config,
    SizeLimit,
    load_config,
    parse_duration,
    parse_size,
)
from regproxy.errors import ConfigError, ConfigMissing


def write(tmp_path: Path, doc: Any) -> Path:
    p = tmp_path / "regproxy.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def load(tmp_path: Path, doc: Any, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, doc), env=env or {})


def test_no_file_no_env_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, env={})
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", DEFAULT_PORT)
    assert cfg.sync_enable is True
    assert cfg.project == "spectro-images"
    assert cfg.upstreams == ()
    assert cfg.default_upstream is None
    assert cfg.tag_ttl == 300.0
    assert cfg.storage.root.is_absolute()
    assert not cfg.storage.max_size
    assert not cfg.tls.enabled


@pytest.mark.parametrize("doc", ["", "# only a comment\n", "{}", "null\n"])
def test_empty_files_are_defaults(tmp_path: Path, doc: str) -> None:
    assert load(tmp_path, doc).project == "spectro-images"


def test_every_key(tmp_path: Path) -> None:
    doc = {
        "listen": "127.0.0.1:5000",
        "content": {"sync": {"enable": False}, "projects": {"images": "edge"}},
        "storage": {
            "root": str(tmp_path / "store"),
            "max_size": "10GiB",
            "min_free": "5%",
            "upload_ttl": "2h",
            "evict_interval": "30s",
        },
        "upstreams": {
            "docker.io": {"mirrors": ["https://mirror.example"], "username": "u", "password": "p"},
            "10.0.0.5:5000": {"url": "http://10.0.0.5:5000", "alias": "site", "tls_verify": False},
            "*.pkg.dev": {},
            "*": None,
        },
        "default_upstream": "docker.io",
        "tag_ttl": "10m",
        "peers": {"urls": ["http://a:30003"], "dns": "peers.local", "port": 30003, "timeout": 1},
        "auth": {"anonymous_pull": False, "realm": "r"},
        "tls": {"cert": "/c.pem", "key": "/k.pem", "workers": 3},
        "prefetch": {"images": ["nginx:1.25", {"image": "ghcr.io/o/i:v1"}], "interval": "1h"},
        "log": {"level": "debug", "format": "json", "access": False},
        "shutdown_timeout": 5,
    }
    cfg = load(tmp_path, doc)
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 5000)
    assert cfg.sync_enable is False and cfg.project == "edge"
    assert cfg.storage.root == tmp_path / "store"
    assert cfg.storage.max_size == SizeLimit(bytes=10 * 1024**3)
    assert cfg.storage.min_free == SizeLimit(fraction=0.05)
    assert cfg.storage.upload_ttl == 7200 and cfg.storage.evict_interval == 30
    assert [u.pattern for u in cfg.upstreams] == ["docker.io", "10.0.0.5:5000", "*.pkg.dev", "*"]
    assert cfg.upstream_for("docker.io") is cfg.upstreams[0]
    assert cfg.upstream_for("site") is cfg.upstreams[1]
    assert cfg.upstream_for("us-docker.pkg.dev") is cfg.upstreams[2]
    assert cfg.upstream_for("quay.io") is cfg.upstreams[3]
    assert cfg.upstreams[1].url_for("10.0.0.5:5000") == "http://10.0.0.5:5000"
    assert cfg.upstreams[3].url_for("quay.io") == "https://quay.io"
    assert cfg.default_upstream == "docker.io" and cfg.tag_ttl == 600
    assert cfg.peers.urls == ("http://a:30003",) and cfg.peers.timeout == 1
    assert cfg.auth.anonymous_pull is False
    assert cfg.tls.enabled and cfg.tls.workers == 3
    assert cfg.prefetch.images == ("nginx:1.25", "ghcr.io/o/i:v1")
    assert (cfg.log.level, cfg.log.format, cfg.log.access) == ("DEBUG", "json", False)
    assert cfg.shutdown_timeout == 5


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "REGPROXY_STORAGE_ROOT": str(tmp_path / "from-env"),
        "REGPROXY_CONTENT_SYNC_ENABLE": "false",
        "REGPROXY_CONTENT_PROJECTS_IMAGES": "edge",
        "REGPROXY_LISTEN": "127.0.0.1:7000",
        "REGPROXY_TAG_TTL": "5m",
        "REGPROXY_STORAGE_MAX_SIZE": "80%",
        "REGPROXY_PEERS_URLS": "http://a:1,http://b:2",
        "REGPROXY_LOG_LEVEL": "warning",
        "REGPROXY_DEFAULT_UPSTREAM": "ghcr.io",
    }
    cfg = load(tmp_path, {"storage": {"root": "/from-file"}, "tag_ttl": "1h"}, env)
    assert cfg.storage.root == tmp_path / "from-env"  # env beats the file
    assert cfg.sync_enable is False
    assert cfg.project == "edge"
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 7000)
    assert cfg.tag_ttl == 300
    assert cfg.storage.max_size == SizeLimit(fraction=0.8)
    assert cfg.peers.urls == ("http://a:1", "http://b:2")
    assert cfg.log.level == "WARNING"
    assert cfg.default_upstream == "ghcr.io"


def test_env_without_file(tmp_path: Path) -> None:
    cfg = load_config(None, env={"REGPROXY_STORAGE_ROOT": str(tmp_path)})
    assert cfg.storage.root == tmp_path


def test_unrelated_env_is_ignored(tmp_path: Path) -> None:
    cfg = load_config(None, env={"REGPROXY_NOPE": "1", "HOME": "/x"})
    assert cfg.project == "spectro-images"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"nope": 1}, "nope"),
        ({"storage": {"rooot": "/x"}}, "storage.rooot"),
        ({"content": {"sync": {"enabled": True}}}, "content.sync.enabled"),
        ({"upstreams": {"docker.io": {"uri": "https://x"}}}, "upstreams.docker.io.uri"),
        ({"log": {"colour": "red"}}, "log.colour"),
    ],
)
def test_unknown_key(tmp_path: Path, doc: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, doc)
    assert info.value.key == key
    assert key in str(info.value)
    assert "unknown key" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"listen": "0.0.0.0:99999"}, "listen"),
        ({"listen": "0.0.0.0:http"}, "listen"),
        ({"listen": ""}, "listen"),
        ({"content": {"sync": {"enable": "maybe"}}}, "content.sync.enable"),
        ({"content": {"projects": {"images": "a/b"}}}, "content.projects.images"),
        ({"content": {"projects": {"images": "Upper"}}}, "content.projects.images"),
        ({"content": "x"}, "content"),
        ({"storage": {"max_size": "lots"}}, "storage.max_size"),
        ({"storage": {"max_size": "150%"}}, "storage.max_size"),
        ({"storage": {"min_free": "-5%"}}, "storage.min_free"),
        ({"storage": {"max_size": 100, "evict_to": 200}}, "storage.evict_to"),
        ({"storage": {"evict_to": "200%"}}, "storage.evict_to"),
        ({"storage": {"upload_ttl": "soon"}}, "storage.upload_ttl"),
        ({"storage": {"upload_ttl": -1}}, "storage.upload_ttl"),
        ({"storage": {"root": ""}}, "storage.root"),
        ({"storage": ["x"]}, "storage"),
        ({"tag_ttl": "5 minutes"}, "tag_ttl"),
        ({"tag_ttl": True}, "tag_ttl"),
        ({"upstreams": ["docker.io"]}, "upstreams"),
        ({"upstreams": {"Bad Host": {}}}, "upstreams.Bad Host"),
        ({"upstreams": {"docker.io": "x"}}, "upstreams.docker.io"),
        ({"upstreams": {"docker.io": {"url": "ftp://x"}}}, "upstreams.docker.io.url"),
        ({"upstreams": {"docker.io": {"mirrors": ["x.io"]}}}, "upstreams.docker.io.mirrors"),
        ({"upstreams": {"docker.io": {"mirrors": "x"}}}, "upstreams.docker.io.mirrors"),
        (
            {"upstreams": {"docker.io": {"tls_verify": "sometimes"}}},
            "upstreams.docker.io.tls_verify",
        ),
        ({"upstreams": {"docker.io": {"username": "u"}}}, "upstreams.docker.io.password"),
        ({"upstreams": {"*": {"url": "https://x"}}}, "upstreams.*"),
        (
            {"upstreams": {"a.io": {"alias": "s"}, "b.io": {"alias": "s"}}},
            "upstreams",
        ),
        ({"peers": {"port": "x"}}, "peers.port"),
        ({"peers": {"scheme": "ftp"}}, "peers.scheme"),
        ({"peers": {"urls": [1, 2]}}, "peers.urls"),
        ({"auth": {"users": {"u": "plaintext"}}}, "auth.users"),
        ({"auth": {"users": ["u"]}}, "auth.users"),
        ({"tls": {"cert": "/c.pem"}}, "tls"),
        ({"tls": {"cert": "/c.pem", "key": "/k.pem", "workers": -1}}, "tls.workers"),
        ({"tls": {"cert": "/c.pem", "key": "/k.pem", "workers": 65}}, "tls.workers"),
        ({"prefetch": {"images": "nginx"}}, "prefetch.images"),
        ({"prefetch": {"images": [{"img": "x"}]}}, "prefetch.images"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"shutdown_timeout": "never"}, "shutdown_timeout"),
        ({"storage": {"max_size": "9" * 5000}}, "storage.max_size"),  # float(): inf
        ({"storage": {"max_size": "9" * 400 + "PiB"}}, "storage.max_size"),
        ({"listen": "127.0.0.1:\u00b2"}, "listen"),  # a superscript two: isdigit() says yes
    ],
)
def test_bad_values(tmp_path: Path, doc: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, doc)
    assert info.value.key == key
    text = str(info.value)
    assert text.startswith(f"config: {key}: ")
    assert "\n" not in text and len(text) < 400  # a value of 5,000 characters is cut short


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("REGPROXY_CONTENT_SYNC_ENABLE", "perhaps", "content.sync.enable"),
        ("REGPROXY_LISTEN", "nowhere:x", "listen"),
        ("REGPROXY_TAG_TTL", "later", "tag_ttl"),
        ("REGPROXY_STORAGE_ROOT", "", "storage.root"),
        ("REGPROXY_LOG_LEVEL", "loud", "log.level"),
        ("REGPROXY_PREFETCH_IMAGES", "{oops", "prefetch.images"),
        ("REGPROXY_AUTH_USERS", "u: [", "auth.users"),
        ("REGPROXY_TAG_TTL", "[1, 2", "tag_ttl"),
    ],
)
def test_bad_env_values_name_the_variable(tmp_path: Path, var: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={var: value})
    assert key in str(info.value)
    assert var in str(info.value)
    assert "\n" not in str(info.value)


def test_env_string_values_are_taken_as_written(tmp_path: Path) -> None:
    """An env value is the text the user wrote, even where YAML would read something else."""
    cfg = load_config(
        None,
        env={
            "REGPROXY_STORAGE_ROOT": str(tmp_path / "a #b"),
            "REGPROXY_PEERS_PASSWORD": "p@ss: word",
            "REGPROXY_CONTENT_PROJECTS_IMAGES": "2024-01-01",
        },
    )
    assert cfg.storage.root == tmp_path / "a #b"
    assert cfg.peers.password == "p@ss: word"
    assert cfg.project == "2024-01-01"


def test_env_structured_values_are_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, env={"REGPROXY_PREFETCH_IMAGES": '["nginx:1.25", "ghcr.io/o/i:v1"]'})
    assert cfg.prefetch.images == ("nginx:1.25", "ghcr.io/o/i:v1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigMissing) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(info.value)


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "storage:\n  root: [unclosed\n")
    assert "\n" not in str(info.value)
    assert "regproxy.yaml" in str(info.value)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, "- a\n- b\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("250ms", 0.25), ("12", 12), (7, 7)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1KiB", 1024), ("1KB", 1000), ("2MiB", 2 * 1024**2), ("3G", 3 * 1000**3), ("10", 10), (5, 5)],
)
def test_parse_size(text: Any, size: int) -> None:
    assert parse_size(text) == size


def test_size_limit_resolve() -> None:
    assert SizeLimit(bytes=10).resolve(1000) == 10
    assert SizeLimit(fraction=0.5).resolve(1000) == 500
    assert not SizeLimit()


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (None, SizeLimit(bytes=512 * 1024 * 1024)),  # the default
        ("2GiB", SizeLimit(bytes=2 * 1024**3)),
        ("10%", SizeLimit(fraction=0.10)),
        (0, SizeLimit()),
    ],
)
def test_drop_behind_above(tmp_path: Path, value: Any, limit: SizeLimit) -> None:
    doc = {} if value is None else {"storage": {"drop_behind_above": value}}
    got = load(tmp_path, doc).storage.drop_behind_above
    assert got == limit
    # a percentage is of the host's memory (regproxy.page_cache.physical_memory)
    assert got.resolve(8 * 1024**3) == (limit.bytes or int(limit.fraction * 8 * 1024**3))


@pytest.mark.parametrize("value", ["lots", "-1MiB", "150%"])
def test_drop_behind_above_refuses_what_is_not_a_size(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"storage": {"drop_behind_above": value}})
    assert "storage.drop_behind_above" in str(err.value)
