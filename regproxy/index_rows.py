"""The rows the metadata index (:mod:`regproxy.index`) takes and answers: plain values, no
SQL (re-exported by :mod:`regproxy.index`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class ManifestRow(NamedTuple):
    """A manifest's row. A tuple, not a dataclass: the lookup cache holds up to 100,000 of
    them for years, and CPython leaves a tuple of strings, numbers and None out of the garbage
    collector's walks (a slotted instance is always walked: at that many, each full collection
    paused the event loop and every thread for tens of milliseconds more)."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None = None
    subject: str | None = None
    annotations: dict[str, str] | None = None
    checked: float = 0.0  # for tag lookups: when the tag was last confirmed upstream


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A manifest to add to a repository, with what it references."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    subject: str | None
    annotations: dict[str, str] | None
    blobs: Sequence[str]
    children: Sequence[str]


class ManifestAdded(NamedTuple):
    """What :meth:`Index.add_manifest` did: the references ``missing`` (then nothing written);
    whether the repository ``held`` the manifest before; the ``tag`` moved and its row before
    (``tag_was``: digest, updated, checked; None when new); whether it ``pinned`` a manifest
    the repository held unpinned; for taking it back (:mod:`regproxy.settling`)."""

    missing: list[str]
    held: bool = False
    tag: str | None = None
    tag_was: tuple[str, float, float] | None = None
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Totals:
    """What the store holds (see :data:`regproxy.schema.TOTALS_COLUMNS`)."""

    stored_bytes: int
    stored_count: int
    pinned_bytes: int
    pinned_count: int
    blobs: int
    manifests: int
    tags: int
    repos: int
    loose_bytes: int


@dataclass(frozen=True, slots=True)
class PinRow:
    """A pinned manifest in a repository (see :meth:`Index.list_pins`)."""

    repo: str
    digest: str
    media_type: str
    size: int
    tags: list[str]
    #: bytes of the blobs the manifest lists that the store holds (config and layers)
    blob_bytes: int
