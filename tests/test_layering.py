"""The dependency direction of DESIGN.md/STYLE.md, read from the imports themselves."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "regproxy"

#: module -> internal modules it must never import (directly)
FORBIDDEN = {
    "oci": {"*"} - {"errors"},
    "errors": {"*"},
    "store": {
        "api",
        "app",
        "cli",
        "registry",
        "index",
        "names",
        "fetch",
        "upstream",
        "ui",
        "peers",
    },
    "index": {"api", "app", "cli", "registry", "store", "fetch", "upstream", "ui"},
    "registry": {"api", "app", "cli", "ui"},
    "api": {"store", "index", "app", "cli", "upstream"},
    "names": {"api", "app", "cli", "registry", "store", "index"},
    "config": {"api", "app", "cli", "registry", "store", "index", "names"},
    "fetch": {"api", "app", "cli", "registry", "proxy", "index", "upstream"},
    "proxy": {"api", "app", "cli", "ui"},
    "upstream": {"api", "app", "cli", "registry", "proxy", "store", "index", "fetch", "ui"},
    # tools and background work over the store: no HTTP layer above them
    "bundle": {"api", "app", "cli", "ui", "admin", "auth", "upstream"},
    # the importer's parts: staging and docker archives know no registry; export knows no import
    "bundle_stage": {"api", "app", "cli", "ui", "admin", "auth", "upstream", "registry", "proxy"}
    | {"fetch", "bundle", "bundle_docker", "bundle_export"},
    "bundle_docker": {"api", "app", "cli", "ui", "admin", "auth", "upstream", "registry", "proxy"}
    | {"fetch", "bundle", "bundle_export"},
    "bundle_export": {"api", "app", "cli", "ui", "admin", "auth", "upstream", "bundle"}
    | {"bundle_docker"},
    "evict": {"api", "app", "cli", "ui", "admin", "auth", "upstream"},
    "maintenance": {"api", "app", "cli", "ui", "admin", "auth", "upstream", "proxy", "fetch"},
    "prefetch": {"api", "app", "cli", "ui", "admin", "auth", "store", "index"},
    "pins": {"api", "app", "cli", "ui", "admin", "auth", "upstream", "fetch"},
    # the web page's package: its index queries, formatting and charts know no HTTP and no page
    "ui.queries": {"api", "app", "cli", "ui", "admin", "store", "upstream", "fetch"},
    "ui.format": {"*"},
    "ui.charts": {"api", "app", "cli", "registry", "store", "index", "auth", "admin", "upstream"},
    "ui.history": {"api", "app", "cli", "ui", "registry", "store", "index", "auth", "upstream"},
    "containerd": {"api", "app", "ui", "registry", "store", "index", "upstream"},
    "systemd": {"*"},
    # pure signature verification: no internal imports at all
    "cosign": {"*"},
    "tls": {"api", "app", "cli", "ui", "registry", "store", "index", "upstream"},
    "health": {"app", "cli", "ui", "store", "index"},
}
#: third-party modules only some of ours may use
HTTP_SERVER = {"api", "app", "ui", "auth", "web", "admin", "health", "sendfile"}
#: modules of a package (regproxy/ui/) that must not use aiohttp.web either
NO_WEB = {"ui.queries", "ui.format", "ui.charts", "ui.history"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            for alias in node.names:
                out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _internal(mods: set[str]) -> set[str]:
    return {m.split(".")[1] for m in mods if m.startswith("regproxy.") and m.count(".") >= 1}


def test_dependency_direction() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        name = path.stem if path.parent == PKG else path.parent.name
        if f"{name}.{path.stem}" in FORBIDDEN:  # a package's module with rules of its own
            name = f"{name}.{path.stem}"
        imported = _imports(path)
        internal = _internal(imported)
        forbidden = FORBIDDEN.get(name, set())
        if "*" in forbidden:
            allowed = {"errors"} if name == "oci" else set()
            bad = internal - allowed - {"metrics", "log"} - {"__init__", name}
            bad = {b for b in bad if b not in ("__version__",)}
        else:
            bad = internal & forbidden
        if bad:
            problems.append(f"{path.relative_to(PKG.parent)} imports {sorted(bad)}")
        uses_web = any(m.startswith("aiohttp.web") for m in imported)
        if uses_web and (name in NO_WEB or (path.parent == PKG and path.stem not in HTTP_SERVER)):
            problems.append(f"{path.name} uses aiohttp.web (only the HTTP layer may)")
    assert not problems, "\n".join(problems)


def test_store_knows_no_http() -> None:
    for mod in ("store", "index"):
        assert not any("aiohttp" in m for m in _imports(PKG / f"{mod}.py")), mod


def test_api_knows_no_files() -> None:
    imported = _imports(PKG / "api.py")
    assert not ({"os", "pathlib", "shutil", "aiofiles", "sqlite3"} & imported), imported
