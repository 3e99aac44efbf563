"""The OCI Distribution API (``/v2/``): routing, names, headers, OCI errors. Knows no files.

Endpoints end-1 ... end-13 of https://github.com/opencontainers/distribution-spec/blob/main/spec.md
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import quote, unquote

from aiohttp import web

from regproxy import pins, sendfile
from regproxy.access import body_bytes
from regproxy.byte_ranges import MAX_POSITION_DIGITS, parse_range
from regproxy.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameInvalid,
    OCIError,
    RangeNotSatisfiable,
    SizeInvalid,
    TagInvalid,
    Unsupported,
    UpstreamError,
)
from regproxy.expect import defer_continue
from regproxy.headers import API_VERSION, CONTENT_DIGEST, INSTANCE_HEADER, PEER_FETCH, PEER_HEADER
from regproxy.names import NameResolver, RepoName
from regproxy.oci import (
    MAX_MANIFEST_BYTES,
    MAX_TAGS,
    OCI_INDEX,
    Digest,
    is_digest_reference,
    validate_tag,
)
from regproxy.policy import cosign_tag_subject
from regproxy.registry import HOME_REQUEST, LOCAL_ONLY, NOTES, PROBE, Blob, Registry
from regproxy.request_limits import app_metrics, body_chunks
from regproxy.web_errors import NotFound
from regproxy.web_keys import POLICY_KEY, REGISTRY_KEY, RESOLVER_KEY
from regproxy.web_keys import notes as _notes

log = logging.getLogger("regproxy.api")

#: the second-to-last part of a path under /v2/<name>/ -> (route, the last part's name)
_LAST_PARTS: Final = {
    "blobs": ("blob", "digest"),
    "manifests": ("manifest", "ref"),
    "referrers": ("referrers", "digest"),
}
_UPLOADS: Final = "/blobs/uploads"
_CONTENT_RANGE_RE: Final = re.compile(r"^(?:bytes )?(\d+)-(\d+)$", re.ASCII)


class PaginationInvalid(OCIError):
    code, http_status, message = (
        "PAGINATION_NUMBER_INVALID",
        400,
        "invalid number of results requested",
    )


# --- helpers ------------------------------------------------------------------------------------------
def _ctx(request: web.Request) -> tuple[Registry, NameResolver]:
    return request.app[REGISTRY_KEY], request.app[RESOLVER_KEY]


def _repo(request: web.Request, name: str) -> RepoName:
    # only the name's own part: an encoded slash in a tag is the tag's error, not the name's
    notes = _notes(request)
    raw = str(notes.get("raw_name", request.rel_url.raw_path)).lower()
    if "%2f" in raw or "%2e" in raw or "%5c" in raw or "\\" in name:
        raise NameInvalid(name, "encoded separators are not allowed")
    resolver = request.app[RESOLVER_KEY]
    ns = request.query.get("ns")
    repo = resolver.resolve(name, ns)
    notes["repo"] = repo.canonical
    return repo


def _digest(text: str) -> Digest:
    return Digest.parse(text)


def _page(request: web.Request) -> tuple[int | None, str | None]:
    n_text = request.query.get("n")
    n: int | None = None
    if n_text is not None:
        if not (n_text.isascii() and n_text.isdigit() and len(n_text) <= 6) or (
            int(n_text) > 100_000
        ):
            raise PaginationInvalid(f"n={n_text[:20]!r} must be an integer 0..100000")
        n = int(n_text)
    return n, request.query.get("last")


def _link(path: str, n: int, last: str, extra: str = "") -> str:
    return f'<{path}?n={n}&last={quote(last, safe="")}{extra}>; rel="next"'


def _content_length(request: web.Request) -> int | None:
    cl = request.headers.get("Content-Length")
    if cl is None:
        return None
    if not (cl.isascii() and cl.isdigit() and len(cl) <= MAX_POSITION_DIGITS):
        raise SizeInvalid(f"Content-Length {cl[:40]!r}")
    return int(cl)


def _has_body(request: web.Request) -> bool:
    cl = request.headers.get("Content-Length")
    return (cl is not None and cl != "0") or "chunked" in request.headers.get(
        "Transfer-Encoding", ""
    )


# --- base ------------------------------------------------------------------------------------------
async def v2_base(request: web.Request) -> web.Response:
    return web.json_response({}, headers=API_VERSION)


async def catalog(request: web.Request) -> web.Response:
    registry, _ = _ctx(request)
    n, last = _page(request)
    # without n, at most MAX_TAGS names too (more are paged with Link, which clients follow):
    # one request never makes the whole store's repository list in memory
    n = MAX_TAGS if n is None else min(n, MAX_TAGS)
    names = await registry.catalog(n + 1, last)
    headers = dict(API_VERSION)
    if len(names) > n:
        names = names[:n]
        if names:  # n=0 asks for nothing, and there is no last entry to continue from
            headers["Link"] = _link("/v2/_catalog", n, names[-1])
    return web.json_response({"repositories": names}, headers=headers)


def _asking_peer(request: web.Request) -> tuple[Any, Any] | None:
    """The peer of this host's list that sent a peer-marked request, if it is one
    (regproxy.peers.Peers.asking; the proxy registry holds the peers)."""
    peers: Any = getattr(request.app[REGISTRY_KEY], "peers", None)
    if peers is None:
        return None
    peer = peers.asking(request.remote, request.headers.get(INSTANCE_HEADER))
    return None if peer is None else (peers, peer)


async def dispatch(request: web.Request) -> web.StreamResponse:
    notes = _notes(request)  # the one per-request store (auth may have put the user in it)
    NOTES.set(notes)
    mark = request.headers.get(PEER_HEADER)
    peer = None
    if mark:
        peer = _asking_peer(request)
    if mark == PEER_FETCH:
        # a peer asks this host as the home host: the store, a transfer in flight or this
        # host's own upstream may answer, never another peer (regproxy.cluster)
        HOME_REQUEST.set(True)
        notes["peer"] = "fetch"
        app_metrics(request.app).served_peer("fetch")
    elif mark:
        # a peer's lookup: answer from the local store only, never forward (no circles)
        LOCAL_ONLY.set(True)
        notes["peer"] = "lookup"
        app_metrics(request.app).served_peer("lookup")
    # Route on the raw path, then decode each part: an encoded slash inside a tag or digest
    # must not shift the route (it is then invalid in its own part, with that part's error).
    routed = route(request.rel_url.raw_path.removeprefix("/v2/"))
    if routed is None:
        notes["route"] = "unknown"
        raise NotFound(request.path)
    kind, parts = routed
    notes["route"] = kind
    notes["raw_name"] = parts["name"]
    handler = _HANDLERS.get((kind, request.method))
    if handler is None:
        raise Unsupported(f"{request.method} is not allowed on {kind}")
    resp = await handler(request, **{k: unquote(v) if "%" in v else v for k, v in parts.items()})
    if peer is not None:  # what went (a stream) or goes (a body) to a peer of the list
        peer[0].served_to(peer[1], body_bytes(request, resp))
    return resp


def route(path: str) -> tuple[str, dict[str, str]] | None:
    """The route of a raw path after ``/v2/`` and its raw parts, by the path's last parts:
    ``<name>/blobs/uploads/<uid>``, ``<name>/blobs/<digest>``, ``<name>/manifests/<ref>``,
    ``<name>/tags/list``, ``<name>/referrers/<digest>`` (``name`` is never empty; the last part
    only of an upload may be). String splits, not a regular expression per route: this runs for
    every request."""
    head, _, last = path.rpartition("/")
    if head.endswith(_UPLOADS) and len(head) > len(_UPLOADS):
        return "upload", {"name": head[: -len(_UPLOADS)], "uid": last}
    name, _, part = head.rpartition("/")
    if not name:
        return None
    if part == "tags":
        return ("tags", {"name": name}) if last == "list" else None
    known = _LAST_PARTS.get(part)
    if known is None or not last:
        return None
    return known[0], {"name": name, known[1]: last}


# --- blobs -----------------------------------------------------------------------------------------
def _blob_headers(blob: Blob) -> dict[str, str]:
    return {
        **API_VERSION,
        CONTENT_DIGEST: str(blob.digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Cache-Control": "max-age=31536000",
        "ETag": f'"{blob.digest}"',
    }


async def get_blob(request: web.Request, name: str, digest: str) -> web.StreamResponse:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    d = _digest(digest)
    # a HEAD asks "do you have it?" (as a push does): not a pull, not a cache lookup
    PROBE.set(request.method == "HEAD")
    try:
        if request.method == "HEAD":  # asks upstream with a HEAD too: nothing is downloaded
            blob = await registry.head_blob(repo, d)
        else:
            blob = await registry.get_blob(repo, d)
    except UpstreamError as exc:
        if request.method != "HEAD":
            raise
        # HEAD is how a pushing client asks "do you have it?": with the upstream unreachable
        # the honest answer for this host is no, so the client uploads (a 502 fails the push)
        log.info("blob.head_unknown digest=%s repo=%s upstream_error=%s", d, repo, exc)
        raise BlobUnknown(str(d)) from None
    _notes(request).setdefault("cache", "hit")
    headers = _blob_headers(blob)
    rng = parse_range(request.headers.get("Range"), blob.size)
    if request.headers.get("If-None-Match") in (f'"{blob.digest}"', str(blob.digest)):
        return web.Response(status=304, headers=headers)
    if blob.data is not None:
        app_metrics(request.app).served(
            "blob", "disk", 0 if request.method == "HEAD" else blob.size
        )
        if rng is None:
            return web.Response(body=blob.data, headers=headers)
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return web.Response(status=206, body=blob.data[start : end + 1], headers=headers)
    if blob.file is not None:
        try:
            return await sendfile.send_file(
                request, blob.digest, blob.size, blob.file, headers, rng
            )
        except BlobUnknown:
            # listed but gone from disk (fsck, eviction, damage): forget it, and answer as for
            # any miss (a repository with an upstream or peers fetches it again)
            if _notes(request).get("lost"):
                raise
            _notes(request)["lost"] = "1"
            await registry.forget_lost_blob(repo, d)
            return await get_blob(request, name, digest)
    return await _stream_blob(request, blob, headers, rng)


async def _stream_blob(
    request: web.Request, blob: Blob, headers: dict[str, str], rng: tuple[int, int] | None
) -> web.StreamResponse:
    """Serve a blob that is still arriving from upstream, as its bytes land."""
    if blob.size == 0 and request.method != "HEAD":
        # no last byte to hold back: an empty body is complete with its headers, so it is
        # answered only once verified (a source that sends nothing for a digest is refused)
        await blob.stream.wait_done()
    elif request.method != "HEAD":
        await blob.stream.wait_begun()
    start, end = rng if rng is not None else (0, blob.size - 1)
    status = 200 if rng is None else 206
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start + 1
    await resp.prepare(request)
    if request.method == "HEAD" or blob.size == 0:
        await resp.write_eof()
        return resp
    sent = 0

    def counted(n: int) -> None:
        nonlocal sent
        sent += n
        # the transfer's source kind (upstream or peer), read as the bytes go out
        source = "upstream" if blob.stream.kind == "upstream" else "peer"
        app_metrics(request.app).served("blob", source, n)

    try:
        async with contextlib.aclosing(blob.stream.spans(start, end, blob.size)) as spans:
            await sendfile.send_spans(request, resp, spans, counted)
    except (OCIError, *sendfile.SEND_ERRORS) as exc:
        # Never finish a response with wrong or missing bytes: cut the connection.
        sendfile.note_cut(request, blob.digest, exc)
        if request.transport is not None:
            request.transport.abort()
        return resp
    finally:
        sendfile.note_body(request, sent)
    await resp.write_eof()
    return resp


async def delete_blob(request: web.Request, name: str, digest: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    await registry.delete_blob(repo, _digest(digest))
    return web.Response(status=202, headers={**API_VERSION, "Content-Length": "0"})


# --- uploads ---------------------------------------------------------------------------------------
def _where(request: web.Request, name: str, repo: RepoName) -> str:
    """The name for Location headers: the client's own (it resolves to the same repository, and
    clients may compare it with what they asked for), canonical when ``?ns=`` picked the host."""
    return repo.canonical if request.query.get("ns") else name


def _upload_headers(where: str, uid: str, offset: int) -> dict[str, str]:
    return {
        **API_VERSION,
        "Location": f"/v2/{where}/blobs/uploads/{uid}",
        "Range": f"0-{max(offset - 1, 0)}",
        "Docker-Upload-UUID": uid,
    }


def _blob_created(where: str, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={
            **API_VERSION,
            "Location": f"/v2/{where}/blobs/{digest}",
            CONTENT_DIGEST: str(digest),
        },
    )


async def post_upload(request: web.Request, name: str, uid: str) -> web.Response:
    if uid:
        raise Unsupported("POST goes to /blobs/uploads/ without a session id")
    registry, resolver = _ctx(request)
    repo = _repo(request, name)
    q = request.query
    if "mount" in q:
        digest = _digest(q["mount"])
        source = resolver.resolve(q["from"]) if q.get("from") else None
        if await registry.mount_blob(repo, digest, source):
            return _blob_created(_where(request, name, repo), digest)
    elif "digest" in q:
        digest = _digest(q["digest"])
        await registry.uploads.monolithic(
            repo, digest, body_chunks(request), _content_length(request)
        )
        return _blob_created(_where(request, name, repo), digest)
    new = await registry.uploads.start(repo)
    return web.Response(status=202, headers=_upload_headers(_where(request, name, repo), new, 0))


def _content_range(request: web.Request) -> tuple[int | None, int | None]:
    header = request.headers.get("Content-Range")
    if header is None:
        return None, None
    m = _CONTENT_RANGE_RE.match(header.strip())
    if (
        not m
        or max(len(m.group(1)), len(m.group(2))) > MAX_POSITION_DIGITS
        or int(m.group(2)) < int(m.group(1))
    ):
        raise BlobUploadInvalid(f"malformed Content-Range {header[:80]!r}")
    start, end = int(m.group(1)), int(m.group(2))
    cl = _content_length(request)
    if cl is not None and cl != end - start + 1:
        raise SizeInvalid(f"Content-Range {header!r} is not Content-Length {cl}")
    return start, end


async def patch_upload(request: web.Request, name: str, uid: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    if not uid:
        raise Unsupported("PATCH needs an upload session id")
    start, end = _content_range(request)
    if start is None:
        registry.uploads.offset(repo, uid)  # 404 for an unknown session before reading a body
    offset = await registry.uploads.append(
        repo, uid, body_chunks(request), start=start, end=end, length=_content_length(request)
    )
    return web.Response(
        status=202, headers=_upload_headers(_where(request, name, repo), uid, offset)
    )


async def put_upload(request: web.Request, name: str, uid: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    if not uid:
        raise Unsupported("PUT needs an upload session id")
    registry.uploads.offset(repo, uid)
    if "digest" not in request.query:
        raise DigestInvalid("", "the digest query parameter is required to finish an upload")
    digest = _digest(request.query["digest"])
    start, _end = _content_range(request)
    if start is not None and start != registry.uploads.offset(repo, uid):
        raise RangeNotSatisfiable("chunk out of order", offset=registry.uploads.offset(repo, uid))
    chunks = body_chunks(request) if _has_body(request) else None
    await registry.uploads.finish(repo, uid, digest, chunks, _content_length(request))
    return _blob_created(_where(request, name, repo), digest)


async def get_upload(request: web.Request, name: str, uid: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    offset = registry.uploads.offset(repo, uid)
    return web.Response(
        status=204, headers=_upload_headers(_where(request, name, repo), uid, offset)
    )


async def delete_upload(request: web.Request, name: str, uid: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    await registry.uploads.cancel(repo, uid)
    return web.Response(status=204, headers=API_VERSION)


# --- manifests -------------------------------------------------------------------------------------
def check_reference(ref: str) -> str:
    if is_digest_reference(ref):
        Digest.parse(ref)
    else:
        validate_tag(ref)
    return ref


async def get_manifest(request: web.Request, name: str, ref: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    try:
        check_reference(ref)
    except TagInvalid:
        # no manifest can carry that tag: a read answers 404, the only failure end-3 lists
        raise ManifestUnknown(ref) from None
    m = await registry.get_manifest(repo, ref)
    # every request, a peer-marked one too: the mark is a client's word, never a pass (the
    # policy decides a peer's lookup from what this host holds; regproxy.policy)
    await request.app[POLICY_KEY].enforce(repo, m)
    _notes(request).setdefault("cache", "hit")
    headers = {
        **API_VERSION,
        CONTENT_DIGEST: str(m.digest),
        "Content-Type": m.media_type,
        "ETag": f'"{m.digest}"',
    }
    if m.age is not None:  # to a peer, as the tag's home host: when it was last confirmed
        headers["Age"] = str(int(m.age))
    if request.method == "HEAD":
        headers["Content-Length"] = str(m.size)
        return web.Response(headers=headers)
    app_metrics(request.app).served("manifest", "disk", m.size)
    return web.Response(body=m.body, headers=headers)


async def put_manifest(request: web.Request, name: str, ref: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    check_reference(ref)
    cl = _content_length(request)
    if cl is not None and cl > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"{cl} bytes; the limit is {MAX_MANIFEST_BYTES}")
    body = bytearray()
    async for chunk in body_chunks(request):
        body += chunk
        if len(body) > MAX_MANIFEST_BYTES:
            raise ManifestTooLarge(f"the limit is {MAX_MANIFEST_BYTES} bytes")
    result = await registry.put_manifest(
        repo, ref, bytes(body), request.headers.get("Content-Type")
    )
    subject = result.subject or cosign_tag_subject(ref)
    if subject is not None:  # a signature (or other referrer) arrived: decide again
        request.app[POLICY_KEY].forget(subject)
    headers = {
        **API_VERSION,
        "Location": f"/v2/{_where(request, name, repo)}/manifests/{result.digest}",
        CONTENT_DIGEST: str(result.digest),
    }
    if result.subject is not None:
        headers["OCI-Subject"] = str(result.subject)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request, name: str, ref: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    check_reference(ref)
    await pins.delete(registry, repo, ref)  # a pinned index's children are unpinned with it
    return web.Response(status=202, headers={**API_VERSION, "Content-Length": "0"})


# --- listings --------------------------------------------------------------------------------------
async def list_tags(request: web.Request, name: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    n, last = _page(request)
    # without n, at most MAX_TAGS (more are paged with Link, which clients follow)
    n = MAX_TAGS if n is None else min(n, MAX_TAGS)
    tags = await registry.list_tags(repo, n + 1, last)
    headers = dict(API_VERSION)
    if len(tags) > n:
        tags = tags[:n]
        if tags:  # n=0 asks for nothing, and there is no last tag to continue from
            # keep ?ns=: without it the next page would resolve to another repository
            ns = request.query.get("ns")
            extra = f"&ns={quote(ns, safe='')}" if ns else ""
            headers["Link"] = _link(f"/v2/{name}/tags/list", n, tags[-1], extra)
    return web.json_response({"name": name, "tags": tags}, headers=headers)


async def referrers(request: web.Request, name: str, digest: str) -> web.Response:
    registry, _ = _ctx(request)
    repo = _repo(request, name)
    subject = _digest(digest)
    artifact_type = request.query.get("artifactType")
    descs = await registry.referrers(repo, subject, artifact_type)
    headers = dict(API_VERSION)
    if artifact_type:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in descs],
    }
    return web.Response(body=json.dumps(body).encode(), content_type=OCI_INDEX, headers=headers)


Handler = Callable[..., Awaitable[web.StreamResponse]]
_HANDLERS: Final[dict[tuple[str, str], Handler]] = {
    ("blob", "GET"): get_blob,
    ("blob", "HEAD"): get_blob,
    ("blob", "DELETE"): delete_blob,
    ("upload", "POST"): post_upload,
    ("upload", "PATCH"): patch_upload,
    ("upload", "PUT"): put_upload,
    ("upload", "GET"): get_upload,
    ("upload", "DELETE"): delete_upload,
    ("manifest", "GET"): get_manifest,
    ("manifest", "HEAD"): get_manifest,
    ("manifest", "PUT"): put_manifest,
    ("manifest", "DELETE"): delete_manifest,
    ("tags", "GET"): list_tags,
    ("referrers", "GET"): referrers,
}


def add_routes(app: web.Application) -> None:
    # [\s\S], not .: a decoded %0A must reach dispatch and get NAME_INVALID, not a bare 404.
    # First of the routes under /v2: nearly every request is one of its (aiohttp tries a
    # prefix's routes in the order they were added; /v2/ and /v2/_catalog match whole paths).
    # Expect: 100-continue is answered when a body is read, after the checks (regproxy.expect)
    app.router.add_route("*", r"/v2/{path:[\s\S]+}", dispatch, expect_handler=defer_continue)
    app.router.add_get("/v2/", v2_base)
    app.router.add_get("/v2", v2_base)
    app.router.add_get("/v2/_catalog", catalog)


__all__: list[str] = ["add_routes"]
