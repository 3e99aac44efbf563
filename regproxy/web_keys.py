"""Typed keys of the application's and each request's state, shared by api, ui, admin and auth.

They live here, low, so the HTTP modules import the state they share without importing each other.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from regproxy.config import Config
from regproxy.health import Health
from regproxy.metrics import Metrics
from regproxy.names import NameResolver
from regproxy.policy import Policy
from regproxy.prefetch import Prefetcher
from regproxy.registry import Registry

CONFIG_KEY: Final = web.AppKey("config", Config)
REGISTRY_KEY: Final = web.AppKey("registry", Registry)
RESOLVER_KEY: Final = web.AppKey("resolver", NameResolver)
#: this process's id, answered in ``Regproxy-Instance`` (regproxy.headers)
INSTANCE_KEY: Final = web.AppKey("instance", str)
HEALTH_KEY: Final = web.AppKey("health", Health)
#: the app's metrics (a CollectorRegistry of their own; ``/metrics`` renders them)
METRICS_KEY: Final = web.AppKey("metrics", Metrics)
#: the prefetcher; ``app[PREFETCH_KEY].prefetch_done`` is what /readyz consults when
#: ``prefetch.required_for_ready`` is true (True at once when prefetch.images is empty)
PREFETCH_KEY: Final = web.AppKey("prefetch", Prefetcher)
#: the signature policy (regproxy.policy), consulted before a manifest is served
POLICY_KEY: Final = web.AppKey("policy", Policy)


#: facts about one request for its access-log line (route, repo, cache, upstream, error, user)
NOTES_KEY: Final = web.RequestKey[dict[str, str]]("notes")


def notes(request: web.BaseRequest) -> dict[str, str]:
    """This request's notes (made on first use)."""
    found = request.get(NOTES_KEY)
    if found is None:
        found = {}
        request[NOTES_KEY] = found
    return found
