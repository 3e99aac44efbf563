"""A manifest: its platforms (each with its total size), layers, the image's config and history,
referrers (signatures, SBOMs), and the commands that pull it."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from regproxy.errors import OCIError
from regproxy.names import RepoName
from regproxy.oci import (
    INDEX_TYPES,
    Digest,
    JSONInvalid,
    is_digest_reference,
    load_json,
    parse_manifest_async,
)
from regproxy.policy import SignatureStatus, is_artifact
from regproxy.referrers import kind_of
from regproxy.registry import Registry
from regproxy.ui import queries, served
from regproxy.ui.base import (
    Refused,
    json_response,
    manifest_url,
    registry_of,
    render,
    repo_url,
    resolve,
    ui_of,
)
from regproxy.ui.format import platform_str
from regproxy.ui.pulls import commands
from regproxy.web_keys import POLICY_KEY

#: an image config bigger than this is not read for the page (real ones are a few KiB)
MAX_CONFIG_BYTES: Final = 1 << 20
#: history entries shown (an image with more is unusual; the rest are counted)
MAX_HISTORY: Final = 200


async def read_small(
    registry: Registry, digest: str, limit: int = MAX_CONFIG_BYTES
) -> bytes | None:
    """A manifest's or config's bytes by digest (one file, never a scan); None when it is gone
    or bigger than ``limit``."""

    def read() -> bytes | None:
        d = Digest.parse(digest)
        size = registry.store.stat(d)
        if size is None or size > limit:
            return None
        return registry.store.read(d)

    try:
        return await asyncio.get_running_loop().run_in_executor(None, read)
    except (OCIError, OSError):
        return None


async def platforms_of(registry: Registry, digest: str, media_type: str) -> list[str]:
    if media_type not in INDEX_TYPES:
        return []
    body = await read_small(registry, digest)
    if body is None:
        return []
    try:
        parsed = await parse_manifest_async(body, media_type)
    except OCIError:
        return []
    return [platform_str(m.platform) for m in parsed.manifests if m.platform]


async def signature_of(
    request: web.Request, repo: RepoName, digest: str, media_type: str
) -> SignatureStatus | None:
    """Whether the store holds a signature of an image (artifacts and no keys: None)."""
    policy = request.app[POLICY_KEY]
    body = await read_small(registry_of(request), digest)
    if body is None or is_artifact(body, media_type):
        return None
    return await policy.status(repo, digest)


async def referrers_of(request: web.Request, repo: RepoName, digest: str) -> list[dict[str, Any]]:
    """Signatures, SBOMs, attestations the store holds for a manifest (cosign's tags too)."""
    found = await request.app[POLICY_KEY].registry.referrer_index.local(repo, Digest.parse(digest))
    return [
        {
            "digest": str(d.digest),
            "media_type": d.media_type,
            "artifact_type": d.artifact_type,
            "size": d.size,
            "kind": kind_of(d),
        }
        for d in found[:200]
    ]


def image_config(body: bytes) -> dict[str, Any] | None:
    """What an operator asks of an image: when it was built, what it runs, its environment,
    labels and history (OCI image config / Docker image JSON)."""
    try:
        doc = load_json(body)  # a blob like any other: whoever pushed it chose its nesting
    except JSONInvalid:
        return None
    if not isinstance(doc, dict):
        return None
    raw_cfg = doc.get("config")
    cfg: dict[str, Any] = raw_cfg if isinstance(raw_cfg, dict) else {}
    raw_history = doc.get("history")
    history = (
        [h for h in raw_history if isinstance(h, dict)] if isinstance(raw_history, list) else []
    )
    raw_ports = cfg.get("ExposedPorts")
    ports = sorted(str(p) for p in raw_ports) if isinstance(raw_ports, dict) else []

    def strings(v: Any) -> list[str]:
        return [str(x) for x in v] if isinstance(v, list) else []

    labels = cfg.get("Labels") if isinstance(cfg.get("Labels"), dict) else {}
    return {
        "created": doc.get("created") if isinstance(doc.get("created"), str) else None,
        "platform": platform_str(doc) if doc.get("architecture") else None,
        "entrypoint": strings(cfg.get("Entrypoint")),
        "cmd": strings(cfg.get("Cmd")),
        "working_dir": str(cfg.get("WorkingDir") or ""),
        "user": str(cfg.get("User") or ""),
        "env": strings(cfg.get("Env")),
        "ports": ports,
        "labels": {str(k): str(v) for k, v in sorted((labels or {}).items())},
        "history": [
            {
                "created": str(h.get("created") or ""),
                "created_by": str(h.get("created_by") or ""),
                "comment": str(h.get("comment") or ""),
                "empty_layer": bool(h.get("empty_layer")),
            }
            for h in history[:MAX_HISTORY]
        ],
        "history_more": max(0, len(history) - MAX_HISTORY),
    }


async def manifest_data(request: web.Request) -> dict[str, Any]:
    name, at, digest = request.match_info["ref"].rpartition("@")
    if not at or not is_digest_reference(digest):
        raise Refused("a manifest is named REPOSITORY@DIGEST (sha256:…)", 404)
    registry = registry_of(request)
    repo = resolve(request, name)
    unflushed = registry.unflushed_access()  # before the read: see served.py
    info = await registry.db.read(queries.manifest_info, repo.canonical, digest)
    if info is None:
        raise Refused(f"{repo.canonical}@{digest} is not in the store", 404)
    # last pulled: the index's time and what was served since it was written
    info.last_access = served.manifest(
        repo.canonical, digest, info.cached, info.last_access, unflushed
    )
    signature = await signature_of(request, repo, digest, info.media_type)
    body = await read_small(registry, digest)
    platforms: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    config: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    if body is not None:
        try:
            parsed = await parse_manifest_async(body, info.media_type)
        except OCIError:
            parsed = None
        if parsed is not None:
            for m in parsed.manifests:
                held = info.children_held.get(str(m.digest))
                platforms.append(
                    {
                        "platform": platform_str(m.platform) if m.platform else None,
                        "digest": str(m.digest),
                        "media_type": m.media_type,
                        "manifest_size": m.size,
                        # the platform's image: its manifest and layers that the store holds
                        "size": held,
                        "held": held is not None,
                    }
                )
            for i, b in enumerate(parsed.blobs):
                entry = {
                    "digest": str(b.digest),
                    "media_type": b.media_type,
                    "size": b.size,
                    "held": info.blob_sizes.get(str(b.digest)) is not None,
                }
                if i == 0 and not parsed.is_index and "config" in b.media_type:
                    config = entry
                else:
                    layers.append(entry)
    if config is not None and config["held"] and "image.config" in config["media_type"]:
        raw = await read_small(registry, config["digest"])
        image = image_config(raw) if raw is not None else None
    ui = ui_of(request)
    tls = ui.config.tls.enabled
    return {
        "repository": repo.canonical,
        "digest": digest,
        "media_type": info.media_type,
        "artifact_type": info.artifact_type,
        "size": info.size,
        "total_size": info.total_size,
        "subject": info.subject,
        "annotations": info.annotations or {},
        "cached": info.cached,
        "last_pulled": info.last_access,
        "pinned": info.pinned,
        "tags": info.tags,
        "platforms": platforms,
        "config": config,
        "image": image,
        "layers": layers,
        "referrers": await referrers_of(request, repo, digest),
        "signature": signature.to_json() if signature is not None else None,
        "pull": [c.to_json() for c in commands(repo, digest, request.host, tls=tls)],
    }


async def manifest_page(request: web.Request) -> web.Response:
    data = await manifest_data(request)
    return render(request, "manifest.html", m=data, manifest_url=manifest_url, repo_url=repo_url)


async def api_manifest(request: web.Request) -> web.Response:
    return json_response(await manifest_data(request))
