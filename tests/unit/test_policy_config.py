"""The ``policy:`` config section: rules, keys read at start-up, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from regproxy.config import load_config
from regproxy.errors import ConfigError
from tests.signing import make_key

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, policy: Any):
    p = tmp_path / "regproxy.yaml"
    p.write_text(yaml.safe_dump({"policy": policy}))
    return load_config(p, env={})


def test_rules_and_keys(tmp_path: Path) -> None:
    pub = make_key("ed25519").write_public(tmp_path / "myorg.pub")
    cfg = load(
        tmp_path,
        {
            "rules": [
                {"match": "docker.io/myorg/*", "require": "sigstore", "keys": [str(pub)]},
                {"match": "*", "require": "none"},
            ],
            "enforce": ["pull-through", "import"],
        },
    )
    first, second = cfg.policy.rules
    assert first.match == "docker.io/myorg/*" and first.require == "sigstore"
    assert first.keys[0].kind == "ed25519" and first.keys[0].path == str(pub)
    assert second.require == "none" and not second.keys
    assert cfg.policy.enforce == ("pull-through", "import") and cfg.policy.active


def test_default_is_no_policy() -> None:
    cfg = load_config(None, env={})
    assert cfg.policy.rules == () and cfg.policy.enforce == ("pull-through",)
    assert not cfg.policy.active


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"rules": [{"match": "*", "require": "sigstore"}]}, "policy.rules[0].keys"),
        ({"rules": [{"match": "*", "require": "gpg", "keys": ["/k"]}]}, "policy.rules[0].require"),
        ({"rules": [{"require": "none"}]}, "policy.rules[0].match"),
        ({"rules": [{"match": "*", "keys": ["/k"]}]}, "policy.rules[0].keys"),
        ({"rules": [{"match": "*", "when": 1}]}, "policy.rules[0].when"),
        ({"rules": "all"}, "policy.rules"),
        ({"enforce": ["pull"]}, "policy.enforce"),
        ({"mode": 1}, "policy.mode"),
        ("yes", "policy"),
    ],
)
def test_bad_policy_names_the_key(tmp_path: Path, policy: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, policy)
    assert err.value.key == key, str(err.value)


@pytest.mark.process
def test_unparseable_key_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pub"
    bad.write_text(
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    )
    cfg = tmp_path / "regproxy.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "storage": {"root": str(tmp_path / "store")},
                "policy": {"rules": [{"match": "*", "require": "sigstore", "keys": [str(bad)]}]},
            }
        )
    )
    for command in ("serve", "check-config"):
        proc = subprocess.run(
            [sys.executable, "-m", "regproxy", "--config", str(cfg), command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "policy.rules[0].keys" in lines[0] and str(bad) in lines[0], lines[0]


@pytest.mark.process
def test_check_config_shows_the_policy(tmp_path: Path) -> None:
    pub = make_key().write_public(tmp_path / "team.pub")
    cfg = tmp_path / "regproxy.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "policy": {
                    "rules": [
                        {"match": "up.test/team/*", "require": "sigstore", "keys": [str(pub)]}
                    ]
                }
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(cfg), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "policy: enforce pull-through" in proc.stdout
    assert f"rule 1: up.test/team/* -> sigstore [{pub} (ecdsa-p256 sha256:" in proc.stdout
