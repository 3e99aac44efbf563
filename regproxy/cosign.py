"""Signature verification, pure: cosign's two signature forms, checked against PEM public keys.

No I/O beyond reading key files in :func:`load_public_key`, and no internal imports: the caller
finds the signature manifests and reads their layers; this module only decides. Every
cryptographic operation is the ``cryptography`` library's (we write no crypto of our own).

The two forms in the wild (both verify here):

1. **cosign's legacy signature**: the tag ``sha256-<hex>.sig`` (or an OCI 1.1 referrer) holds a
   manifest whose layers are ``application/vnd.dev.cosign.simplesigning.v1+json`` blobs, each a
   JSON *simple signing* payload whose ``critical.image.docker-manifest-digest`` names the signed
   manifest; the layer's ``dev.cosignproject.cosign/signature`` annotation is the base64 signature
   over the blob's exact bytes. cosign, skopeo (``use-sigstore-attachments``) and c/image write it.
   https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md
2. **a sigstore bundle** (``application/vnd.dev.sigstore.bundle.v0.3+json``), cosign v3's default,
   attached as an OCI 1.1 referrer (``subject`` = the image): either a DSSE envelope around an
   in-toto statement (predicate ``https://sigstore.dev/cosign/sign/v1``, subject digest = the
   image), signed over the DSSE pre-authentication encoding, or a ``messageSignature`` whose
   ``messageDigest`` is the image digest.
   https://github.com/sigstore/cosign/blob/main/specs/BUNDLE_SPEC.md

Keyless signatures (a Fulcio certificate, Rekor inclusion) are out of scope: only the keys the
config names are trusted, and transparency-log entries in a bundle are not consulted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

SIMPLESIGNING: Final = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION: Final = "dev.cosignproject.cosign/signature"
BUNDLE_PREFIX: Final = "application/vnd.dev.sigstore.bundle"
BUNDLE_V03: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
DSSE_INTOTO: Final = "application/vnd.in-toto+json"
SIGN_PREDICATE: Final = "https://sigstore.dev/cosign/sign/v1"
SIMPLE_SIGNING_TYPES: Final = frozenset({"cosign container image signature", SIGN_PREDICATE})
#: a key file, a payload or a bundle larger than this is not one (they are a few KiB)
MAX_KEY_BYTES: Final = 64 * 1024
MAX_SIGNATURE_BLOB: Final = 1024 * 1024
#: a signature manifest larger than this, or with more layers, is refused whole
MAX_SIGNATURE_MANIFEST: Final = 256 * 1024
MAX_SIGNATURE_LAYERS: Final = 64
MIN_RSA_BITS: Final = 2048
_CURVES: Final[dict[str, tuple[str, type[hashes.HashAlgorithm]]]] = {
    "secp256r1": ("ecdsa-p256", hashes.SHA256),
    "secp384r1": ("ecdsa-p384", hashes.SHA384),
}
_BUNDLE_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "SHA2_256": hashes.SHA256,
    "SHA2_384": hashes.SHA384,
    "SHA2_512": hashes.SHA512,
}


class KeyFileError(ValueError):
    """A public key file that cannot be used; ``str()`` is one line naming the file."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A trusted public key: where it came from, its type and its SHA-256 fingerprint."""

    path: str
    kind: str  # ecdsa-p256 | ecdsa-p384 | ed25519 | rsa-<bits>
    #: sha256 of the DER SubjectPublicKeyInfo, as cosign and sigstore name keys
    fingerprint: str
    key: Any = field(repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.path} ({self.kind} {self.fingerprint[:19]})"

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's over ``message`` (cosign's hash choices)."""
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, message)
                return True
            for algorithm in self._hashes():
                if self._verify_hashed(signature, message, algorithm, prehashed=False):
                    return True
        except (InvalidSignature, ValueError, UnsupportedAlgorithm):
            return False
        return False

    def verify_digest(self, signature: bytes, digest: bytes, algorithm: str) -> bool:
        """Whether ``signature`` is this key's over a message known only by its digest."""
        hash_type = _BUNDLE_HASHES.get(algorithm)
        if hash_type is None or isinstance(self.key, ed25519.Ed25519PublicKey):
            return False  # Ed25519 signs messages, never digests
        algorithm_ = hash_type()
        if len(digest) != algorithm_.digest_size:
            return False
        try:
            return self._verify_hashed(signature, digest, algorithm_, prehashed=True)
        except (InvalidSignature, ValueError, UnsupportedAlgorithm):
            return False

    def _hashes(self) -> list[hashes.HashAlgorithm]:
        # cosign and c/image sign with SHA-256 whatever the key; sigstore-go picks the curve's
        # own hash (SHA-384 for P-384): both are the key holder's signature over the payload
        natural = (
            _CURVES.get(self.key.curve.name)
            if isinstance(self.key, ec.EllipticCurvePublicKey)
            else None
        )
        out: list[hashes.HashAlgorithm] = [hashes.SHA256()]
        if natural is not None and natural[1] is not hashes.SHA256:
            out.append(natural[1]())
        return out

    def _verify_hashed(
        self, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm, *, prehashed: bool
    ) -> bool:
        chosen: Any = utils.Prehashed(algorithm) if prehashed else algorithm
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            try:
                self.key.verify(signature, data, ec.ECDSA(chosen))
            except InvalidSignature:
                return False
            return True
        if isinstance(self.key, rsa.RSAPublicKey):
            for pad in (
                padding.PKCS1v15(),
                padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO),
            ):
                try:
                    self.key.verify(signature, data, pad, chosen)
                except InvalidSignature:
                    continue
                return True
        return False


def load_public_key(path: str | Path) -> PublicKey:
    """Read a PEM public key (ECDSA P-256/P-384, Ed25519, RSA >= 2048 bits).

    Raises :class:`KeyFileError` with a one-line message naming the file.
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"{name}: larger than {MAX_KEY_BYTES} bytes, not a public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{name}: is a private key; give the public key (cosign.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise KeyFileError(f"{name}: not a PEM public key ({reason[:120]})") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            raise KeyFileError(f"{name}: ECDSA curve {key.curve.name} is not P-256 or P-384")
        kind = curve[0]
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "ed25519"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{name}: RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        kind = f"rsa-{key.key_size}"
    else:
        raise KeyFileError(f"{name}: {type(key).__name__} keys are not supported")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicKey(name, kind, "sha256:" + hashlib.sha256(der).hexdigest(), key)


# --- what a signature manifest offers ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SignatureLayer:
    """One layer of a signature manifest worth reading: its blob decides."""

    kind: str  # "simplesigning" | "bundle"
    digest: str
    size: int
    #: the base64 signature annotation (simple signing only)
    signature: str = ""


class NotASignature(ValueError):
    """A manifest that offers no usable signature layer; ``str()`` says why."""


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The layers of a signature manifest that carry signatures, in order.

    A malformed or oversized manifest raises :class:`NotASignature`, never anything else.
    """
    if len(manifest) > MAX_SIGNATURE_MANIFEST:
        raise NotASignature(f"signature manifest of {len(manifest)} bytes is too large")
    try:
        doc = json.loads(manifest)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
        raise NotASignature("signature manifest is not JSON") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise NotASignature("signature manifest has no layers")
    if len(layers) > MAX_SIGNATURE_LAYERS:
        raise NotASignature(f"signature manifest has {len(layers)} layers")
    out = []
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        mt, digest, size = layer.get("mediaType"), layer.get("digest"), layer.get("size")
        if not isinstance(mt, str) or not isinstance(digest, str):
            continue
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= size <= MAX_SIGNATURE_BLOB
        ):
            continue
        if mt == SIMPLESIGNING:
            ann = layer.get("annotations")
            sig = ann.get(SIGNATURE_ANNOTATION) if isinstance(ann, dict) else None
            if isinstance(sig, str) and sig:
                out.append(SignatureLayer("simplesigning", digest, size, sig))
        elif mt.startswith(BUNDLE_PREFIX):
            out.append(SignatureLayer("bundle", digest, size))
    if not out:
        raise NotASignature("no simple signing or sigstore bundle layer")
    return out


# --- verdicts --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    key: PublicKey | None = None


def verify_layer(
    layer: SignatureLayer, blob: bytes, digest: str, keys: tuple[PublicKey, ...]
) -> Verdict:
    """Whether one signature layer (with its blob's bytes) signs ``digest`` by one of ``keys``."""
    if layer.kind == "simplesigning":
        return verify_simple_signing(blob, layer.signature, digest, keys)
    return verify_bundle(blob, digest, keys)


def _b64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _get(obj: Any, name: str) -> Any:
    """A member of a JSON object, its key compared case-insensitively (cosign's payloads)."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    lowered = name.lower()
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


def _signed_by(keys: tuple[PublicKey, ...], signature: bytes, message: bytes) -> PublicKey | None:
    for key in keys:
        if key.verify(signature, message):
            return key
    return None


def verify_simple_signing(
    payload: bytes, signature_b64: str, digest: str, keys: tuple[PublicKey, ...]
) -> Verdict:
    """cosign's legacy form: ``signature_b64`` over ``payload``, which names ``digest``."""
    if len(payload) > MAX_SIGNATURE_BLOB:
        return Verdict(False, "simple signing payload too large")
    signature = _b64(signature_b64)
    if signature is None:
        return Verdict(False, "the signature annotation is not base64")
    key = _signed_by(keys, signature, payload)
    if key is None:
        return Verdict(False, "not signed by a trusted key")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
        return Verdict(False, f"signed by {key.path}, but the payload is not JSON", key)
    critical = _get(doc, "critical")
    kind = _get(critical, "type")
    if isinstance(kind, str) and kind.lower() not in SIMPLE_SIGNING_TYPES:
        return Verdict(False, f"signed by {key.path}, but the payload type is {kind[:80]!r}", key)
    named = _get(_get(critical, "image"), "docker-manifest-digest")
    if not isinstance(named, str):
        return Verdict(False, f"signed by {key.path}, but the payload names no digest", key)
    if named.strip().lower() != digest.lower():
        return Verdict(False, f"signed by {key.path} for another manifest ({named[:80]})", key)
    return Verdict(True, f"signed by {key.path}", key)


def _pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding, what a DSSE signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def verify_bundle(bundle: bytes, digest: str, keys: tuple[PublicKey, ...]) -> Verdict:
    """A sigstore bundle (v0.1-v0.3) that signs ``digest`` with one of ``keys``."""
    if len(bundle) > MAX_SIGNATURE_BLOB:
        return Verdict(False, "sigstore bundle too large")
    try:
        doc = json.loads(bundle)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
        return Verdict(False, "sigstore bundle is not JSON")
    if not isinstance(doc, dict):
        return Verdict(False, "sigstore bundle is not a JSON object")
    material = doc.get("verificationMaterial")
    keyless = isinstance(material, dict) and (
        "certificate" in material or "x509CertificateChain" in material
    )
    if isinstance(doc.get("dsseEnvelope"), dict):
        verdict = _verify_dsse(doc["dsseEnvelope"], digest, keys)
    elif isinstance(doc.get("messageSignature"), dict):
        verdict = _verify_message_signature(doc["messageSignature"], digest, keys)
    else:
        return Verdict(False, "sigstore bundle has neither dsseEnvelope nor messageSignature")
    if not verdict.ok and keyless and verdict.key is None:
        return Verdict(False, "keyless signature (Fulcio certificate): not supported, keys only")
    return verdict


def _verify_dsse(env: dict[str, Any], digest: str, keys: tuple[PublicKey, ...]) -> Verdict:
    payload_type = env.get("payloadType")
    payload = _b64(env.get("payload"))
    sigs = env.get("signatures")
    if not isinstance(payload_type, str) or payload is None or not isinstance(sigs, list):
        return Verdict(False, "malformed DSSE envelope")
    message = _pae(payload_type, payload)
    key = None
    for entry in sigs[:MAX_SIGNATURE_LAYERS]:
        sig = _b64(entry.get("sig")) if isinstance(entry, dict) else None
        if sig is not None:
            key = _signed_by(keys, sig, message)
            if key is not None:
                break
    if key is None:
        return Verdict(False, "not signed by a trusted key")
    if payload_type != DSSE_INTOTO:
        return Verdict(
            False, f"signed by {key.path}, but the payload type is {payload_type[:80]!r}", key
        )
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
        return Verdict(False, f"signed by {key.path}, but the statement is not JSON", key)
    if not isinstance(statement, dict):
        return Verdict(False, f"signed by {key.path}, but the statement is not an object", key)
    predicate = statement.get("predicateType")
    if predicate != SIGN_PREDICATE:
        # an attestation (SBOM, provenance) by the key is not a signature of the image
        return Verdict(False, f"signed by {key.path}: an attestation ({str(predicate)[:80]})", key)
    algorithm, _, hex_part = digest.partition(":")
    subjects = statement.get("subject")
    for subject in subjects if isinstance(subjects, list) else []:
        named = subject.get("digest") if isinstance(subject, dict) else None
        if isinstance(named, dict) and str(named.get(algorithm, "")).lower() == hex_part.lower():
            return Verdict(True, f"signed by {key.path}", key)
    return Verdict(False, f"signed by {key.path} for another manifest", key)


def _verify_message_signature(
    msg: dict[str, Any], digest: str, keys: tuple[PublicKey, ...]
) -> Verdict:
    md = msg.get("messageDigest")
    signature = _b64(msg.get("signature"))
    if not isinstance(md, dict) or signature is None:
        return Verdict(False, "malformed messageSignature")
    algorithm = md.get("algorithm")
    named = _b64(md.get("digest"))
    if not isinstance(algorithm, str) or named is None:
        return Verdict(False, "malformed messageDigest")
    key = next((k for k in keys if k.verify_digest(signature, named, algorithm)), None)
    if key is None:
        return Verdict(False, "not signed by a trusted key")
    alg, _, hex_part = digest.partition(":")
    if (
        algorithm != {"sha256": "SHA2_256", "sha512": "SHA2_512"}.get(alg)
        or named.hex() != hex_part
    ):
        return Verdict(False, f"signed by {key.path} for another manifest", key)
    return Verdict(True, f"signed by {key.path}", key)


__all__ = [
    "BUNDLE_V03",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING",
    "KeyFileError",
    "NotASignature",
    "PublicKey",
    "SignatureLayer",
    "Verdict",
    "load_public_key",
    "signature_layers",
    "verify_bundle",
    "verify_layer",
    "verify_simple_signing",
]
