"""The upstream registries: the only package that opens HTTP client connections."""

from regproxy.upstream.answers import BlobStream, ManifestGet, ManifestHead, TagPage
from regproxy.upstream.client import UpstreamClient

__all__ = ["BlobStream", "ManifestGet", "ManifestHead", "TagPage", "UpstreamClient"]
