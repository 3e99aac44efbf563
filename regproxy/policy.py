"""The signature policy: which manifests may be served, decided once per digest and rule.

``policy.rules`` map names to a requirement; the first rule whose ``match`` glob matches one of
the repository's names wins (``<upstream>/<path>`` with the upstream's config key or its
``alias``, or the canonical project path), and no match allows. Under ``require: sigstore`` a
manifest is served only when a signature of it verifies (regproxy.cosign) with one of the rule's
keys; signatures are found through its referrers (regproxy.referrers: the referrers API, the tag
schema, cosign's ``sha256-<hex>.sig`` tag), fetched like any content. A child of an index is
also served when an index of the repository that lists it is allowed (clients verify the index,
whose digest covers its children).

What is checked (``policy.enforce``): ``pull-through`` for manifests of upstream names and
``push`` for those of local-only names, whenever a client pulls them (GET or HEAD), whatever way
they came to the host; ``import`` is the bundle importer's own check (:meth:`Policy.check` too).
An artifact (an image manifest without a single filesystem layer: signatures, SBOMs,
attestations) runs nothing and is never refused, so clients can always fetch signatures.

Decisions are cached per digest and rule: an allowed digest for good (bounded), a denial for
``tag_ttl`` (a signature may arrive later), forgotten at once when a referrer of the digest is
stored here.

A peer's lookup (``Regproxy-Peer: 1``, which any client can send) is held to the policy like any
request; it only fetches nothing, so its decision reads the signatures this host holds. Its
denial is kept apart (and it never shares a decision in flight with others): what a local-only
look did not find must not deny a client whose request would fetch the signature. Each answer is counted (``regproxy_policy_decisions_total{rule,result}``); each
fresh denial is logged ``policy.denied`` with the rule and the reason.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from regproxy.async_index import AsyncIndex
from regproxy.config import Config, PolicyRule
from regproxy.cosign import (
    BUNDLE_PREFIX,
    MAX_SIGNATURE_BLOB,
    SIMPLESIGNING,
    NotASignature,
    PublicKey,
    signature_layers,
    verify_layer,
)
from regproxy.errors import Denied, OCIError
from regproxy.flights import SingleFlights
from regproxy.index import Index, ManifestRow
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import INDEX_TYPES, Descriptor, Digest
from regproxy.referrers import COSIGN_SUFFIXES, Referrers, cosign_tags
from regproxy.registry import LOCAL_ONLY, Blob, Manifest

log = logging.getLogger("regproxy.policy")

ALLOWED_CACHE: Final = 50_000
RULE_CACHE: Final = 16_384
DENIED_CACHE: Final = 10_000
MAX_CANDIDATES: Final = 16
MAX_PARENTS: Final = 8
#: artifact types of referrers that may be signatures (None: a referrer that names none)
SIGNATURE_TYPES: Final = frozenset(
    {SIMPLESIGNING, "application/vnd.dev.cosign.artifact.sig.v1+json"}
)


class Host(Protocol):
    """What the policy needs of the registry (regproxy.proxy.ProxyRegistry)."""

    config: Config
    db: AsyncIndex
    referrer_index: Referrers
    metrics: Metrics

    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest: ...

    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob: ...

    async def local_blob(self, repo: RepoName, digest: Digest) -> Blob | None: ...

    async def local_manifest(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None: ...

    async def manifest_body(self, repo: RepoName, row: ManifestRow) -> Manifest: ...


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # the rule's match, "-" when none applies
    reason: str
    key: PublicKey | None = None


def is_artifact(body: bytes, media_type: str) -> bool:
    """A manifest that runs nothing: an image manifest whose layers are all JSON or text
    documents (signatures, bundles, attestations, SBOMs), or none. Anything else (filesystem
    layers, WebAssembly, a chart, an unknown type) is held to the rule."""
    if media_type in INDEX_TYPES:
        return False
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        return False
    for layer in layers:
        mt = layer.get("mediaType") if isinstance(layer, dict) else None
        if not isinstance(mt, str):
            return False
        mt = mt.split(";", 1)[0].strip().lower()
        if not (mt.endswith("json") or mt.startswith("text/")):
            return False
    return True


def may_be_signature(desc: Descriptor) -> bool:
    art = desc.artifact_type
    return art is None or art in SIGNATURE_TYPES or art.startswith(BUNDLE_PREFIX)


class Policy:
    def __init__(self, registry: Host, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.config = registry.config
        self.rules = self.config.policy.rules
        self.enforce_points = frozenset(self.config.policy.enforce)
        self.clock = clock
        self._aliases: dict[str, list[str]] = {}
        for u in self.config.upstreams:
            if u.alias and "*" not in u.pattern:
                self._aliases.setdefault(u.pattern, []).append(u.alias)
        self._allowed: OrderedDict[tuple[str, int], Decision] = OrderedDict()
        #: denials by (digest, rule, local-only): a peer's lookup decides from the store alone
        self._denied: dict[tuple[str, int, bool], tuple[Decision, float]] = {}
        self._flights = SingleFlights("policy")
        self._rule_of: dict[str, tuple[int, PolicyRule] | None] = {}
        # the config is frozen: whether any rule requires anything is known once (it is asked
        # on every manifest served)
        self._active = self.config.policy.active

    @property
    def active(self) -> bool:
        return self._active

    # --- which rule --------------------------------------------------------------------------------
    def names_of(self, repo: RepoName) -> list[str]:
        """Every name a rule may match the repository by."""
        if repo.host is None:
            return [repo.canonical]
        names = [f"{repo.host}/{repo.path}"]
        names += [f"{a}/{repo.path}" for a in self._aliases.get(repo.host, [])]
        names.append(repo.canonical)
        return names

    def rule_for(self, repo: RepoName) -> tuple[int, PolicyRule] | None:
        """The first rule that matches (memoized: pure for a given config)."""
        key = repo.canonical
        if key in self._rule_of:
            return self._rule_of[key]
        found = None
        names = self.names_of(repo)
        for i, rule in enumerate(self.rules):
            if any(fnmatch.fnmatchcase(n, rule.match) for n in names):
                found = (i, rule)
                break
        if len(self._rule_of) >= RULE_CACHE:
            self._rule_of.clear()
        self._rule_of[key] = found
        return found

    def applies_to(self, repo: RepoName) -> bool:
        """Whether serving this repository's manifests is an enforcement point."""
        point = "push" if repo.host is None else "pull-through"
        return point in self.enforce_points

    # --- the decision ------------------------------------------------------------------------------
    async def enforce(self, repo: RepoName, manifest: Manifest) -> None:
        """Raise 403 DENIED unless the policy lets this manifest be served."""
        if self.allowed_now(repo, manifest):
            return
        if is_artifact(manifest.body, manifest.media_type):
            return
        decision = await self.check(repo, manifest.digest)
        if not decision.allowed:
            raise Denied(f"policy rule {decision.rule!r}: {manifest.digest}: {decision.reason}")

    def allowed_now(self, repo: RepoName, manifest: Manifest) -> bool:
        """True when the policy lets this manifest be served without deciding anything now
        (no rule applies, or it was allowed before, for good: counted as :meth:`enforce`
        counts it); False when only :meth:`enforce` can tell."""
        if not self.active or not self.applies_to(repo):
            return True
        found = self.rule_for(repo)
        if found is None or found[1].require == "none":
            return True
        if (str(manifest.digest), found[0]) in self._allowed:  # decided before, for good
            meter = self.registry.metrics
            meter.child(meter.policy_decisions, found[1].match, "allowed").inc()
            return True
        return False

    async def check(self, repo: RepoName, digest: Digest, *, depth: int = 0) -> Decision:
        found = self.rule_for(repo)
        if found is None or found[1].require == "none":
            return Decision(True, found[1].match if found else "-", "no signature required")
        index, rule = found
        key = (str(digest), index)
        local = LOCAL_ONLY.get()  # a peer's lookup: only what this host holds counts
        decision = self._cached(key, local)
        if decision is None:
            # in a task of its own: an asker that is cancelled (the first one too: a prefetch
            # timing out) cancels only its own wait, never the others' decision
            decision = await self._flights.run(
                (*key, local), lambda: self._decided(repo, digest, rule, depth, key, local)
            )
        self.registry.metrics.policy_decisions.labels(
            rule.match, "allowed" if decision.allowed else "denied"
        ).inc()
        return decision

    def forget(self, digest: Digest | str) -> None:
        """A referrer (or cosign tag) of ``digest`` was stored here: decide again."""
        d = str(digest)
        for key in [k for k in self._denied if k[0] == d]:
            self._denied.pop(key, None)

    def _cached(self, key: tuple[str, int], local: bool) -> Decision | None:
        allowed = self._allowed.get(key)
        if allowed is not None:
            self._allowed.move_to_end(key)
            return allowed
        # a denial that could fetch holds for a local-only look too, never the other way round
        for dkey in ((*key, False), (*key, True)) if local else ((*key, False),):
            denied = self._denied.get(dkey)
            if denied is not None:
                if self.clock() < denied[1]:
                    return denied[0]
                self._denied.pop(dkey, None)
        return None

    def _remember(self, key: tuple[str, int], decision: Decision, local: bool) -> None:
        if decision.allowed:
            self._allowed[key] = decision
            while len(self._allowed) > ALLOWED_CACHE:
                self._allowed.popitem(last=False)
            return
        if len(self._denied) >= DENIED_CACHE:
            self._denied.clear()
        self._denied[(*key, local)] = (decision, self.clock() + self.config.tag_ttl)

    async def _decided(
        self,
        repo: RepoName,
        digest: Digest,
        rule: PolicyRule,
        depth: int,
        key: tuple[str, int],
        local: bool,
    ) -> Decision:
        decision = await self._decide(repo, digest, rule, depth)
        self._remember(key, decision, local)
        self._log(repo, digest, decision)
        return decision

    def _log(self, repo: RepoName, digest: Digest, decision: Decision) -> None:
        if decision.allowed:
            log.info(
                "policy.allowed repo=%s digest=%s rule=%s reason=%s",
                repo,
                digest,
                decision.rule,
                decision.reason,
            )
        else:
            log.warning(
                "policy.denied repo=%s digest=%s rule=%s upstream=%s reason=%s",
                repo,
                digest,
                decision.rule,
                repo.host or "local",
                decision.reason,
            )

    async def _decide(
        self, repo: RepoName, digest: Digest, rule: PolicyRule, depth: int
    ) -> Decision:
        reasons: list[str] = []
        try:
            signed = await self._signed(repo, digest, rule.keys, reasons)
        except OCIError as exc:  # the upstream could not list or serve the signatures
            reasons.append(f"signatures unavailable: {exc}")
            signed = None
        if signed is not None:
            return Decision(True, rule.match, f"signed by {signed.path}", signed)
        if depth == 0:
            parents = await self.registry.db.read(
                Index.index_parents, repo.canonical, str(digest), MAX_PARENTS
            )
            for parent in parents:
                got = await self.check(repo, Digest.parse(parent), depth=1)
                if got.allowed:
                    return Decision(
                        True, rule.match, f"listed by the signed index {parent}", got.key
                    )
        return Decision(False, rule.match, _best(reasons))

    async def _signed(
        self,
        repo: RepoName,
        digest: Digest,
        keys: tuple[PublicKey, ...],
        reasons: list[str],
        source: Source | None = None,
    ) -> PublicKey | None:
        source = source or _Pulled(self.registry)
        for name, body in await source.candidates(repo, digest, reasons):
            try:
                layers = signature_layers(body)
            except NotASignature as exc:
                reasons.append(f"{name}: {exc}")
                continue
            for layer in layers:
                try:
                    blob = await source.blob(repo, layer.digest, layer.size)
                except (OCIError, OSError) as exc:
                    reasons.append(f"signature blob {layer.digest}: {exc}")
                    continue
                if blob is None:
                    reasons.append(f"signature blob {layer.digest}: missing")
                    continue
                verdict = verify_layer(layer, blob, str(digest), keys)
                if verdict.ok:
                    return verdict.key
                reasons.append(verdict.reason)
        return None

    # --- the web page: what the store says, never fetching ------------------------------------------
    async def status(
        self, repo: RepoName, digest: str, *, depth: int = 0
    ) -> SignatureStatus | None:
        """Whether the store holds a signature of the manifest: by the keys of the rule that
        requires one, else by any key the policy names. None: no key is configured."""
        found = self.rule_for(repo)
        rule = found[1].match if found and found[1].require == "sigstore" else None
        keys = found[1].keys if found and found[1].keys else self._all_keys()
        if not keys:
            return None
        reasons: list[str] = []
        source = _Imported(self.registry, {}, {}, _nothing)
        key = await self._signed(repo, Digest.parse(digest), keys, reasons, source)
        if key is not None:
            return SignatureStatus(True, rule, f"signed by {key.path}", key.path, key.fingerprint)
        if depth == 0:
            for parent in await self.registry.db.read(
                Index.index_parents, repo.canonical, digest, MAX_PARENTS
            ):
                got = await self.status(repo, parent, depth=1)
                if got is not None and got.signed:
                    return SignatureStatus(
                        True, rule, f"listed by the signed index {parent}", got.key, got.fingerprint
                    )
        return SignatureStatus(False, rule, _best(reasons))

    def _all_keys(self) -> tuple[PublicKey, ...]:
        seen: dict[str, PublicKey] = {}
        for r in self.rules:
            for k in r.keys:
                seen.setdefault(k.fingerprint, k)
        return tuple(seen.values())

    # --- the importer's check (policy.enforce: import) ----------------------------------------------
    async def check_import(
        self,
        images: list[ImportedImage],
        bundle: dict[str, bytes],
        tags: dict[tuple[str, str], str],
        read_blob: Callable[[str], Awaitable[bytes | None]],
    ) -> None:
        """Before an import commits: refuse (403 DENIED) when an image under a ``sigstore``
        rule has no signature that verifies, in the bundle (``bundle``: manifests by digest,
        ``tags``: (repository, tag) -> digest, ``read_blob``: its staged blobs) or the store."""
        if not self.active or "import" not in self.enforce_points:
            return
        for img in images:
            found = self.rule_for(img.repo)
            if found is None or found[1].require == "none":
                continue
            rule = found[1]
            if is_artifact(img.body, img.media_type):
                continue
            reasons: list[str] = []
            source = _Imported(self.registry, bundle, tags, read_blob)
            key = await self._signed(img.repo, img.digest, rule.keys, reasons, source)
            decision = (
                Decision(True, rule.match, f"signed by {key.path}", key)
                if key is not None
                else Decision(False, rule.match, _best(reasons))
            )
            result = "allowed" if decision.allowed else "denied"
            self.registry.metrics.policy_decisions.labels(rule.match, result).inc()
            self._log(img.repo, img.digest, decision)
            if not decision.allowed:
                raise Denied(
                    f"policy rule {rule.match!r}: import of {img.label}: {decision.reason}"
                )


@dataclass(frozen=True, slots=True)
class SignatureStatus:
    """What the web page shows of a manifest's signature."""

    signed: bool
    rule: str | None  # the match of the rule that requires a signature here, if one does
    reason: str
    key: str | None = None  # the key file
    fingerprint: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "signed": self.signed,
            "rule": self.rule,
            "reason": self.reason,
            "key": self.key,
            "key_name": Path(self.key).name if self.key else None,
            "fingerprint": self.fingerprint,
        }


async def _nothing(digest: str) -> bytes | None:
    return None


@dataclass(frozen=True, slots=True)
class ImportedImage:
    """An image of a bundle, as the import check sees it."""

    repo: RepoName
    digest: Digest
    body: bytes
    media_type: str
    label: str


class Source(Protocol):
    """Where signatures of a manifest are looked for."""

    async def candidates(
        self, repo: RepoName, digest: Digest, reasons: list[str]
    ) -> list[tuple[str, bytes]]: ...

    async def blob(self, repo: RepoName, digest: str, size: int) -> bytes | None: ...


async def _read(
    registry: Host, repo: RepoName, digest: str, size: int, *, fetch: bool
) -> bytes | None:
    """A signature layer's bytes (at most MAX_SIGNATURE_BLOB): fetched like any blob, or only
    from the store."""
    d = Digest.parse(digest)
    if fetch:
        blob: Blob | None = await registry.get_blob(repo, d)
        if blob is not None and blob.stream is not None:
            await blob.stream.wait_done()
            blob = await registry.local_blob(repo, d)
    else:
        blob = await registry.local_blob(repo, d)
    if blob is None:
        return None
    if blob.size > MAX_SIGNATURE_BLOB or blob.size != size:
        raise OSError(f"{blob.size} bytes")
    if blob.data is not None:
        return blob.data
    if blob.file is not None:
        path: Path = blob.file
        return await asyncio.to_thread(path.read_bytes)
    return None


class _Pulled:
    """Signatures through the referrers, pulled through like any content (serving)."""

    def __init__(self, registry: Host) -> None:
        self.registry = registry

    async def candidates(
        self, repo: RepoName, digest: Digest, reasons: list[str]
    ) -> list[tuple[str, bytes]]:
        descs = await self.registry.referrer_index.lookup(repo, digest)
        out = []
        for desc in [d for d in descs if may_be_signature(d)][:MAX_CANDIDATES]:
            try:
                m = await self.registry.get_manifest(repo, str(desc.digest))
            except OCIError as exc:
                reasons.append(f"{desc.digest}: {exc}")
                continue
            out.append((str(desc.digest), m.body))
        return out

    async def blob(self, repo: RepoName, digest: str, size: int) -> bytes | None:
        return await _read(self.registry, repo, digest, size, fetch=True)


class _Imported:
    """Signatures a bundle brings (referrers of the image, cosign's .sig tag), then the store's."""

    def __init__(
        self,
        registry: Host,
        bundle: dict[str, bytes],
        tags: dict[tuple[str, str], str],
        read_blob: Callable[[str], Awaitable[bytes | None]],
    ) -> None:
        self.registry = registry
        self.bundle = bundle
        self.tags = tags
        self.read_blob = read_blob

    async def candidates(
        self, repo: RepoName, digest: Digest, reasons: list[str]
    ) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for d, body in self.bundle.items():
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
                continue
            subject = doc.get("subject") if isinstance(doc, dict) else None
            if isinstance(subject, dict) and subject.get("digest") == str(digest):
                out.append((d, body))
        for tag in cosign_tags(digest):
            tagged = self.tags.get((repo.canonical, tag))
            if tagged is not None and tagged in self.bundle:
                out.append((tagged, self.bundle[tagged]))
        for desc in await self.registry.referrer_index.local(repo, digest):
            if may_be_signature(desc) and str(desc.digest) not in self.bundle:
                found = await self.registry.local_manifest(repo, str(desc.digest))
                if found is not None:
                    m = await self.registry.manifest_body(repo, found[0])
                    out.append((str(desc.digest), m.body))
        return out[:MAX_CANDIDATES]

    async def blob(self, repo: RepoName, digest: str, size: int) -> bytes | None:
        if size > MAX_SIGNATURE_BLOB:
            raise OSError(f"{size} bytes")
        data = await self.read_blob(digest)
        if data is not None:
            return data
        return await _read(self.registry, repo, digest, size, fetch=False)


def _best(reasons: list[str]) -> str:
    """The most telling reason for a denial."""
    if not reasons:
        return "no signature found (referrers, sha256-<hex>.sig)"
    for words in ("for another manifest", "signed by", "keyless", "not signed by a trusted key"):
        for r in reasons:
            if words in r:
                return r
    return reasons[0]


def cosign_tag_subject(tag: str) -> str | None:
    """The subject digest a cosign tag (``sha256-<hex>.sig``) or tag schema index names."""
    base = tag
    for suffix in COSIGN_SUFFIXES:
        base = base.removesuffix(suffix)
    alg, sep, hex_part = base.partition("-")
    if not sep or alg not in ("sha256", "sha512"):
        return None
    try:
        return str(Digest.parse(f"{alg}:{hex_part}"))
    except OCIError:
        return None
