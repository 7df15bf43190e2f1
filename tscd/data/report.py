"""A small report object that the preparation and check commands fill and print."""
from __future__ import annotations

from dataclasses import dataclass, field

#: How many individual problems a report lists before it only counts them.
MAX_LISTED = 20


@dataclass
class Report:
    """Findings of a preparation or check run.

    Attributes:
        title: first line of the report.
        lines: informational lines (counts, outputs written).
        warnings: problems that do not stop training (e.g. no val list found).
        errors: problems that make data unusable (each names the file).
    """

    title: str
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no errors."""
        return not self.errors

    def info(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, line: str) -> None:
        self.warnings.append(line)

    def error(self, line: str) -> None:
        self.errors.append(line)

    def format(self) -> str:
        """Human-readable multi-line text."""
        out = [self.title, "=" * len(self.title), *self.lines]
        for kind, items in (("WARNING", self.warnings), ("ERROR", self.errors)):
            for item in items[:MAX_LISTED]:
                out.append(f"{kind}: {item}")
            if len(items) > MAX_LISTED:
                out.append(f"{kind}: ... and {len(items) - MAX_LISTED} more")
        out.append(f"result: {'OK' if self.ok else f'{len(self.errors)} error(s)'}"
                   + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        return "\n".join(out)
