"""The upstream registries: the only package that opens HTTP client connections."""

from regproxy.upstream.client import BlobStream, ManifestGet, ManifestHead, UpstreamClient

__all__ = ["BlobStream", "ManifestGet", "ManifestHead", "UpstreamClient"]
