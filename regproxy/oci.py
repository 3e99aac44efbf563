"""Pure OCI vocabulary: digests, name/tag grammar, media types, manifest parsing.

No I/O and no internal imports beyond :mod:`regproxy.errors`.
Grammar from the distribution spec:
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
"""

from __future__ import annotations

import array
import asyncio
import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid

# --- media types -----------------------------------------------------------------------------
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_EMPTY_CONFIG: Final = "application/vnd.oci.empty.v1+json"
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES: Final = INDEX_TYPES | IMAGE_TYPES
#: What we ask an upstream for, so an index or a list comes back whole.
MANIFEST_ACCEPT: Final = ", ".join(
    [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, "*/*;q=0.1"]
)
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: a tags/list answer holds at most this many tags (more are paged with a Link header)
MAX_TAGS: Final = 10_000
#: JSON from outside (manifests, tag pages, tokens) may nest this deep; OCI documents need ~5
MAX_JSON_DEPTH: Final = 64

# --- grammar -----------------------------------------------------------------------------------
# \Z, not $: $ also matches before a trailing newline, and "a\n" is no name or tag
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_ALGORITHM_RE: Final = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*\Z")
_ENCODED_RE: Final = re.compile(r"^[a-zA-Z0-9=_-]+\Z")
#: Supported algorithms and the hex length of their encoded part.
ALGORITHMS: Final[dict[str, int]] = {"sha256": 64, "sha512": 128}
MAX_NAME_LENGTH: Final = 255


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate; valid digests are cached (they are parsed on every request)."""
        return _parse_digest(text)

    @classmethod
    def parse_uncached(cls, text: str) -> Digest:
        """:meth:`parse` without its cache: for many digests each seen once (eviction's files),
        which would push the requests' own digests out of it."""
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> Digest:
        alg, sep, enc = text.partition(":")
        if not sep or not _ALGORITHM_RE.match(alg) or not _ENCODED_RE.match(enc):
            raise DigestInvalid(text, "not of the form algorithm:encoded")
        want = ALGORITHMS.get(alg)
        if want is None:
            raise DigestInvalid(text, f"unsupported algorithm {alg!r} (supported: sha256, sha512)")
        if len(enc) != want or not all(c in "0123456789abcdef" for c in enc):
            raise DigestInvalid(text, f"{alg} needs {want} lowercase hex characters")
        return cls(alg, enc)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


_parse_digest: Final = functools.lru_cache(maxsize=16384)(Digest._parse)


def is_digest_reference(reference: str) -> bool:
    return ":" in reference


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(name, f"longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.match(name):
        raise NameInvalid(name, "does not match the repository name grammar")
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise TagInvalid(tag)
    return tag


# --- JSON from outside ---------------------------------------------------------------------------
class JSONInvalid(ValueError):
    """A JSON body that is not valid, or nests deeper than allowed."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


#: a JSON string; linear only over text json.loads accepted (see :func:`json_depth`)
_STRING_RE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
#: an opening bracket is +1, a closing one -1 (as signed bytes)
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(valid: bytes) -> int:
    """How deep a UTF-8 JSON text that ``json.loads`` accepted nests (brackets in strings do
    not count): strings out, brackets to +1/-1, the running sum's peak; all in C, linear.

    Only for valid text: on an unterminated string (``"\\"\\"\\"...``) the string pattern
    would be tried from every quote to the end, quadratic (48 KB held the loop for 18 s)."""
    steps = _STRING_RE.sub(b"", valid).translate(_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(array.array("b", steps)), default=0)


def load_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for bodies from outside, in linear time whatever they hold: UTF-8 only
    (a BOM is allowed), nested at most ``max_depth`` levels; anything else (nested 100,000
    levels deep, not JSON at all) is a clean JSONInvalid, never a RecursionError."""
    try:
        doc = json.loads(body.decode("utf-8-sig"))
    except RecursionError:
        raise JSONInvalid(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError:  # UnicodeDecodeError is one
        raise JSONInvalid("not valid JSON") from None
    if json_depth(body) > max_depth:
        raise JSONInvalid(f"JSON nested deeper than {max_depth} levels")
    return doc


# --- manifests ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = self.platform
        return out


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    """What the registry needs to know of a manifest; the bytes stay as they came."""

    media_type: str
    #: config and layers (image) — must exist as blobs
    blobs: tuple[Descriptor, ...] = ()
    #: child manifests (index)
    manifests: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"{where} is not a descriptor object")
    mt, dg, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(mt, str) or not isinstance(dg, str):
        raise ManifestInvalid(f"{where} needs mediaType and digest strings")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where} needs a non-negative integer size")
    try:
        digest = Digest.parse(dg)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where} has an invalid digest: {exc.detail}") from None
    art = obj.get("artifactType")
    ann = obj.get("annotations")
    plat = obj.get("platform")
    return Descriptor(
        mt,
        digest,
        size,
        art if isinstance(art, str) else None,
        ann if isinstance(ann, dict) else None,
        plat if isinstance(plat, dict) else None,
    )


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    """Validate a manifest body; the media type comes from the body, else the header."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = load_json(body)
    except JSONInvalid as exc:
        raise ManifestInvalid(f"body is {exc.detail}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("body is not a JSON object")
    ct = (content_type or "").split(";")[0].strip()
    body_mt = doc.get("mediaType")
    if body_mt is not None and not isinstance(body_mt, str):
        raise ManifestInvalid("mediaType is not a string")
    if body_mt and ct and ct in MANIFEST_TYPES and body_mt != ct:
        raise ManifestInvalid(f"mediaType {body_mt!r} does not match Content-Type {ct!r}")
    media_type = body_mt or ct
    if not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type == DOCKER_SCHEMA1_SIGNED or doc.get("schemaVersion") == 1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    art = doc.get("artifactType")
    ann = doc.get("annotations")
    annotations = ann if isinstance(ann, dict) else {}
    if media_type in INDEX_TYPES:
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise ManifestInvalid("an index needs a manifests array")
        children = tuple(_descriptor(m, f"manifests[{i}]") for i, m in enumerate(items))
        return ParsedManifest(
            media_type, (), children, subject, art if isinstance(art, str) else None, annotations
        )
    config = doc.get("config")
    layers = doc.get("layers")
    if config is None:
        raise ManifestInvalid("an image manifest needs a config descriptor")
    if not isinstance(layers, list):
        raise ManifestInvalid("an image manifest needs a layers array")
    cfg = _descriptor(config, "config")
    blobs = (cfg, *(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)))
    artifact_type = art if isinstance(art, str) else None
    if artifact_type is None and cfg.media_type != OCI_EMPTY_CONFIG:
        # referrers report config.mediaType when artifactType is absent (spec: listing referrers)
        artifact_type = cfg.media_type
    return ParsedManifest(media_type, blobs, (), subject, artifact_type, annotations)


#: a manifest body larger than this is parsed on a worker thread, not on the event loop: 4 MiB
#: with 17,000 layers take ~0.3-0.9 s of Python (the depth check, the descriptors)
PARSE_INLINE_MAX: Final = 64 * 1024


async def parse_manifest_async(body: bytes, content_type: str | None) -> ParsedManifest:
    """:func:`parse_manifest` for code on the event loop: a large body (from a client or an
    upstream, up to the size limit) is parsed on a worker thread, so other requests go on."""
    if len(body) <= PARSE_INLINE_MAX:
        return parse_manifest(body, content_type)
    return await asyncio.to_thread(parse_manifest, body, content_type)


def accepts(accept_header: str | None, media_type: str) -> bool:
    """Whether an Accept header admits media_type (absent header admits everything)."""
    if not accept_header:
        return True
    for part in accept_header.split(","):
        mt = part.split(";")[0].strip().lower()
        if mt in ("*/*", "application/*", media_type.lower()):
            return True
    return False
