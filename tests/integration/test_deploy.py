"""deploy/: the Grafana dashboard and the Prometheus alerts name only what /metrics exports; the
rules pass promtool (check and their own unit tests); the DaemonSet is a valid Kubernetes object
that runs regproxy the way the README says.

The exported names are read from a live ``/metrics`` of an in-process daemon, so a metric that is
renamed or removed fails here, and a new one is usable at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from tests.peers import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "regproxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
#: series Prometheus makes itself for every scrape target
SYNTHETIC = frozenset({"up"})
#: the series each kind of family exposes (classic histograms have no bare series)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
NAME = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan", "atan2"}
)


async def _scrape(root: Path) -> str:
    config = config_from_dict(
        {
            "storage": {"root": str(root)},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
        }
    )
    async with TestClient(TestServer(create_app(config), host="127.0.0.1")) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        return await resp.text()


def exported_series(text: str) -> set[str]:
    """Every series name the exposition has or can have: from ``# TYPE`` lines (labelled
    families with no sample yet included), checked against the samples present."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            base = family.removesuffix("_total") if kind == "counter" else family
            names |= {base + s for s in SUFFIXES[kind]}
    samples = {m.group(0) for line in text.splitlines() if (m := NAME.match(line))}
    assert samples <= names, f"suffix logic misses {samples - names}"
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    names = exported_series(asyncio.run(_scrape(tmp_path_factory.mktemp("store"))))
    assert {"regproxy_http_requests_total", "regproxy_store_bytes"} <= names
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels, variables)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label_replace arguments, matchers)
    s = re.sub(r"\{[^{}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    out = set()
    for m in NAME.finditer(s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue  # a function call, or a keyword
        out.add(m.group(0))
    return out


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (source, le) (rate(a_bucket{instance=~"$instance",x="y"}[$__rate_interval]))'
        " / on (source) group_left (kind) b_total unless c offset 5m and "
        'label_replace(d, "upstream", "$1", "source", "(.*)") > 0.9 * e and 1e3 < f'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e", "f"}
    assert metric_names("up == 0") == {"up"}


# --- Grafana ------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and templating query."""
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", q)
            assert m, f"variable {v['name']}: {q}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def test_dashboard_queries_name_only_exported_metrics(exported: set[str]) -> None:
    queries = _queries(_dashboard())
    assert len(queries) >= 20
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        unknown = names - exported - SYNTHETIC
        assert not unknown, f"{where} queries {sorted(unknown)}, not exported by /metrics"


def test_dashboard_shows_what_the_operator_watches() -> None:
    dash = _dashboard()
    used = set().union(*(metric_names(e) for _, e in _queries(dash)))
    watched = {
        "regproxy_cache_requests_total",  # hit ratio
        "regproxy_served_bytes_total",  # bytes from disk, upstream, peers
        "regproxy_fetched_bytes_total",
        "regproxy_inflight_fetches",
        "regproxy_store_bytes",
        "regproxy_pinned_bytes",
        "regproxy_store_limit_bytes",
        "regproxy_evicted_bytes_total",
        "regproxy_upstream_errors_total",
        "regproxy_upstream_request_duration_seconds_bucket",
        "regproxy_stale_tags_served_total",
        "regproxy_login_failures_total",
        "regproxy_ready",
    }
    assert watched <= used, sorted(watched - used)
    # a dashboard Grafana imports as it is: one data source variable, unique ids, a 24-wide grid
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dash["uid"] == "regproxy" and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"])


def _promtool(*args: str, cwd: Path) -> str:
    if shutil.which("promtool") is None:
        pytest.fail("promtool missing: install Debian's prometheus package (scripts/test.sh does)")
    proc = subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert proc.returncode == 0, f"promtool {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.process
@pytest.mark.process  # promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool parses."""
    rules = []
    for i, (_, expr) in enumerate(_queries(_dashboard())):
        expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".+")
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in _promtool(
        "check", "rules", str(path), cwd=tmp_path
    )


# --- Prometheus ---------------------------------------------------------------------------------


def test_alert_rules_schema_and_metrics(exported: set[str]) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    names = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Regproxy[A-Za-z]+", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert set(rule["annotations"]) == {"summary", "description"}
            used = metric_names(rule["expr"])
            assert used and not used - exported - SYNTHETIC, (rule["alert"], used - exported)
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    # what the operator of a host nobody can reach must hear about
    for alert in (
        "RegproxyStoreFullNothingEvictable",
        "RegproxyUpstreamUnreachable",
        "RegproxyDigestMismatch",
        "RegproxyNotReady",
        "RegproxyPrefetchFailing",
    ):
        assert alert in names


@pytest.mark.process
@pytest.mark.process  # promtool
def test_alert_rules_pass_promtool_and_their_unit_tests(exported: set[str]) -> None:
    out = _promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert "SUCCESS" in out
    _promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS.parent)
    # the unit tests feed series regproxy really exports, and test every alert
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    series = {NAME.match(s["series"]).group(0) for t in tests for s in t["input_series"]}  # type: ignore[union-attr]
    assert not series - exported - SYNTHETIC, series - exported
    tested = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a firing test: {alerts - tested}"


# --- Kubernetes ---------------------------------------------------------------------------------


def test_daemonset_is_valid_and_runs_regproxy_as_documented() -> None:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    for d in docs:  # the Kubernetes API's own schema, unknown fields refused
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Namespace", "ConfigMap", "Service", "DaemonSet"}
    ds = by_kind["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # peers.dns is a cluster name
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = spec["containers"]
    assert {k: v for k, v in c["ports"][0].items() if k in ("containerPort", "hostPort")} == {
        "containerPort": 30003,
        "hostPort": 30003,
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 30003}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 30003}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    # the config comes from the ConfigMap, at the path the args name, and regproxy accepts it
    i = c["args"].index("--config")
    config_path = Path(c["args"][i + 1])
    assert c["args"][i + 2 :] == ["serve"]
    cm = by_kind["ConfigMap"]
    assert volumes[mounts[str(config_path.parent)]]["configMap"]["name"] == cm["metadata"]["name"]
    config = config_from_dict(yaml.safe_load(cm["data"][config_path.name]))
    assert config.listen_port == 30003

    # the store is the node's disk, where the config puts it
    store = volumes[mounts[str(config.storage.root)]]
    assert store["hostPath"]["path"] == str(config.storage.root)
    assert store["hostPath"]["type"] == "DirectoryOrCreate"

    # peers: the headless Service the config's peers.dns names selects these pods
    svc = by_kind["Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    ns = by_kind["Namespace"]["metadata"]["name"]
    assert config.peers.dns == f"{svc['metadata']['name']}.{ns}.svc.cluster.local"
    assert all(d["metadata"].get("namespace", ns) == ns for d in docs)
