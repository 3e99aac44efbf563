"""The web page at ``/ui``: log in, see what this host holds, upload a bundle, pin and delete.

Server-side HTML (Jinja2 templates with autoescaping, in ``ui_templates/``), a little CSS and
JavaScript (``ui_static/``, served from memory); every page reads without JavaScript. Everything
ships in the package: no CDN, nothing built at install.

What the page reads: the metadata index (``ui_queries``, on the index thread, paginated), the
metrics, the config and the upstream state of ``health``; a manifest's own bytes by digest for
its platforms and layers. It never lists or scans the blob tree.

Sessions: the login form checks the same users as the registry (:func:`auth.check_login`: wrong
logins are slowed, counted and logged without the password). A session is a random id in a
cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` under TLS) that maps to a
server-side record with an absolute expiry (:data:`SESSION_SECONDS`); logout drops it. Every
POST carries the session's CSRF token (a hidden field, or ``X-CSRF-Token``); the login form uses
a double-submit token of its own. Changes (upload, pin, unpin, delete) need a session of a user
who may change content; Basic credentials only read the JSON routes.

No users configured at all: the registry is open (auth.py warns at start-up). The page is then
open to read, with a banner saying so, and refuses every change: a page that changes content
without anyone logging in would be one more way in for a cross-site request, and an operator who
wants to change content from the browser should configure a user first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.resources
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import BodyPartReader, web

from regproxy import auth, metrics, pins, ui_queries
from regproxy.api import REGISTRY_KEY, RESOLVER_KEY
from regproxy.bundle import BundleError, Importer
from regproxy.config import Config
from regproxy.errors import OCIError
from regproxy.health import Health
from regproxy.names import RepoName
from regproxy.oci import INDEX_TYPES, Digest, is_digest_reference, parse_manifest
from regproxy.registry import Registry

log = logging.getLogger("regproxy.ui")

PREFIX: Final = "/ui"
SESSION_COOKIE: Final = "regproxy_session"
LOGIN_COOKIE: Final = "regproxy_login"
SESSION_SECONDS: Final = 12 * 3600.0
MAX_SESSIONS: Final = 10_000
PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
#: the overview's chart: one sample of the counters every 10 minutes, for 24 hours
SAMPLE_SECONDS: Final = 600.0
SAMPLES: Final = 144
#: store and pinned bytes are aggregate queries: asked at most this often
TOTALS_TTL: Final = 10.0
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# --- sessions ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Session:
    user: str
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    """Server-side sessions by random id; bounded (the oldest go first), absolute expiry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self._clock() + SESSION_SECONDS)
        self._by_id[sid] = session
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        if self._clock() >= session.expires:
            del self._by_id[sid]
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def session_for(self, request: web.Request) -> Session | None:
        return self.get(request.cookies.get(SESSION_COOKIE))

    def user_for(self, request: web.Request) -> str | None:
        """For auth's middleware (:class:`auth.SessionSource`)."""
        session = self.session_for(request)
        return session.user if session is not None else None


# --- counters and their 24 hours -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    hits: float
    misses: float
    served_disk: float
    served_remote: float  # from upstream transfers and peers, as they arrived
    fetched: float


def _sum(metric: Any, **match: str) -> float:
    total = 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if all(s.labels.get(k) == v for k, v in match.items()):
                total += s.value
    return total


def sample_now(now: float | None = None) -> Sample:
    return Sample(
        t=time.time() if now is None else now,
        hits=_sum(metrics.CACHE, result="hit"),
        misses=_sum(metrics.CACHE, result="miss") + _sum(metrics.CACHE, result="stale"),
        served_disk=_sum(metrics.SERVED_BYTES, source="disk"),
        served_remote=_sum(metrics.SERVED_BYTES, source="upstream")
        + _sum(metrics.SERVED_BYTES, source="peer"),
        fetched=_sum(metrics.FETCHED_BYTES),
    )


class History:
    """A ring of counter samples, one per :data:`SAMPLE_SECONDS`, for the overview's chart."""

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque(maxlen=SAMPLES + 1)
        self.samples.append(sample_now())

    def record(self) -> None:
        self.samples.append(sample_now())

    def intervals(self) -> list[dict[str, float]]:
        """Per interval (the last one still open, up to now): bytes from disk and fetched."""
        points = [*self.samples, sample_now()]
        out = []
        for a, b in itertools.pairwise(points):
            out.append(
                {
                    "start": a.t,
                    "end": b.t,
                    "served_disk": max(0.0, b.served_disk - a.served_disk),
                    "fetched": max(0.0, b.fetched - a.fetched),
                    "hits": max(0.0, b.hits - a.hits),
                    "misses": max(0.0, b.misses - a.misses),
                }
            )
        return out[-SAMPLES:]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.record()


def chart(intervals: list[dict[str, float]], now: float) -> dict[str, Any]:
    """Geometry of the overview's SVG: bytes per 10 minutes over the last 24 hours, one slot
    per interval (the open one at the right edge), a blue bar (disk) and an orange one (fetched)."""
    width, height, top = 720.0, 120.0, 14.0
    span = SAMPLES * SAMPLE_SECONDS
    peak = max([1.0, *(max(i["served_disk"], i["fetched"]) for i in intervals)])
    slot = width / SAMPLES
    disk: list[dict[str, float]] = []
    fetched: list[dict[str, float]] = []
    for i in intervals:
        age = max(0.0, now - i["end"])
        right = width - age / span * width
        x = max(0.0, min(width - slot, right - slot))
        for n, (value, out) in enumerate(((i["served_disk"], disk), (i["fetched"], fetched))):
            if value <= 0:
                continue
            h = max(1.5, value / peak * (height - top))
            out.append(
                {
                    "x": round(x + n * slot / 2, 2),
                    "y": round(height - h, 1),
                    "w": round(slot / 2 - 0.3, 2),
                    "h": round(h, 1),
                }
            )
    grid = [
        {"x": round(width * k / 4, 1), "label": f"-{24 - 6 * k} h" if k < 4 else "now"}
        for k in range(5)
    ]
    return {
        "width": width,
        "height": height,
        "disk": disk,
        "fetched": fetched,
        "peak": human_bytes(peak),
        "grid": grid,
        "empty": not disk and not fetched,
    }


# --- formatting ------------------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return "never"
    d = (time.time() if now is None else now) - t
    if d < 0:
        d = 0
    if d < 60:
        return "just now"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    return f"{int(d // 86400)} d ago"


def iso(t: float | None) -> str:
    if not t:
        return ""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def short_digest(d: str | None) -> str:
    if not d:
        return ""
    algo, _, hexa = d.partition(":")
    return f"{algo}:{hexa[:12]}"


def platform_str(p: Mapping[str, Any] | None) -> str:
    if not p:
        return "?"
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += f"/{p['variant']}"
    return s


KIND_NAMES: Final = {
    "application/vnd.oci.image.index.v1+json": "OCI index",
    "application/vnd.oci.image.manifest.v1+json": "OCI manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "Docker manifest list",
    "application/vnd.docker.distribution.manifest.v2+json": "Docker manifest v2",
}


def kind(media_type: str) -> str:
    return KIND_NAMES.get(media_type, media_type)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("regproxy", "ui_templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=human_bytes, ago=ago, iso=iso, short=short_digest, kind=kind, q=quote)
    return env


def _static() -> dict[str, tuple[bytes, str]]:
    types = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
    out = {}
    root = importlib.resources.files("regproxy") / "ui_static"
    for item in root.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in types:
            out[item.name] = (item.read_bytes(), types[suffix])
    return out


# --- state -------------------------------------------------------------------------------------------
class UI:
    def __init__(self, config: Config, health: Health) -> None:
        self.config = config
        self.health = health
        self.sessions = Sessions()
        self.history = History()
        self.env = _env()
        self.static = _static()
        self._totals: tuple[float, dict[str, int]] | None = None


UI_KEY: Final = web.AppKey("ui", UI)


def _ui(request: web.Request) -> UI:
    return request.app[UI_KEY]


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def _session(request: web.Request) -> Session | None:
    return _ui(request).sessions.session_for(request)


def _user(request: web.Request) -> str | None:
    return auth.USER.get()


def _open_mode(request: web.Request) -> bool:
    return bool(request.get(auth.UI_OPEN_MODE))


def _can_change(request: web.Request) -> bool:
    user = _user(request)
    return (
        user is not None
        and _session(request) is not None
        and auth.may_change_content(request.app, user)
    )


def _headers(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    ui = _ui(request)
    session = _session(request)
    flash: list[str] = []
    if session is not None and session.flash:
        flash, session.flash = session.flash, []
    body = ui.env.get_template(template).render(
        user=_user(request),
        csrf=session.csrf if session is not None else "",
        open_mode=_open_mode(request),
        can_change=_can_change(request),
        flash=flash,
        path=request.path,
        prefix=PREFIX,
        project=ui.config.project,
        **ctx,
    )
    resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    _headers(resp)
    return resp


def _json(data: Any, status: int = 200) -> web.Response:
    resp = web.json_response(data, status=status)
    _headers(resp)
    return resp


def _page(request: web.Request) -> tuple[int, int]:
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page = 1
    try:
        per = int(request.query.get("per_page", str(PAGE_SIZE)))
    except ValueError:
        per = PAGE_SIZE
    return page, min(MAX_PAGE_SIZE, max(1, per))


def _resolve(request: web.Request, name: str) -> RepoName:
    try:
        return request.app[RESOLVER_KEY].resolve(name)
    except OCIError:
        raise web.HTTPNotFound(text=f"no repository {name}") from None


def repo_url(name: str) -> str:
    return f"{PREFIX}/repositories/{quote(name)}"


def manifest_url(name: str, digest: str) -> str:
    return f"{PREFIX}/manifests/{quote(name)}@{digest}"


# --- the overview ----------------------------------------------------------------------------------
async def overview_data(request: web.Request) -> dict[str, Any]:
    ui = _ui(request)
    registry = _registry(request)
    index = registry.index
    loop = asyncio.get_running_loop()
    now = time.time()
    total, free = await loop.run_in_executor(None, registry.store.disk_usage)
    if ui._totals is None or now - ui._totals[0] > TOTALS_TTL:
        counts = await registry.index_call(ui_queries.totals, index)
        counts["store_bytes"] = await registry.index_call(index.store_bytes)
        counts["pinned_bytes"] = await registry.index_call(index.pinned_bytes)
        ui._totals = (now, counts)
    counts = ui._totals[1]
    storage = ui.config.storage
    limit = storage.max_size.resolve(total) if storage.max_size else None
    floor = storage.min_free.resolve(total) if storage.min_free else 0
    s = sample_now(now)
    lookups = s.hits + s.misses
    ui.health.upstreams.sample(now)
    seen = ui.health.upstreams.to_json()
    upstreams = []
    matched: set[str] = set()
    for u in ui.config.upstreams:
        hosts = [
            {"source": src, **st}
            for src, st in seen.items()
            if u.matches(src) or src == u.alias or (u.url and src in u.url)
        ]
        matched.update(h["source"] for h in hosts)
        upstreams.append(
            {
                "pattern": u.pattern,
                "url": u.url or None,
                "alias": u.alias,
                "mirrors": list(u.mirrors),
                "sources": hosts,
            }
        )
    others = [{"source": src, **st} for src, st in seen.items() if src not in matched]
    intervals = ui.history.intervals()
    return {
        "time": now,
        "sync": ui.config.sync_enable,
        "project": ui.config.project,
        "store": {
            "used": counts["store_bytes"],
            "limit": limit,
            "min_free": floor,
            "filesystem": total,
            "free": free,
            "pinned": counts["pinned_bytes"],
        },
        "counts": {k: counts[k] for k in ("repositories", "tags", "manifests", "blobs")},
        "cache": {
            "hits": s.hits,
            "misses": s.misses,
            "hit_ratio": (s.hits / lookups) if lookups else None,
            "served_from_disk": s.served_disk,
            "served_from_upstream": s.served_remote,
            "fetched_upstream": s.fetched,
            "inflight_fetches": _sum(metrics.INFLIGHT_FETCHES),
        },
        "upstreams": upstreams,
        "other_sources": others,
        "history": intervals,
    }


async def overview(request: web.Request) -> web.Response:
    data = await overview_data(request)
    store = data["store"]
    used_of = store["limit"] or store["filesystem"] or 1
    return render(
        request,
        "overview.html",
        d=data,
        used_pct=min(100.0, 100.0 * store["used"] / used_of) if used_of else 0.0,
        chart=chart(data["history"], data["time"]),
    )


async def api_overview(request: web.Request) -> web.Response:
    return _json(await overview_data(request))


# --- projects and repositories -------------------------------------------------------------------
async def projects_page(request: web.Request) -> web.Response:
    rows = await _registry(request).index_call(ui_queries.projects, _registry(request).index)
    return render(request, "projects.html", projects=rows)


async def api_projects(request: web.Request) -> web.Response:
    rows = await _registry(request).index_call(ui_queries.projects, _registry(request).index)
    return _json({"projects": [{"name": p, "repositories": n} for p, n in rows]})


async def _repositories(request: web.Request) -> dict[str, Any]:
    registry = _registry(request)
    await registry.flush_access()  # last pulled: what was served until now
    page, per = _page(request)
    q = request.query.get("q", "").strip()[:200] or None
    project = request.query.get("project", "").strip()[:200] or None
    rows, total = await registry.index_call(
        ui_queries.repositories,
        registry.index,
        project=project,
        q=q,
        limit=per,
        offset=(page - 1) * per,
    )
    return {
        "q": q or "",
        "project_filter": project or "",
        "page": page,
        "per_page": per,
        "pages": max(1, math.ceil(total / per)),
        "total": total,
        "rows": rows,
    }


def _page_link(request: web.Request, page: int) -> str:
    params = {k: v for k, v in request.query.items() if k != "page" and v}
    params["page"] = str(page)
    return f"{request.path}?{urlencode(params)}"


async def repositories_page(request: web.Request) -> web.Response:
    data = await _repositories(request)
    return render(
        request,
        "repositories.html",
        r=data,
        prev_url=_page_link(request, data["page"] - 1) if data["page"] > 1 else None,
        next_url=_page_link(request, data["page"] + 1) if data["page"] < data["pages"] else None,
        repo_url=repo_url,
    )


async def api_repositories(request: web.Request) -> web.Response:
    data = await _repositories(request)
    data["repositories"] = [r.to_json() for r in data.pop("rows")]
    data.pop("project_filter")
    data["project"] = request.query.get("project") or None
    return _json(data)


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


async def _tags(request: web.Request, name: str) -> dict[str, Any]:
    ui = _ui(request)
    registry = _registry(request)
    await registry.flush_access()  # last pulled: what was served until now
    repo = _resolve(request, name)
    info = await registry.index_call(ui_queries.repository, registry.index, repo.canonical)
    if info is None:
        raise web.HTTPNotFound(text=f"no repository {repo.canonical}")
    page, per = _page(request)
    tags, total = await registry.index_call(
        ui_queries.repo_tags, registry.index, repo.canonical, limit=per, offset=(page - 1) * per
    )
    other = await registry.index_call(
        ui_queries.untagged, registry.index, repo.canonical, limit=100
    )
    now = time.time()
    for row in (*tags, *other):
        row.platforms.extend(await _platforms(registry, row.digest, row.media_type))
    if not repo.is_local:
        for row in tags:
            row.stale = row.checked is not None and now - row.checked > ui.config.tag_ttl
    return {
        "repository": info,
        "upstream": repo.host,
        "page": page,
        "per_page": per,
        "pages": max(1, math.ceil(total / per)),
        "total": total,
        "tags": tags,
        "untagged": other,
        "tag_ttl": ui.config.tag_ttl,
    }


async def repository_page(request: web.Request) -> web.Response:
    data = await _tags(request, request.match_info["name"])
    return render(
        request,
        "repository.html",
        r=data,
        manifest_url=manifest_url,
        prev_url=_page_link(request, data["page"] - 1) if data["page"] > 1 else None,
        next_url=_page_link(request, data["page"] + 1) if data["page"] < data["pages"] else None,
    )


async def api_tags(request: web.Request) -> web.Response:
    data = await _tags(request, request.match_info["name"])
    return _json(
        {
            "repository": data["repository"].to_json(),
            "page": data["page"],
            "per_page": data["per_page"],
            "pages": data["pages"],
            "total": data["total"],
            "tags": [t.to_json() for t in data["tags"]],
            "untagged": [t.to_json() for t in data["untagged"]],
        }
    )


# --- a manifest ------------------------------------------------------------------------------------------
async def _manifest(request: web.Request) -> dict[str, Any]:
    name, at, digest = request.match_info["ref"].rpartition("@")
    if not at or not is_digest_reference(digest):
        raise web.HTTPNotFound(text="name@digest expected")
    registry = _registry(request)
    repo = _resolve(request, name)
    info = await registry.index_call(
        ui_queries.manifest_info, registry.index, repo.canonical, digest
    )
    if info is None:
        raise web.HTTPNotFound(text=f"{repo.canonical}@{digest} is not in the store")
    body = await _read_manifest(registry, digest)
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
        "referrers": [
            {"digest": d, "media_type": mt, "artifact_type": at_, "size": sz}
            for d, mt, at_, sz in info.referrers
        ],
    }


async def manifest_page(request: web.Request) -> web.Response:
    data = await _manifest(request)
    return render(request, "manifest.html", m=data, manifest_url=manifest_url, repo_url=repo_url)


async def api_manifest(request: web.Request) -> web.Response:
    return _json(await _manifest(request))


# --- login, logout --------------------------------------------------------------------------------
def _cookie(
    resp: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int
) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_ui(request).config.tls.enabled,
    )


def _safe_next(target: str | None) -> str:
    if target and target.startswith(PREFIX + "/") and "//" not in target and "\\" not in target:
        return target
    return PREFIX + "/"


async def login_page(request: web.Request) -> web.Response:
    if _session(request) is not None:
        raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
    token = secrets.token_urlsafe(24)
    resp = render(
        request,
        "login.html",
        login_token=token,
        next=_safe_next(request.query.get("next")),
        error=None,
        users=request.app[auth.USERS_KEY].enabled,
    )
    _cookie(resp, request, LOGIN_COOKIE, token, 3600)
    return resp


async def login_post(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = str(form.get("login_token", ""))
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not token or not cookie or not hmac.compare_digest(token, cookie):
        return _refused(request, "the login form expired; load it again")
    user = str(form.get("username", ""))[:256]
    password = str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "")))
    if not user or not await auth.check_login(request.app, user, password, remote=request.remote):
        fresh = secrets.token_urlsafe(24)
        resp = render(
            request,
            "login.html",
            status=401,
            login_token=fresh,
            next=target,
            error="Wrong user name or password.",
            users=request.app[auth.USERS_KEY].enabled,
            username=user,
        )
        _cookie(resp, request, LOGIN_COOKIE, fresh, 3600)
        return resp
    ui = _ui(request)
    ui.sessions.drop(request.cookies.get(SESSION_COOKIE))
    sid, _ = ui.sessions.create(user)
    log.info("ui.login user=%r remote=%s", user, request.remote)
    resp = web.Response(status=303, headers={"Location": target})
    _cookie(resp, request, SESSION_COOKIE, sid, int(SESSION_SECONDS))
    resp.del_cookie(LOGIN_COOKIE, path="/")
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    session = await _checked(request, await request.post())
    ui = _ui(request)
    ui.sessions.drop(request.cookies.get(SESSION_COOKIE))
    log.info("ui.logout user=%r remote=%s", session.user, request.remote)
    resp = web.Response(status=303, headers={"Location": f"{PREFIX}/login"})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


# --- changes: a session, its CSRF token, a user who may change content --------------------------------
def _refused(request: web.Request, why: str, status: int = 403) -> web.Response:
    if _wants_json(request):
        return _json({"error": why}, status=status)
    return render(request, "error.html", status=status, message=why)


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or request.path.startswith(
        PREFIX + "/api/"
    )


class Refused(Exception):
    def __init__(self, why: str, status: int = 403) -> None:
        super().__init__(why)
        self.why, self.status = why, status


async def _checked(request: web.Request, form: Mapping[str, Any] | None = None) -> Session:
    """The request's session when its CSRF token matches (header or form field)."""
    if _open_mode(request):
        raise Refused("no users are configured: the page is read-only (see README, web page)")
    session = _session(request)
    if session is None:
        raise Refused("log in first", 401)
    token = request.headers.get("X-CSRF-Token")
    if token is None and form is not None:
        token = str(form.get("csrf", ""))
    if not token or not hmac.compare_digest(token, session.csrf):
        log.warning(
            "ui.csrf_refused user=%r remote=%s path=%s", session.user, request.remote, request.path
        )
        raise Refused("missing or wrong CSRF token; reload the page", 403)
    return session


async def _changer(request: web.Request, form: Mapping[str, Any] | None) -> Session:
    session = await _checked(request, form)
    if not auth.may_change_content(request.app, session.user):
        raise Refused(f"{session.user!r} may not change content")
    return session


def refusals(handler: Any) -> Any:
    """Answer a page's Refused (a wrapper per UI route, not a middleware every /v2 request
    would pay for)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except Refused as exc:
            return _refused(request, exc.why, exc.status)

    return guarded


async def change(request: web.Request) -> web.StreamResponse:
    """POST /ui/pin, /ui/unpin, /ui/delete: ``repo`` and ``ref`` (a tag or a digest)."""
    form = await request.post()
    session = await _changer(request, form)
    action = request.match_info["action"]
    name, ref = str(form.get("repo", "")), str(form.get("ref", ""))
    repo = _resolve(request, name)
    registry = _registry(request)
    try:
        if action == "pin":
            done = await pins.pin(registry, repo, ref)
            msg = f"Pinned {repo.canonical}{_sep(ref)}{ref} ({len(done)} manifest(s))."
        elif action == "unpin":
            done = await pins.unpin(registry, repo, ref)
            msg = f"Unpinned {repo.canonical}{_sep(ref)}{ref} ({len(done)} manifest(s))."
        else:
            await registry.delete_manifest(repo, ref)
            what = "manifest" if is_digest_reference(ref) else "tag"
            msg = (
                f"Deleted {what} {repo.canonical}{_sep(ref)}{ref}; unreferenced bytes go at the "
                "next eviction or gc."
            )
    except OCIError as exc:
        return _refused(request, f"{action} {repo.canonical}{_sep(ref)}{ref}: {exc}", 404)
    _ui(request)._totals = None
    log.info("ui.%s user=%r repo=%s ref=%s", action, session.user, repo.canonical, ref)
    if _wants_json(request):
        return _json({"ok": True, "message": msg})
    session.flash.append(msg)
    back = repo_url(repo.canonical)
    if action != "delete" and is_digest_reference(ref):
        back = manifest_url(repo.canonical, ref)
    raise web.HTTPSeeOther(back)


def _sep(ref: str) -> str:
    return "@" if is_digest_reference(ref) else ":"


# --- upload a bundle ------------------------------------------------------------------------------------
async def upload_page(request: web.Request) -> web.Response:
    return render(request, "upload.html")


async def upload_post(request: web.Request) -> web.StreamResponse:
    """A multipart form (csrf, optional name, then the file), streamed into the importer."""
    if not request.content_type.startswith("multipart/"):
        await _changer(request, None)  # a token in X-CSRF-Token, or refused first
        return _refused(request, "a multipart/form-data upload is expected", 400)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    file_part: BodyPartReader | None = None
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            continue
        if part.filename is not None or part.name == "bundle":
            file_part = part
            break
        fields[str(part.name)] = (await part.read(decode=True))[:4096].decode("utf-8", "replace")
    session = await _changer(request, fields)  # before a byte of the file is read
    if file_part is None:
        return _refused(request, "no bundle file in the form", 400)
    name = fields.get("name", "").strip() or None
    importer = Importer(_registry(request), request.app[RESOLVER_KEY], name=name)
    part = file_part

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            chunk = await part.read_chunk(1024 * 1024)
            if not chunk:
                return
            yield chunk

    try:
        summary = await importer.import_stream(chunks())
    except BundleError as exc:
        log.warning("import.refused user=%r remote=%s error=%s", session.user, request.remote, exc)
        if _wants_json(request):
            return _json({"error": str(exc)}, status=400)
        return render(request, "upload.html", status=400, error=str(exc))
    _ui(request)._totals = None
    log.info("import.ui user=%r remote=%s %s", session.user, request.remote, summary)
    result = summary.to_json()
    if _wants_json(request):
        return _json(result)
    return render(request, "upload.html", summary=result, links=_image_links(result["images"]))


def _image_links(images: list[str]) -> list[tuple[str, str]]:
    out = []
    for image in images:
        name = image.split("@", 1)[0]
        last = name.rsplit("/", 1)
        if ":" in last[-1]:
            name = name.rsplit(":", 1)[0]
        out.append((image, repo_url(name)))
    return out


# --- the rest ----------------------------------------------------------------------------------------
async def static(request: web.Request) -> web.Response:
    item = _ui(request).static.get(request.match_info["file"])
    if item is None:
        raise web.HTTPNotFound()
    resp = web.Response(body=item[0], content_type=item[1])
    resp.headers["Cache-Control"] = "max-age=3600"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


async def to_overview(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


async def _history_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[UI_KEY].history.run(), name="ui-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application, config: Config, health: Health) -> None:
    """The page's state, its routes, and its sessions for auth's middleware."""
    ui = UI(config, health)
    app[UI_KEY] = ui
    app[auth.UI_SESSIONS_KEY] = ui.sessions
    app.cleanup_ctx.append(_history_ctx)
    r = app.router
    r.add_get(PREFIX, refusals(to_overview))
    r.add_get(PREFIX + "/", refusals(overview))
    r.add_get(PREFIX + "/login", refusals(login_page))
    r.add_post(PREFIX + "/login", refusals(login_post))
    r.add_post(PREFIX + "/logout", refusals(logout))
    r.add_get(PREFIX + "/projects", refusals(projects_page))
    r.add_get(PREFIX + "/repositories", refusals(repositories_page))
    r.add_get(PREFIX + "/repositories/{name:.+}", refusals(repository_page))
    r.add_get(PREFIX + "/manifests/{ref:.+}", refusals(manifest_page))
    r.add_get(PREFIX + "/upload", refusals(upload_page))
    r.add_post(PREFIX + "/upload", refusals(upload_post))
    r.add_post(PREFIX + "/{action:pin|unpin|delete}", refusals(change))
    r.add_get(PREFIX + "/static/{file}", refusals(static))
    r.add_get(PREFIX + "/api/overview", refusals(api_overview))
    r.add_get(PREFIX + "/api/projects", refusals(api_projects))
    r.add_get(PREFIX + "/api/repositories", refusals(api_repositories))
    r.add_get(PREFIX + "/api/repositories/{name:.+}/tags", refusals(api_tags))
    r.add_get(PREFIX + "/api/manifests/{ref:.+}", refusals(api_manifest))
