"""Access control against real clients: skopeo pushes and pulls, plain HTTP, peers (issue 4, item 4;
issue 7, item 6)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.images import make_image, write_layout
from tests.peers import free_port, http, make_htpasswd, skopeo, skopeo_raw

pytestmark = pytest.mark.peers

PASSWORD = "correct-horse-battery"
WRONG = "Tr0ub4dor-guess-9"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    status, _, body = http("GET", f"{url}/metrics", headers=headers)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def layout(tmp_path: Path):
    img = make_image("amd64")
    path = tmp_path / "layout"
    write_layout(path, {"v1": img})
    return path, img


def push(layout: Path, dest: str, *creds: str, check: bool = True):
    args = ["copy", "--dest-tls-verify=false", *creds, f"oci:{layout}:v1", f"docker://{dest}"]
    return skopeo(*args, check=check)


def test_push_needs_a_login_and_wrong_passwords_are_slow_and_unlogged(
    tmp_path: Path, daemon_factory, layout
) -> None:
    path, img = layout
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", PASSWORD)
    d = daemon_factory({"auth": {"htpasswd": str(htpasswd), "realm": "edge-1"}})
    repo = f"{d.hostport}/spectro-images/team/app"

    refused = push(path, f"{repo}:v1", check=False)
    assert refused.returncode != 0 and "authentication required" in refused.stderr
    wrong = push(path, f"{repo}:v1", "--dest-creds", f"alice:{WRONG}", check=False)
    assert wrong.returncode != 0
    status, _, _ = http("GET", f"{d.url}/v2/spectro-images/team/app/manifests/v1")
    assert status == 404  # nothing was stored by either

    push(path, f"{repo}:v1", "--dest-creds", f"alice:{PASSWORD}")
    # anonymous pull is on by default: skopeo without credentials reads it
    assert sha(skopeo_raw(f"{repo}:v1")) == img.digest

    # a wrong password waits for its answer, is counted, and leaves no trace of itself
    failures = metric(d.url, "regproxy_login_failures_total")
    t0 = time.monotonic()
    status, headers, _ = http(
        "PUT",
        f"{d.url}/v2/spectro-images/team/app/manifests/v2",
        body=b"{}",
        headers=basic("alice", WRONG),
    )
    assert time.monotonic() - t0 >= 0.9
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="edge-1"'
    assert metric(d.url, "regproxy_login_failures_total") >= failures + 1
    log = d.log()
    assert "auth.login_failed user='alice' remote=127.0.0.1" in log
    assert WRONG not in log and PASSWORD not in log
    # the access log names who pushed
    assert any(
        "method=PUT" in line
        and "/manifests/v1" in line
        and "status=201" in line
        and "user=alice" in line
        for line in log.splitlines()
    ), log
    # ... and a right password is no failure (not counted, so not delayed or throttled)
    failures = metric(d.url, "regproxy_login_failures_total")
    status, _, _ = http("GET", f"{d.url}/v2/", headers=basic("alice", PASSWORD))
    assert status == 200
    assert metric(d.url, "regproxy_login_failures_total") == failures


def test_plain_http_answers(tmp_path: Path, daemon_factory) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", PASSWORD)
    d = daemon_factory({"auth": {"htpasswd": str(htpasswd)}})
    status, headers, body = http("GET", f"{d.url}/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="regproxy"'
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, headers, body = http("POST", f"{d.url}/v2/spectro-images/app/blobs/uploads/")
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, headers, _ = http(
        "POST", f"{d.url}/v2/spectro-images/app/blobs/uploads/", headers=basic("alice", PASSWORD)
    )
    assert status == 202 and headers["Location"]
    # administrative endpoints (bundle import) need a login too
    status, headers, _ = http("POST", f"{d.url}/admin/import", body=b"not a bundle")
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    status, _, body = http(
        "POST", f"{d.url}/admin/import", body=b"not a bundle", headers=basic("alice", PASSWORD)
    )
    assert status == 400, body
    # reads stay open while anonymous pull is on; health and metrics too
    assert http("GET", f"{d.url}/v2/spectro-images/app/tags/list")[0] == 404
    assert http("GET", f"{d.url}/v2/_catalog")[0] == 200
    assert http("GET", f"{d.url}/healthz")[0] == 200
    assert http("GET", f"{d.url}/metrics")[0] == 200
    # curl sends Basic after the challenge, like the registry clients
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            f"alice:{PASSWORD}",
            f"{d.url}/v2/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out == "200"


def test_anonymous_pull_off(tmp_path: Path, daemon_factory, layout) -> None:
    path, img = layout
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", PASSWORD)
    d = daemon_factory({"auth": {"htpasswd": str(htpasswd), "anonymous_pull": False}})
    repo = f"{d.hostport}/spectro-images/team/app"
    push(path, f"{repo}:v1", "--dest-creds", f"alice:{PASSWORD}")

    anon = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{repo}:v1", check=False)
    assert anon.returncode != 0
    assert "authentication required" in anon.stderr or "unauthorized" in anon.stderr.lower()
    got = skopeo(
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        f"alice:{PASSWORD}",
        f"docker://{repo}:v1",
    )
    assert sha(got.stdout.encode()) == img.digest
    out = tmp_path / "out"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"alice:{PASSWORD}",
        f"docker://{repo}:v1",
        f"dir:{out}",
    )
    assert sha((out / "manifest.json").read_bytes()) == img.digest

    manifest = f"{d.url}/v2/spectro-images/team/app/manifests/v1"
    for url in (f"{d.url}/v2/", manifest, f"{d.url}/v2/_catalog", f"{d.url}/metrics"):
        status, headers, _ = http("GET", url)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), url
    # the peer marker earns nothing by itself
    assert http("GET", manifest, headers={"Regproxy-Peer": "1"})[0] == 401
    assert http("GET", f"{d.url}/healthz")[0] == 200
    assert http("GET", f"{d.url}/metrics", headers=basic("alice", PASSWORD))[0] == 200


def test_config_users_and_htpasswd_reload(tmp_path: Path, daemon_factory, layout) -> None:
    path, _ = layout
    line = subprocess.run(
        ["htpasswd", "-Bbn", "bob", PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    bob_hash = line.split(":", 1)[1]
    assert bob_hash.startswith("$2y$")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    d = daemon_factory({"auth": {"users": {"bob": bob_hash}, "htpasswd": str(htpasswd)}})
    repo = f"{d.hostport}/spectro-images/team/app"
    push(path, f"{repo}:v1", "--dest-creds", f"bob:{PASSWORD}")
    assert push(path, f"{repo}:v2", "--dest-creds", f"carol:{PASSWORD}", check=False).returncode

    # a user added to the file while the daemon runs can push a moment later
    make_htpasswd(htpasswd, "carol", PASSWORD)
    deadline = time.monotonic() + 10
    while http("GET", f"{d.url}/v2/", headers=basic("carol", PASSWORD))[0] != 200:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)
    push(path, f"{repo}:v2", "--dest-creds", f"carol:{PASSWORD}")
    assert PASSWORD not in d.log()


def test_peers_log_in_when_anonymous_pull_is_off(tmp_path: Path, daemon_factory, layout) -> None:
    path, img = layout
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", PASSWORD)
    peer_line = subprocess.run(
        ["htpasswd", "-Bbn", "peer", "peer-secret"], capture_output=True, text=True, check=True
    ).stdout.strip()
    htpasswd.write_text(htpasswd.read_text() + peer_line + "\n")
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    auth = {"htpasswd": str(htpasswd), "anonymous_pull": False}
    peers = {"urls": urls, "timeout": "2s", "refresh": "1s"}
    a, b = (
        daemon_factory(
            {
                "content": {"sync": {"enable": False}},
                "auth": auth,
                "peers": {**peers, "username": "peer", "password": "peer-secret"},
            },
            start=False,
            name=name,
        )
        for name in "AB"
    )
    a.port, b.port = ports
    a.start()
    b.start()
    push(path, f"{a.hostport}/spectro-images/team/app:v1", "--dest-creds", f"alice:{PASSWORD}")

    # C lists A as a peer but has no peer credentials: A refuses it, so C has nothing to serve
    c = daemon_factory(
        {"content": {"sync": {"enable": False}}, "auth": auth, "peers": {**peers, "urls": [a.url]}},
        name="C",
    )
    refused = skopeo(
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        f"alice:{PASSWORD}",
        f"docker://{c.hostport}/spectro-images/team/app:v1",
        check=False,
    )
    assert refused.returncode != 0
    # (an answer: A is up, only its login refused C)
    assert "peers.refused" in c.log() and "401 and no way to authenticate" in c.log()

    # B logs in to A with its peer credentials and serves the image
    out = tmp_path / "out"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"alice:{PASSWORD}",
        f"docker://{b.hostport}/spectro-images/team/app:v1",
        f"dir:{out}",
    )
    assert sha((out / "manifest.json").read_bytes()) == img.digest
    for layer in img.layers:
        assert (out / sha(layer).split(":")[1]).read_bytes() == layer
    assert f"source={a.url}" in b.log()
    assert "peer-secret" not in a.log() + b.log()
    # and B's anonymous clients are still refused
    assert skopeo_raw_fails(f"{b.hostport}/spectro-images/team/app:v1")


def skopeo_raw_fails(ref: str) -> bool:
    proc = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}", check=False)
    return proc.returncode != 0
