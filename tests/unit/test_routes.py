"""The /v2/ route of a raw path (regproxy.api.route), against the spec's path patterns written
as regular expressions (what the router used to run for every request)."""

from __future__ import annotations

import itertools
import re

from regproxy.api import route

#: end-1 ... end-13: the order matters (an upload is tried before a blob)
PATTERNS = [
    ("upload", re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<uid>[^/]*)$")),
    ("blob", re.compile(r"^(?P<name>.+)/blobs/(?P<digest>[^/]+)$")),
    ("manifest", re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)$")),
    ("tags", re.compile(r"^(?P<name>.+)/tags/list$")),
    ("referrers", re.compile(r"^(?P<name>.+)/referrers/(?P<digest>[^/]+)$")),
]


def by_patterns(path: str) -> tuple[str, dict[str, str]] | None:
    for kind, rx in PATTERNS:
        m = rx.match(path)
        if m is not None:
            return kind, m.groupdict()
    return None


PARTS = ["a", "blobs", "uploads", "manifests", "tags", "list", "referrers", "sha256:ab", "", "x%2F"]


def test_every_path_of_up_to_five_parts_routes_as_the_patterns_do() -> None:
    checked = 0
    for n in range(1, 6):
        for parts in itertools.product(PARTS, repeat=n):
            path = "/".join(parts)
            assert route(path) == by_patterns(path), path
            checked += 1
    assert checked > 100_000


def test_the_routes_of_real_requests() -> None:
    digest = "sha256:" + "a" * 64
    assert route(f"library/nginx/manifests/{digest}") == (
        "manifest",
        {"name": "library/nginx", "ref": digest},
    )
    assert route("spectro-images/docker.io/library/nginx/manifests/1.25") == (
        "manifest",
        {"name": "spectro-images/docker.io/library/nginx", "ref": "1.25"},
    )
    assert route("a/b/blobs/uploads/") == ("upload", {"name": "a/b", "uid": ""})
    assert route("a/blobs/uploads/u-1") == ("upload", {"name": "a", "uid": "u-1"})
    assert route("a/tags/list") == ("tags", {"name": "a"})
    assert route("blobs/uploads/") is None  # no name
    assert route("a/manifests/") is None  # no reference
