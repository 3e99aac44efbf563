"""Signatures for tests, in the exact forms cosign and c/image (skopeo) write them.

Debian's skopeo 1.9.3 is built with sigstore disabled ("Debian-local change: sigstore disabled"
for both ``--sign-by-sigstore-private-key`` and a ``sigstoreSigned`` policy), so the signing
itself happens here, with ``cryptography``, over the payload c/image would write; skopeo then
carries the signature: ``dir:`` layouts keep sigstore signatures as ``signature-N`` files, and
``skopeo copy dir:... docker://...`` with ``use-sigstore-attachments`` writes them as the
``sha256-<hex>.sig`` manifest (its own bytes, its own layout).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ANNOTATION = "dev.cosignproject.cosign/signature"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Key:
    private: object
    public_pem: bytes

    def sign(self, message: bytes) -> bytes:
        k = self.private
        if isinstance(k, ec.EllipticCurvePrivateKey):
            return k.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(k, ed25519.Ed25519PrivateKey):
            return k.sign(message)
        assert isinstance(k, rsa.RSAPrivateKey)
        return k.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def write_public(self, path: Path) -> Path:
        path.write_bytes(self.public_pem)
        return path


def make_key(kind: str = "p256") -> Key:
    if kind == "p256":
        priv: object = ec.generate_private_key(ec.SECP256R1())
    elif kind == "p384":
        priv = ec.generate_private_key(ec.SECP384R1())
    elif kind == "ed25519":
        priv = ed25519.Ed25519PrivateKey.generate()
    elif kind == "rsa":
        priv = rsa.generate_private_key(65537, 2048)
    else:
        raise ValueError(kind)
    pub = priv.public_key()  # type: ignore[attr-defined]
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(priv, pem)


def payload(digest: str, reference: str = "example.test/team/app:v1") -> bytes:
    """A simple signing payload as c/image writes it (critical.{identity,image,type})."""
    return json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": {"creator": "regproxy tests"},
        },
        separators=(",", ":"),
    ).encode()


def sign_dir(layout: Path, key: Key, digest: str | None = None, reference: str = "x/y:v1") -> str:
    """Add a sigstore signature to a skopeo ``dir:`` layout, as c/image stores one
    (``signature-N``: ``\\x00sigstore-json\\n`` + JSON of mimeType, base64 payload, annotations).
    ``digest`` defaults to the layout's manifest (another digest makes a wrong signature)."""
    digest = digest or sha256((layout / "manifest.json").read_bytes())
    body = payload(digest, reference)
    doc = {
        "mimeType": SIMPLESIGNING,
        "payload": base64.b64encode(body).decode(),
        "annotations": {SIG_ANNOTATION: base64.b64encode(key.sign(body)).decode()},
    }
    n = 1
    while (layout / f"signature-{n}").exists():
        n += 1
    (layout / f"signature-{n}").write_bytes(b"\x00sigstore-json\n" + json.dumps(doc).encode())
    return digest


def read_dir_signatures(layout: Path) -> list[tuple[bytes, bytes]]:
    """(payload, signature) of every sigstore signature skopeo stored in a ``dir:`` layout."""
    out = []
    n = 1
    while (layout / f"signature-{n}").exists():
        raw = (layout / f"signature-{n}").read_bytes()
        n += 1
        prefix = b"\x00sigstore-json\n"
        if not raw.startswith(prefix):
            continue
        doc = json.loads(raw[len(prefix) :])
        sig = base64.b64decode(doc["annotations"][SIG_ANNOTATION])
        out.append((base64.b64decode(doc["payload"]), sig))
    return out


def simple_signature_manifest(
    digest: str, key: Key, *, payload_digest: str | None = None
) -> tuple[bytes, dict[str, bytes]]:
    """cosign's ``sha256-<hex>.sig`` manifest and its blobs (config, payload)."""
    body = payload(payload_digest or digest)
    config = json.dumps(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(body)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": SIMPLESIGNING,
                    "digest": sha256(body),
                    "size": len(body),
                    "annotations": {SIG_ANNOTATION: base64.b64encode(key.sign(body)).decode()},
                }
            ],
        }
    ).encode()
    return manifest, {sha256(config): config, sha256(body): body}


def dsse_bundle(
    digest: str, key: Key, *, predicate: str = "https://sigstore.dev/cosign/sign/v1"
) -> bytes:
    """A sigstore bundle v0.3 with a DSSE in-toto statement, as cosign v3 signs an image."""
    alg, hex_part = digest.split(":")
    statement = json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "example.test/team/app", "digest": {alg: hex_part}}],
            "predicateType": predicate,
            "predicate": {},
        }
    ).encode()
    ptype = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(statement), statement)
    return json.dumps(
        {
            "mediaType": BUNDLE,
            "verificationMaterial": {"publicKey": {"hint": ""}, "tlogEntries": []},
            "dsseEnvelope": {
                "payload": base64.b64encode(statement).decode(),
                "payloadType": ptype.decode(),
                "signatures": [{"sig": base64.b64encode(key.sign(pae)).decode(), "keyid": ""}],
            },
        }
    ).encode()


def bundle_referrer(
    subject_digest: str, subject_size: int, bundle: bytes, predicate: str | None = None
) -> tuple[bytes, dict[str, bytes]]:
    """The OCI 1.1 referrer manifest cosign v3 attaches a bundle with, and its blobs."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE,
            "config": {"mediaType": OCI_EMPTY, "digest": sha256(EMPTY_JSON), "size": 2},
            "layers": [{"mediaType": BUNDLE, "digest": sha256(bundle), "size": len(bundle)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size},
            "annotations": {
                "dev.sigstore.bundle.content": "dsse-envelope",
                **({"dev.sigstore.bundle.predicateType": predicate} if predicate else {}),
            },
        }
    ).encode()
    return manifest, {sha256(EMPTY_JSON): EMPTY_JSON, sha256(bundle): bundle}


def sbom_referrer(subject_digest: str, subject_size: int) -> tuple[bytes, dict[str, bytes]]:
    """An SPDX SBOM attached as an OCI 1.1 artifact (what oras attach writes)."""
    doc = json.dumps({"spdxVersion": "SPDX-2.3", "name": os.urandom(4).hex()}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": OCI_EMPTY, "digest": sha256(EMPTY_JSON), "size": 2},
            "layers": [
                {"mediaType": "application/spdx+json", "digest": sha256(doc), "size": len(doc)}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size},
        }
    ).encode()
    return manifest, {sha256(EMPTY_JSON): EMPTY_JSON, sha256(doc): doc}


def push_artifact(
    base_url: str,
    repo: str,
    manifest: bytes,
    blobs: dict[str, bytes],
    ref: str | None = None,
    media_type: str = OCI_MANIFEST,
) -> str:
    """Push blobs (POST then PUT, which docker-registry 2.8 needs) and a manifest over HTTP."""
    from tests.peers import http

    for digest, data in blobs.items():
        status, headers, body = http("POST", f"{base_url}/v2/{repo}/blobs/uploads/")
        assert status == 202, (status, body)
        loc = headers["Location"]
        loc = loc if loc.startswith("http") else base_url + loc
        sep = "&" if "?" in loc else "?"
        status, _, body = http(
            "PUT",
            f"{loc}{sep}digest={digest}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 201, (status, body)
    digest = sha256(manifest)
    status, _, body = http(
        "PUT",
        f"{base_url}/v2/{repo}/manifests/{ref or digest}",
        body=manifest,
        headers={"Content-Type": media_type},
    )
    assert status == 201, (status, body)
    return digest


def registries_d(path: Path, *hosts: str) -> Path:
    """A registries.d of the test's own: sigstore attachments for these hosts (skopeo reads
    and writes ``sha256-<hex>.sig`` manifests there)."""
    path.mkdir(parents=True, exist_ok=True)
    docker = {h: {"use-sigstore-attachments": True} for h in hosts}
    (path / "test.yaml").write_text(json.dumps({"docker": docker}))
    return path
