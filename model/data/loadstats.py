"""What a load read, rejected and cleaned: the counters :func:`~demandstream.model.data.loaders.load_log`
and :func:`~demandstream.model.data.cleaning.clean_log` fill, kept apart so that both modules import it
and neither imports the other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadStats:
    """What a load read, rejected and cleaned; filled by :func:`load_log` and :func:`clean_log`.

    ``malformed`` counts skipped rows by reason code. ``users_dropped_rate`` and
    ``events_dropped_rate`` count bot users and their events; ``missing_category`` counts kept
    events without a category; ``out_of_order_fixed`` counts kept users whose rows were not in
    time order in the files.

    >>> s = LoadStats(rows_read=10, rows_kept=7, duplicates_dropped=2)
    >>> s.malformed["bad_time"] += 1
    >>> print(s.summary().splitlines()[0])
    read 10 rows from 0 files in 0.0 s, kept 7 events
    """

    rows_read: int = 0
    rows_kept: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    duplicates_dropped: int = 0
    users_dropped_rate: int = 0
    events_dropped_rate: int = 0
    missing_category: int = 0
    out_of_order_fixed: int = 0
    #: The stable fraction of users kept (:mod:`~demandstream.model.data.sampling`) and the rows of the
    #: others, dropped before validation (a row whose user column is no valid id is validated instead).
    user_sample: float = 1.0
    rows_outside_sample: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def summary(self) -> str:
        """A few human-readable lines, for the CLI and logs."""
        reasons = ", ".join(f"{r} {n:,}" for r, n in self.malformed.most_common())
        lines = [
            f"read {self.rows_read:,} rows from {len(self.files)} files in {self.seconds:.1f} s, "
            f"kept {self.rows_kept:,} events",
            f"malformed rows skipped: {self.malformed_total:,}" + (f" ({reasons})" if reasons else ""),
            f"exact duplicates dropped: {self.duplicates_dropped:,}",
            f"bot users dropped: {self.users_dropped_rate:,} ({self.events_dropped_rate:,} events)",
            f"kept events without category: {self.missing_category:,}",
            f"users re-sorted into time order: {self.out_of_order_fixed:,}",
        ]
        if self.user_sample < 1.0:
            lines.append(
                f"user sample {self.user_sample:g}: rows of other users dropped unvalidated: "
                f"{self.rows_outside_sample:,}"
            )
        return "\n".join(lines)
