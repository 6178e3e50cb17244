"""Trend charts over windows, rendered on the server as inline SVG: no script, no CDN, readable
on a phone. Each chart marks the windows whose count changed sharply against the windows just
before it (the playbook's "alert on rate changes, not absolutes"): a red triangle up for a jump,
a blue one down for a drop, labelled with the change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 180
PAD_L, PAD_R, PAD_T, PAD_B = 44, 14, 30, 34
TRAILING = 3  # windows the change is measured against
JUMP = 2.0  # a count at least twice the trailing mean (and up by MIN_DELTA) is marked
MIN_DELTA = 3

SERIES: tuple[tuple[str, str], ...] = (
    ("approvals", "Approvals granted"),
    ("denials", "Denials"),
    ("budget_exhaustions", "Budget exhaustions"),
    ("token_exhaustions", "Token budget exhaustions"),
    ("recoveries", "Recoveries"),
    ("restarts", "Worker restarts"),
    ("killswitch_engagements", "Kill-switch engagements"),
)


@dataclass(frozen=True, slots=True)
class Change:
    index: int
    value: int
    baseline: float
    up: bool

    @property
    def label(self) -> str:
        if self.baseline == 0:
            return f"+{self.value} (from 0)"
        pct = (self.value - self.baseline) / self.baseline * 100
        return f"{pct:+.0f}%"


def rate_changes(values: Sequence[int]) -> list[Change]:
    """Windows whose count is at least JUMP times (or at most 1/JUMP of) the mean of the
    TRAILING windows before it, and differs from that mean by at least MIN_DELTA."""
    marks = []
    for i in range(1, len(values)):
        before = values[max(0, i - TRAILING) : i]
        mean = sum(before) / len(before)
        value = values[i]
        if value - mean >= MIN_DELTA and value >= JUMP * mean:
            marks.append(Change(i, value, mean, up=True))
        elif mean - value >= MIN_DELTA and value * JUMP <= mean:
            marks.append(Change(i, value, mean, up=False))
    return marks


def line_chart(title: str, labels: Sequence[str], values: Sequence[int]) -> Markup:
    """One series as an SVG line with its points, axes, and rate-change marks."""
    n = len(values)
    top = max([*values, 1])
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)

    def y(v: float) -> float:
        return PAD_T + inner_h - inner_h * v / top

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{PAD_L}" y1="{y(0):.1f}" x2="{WIDTH - PAD_R}" y2="{y(0):.1f}"/>',
        f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{y(0):.1f}"/>',
        f'<text class="tick" x="{PAD_L - 6}" y="{y(top) + 4:.1f}" text-anchor="end">{top}</text>',
        f'<text class="tick" x="{PAD_L - 6}" y="{y(0) + 4:.1f}" text-anchor="end">0</text>',
    ]
    if n:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline class="series" points="{points}"/>')
        for i, v in enumerate(values):
            parts.append(f'<circle class="point" cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5">'
                         f"<title>{escape(labels[i])}: {v}</title></circle>")  # fmt: skip
        step = max(1, n // 5)
        for i in range(0, n, step):
            parts.append(f'<text class="tick" x="{x(i):.1f}" y="{HEIGHT - 8}" '
                         f'text-anchor="middle">{escape(_short(labels[i]))}</text>')  # fmt: skip
        for mark in rate_changes(values):
            cx, cy = x(mark.index), y(mark.value)
            if mark.up:
                tri = f"{cx - 6:.1f},{cy - 6:.1f} {cx + 6:.1f},{cy - 6:.1f} {cx:.1f},{cy - 15:.1f}"
                ty = cy - 18
            else:
                tri = f"{cx - 6:.1f},{cy + 6:.1f} {cx + 6:.1f},{cy + 6:.1f} {cx:.1f},{cy + 15:.1f}"
                ty = cy + 26
            cls = "jump" if mark.up else "drop"
            parts.append(f'<polygon class="{cls}" points="{tri}"><title>{escape(labels[mark.index])}: '
                         f"{mark.value} vs {mark.baseline:.1f} before ({mark.label})</title></polygon>")  # fmt: skip
            parts.append(f'<text class="{cls}-label" x="{cx:.1f}" y="{max(ty, 10):.1f}" '
                         f'text-anchor="middle">{escape(mark.label)}</text>')  # fmt: skip
    else:
        parts.append(f'<text class="tick" x="{WIDTH / 2}" y="{HEIGHT / 2}" '
                     'text-anchor="middle">no windows yet</text>')  # fmt: skip
    parts.append("</svg>")
    return Markup("".join(parts))


def _short(label: str) -> str:
    # Window keys are ISO instants (2026-11-02T09:00:00+00:00): month-day, and the hour when
    # the windows are shorter than a day.
    if len(label) < 16 or label[4] != "-":
        return label[:12]
    return label[5:10] if label[11:16] == "00:00" else f"{label[5:10]} {label[11:13]}h"


def trend_charts(windows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One chart per series, plus one per denial reason seen, over the given windows."""
    labels = [str(w["window_key"]) for w in windows]
    out = []
    for key, title in SERIES:
        values = [int(w["counts"].get(key, 0)) for w in windows]
        out.append({"key": key, "title": title, "svg": line_chart(title, labels, values),
                    "changes": len(rate_changes(values)), "total": sum(values)})  # fmt: skip
    reasons = sorted({r for w in windows for r in w.get("denials_by_reason", {})})
    for reason in reasons:
        values = [int(w.get("denials_by_reason", {}).get(reason, 0)) for w in windows]
        title = f"Denials: {reason}"
        out.append({"key": f"denials:{reason}", "title": title,
                    "svg": line_chart(title, labels, values),
                    "changes": len(rate_changes(values)), "total": sum(values)})  # fmt: skip
    return out
