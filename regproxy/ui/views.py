"""Projects, repositories, a repository's tags, what eviction takes next: pages and JSON."""

from __future__ import annotations

import math
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from regproxy.ui import queries, served, tag_list
from regproxy.ui.base import (
    PREFIX,
    Refused,
    json_response,
    manifest_url,
    page_args,
    registry_of,
    render,
    repo_url,
    resolve,
    ui_of,
)
from regproxy.ui.evicting import eviction_order
from regproxy.ui.manifest import platforms_of, signature_of
from regproxy.ui.pulls import commands

#: rows of the "next to be evicted" view
EVICT_ROWS: Final = 50


# --- projects and repositories -------------------------------------------------------------------
async def projects_page(request: web.Request) -> web.Response:
    rows = await registry_of(request).db.read(queries.projects)
    if len(rows) == 1 and not request.query.get("all"):
        # one project (the usual host): its repositories are the page to show
        raise web.HTTPSeeOther(f"{PREFIX}/repositories?{urlencode({'project': rows[0][0]})}")
    return render(request, "projects.html", projects=rows)


async def api_projects(request: web.Request) -> web.Response:
    rows = await registry_of(request).db.read(queries.projects)
    return json_response({"projects": [{"name": p, "repositories": n} for p, n in rows]})


def _choice(request: web.Request, key: str, allowed: Any, default: str) -> str:
    value = request.query.get(key, default)
    return value if value in allowed else default


def _cursor(request: web.Request) -> tuple[int, dict[str, str]]:
    """(page number, ``after``/``before`` key) of a keyset page: the key says where the page is
    (queries.Page), the number is only shown ("page 3 of 9") and carried by the links.
    Without a key it is the first page."""
    page, _ = page_args(request)
    for key in ("before", "after"):
        value = request.query.get(key)
        if value:
            return page, {key: value[:512]}
    return 1, {}


def _paged(request: web.Request, page: int, per: int, found: queries.Page[Any]) -> dict[str, Any]:
    """The page's numbers and its links to the pages around it: ``after=``/``before=`` the key
    of the row at the edge (the ``page=`` number beside it is only shown)."""
    pages = max(1, math.ceil(found.total / per))
    page = min(page, pages)

    def link(number: int, **cursor: str) -> str:
        params = {
            k: v for k, v in request.query.items() if k not in ("page", "after", "before") and v
        }
        return f"{request.path}?{urlencode({**params, **cursor, 'page': str(number)})}"

    nxt = link(page + 1, after=found.next_after) if found.next_after else None
    prev = link(max(1, page - 1), before=found.prev_before) if found.prev_before else None
    return {
        "page": page,
        "per_page": per,
        "pages": pages,
        "total": found.total,
        "next": found.next_after,
        "prev": found.prev_before,
        "next_url": nxt,
        "prev_url": prev,
    }


async def _read_page(registry: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
    """A keyset page from the index; a key in the URL that is not one of the order's is a 400
    (a hand-edited or truncated link), never a 500."""
    try:
        return await registry.db.read(query, *args, **kwargs)
    except queries.BadKey as exc:
        raise Refused(f"{exc}: follow the page's Next / Previous links", 400) from None


async def _repositories(request: web.Request) -> dict[str, Any]:
    registry = registry_of(request)
    _, per = page_args(request)
    q = request.query.get("q", "").strip()[:200] or None
    project = request.query.get("project", "").strip()[:200] or None
    sort = _choice(request, "sort", queries.REPO_SORTS, "name")
    if sort == "pulled":
        await registry.flush_access()  # the order needs what was served until now
    page, where = _cursor(request)  # keyset pages in every order (queries.repositories)
    unflushed = registry.unflushed_access()  # before the read: see served.py
    found = await _read_page(
        registry, queries.repositories, project=project, q=q, limit=per, sort=sort, **where
    )
    return {
        "q": q or "",
        "project_filter": project or "",
        "sort": sort,
        **_paged(request, page, per, found),
        "rows": served.repos(found.rows, unflushed),
    }


def _sort_link(request: web.Request, key: str, value: str) -> str:
    params = {
        k: v for k, v in request.query.items() if k not in (key, "page", "after", "before") and v
    }
    params[key] = value
    return f"{request.path}?{urlencode(params)}"


async def repositories_page(request: web.Request) -> web.Response:
    data = await _repositories(request)
    return render(
        request,
        "repositories.html",
        r=data,
        prev_url=data["prev_url"],
        next_url=data["next_url"],
        repo_url=repo_url,
        link=lambda k, v: _sort_link(request, k, v),
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
def stale_tags(registry: Any, repo: str) -> dict[str, float]:
    """Tags of the repository served stale (the upstream could not confirm them), and when."""
    stale = getattr(registry, "stale_served", None) or {}
    return {tag: when for (r, tag), when in list(stale.items()) if r == repo}


async def _tags(request: web.Request, name: str) -> dict[str, Any]:
    ui = ui_of(request)
    registry = registry_of(request)
    repo = resolve(request, name)
    sort = _choice(request, "sort", tag_list.TAG_ORDERS, "name")
    if sort == "pulled":
        await registry.flush_access()  # the order needs what was served until now
    unflushed = registry.unflushed_access()  # before the reads: see served.py
    info = await registry.db.read(queries.repository, repo.canonical)
    if info is None:
        raise Refused(f"no repository {repo.canonical} in the store", 404)
    _, per = page_args(request)
    show = _choice(request, "show", (*tag_list.TAG_FILTERS, "stale"), "all")
    page, where = _cursor(request)  # keyset pages in every order (tag_list.repo_tags)
    stale = stale_tags(registry, repo.canonical)
    found = await _read_page(
        registry,
        tag_list.repo_tags,
        repo.canonical,
        limit=per,
        sort=sort,
        show="all" if show == "stale" else show,
        only=sorted(stale) if show == "stale" else None,
        every=info.tags,  # the repository's tags, just counted
        **where,
    )
    tags = found.rows
    other = await registry.db.read(queries.untagged, repo.canonical, limit=100)
    # last pulled: the index's times and what was served since they were written
    info = served.repo(info, unflushed)
    served.tags(repo.canonical, (*tags, *other), unflushed)
    for row in (*tags, *other):
        row.platforms.extend(await platforms_of(registry, row.digest, row.media_type))
    for row in tags:
        # stale: served stale since the last time the upstream confirmed the tag
        when = stale.get(row.tag or "")
        row.stale = when is not None and when >= (row.checked or 0.0)
    if show == "stale":
        found.total -= sum(1 for row in tags if not row.stale)
        tags = found.rows = [row for row in tags if row.stale]
    signatures = {}
    for row in tags:
        status = await signature_of(request, repo, row.digest, row.media_type)
        if status is not None:
            signatures[row.digest] = status.to_json()
    tls = ui.config.tls.enabled
    return {
        "repository": info,
        "upstream": repo.host,
        "sort": sort,
        "show": show,
        **_paged(request, page, per, found),
        "tags": tags,
        "untagged": other,
        "tag_ttl": ui.config.tag_ttl,
        #: digest -> what the store says of its signature (regproxy.policy; empty: no keys)
        "signatures": signatures,
        "pull": {
            row.tag: commands(repo, row.tag, request.host, tls=tls) for row in tags if row.tag
        },
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
        link=lambda k, v: _sort_link(request, k, v),
    )


async def api_tags(request: web.Request) -> web.Response:
    data = await _tags(request, request.match_info["name"])
    return json_response(
        {
            "repository": data["repository"].to_json(),
            "sort": data["sort"],
            "show": data["show"],
            "page": data["page"],
            "per_page": data["per_page"],
            "pages": data["pages"],
            "total": data["total"],
            "next": data["next"],
            "prev": data["prev"],
            "tags": [
                {
                    **t.to_json(),
                    "signature": data["signatures"].get(t.digest),
                    "pull": [c.to_json() for c in data["pull"].get(t.tag, [])],
                }
                for t in data["tags"]
            ],
            "untagged": [t.to_json() for t in data["untagged"]],
        }
    )


# --- what eviction takes next ------------------------------------------------------------------------
async def _eviction(request: web.Request) -> dict[str, Any]:
    registry = registry_of(request)
    ui = ui_of(request)
    unflushed = dict(registry.unflushed_access())  # before the read: see served.py
    rows = await registry.db.read(
        eviction_order,
        limit=EVICT_ROWS,
        loose_age=ui.config.storage.upload_ttl,
        # what was served since access times were last written: not waited for (a write of
        # thousands of rows on a busy host), put last in the order instead (a copy: read on
        # the reader's thread)
        served=unflushed,
    )
    return {"rows": rows, "limit": EVICT_ROWS}


async def eviction_page(request: web.Request) -> web.Response:
    data = await _eviction(request)
    return render(request, "evict.html", e=data, manifest_url=manifest_url, repo_url=repo_url)


async def api_eviction(request: web.Request) -> web.Response:
    data = await _eviction(request)
    return json_response({"next": [r.to_json() for r in data["rows"]]})


# --- the rest ----------------------------------------------------------------------------------------
async def static(request: web.Request) -> web.Response:
    item = ui_of(request).static.get(request.match_info["file"])
    if item is None:
        raise web.HTTPNotFound()
    resp = web.Response(body=item[0], content_type=item[1])
    resp.headers["Cache-Control"] = "max-age=3600"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


async def not_found(request: web.Request) -> web.StreamResponse:
    raise Refused(f"no page {request.path}", 404)


async def to_overview(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")
