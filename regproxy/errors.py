"""Every error regproxy raises, each registered once with its OCI code and HTTP status.

Codes and statuses follow the distribution spec's error table
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes).
The api renders them as ``{"errors":[{"code","message","detail"}]}``; nothing here knows HTTP.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegproxyError(Exception):
    """Base of all regproxy errors."""


class ConfigError(RegproxyError):
    """A bad config: names the key, the value and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"config: {self.key}: {self.message}"


class ConfigMissing(ConfigError):
    pass


class OCIError(RegproxyError):
    code: ClassVar[str] = "UNKNOWN"
    http_status: ClassVar[int] = 500
    message: ClassVar[str] = "unknown error"

    def __init__(self, detail: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


class BlobUnknown(OCIError):
    code, http_status, message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(OCIError):
    code, http_status, message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class RangeNotSatisfiable(OCIError):
    """An upload chunk out of order or a blob Range outside the blob (416)."""

    code, http_status, message = "BLOB_UPLOAD_INVALID", 416, "range not satisfiable"

    def __init__(self, detail: Any = None, *, size: int | None = None, offset: int = 0) -> None:
        super().__init__(detail)
        self.size = size  # blob size, for Content-Range: bytes */size
        self.offset = offset  # upload offset, for the Range header


class BlobUploadUnknown(OCIError):
    code, http_status, message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class DigestInvalid(OCIError):
    code, http_status, message = "DIGEST_INVALID", 400, "provided digest did not match"

    def __init__(self, digest: str, reason: str = "") -> None:
        super().__init__(f"{digest}: {reason}" if reason else digest)
        self.digest = digest
        self.reason = reason


class ManifestBlobUnknown(OCIError):
    code, http_status, message = "MANIFEST_BLOB_UNKNOWN", 404, "manifest references unknown blob"


class ManifestInvalid(OCIError):
    code, http_status, message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestTooLarge(OCIError):
    code, http_status, message = "MANIFEST_INVALID", 413, "manifest too large"


class ManifestUnknown(OCIError):
    code, http_status, message = "MANIFEST_UNKNOWN", 404, "manifest unknown to registry"


class NameInvalid(OCIError):
    code, http_status, message = "NAME_INVALID", 400, "invalid repository name"

    def __init__(self, name: str, reason: str = "") -> None:
        super().__init__(f"{name!r}: {reason}" if reason else repr(name))
        self.name = name


class NameUnknown(OCIError):
    code, http_status, message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class TagInvalid(OCIError):
    code, http_status, message = "MANIFEST_INVALID", 400, "invalid tag"

    def __init__(self, tag: str) -> None:
        super().__init__(f"{tag!r} does not match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")
        self.tag = tag


class SizeInvalid(OCIError):
    code, http_status, message = "SIZE_INVALID", 400, "provided length did not match content length"


class Unauthorized(OCIError):
    code, http_status, message = "UNAUTHORIZED", 401, "authentication required"


class Denied(OCIError):
    code, http_status, message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(OCIError):
    code, http_status, message = "UNSUPPORTED", 405, "the operation is unsupported"


class BodyTimeout(OCIError):
    """A request body that stopped arriving (``http.read_timeout``)."""

    code, http_status, message = "BLOB_UPLOAD_INVALID", 408, "the request body stopped arriving"


class TooManyRequests(OCIError):
    code, http_status, message = "TOOMANYREQUESTS", 429, "too many requests"

    def __init__(self, detail: Any = None, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after  # seconds, for the Retry-After header


class StorageFull(OCIError):
    code, http_status, message = "UNKNOWN", 507, "insufficient storage on the registry host"


class StoreFailed(OCIError):
    """The registry host's own disk failed a write (EIO, EROFS, ...): a fault of this host,
    never of the upstream or peer whose bytes were being written (500)."""

    code, http_status, message = "UNKNOWN", 500, "storage error on the registry host"


class UpstreamError(OCIError):
    """An upstream answered badly or not at all (502)."""

    code, http_status, message = "UNKNOWN", 502, "upstream registry error"

    def __init__(self, upstream: str, detail: str, *, kind: str = "error") -> None:
        super().__init__(f"{upstream}: {detail}")
        self.upstream = upstream
        self.kind = kind  # timeout | digest_mismatch | 4xx | 5xx | auth | connect | error


class UpstreamTimeout(UpstreamError):
    http_status = 504
    message = "upstream registry timed out"

    def __init__(self, upstream: str, detail: str, *, kind: str = "timeout") -> None:
        super().__init__(upstream, detail, kind=kind)


class UpstreamTooSlow(UpstreamTimeout):
    """Below the source's minimum rate or past its max_transfer_time: the source is dropped
    for this fetch (a cut connection is resumed; a stall is not)."""

    message = "upstream registry too slow"

    def __init__(self, upstream: str, detail: str) -> None:
        super().__init__(upstream, detail, kind="slow")


class DigestMismatch(RegproxyError):
    """Bytes written did not hash to the digest they were written for."""

    def __init__(self, expected: str, actual: str, source: str = "") -> None:
        super().__init__(expected, actual, source)
        self.expected = expected
        self.actual = actual
        self.source = source

    def __str__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"digest mismatch{src}: expected {self.expected}, got {self.actual}"
