"""Every metric and every CLI command a user can run is described in README.md."""

from __future__ import annotations

from pathlib import Path

from regproxy.cli import build_parser
from regproxy.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_metric_is_in_the_readme() -> None:
    names = set()
    for collector in list(Metrics().registry._collector_to_names):
        for m in collector.describe():
            names.add(m.name.removesuffix("_total"))
    missing = sorted(n for n in names if n not in README)
    assert not missing, f"metrics missing from README.md: {missing}"


def test_every_command_is_in_the_readme() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = sorted(c for c in sub.choices if f" {c}" not in README)
    assert not missing, f"commands missing from README.md: {missing}"
