"""regproxy.cosign: both signature forms verify against each key type; everything else is a
reason, never an exception."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from regproxy.cosign import (
    KeyFileError,
    NotASignature,
    load_public_key,
    signature_layers,
    verify_bundle,
    verify_layer,
    verify_simple_signing,
)
from tests.signing import (
    SIG_ANNOTATION,
    dsse_bundle,
    make_key,
    payload,
    sha256,
    simple_signature_manifest,
)

DIGEST = sha256(b"the image manifest")
OTHER = sha256(b"another manifest")


def trusted(tmp_path: Path, *keys):
    return tuple(
        load_public_key(k.write_public(tmp_path / f"k{i}.pub")) for i, k in enumerate(keys)
    )


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa"])
def test_simple_signing_verifies_for_each_key_type(tmp_path: Path, kind: str) -> None:
    key = make_key(kind)
    keys = trusted(tmp_path, key)
    body = payload(DIGEST)
    sig = base64.b64encode(key.sign(body)).decode()
    verdict = verify_simple_signing(body, sig, DIGEST, keys)
    assert verdict.ok and verdict.key is keys[0], verdict
    assert keys[0].kind.startswith(
        {"p256": "ecdsa-p256", "p384": "ecdsa-p384", "ed25519": "ed25519", "rsa": "rsa-2048"}[kind]
    )


def test_simple_signing_refusals(tmp_path: Path) -> None:
    key, other = make_key(), make_key()
    keys = trusted(tmp_path, key)
    body = payload(DIGEST)
    good = base64.b64encode(key.sign(body)).decode()
    # another key
    assert (
        "not signed by a trusted key"
        in verify_simple_signing(
            body, base64.b64encode(other.sign(body)).decode(), DIGEST, keys
        ).reason
    )
    # a payload that names another digest, properly signed
    wrong = payload(OTHER)
    verdict = verify_simple_signing(wrong, base64.b64encode(key.sign(wrong)).decode(), DIGEST, keys)
    assert not verdict.ok and "another manifest" in verdict.reason
    # tampered payload, garbage signature, not base64
    assert not verify_simple_signing(body + b" ", good, DIGEST, keys).ok
    assert not verify_simple_signing(body, base64.b64encode(b"junk").decode(), DIGEST, keys).ok
    assert "not base64" in verify_simple_signing(body, "!!", DIGEST, keys).reason


def test_payload_key_names_are_compared_case_insensitively(tmp_path: Path) -> None:
    key = make_key()
    keys = trusted(tmp_path, key)
    body = json.dumps(
        {
            "Critical": {
                "Image": {"Docker-Manifest-Digest": DIGEST},
                "Type": "cosign container image signature",
            }
        }
    ).encode()
    assert verify_simple_signing(body, base64.b64encode(key.sign(body)).decode(), DIGEST, keys).ok


def test_dsse_bundle(tmp_path: Path) -> None:
    key, other = make_key(), make_key("ed25519")
    keys = trusted(tmp_path, key, other)
    assert verify_bundle(dsse_bundle(DIGEST, key), DIGEST, keys).ok
    assert verify_bundle(dsse_bundle(DIGEST, other), DIGEST, keys).ok
    assert "another manifest" in verify_bundle(dsse_bundle(OTHER, key), DIGEST, keys).reason
    # an attestation by the key is not a signature
    att = dsse_bundle(DIGEST, key, predicate="https://slsa.dev/provenance/v1")
    assert "attestation" in verify_bundle(att, DIGEST, keys).reason
    assert not verify_bundle(dsse_bundle(DIGEST, make_key()), DIGEST, keys).ok


def test_keyless_bundle_says_so(tmp_path: Path) -> None:
    key = make_key()
    doc = json.loads(dsse_bundle(DIGEST, make_key()))
    doc["verificationMaterial"] = {"certificate": {"rawBytes": "AAAA"}}
    verdict = verify_bundle(json.dumps(doc).encode(), DIGEST, trusted(tmp_path, key))
    assert not verdict.ok and "keyless" in verdict.reason


def test_message_signature_bundle(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    key = make_key()
    keys = trusted(tmp_path, key)
    raw = bytes.fromhex(DIGEST.split(":")[1])
    sig = key.private.sign(raw, ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # type: ignore[attr-defined]
    doc = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "x"}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": base64.b64encode(raw).decode()},
            "signature": base64.b64encode(sig).decode(),
        },
    }
    assert verify_bundle(json.dumps(doc).encode(), DIGEST, keys).ok
    assert not verify_bundle(json.dumps(doc).encode(), OTHER, keys).ok


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"[]",
        b"{",
        b'{"dsseEnvelope": 5}',
        b'{"dsseEnvelope": {"payload": 3}}',
        b"\xff" * 10,
        b"x" * (2 << 20),
    ],
)
def test_malformed_bundles_are_reasons(tmp_path: Path, blob: bytes) -> None:
    verdict = verify_bundle(blob, DIGEST, trusted(tmp_path, make_key()))
    assert not verdict.ok and verdict.reason


def test_signature_layers_of_a_sig_manifest(tmp_path: Path) -> None:
    key = make_key()
    manifest, blobs = simple_signature_manifest(DIGEST, key)
    layers = signature_layers(manifest)
    assert len(layers) == 1 and layers[0].kind == "simplesigning"
    assert verify_layer(layers[0], blobs[layers[0].digest], DIGEST, trusted(tmp_path, key)).ok


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        b"[]",
        b'{"layers": 1}',
        b'{"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:00", "size": 1}]}',
        json.dumps({"layers": [{"mediaType": "x", "digest": "d", "size": 1}] * 100}).encode(),
        b" " * (300 * 1024),
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                        "digest": "d",
                        "size": 1,
                    }
                ]
            }
        ).encode(),  # no signature annotation
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                        "digest": "d",
                        "size": 10 << 20,
                        "annotations": {SIG_ANNOTATION: "AA=="},
                    }
                ]
            }
        ).encode(),  # a "payload" far too large to read
    ],
)
def test_malformed_or_huge_signature_manifests_are_refused(manifest: bytes) -> None:
    with pytest.raises(NotASignature):
        signature_layers(manifest)


def test_key_files(tmp_path: Path) -> None:
    key = make_key("p384")
    loaded = load_public_key(key.write_public(tmp_path / "ok.pub"))
    assert loaded.kind == "ecdsa-p384" and loaded.fingerprint.startswith("sha256:")
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    for path, words in (
        (bad, "not a PEM public key"),
        (tmp_path / "missing.pub", "cannot read"),
    ):
        with pytest.raises(KeyFileError) as err:
            load_public_key(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)
    from cryptography.hazmat.primitives import serialization

    priv = tmp_path / "cosign.key"
    priv.write_bytes(
        key.private.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="private key"):
        load_public_key(priv)
