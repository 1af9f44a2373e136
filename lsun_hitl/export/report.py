"""What an export wrote, and the error raised for an export that cannot be made as asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the input and the fix."""


@dataclass
class ExportReport:
    """What an export wrote: images (or rows) per class, and the images left out with the reason.

    Attributes
    ----------
    format
        The export's format, as printed (``lsun``, ``parquet``, ``imagefolder``, ...).
    out
        Where it was written.
    written
        Images, rows or tasks written, per class, split or category.
    skipped
        ``(uri, reason)`` of each image left out.
    seconds
        Wall-clock time the export took.
    skipped_file
        Name of the CSV file listing ``skipped`` in exports that write one.
    """

    format: str
    out: str
    written: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    skipped_file: str = "skipped.csv"

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to what was written under ``key`` (the key appears even when ``n`` is 0)."""
        self.written[key] = self.written.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "out": self.out,
            "written": self.written,
            "skipped": [list(s) for s in self.skipped],
            "seconds": round(self.seconds, 2),
        }

    def __str__(self) -> str:
        what = ", ".join(f"{k} {v:,}" for k, v in self.written.items()) or "nothing"
        text = f"{self.format} export -> {self.out}: {what} ({self.seconds:.1f} s)"
        if self.skipped:
            text += f"\n  {len(self.skipped)} image(s) left out, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"
        return text
