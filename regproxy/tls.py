"""The listener's TLS context, and reloading its certificate on SIGHUP.

A new pair is first loaded into a scratch context, so a half-written or mismatched cert/key
never replaces a working one: the old certificate keeps being served and the failure is logged.
When the listener's worker threads do TLS (regproxy.tls_relay), that context replaces the one in
use (``swap``): each new connection takes the context in force, and no context is changed while
another thread may be in a handshake with it. When the event loop does TLS itself, the new pair
is loaded into the context the listener holds. Either way, connections already open keep
their certificate.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from typing import Final

from regproxy.config import TLSConfig

log = logging.getLogger("regproxy.tls")

#: the contexts of every running listener, for :func:`reload_all` (SIGHUP is process-wide)
_LIVE: Final[weakref.WeakSet[ServerTLS]] = weakref.WeakSet()


def _new_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The client's order of cipher suites decides, not the server's. Python sets server
    # preference, and OpenSSL's own TLS 1.3 order starts with AES-256-GCM, so every client got
    # AES-256: Go clients (containerd, skopeo, crane, oras) list AES-128-GCM first on hosts
    # with AES instructions (~45% faster to encrypt and decrypt here) and ChaCha20-Poly1305
    # first on hosts without them (an ARM board: AES in software is several times slower).
    # The suites allowed stay Python's defaults (TLS 1.3's three; for TLS 1.2 forward-secret
    # ECDHE/DHE ones, no SHA-1): only who picks among them changes.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


class ServerTLS:
    """A server SSLContext whose certificate chain can be reloaded in place."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        #: reload makes a new context instead of changing this one (threads read ``context``)
        self.swap = False
        self.context = _new_context()
        self.context.load_cert_chain(cert, key)
        _LIVE.add(self)

    @classmethod
    def from_config(cls, tls: TLSConfig) -> ServerTLS | None:
        if not tls.enabled:
            return None
        assert tls.cert and tls.key
        return cls(tls.cert, tls.key)

    def reload(self) -> bool:
        """Load the files again; True when the new chain is in use."""
        try:
            fresh = _new_context()
            fresh.load_cert_chain(self.cert, self.key)  # validate first
            if self.swap:
                self.context = fresh
            else:
                self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "tls.reload_failed cert=%s key=%s error=%s (the previous certificate stays)",
                self.cert,
                self.key,
                exc,
            )
            return False
        log.info("tls.reloaded cert=%s", self.cert)
        return True


def reload_all() -> int:
    """Reload every live listener's certificate; the number that reloaded."""
    live = list(_LIVE)
    if not live:
        log.info("tls.reload_skipped reason=tls not configured")
    return sum(t.reload() for t in live)
