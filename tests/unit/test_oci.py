"""regproxy.oci: digests, the name and tag grammar, manifest parsing. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from regproxy.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid
from regproxy.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_MANIFEST_BYTES,
    OCI_EMPTY_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    accepts,
    is_digest_reference,
    parse_manifest,
    validate_name,
    validate_tag,
)

HEX64 = "a" * 64
HEX128 = "0123456789abcdef" * 8


# --- digests ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "alg", "hex_"),
    [(f"sha256:{HEX64}", "sha256", HEX64), (f"sha512:{HEX128}", "sha512", HEX128)],
)
def test_digest_parse_good(text: str, alg: str, hex_: str) -> None:
    d = Digest.parse(text)
    assert (d.algorithm, d.hex) == (alg, hex_)
    assert str(d) == text
    assert Digest.parse(str(d)) == d


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        f":{HEX64}",
        f"sha1:{'a' * 40}",
        f"md5:{'a' * 32}",
        f"sha256:{'a' * 63}",
        f"sha256:{'a' * 65}",
        f"sha256:{'A' * 64}",
        f"sha256:{'g' * 64}",
        f"SHA256:{HEX64}",
        f"sha512:{HEX64}",
        f"sha512:{HEX128[:-1]}",
        f"sha512:{HEX128.upper()}",
        f"sha256:{'a' * 32}/../{'a' * 29}",
        f"sha256 :{HEX64}",
        f"sha256:{HEX64}\n",
        f"sha256:{HEX64}:x",
    ],
)
def test_digest_parse_bad(text: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        Digest.parse(text)
    assert info.value.code == "DIGEST_INVALID" and info.value.http_status == 400


def test_digest_of_and_hasher() -> None:
    data = b"hello"
    assert str(Digest.of(data)) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert str(Digest.of(data, "sha512")) == "sha512:" + hashlib.sha512(data).hexdigest()
    h = Digest.parse(f"sha512:{HEX128}").hasher()
    h.update(data)
    assert h.hexdigest() == hashlib.sha512(data).hexdigest()


def test_digest_is_hashable_and_ordered() -> None:
    a, b = Digest.parse(f"sha256:{HEX64}"), Digest.parse(f"sha256:{'b' * 64}")
    assert len({a, b, Digest.parse(str(a))}) == 2
    assert sorted([b, a]) == [a, b]


def test_is_digest_reference() -> None:
    assert is_digest_reference(f"sha256:{HEX64}")
    assert not is_digest_reference("latest")


# --- names and tags -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "a",
        "library/nginx",
        "a.b/c_d/e__f/g-h/i--j",
        "0/1/2",
        "spectro-images/docker.io/x",
        "a" * 255,
    ],
)
def test_validate_name_good(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "a/B",
        "/a",
        "a/",
        "a//b",
        "..",
        "a/../b",
        "a/./b",
        ".a",
        "a.",
        "-a",
        "a-",
        "a___b",
        "a..b",
        "a b",
        "a:1",
        "a@b",
        "a\\b",
        "a%2fb",
        "a\n",
        "a/b\n",
        "a" * 256,
    ],
)
def test_validate_name_bad(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        validate_name(name)
    assert info.value.code == "NAME_INVALID" and info.value.http_status == 400


@pytest.mark.parametrize("tag", ["latest", "v1.0", "1", "_x", "A-b.c_d", "x" * 128])
def test_validate_tag_good(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", "x" * 129, "-x", ".x", "a/b", "a:b", "a+b", "a b", "a@b", "é", "a\n"]
)
def test_validate_tag_bad(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        validate_tag(tag)
    assert info.value.http_status == 400


# --- manifests ----------------------------------------------------------------------------------
def _d(n: int, mt: str = "application/vnd.oci.image.layer.v1.tar+gzip") -> dict[str, Any]:
    return {"mediaType": mt, "digest": "sha256:" + f"{n:x}" * 64, "size": 10 + n}


def _manifest(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _d(1, "application/vnd.oci.image.config.v1+json"),
        "layers": [_d(2), _d(3)],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def _b(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_parse_oci_manifest() -> None:
    pm = parse_manifest(_b(_manifest()), OCI_MANIFEST)
    assert pm.media_type == OCI_MANIFEST
    assert not pm.is_index
    assert [str(b.digest) for b in pm.blobs] == [
        "sha256:" + "1" * 64,
        "sha256:" + "2" * 64,
        "sha256:" + "3" * 64,
    ]
    assert pm.blobs[0].size == 11
    assert pm.subject is None
    # artifactType falls back to config.mediaType (spec: listing referrers)
    assert pm.artifact_type == "application/vnd.oci.image.config.v1+json"


def test_parse_artifact_type_and_subject() -> None:
    doc = _manifest(
        artifactType="application/spdx+json",
        config=_d(1, OCI_EMPTY_CONFIG),
        subject=_d(9, OCI_MANIFEST),
        annotations={"k": "v"},
    )
    pm = parse_manifest(_b(doc), OCI_MANIFEST)
    assert pm.artifact_type == "application/spdx+json"
    assert pm.subject is not None and str(pm.subject.digest) == "sha256:" + "9" * 64
    assert pm.annotations == {"k": "v"}


def test_parse_empty_config_without_artifact_type() -> None:
    pm = parse_manifest(_b(_manifest(config=_d(1, OCI_EMPTY_CONFIG))), OCI_MANIFEST)
    assert pm.artifact_type is None


def test_parse_docker_manifest() -> None:
    doc = _manifest(mediaType=DOCKER_MANIFEST)
    assert parse_manifest(_b(doc), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST


@pytest.mark.parametrize("mt", [OCI_INDEX, DOCKER_LIST])
def test_parse_index(mt: str) -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": [
            {**_d(4, OCI_MANIFEST), "platform": {"architecture": "amd64", "os": "linux"}},
            _d(5, OCI_MANIFEST),
        ],
    }
    pm = parse_manifest(_b(doc), mt)
    assert pm.is_index and pm.media_type == mt
    assert pm.blobs == ()
    assert [m.platform for m in pm.manifests] == [{"architecture": "amd64", "os": "linux"}, None]


def test_parse_media_type_from_header_or_shape() -> None:
    doc = _manifest(mediaType=None)
    assert parse_manifest(_b(doc), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    assert parse_manifest(_b(doc), f"{OCI_MANIFEST}; charset=utf-8").media_type == OCI_MANIFEST
    assert parse_manifest(_b(doc), None).media_type == OCI_MANIFEST
    index = {"schemaVersion": 2, "manifests": []}
    assert parse_manifest(_b(index), None).media_type == OCI_INDEX
    # a generic Content-Type does not contradict the body
    assert parse_manifest(_b(_manifest()), "application/json").media_type == OCI_MANIFEST


@pytest.mark.parametrize(
    ("body", "ct"),
    [
        (b"", OCI_MANIFEST),
        (b"{", OCI_MANIFEST),
        (b"\xff\xfe", OCI_MANIFEST),
        (b"[]", OCI_MANIFEST),
        (b'"x"', OCI_MANIFEST),
        (_b(_manifest(schemaVersion=1)), OCI_MANIFEST),
        (_b({"schemaVersion": 1, "fsLayers": []}), None),
        (
            _b(_manifest(mediaType=None)),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        (_b(_manifest(schemaVersion=3)), OCI_MANIFEST),
        (_b(_manifest(schemaVersion="2")), OCI_MANIFEST),
        (_b(_manifest(schemaVersion=None)), OCI_MANIFEST),
        (_b(_manifest()), DOCKER_MANIFEST),  # body says OCI, header says Docker
        (_b(_manifest(mediaType=OCI_INDEX)), OCI_MANIFEST),
        (_b(_manifest(mediaType=5)), OCI_MANIFEST),
        (_b(_manifest(mediaType="application/x-unknown")), None),
        (_b(_manifest(config=None)), OCI_MANIFEST),
        (_b(_manifest(layers=None)), OCI_MANIFEST),
        (_b(_manifest(layers={"a": 1})), OCI_MANIFEST),
        (_b(_manifest(layers=["x"])), OCI_MANIFEST),
        (_b(_manifest(layers=[{**_d(2), "digest": "sha256:bad"}])), OCI_MANIFEST),
        (_b(_manifest(layers=[{**_d(2), "size": -1}])), OCI_MANIFEST),
        (_b(_manifest(layers=[{**_d(2), "size": "10"}])), OCI_MANIFEST),
        (_b(_manifest(layers=[{**_d(2), "size": True}])), OCI_MANIFEST),
        (_b(_manifest(layers=[{"digest": _d(2)["digest"], "size": 1}])), OCI_MANIFEST),
        (_b(_manifest(subject={"mediaType": OCI_MANIFEST})), OCI_MANIFEST),
        (_b(_manifest(subject="sha256:" + HEX64)), OCI_MANIFEST),
        (_b({"schemaVersion": 2, "mediaType": OCI_INDEX}), OCI_INDEX),
        (_b({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}), OCI_INDEX),
        (_b({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [1]}), OCI_INDEX),
    ],
)
def test_parse_manifest_invalid(body: bytes, ct: str | None) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(body, ct)
    assert info.value.code == "MANIFEST_INVALID" and info.value.http_status == 400


def test_parse_manifest_too_large() -> None:
    doc = _manifest(annotations={"pad": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(ManifestInvalid):
        parse_manifest(_b(doc), OCI_MANIFEST)


def test_accepts() -> None:
    assert accepts(None, OCI_MANIFEST)
    assert accepts("", OCI_MANIFEST)
    assert accepts(f"{OCI_INDEX}, {OCI_MANIFEST};q=0.5", OCI_MANIFEST)
    assert accepts("*/*", DOCKER_LIST)
    assert accepts("application/*", DOCKER_LIST)
    assert not accepts(OCI_INDEX, OCI_MANIFEST)


# --- JSON from outside ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "why"),
    [
        # an unterminated string of escaped quotes: the string pattern tried from every quote to
        # the end was quadratic (48 KB held the event loop for 18 s; 1 MiB, for hours)
        (b'{"a": "' + b'\\"' * 500_000, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64"),  # json.loads: RecursionError
        (b"[" * 65 + b"]" * 65, "nested deeper than 64"),
        ('"é"'.encode("utf-16"), "not valid JSON"),  # UTF-8 only
        (b"\xff", "not valid JSON"),
    ],
    ids=["escaped-quotes", "100000-deep", "65-deep", "utf-16", "not-utf-8"],
)
def test_json_from_outside_is_refused_cleanly(body: bytes, why: str) -> None:
    from regproxy.oci import JSONInvalid, load_json

    with pytest.raises(JSONInvalid, match=why):
        load_json(body)


def test_json_from_outside_is_read_as_json_reads_it() -> None:
    from regproxy.oci import json_depth, load_json

    text = b'{"a": "[[{{\\" ]", "b": [[{"c": [1]}]], "d": "\\\\"}'
    assert load_json(text) == json.loads(text)
    assert json_depth(text) == 5
    assert load_json(b"\xef\xbb\xbf[1]") == [1]  # a BOM, as json.loads takes it
    assert load_json(b"[" * 64 + b"]" * 64) is not None
    escaped = b'"' + b'\\"' * 500_000 + b'"'  # valid: one long string of quotes
    assert load_json(escaped) == '"' * 500_000


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b'["]"]', 1),
        (b'["\\"]", ["[["]]', 2),
        (b'{"a\\\\": [{"\\u005b": "\\\\\\"{{"}]}', 3),
        (b'[["\\\\"], "\\\\\\\\", [[["]]]]"]]]]', 4),
        (b'"[[["', 0),
    ],
)
def test_json_depth_skips_brackets_inside_strings(text: bytes, depth: int) -> None:
    from regproxy.oci import json_depth

    json.loads(text)  # each is valid JSON
    assert json_depth(text) == depth


async def test_a_large_manifest_is_parsed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 4 MiB manifest takes a fraction of a second of Python to parse: on a worker thread,
    so the loop serves other requests meanwhile; a small one is parsed in place."""
    import threading

    from regproxy import oci

    threads: list[int] = []
    real = oci.parse_manifest

    def parse(body: bytes, ct: str | None) -> oci.ParsedManifest:
        threads.append(threading.get_ident())
        return real(body, ct)

    monkeypatch.setattr(oci, "parse_manifest", parse)
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 1}
    layers = [
        {**layer, "digest": "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()} for i in range(20)
    ]
    small = json.dumps({"schemaVersion": 2, "config": layers[0], "layers": layers}).encode()
    big_layers = layers * (2 * oci.PARSE_INLINE_MAX // len(small) + 1) * 20
    big = json.dumps({"schemaVersion": 2, "config": layers[0], "layers": big_layers}).encode()
    assert len(small) <= oci.PARSE_INLINE_MAX < len(big)
    got_small = await oci.parse_manifest_async(small, OCI_MANIFEST)
    got_big = await oci.parse_manifest_async(big, OCI_MANIFEST)
    assert threads[0] == threading.get_ident()  # in place
    assert threads[1] != threading.get_ident()  # on a worker
    assert got_small == real(small, OCI_MANIFEST) and got_big == real(big, OCI_MANIFEST)
    assert len(got_big.blobs) == len(big_layers) + 1
