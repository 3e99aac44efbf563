"""Geometry of the overview's SVG chart (drawn by the template, no JavaScript)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from regproxy.ui.history import SAMPLE_SECONDS, SAMPLES
from regproxy.units import human_bytes


def chart(intervals: list[dict[str, float]], now: float) -> dict[str, Any]:
    """Geometry of the overview's SVG: bytes per 10 minutes over the last 24 hours, one slot
    per interval (the open one at the right edge), a blue bar (disk) and an orange one (fetched).
    Each bar's tooltip says its value and its time; the axis labels are HTML beside the SVG, so
    they keep their size on a phone."""
    width, height, top = 720.0, 120.0, 6.0
    span = SAMPLES * SAMPLE_SECONDS
    peak = max([0.0, *(max(i["served_disk"], i["fetched"]) for i in intervals)])
    slot = width / SAMPLES
    disk: list[dict[str, Any]] = []
    fetched: list[dict[str, Any]] = []
    for i in intervals:
        age = max(0.0, now - i["end"])
        right = width - age / span * width
        x = max(0.0, min(width - slot, right - slot))
        when = f"{_hm(i['start'])} to {_hm(i['end'])} UTC"
        for n, (value, out, what) in enumerate(
            ((i["served_disk"], disk, "served from disk"), (i["fetched"], fetched, "fetched"))
        ):
            if value <= 0:
                continue
            h = max(1.5, value / peak * (height - top))
            out.append(
                {
                    "x": round(x + n * slot / 2, 2),
                    "y": round(height - h, 1),
                    "w": round(slot / 2 - 0.3, 2),
                    "h": round(h, 1),
                    "title": f"{when}: {human_bytes(value)} {what}",
                }
            )
    grid = [
        {"x": round(width * k / 4, 1), "label": f"-{24 - 6 * k} h" if k < 4 else "now"}
        for k in range(5)
    ]
    return {
        "width": width,
        "height": height,
        "disk": disk,
        "fetched": fetched,
        "peak": human_bytes(peak) if peak > 0 else None,
        "grid": grid,
        "empty": not disk and not fetched,
    }


def _hm(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M")
