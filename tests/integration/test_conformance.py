"""The OCI distribution-spec conformance suite, translated to Python, against ``regproxy serve``.

A faithful port of opencontainers/distribution-spec ``conformance/`` (setup.go, image.go,
01_pull_test.go, 02_push_test.go, 03_discovery_test.go, 04_management_test.go): the same
requests in the same order, the same shared state between specs, the same accepted answers
(alternatives included: 404 or 405 for unsupported deletes, 201 or 202 for mounts, ...) and the
same environment switches (``OCI_DELETE_MANIFEST_BEFORE_BLOBS``, ``OCI_AUTOMATIC_CROSSMOUNT``,
``OCI_CROSSMOUNT_NAMESPACE``, ``OCI_TEST_*``, ``OCI_TAG_NAME``/``OCI_MANIFEST_DIGEST``/
``OCI_BLOB_DIGEST``, ``OCI_TAG_LIST``) and server hints (``OCI-Chunk-Min-Length``).

Each Ginkgo ``Specify`` is one pytest item, named ``<variant>::<Context>/<Context>/<title>``
after the suite, run in the suite's order against one daemon per variant. Like Ginkgo, a failed
spec does not stop the ones after it; they see whatever state it left.

Where Go and urllib differ on the wire the port does what Go does: an explicit Content-Length
header without a body (the streamed PUT) is not sent, as net/http ignores it and sends 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import string
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.images import layer_tar, sha256
from tests.peers import Daemon

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCTET = "application/octet-stream"

# the workflow categories (setup.go: pull = 1 << iota ...)
PULL, PUSH, CONTENT_DISCOVERY, CONTENT_MANAGEMENT = 1, 2, 4, 8
NUM_WORKFLOWS = 4 + 1  # numWorkflows is the fifth iota: five configs and five manifests
TEST_MAP = {
    "OCI_TEST_PULL": PULL,
    "OCI_TEST_PUSH": PUSH,
    "OCI_TEST_CONTENT_DISCOVERY": CONTENT_DISCOVERY,
    "OCI_TEST_CONTENT_MANAGEMENT": CONTENT_MANAGEMENT,
}
ERROR_CODES = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
]
TEST_TAG_NAME = "tagtest0"
EMPTY_LAYER_TEST_TAG = "emptylayer"
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
INVALID_MANIFEST_CONTENT = b"blablabla"
ARTIFACT_TYPE_FILTER = "artifactType"
TEST_ANNOTATION_KEY = "org.opencontainers.conformance.test"
REF_ARTIFACT_TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
REF_ARTIFACT_TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
REF_ARTIFACT_TYPE_INDEX = "application/vnd.food.stand"
NAMESPACE = "myorg/myrepo"  # a local-only repository (spectro-images/myorg/myrepo)


# --- Go's encoding/json for the suite's image.go types --------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def descriptor(
    media_type: str,
    content: bytes | None = None,
    *,
    digest: str | None = None,
    size: int | None = None,
    annotations: dict[str, str] | None = None,
    data: bytes | None = None,
    unspecified: bytes | None = None,
) -> dict[str, Any]:
    """image.go ``descriptor``: field order and omitempty as Go marshals it.

    ``newUnspecifiedField`` has no omitempty: a nil []byte is ``null``.
    """
    d: dict[str, Any] = {
        "mediaType": media_type,
        "digest": digest if digest is not None else sha256(content or b""),
        "size": size if size is not None else len(content or b""),
    }
    if annotations:
        d["annotations"] = annotations
    if data:
        d["data"] = _b64(data)
    d["newUnspecifiedField"] = _b64(unspecified) if unspecified is not None else None
    return d


def manifest_doc(
    config: dict[str, Any],
    layers: list[dict[str, Any]],
    *,
    media_type: str = "",
    artifact_type: str = "",
    subject: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        doc["mediaType"] = media_type
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = config
    doc["layers"] = layers
    if subject is not None:
        doc["subject"] = subject
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, indent="\t").encode()  # json.MarshalIndent(v, "", "\t")


def index_doc(
    manifests: list[dict[str, Any]],
    *,
    artifact_type: str,
    subject: dict[str, Any],
    annotations: dict[str, str],
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": artifact_type,
        "manifests": manifests,
        "subject": subject,
        "annotations": annotations,
    }
    return json.dumps(doc, indent="\t").encode()


@dataclass
class TestBlob:
    content: bytes
    content_length: str
    digest: str

    __test__ = False  # not a pytest class


def random_string(n: int) -> str:
    letters = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-"
    return "".join(secrets.choice(letters) for _ in range(n))


def random_blob(size: int, seed: int) -> tuple[str, bytes]:
    """Reproducible random bytes from a seed (Go: math/rand.New(NewSource(seed)).Read)."""
    b = random.Random(seed).randbytes(size)
    return sha256(b), b


# --- a reggie-like client ---------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    base: str

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""

    def relative_location(self) -> str:
        """reggie GetRelativeLocation: the Location's path and query."""
        u = urllib.parse.urlsplit(self.header("Location"))
        return u.path + (f"?{u.query}" if u.query else "")

    def absolute_location(self) -> str:
        loc = self.header("Location")
        return loc if urllib.parse.urlsplit(loc).scheme else self.base + loc

    def errors(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["errors"])


class Client:
    """reggie.Client: ``<name>`` is the default namespace unless a name is given."""

    def __init__(self, base: str, default_name: str) -> None:
        self.base = base
        self.default_name = default_name

    def do(
        self,
        method: str,
        path: str,
        *,
        name: str | None = None,
        reference: str | None = None,
        digest: str | None = None,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        path = path.replace("<name>", name if name is not None else self.default_name)
        if reference is not None:
            path = path.replace("<reference>", reference)
        if digest is not None:
            path = path.replace("<digest>", digest)
        if query:
            u = urllib.parse.urlsplit(path)
            q = urllib.parse.parse_qsl(u.query, keep_blank_values=True) + list(query.items())
            path = u.path + "?" + urllib.parse.urlencode(q)
        hdrs = dict(headers or {})
        if body is None:
            # net/http ignores a Content-Length header: the wire carries the real (0) length
            hdrs.pop("Content-Length", None)
        hdrs.setdefault("User-Agent", "distribution-spec-conformance-tests")
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Response(resp.status, resp.headers, resp.read(), self.base)
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.headers, exc.read(), self.base)


# --- setup.go init() -------------------------------------------------------------------------------
def _parse_bool(v: str | None) -> bool:
    """Go strconv.ParseBool, errors as false."""
    return (v or "") in {"1", "t", "T", "TRUE", "true", "True"}


@dataclass
class Suite:
    """The suite's package-level variables, set up as setup.go's init() does."""

    client: Client
    env: dict[str, str]
    seed: int = field(default_factory=lambda: random.randrange(1 << 31))
    state: dict[str, Any] = field(default_factory=dict)  # the Contexts' closure variables

    def __post_init__(self) -> None:
        env = self.env
        self.tests_to_run = 0
        for var, bit in TEST_MAP.items():
            if _parse_bool(env.get(var)):
                self.tests_to_run |= bit
        self.crossmount_namespace = (
            env.get("OCI_CROSSMOUNT_NAMESPACE") or f"conformance-{uuid.uuid4()}"
        )
        flags = variant_flags(env)
        self.run_pull_setup = flags["run_pull_setup"]
        self.run_push_setup = True
        self.run_content_discovery_setup = flags["run_content_discovery_setup"]
        self.run_content_management_setup = True
        self.delete_manifest_before_blobs = flags["delete_manifest_before_blobs"]
        self.run_automatic_crossmount_test = "OCI_AUTOMATIC_CROSSMOUNT" in env
        self.automatic_crossmount_enabled = _parse_bool(env.get("OCI_AUTOMATIC_CROSSMOUNT"))

        # a unique config per workflow category (a random author makes the digest unique)
        self.configs: list[TestBlob] = []
        for _ in range(NUM_WORKFLOWS):
            cfg = {
                "author": random_string(16),
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
            }
            content = json.dumps(cfg, indent="\t").encode()
            dig = env.get("OCI_BLOB_DIGEST") or sha256(content)
            self.configs.append(TestBlob(content, str(len(content)), dig))

        # a small gzipped tarball holding one text file
        self.layer_blob_data = layer_tar(
            {"test.txt": b"you bothered to find out what was in here. Congratulations!\n"}
        )
        self.layer_blob_digest = sha256(self.layer_blob_data)
        self.layer_blob_content_length = str(len(self.layer_blob_data))
        layers = [descriptor(OCI_LAYER_GZ, self.layer_blob_data)]

        # a unique manifest per workflow category; the config descriptor carries the config
        # as data, and a field image-spec does not know
        self.manifests: list[TestBlob] = []
        for i in range(NUM_WORKFLOWS):
            content = manifest_doc(
                self._config_descriptor(i),
                layers,
                media_type=OCI_MANIFEST,
            )
            dig = env.get("OCI_MANIFEST_DIGEST") or sha256(content)
            self.manifests.append(TestBlob(content, str(len(content)), dig))

        # used in the push test: no layers, and no mediaType either
        self.empty_layer_manifest_content = manifest_doc(self._config_descriptor(1), [])
        self.empty_layer_manifest_digest = sha256(self.empty_layer_manifest_content)

        self.test_blob_a_digest, self.test_blob_a = random_blob(42, self.seed + 1)
        self.test_blob_a_length = str(len(self.test_blob_a))
        self.setup_chunked_blob(42)

        # the referrers test: artifacts with a subject
        self.empty_json_blob = b"{}"
        self.empty_json_descriptor = descriptor(OCI_EMPTY, self.empty_json_blob)
        self.test_ref_blob_a = b"NHL Peanut Butter on my NHL bagel"
        self.test_ref_blob_a_length = str(len(self.test_ref_blob_a))
        self.test_ref_blob_a_digest = sha256(self.test_ref_blob_a)
        self.test_ref_blob_b = b"NBA Strawberry Jam on my NBA croissant"
        self.test_ref_blob_b_length = str(len(self.test_ref_blob_b))
        self.test_ref_blob_b_digest = sha256(self.test_ref_blob_b)
        self.test_annotation_values: dict[str, str] = {}

        subject4 = descriptor(OCI_MANIFEST, self.manifests[4].content)
        subject3 = descriptor(OCI_MANIFEST, self.manifests[3].content)

        def refs(
            config: dict[str, Any],
            layer: dict[str, Any],
            subject: dict[str, Any],
            note: str | None,
            artifact_type: str = "",
        ) -> tuple[bytes, str]:
            content = manifest_doc(
                config,
                [layer],
                media_type=OCI_MANIFEST,
                artifact_type=artifact_type,
                subject=subject,
                annotations={TEST_ANNOTATION_KEY: note} if note else None,
            )
            dig = sha256(content)
            if note:
                self.test_annotation_values[dig] = note
            return content, dig

        # config.mediaType = artifactType
        self.refs_a_config_content, self.refs_a_config_digest = refs(
            descriptor(REF_ARTIFACT_TYPE_A, self.test_ref_blob_a),
            self.empty_json_descriptor,
            subject4,
            "test config a",
        )
        self.refs_b_config_content, self.refs_b_config_digest = refs(
            descriptor(REF_ARTIFACT_TYPE_B, self.test_ref_blob_b),
            self.empty_json_descriptor,
            subject4,
            "test config b",
        )
        # artifactType, config.mediaType = the empty JSON
        self.refs_a_layer_content, self.refs_a_layer_digest = refs(
            self.empty_json_descriptor,
            descriptor(REF_ARTIFACT_TYPE_A, self.test_ref_blob_a),
            subject4,
            "test layer a",
            REF_ARTIFACT_TYPE_A,
        )
        self.refs_b_layer_content, self.refs_b_layer_digest = refs(
            self.empty_json_descriptor,
            descriptor(REF_ARTIFACT_TYPE_B, self.test_ref_blob_b),
            subject4,
            "test layer b",
            REF_ARTIFACT_TYPE_B,
        )
        # like B but for a subject that is never pushed, and without annotations
        self.refs_c_layer_content, self.refs_c_layer_digest = refs(
            self.empty_json_descriptor,
            descriptor(REF_ARTIFACT_TYPE_B, self.test_ref_blob_b),
            subject3,
            None,
            REF_ARTIFACT_TYPE_B,
        )
        self.refs_index_content = index_doc(
            [
                descriptor(OCI_MANIFEST, self.refs_a_config_content),
                descriptor(OCI_MANIFEST, self.refs_a_layer_content),
            ],
            artifact_type=REF_ARTIFACT_TYPE_INDEX,
            subject=subject4,
            annotations={TEST_ANNOTATION_KEY: "test index"},
        )
        self.refs_index_digest = sha256(self.refs_index_content)
        self.test_annotation_values[self.refs_index_digest] = "test index"

        self.dummy_digest = sha256(b"hello world")

    def _config_descriptor(self, i: int) -> dict[str, Any]:
        return descriptor(
            OCI_CONFIG,
            digest=self.configs[i].digest,
            size=len(self.configs[i].content),
            data=self.configs[i].content,
            unspecified=b"hello world",
        )

    def setup_chunked_blob(self, size: int) -> None:
        self.test_blob_b_digest, self.test_blob_b = random_blob(size, self.seed + 2)
        half = size // 2 + 1
        self.test_blob_b_chunk1 = self.test_blob_b[:half]
        self.test_blob_b_chunk1_length = str(len(self.test_blob_b_chunk1))
        self.test_blob_b_chunk1_range = f"0-{len(self.test_blob_b_chunk1) - 1}"
        self.test_blob_b_chunk2 = self.test_blob_b[half:]
        self.test_blob_b_chunk2_length = str(len(self.test_blob_b_chunk2))
        self.test_blob_b_chunk2_range = (
            f"{len(self.test_blob_b_chunk1)}-{len(self.test_blob_b) - 1}"
        )

    # SkipIfDisabled / RunOnlyIf / RunOnlyIfNot
    def skip_if_disabled(self, test: int) -> None:
        if not test & self.tests_to_run:
            pytest.skip("you have skipped this test (OCI_TEST_* settings)")

    @staticmethod
    def run_only_if(v: bool) -> None:
        if not v:
            pytest.skip("you have skipped this test.")

    @staticmethod
    def run_only_if_not(v: bool) -> None:
        if v:
            pytest.skip("you have skipped this test.")


def variant_flags(env: dict[str, str]) -> dict[str, bool]:
    """The setup switches that decide which specs exist (Ginkgo builds the tree from them)."""
    delete_first = True
    if "OCI_DELETE_MANIFEST_BEFORE_BLOBS" in env:
        delete_first = _parse_bool(env["OCI_DELETE_MANIFEST_BEFORE_BLOBS"])
    return {
        "run_pull_setup": not (
            env.get("OCI_TAG_NAME")
            and env.get("OCI_MANIFEST_DIGEST")
            and env.get("OCI_BLOB_DIGEST")
        ),
        "run_content_discovery_setup": not env.get("OCI_TAG_LIST"),
        "delete_manifest_before_blobs": delete_first,
        "crossmount_test": "OCI_AUTOMATIC_CROSSMOUNT" in env,
        "crossmount_enabled": _parse_bool(env.get("OCI_AUTOMATIC_CROSSMOUNT")),
    }


def tag_list(resp: Response) -> list[str]:
    """getTagList: the tags, or nothing when the body is not a tag list."""
    try:
        return list(json.loads(resp.body)["tags"] or [])
    except (ValueError, KeyError, TypeError):
        return []


def is_2xx(status: int) -> bool:
    return 200 <= status < 300


# --- the specs ----------------------------------------------------------------------------------------
SpecFn = Callable[[Suite], None]


@dataclass
class Spec:
    title: str
    fn: SpecFn
    #: whether Ginkgo's tree holds this spec for the given switches (``if deleteManifestBeforeBlobs``)
    when: Callable[[dict[str, bool]], bool] | None = None


SPECS: list[Spec] = []


def specify(
    title: str, when: Callable[[dict[str, bool]], bool] | None = None
) -> Callable[[SpecFn], SpecFn]:
    def register(fn: SpecFn) -> SpecFn:
        SPECS.append(Spec(title, fn, when))
        return fn

    return register


def _before(f: dict[str, bool]) -> bool:
    return f["delete_manifest_before_blobs"]


def _after(f: dict[str, bool]) -> bool:
    return not f["delete_manifest_before_blobs"]


def push_blob_post_put(s: Suite, dig: str, length: str, content: bytes) -> Response:
    """The setups' POST then PUT of one blob."""
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/")
    return s.client.do(
        "PUT",
        resp.relative_location(),
        query={"digest": dig},
        headers={"Content-Type": OCTET, "Content-Length": length},
        body=content,
    )


def put_manifest(s: Suite, ref: str, content: bytes, ct: str = OCI_MANIFEST) -> Response:
    return s.client.do(
        "PUT",
        "/v2/<name>/manifests/<reference>",
        reference=ref,
        headers={"Content-Type": ct},
        body=content,
    )


def delete_ok(status: int, *also: int) -> bool:
    return is_2xx(status) or status in (405, *also)


# ===== 01_pull_test.go ================================================================================
@specify("Pull/Setup/Populate registry with test blob")
def _pull_setup_blob0(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    c = s.configs[0]
    assert is_2xx(push_blob_post_put(s, c.digest, c.content_length, c.content).status)


@specify("Pull/Setup/Populate registry with test blob (config[1])")
def _pull_setup_blob1(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    c = s.configs[1]
    assert is_2xx(push_blob_post_put(s, c.digest, c.content_length, c.content).status)


@specify("Pull/Setup/Populate registry with test layer")
def _pull_setup_layer(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    resp = push_blob_post_put(
        s, s.layer_blob_digest, s.layer_blob_content_length, s.layer_blob_data
    )
    assert is_2xx(resp.status)


@specify("Pull/Setup/Populate registry with test manifest")
def _pull_setup_manifest0(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    s.state["pull.tag"] = TEST_TAG_NAME
    resp = put_manifest(s, TEST_TAG_NAME, s.manifests[0].content)
    assert is_2xx(resp.status), resp.body


@specify("Pull/Setup/Populate registry with test manifest (manifest[1] by digest)")
def _pull_setup_manifest1(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    resp = put_manifest(s, s.manifests[1].digest, s.manifests[1].content)
    assert is_2xx(resp.status), resp.body


@specify("Pull/Setup/Get tag name from environment", when=lambda f: not f["run_pull_setup"])
def _pull_tag_from_env(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if_not(s.run_pull_setup)
    if s.env.get("OCI_TAG_NAME"):
        s.state["pull.tag"] = s.env["OCI_TAG_NAME"]


@specify("Pull/Pull blobs/HEAD request to nonexistent blob should result in 404 response")
def _pull_head_missing_blob(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("HEAD", "/v2/<name>/blobs/<digest>", digest=s.dummy_digest)
    assert resp.status == 404


@specify("Pull/Pull blobs/HEAD request to existing blob should yield 200")
def _pull_head_blob(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("HEAD", "/v2/<name>/blobs/<digest>", digest=s.configs[0].digest)
    assert resp.status == 200
    if h := resp.header("Docker-Content-Digest"):
        assert h == s.configs[0].digest


@specify("Pull/Pull blobs/GET nonexistent blob should result in 404 response")
def _pull_get_missing_blob(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.dummy_digest)
    assert resp.status == 404


@specify("Pull/Pull blobs/GET request to existing blob URL should yield 200")
def _pull_get_blob(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.configs[0].digest)
    assert resp.status == 200


@specify("Pull/Pull manifests/HEAD request to nonexistent manifest should return 404")
def _pull_head_missing_manifest(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("HEAD", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
    assert resp.status == 404


def _head_or_get_manifest(s: Suite, method: str, ref: str, want_digest: str | None) -> None:
    resp = s.client.do(
        method,
        "/v2/<name>/manifests/<reference>",
        reference=ref,
        headers={"Accept": OCI_MANIFEST},
    )
    assert resp.status == 200
    if want_digest is not None and (h := resp.header("Docker-Content-Digest")):
        assert h == want_digest


@specify("Pull/Pull manifests/HEAD request to manifest[0] path (digest) should yield 200 response")
def _pull_head_manifest0(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    _head_or_get_manifest(s, "HEAD", s.manifests[0].digest, s.manifests[0].digest)


@specify("Pull/Pull manifests/HEAD request to manifest[1] path (digest) should yield 200 response")
def _pull_head_manifest1(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    _head_or_get_manifest(s, "HEAD", s.manifests[1].digest, s.manifests[1].digest)


@specify("Pull/Pull manifests/HEAD request to manifest path (tag) should yield 200 response")
def _pull_head_manifest_tag(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    tag = s.state.get("pull.tag", "")
    assert tag
    _head_or_get_manifest(s, "HEAD", tag, s.manifests[0].digest)


@specify("Pull/Pull manifests/GET nonexistent manifest should return 404")
def _pull_get_missing_manifest(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do("GET", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
    assert resp.status == 404


@specify("Pull/Pull manifests/GET request to manifest[0] path (digest) should yield 200 response")
def _pull_get_manifest0(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    _head_or_get_manifest(s, "GET", s.manifests[0].digest, None)


@specify("Pull/Pull manifests/GET request to manifest[1] path (digest) should yield 200 response")
def _pull_get_manifest1(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    _head_or_get_manifest(s, "GET", s.manifests[1].digest, None)


@specify("Pull/Pull manifests/GET request to manifest path (tag) should yield 200 response")
def _pull_get_manifest_tag(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    tag = s.state.get("pull.tag", "")
    assert tag
    _head_or_get_manifest(s, "GET", tag, None)


@specify("Pull/Error codes/400 response body should contain OCI-conforming JSON message")
def _pull_error_codes(s: Suite) -> None:
    s.skip_if_disabled(PULL)
    resp = s.client.do(
        "GET",
        "/v2/<name>/manifests/<reference>",
        reference="sha256:totallywrong",
        headers={"Content-Type": OCI_MANIFEST},
        body=INVALID_MANIFEST_CONTENT,
    )
    assert resp.status in (400, 404)
    if resp.status == 400:
        errors = resp.errors()
        assert errors
        assert errors[0]["code"] in ERROR_CODES


def _pull_delete_manifest(s: Suite, i: int) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    resp = s.client.do("DELETE", "/v2/<name>/manifests/<digest>", digest=s.manifests[i].digest)
    assert delete_ok(resp.status), resp.status


specify("Pull/Teardown/Delete manifest[0] created in setup", _before)(
    lambda s: _pull_delete_manifest(s, 0)
)
specify("Pull/Teardown/Delete manifest[1] created in setup", _before)(
    lambda s: _pull_delete_manifest(s, 1)
)


def _pull_delete_blob(s: Suite, dig: str) -> None:
    s.skip_if_disabled(PULL)
    s.run_only_if(s.run_pull_setup)
    resp = s.client.do("DELETE", "/v2/<name>/blobs/<digest>", digest=dig)
    assert delete_ok(resp.status, 404), resp.status


specify("Pull/Teardown/Delete config[0] blob created in setup")(
    lambda s: _pull_delete_blob(s, s.configs[0].digest)
)
specify("Pull/Teardown/Delete config[1] blob created in setup")(
    lambda s: _pull_delete_blob(s, s.configs[1].digest)
)
specify("Pull/Teardown/Delete layer blob created in setup")(
    lambda s: _pull_delete_blob(s, s.layer_blob_digest)
)
specify("Pull/Teardown/Delete manifest[0] created in setup (after blobs)", _after)(
    lambda s: _pull_delete_manifest(s, 0)
)
specify("Pull/Teardown/Delete manifest[1] created in setup (after blobs)", _after)(
    lambda s: _pull_delete_manifest(s, 1)
)


# ===== 02_push_test.go ================================================================================
@specify("Push/Blob Upload Streamed/PATCH request with blob in body should yield 202 response")
def _push_streamed_patch(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/")
    assert resp.header("Location")
    resp = s.client.do(
        "PATCH",
        resp.relative_location(),
        headers={"Content-Type": OCTET},
        body=s.test_blob_a,
    )
    assert resp.status == 202, resp.body
    s.state["push.last"] = resp


@specify(
    "Push/Blob Upload Streamed/PUT request to session URL with digest should yield 201 response"
)
def _push_streamed_put(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    last: Response | None = s.state.get("push.last")
    assert last is not None
    resp = s.client.do(
        "PUT",
        last.relative_location(),
        query={"digest": s.test_blob_a_digest},
        headers={"Content-Type": OCTET, "Content-Length": s.test_blob_a_length},
    )
    assert resp.status == 201, resp.body
    assert resp.header("Location")


@specify("Push/Blob Upload Monolithic/GET nonexistent blob should result in 404 response")
def _push_get_missing_blob(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.dummy_digest)
    assert resp.status == 404


@specify("Push/Blob Upload Monolithic/POST request with digest and blob should yield a 201 or 202")
def _push_monolithic_post(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    c = s.configs[1]
    resp = s.client.do(
        "POST",
        "/v2/<name>/blobs/uploads/",
        query={"digest": c.digest},
        headers={"Content-Length": c.content_length, "Content-Type": OCTET},
        body=c.content,
    )
    assert resp.header("Location")
    assert resp.status in (201, 202), resp.body
    s.state["push.last"] = resp


@specify(
    "Push/Blob Upload Monolithic/GET request to blob URL from prior request should yield 200 or "
    "404 based on response code"
)
def _push_monolithic_get(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    last: Response | None = s.state.get("push.last")
    assert last is not None
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.configs[1].digest)
    assert resp.status == (404 if last.status == 202 else 200)


@specify("Push/Blob Upload Monolithic/POST request should yield a session ID")
def _push_post_session(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/")
    assert resp.status == 202
    s.state["push.last"] = resp


@specify("Push/Blob Upload Monolithic/PUT upload of a blob should yield a 201 Response")
def _push_put_blob(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    c = s.configs[1]
    resp = s.client.do(
        "PUT",
        s.state["push.last"].relative_location(),
        query={"digest": c.digest},
        headers={"Content-Length": c.content_length, "Content-Type": OCTET},
        body=c.content,
    )
    assert resp.header("Location")
    assert resp.status == 201, resp.body


@specify("Push/Blob Upload Monolithic/GET request to existing blob should yield 200 response")
def _push_get_blob(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.configs[1].digest)
    assert resp.status == 200


@specify("Push/Blob Upload Monolithic/PUT upload of a layer blob should yield a 201 Response")
def _push_put_layer(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/")
    resp = s.client.do(
        "PUT",
        resp.relative_location(),
        query={"digest": s.layer_blob_digest},
        headers={"Content-Length": s.layer_blob_content_length, "Content-Type": OCTET},
        body=s.layer_blob_data,
    )
    assert resp.header("Location")
    assert resp.status == 201, resp.body


@specify("Push/Blob Upload Monolithic/GET request to existing layer should yield 200 response")
def _push_get_layer(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.layer_blob_digest)
    assert resp.status == 200


@specify("Push/Blob Upload Chunked/Out-of-order blob upload should return 416")
def _push_chunk_out_of_order(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
    assert resp.header("Location")
    # rebuild the chunked blob if the registry's minimum chunk is above our chunk size
    if min_size := resp.header("OCI-Chunk-Min-Length"):
        n = int(min_size)
        if n > len(s.test_blob_b_chunk1):
            s.setup_chunked_blob(n * 2 - 2)
    resp = s.client.do(
        "PATCH",
        resp.relative_location(),
        headers={
            "Content-Type": OCTET,
            "Content-Length": s.test_blob_b_chunk2_length,
            "Content-Range": s.test_blob_b_chunk2_range,
        },
        body=s.test_blob_b_chunk2,
    )
    assert resp.status == 416, resp.body


@specify("Push/Blob Upload Chunked/PATCH request with first chunk should return 202")
def _push_chunk1(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
    assert resp.header("Location")
    s.state["push.prev"] = resp
    resp = s.client.do(
        "PATCH",
        resp.relative_location(),
        headers={
            "Content-Type": OCTET,
            "Content-Length": s.test_blob_b_chunk1_length,
            "Content-Range": s.test_blob_b_chunk1_range,
        },
        body=s.test_blob_b_chunk1,
    )
    assert resp.status == 202, resp.body
    assert resp.header("Range") == s.test_blob_b_chunk1_range
    s.state["push.last"] = resp


@specify("Push/Blob Upload Chunked/Retry previous blob chunk should return 416")
def _push_chunk1_retry(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do(
        "PATCH",
        s.state["push.prev"].relative_location(),
        headers={
            "Content-Type": OCTET,
            "Content-Length": s.test_blob_b_chunk1_length,
            "Content-Range": s.test_blob_b_chunk1_range,
        },
        body=s.test_blob_b_chunk1,
    )
    assert resp.status == 416, resp.body


@specify(
    "Push/Blob Upload Chunked/Get on stale blob upload should return 204 with a range and location"
)
def _push_stale_get(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("GET", s.state["push.prev"].relative_location())
    assert resp.status == 204, resp.body
    assert resp.header("Location")
    assert resp.header("Range") == s.test_blob_b_chunk1_range
    s.state["push.last"] = resp


@specify("Push/Blob Upload Chunked/PATCH request with second chunk should return 202")
def _push_chunk2(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do(
        "PATCH",
        s.state["push.last"].relative_location(),
        headers={
            "Content-Length": s.test_blob_b_chunk2_length,
            "Content-Range": s.test_blob_b_chunk2_range,
            "Content-Type": OCTET,
        },
        body=s.test_blob_b_chunk2,
    )
    assert resp.status == 202, resp.body
    assert resp.header("Location")
    s.state["push.last"] = resp


@specify("Push/Blob Upload Chunked/PUT request with digest should return 201")
def _push_chunk_close(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do(
        "PUT",
        s.state["push.last"].relative_location(),
        query={"digest": s.test_blob_b_digest},
        headers={"Content-Length": "0", "Content-Type": OCTET},
    )
    assert resp.status == 201, resp.body
    assert resp.header("Location")


@specify(
    "Push/Cross-Repository Blob Mount/Cross-mounting of a blob without the from argument should "
    "yield session id"
)
def _push_mount_no_from(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do(
        "POST",
        "/v2/<name>/blobs/uploads/",
        name=s.crossmount_namespace,
        query={"mount": s.dummy_digest},
    )
    assert resp.status == 202, resp.body
    assert resp.absolute_location()


@specify(
    "Push/Cross-Repository Blob Mount/POST request to mount another repository's blob should "
    "return 201 or 202"
)
def _push_mount(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do(
        "POST",
        "/v2/<name>/blobs/uploads/",
        name=s.crossmount_namespace,
        query={"mount": s.test_blob_a_digest, "from": s.client.default_name},
    )
    assert resp.status in (201, 202), resp.body
    s.state["push.last"] = resp


@specify(
    "Push/Cross-Repository Blob Mount/GET request to test digest within cross-mount namespace "
    "should return 200"
)
def _push_mount_get(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    last: Response = s.state["push.last"]
    s.run_only_if(last.status == 201)
    assert last.relative_location() == (
        f"/v2/{s.crossmount_namespace}/blobs/{s.test_blob_a_digest}"
    )
    resp = s.client.do("GET", last.relative_location())
    assert resp.status == 200


@specify(
    "Push/Cross-Repository Blob Mount/Cross-mounting of nonexistent blob should yield session id"
)
def _push_mount_missing(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    last: Response = s.state["push.last"]
    if last.status != 202:
        # the suite looks at this only when the mount above was refused; regproxy mounted it,
        # so ask for what the title says: a mount of a blob nobody has opens a session
        missing = "sha256:" + hashlib.sha256(os.urandom(16)).hexdigest()
        last = s.client.do(
            "POST",
            "/v2/<name>/blobs/uploads/",
            name=s.crossmount_namespace,
            query={"mount": missing, "from": s.client.default_name},
        )
        assert last.status == 202, last.body
    assert last.relative_location().startswith(f"/v2/{s.crossmount_namespace}/blobs/uploads/")


@specify(
    "Push/Cross-Repository Blob Mount/Cross-mounting without from, and automatic content "
    "discovery enabled should return a 201",
    when=lambda f: f["crossmount_test"] and f["crossmount_enabled"],
)
def _push_automount_on(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    s.run_only_if(s.run_automatic_crossmount_test)
    s.run_only_if(s.state["push.last"].status == 201)
    s.run_only_if(s.automatic_crossmount_enabled)
    resp = s.client.do(
        "POST",
        "/v2/<name>/blobs/uploads/",
        name=s.crossmount_namespace,
        query={"mount": s.test_blob_a_digest},
    )
    assert resp.status == 201, resp.body


@specify(
    "Push/Cross-Repository Blob Mount/Cross-mounting without from, and automatic content "
    "discovery disabled should return a 202",
    when=lambda f: f["crossmount_test"] and not f["crossmount_enabled"],
)
def _push_automount_off(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    s.run_only_if(s.run_automatic_crossmount_test)
    s.run_only_if(s.state["push.last"].status == 201)
    s.run_only_if_not(s.automatic_crossmount_enabled)
    resp = s.client.do(
        "POST",
        "/v2/<name>/blobs/uploads/",
        name=s.crossmount_namespace,
        query={"mount": s.test_blob_a_digest},
    )
    assert resp.status == 202, resp.body


@specify("Push/Manifest Upload/GET nonexistent manifest should return 404")
def _push_get_missing_manifest(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = s.client.do("GET", "/v2/<name>/manifests/<reference>", reference=NONEXISTENT_MANIFEST)
    assert resp.status == 404


@specify("Push/Manifest Upload/PUT should accept a manifest upload")
def _push_manifests(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    for i in range(4):
        resp = put_manifest(s, f"test{i}", s.manifests[1].content)
        assert resp.header("Location")
        assert resp.status == 201, resp.body


@specify("Push/Manifest Upload/Registry should accept a manifest upload with no layers")
def _push_empty_layers(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    resp = put_manifest(s, EMPTY_LAYER_TEST_TAG, s.empty_layer_manifest_content)
    if resp.status == 201:
        s.state["push.empty_ref"] = resp.header("Location")
        assert resp.header("Location")
    else:
        warnings.warn("image manifest with no layers is not supported", stacklevel=1)


@specify("Push/Manifest Upload/GET request to manifest URL (digest) should yield 200 response")
def _push_get_manifest(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    _head_or_get_manifest(s, "GET", s.manifests[1].digest, None)


def _push_delete_manifests(s: Suite) -> None:
    s.skip_if_disabled(PUSH)
    s.run_only_if(s.run_push_setup)
    resp = s.client.do("DELETE", "/v2/<name>/manifests/<digest>", digest=s.manifests[1].digest)
    assert delete_ok(resp.status), resp.status
    if s.state.get("push.empty_ref"):
        resp = s.client.do(
            "DELETE",
            "/v2/<name>/manifests/<reference>",
            reference=s.empty_layer_manifest_digest,
        )
        assert delete_ok(resp.status), resp.status


def _push_delete_blob(s: Suite, dig: str) -> None:
    s.skip_if_disabled(PUSH)
    s.run_only_if(s.run_push_setup)
    resp = s.client.do("DELETE", "/v2/<name>/blobs/<digest>", digest=dig)
    assert delete_ok(resp.status, 404), resp.status


specify("Push/Teardown/Delete manifest created in tests", _before)(_push_delete_manifests)
specify("Push/Teardown/Delete config blob created in tests")(
    lambda s: _push_delete_blob(s, s.configs[1].digest)
)
specify("Push/Teardown/Delete layer blob created in setup")(
    lambda s: _push_delete_blob(s, s.layer_blob_digest)
)
specify("Push/Teardown/Delete manifest created in tests (after blobs)", _after)(
    _push_delete_manifests
)


# ===== 03_discovery_test.go ===========================================================================
NUM_TAGS = 4


@specify("Content Discovery/Setup/Populate registry with test blob")
def _disc_setup_blob(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    c = s.configs[2]
    assert is_2xx(push_blob_post_put(s, c.digest, c.content_length, c.content).status)


@specify("Content Discovery/Setup/Populate registry with test layer")
def _disc_setup_layer(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    resp = push_blob_post_put(
        s, s.layer_blob_digest, s.layer_blob_content_length, s.layer_blob_data
    )
    assert is_2xx(resp.status)


@specify("Content Discovery/Setup/Populate registry with test tags")
def _disc_setup_tags(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    tags: list[str] = []
    for i in range(NUM_TAGS):
        tag = f"test{i}"
        tags.append(tag)
        resp = put_manifest(s, tag, s.manifests[2].content)
        assert is_2xx(resp.status), resp.body
    s.state["disc.tags"] = tag_list(s.client.do("GET", "/v2/<name>/tags/list"))


@specify(
    "Content Discovery/Setup/Populate registry with test tags (no push)",
    when=lambda f: not f["run_content_discovery_setup"],
)
def _disc_setup_tags_env(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if_not(s.run_content_discovery_setup)
    s.state["disc.tags"] = s.env.get("OCI_TAG_LIST", "").split(",")


@specify("Content Discovery/Setup/References setup")
def _disc_refs_setup(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    subject4, subject3 = s.manifests[4].digest, s.manifests[3].digest

    # the empty JSON blob, whose digest is well known
    assert s.empty_json_descriptor["digest"] == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    resp = push_blob_post_put(
        s, sha256(s.empty_json_blob), str(len(s.empty_json_blob)), s.empty_json_blob
    )
    assert is_2xx(resp.status)
    # a reference blob before the image manifest is pushed
    resp = push_blob_post_put(
        s, s.test_ref_blob_a_digest, s.test_ref_blob_a_length, s.test_ref_blob_a
    )
    assert is_2xx(resp.status)
    # referrers pushed before their subject (config.mediaType = artifactType, then artifactType)
    for dig, content in (
        (s.refs_a_config_digest, s.refs_a_config_content),
        (s.refs_a_layer_digest, s.refs_a_layer_content),
    ):
        resp = put_manifest(s, dig, content)
        assert is_2xx(resp.status), resp.body
        assert resp.header("OCI-Subject") == subject4
    # an index with a subject
    resp = put_manifest(s, s.refs_index_digest, s.refs_index_content, OCI_INDEX)
    assert is_2xx(resp.status), resp.body
    assert resp.header("OCI-Subject") == subject4
    # the subject image itself: config, layer, manifest
    c = s.configs[4]
    assert is_2xx(push_blob_post_put(s, c.digest, c.content_length, c.content).status)
    resp = push_blob_post_put(
        s, s.layer_blob_digest, s.layer_blob_content_length, s.layer_blob_data
    )
    assert is_2xx(resp.status)
    resp = put_manifest(s, TEST_TAG_NAME, s.manifests[4].content)
    assert is_2xx(resp.status), resp.body
    # a reference blob after the image manifest is pushed, and referrers after their subject
    resp = push_blob_post_put(
        s, s.test_ref_blob_b_digest, s.test_ref_blob_b_length, s.test_ref_blob_b
    )
    assert is_2xx(resp.status)
    for dig, content in (
        (s.refs_b_config_digest, s.refs_b_config_content),
        (s.refs_b_layer_digest, s.refs_b_layer_content),
    ):
        resp = put_manifest(s, dig, content)
        assert is_2xx(resp.status), resp.body
        assert resp.header("OCI-Subject") == subject4
    # a referrer whose subject does not exist
    resp = put_manifest(s, s.refs_c_layer_digest, s.refs_c_layer_content)
    assert is_2xx(resp.status), resp.body
    assert resp.header("OCI-Subject") == subject3


@specify(
    "Content Discovery/Test content discovery endpoints (listing tags)/GET request to list tags "
    "should yield 200 response"
)
def _disc_list_tags(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    resp = s.client.do("GET", "/v2/<name>/tags/list")
    assert resp.status == 200
    s.state["disc.tags"] = tag_list(resp)
    s.state["disc.num_tags"] = len(s.state["disc.tags"])


@specify(
    "Content Discovery/Test content discovery endpoints (listing tags)/GET number of tags should "
    "be limitable by `n` query parameter"
)
def _disc_list_tags_n(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    num_results = s.state.get("disc.num_tags", NUM_TAGS) // 2
    resp = s.client.do("GET", "/v2/<name>/tags/list", query={"n": str(num_results)})
    assert resp.status == 200
    s.state["disc.tags"] = tag_list(resp)
    assert len(s.state["disc.tags"]) == num_results


@specify(
    "Content Discovery/Test content discovery endpoints (listing tags)/GET start of tag is set "
    "by `last` query parameter"
)
def _disc_list_tags_last(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    num_results = s.state.get("disc.num_tags", NUM_TAGS) // 2
    resp = s.client.do("GET", "/v2/<name>/tags/list", query={"n": str(num_results)})
    tags = tag_list(resp)
    s.state["disc.tags"] = tags
    resp = s.client.do(
        "GET",
        "/v2/<name>/tags/list",
        query={"n": str(num_results), "last": tags[num_results - 1]},
    )
    assert resp.status == 200
    # as in the suite: the list checked is the first page's (the second page is not parsed)
    assert len(tags) <= num_results
    assert tags[num_results - 1] in tags


def _referrers_index(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, resp.body
    assert resp.header("Content-Type") == OCI_INDEX
    return dict(json.loads(resp.body))


def _check_annotations(s: Suite, manifests: list[dict[str, Any]]) -> None:
    for m in manifests:
        annotations = m.get("annotations") or {}
        assert len(annotations) == 1, m
        assert annotations[TEST_ANNOTATION_KEY] == s.test_annotation_values.get(m["digest"], "")


@specify(
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to "
    "nonexistent blob should result in empty 200 response"
)
def _disc_referrers_missing(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    resp = s.client.do("GET", "/v2/<name>/referrers/<digest>", digest=s.dummy_digest)
    index = _referrers_index(resp)
    assert len(index.get("manifests") or []) == 0


@specify(
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to "
    "existing blob should yield 200"
)
def _disc_referrers(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    resp = s.client.do("GET", "/v2/<name>/referrers/<digest>", digest=s.manifests[4].digest)
    manifests = _referrers_index(resp).get("manifests") or []
    assert len(manifests) == 5, manifests
    assert manifests[0]["digest"] != manifests[1]["digest"]
    _check_annotations(s, manifests)


@specify(
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to "
    "existing blob with filter should yield 200"
)
def _disc_referrers_filter(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    resp = s.client.do(
        "GET",
        "/v2/<name>/referrers/<digest>",
        digest=s.manifests[4].digest,
        query={"artifactType": REF_ARTIFACT_TYPE_A},
    )
    manifests = _referrers_index(resp).get("manifests") or []
    if resp.header("OCI-Filters-Applied"):
        assert len(manifests) == 2, manifests
        assert resp.header("OCI-Filters-Applied") == ARTIFACT_TYPE_FILTER
    else:
        assert len(manifests) == 5, manifests
        warnings.warn("filtering by artifact-type is not implemented", stacklevel=1)
    _check_annotations(s, manifests)


@specify(
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to "
    "missing manifest should yield 200"
)
def _disc_referrers_missing_subject(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    resp = s.client.do("GET", "/v2/<name>/referrers/<digest>", digest=s.manifests[3].digest)
    manifests = _referrers_index(resp).get("manifests") or []
    assert len(manifests) == 1, manifests
    assert manifests[0]["digest"] == s.refs_c_layer_digest


def _disc_delete_manifests(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    for ref in (
        s.refs_index_digest,
        s.manifests[2].digest,
        s.manifests[4].digest,
        s.refs_a_config_digest,
        s.refs_a_layer_digest,
        TEST_TAG_NAME,
        s.refs_b_config_digest,
        s.refs_b_layer_digest,
        s.refs_c_layer_digest,
    ):
        resp = s.client.do("DELETE", "/v2/<name>/manifests/<digest>", digest=ref)
        assert delete_ok(resp.status, 404), (ref, resp.status, resp.body)


def _disc_delete_blob(s: Suite, dig: str) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)
    resp = s.client.do("DELETE", "/v2/<name>/blobs/<digest>", digest=dig)
    assert delete_ok(resp.status), resp.status


specify("Content Discovery/Teardown/Delete created manifest & associated tags", _before)(
    _disc_delete_manifests
)
specify("Content Discovery/Teardown/Delete config blob created in tests")(
    lambda s: _disc_delete_blob(s, s.configs[2].digest)
)
specify("Content Discovery/Teardown/Delete layer blob created in setup")(
    lambda s: _disc_delete_blob(s, s.layer_blob_digest)
)
specify(
    "Content Discovery/Teardown/Delete created manifest & associated tags (after blobs)", _after
)(_disc_delete_manifests)


@specify("Content Discovery/Teardown/References teardown")
def _disc_refs_teardown(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_DISCOVERY)
    s.run_only_if(s.run_content_discovery_setup)

    def delete(kind: str, ref: str) -> None:
        resp = s.client.do("DELETE", f"/v2/<name>/{kind}/{ref}")
        assert delete_ok(resp.status, 404), (kind, ref, resp.status, resp.body)

    manifests = (
        s.refs_index_digest,
        s.refs_a_config_digest,
        s.refs_a_layer_digest,
        s.manifests[4].digest,
        s.refs_b_config_digest,
        s.refs_b_layer_digest,
    )
    if s.delete_manifest_before_blobs:
        for ref in manifests:
            delete("manifests", ref)
    for dig in (
        s.configs[4].digest,
        s.test_ref_blob_a_digest,
        s.test_ref_blob_b_digest,
        s.empty_json_descriptor["digest"],
    ):
        delete("blobs", dig)
    if not s.delete_manifest_before_blobs:
        for ref in manifests:
            delete("manifests", ref)


# ===== 04_management_test.go ==========================================================================
DEFAULT_TAG_NAME = "tagtest0"


@specify("Content Management/Setup/Populate registry with test config blob")
def _mgmt_setup_blob(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    c = s.configs[3]
    assert is_2xx(push_blob_post_put(s, c.digest, c.content_length, c.content).status)


@specify("Content Management/Setup/Populate registry with test layer")
def _mgmt_setup_layer(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    resp = push_blob_post_put(
        s, s.layer_blob_digest, s.layer_blob_content_length, s.layer_blob_data
    )
    assert is_2xx(resp.status)


@specify("Content Management/Setup/Populate registry with test tag")
def _mgmt_setup_tag(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    s.state["mgmt.tag"] = DEFAULT_TAG_NAME
    resp = put_manifest(s, DEFAULT_TAG_NAME, s.manifests[3].content)
    assert is_2xx(resp.status), resp.body


@specify("Content Management/Setup/Check how many tags there are before anything gets deleted")
def _mgmt_count_tags(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    resp = s.client.do("GET", "/v2/<name>/tags/list")
    assert resp.status == 200
    s.state["mgmt.num_tags"] = len(json.loads(resp.body)["tags"] or [])


@specify(
    "Content Management/Manifest delete/DELETE request to manifest tag should return 202, unless "
    "tag deletion is disallowed (400/405)"
)
def _mgmt_delete_tag(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    resp = s.client.do(
        "DELETE", "/v2/<name>/manifests/<reference>", reference=s.state.get("mgmt.tag", "")
    )
    assert resp.status in (400, 202, 405), resp.body
    if resp.status == 400:
        errors = resp.errors()
        assert errors
        assert errors[0]["code"] == "UNSUPPORTED"


@specify(
    "Content Management/Manifest delete/DELETE request to manifest (digest) should yield 202 "
    "response unless already deleted"
)
def _mgmt_delete_manifest(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    resp = s.client.do("DELETE", "/v2/<name>/manifests/<digest>", digest=s.manifests[3].digest)
    assert resp.status in (202, 404), resp.body


@specify(
    "Content Management/Manifest delete/GET request to deleted manifest URL should yield 404 "
    "response, unless delete is disallowed"
)
def _mgmt_get_deleted_manifest(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    resp = s.client.do("GET", "/v2/<name>/manifests/<digest>", digest=s.manifests[3].digest)
    assert resp.status in (404, 200)


@specify(
    "Content Management/Manifest delete/GET request to tags list should reflect manifest deletion"
)
def _mgmt_tags_after_delete(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    resp = s.client.do("GET", "/v2/<name>/tags/list")
    assert resp.status == 200
    assert len(json.loads(resp.body)["tags"] or []) < s.state.get("mgmt.num_tags", 0)


@specify("Content Management/Blob delete/DELETE request to blob URL should yield 202 response")
def _mgmt_delete_blobs(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    s.state["mgmt.blob_delete_allowed"] = True
    resp = s.client.do("DELETE", "/v2/<name>/blobs/<digest>", digest=s.configs[3].digest)
    assert resp.status in (202, 404, 405), resp.body
    resp = s.client.do("DELETE", "/v2/<name>/blobs/<digest>", digest=s.layer_blob_digest)
    assert resp.status in (202, 404, 405), resp.body
    if resp.status == 405:
        s.state["mgmt.blob_delete_allowed"] = False


@specify("Content Management/Blob delete/GET request to deleted blob URL should yield 404 response")
def _mgmt_get_deleted_blob(s: Suite) -> None:
    s.skip_if_disabled(CONTENT_MANAGEMENT)
    s.run_only_if(s.run_content_management_setup)
    s.run_only_if(s.state.get("mgmt.blob_delete_allowed", True))
    resp = s.client.do("GET", "/v2/<name>/blobs/<digest>", digest=s.configs[3].digest)
    assert resp.status == 404


# --- running it -------------------------------------------------------------------------------------
ALL_WORKFLOWS = {var: "1" for var in TEST_MAP}


@dataclass(frozen=True)
class Variant:
    id: str
    env: dict[str, str]
    #: spec title -> reason, for checks whose switch describes a registry regproxy is not
    xfail: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("default", {**ALL_WORKFLOWS}),
    Variant(
        "manifests-last+automount",
        {**ALL_WORKFLOWS, "OCI_DELETE_MANIFEST_BEFORE_BLOBS": "0", "OCI_AUTOMATIC_CROSSMOUNT": "1"},
    ),
]


def _params() -> list[Any]:
    out = []
    for v in VARIANTS:
        flags = variant_flags(v.env)
        for sp in SPECS:
            if sp.when is not None and not sp.when(flags):
                continue
            marks = []
            if sp.title in v.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=v.xfail[sp.title]))
            out.append(pytest.param(v, sp, id=f"{v.id}::{sp.title}", marks=marks))
    return out


@pytest.fixture(scope="module")
def suites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Variant], Suite]]:
    """One daemon and one suite state per variant, made when its first spec runs."""
    made: dict[str, tuple[Daemon, Suite]] = {}

    def get(v: Variant) -> Suite:
        if v.id not in made:
            for d, _ in made.values():  # one daemon at a time
                d.stop()
            root: Path = tmp_path_factory.mktemp(f"conformance-{v.id}")
            d = Daemon(root, {}).start()
            made[v.id] = (d, Suite(Client(d.url, NAMESPACE), dict(v.env)))
        return made[v.id][1]

    try:
        yield get
    finally:
        for d, _ in made.values():
            d.stop()


@pytest.mark.process  # a daemon per variant (``suites``)
@pytest.mark.parametrize(("variant", "spec"), _params())
def test_conformance(suites: Callable[[Variant], Suite], variant: Variant, spec: Spec) -> None:
    spec.fn(suites(variant))


def test_port_shape() -> None:
    """Every spec title is unique, and all four workflows are there."""
    titles = [sp.title for sp in SPECS]
    assert len(titles) == len(set(titles))
    for prefix in ("Pull/", "Push/", "Content Discovery/", "Content Management/"):
        assert any(t.startswith(prefix) for t in titles)
