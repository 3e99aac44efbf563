"""Geometry of the overview's SVG chart (drawn by the template, no JavaScript)."""

from __future__ import annotations

from typing import Any

from regproxy.ui.history import SAMPLE_SECONDS, SAMPLES
from regproxy.units import human_bytes


def chart(intervals: list[dict[str, float]], now: float) -> dict[str, Any]:
    """Geometry of the overview's SVG: bytes per 10 minutes over the last 24 hours, one slot
    per interval (the open one at the right edge), a blue bar (disk) and an orange one (fetched)."""
    width, height, top = 720.0, 120.0, 14.0
    span = SAMPLES * SAMPLE_SECONDS
    peak = max([1.0, *(max(i["served_disk"], i["fetched"]) for i in intervals)])
    slot = width / SAMPLES
    disk: list[dict[str, float]] = []
    fetched: list[dict[str, float]] = []
    for i in intervals:
        age = max(0.0, now - i["end"])
        right = width - age / span * width
        x = max(0.0, min(width - slot, right - slot))
        for n, (value, out) in enumerate(((i["served_disk"], disk), (i["fetched"], fetched))):
            if value <= 0:
                continue
            h = max(1.5, value / peak * (height - top))
            out.append(
                {
                    "x": round(x + n * slot / 2, 2),
                    "y": round(height - h, 1),
                    "w": round(slot / 2 - 0.3, 2),
                    "h": round(h, 1),
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
        "peak": human_bytes(peak),
        "grid": grid,
        "empty": not disk and not fetched,
    }
