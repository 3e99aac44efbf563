"""How many client connections the process can hold: its descriptor limit raised to the hard
limit, and the default ``http.max_connections`` that fits in it."""

from __future__ import annotations

import logging
import resource
from typing import Final

log = logging.getLogger("regproxy")

#: descriptors kept for everything but client sockets: blob and temp files, upstream and peer
#: connections, the index, logs
NOFILE_RESERVE: Final = 256
#: a connection may hold three descriptors while it is sent a blob: its socket, a twin of it
#: that the event loop watches, and the blob file
FDS_PER_CONNECTION: Final = 3
#: no more than this by default, however high the descriptor limit (memory stays bounded)
MAX_CONNECTIONS_CAP: Final = 16384


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("limits.nofile_not_raised soft=%d hard=%d error=%s", soft, hard, exc)
    return soft


def default_max_connections(nofile: int, extra_fds: int = 0) -> int:
    """Connections that fit in ``nofile`` descriptors with room for everything else
    (``extra_fds``: each connection holds that many more, as a relayed TLS one does)."""
    reserve = min(NOFILE_RESERVE, nofile // 4)
    per_connection = FDS_PER_CONNECTION + extra_fds
    return max(8, min(MAX_CONNECTIONS_CAP, (nofile - reserve) // per_connection))
