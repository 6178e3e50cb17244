"""Writes the generated reference docs: docs/config.md (from the config schema) and
docs/metrics.md (from the metrics table). `python -m supervisor.docgen [--check] [DOCS_DIR]`;
`--check` changes nothing and exits 1 when a file is stale. Tests check the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def generated() -> dict[str, Callable[[], str]]:
    from .ops.metrics import metrics_markdown
    from .schema import markdown

    return {"config.md": markdown, "metrics.md": metrics_markdown}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        print("usage: python -m supervisor.docgen [--check] [DOCS_DIR]", file=sys.stderr)
        return 2
    folder = Path(rest[0]) if rest else Path("docs")
    stale: list[Path] = []
    for name, render in generated().items():
        path, text = folder / name, render()
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if check:
            stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for path in stale:
        print(f"{path} is stale: python -m supervisor.docgen", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
