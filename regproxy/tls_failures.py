"""Failed TLS handshakes, told: counted by reason, and said at WARNING at most once a minute.

A client that cannot complete the handshake (it does not trust the certificate, offers only
TLS 1.0/1.1, shares no cipher suite, or speaks plain HTTP to the TLS port) never reaches the
HTTP layer, so neither the access log nor a request metric shows it. Every failure counts in
``regproxy_tls_handshake_failures_total{reason}`` (:data:`REASONS`, a fixed set); those a
client's set-up explains are logged as
``tls.handshake_failed remote=... reason=... error=... suppressed=N`` at WARNING, at most once a
minute (``suppressed``: how many went unsaid since the last one), else at DEBUG. A connection
closed, or left silent until ``http.header_timeout``, before its handshake ended (a TCP health
check, a port scan) is counted (``closed``, ``timeout``) and said at DEBUG only.

Where they are seen: both TLS listeners take each connection from their own accept, so they
know the client's address and see whatever ended its handshake: the TLS workers
(regproxy.tls_relay) and the event loop's own TLS (regproxy.tls_loop, ``tls.workers: 0``).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Final

from prometheus_client import Counter

log = logging.getLogger("regproxy.tls")

#: every reason a failure is counted under
REASONS: Final = (
    "protocol_version",  # the client offers only versions below TLS 1.2 (or none we know)
    "certificate_rejected",  # the client refused our certificate (unknown CA, name, expired)
    "no_shared_cipher",  # no cipher suite, group or signature algorithm in common
    "not_tls",  # plain HTTP or other bytes that are not a TLS hello
    "timeout",  # the handshake did not end within http.header_timeout
    "closed",  # the client closed or reset the connection in the middle of it
    "other",
)
#: the reasons said at WARNING (once a minute); the others at DEBUG
TOLD: Final = frozenset(REASONS) - {"timeout", "closed"}
WARN_EVERY_SECONDS: Final = 60.0

#: OpenSSL's reason codes (``ssl.SSLError.reason``) -> ours
_OPENSSL: Final = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate_rejected",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_rejected",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate_rejected",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "certificate_rejected",
    "TLSV1_ALERT_ACCESS_DENIED": "certificate_rejected",
    "TLSV1_ALERT_DECRYPT_ERROR": "certificate_rejected",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no_shared_cipher",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "no_shared_cipher",
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "WRONG_VERSION_NUMBER": "not_tls",
    "UNKNOWN_PROTOCOL": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "RECORD_LENGTH_MISMATCH": "not_tls",
    "UNEXPECTED_EOF_WHILE_READING": "closed",
}


def reason_of(exc: BaseException) -> str:
    """The reason a handshake failed with ``exc``, one of :data:`REASONS`."""
    if isinstance(exc, ssl.SSLError):
        return _OPENSSL.get(str(exc.reason), "other")
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "timeout"  # asyncio's and uvloop's handshake timeout: ConnectionAbortedError
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "other"


class HandshakeFailures:
    """Counts and tells failed handshakes; :meth:`failed` may be called from any thread."""

    def __init__(self, counter: Counter, clock: Callable[[], float] = time.monotonic) -> None:
        """``counter``: ``Metrics.tls_handshake_failures`` (labelled by reason)."""
        self._counter = counter
        for reason in REASONS:  # each at 0 from the start
            counter.labels(reason)
        self._clock = clock
        self._lock = threading.Lock()
        self._next_warning = float("-inf")
        self._unsaid = 0

    def failed(self, remote: object, exc: BaseException) -> str:
        """One failed handshake of the client at ``remote`` (its address, or "-"); its reason."""
        reason = reason_of(exc)
        self._counter.labels(reason).inc()
        warn, unsaid = False, 0
        if reason in TOLD:
            with self._lock:
                now = self._clock()
                if now >= self._next_warning:
                    self._next_warning = now + WARN_EVERY_SECONDS
                    warn, unsaid, self._unsaid = True, self._unsaid, 0
                else:
                    self._unsaid += 1
        (log.warning if warn else log.debug)(
            "tls.handshake_failed remote=%s reason=%s error=%s suppressed=%d",
            _address(remote),
            reason,
            _said(exc),
            unsaid,
        )
        return reason


def _address(remote: object) -> str:
    if isinstance(remote, tuple) and len(remote) >= 2:
        return f"{remote[0]}:{remote[1]}"
    return str(remote) if remote else "-"


def _said(exc: BaseException) -> str:
    """The error in one short token-like piece (OpenSSL's reason, else the type and text)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    text = str(exc).replace(" ", "_")[:80]
    return f"{type(exc).__name__}:{text}" if text else type(exc).__name__
