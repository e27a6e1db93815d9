"""What ``demandstream bench`` measures and at which sizes: the full and quick plans, the latency levels,
and the units the report gives figures in. Shared by the measuring (:mod:`demandstream.stream.bench.runner`)
and the Markdown (:mod:`demandstream.stream.bench.report`)."""

from __future__ import annotations

from dataclasses import dataclass

#: Fractions of the measured pipeline max rate at which latency is measured (docs/ARCHITECTURE.md §Benchmark).
LOAD_LEVELS = (0.25, 0.50, 0.75)


#: The exactly-once worker's latency as a read_committed consumer sees it is measured at this share of
#: the (at-least-once) pipeline's maximum, the lowest of :data:`LOAD_LEVELS`: a load it keeps up with.
VISIBLE_LOAD = LOAD_LEVELS[0]
VISIBLE_PART = f"exactly_once latency {round(VISIBLE_LOAD * 100)}%"


#: Users the memory figure is given per: MiB per this many users' restored states.
MEMORY_PER_USERS = 100_000


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of one bench run."""

    events: int  #: events pre-loaded and drained per passthrough / pipeline round
    rounds: int  #: passthrough + pipeline pairs
    latency_s: float  #: seconds of paced load per latency level
    restore_users: int  #: state records in the changelog the restore worker recovers
    disk_users: int  #: states written to RocksDB for the on-disk size
    train_events: int  #: generated events the training measurement runs on (one epoch)
    step_min_s: float  #: minimum timed seconds per step / recompute figure
    profile_s: float  #: py-spy seconds on the loaded worker (0 = no profile)


FULL = BenchPlan(
    events=100_000,
    rounds=3,
    latency_s=20.0,
    restore_users=1_000_000,
    disk_users=1_000_000,
    train_events=200_000,
    step_min_s=0.3,
    profile_s=15.0,
)


# Quick trains on 10k events, not 50k, and restores 25k states, not 100k: one epoch of 50k takes ~45 s
# and Faust recovers ~3,000 records/s on a shared 2-core box, either of which alone would break the
# two-minute budget of `bench --quick`.
QUICK = BenchPlan(
    events=20_000,
    rounds=1,
    latency_s=8.0,
    restore_users=25_000,
    disk_users=100_000,
    train_events=10_000,
    step_min_s=0.05,
    profile_s=0.0,
)


def latency_key(level: float) -> str:
    """The key of a load level in the report's ``latency_ms`` and in part names.

    >>> latency_key(0.25)
    '25%'
    """
    return f"{round(level * 100)}%"
