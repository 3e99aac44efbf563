"""Manifests the cluster's hosts answer, stored in the local registry (regproxy.cluster asks).

A manifest from a peer is stored like one from the upstream (its bytes, its tag); a tag from
its home host is as fresh as the home says (``Age``); a lookup's answer is confirmed by the next
request. Composed into :class:`regproxy.proxy.ProxyRegistry`.
"""

from __future__ import annotations

import dataclasses
import logging

from regproxy.cluster import Cluster, Found
from regproxy.deadline import Timing
from regproxy.errors import OCIError
from regproxy.names import RepoName
from regproxy.registry import LocalRegistry, Manifest

log = logging.getLogger("regproxy.proxy")


class FromCluster:
    def __init__(self, local: LocalRegistry, timing: Timing, tag_ttl: float) -> None:
        self.local = local
        self.timing = timing
        self.tag_ttl = tag_ttl

    async def manifest(
        self,
        repo: RepoName,
        reference: str,
        cluster: Cluster,
        *,
        homes: bool,
        near: bool,
        wide: bool,
    ) -> Manifest | None:
        found = await cluster.manifest(repo.canonical, reference, homes=homes, near=near, wide=wide)
        if found is None:
            return None
        return await self.store(repo, reference, found)

    async def store(self, repo: RepoName, reference: str, found: Found) -> Manifest | None:
        got = found.got
        # a tag from its home host is as fresh as the home says (Age); a lookup's answer is
        # confirmed at the next request (checked=0)
        checked = 0.0
        if found.home and got.age is not None:
            checked = self.timing.wall() - got.age
        try:
            stored = await self.local.store_pulled(
                repo, reference, got.body, got.media_type, checked=checked
            )
        except OCIError as exc:
            log.warning("manifest.peer_unusable repo=%s peer=%s error=%s", repo, found.peer, exc)
            return None
        log.info(
            "manifest.from_peer repo=%s reference=%s digest=%s peer=%s kind=%s",
            repo,
            reference,
            stored.digest,
            found.peer,
            "home" if found.home else "lookup",
        )
        return stored

    async def tag_from_home(
        self, repo: RepoName, tag: str, have: str, cluster: Cluster
    ) -> tuple[Manifest, str] | None:
        """The tag's home host confirms it (or says where it moved): the manifest, and how it
        counts (hit, miss: it moved, stale: the home could not confirm it either). None: no
        home answered."""
        check = await cluster.check_tag(repo.canonical, tag, have)
        if check is None or check.age is None:  # a home that cannot say how fresh: upstream
            return None
        checked = self.timing.wall() - check.age
        if check.got is not None:
            found = Found(check.peer, dataclasses.replace(check.got, age=check.age), home=True)
            moved = await self.store(repo, tag, found)
            return None if moved is None else (moved, "miss")
        await self.local.mark_tag_checked(repo, tag, checked)
        log.debug(
            "tag.confirmed_by_home repo=%s tag=%s peer=%s age=%.0f",
            repo,
            tag,
            check.peer,
            check.age,
        )
        row = await self.local.local_manifest(repo, tag)
        if row is None:
            return None
        body = await self.local.manifest_body(repo, row[0])
        return body, "hit" if self.timing.wall() - checked < self.tag_ttl else "stale"
