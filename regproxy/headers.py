"""HTTP header names and fixed header sets, in one place (as aiohttp's ``hdrs``)."""

from __future__ import annotations

from typing import Final

#: every /v2/ answer carries it (distribution's clients look for it)
API_VERSION: Final = {"Docker-Distribution-API-Version": "registry/2.0"}
CONTENT_DIGEST: Final = "Docker-Content-Digest"
#: marks a request from a cluster peer (regproxy.peers), with one of two values:
PEER_HEADER: Final = "Regproxy-Peer"
#: a lookup: answered from the local store only
PEER_LOOKUP: Final = "1"
#: a fetch request to the home host: answered from the store, a transfer in flight or the
#: host's own upstream, never from another peer (any other value is a lookup)
PEER_FETCH: Final = "fetch"
#: every answer names the instance, so a host recognises itself in a peer list
INSTANCE_HEADER: Final = "Regproxy-Instance"
