"""One row of the validate report, its statuses, and the report as a table and a verdict."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SECTIONS = ("environment", "config", "data", "steps", "output")


@dataclass
class Check:
    """One row of the report; ``data`` holds the figures behind the detail, for --json."""

    section: str
    check: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def blocking(checks: Iterable[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def number(value: int) -> str:
    """A count with thousands separators: 12,345."""
    return f"{value:,}"


def format_table(checks: list[Check]) -> str:
    """Aligned columns; a multi-line detail continues under its own column."""
    ordered = sorted(checks, key=lambda c: SECTIONS.index(c.section) if c.section in SECTIONS else len(SECTIONS))
    header = Check("section", "check", "status", "detail")
    widths = [max(len(getattr(c, name)) for c in [header, *ordered]) for name in ("section", "check", "status")]
    lines = []
    previous = None
    for c in [header, *ordered]:
        section = c.section if c.section != previous else ""
        previous = c.section
        first, *more = c.detail.splitlines() or [""]
        lead = f"{section:<{widths[0]}}  {c.check:<{widths[1]}}  {c.status:<{widths[2]}}  "
        lines.append((lead + first).rstrip())
        lines += [(" " * len(lead) + line).rstrip() for line in more]
    return "\n".join(lines)


def summary(checks: list[Check], seconds: float) -> str:
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    verdict = "blocked: fix the FAIL rows before training" if fails else "ready to train"
    return f"{verdict} ({fails} blocking, {warns} warning{'s' * (warns != 1)}; checked in {seconds:.1f} s)"
