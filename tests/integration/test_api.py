"""The OCI Distribution API (spec.md end-1 ... end-13) over real TCP against regproxy's app.

Every test talks plain HTTP (urllib) to 127.0.0.1, as a client would; the app runs in this
process (tests/inproc.py), so these are fast tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regproxy import api
from tests.images import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZ, OCI_MANIFEST, sha256
from tests.inproc import AppDaemon
from tests.peers import error_codes, http

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
SMALL = 10_000  # served from memory
LARGE = 300_000  # served with FileResponse (> 64 KiB)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppDaemon]:
    """One app for the many bad-input cases, which must not change what it holds anyway."""
    d = AppDaemon(tmp_path_factory.mktemp("shared"), {})
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[AppDaemon]:
    d = AppDaemon(tmp_path / "regproxy").start()
    try:
        yield d
    finally:
        d.stop()


# --- helpers ------------------------------------------------------------------------------------
def blob_bytes(n: int) -> bytes:
    return os.urandom(n)


def push_blob(d: AppDaemon, repo: str, data: bytes) -> str:
    digest = sha256(data)
    st, h, body = http("POST", f"{d.url}/v2/{repo}/blobs/uploads/?digest={digest}", data)
    assert st == 201, body
    assert h["Docker-Content-Digest"] == digest
    return digest


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def image_manifest(
    d: AppDaemon,
    repo: str,
    *,
    media_type: str = OCI_MANIFEST,
    config_type: str = OCI_CONFIG,
    layer_type: str = OCI_LAYER_GZ,
    layers: int = 1,
    extra: dict[str, Any] | None = None,
    config: bytes | None = None,
) -> bytes:
    """Push a config and layers, return a manifest body (not pushed) that references them."""
    cfg = config if config is not None else json.dumps({"n": os.urandom(8).hex()}).encode()
    push_blob(d, repo, cfg)
    lays = [blob_bytes(100 + i) for i in range(layers)]
    for lay in lays:
        push_blob(d, repo, lay)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": desc(config_type, cfg),
        "layers": [desc(layer_type, lay) for lay in lays],
        **(extra or {}),
    }
    return json.dumps(doc, indent=3).encode()


def put_manifest(
    d: AppDaemon, repo: str, ref: str, body: bytes, ct: str = OCI_MANIFEST
) -> tuple[int, dict[str, str], bytes]:
    return http("PUT", f"{d.url}/v2/{repo}/manifests/{ref}", body, {"Content-Type": ct})


def push_manifest(d: AppDaemon, repo: str, ref: str, body: bytes, ct: str = OCI_MANIFEST) -> str:
    st, h, resp = put_manifest(d, repo, ref, body, ct)
    assert st == 201, resp
    assert h["Docker-Content-Digest"] == sha256(body)
    return sha256(body)


def start_upload(d: AppDaemon, repo: str) -> str:
    st, h, body = http("POST", f"{d.url}/v2/{repo}/blobs/uploads/")
    assert st == 202, body
    assert h["Location"].startswith("/v2/")
    return h["Location"]


def codes(st: int, body: bytes) -> tuple[int, list[str]]:
    return st, error_codes(body)


def store_snapshot(d: AppDaemon) -> dict[str, Any]:
    root = d.root / "store"
    files = sorted(str(p.relative_to(root)) for p in (root / "blobs").rglob("*") if p.is_file())
    tmp = sorted(p.name for p in (root / "tmp").iterdir())
    st, _, body = http("GET", f"{d.url}/v2/_catalog")
    assert st == 200
    return {"blobs": files, "tmp": tmp, "catalog": json.loads(body)["repositories"]}


def raw_request(d: AppDaemon, request: bytes) -> bytes:
    """Send bytes exactly as given (for paths urllib would refuse or rewrite)."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# --- base ---------------------------------------------------------------------------------------
def test_base_endpoint(daemon: AppDaemon) -> None:
    for path in ("/v2/", "/v2"):
        st, h, body = http("GET", daemon.url + path)
        assert st == 200
        assert h["Docker-Distribution-API-Version"] == "registry/2.0"
        assert json.loads(body) == {}


def test_unknown_endpoint_is_oci_404(daemon: AppDaemon) -> None:
    st, h, body = http("GET", f"{daemon.url}/v2/foo/nothing/here")
    assert st == 404
    assert h["Docker-Distribution-API-Version"] == "registry/2.0"
    assert error_codes(body)


def test_method_not_allowed_is_unsupported(daemon: AppDaemon) -> None:
    assert codes(*http("POST", f"{daemon.url}/v2/foo/tags/list")[::2]) == (405, ["UNSUPPORTED"])


# --- uploads ------------------------------------------------------------------------------------
def test_monolithic_post_then_get(daemon: AppDaemon) -> None:
    data = blob_bytes(5000)
    digest = sha256(data)
    st, h, _ = http("POST", f"{daemon.url}/v2/mono/blobs/uploads/?digest={digest}", data)
    assert st == 201
    assert h["Location"].endswith(f"/blobs/{digest}")
    assert h["Docker-Content-Digest"] == digest
    st, h, body = http("GET", f"{daemon.url}/v2/mono/blobs/{digest}")
    assert st == 200 and body == data


def test_monolithic_sha512(daemon: AppDaemon) -> None:
    data = blob_bytes(3000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    st, h, body = http("POST", f"{daemon.url}/v2/s512/blobs/uploads/?digest={digest}", data)
    assert st == 201, body
    st, h, body = http("GET", f"{daemon.url}/v2/s512/blobs/{digest}")
    assert st == 200 and body == data and h["Docker-Content-Digest"] == digest


def test_monolithic_wrong_digest_stores_nothing(daemon: AppDaemon) -> None:
    before = store_snapshot(daemon)
    data = blob_bytes(4000)
    wrong = sha256(b"something else")
    st, _, body = http("POST", f"{daemon.url}/v2/mono/blobs/uploads/?digest={wrong}", data)
    assert codes(st, body) == (400, ["DIGEST_INVALID"])
    for dg in (wrong, sha256(data)):
        assert http("HEAD", f"{daemon.url}/v2/mono/blobs/{dg}")[0] == 404
    assert store_snapshot(daemon) == before


def test_post_then_put(daemon: AppDaemon) -> None:
    data = blob_bytes(LARGE)
    loc = start_upload(daemon, "pp")
    digest = sha256(data)
    st, h, body = http("PUT", f"{daemon.url}{loc}?digest={digest}", data)
    assert st == 201, body
    assert h["Location"] == f"/v2/pp/blobs/{digest}"  # the name as the client wrote it
    assert h["Docker-Content-Digest"] == digest
    st, h, body = http("GET", f"{daemon.url}/v2/pp/blobs/{digest}")
    assert st == 200 and body == data
    # the session is gone once finished
    assert codes(*http("GET", daemon.url + loc)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])


def test_post_put_location_with_query_keeps_working(daemon: AppDaemon) -> None:
    """A client appends ?digest= to the Location as given (which may carry a query)."""
    data = b"hello"
    loc = start_upload(daemon, "pp")
    sep = "&" if "?" in loc else "?"
    st, _, body = http("PUT", f"{daemon.url}{loc}{sep}digest={sha256(data)}", data)
    assert st == 201, body


def test_chunked_upload(daemon: AppDaemon) -> None:
    data = blob_bytes(200_000)
    loc = start_upload(daemon, "chunky")
    st, h, _ = http("GET", daemon.url + loc)
    assert st == 204
    assert h["Range"] == "0-0"
    offset = 0
    for size in (65_536, 100_000, 34_464):
        chunk = data[offset : offset + size]
        st, h, body = http(
            "PATCH",
            daemon.url + loc,
            chunk,
            {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + size - 1}",
            },
        )
        assert st == 202, body
        offset += size
        assert h["Range"] == f"0-{offset - 1}"
        assert h["Location"]
        assert h["Docker-Upload-UUID"] in loc
        loc = h["Location"]
        st, h, _ = http("GET", daemon.url + loc)
        assert st == 204
        assert h["Range"] == f"0-{offset - 1}"
        assert h["Location"]
    digest = sha256(data)
    st, h, body = http("PUT", f"{daemon.url}{loc}?digest={digest}")
    assert st == 201, body
    assert h["Docker-Content-Digest"] == digest
    assert http("GET", f"{daemon.url}/v2/chunky/blobs/{digest}")[2] == data


def test_chunked_upload_streamed_without_content_range_and_final_chunk_in_put(
    daemon: AppDaemon,
) -> None:
    data = blob_bytes(50_000)
    loc = start_upload(daemon, "chunky")
    st, h, _ = http("PATCH", daemon.url + loc, data[:30_000])
    assert st == 202 and h["Range"] == "0-29999"
    st, h, body = http(
        "PUT",
        f"{h['Location']}?digest={sha256(data)}"
        if h["Location"].startswith("http")
        else f"{daemon.url}{h['Location']}?digest={sha256(data)}",
        data[30_000:],
        {"Content-Range": "30000-49999"},
    )
    assert st == 201, body
    assert http("GET", f"{daemon.url}/v2/chunky/blobs/{sha256(data)}")[2] == data


def test_chunk_out_of_order_is_416(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "ooo")
    st, _, _ = http("PATCH", daemon.url + loc, b"a" * 10, {"Content-Range": "0-9"})
    assert st == 202
    st, h, body = http("PATCH", daemon.url + loc, b"b" * 10, {"Content-Range": "20-29"})
    assert st == 416
    assert h["Range"] == "0-9"
    # a chunk that repeats bytes already written is out of order too
    st, h, _ = http("PATCH", daemon.url + loc, b"b" * 5, {"Content-Range": "5-9"})
    assert st == 416
    # the upload is still usable from where it was
    st, h, _ = http("GET", daemon.url + loc)
    assert st == 204 and h["Range"] == "0-9"
    st, _, _ = http("PATCH", daemon.url + loc, b"c" * 10, {"Content-Range": "10-19"})
    assert st == 202
    data = b"a" * 10 + b"c" * 10
    st, _, body = http("PUT", f"{daemon.url}{loc}?digest={sha256(data)}")
    assert st == 201, body


def test_put_out_of_order_final_chunk_is_416(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "ooo")
    http("PATCH", daemon.url + loc, b"a" * 10, {"Content-Range": "0-9"})
    st, _, _ = http(
        "PUT", f"{daemon.url}{loc}?digest={sha256(b'x')}", b"x", {"Content-Range": "50-50"}
    )
    assert st == 416


def test_malformed_content_range(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "cr")
    for bad in ("abc", "9-0", "0-", "-5"):
        st, _, body = http("PATCH", daemon.url + loc, b"x", {"Content-Range": bad})
        assert 400 <= st < 500, bad
        assert error_codes(body), bad
    st, h, _ = http("GET", daemon.url + loc)
    assert st == 204 and h["Range"] == "0-0"
    # Content-Range that does not match the body length
    st, _, body = http("PATCH", daemon.url + loc, b"xyz", {"Content-Range": "0-9"})
    assert st == 400, body
    st, h, _ = http("GET", daemon.url + loc)
    assert h["Range"] == "0-0"


def test_put_wrong_digest_stores_nothing(daemon: AppDaemon) -> None:
    before = store_snapshot(daemon)
    data = blob_bytes(80_000)
    loc = start_upload(daemon, "wrong")
    assert http("PATCH", daemon.url + loc, data)[0] == 202
    wrong = sha256(b"not it")
    st, _, body = http("PUT", f"{daemon.url}{loc}?digest={wrong}")
    assert codes(st, body) == (400, ["DIGEST_INVALID"])
    for dg in (wrong, sha256(data)):
        assert http("HEAD", f"{daemon.url}/v2/wrong/blobs/{dg}")[0] == 404
    assert store_snapshot(daemon) == before


def test_put_without_digest_is_rejected(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "nodigest")
    st, _, body = http("PUT", daemon.url + loc, b"abc")
    assert codes(st, body) == (400, ["DIGEST_INVALID"])


def test_cancel_upload(daemon: AppDaemon) -> None:
    before = store_snapshot(daemon)
    loc = start_upload(daemon, "cancel")
    http("PATCH", daemon.url + loc, b"x" * 1000)
    st, _, _ = http("DELETE", daemon.url + loc)
    assert st == 204
    assert codes(*http("GET", daemon.url + loc)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert codes(*http("PATCH", daemon.url + loc, b"y")[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert codes(*http("DELETE", daemon.url + loc)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert store_snapshot(daemon) == before


def test_unknown_upload_uuid(daemon: AppDaemon) -> None:
    base = f"{daemon.url}/v2/up/blobs/uploads/6f1d9e24-0000-4000-8000-000000000000"
    for method, body in (("GET", None), ("PATCH", b"x"), ("PUT", b"x"), ("DELETE", None)):
        url = base + (f"?digest={sha256(b'x')}" if method == "PUT" else "")
        st, _, resp = http(method, url, body)
        assert codes(st, resp) == (404, ["BLOB_UPLOAD_UNKNOWN"]), method
    st, _, resp = http("GET", f"{daemon.url}/v2/up/blobs/uploads/..")
    assert st in (400, 404), resp


def test_upload_uuid_under_another_repo(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "owner")
    uid = loc.rsplit("/", 1)[1]
    other = f"{daemon.url}/v2/thief/blobs/uploads/{uid}"
    assert codes(*http("GET", other)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert codes(*http("PATCH", other, b"x")[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    st, _, body = http("PUT", f"{other}?digest={sha256(b'')}")
    assert codes(st, body) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert codes(*http("DELETE", other)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    # the owner's session is untouched
    assert http("GET", daemon.url + loc)[0] == 204


def test_failed_uploads_leave_store_as_it_was(daemon: AppDaemon) -> None:
    keep = push_blob(daemon, "keep", b"kept")
    before = store_snapshot(daemon)
    # wrong digest monolithic, wrong digest chunked, cancelled, size mismatch, bad digest syntax
    http("POST", f"{daemon.url}/v2/a/blobs/uploads/?digest={sha256(b'q')}", b"zzz")
    loc = start_upload(daemon, "b")
    http("PATCH", daemon.url + loc, blob_bytes(100_000))
    http("PUT", f"{daemon.url}{loc}?digest={sha256(b'q')}")
    loc = start_upload(daemon, "c")
    http("PATCH", daemon.url + loc, blob_bytes(100_000))
    http("DELETE", daemon.url + loc)
    http("POST", f"{daemon.url}/v2/d/blobs/uploads/?digest=sha256:abc", b"zzz")
    loc = start_upload(daemon, "e")
    http("PATCH", daemon.url + loc, b"abc", {"Content-Range": "0-99"})
    http("DELETE", daemon.url + loc)
    after = store_snapshot(daemon)
    assert after == before
    assert http("HEAD", f"{daemon.url}/v2/keep/blobs/{keep}")[0] == 200


# --- mount --------------------------------------------------------------------------------------
def test_cross_repo_mount(daemon: AppDaemon) -> None:
    data = blob_bytes(2000)
    digest = push_blob(daemon, "src", data)
    st, h, _ = http("POST", f"{daemon.url}/v2/dst/blobs/uploads/?mount={digest}&from=src")
    assert st == 201
    assert h["Location"].endswith(f"/blobs/{digest}")
    assert h["Docker-Content-Digest"] == digest
    assert http("GET", f"{daemon.url}/v2/dst/blobs/{digest}")[2] == data


def test_mount_from_repo_without_blob_starts_upload(daemon: AppDaemon) -> None:
    data = blob_bytes(2000)
    digest = push_blob(daemon, "holder", data)
    # "empty" does not hold the blob: mount must not succeed even though another repo has it
    push_blob(daemon, "empty", b"other")
    st, h, _ = http("POST", f"{daemon.url}/v2/dst2/blobs/uploads/?mount={digest}&from=empty")
    assert st == 202
    loc = h["Location"]
    assert "/blobs/uploads/" in loc
    # and the new session is usable
    st, _, _ = http("PUT", f"{daemon.url}{loc}?digest={digest}", data)
    assert st == 201
    unknown = sha256(b"nobody has this")
    st, h, _ = http("POST", f"{daemon.url}/v2/dst2/blobs/uploads/?mount={unknown}&from=holder")
    assert st == 202 and "/blobs/uploads/" in h["Location"]


# --- blobs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_blob_get_head_headers(daemon: AppDaemon, size: int) -> None:
    data = blob_bytes(size)
    digest = push_blob(daemon, "bl", data)
    st, h, body = http("GET", f"{daemon.url}/v2/bl/blobs/{digest}")
    assert st == 200 and body == data
    assert h["Content-Length"] == str(size)
    assert h["Docker-Content-Digest"] == digest
    assert h["Accept-Ranges"] == "bytes"
    assert h["Docker-Distribution-API-Version"] == "registry/2.0"
    st, h, body = http("HEAD", f"{daemon.url}/v2/bl/blobs/{digest}")
    assert st == 200 and body == b""
    assert h["Content-Length"] == str(size)
    assert h["Docker-Content-Digest"] == digest


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_blob_ranges(daemon: AppDaemon, size: int) -> None:
    data = blob_bytes(size)
    digest = push_blob(daemon, "rg", data)
    url = f"{daemon.url}/v2/rg/blobs/{digest}"
    cases = {
        "bytes=0-99": (0, 99),
        "bytes=100-199": (100, 199),
        f"bytes={size - 10}-": (size - 10, size - 1),
        "bytes=-25": (size - 25, size - 1),
        f"bytes=5-{size + 1000}": (5, size - 1),  # end past the blob is clamped
        f"bytes=-{size * 2}": (0, size - 1),  # suffix longer than the blob is all of it
    }
    for header, (start, end) in cases.items():
        st, h, body = http("GET", url, headers={"Range": header})
        assert st == 206, header
        assert body == data[start : end + 1], header
        assert h["Content-Range"] == f"bytes {start}-{end}/{size}", header
        assert h["Content-Length"] == str(end - start + 1), header
        assert h["Docker-Content-Digest"] == digest
    for bad in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=10-5", "bytes=-0"):
        st, h, body = http("GET", url, headers={"Range": bad})
        assert st == 416, bad
        assert h.get("Content-Range") == f"bytes */{size}", bad
    for malformed in ("bytes=abc", "bytes=-", "items=0-5", "0-5", "bytes=1-2-3"):
        st, h, body = http("GET", url, headers={"Range": malformed})
        assert st == 416, malformed


def test_blob_unknown_and_delete(daemon: AppDaemon) -> None:
    data = blob_bytes(SMALL)
    digest = push_blob(daemon, "del", data)
    push_blob(daemon, "del2", data)
    unknown = sha256(b"missing")
    assert codes(*http("GET", f"{daemon.url}/v2/del/blobs/{unknown}")[::2]) == (
        404,
        ["BLOB_UNKNOWN"],
    )
    assert http("HEAD", f"{daemon.url}/v2/del/blobs/{unknown}")[0] == 404
    assert codes(*http("DELETE", f"{daemon.url}/v2/del/blobs/{unknown}")[::2]) == (
        404,
        ["BLOB_UNKNOWN"],
    )
    st, _, _ = http("DELETE", f"{daemon.url}/v2/del/blobs/{digest}")
    assert st == 202
    # the other repository keeps its link
    assert http("GET", f"{daemon.url}/v2/del2/blobs/{digest}")[2] == data


def test_blob_delete_sticks(daemon: AppDaemon) -> None:
    data = blob_bytes(SMALL)
    digest = push_blob(daemon, "del", data)
    assert http("DELETE", f"{daemon.url}/v2/del/blobs/{digest}")[0] == 202
    assert http("HEAD", f"{daemon.url}/v2/del/blobs/{digest}")[0] == 404
    assert codes(*http("GET", f"{daemon.url}/v2/del/blobs/{digest}")[::2]) == (
        404,
        ["BLOB_UNKNOWN"],
    )
    assert codes(*http("DELETE", f"{daemon.url}/v2/del/blobs/{digest}")[::2]) == (
        404,
        ["BLOB_UNKNOWN"],
    )


def test_blob_is_per_repository(daemon: AppDaemon) -> None:
    digest = push_blob(daemon, "mine", b"private bytes")
    assert http("HEAD", f"{daemon.url}/v2/yours/blobs/{digest}")[0] == 404


def test_empty_blob(daemon: AppDaemon) -> None:
    digest = push_blob(daemon, "empty", b"")
    st, h, body = http("GET", f"{daemon.url}/v2/empty/blobs/{digest}")
    assert st == 200 and body == b"" and h["Content-Length"] == "0"


# --- manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("media_type", "config_type", "layer_type"),
    [(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZ), (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)],
)
def test_manifest_put_get_head(
    daemon: AppDaemon, media_type: str, config_type: str, layer_type: str
) -> None:
    repo = "img"
    body = image_manifest(
        daemon, repo, media_type=media_type, config_type=config_type, layer_type=layer_type
    )
    digest = sha256(body)
    st, h, _ = put_manifest(daemon, repo, "v1", body, media_type)
    assert st == 201
    assert h["Docker-Content-Digest"] == digest
    assert h["Location"].endswith(f"/manifests/{digest}")
    assert "OCI-Subject" not in h
    for ref in ("v1", digest):
        st, h, got = http("GET", f"{daemon.url}/v2/{repo}/manifests/{ref}")
        assert st == 200
        assert got == body  # the exact bytes pushed
        assert h["Content-Type"] == media_type
        assert h["Docker-Content-Digest"] == digest
        assert h["Content-Length"] == str(len(body))
        st, h, got = http("HEAD", f"{daemon.url}/v2/{repo}/manifests/{ref}")
        assert st == 200 and got == b""
        assert h["Content-Type"] == media_type
        assert h["Docker-Content-Digest"] == digest
        assert h["Content-Length"] == str(len(body))


def test_manifest_put_by_digest(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "bydigest")
    digest = sha256(body)
    st, h, _ = put_manifest(daemon, "bydigest", digest, body)
    assert st == 201 and h["Docker-Content-Digest"] == digest
    assert http("GET", f"{daemon.url}/v2/bydigest/manifests/{digest}")[2] == body
    st, _, resp = http("GET", f"{daemon.url}/v2/bydigest/tags/list")
    assert json.loads(resp)["tags"] == []


def test_manifest_put_by_sha512_digest(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "s512m")
    digest = "sha512:" + hashlib.sha512(body).hexdigest()
    st, _, resp = put_manifest(daemon, "s512m", digest, body)
    assert st == 201, resp
    st, _h, got = http("GET", f"{daemon.url}/v2/s512m/manifests/{digest}")
    assert st == 200 and got == body


@pytest.mark.parametrize(
    ("index_type", "child_type"), [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)]
)
def test_index_and_manifest_list(daemon: AppDaemon, index_type: str, child_type: str) -> None:
    repo = "multi"
    children = []
    for arch in ("amd64", "arm64"):
        body = image_manifest(daemon, repo, media_type=child_type)
        push_manifest(daemon, repo, sha256(body), body, child_type)
        children.append(desc(child_type, body, platform={"architecture": arch, "os": "linux"}))
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": index_type, "manifests": children}
    ).encode()
    digest = push_manifest(daemon, repo, "latest", index, index_type)
    st, h, got = http("GET", f"{daemon.url}/v2/{repo}/manifests/latest")
    assert st == 200 and got == index
    assert h["Content-Type"] == index_type and h["Docker-Content-Digest"] == digest


def test_index_with_missing_child_is_rejected(daemon: AppDaemon) -> None:
    ghost = b'{"schemaVersion":2}'
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc(OCI_MANIFEST, ghost)]}
    ).encode()
    st, _, body = put_manifest(daemon, "ghosts", "v1", index, OCI_INDEX)
    assert codes(st, body) == (404, ["MANIFEST_BLOB_UNKNOWN"])


def test_manifest_without_mediatype_uses_content_type(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "nomt")
    doc = json.loads(body)
    del doc["mediaType"]
    body = json.dumps(doc).encode()
    push_manifest(daemon, "nomt", "v1", body, OCI_MANIFEST)
    _st, h, got = http("GET", f"{daemon.url}/v2/nomt/manifests/v1")
    assert got == body and h["Content-Type"] == OCI_MANIFEST


def test_tag_moves(daemon: AppDaemon) -> None:
    one = image_manifest(daemon, "moving")
    two = image_manifest(daemon, "moving")
    push_manifest(daemon, "moving", "v1", one)
    push_manifest(daemon, "moving", "v1", two)
    _st, h, got = http("GET", f"{daemon.url}/v2/moving/manifests/v1")
    assert got == two and h["Docker-Content-Digest"] == sha256(two)
    # the old one is still there by digest
    assert http("GET", f"{daemon.url}/v2/moving/manifests/{sha256(one)}")[2] == one


def test_manifest_subject_header_and_referrers(daemon: AppDaemon) -> None:
    repo = "refs"
    subject_body = image_manifest(daemon, repo)
    subject = push_manifest(daemon, repo, "v1", subject_body)
    sbom_cfg = b"{}"
    sbom = image_manifest(
        daemon,
        repo,
        config=sbom_cfg,
        config_type=EMPTY_CONFIG,
        extra={
            "artifactType": "application/spdx+json",
            "subject": desc(OCI_MANIFEST, subject_body),
            "annotations": {"org.example.kind": "sbom"},
        },
    )
    st, h, resp = put_manifest(daemon, repo, sha256(sbom), sbom)
    assert st == 201, resp
    assert h["OCI-Subject"] == subject
    # an artifact without artifactType: the config media type stands in
    sig = image_manifest(
        daemon,
        repo,
        config_type="application/vnd.example.signature.config+json",
        extra={"subject": desc(OCI_MANIFEST, subject_body)},
    )
    st, h, _ = put_manifest(daemon, repo, sha256(sig), sig)
    assert st == 201 and h["OCI-Subject"] == subject

    st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/referrers/{subject}")
    assert st == 200
    assert h["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in h
    idx = json.loads(resp)
    assert idx["schemaVersion"] == 2 and idx["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in idx["manifests"]}
    assert set(by_digest) == {sha256(sbom), sha256(sig)}
    assert by_digest[sha256(sbom)]["artifactType"] == "application/spdx+json"
    assert by_digest[sha256(sbom)]["annotations"] == {"org.example.kind": "sbom"}
    assert by_digest[sha256(sbom)]["size"] == len(sbom)
    assert by_digest[sha256(sbom)]["mediaType"] == OCI_MANIFEST
    assert by_digest[sha256(sig)]["artifactType"] == "application/vnd.example.signature.config+json"

    st, h, resp = http(
        "GET", f"{daemon.url}/v2/{repo}/referrers/{subject}?artifactType=application/spdx%2Bjson"
    )
    assert st == 200
    assert h["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in json.loads(resp)["manifests"]] == [sha256(sbom)]

    st, h, resp = http(
        "GET", f"{daemon.url}/v2/{repo}/referrers/{subject}?artifactType=application/none"
    )
    assert st == 200 and json.loads(resp)["manifests"] == []
    assert h["OCI-Filters-Applied"] == "artifactType"


def test_referrers_unknown_subject_is_empty_index(daemon: AppDaemon) -> None:
    for repo in ("nothing-here", "refs2"):
        st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/referrers/{sha256(b'nope')}")
        assert st == 200
        assert h["Content-Type"] == OCI_INDEX
        assert json.loads(resp) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    st, _, body = http("GET", f"{daemon.url}/v2/refs2/referrers/sha256:abc")
    assert codes(st, body) == (400, ["DIGEST_INVALID"])


def test_subject_need_not_exist(daemon: AppDaemon) -> None:
    """Spec: a manifest whose subject is not (yet) in the registry is accepted."""
    ghost = b'{"schemaVersion":2,"ghost":true}'
    art = image_manifest(daemon, "ghostref", extra={"subject": desc(OCI_MANIFEST, ghost)})
    st, h, resp = put_manifest(daemon, "ghostref", sha256(art), art)
    assert st == 201, resp
    assert h["OCI-Subject"] == sha256(ghost)
    st, _, resp = http("GET", f"{daemon.url}/v2/ghostref/referrers/{sha256(ghost)}")
    assert [m["digest"] for m in json.loads(resp)["manifests"]] == [sha256(art)]


def test_manifest_referencing_missing_blob(daemon: AppDaemon) -> None:
    cfg = b'{"a":1}'
    push_blob(daemon, "missing", cfg)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, cfg),
            "layers": [desc(OCI_LAYER_GZ, b"not pushed")],
        }
    ).encode()
    st, _, resp = put_manifest(daemon, "missing", "v1", body)
    assert codes(st, resp) == (404, ["MANIFEST_BLOB_UNKNOWN"])
    st, _, resp = http("GET", f"{daemon.url}/v2/missing/manifests/v1")
    assert codes(st, resp) == (404, ["MANIFEST_UNKNOWN"])
    # a config pushed to another repository does not count
    cfg2 = b'{"b":2}'
    push_blob(daemon, "elsewhere", cfg2)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, cfg2),
            "layers": [],
        }
    ).encode()
    st, _, resp = put_manifest(daemon, "missing", "v2", body)
    assert codes(st, resp) == (404, ["MANIFEST_BLOB_UNKNOWN"])


def _valid_doc(d: AppDaemon, repo: str) -> dict[str, Any]:
    return json.loads(image_manifest(d, repo))


@pytest.mark.parametrize(
    "case",
    [
        "not json",
        "array",
        "schema1",
        "schema1-mediatype",
        "schemaversion-3",
        "schemaversion-missing",
        "mismatch",
        "unknown-mediatype",
        "no-config",
        "no-layers",
        "bad-layer-digest",
        "negative-size",
        "index-without-manifests",
        "bad-subject",
    ],
)
def test_invalid_manifests(shared: AppDaemon, case: str) -> None:
    repo = "invalid"
    doc = _valid_doc(shared, repo)
    ct = OCI_MANIFEST
    body: bytes
    if case == "not json":
        body = b"{this is not json"
    elif case == "array":
        body = b"[1,2,3]"
    else:
        if case == "schema1":
            doc = {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}
            ct = "application/vnd.docker.distribution.manifest.v1+json"
        elif case == "schema1-mediatype":
            doc = {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": [], "signatures": []}
            ct = "application/vnd.docker.distribution.manifest.v1+prettyjws"
        elif case == "schemaversion-3":
            doc["schemaVersion"] = 3
        elif case == "schemaversion-missing":
            del doc["schemaVersion"]
        elif case == "mismatch":
            ct = DOCKER_MANIFEST
        elif case == "unknown-mediatype":
            doc["mediaType"] = "application/vnd.example.unknown+json"
            ct = "application/vnd.example.unknown+json"
        elif case == "no-config":
            del doc["config"]
        elif case == "no-layers":
            del doc["layers"]
        elif case == "bad-layer-digest":
            doc["layers"][0]["digest"] = "sha256:xyz"
        elif case == "negative-size":
            doc["layers"][0]["size"] = -1
        elif case == "index-without-manifests":
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX}
            ct = OCI_INDEX
        elif case == "bad-subject":
            doc["subject"] = {"mediaType": OCI_MANIFEST}
        body = json.dumps(doc).encode()
    st, _, resp = put_manifest(shared, repo, "v1", body, ct)
    assert codes(st, resp) == (400, ["MANIFEST_INVALID"]), case
    assert http("HEAD", f"{shared.url}/v2/{repo}/manifests/v1")[0] == 404
    assert http("HEAD", f"{shared.url}/v2/{repo}/manifests/{sha256(body)}")[0] == 404


def test_manifest_digest_reference_mismatch(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "dm")
    wrong = sha256(body + b" ")
    st, _, resp = put_manifest(daemon, "dm", wrong, body)
    assert codes(st, resp) == (400, ["DIGEST_INVALID"])
    assert http("HEAD", f"{daemon.url}/v2/dm/manifests/{sha256(body)}")[0] == 404
    assert http("HEAD", f"{daemon.url}/v2/dm/manifests/{wrong}")[0] == 404


def test_manifest_too_large(daemon: AppDaemon) -> None:
    body = json.dumps({"schemaVersion": 2, "pad": "x" * (4 * 1024 * 1024 + 10)}).encode()
    # read to the end of the connection: the daemon reads the refused body out before it
    # closes, and a stop meanwhile would wait out aiohttp's 10 s for the rest of it
    answer = raw_request(
        daemon,
        b"PUT /v2/big/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Content-Type: {OCI_MANIFEST}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    head, _, resp = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert error_codes(resp) == ["MANIFEST_INVALID"]
    # the daemon is fine afterwards
    assert http("GET", f"{daemon.url}/v2/")[0] == 200


def test_manifest_unknown(daemon: AppDaemon) -> None:
    push_manifest(daemon, "known", "v1", image_manifest(daemon, "known"))
    for ref in ("nope", sha256(b"nope")):
        st, _, body = http("GET", f"{daemon.url}/v2/known/manifests/{ref}")
        assert codes(st, body) == (404, ["MANIFEST_UNKNOWN"]), ref
        assert http("HEAD", f"{daemon.url}/v2/known/manifests/{ref}")[0] == 404


def test_manifest_delete_by_digest_and_tag(daemon: AppDaemon) -> None:
    repo = "mdel"
    one = image_manifest(daemon, repo)
    two = image_manifest(daemon, repo)
    d1 = push_manifest(daemon, repo, "one", one)
    push_manifest(daemon, repo, "also-one", one)
    d2 = push_manifest(daemon, repo, "two", two)

    # by tag: only the tag goes
    st, _, _ = http("DELETE", f"{daemon.url}/v2/{repo}/manifests/two")
    assert st == 202
    assert http("GET", f"{daemon.url}/v2/{repo}/manifests/two")[0] == 404
    assert http("GET", f"{daemon.url}/v2/{repo}/manifests/{d2}")[2] == two
    assert codes(*http("DELETE", f"{daemon.url}/v2/{repo}/manifests/two")[::2]) == (
        404,
        ["MANIFEST_UNKNOWN"],
    )

    # by digest: the manifest and every tag pointing to it go
    assert http("GET", f"{daemon.url}/v2/{repo}/manifests/one")[0] == 200
    st, _, _ = http("DELETE", f"{daemon.url}/v2/{repo}/manifests/{d1}")
    assert st == 202
    for ref in (d1, "one", "also-one"):
        st, _, body = http("GET", f"{daemon.url}/v2/{repo}/manifests/{ref}")
        assert codes(st, body) == (404, ["MANIFEST_UNKNOWN"]), ref
    assert codes(*http("DELETE", f"{daemon.url}/v2/{repo}/manifests/{d1}")[::2]) == (
        404,
        ["MANIFEST_UNKNOWN"],
    )
    st, _, body = http("GET", f"{daemon.url}/v2/{repo}/tags/list")
    assert json.loads(body)["tags"] == []


# --- tags and catalog ---------------------------------------------------------------------------
def _links(h: dict[str, str]) -> str | None:
    link = h.get("Link")
    if link is None:
        return None
    m = re.match(r'^<([^>]+)>; rel="next"$', link)
    assert m, link
    return m.group(1)


def test_tags_list_and_pagination(daemon: AppDaemon) -> None:
    repo = "tagged"
    body = image_manifest(daemon, repo)
    tags = ["v1", "v10", "v2", "alpha", "Beta", "latest", "v1.0-rc_1"]
    for t in tags:
        push_manifest(daemon, repo, t, body)
    want = sorted(tags)
    st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/tags/list")
    assert st == 200
    assert json.loads(resp) == {"name": repo, "tags": want}
    assert "Link" not in h

    got: list[str] = []
    url: str | None = f"/v2/{repo}/tags/list?n=3"
    pages = 0
    while url is not None:
        st, h, resp = http("GET", daemon.url + url)
        assert st == 200
        page = json.loads(resp)["tags"]
        assert len(page) <= 3
        got += page
        url = _links(h)
        pages += 1
        assert pages < 10
    assert got == want
    assert pages == 3

    st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/tags/list?n=2&last=latest")
    assert json.loads(resp)["tags"] == want[want.index("latest") + 1 :][:2]
    st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/tags/list?last=v2")
    assert json.loads(resp)["tags"] == []
    assert "Link" not in h
    st, h, resp = http("GET", f"{daemon.url}/v2/{repo}/tags/list?n={len(tags)}")
    assert json.loads(resp)["tags"] == want
    assert "Link" not in h


def test_tags_list_n_zero(daemon: AppDaemon) -> None:
    push_manifest(daemon, "zero", "v1", image_manifest(daemon, "zero"))
    st, _h, resp = http("GET", f"{daemon.url}/v2/zero/tags/list?n=0")
    assert st == 200, resp
    assert json.loads(resp)["tags"] == []


def test_tags_list_bad_n(daemon: AppDaemon) -> None:
    push_manifest(daemon, "badn", "v1", image_manifest(daemon, "badn"))
    for n in ("-1", "abc", "1.5"):
        st, _, resp = http("GET", f"{daemon.url}/v2/badn/tags/list?n={n}")
        assert st == 400, n
        assert error_codes(resp), n


def test_tags_list_unknown_repo(daemon: AppDaemon) -> None:
    st, _, body = http("GET", f"{daemon.url}/v2/never/pushed/tags/list")
    assert codes(st, body) == (404, ["NAME_UNKNOWN"])


def test_tags_list_link_keeps_ns(daemon: AppDaemon) -> None:
    repo = "spectro-images/docker.io/library/paged"
    body = image_manifest(daemon, repo)
    for t in ("a", "b", "c"):
        push_manifest(daemon, repo, t, body)
    got: list[str] = []
    url: str | None = "/v2/library/paged/tags/list?ns=docker.io&n=1"
    while url is not None:
        st, h, resp = http("GET", daemon.url + url)
        assert st == 200, resp
        got += json.loads(resp)["tags"]
        url = _links(h)
        assert len(got) <= 3
    assert got == ["a", "b", "c"]


def test_catalog_pagination(daemon: AppDaemon) -> None:
    names = ["cat/a", "cat/b", "cat/c", "cat/d", "cat/e"]
    for n in names:
        push_manifest(daemon, n, "v1", image_manifest(daemon, n))
    # a repository with blobs only is not listed
    push_blob(daemon, "cat/blobs-only", b"x")
    want = [f"spectro-images/{n}" for n in names]
    st, h, resp = http("GET", f"{daemon.url}/v2/_catalog")
    assert st == 200 and json.loads(resp)["repositories"] == want
    assert "Link" not in h
    got: list[str] = []
    url: str | None = "/v2/_catalog?n=2"
    while url is not None:
        st, h, resp = http("GET", daemon.url + url)
        assert st == 200
        got += json.loads(resp)["repositories"]
        url = _links(h)
        assert len(got) <= len(names)
    assert got == want
    st, h, resp = http("GET", f"{daemon.url}/v2/_catalog?n=0")
    assert st == 200, resp
    assert json.loads(resp)["repositories"] == []
    st, _, resp = http("GET", f"{daemon.url}/v2/_catalog?n=x")
    assert st == 400


def test_catalog_without_n_is_one_bounded_page(
    daemon: AppDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog request without n never lists the whole store at once: past the cap it pages
    with Link, as with n (the cap is lowered here; it is 10,000 names in production)."""
    names = ["big/a", "big/b", "big/c", "big/d"]
    for n in names:
        push_manifest(daemon, n, "v1", image_manifest(daemon, n))
    monkeypatch.setattr(api, "MAX_TAGS", 3)
    st, h, resp = http("GET", f"{daemon.url}/v2/_catalog")
    assert st == 200
    assert json.loads(resp)["repositories"] == [f"spectro-images/{n}" for n in names[:3]]
    assert _links(h) == "/v2/_catalog?n=3&last=spectro-images%2Fbig%2Fc"
    st, h, resp = http("GET", f"{daemon.url}/v2/_catalog?n=50")
    assert len(json.loads(resp)["repositories"]) == 3 and _links(h) is not None


# --- names --------------------------------------------------------------------------------------
def test_three_name_forms_reach_one_repository(daemon: AppDaemon) -> None:
    canonical = "spectro-images/docker.io/library/x"
    body = image_manifest(daemon, canonical)
    digest = push_manifest(daemon, canonical, "1.0", body)
    for path in (
        "/v2/spectro-images/docker.io/library/x/manifests/1.0",
        "/v2/docker.io/x/manifests/1.0",
        "/v2/docker.io/library/x/manifests/1.0",
        "/v2/library/x/manifests/1.0?ns=docker.io",
        "/v2/x/manifests/1.0?ns=docker.io",
        "/v2/index.docker.io/library/x/manifests/1.0",
        "/v2/registry-1.docker.io/x/manifests/1.0",
        "/v2/library/x/manifests/1.0?ns=index.docker.io",
        "/v2/spectro-images/docker.io/x/manifests/1.0",
    ):
        st, h, got = http("GET", daemon.url + path)
        assert st == 200, (path, got)
        assert got == body and h["Docker-Content-Digest"] == digest, path
    st, _, resp = http("GET", f"{daemon.url}/v2/_catalog")
    assert json.loads(resp)["repositories"] == [canonical]


def test_push_through_short_form_lands_in_canonical_repo(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "ghcr.io/org/tool")
    push_manifest(daemon, "ghcr.io/org/tool", "v1", body)
    st, _, got = http("GET", f"{daemon.url}/v2/spectro-images/ghcr.io/org/tool/manifests/v1")
    assert st == 200 and got == body
    st, _, got = http("GET", f"{daemon.url}/v2/org/tool/manifests/v1?ns=ghcr.io")
    assert st == 200 and got == body
    st, _, resp = http("GET", f"{daemon.url}/v2/_catalog")
    assert json.loads(resp)["repositories"] == ["spectro-images/ghcr.io/org/tool"]


def test_local_only_name(daemon: AppDaemon) -> None:
    body = image_manifest(daemon, "spectro-images/myapp")
    push_manifest(daemon, "spectro-images/myapp", "v1", body)
    assert http("GET", f"{daemon.url}/v2/spectro-images/myapp/manifests/v1")[2] == body
    # a plain name without ns (and no default_upstream) is the same local repository
    assert http("GET", f"{daemon.url}/v2/myapp/manifests/v1")[2] == body
    _st, _, resp = http("GET", f"{daemon.url}/v2/_catalog")
    assert json.loads(resp)["repositories"] == ["spectro-images/myapp"]
    # ...and not the docker.io one
    assert http("GET", f"{daemon.url}/v2/docker.io/myapp/manifests/v1")[0] == 404


BAD_NAMES = [
    "Upper/case",
    "UPPER",
    "a/../b",
    "..",
    "a/./b",
    "a//b",
    "-lead",
    "trail-",
    "a__-b",
    "a..b",
    "x" * 256,
    "a/" + "b" * 254,
    "a%2Fb",
    "a%2fb",
    "a%2E%2E/b",
    "a%5Cb",
    "a b",
    "a:b",
    "a@b",
    "a%0A",
    "a%00b",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_names(shared: AppDaemon, name: str) -> None:
    d = sha256(b"x")
    for method, suffix in (
        ("GET", "/manifests/latest"),
        ("HEAD", f"/blobs/{d}"),
        ("GET", "/tags/list"),
        ("POST", "/blobs/uploads/"),
        ("PUT", "/manifests/latest"),
        ("GET", f"/referrers/{d}"),
    ):
        req = f"{method} /v2/{name.replace(' ', '%20')}{suffix} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        out = raw_request(shared, req.encode())
        status = int(out.split(b" ", 2)[1])
        assert status in (400, 404), (method, suffix, out[:300])
        if method != "HEAD":
            body = out.split(b"\r\n\r\n", 1)[1]
            assert json.loads(body)["errors"][0]["code"] in ("NAME_INVALID", "NOT_FOUND"), out
        assert status != 404 or name in ("..",), (method, suffix, out[:300])
    assert store_snapshot(shared)["catalog"] == []


def test_leading_slash_name(daemon: AppDaemon) -> None:
    out = raw_request(
        daemon, b"GET /v2//abs/manifests/latest HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400"), out
    assert b"NAME_INVALID" in out


def test_name_too_long_after_canonicalization(daemon: AppDaemon) -> None:
    # 250 characters is fine as a request name but too long under the project prefix
    name = "docker.io/" + "a" * 240
    st, _, body = http("GET", f"{daemon.url}/v2/{name}/manifests/latest")
    assert codes(st, body) == (400, ["NAME_INVALID"])


def test_bad_ns(daemon: AppDaemon) -> None:
    for ns in ("bad%20host", "-x.io", "a%2Fb", "x..io", "host:port"):
        st, _, body = http("GET", f"{daemon.url}/v2/library/x/manifests/latest?ns={ns}")
        assert codes(st, body) == (400, ["NAME_INVALID"]), ns


@pytest.mark.parametrize(
    "tag", ["x" * 129, "-lead", ".lead", "a+b", "a%2Fb", "%20", "tag%3Ax", "ta%00g", "v1%0A"]
)
def test_malformed_tags(shared: AppDaemon, tag: str) -> None:
    repo = "tagcheck"
    body = image_manifest(shared, repo)
    st, _, resp = put_manifest(shared, repo, tag, body)
    assert 400 <= st < 500, resp
    assert error_codes(resp)[0] in ("MANIFEST_INVALID", "TAG_INVALID", "DIGEST_INVALID"), tag
    st, _, resp = http("GET", f"{shared.url}/v2/{repo}/manifests/{tag}")
    assert 400 <= st < 500, resp
    st, _, resp = http("GET", f"{shared.url}/v2/{repo}/tags/list")
    assert json.loads(resp)["tags"] == [], tag


def test_longest_tag_is_fine(daemon: AppDaemon) -> None:
    tag = "_" + "x" * 127
    body = image_manifest(daemon, "longtag")
    push_manifest(daemon, "longtag", tag, body)
    assert http("GET", f"{daemon.url}/v2/longtag/manifests/{tag}")[2] == body


BAD_DIGESTS = [
    "sha1:" + "a" * 40,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "A" * 64,
    "sha256:" + "g" * 64,
    "sha512:" + "a" * 64,
    "sha512:" + "a" * 127,
    "sha256",
    "sha256:",
    ":" + "a" * 64,
    "SHA256:" + "a" * 64,
    "md5:" + "a" * 32,
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_malformed_digests(shared: AppDaemon, digest: str) -> None:
    u = shared.url
    checks = [
        ("GET", f"/v2/dg/blobs/{digest}", None),
        ("DELETE", f"/v2/dg/blobs/{digest}", None),
        ("POST", f"/v2/dg/blobs/uploads/?digest={digest}", b"x"),
        ("POST", f"/v2/dg/blobs/uploads/?mount={digest}&from=other", None),
        ("GET", f"/v2/dg/referrers/{digest}", None),
    ]
    if ":" in digest:  # a manifest reference without ':' is a tag
        checks.append(("GET", f"/v2/dg/manifests/{digest}", None))
        checks.append(("DELETE", f"/v2/dg/manifests/{digest}", None))
    before = store_snapshot(shared)
    for method, path, body in checks:
        st, _, resp = http(method, u + path, body)
        assert codes(st, resp) == (400, ["DIGEST_INVALID"]), (method, path)
    loc = start_upload(shared, "dg")
    st, _, resp = http("PUT", f"{u}{loc}?digest={digest}", b"x")
    assert codes(st, resp) == (400, ["DIGEST_INVALID"])
    after = store_snapshot(shared)
    assert after["blobs"] == before["blobs"] and after["catalog"] == before["catalog"]


def test_sha512_blob_and_referrers_digest_ok(daemon: AppDaemon) -> None:
    d = "sha512:" + "a" * 128
    assert codes(*http("GET", f"{daemon.url}/v2/dg/blobs/{d}")[::2]) == (404, ["BLOB_UNKNOWN"])
    assert http("GET", f"{daemon.url}/v2/dg/referrers/{d}")[0] == 200


def test_store_tree_never_escapes(daemon: AppDaemon, tmp_path: Path) -> None:
    """Nothing a request can name lands outside the store's own directories."""
    for path in (
        "/v2/..%2F..%2Fetc/blobs/uploads/",
        "/v2/a/blobs/uploads/..%2F..%2Fx",
        "/v2/a/blobs/sha256:..%2F..%2F" + "a" * 58,
    ):
        st, _, _ = http("POST" if path.endswith("/") else "GET", daemon.url + path, b"")
        assert 400 <= st < 500, path
    root = daemon.root
    allowed = {"store", "regproxy.yaml", "regproxy.log"}
    assert {p.name for p in root.iterdir()} <= allowed


# --- a few more edges ---------------------------------------------------------------------------
def test_conditional_get_by_digest_etag(daemon: AppDaemon) -> None:
    data = blob_bytes(SMALL)
    digest = push_blob(daemon, "etag", data)
    assert http("GET", f"{daemon.url}/v2/etag/blobs/{digest}")[0] == 200
    st, _, body = http(
        "GET", f"{daemon.url}/v2/etag/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'}
    )
    assert st == 304 and body == b""


def test_referrer_deleted_disappears(daemon: AppDaemon) -> None:
    repo = "refdel"
    subject_body = image_manifest(daemon, repo)
    subject = push_manifest(daemon, repo, "v1", subject_body)
    art = image_manifest(daemon, repo, extra={"subject": desc(OCI_MANIFEST, subject_body)})
    art_digest = push_manifest(daemon, repo, sha256(art), art)
    url = f"{daemon.url}/v2/{repo}/referrers/{subject}"
    assert [m["digest"] for m in json.loads(http("GET", url)[2])["manifests"]] == [art_digest]
    assert http("DELETE", f"{daemon.url}/v2/{repo}/manifests/{art_digest}")[0] == 202
    assert json.loads(http("GET", url)[2])["manifests"] == []


def test_manifest_digest_is_not_a_blob_digest(daemon: AppDaemon) -> None:
    digest = push_blob(daemon, "kinds", b'{"schemaVersion":2}')
    st, _, body = http("GET", f"{daemon.url}/v2/kinds/manifests/{digest}")
    assert codes(st, body) == (404, ["MANIFEST_UNKNOWN"])


def test_mount_from_invalid_name(daemon: AppDaemon) -> None:
    digest = push_blob(daemon, "src", b"m")
    st, _, body = http("POST", f"{daemon.url}/v2/dst/blobs/uploads/?mount={digest}&from=Bad//Name")
    assert codes(st, body) == (400, ["NAME_INVALID"])


def test_monolithic_post_length_mismatch(daemon: AppDaemon) -> None:
    before = store_snapshot(daemon)
    data = b"0123456789"
    out = raw_request(
        daemon,
        f"POST /v2/len/blobs/uploads/?digest={sha256(data)} HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 5\r\nConnection: close\r\n\r\n".encode()
        + data[:5],
    )
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert store_snapshot(daemon) == before


def test_upload_sessions_do_not_survive_a_restart(daemon: AppDaemon) -> None:
    loc = start_upload(daemon, "restart")
    http("PATCH", daemon.url + loc, b"x" * 70_000)
    digest = push_blob(daemon, "restart", b"durable")
    daemon.stop()
    daemon.start()
    assert codes(*http("GET", daemon.url + loc)[::2]) == (404, ["BLOB_UPLOAD_UNKNOWN"])
    assert list((daemon.root / "store" / "tmp").iterdir()) == []
    assert http("GET", f"{daemon.url}/v2/restart/blobs/{digest}")[2] == b"durable"
