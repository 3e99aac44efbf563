"""Projects, repositories, a repository's tags and a manifest: as pages and as JSON."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from regproxy.errors import OCIError
from regproxy.names import RepoName
from regproxy.oci import INDEX_TYPES, Digest, is_digest_reference, parse_manifest
from regproxy.policy import SignatureStatus, is_artifact
from regproxy.referrers import kind_of
from regproxy.registry import Registry
from regproxy.ui import queries
from regproxy.ui.base import (
    PREFIX,
    json_response,
    manifest_url,
    page_args,
    registry_of,
    render,
    repo_url,
    resolve,
    ui_of,
)
from regproxy.ui.format import platform_str
from regproxy.web_keys import POLICY_KEY


# --- projects and repositories -------------------------------------------------------------------
async def projects_page(request: web.Request) -> web.Response:
    rows = await registry_of(request).db.read(queries.projects)
    return render(request, "projects.html", projects=rows)


async def api_projects(request: web.Request) -> web.Response:
    rows = await registry_of(request).db.read(queries.projects)
    return json_response({"projects": [{"name": p, "repositories": n} for p, n in rows]})


def _cursor(request: web.Request) -> tuple[int, dict[str, str]]:
    """(page number, ``after``/``before`` key) of a keyset page: the key says where the page is
    (queries.Page), the number is only shown ("page 3 of 9") and carried by the links. Without
    a key it is the first page."""
    page, _ = page_args(request)
    for key in ("before", "after"):
        value = request.query.get(key)
        if value:
            return page, {key: value[:512]}
    return 1, {}


def _paged(request: web.Request, page: int, per: int, found: queries.Page[Any]) -> dict[str, Any]:
    """The page's numbers and its links to the pages around it (``after=``/``before=``)."""
    pages = max(1, math.ceil(found.total / per))
    page = min(page, pages)

    def link(number: int, **cursor: str) -> str:
        params = {
            k: v for k, v in request.query.items() if k not in ("page", "after", "before") and v
        }
        return f"{request.path}?{urlencode({**params, **cursor, 'page': str(number)})}"

    return {
        "page": page,
        "per_page": per,
        "pages": pages,
        "total": found.total,
        "next": found.next_after,
        "prev": found.prev_before,
        "next_url": link(page + 1, after=found.next_after) if found.next_after else None,
        "prev_url": link(max(1, page - 1), before=found.prev_before) if found.prev_before else None,
    }


async def _repositories(request: web.Request) -> dict[str, Any]:
    registry = registry_of(request)
    await registry.flush_access()  # last pulled: what was served until now
    _, per = page_args(request)
    page, cursor = _cursor(request)
    q = request.query.get("q", "").strip()[:200] or None
    project = request.query.get("project", "").strip()[:200] or None
    found = await registry.db.read(queries.repositories, project=project, q=q, limit=per, **cursor)
    return {
        "q": q or "",
        "project_filter": project or "",
        **_paged(request, page, per, found),
        "rows": found.rows,
    }


async def repositories_page(request: web.Request) -> web.Response:
    data = await _repositories(request)
    return render(
        request,
        "repositories.html",
        r=data,
        prev_url=data["prev_url"],
        next_url=data["next_url"],
        repo_url=repo_url,
    )


async def api_repositories(request: web.Request) -> web.Response:
    data = await _repositories(request)
    data["repositories"] = [r.to_json() for r in data.pop("rows")]
    data.pop("project_filter")
    data.pop("next_url")
    data.pop("prev_url")
    data["project"] = request.query.get("project") or None
    return json_response(data)


# --- a repository's tags -----------------------------------------------------------------------------
async def _read_manifest(registry: Registry, digest: str) -> bytes | None:
    """A manifest's own bytes by digest (one file, never a scan); None when it is gone."""
    try:
        d = Digest.parse(digest)
        return await asyncio.get_running_loop().run_in_executor(None, registry.store.read, d)
    except (OCIError, OSError):
        return None


async def _platforms(registry: Registry, digest: str, media_type: str) -> list[str]:
    if media_type not in INDEX_TYPES:
        return []
    body = await _read_manifest(registry, digest)
    if body is None:
        return []
    try:
        parsed = parse_manifest(body, media_type)
    except OCIError:
        return []
    return [platform_str(m.platform) for m in parsed.manifests if m.platform]


async def _signature(
    request: web.Request, repo: RepoName, digest: str, media_type: str
) -> SignatureStatus | None:
    """Whether the store holds a signature of an image (artifacts and no keys: None)."""
    policy = request.app[POLICY_KEY]
    body = await _read_manifest(registry_of(request), digest)
    if body is None or is_artifact(body, media_type):
        return None
    return await policy.status(repo, digest)


async def _referrers(request: web.Request, repo: RepoName, digest: str) -> list[dict[str, Any]]:
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


async def _tags(request: web.Request, name: str) -> dict[str, Any]:
    ui = ui_of(request)
    registry = registry_of(request)
    await registry.flush_access()  # last pulled: what was served until now
    repo = resolve(request, name)
    info = await registry.db.read(queries.repository, repo.canonical)
    if info is None:
        raise web.HTTPNotFound(text=f"no repository {repo.canonical}")
    _, per = page_args(request)
    page, cursor = _cursor(request)
    found = await registry.db.read(queries.repo_tags, repo.canonical, limit=per, **cursor)
    tags = found.rows
    other = await registry.db.read(queries.untagged, repo.canonical, limit=100)
    now = time.time()
    for row in (*tags, *other):
        row.platforms.extend(await _platforms(registry, row.digest, row.media_type))
    if not repo.is_local:
        for row in tags:
            row.stale = row.checked is not None and now - row.checked > ui.config.tag_ttl
    signatures = {}
    for row in tags:
        status = await _signature(request, repo, row.digest, row.media_type)
        if status is not None:
            signatures[row.digest] = status.to_json()
    return {
        "repository": info,
        "upstream": repo.host,
        **_paged(request, page, per, found),
        "tags": tags,
        "untagged": other,
        "tag_ttl": ui.config.tag_ttl,
        #: digest -> what the store says of its signature (regproxy.policy; empty: no keys)
        "signatures": signatures,
    }


async def repository_page(request: web.Request) -> web.Response:
    data = await _tags(request, request.match_info["name"])
    return render(
        request,
        "repository.html",
        r=data,
        manifest_url=manifest_url,
        prev_url=data["prev_url"],
        next_url=data["next_url"],
    )


async def api_tags(request: web.Request) -> web.Response:
    data = await _tags(request, request.match_info["name"])
    return json_response(
        {
            "repository": data["repository"].to_json(),
            "page": data["page"],
            "per_page": data["per_page"],
            "pages": data["pages"],
            "total": data["total"],
            "next": data["next"],
            "prev": data["prev"],
            "tags": [
                {**t.to_json(), "signature": data["signatures"].get(t.digest)} for t in data["tags"]
            ],
            "untagged": [t.to_json() for t in data["untagged"]],
        }
    )


# --- a manifest ------------------------------------------------------------------------------------------
async def _manifest(request: web.Request) -> dict[str, Any]:
    name, at, digest = request.match_info["ref"].rpartition("@")
    if not at or not is_digest_reference(digest):
        raise web.HTTPNotFound(text="name@digest expected")
    registry = registry_of(request)
    repo = resolve(request, name)
    info = await registry.db.read(queries.manifest_info, repo.canonical, digest)
    if info is None:
        raise web.HTTPNotFound(text=f"{repo.canonical}@{digest} is not in the store")
    body = await _read_manifest(registry, digest)
    signature = await _signature(request, repo, digest, info.media_type)
    platforms: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    config: dict[str, Any] | None = None
    if body is not None:
        try:
            parsed = parse_manifest(body, info.media_type)
        except OCIError:
            parsed = None
        if parsed is not None:
            for m in parsed.manifests:
                platforms.append(
                    {
                        "platform": platform_str(m.platform) if m.platform else None,
                        "digest": str(m.digest),
                        "media_type": m.media_type,
                        "size": m.size,
                        "held": str(m.digest) in info.children_held,
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
        "layers": layers,
        "referrers": await _referrers(request, repo, digest),
        "signature": signature.to_json() if signature is not None else None,
    }


async def manifest_page(request: web.Request) -> web.Response:
    data = await _manifest(request)
    return render(request, "manifest.html", m=data, manifest_url=manifest_url, repo_url=repo_url)


async def api_manifest(request: web.Request) -> web.Response:
    return json_response(await _manifest(request))


# --- the rest ----------------------------------------------------------------------------------------
async def static(request: web.Request) -> web.Response:
    item = ui_of(request).static.get(request.match_info["file"])
    if item is None:
        raise web.HTTPNotFound()
    resp = web.Response(body=item[0], content_type=item[1])
    resp.headers["Cache-Control"] = "max-age=3600"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


async def to_overview(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")
