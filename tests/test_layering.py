"""The dependency direction of DESIGN.md/STYLE.md, read from the imports themselves.

An ALLOW-list: every module of ``regproxy/`` sits in one layer of :data:`LAYERS`, and may import
only the modules of the layers that its layer names (and, inside one sub-package such as
``upstream/`` or ``cli/``, its siblings of the same layer). Every import counts: absolute and
relative (``from . import x``, ``from ..y import z``), at the top, inside functions and under
``TYPE_CHECKING``. A module in no layer fails the test: place it.

Third-party rules: only the HTTP layers import ``aiohttp.web``; only ``upstream/`` opens an
``aiohttp.ClientSession``; SQL, YAML, templates and password hashes each stay in their module.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "regproxy"
ROOT = "regproxy"


@dataclass(frozen=True)
class Layer:
    #: module names relative to ``regproxy`` ("" is the package itself); an entry that is a
    #: package also holds its submodules unless they are placed elsewhere
    modules: frozenset[str]
    #: the layers whose modules this layer may import
    may_import: frozenset[str]


def _layer(modules: str, may_import: str = "") -> Layer:
    return Layer(frozenset(modules.split()), frozenset(may_import.split()))


#: Bottom to top. To place a new module: add it to the lowest layer whose imports it needs, or
#: give it a layer of its own (and name that layer in the ``may_import`` of the layers above).
_MODEL = "base oci values config names"
LAYERS: dict[str, Layer] = {
    # leaves any module may import: the version, errors, header names, logging, metrics, units,
    # opening a file whose path is cached
    "base": _layer(
        ". errors headers log metrics systemd progress login_budget units deadline flights "
        "rendezvous cached_open malloc_arenas tls_failures thread_names evict_pace tag_order "
        "page_cache"
    ),
    # the OCI model, and a blob request's byte range
    "oci": _layer("oci byte_ranges", "base"),
    # pure signature verification: no internal imports at all
    "signatures": _layer("cosign"),
    # the config's value parsers (durations, sizes, lists), then the config itself
    "values": _layer("config_values", "base"),
    "config": _layer("config", "base oci signatures values"),
    "names": _layer("names", "base oci config"),
    # the disk: blobs (store) and metadata (index) know neither each other nor HTTP
    "store": _layer("store", "base oci"),
    # removing files the index no longer stores, safe against writers in any process
    "removal": _layer("removal", "base oci store"),
    # the index: its schema and migrations, its queries, the one async facade over them
    # telling systemd a long start is busy (an index upgrade)
    "starting": _layer("start_extender", "base"),
    "schema": _layer("schema", "base starting"),
    # the values it takes and answers (rows), then the queries
    "rows": _layer("index_rows"),
    "index": _layer("index", "base oci config schema rows"),
    "facade": _layer("async_index", "base index"),
    # the small-file hashing loop fsck runs in worker processes: the standard library only
    "hashing": _layer("hash_files"),
    # each repository's size, kept in the index and counted again when it may have moved
    "sizes": _layer("repo_sizes", "base index"),
    # the web page's parts that know no HTTP: its index queries, formatting, charts, history
    "queries": _layer("ui.queries ui.tag_list", "base oci index sizes"),
    "ui_model": _layer("ui.format ui.history ui.charts", "base"),
    # the transfer knows no transport: sources are callables handed in by proxy
    # a plain-TCP body copied into the store on a thread (the socket is handed in)
    "pump": _layer("pump", "base store"),
    # room for pull-through blobs and pushed bodies, reserved before their first byte
    "space": _layer("space", "base oci config values"),
    # a blob on its way into the store, as its readers see it (the fetcher fills it)
    "inflight": _layer("inflight", "base oci store"),
    "transfer": _layer("fetch", "base oci store pump space inflight"),
    "upstream": _layer("upstream", "base oci config names"),
    # which peers are up: backoff on the clock handed in
    "liveness": _layer("liveness", "base"),
    "peers": _layer("peers", "base oci config transfer upstream liveness"),
    # home hosts: what a miss asks of the cluster, and in which order
    "cluster": _layer("cluster", "base oci transfer upstream peers"),
    # upload sessions: temp files in the store, rows in the index (the registry composes them)
    "uploads": _layer("uploads", f"{_MODEL} store index facade space"),
    # the registry's cached lookups, with their one invalidation API
    "lookups": _layer("lookups", "base index"),
    # whether another process changed the index: what keeps cached tags believed
    "lookup_confirm": _layer("lookup_confirm", "base index facade lookups"),
    # when content was last served, written to the index in batches
    "access": _layer("access_times", "base index facade"),
    # a manifest PUT's file and row: placed, or taken away again when the PUT is refused
    "manifest_put": _layer("manifest_put", f"{_MODEL} store removal index facade"),
    # a writer's file made sure of after its row, else the row taken back
    "settling": _layer("settling", "base oci store index facade lookups"),
    "registry": _layer(
        "registry",
        f"{_MODEL} store removal index facade space uploads lookups lookup_confirm access "
        "manifest_put settling",
    ),
    # referrers pulled through: composed into proxy (a Protocol names what it needs of it)
    "referrers": _layer("referrers", f"{_MODEL} index facade upstream peers registry"),
    # manifests the cluster's hosts answer, stored in the local registry (composed into proxy)
    "from_cluster": _layer("cluster_manifests", f"{_MODEL} cluster registry"),
    # manifests the upstreams answer (a miss, a tag's re-check), stored in the local registry
    "from_upstream": _layer("upstream_manifests", f"{_MODEL} upstream registry"),
    "proxy": _layer(
        "proxy",
        f"{_MODEL} store index facade inflight transfer space upstream peers cluster lookups "
        "registry referrers from_cluster from_upstream settling",
    ),
    # the signature policy: rules, decisions, verification through the referrers
    "policy": _layer("policy", f"{_MODEL} signatures index facade registry referrers"),
    # tools and background work over the store: no HTTP layer, no upstream of their own
    # one eviction batch in SQL, on the index's writer
    "evict_sql": _layer("evict_batch", "base index"),
    "gc": _layer("evict", f"{_MODEL} store removal index facade evict_sql transfer registry"),
    # the web page's "next to evict": eviction's own plan, read on an index reader thread
    "eviction_view": _layer("ui.evicting", "base oci index evict_sql"),
    # the importer's parts: staging and docker archives know no registry; export knows no import
    "staging": _layer("bundle_stage", f"{_MODEL} store"),
    "archives": _layer("bundle_docker", f"{_MODEL} staging"),
    "export": _layer("bundle_export", f"{_MODEL} staging registry referrers"),
    # pins: what eviction keeps (the command, the web page and prefetch pin through it)
    "pinning": _layer("pins", f"{_MODEL} index facade registry proxy"),
    # a store and its index opened for a command, to change or only to read
    "opening": _layer("store_open", "base oci store index facade"),
    "tools": _layer(
        "bundle containerd fsck health maintenance prefetch tls",
        f"{_MODEL} schema store removal index facade hashing transfer registry proxy gc pinning "
        "opening "
        "staging archives settling "
        "export policy space uploads",
    ),
    # the HTTP layer: shared keys and error rendering low, handlers above them (expect: when
    # a 100 Continue goes out, for the routes and the body readers)
    "keys": _layer("web_keys expect", f"{_MODEL} registry tools policy"),
    # connections: the guard in front of aiohttp's protocol
    # connections whose client takes none of the bytes waiting for it (the guard's watch)
    "write_watch": _layer("write_watch", "base"),
    # what the guard knows of the fast lane, and how it frames requests for it
    "lane": _layer("lane"),
    "serving": _layer("connections", f"{_MODEL} keys write_watch lane"),
    # the http limits' app keys, and request bodies read within them
    "limits": _layer("request_limits", f"{_MODEL} keys"),
    "web": _layer("web_errors sendfile access", f"{_MODEL} keys serving limits"),
    # TLS handshakes and records on worker threads, plaintext to the event loop (knows no HTTP;
    # its workers cut clients that take nothing, as the guard does)
    # the TLS listeners' accept loop, then TLS on the event loop (tls.workers: 0) and on
    # worker threads
    "accepting": _layer("accept_loop", "base"),
    # the descriptor limit and the connections that fit in it
    "fd_limits": _layer("fd_limits", "base"),
    "relay": _layer("tls_relay tls_loop", "base write_watch accepting"),
    "auth": _layer("auth", f"{_MODEL} keys serving limits web"),
    "handlers": _layer(
        "api admin ui",
        f"{_MODEL} registry queries ui_model eviction_view pinning tools keys serving limits web auth "
        "policy referrers "
        "settling",
    ),
    # simple GETs answered from memory in front of aiohttp's parser (connections hands them on)
    # a committed blob file the lane streams over TLS, without aiohttp's request path
    "fast_file": _layer("fastfile fastsend", "base lane web"),
    "fast": _layer(
        "fastpath",
        f"{_MODEL} registry proxy policy keys serving limits web auth handlers fast_file",
    ),
    # nothing imports app but the command line, and nothing imports the command line
    "app": _layer(
        "app",
        f"{_MODEL} store index facade sizes transfer upstream peers lookups registry proxy gc "
        "pinning tools keys serving limits web auth queries ui_model eviction_view handlers policy fast "
        "relay "
        "lane fd_limits",
    ),
    "cli": _layer(
        "cli",
        f"{_MODEL} schema store index facade transfer upstream peers registry proxy gc pinning "
        "tools app policy settling opening",
    ),
    "main": _layer("__main__", "cli"),
}

#: third-party modules (a prefix: "aiohttp.web" also covers aiohttp.web_response) -> the only
#: layers that may import them
THIRD_PARTY: dict[str, frozenset[str]] = {
    "aiohttp.web": frozenset(
        {"keys", "serving", "limits", "web", "auth", "handlers", "fast", "app"}
    ),
    "sqlite3": frozenset({"schema", "index"}),
    "bcrypt": frozenset({"auth"}),
    "jinja2": frozenset({"handlers"}),
    "yaml": frozenset({"config", "tools", "cli"}),
    "prometheus_client": frozenset({"base"}),
    "uvloop": frozenset({"cli"}),
    "cryptography": frozenset({"signatures"}),
}
#: names that open client connections: only these layers may call them
CLIENT_OPENERS = frozenset({"ClientSession", "TCPConnector"})
CLIENT_LAYERS = frozenset({"upstream"})


@functools.lru_cache(maxsize=512)
def _walk(source: str) -> tuple[ast.AST, ...]:
    """Every node of a module's tree (parsed once per source text)."""
    return tuple(ast.walk(ast.parse(source)))


def _known_modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to ``regproxy`` ("" the package)."""
    out: dict[str, Path] = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


KNOWN = _known_modules()


def layer_of(module: str) -> str | None:
    """The layer of a module: its own entry, else its nearest package's entry."""
    parts = module.split(".") if module else []
    for n in range(len(parts), -1, -1):
        prefix = ".".join(parts[:n])
        for name, layer in LAYERS.items():
            entries = {"" if m == "." else m for m in layer.modules}
            if prefix in entries and (n == len(parts) or prefix != ""):
                return name
    return None


@functools.lru_cache(maxsize=64)
def _package_names(package: str) -> frozenset[str]:
    """The names a package's ``__init__`` defines (what ``from package import name`` may take)."""
    path = KNOWN.get(package)
    if path is None or path.name != "__init__.py":
        return frozenset()
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return frozenset(names)


def resolve_imports(
    module: str, source: str, is_package: bool = False
) -> tuple[set[str], set[str]]:
    """(internal modules relative to ``regproxy``, third-party dotted names) that ``source``
    imports anywhere in its tree; relative imports resolved against ``module``."""
    internal: set[str] = set()
    external: set[str] = set()
    here = [ROOT, *module.split(".")] if module else [ROOT]
    package = here if is_package else here[:-1]

    def rel(dotted: str) -> str:
        return dotted.removeprefix(ROOT).removeprefix(".")

    for node in _walk(source):
        if isinstance(node, ast.Import):
            for alias in node.names:
                is_ours = alias.name == ROOT or alias.name.startswith(ROOT + ".")
                (internal if is_ours else external).add(rel(alias.name) if is_ours else alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == ROOT or target.startswith(ROOT + ".")):
                external.add(target)
                external.update(f"{target}.{a.name}" for a in node.names)
                continue
            for alias in node.names:
                sub = rel(f"{target}.{alias.name}")
                if sub in KNOWN:
                    internal.add(sub)  # a module: ``from . import api``
                elif alias.name == "*" or alias.name in _package_names(rel(target)):
                    internal.add(rel(target))  # a name the package (or module) defines
                elif rel(target) in KNOWN and KNOWN[rel(target)].name != "__init__.py":
                    internal.add(rel(target))  # a name from a module
                else:
                    internal.add(sub)  # neither a module nor a name the package has
    return internal, external


def _opens_clients(source: str) -> set[str]:
    """Calls of (or imports of) ``aiohttp.ClientSession`` and kin."""
    found: set[str] = set()
    for node in _walk(source):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            found.update(a.name for a in node.names if a.name in CLIENT_OPENERS)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in CLIENT_OPENERS:
                found.add(name)
    return found


def _uses_aiohttp_web(source: str) -> bool:
    """``aiohttp.web.X`` reached through a plain ``import aiohttp``."""
    for node in _walk(source):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "aiohttp"
            and node.attr.startswith("web")
        ):
            return True
    return False


def _package_of(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def check(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every rule this module's source breaks, as readable lines (empty: it keeps them all)."""
    shown = f"regproxy.{module}" if module else "regproxy"
    layer_name = layer_of(module)
    if layer_name is None:
        return [
            f"{shown} is in no layer: place it in LAYERS in tests/test_layering.py (the lowest "
            "layer whose imports it needs, or a new layer named in the may_import of those above)"
        ]
    layer = LAYERS[layer_name]
    internal, external = resolve_imports(module, source, is_package)
    problems = []
    for target in sorted(internal):
        if target == module:
            continue
        target_layer = layer_of(target)
        if target_layer is None or target not in KNOWN:
            problems.append(f"{shown} imports regproxy.{target}, which is no known module")
            continue
        if target_layer in layer.may_import:
            continue
        if target_layer == layer_name and _package_of(target) == _package_of(module) != "":
            continue  # siblings inside one sub-package (upstream.client -> upstream.auth)
        if target_layer == layer_name and target.startswith(module + "."):
            continue  # a package and its own submodules
        problems.append(
            f"{shown} ({layer_name}) imports regproxy.{target} ({target_layer}); "
            f"{layer_name} may import only {sorted(layer.may_import)}"
        )
    for name in sorted(external):
        for prefix, layers in THIRD_PARTY.items():
            if (name == prefix or name.startswith(prefix)) and layer_name not in layers:
                problems.append(f"{shown} ({layer_name}) imports {name}: only {sorted(layers)} may")
    if _uses_aiohttp_web(source) and layer_name not in THIRD_PARTY["aiohttp.web"]:
        problems.append(f"{shown} ({layer_name}) uses aiohttp.web: only the HTTP layers may")
    opened = _opens_clients(source)
    if opened and layer_name not in CLIENT_LAYERS:
        problems.append(
            f"{shown} ({layer_name}) opens {sorted(opened)}: only upstream/ opens client "
            "sessions (regproxy.upstream.session gives one to others)"
        )
    return problems


def _check_path(module: str) -> list[str]:
    path = KNOWN[module]
    return check(module, path.read_text(), is_package=path.name == "__init__.py")


# --- the package as it is --------------------------------------------------------------------------
def test_every_module_keeps_its_layer() -> None:
    problems = [p for module in KNOWN for p in _check_path(module)]
    assert not problems, "\n".join(problems)


def test_layers_name_only_layers_and_place_each_module_once() -> None:
    placed: dict[str, str] = {}
    for name, layer in LAYERS.items():
        assert layer.may_import <= LAYERS.keys(), (name, layer.may_import - LAYERS.keys())
        assert name not in layer.may_import, name
        for m in layer.modules:
            assert m not in placed, f"{m} is in {placed[m]} and {name}"
            placed[m] = name


def test_layers_point_down() -> None:
    """No cycle between layers: the may_import relation is a DAG."""
    order = list(LAYERS)
    for name, layer in LAYERS.items():
        for lower in layer.may_import:
            assert order.index(lower) < order.index(name), f"{name} -> {lower} points up"


def test_nothing_imports_app_or_cli() -> None:
    """Only the command line imports app; only ``__main__`` (and cli/ itself) imports cli."""
    for module, path in KNOWN.items():
        if layer_of(module) in ("cli", "main"):
            continue
        internal, _ = resolve_imports(module, path.read_text(), path.name == "__init__.py")
        assert not {t for t in internal if t != module and layer_of(t) in ("app", "cli")}, module


def test_only_upstream_opens_client_sessions() -> None:
    for module, path in KNOWN.items():
        if _opens_clients(path.read_text()):
            assert layer_of(module) in CLIENT_LAYERS, module


def test_store_knows_no_http() -> None:
    for mod in ("store", "index"):
        _, external = resolve_imports(mod, KNOWN[mod].read_text())
        assert not any(m.startswith("aiohttp") for m in external), mod


def test_api_knows_no_files() -> None:
    _, external = resolve_imports("api", KNOWN["api"].read_text())
    assert not ({"os", "pathlib", "shutil", "aiofiles", "sqlite3"} & external), external


# --- the checker itself, on synthetic modules ------------------------------------------------------
def _with(module: str, extra: str) -> list[str]:
    return check(module, KNOWN[module].read_text() + "\n" + extra + "\n")


@pytest.mark.parametrize(
    ("module", "extra", "expected"),
    [
        ("store", "from . import api", "regproxy.store (store) imports regproxy.api (handlers)"),
        ("store", "from regproxy import index", "imports regproxy.index (index)"),
        ("peers", "from regproxy import app", "regproxy.peers (peers) imports regproxy.app (app)"),
        ("peers", "import regproxy.cli", "imports regproxy.cli (cli)"),
        ("ui", "from regproxy.app import create_app", "imports regproxy.app (app)"),
        ("fetch", "def f():\n    from .upstream import client", "imports regproxy.upstream.client"),
        (
            "upstream.client",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import proxy",
            "imports regproxy.proxy (proxy)",
        ),
        ("upstream.auth", "from ..store import Store", "imports regproxy.store (store)"),
        ("auth", "from regproxy.api import add_routes", "imports regproxy.api (handlers)"),
        ("store", "from aiohttp import web", "imports aiohttp.web"),
        ("fetch", "import aiohttp\nx = aiohttp.web.Response", "uses aiohttp.web"),
        ("peers", "import aiohttp\ns = aiohttp.ClientSession()", "opens ['ClientSession']"),
        ("api", "from aiohttp import ClientSession", "opens ['ClientSession']"),
        ("store", "import sqlite3", "imports sqlite3"),
        ("ui.history", "from aiohttp import web", "imports aiohttp.web"),
        ("ui.queries", "from regproxy.ui import base", "imports regproxy.ui.base (handlers)"),
        ("store", "from regproxy import nosuchmodule", "no known module"),
    ],
)
def test_checker_refuses(module: str, extra: str, expected: str) -> None:
    assert _check_path(module) == []
    problems = _with(module, extra)
    assert any(expected in p for p in problems), problems


def test_checker_resolves_relative_imports() -> None:
    internal, _ = resolve_imports("upstream.client", "from . import auth\nfrom .. import oci, log")
    assert internal == {"upstream.auth", "oci", "log"}
    internal, _ = resolve_imports("upstream", "from .client import X", is_package=True)
    assert internal == {"upstream.client"}
    internal, _ = resolve_imports("api", "from regproxy import __version__, errors")
    assert internal == {"", "errors"}


def test_checker_accepts_allowed_imports() -> None:
    assert _with("proxy", "from . import fetch, peers\nfrom .upstream import UpstreamClient") == []
    assert _with("upstream.client", "from . import auth") == []
    assert _with("app", "from regproxy import api, ui") == []


def test_module_in_no_layer_is_refused() -> None:
    problems = check("uploads_new", "from regproxy import oci\n")
    assert len(problems) == 1
    assert "regproxy.uploads_new is in no layer: place it in LAYERS" in problems[0]
