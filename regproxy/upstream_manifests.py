"""Manifests the upstreams answer, stored in the local registry: a miss fetched, a tag older
than ``tag_ttl`` confirmed with a HEAD (and fetched again only when it moved).

A manifest by digest must hash to it (else ``digest_mismatch``, counted against the upstream);
one the store cannot take for our own disk's sake is our error, one it refuses for its content
the upstream's (502). Composed into :class:`regproxy.proxy.ProxyRegistry`, which decides when
to ask (single flights, stale answers, the cluster first).
"""

from __future__ import annotations

import logging

from regproxy.deadline import Timing
from regproxy.errors import DigestInvalid, OCIError, StorageFull, StoreFailed, UpstreamError
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import Digest, is_digest_reference
from regproxy.registry import LocalRegistry, Manifest
from regproxy.upstream import UpstreamClient

log = logging.getLogger("regproxy.proxy")


class FromUpstream:
    def __init__(self, local: LocalRegistry, timing: Timing, metrics: Metrics) -> None:
        self.local = local
        self.timing = timing
        self.metrics = metrics

    async def refresh_tag(
        self, repo: RepoName, tag: str, have: str, client: UpstreamClient
    ) -> Manifest | None:
        """HEAD the tag upstream; GET only when it moved. None: keep what we have."""
        head = await client.head_manifest(repo.path, tag)
        if head is None:
            # what we hold stays the answer; confirm it for a tag_ttl, so a tag that upstream
            # dropped does not cost a HEAD on every request
            log.info("tag.gone_upstream repo=%s tag=%s upstream=%s", repo, tag, client.name)
            await self.local.mark_tag_checked(repo, tag, self.timing.wall())
            return None
        if head.digest is not None and str(head.digest) == have:
            await self.local.mark_tag_checked(repo, tag, self.timing.wall())
            return None
        # a GET counts against the upstream's pull limit: keep the last pulls for misses
        client.keep_reserve()
        return await self.fetch(repo, tag, client)

    async def fetch(
        self, repo: RepoName, reference: str, client: UpstreamClient
    ) -> Manifest | None:
        """GET the manifest upstream and store it; None: the upstream does not have it."""
        got = await client.get_manifest(repo.path, reference)
        if got is None:
            return None
        if is_digest_reference(reference):
            want = Digest.parse(reference)
            actual = Digest.of(got.body, want.algorithm)
            if actual != want:
                self.metrics.upstream_meters.failed(client.name, "digest_mismatch")
                log.error(
                    "manifest.digest_mismatch repo=%s want=%s got=%s upstream=%s",
                    repo,
                    want,
                    actual,
                    client.name,
                )
                raise UpstreamError(
                    client.name, f"manifest {want} hashes to {actual}", kind="digest_mismatch"
                )
        try:
            stored = await self.local.store_pulled(
                repo, reference, got.body, got.media_type, checked=self.timing.wall()
            )
        except DigestInvalid as exc:
            raise UpstreamError(
                client.name, f"bad manifest: {exc}", kind="digest_mismatch"
            ) from None
        except (StorageFull, StoreFailed):
            raise  # our disk, not the upstream's answer
        except OCIError as exc:
            raise UpstreamError(client.name, f"unusable manifest: {exc}") from None
        log.info(
            "manifest.fetched repo=%s reference=%s digest=%s upstream=%s bytes=%d",
            repo,
            reference,
            stored.digest,
            client.name,
            len(got.body),
        )
        return stored
