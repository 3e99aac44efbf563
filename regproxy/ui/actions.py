"""Changes from the page: pin, unpin, delete, and a bundle upload streamed into the importer."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import BodyPartReader, web

from regproxy import pins
from regproxy.bundle import BundleError, Importer
from regproxy.errors import OCIError, StorageFull
from regproxy.names import RepoName
from regproxy.oci import is_digest_reference
from regproxy.request_limits import read_body
from regproxy.settling import PutBackFailed, PutBackFull
from regproxy.ui import queries
from regproxy.ui.base import (
    BAD_FORM,
    bad_form,
    changer,
    form_of,
    json_response,
    manifest_url,
    may_change,
    refused,
    registry_of,
    render,
    repo_url,
    resolve,
    wants_json,
)
from regproxy.web_keys import POLICY_KEY, RESOLVER_KEY

log = logging.getLogger("regproxy.ui")


async def change(request: web.Request) -> web.StreamResponse:
    """POST /ui/pin, /ui/unpin, /ui/delete: ``repo`` and ``ref`` (a tag or a digest). A delete
    without ``confirm=1`` answers with a page that says what it will do and asks again (the
    page's script asks in a dialog and sends ``confirm=1`` itself)."""
    form = await form_of(request)
    session = await changer(request, form)
    action = request.match_info["action"]
    name, ref = str(form.get("repo", "")), str(form.get("ref", ""))
    repo = resolve(request, name)
    registry = registry_of(request)
    if action == "delete" and form.get("confirm") != "1":
        return await _confirm_delete(request, repo, ref)
    try:
        if action == "pin":
            done = await pins.pin(registry, repo, ref)
            msg = f"Pinned {repo.canonical}{_sep(ref)}{ref} ({len(done)} manifest(s))."
        elif action == "unpin":
            done = await pins.unpin(registry, repo, ref)
            msg = f"Unpinned {repo.canonical}{_sep(ref)}{ref} ({len(done)} manifest(s))."
        else:
            unpinned = await pins.delete(registry, repo, ref)
            what = "manifest" if is_digest_reference(ref) else "tag"
            msg = f"Deleted {what} {repo.canonical}{_sep(ref)}{ref}"
            children = [d for d in unpinned if d != ref]
            if children:
                msg += f" and unpinned {len(children)} manifest(s) it listed"
            msg += "; the bytes no manifest references any more go at the next eviction or gc."
    except OCIError as exc:
        return refused(request, f"{action} {repo.canonical}{_sep(ref)}{ref}: {exc}", 404)
    log.info("ui.%s user=%r repo=%s ref=%s", action, session.user, repo.canonical, ref)
    if wants_json(request):
        return json_response({"ok": True, "message": msg})
    session.flash.append(msg)
    back = repo_url(repo.canonical)
    if action != "delete" and is_digest_reference(ref):
        back = manifest_url(repo.canonical, ref)
    raise web.HTTPSeeOther(back)


async def _confirm_delete(request: web.Request, repo: RepoName, ref: str) -> web.Response:
    if wants_json(request):
        return refused(request, "a delete needs confirm=1", 400)
    registry = registry_of(request)
    found = await registry.local_manifest(repo, ref)
    if found is None:
        return refused(request, f"{repo.canonical}{_sep(ref)}{ref} is not in the store", 404)
    digest = str(found[0].digest)
    info = await registry.db.read(queries.manifest_info, repo.canonical, digest)
    return render(
        request,
        "confirm.html",
        repo=repo.canonical,
        ref=ref,
        what="manifest" if is_digest_reference(ref) else "tag",
        digest=digest,
        info=info,
        back=repo_url(repo.canonical),
    )


def _sep(ref: str) -> str:
    return "@" if is_digest_reference(ref) else ":"


# --- upload a bundle ------------------------------------------------------------------------------------
async def upload_page(request: web.Request) -> web.Response:
    return render(request, "upload.html")


async def upload_post(request: web.Request) -> web.StreamResponse:
    """A multipart form (csrf, optional name, then the file), streamed into the importer.

    What the request's head shows is refused before a byte of its body is read (so a client
    that asked for ``100 Continue``, as curl does for a large file, gets the refusal instead
    and never sends the body, regproxy.expect): no session or no right to change content
    (401/403), a wrong ``X-CSRF-Token`` (403), not a form (400), a bad ``?name=`` (400), no
    room above ``storage.min_free`` for its ``Content-Length`` (507). The form's own csrf and
    name fields are checked once read, before a byte of the file is. A file the disk refuses to
    put back while the bundle is committed (regproxy.settling) is 507 (full) or 500, on the
    page, saying that what was committed before it stays."""
    if not request.content_type.startswith("multipart/"):
        await changer(request, None)  # a token in X-CSRF-Token, or refused first
        return refused(request, "a multipart/form-data upload is expected", 400)
    session = may_change(request)
    importer = Importer(
        registry_of(request),
        request.app[RESOLVER_KEY],
        name=request.query.get("name", "").strip() or None,
        policy=request.app[POLICY_KEY],
    )
    filename: str | None = None
    try:
        importer.check_name()
        # the whole form's length: an upper bound of the file's, reserved before it is read
        async with importer.receiving(request.content_length) as upload:
            fields, file_part = await _form_fields(request)  # 100 Continue goes out here
            session = await changer(request, fields)  # before a byte of the file is read
            if file_part is None:
                return refused(request, "no bundle file in the form", 400)
            filename = file_part.filename
            if name := fields.get("name", "").strip():
                importer.name = name
                importer.check_name()
            summary = await upload.take(_file_chunks(request, file_part), filename or "upload")
    except (PutBackFull, PutBackFailed) as exc:  # while committing: some of it may be in
        log.warning("import.failed user=%r remote=%s error=%s", session.user, request.remote, exc)
        why = (
            f"{filename or 'the upload'}: failed: {exc.detail}; what was committed before it "
            "stays (upload the bundle again once the disk takes it)"
        )
        return _upload_refused(request, why, exc.http_status)
    except (BundleError, StorageFull) as exc:  # StorageFull: no room above storage.min_free
        log.warning("import.refused user=%r remote=%s error=%s", session.user, request.remote, exc)
        message, status = str(exc), 400
        if isinstance(exc, StorageFull):
            message, status = f"{exc.message}: {exc.detail}", exc.http_status
        why = _for_the_browser(message, registry_of(request).store.tmp, filename)
        return _upload_refused(request, why, status)
    log.info("import.ui user=%r remote=%s %s", session.user, request.remote, summary)
    result = summary.to_json()
    if wants_json(request):
        return json_response(result)
    return render(request, "upload.html", summary=result, links=_image_links(result["images"]))


def _upload_refused(request: web.Request, why: str, status: int) -> web.Response:
    if wants_json(request):
        return json_response({"error": why}, status=status)
    return render(request, "upload.html", status=status, error=why)


async def _file_chunks(request: web.Request, part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await read_body(request, part.read_chunk(1024 * 1024))
        except BAD_FORM as exc:  # the part's end is missing or malformed
            raise BundleError(f"the upload is malformed: {exc}") from None
        if not chunk:
            return
        yield chunk


async def _form_fields(request: web.Request) -> tuple[dict[str, str], BodyPartReader | None]:
    """The small fields before the file (cut to 4 KiB each), and the file's part, unread."""
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        while (part := await read_body(request, reader.next())) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.filename is not None or part.name == "bundle":
                return fields, part
            value = await read_body(request, part.read(decode=True))
            fields[str(part.name)] = value[:4096].decode("utf-8", "replace")
    except BAD_FORM as exc:
        raise bad_form(request, exc) from None
    return fields, None


def _for_the_browser(message: str, tmp: Path, filename: str | None) -> str:
    """The importer's message as the page's user reads it: the uploaded file's name instead of
    the server's temp file, the form's field instead of the command line's option."""
    message = re.sub(re.escape(str(tmp)) + r"/[^\s:'\"]*", filename or "the uploaded file", message)
    return message.replace("with --name", "in the Name field of this form")


def _image_links(images: list[str]) -> list[tuple[str, str]]:
    out = []
    for image in images:
        name = image.split("@", 1)[0]
        last = name.rsplit("/", 1)
        if ":" in last[-1]:
            name = name.rsplit(":", 1)[0]
        out.append((image, repo_url(name)))
    return out
