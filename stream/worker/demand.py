"""Category demand in the worker: the partial aggregates in the batch protocol, the ``category-demand``
topic, and ``GET /categories/demand`` (docs/ARCHITECTURE.md §Category demand).

* :class:`DemandStage` runs inside step 1 of the batch protocol (docs/ARCHITECTURE.md §Protocol): it
  reads the partial aggregate of each source partition of the batch from the table (key ``d:<p>``),
  adds what the batch applied (:class:`~demandstream.stream.engine.demand.DemandAggregator`), and hands
  back the new aggregates as table writes and the closed windows as records of the ``category-demand``
  topic, in the source partition. The pipeline writes both like the signals and the user states, so a
  partial aggregate moves with its partition on a rebalance, is restored from the changelog after a
  crash, and under exactly-once commits in the partition's transaction.
* :class:`DemandBoardReader` follows every partition of the ``category-demand`` topic in a thread of its
  own (kafka-python, read_committed) into a :class:`~demandstream.stream.engine.demand.DemandBoard`; each
  worker so holds the merged view of all workers, and :func:`attach_demand_view` serves it.
"""

from __future__ import annotations

import logging
import threading
import time

from faust.web import Request, Response, View

from demandstream.stream.engine.demand import (
    Applied,
    DemandAggregator,
    DemandBoard,
    PartitionAggregate,
    Prev,
    Rising,
    aggregate_key,
)
from demandstream.stream.engine.inference import BatchResult, Output
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)

#: At start a worker's view reloads the ``category-demand`` records produced this long ago or later (by
#: record timestamp): a day of windows, so the rising marks have their earlier windows at once.
VIEW_LOOKBACK_S = 86400.0
#: Windows the view keeps in memory (the newest): 48 five-minute windows are four hours.
VIEW_KEEP_WINDOWS = 48
#: The largest ``window`` the view takes: the largest unix time a JSON number of the answer can carry.
WINDOW_START_MAX = 2**63 - 1
#: The view's ``top`` when the request gives none, and the most it returns.
VIEW_TOP_DEFAULT, VIEW_TOP_MAX = 20, 1000
#: How long one poll of the view's consumer waits for records.
POLL_TIMEOUT_MS = 500


class DemandStage:
    """The category-demand part of a micro-batch (called by the pipeline in step 1)."""

    def __init__(self, settings: Settings, category_name):
        self.settings = settings
        self.aggregator = DemandAggregator(settings.demand_window_s, settings.demand_lateness_s)
        self.category_name = category_name  # a prediction code -> its name (Scorer.category_name)
        self.late_logged = 0

    def process(self, res: BatchResult, read) -> list[Output]:
        """Add the batch to the partial aggregates of its partitions: the new aggregates go into
        ``res.states`` (first, so each partition's changelog records start with it: a state the broker
        acknowledged always has its aggregate acknowledged too); the records of the windows that closed
        are returned, for the ``category-demand`` topic in their source partition."""
        if not res.applied:
            return []
        name = self.category_name
        applied = []
        for prev, evs, recs, preds in res.applied:
            p = recs[0].partition
            pv = None
            if prev is not None:
                last_ts, last_top, last_prop, prev_part, prev_off = prev
                pv = Prev(
                    last_ts,
                    [(name(c), q) for c, q in last_top],
                    last_prop,
                    prev_off if prev_part == p else -1,  # another partition's event: never counted here
                )
            applied.append(Applied(pv, p, evs, [r.offset for r in recs], preds))
        parts = sorted({a.partition for a in applied})
        stored = read([(aggregate_key(p), p) for p in parts])
        aggs: dict[int, PartitionAggregate] = {}
        for p in parts:
            raw = stored.get(aggregate_key(p))
            agg = PartitionAggregate.decode(raw) if raw is not None else None
            if raw is not None and agg is None:
                logger.warning("partition %d: discarding a partial demand aggregate of another format", p)
            if agg is not None:
                aggs[p] = agg
        late_before = sum(a.late_events for a in aggs.values())
        closed = self.aggregator.update(aggs, applied)
        late = sum(a.late_events for a in aggs.values()) - late_before
        if late:
            logger.info("category demand: %d late events (their window had closed) left out", late)
        res.states = {**{aggregate_key(p): (p, a.encode()) for p, a in aggs.items()}, **res.states}
        return [Output(k, v, p) for p, recs in closed.items() for k, v in recs]


def rising_rule(settings: Settings) -> Rising:
    return Rising(settings.demand_rising_ratio, settings.demand_rising_windows, settings.demand_rising_min)


def demand_consumer(settings: Settings, lookback_s: float | None):
    """A kafka-python consumer assigned every partition of the ``category-demand`` topic, positioned
    ``lookback_s`` back by record time (None: from the beginning); returns (consumer, partitions)."""
    from kafka import KafkaConsumer, TopicPartition

    from demandstream.stream.admin import UNREACHABLE, KafkaUnavailable, unreachable_message

    topic = settings.topic_demand
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="demandstream-demand-view",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # exactly-once: aborted windows are never shown
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None
    parts = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + 30
    while not parts and time.monotonic() < deadline:
        time.sleep(0.5)
        consumer.poll(timeout_ms=100)
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        consumer.close()
        raise KafkaUnavailable(f"topic {topic} does not exist (the worker creates it at start)")
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    if lookback_s is None:
        consumer.seek_to_beginning(*tps)
    else:
        since_ms = int((time.time() - lookback_s) * 1000)
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            if at is None:
                consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, at.offset)
    return consumer, len(tps)


class DemandBoardReader(threading.Thread):
    """Follows the ``category-demand`` topic into a :class:`DemandBoard` until :meth:`stop`."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="demand-view")
        self.settings = settings
        self.lock = threading.Lock()
        self.board: DemandBoard | None = None
        self._stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as exc:  # the view must not take the worker down; it says why it is empty
                self.error = f"{type(exc).__name__}: {exc}"
                logger.exception(
                    "category demand view: reading %s failed; retrying", self.settings.topic_demand
                )
                self._stop.wait(5.0)

    def _follow(self) -> None:
        consumer, n = demand_consumer(self.settings, VIEW_LOOKBACK_S)
        try:
            with self.lock:
                self.board = DemandBoard(n, rising_rule(self.settings), VIEW_KEEP_WINDOWS)
            self.error = None
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=5000)
                if polled:
                    with self.lock:
                        for recs in polled.values():
                            for r in recs:
                                self.board.add(r.value)
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()

    def view(self, top: int, start: int | None) -> dict:
        with self.lock:
            if self.board is None:
                return {"window_start": None, "categories": [], "windows": [], "error": self.error}
            return self.board.view(top, start)


#: The answer of ``GET /categories/demand`` on a worker whose category demand is off (the default).
CATEGORY_DEMAND_OFF = (
    "category demand is off on this worker: set DEMANDSTREAM_DEMAND_WINDOW_S (e.g. 300) on every worker "
    "(docs/OPERATIONS.md §7)"
)


def attach_demand_view(c, require_token) -> DemandBoardReader | None:
    """Serve ``GET /categories/demand?top=N[&window=START]`` (bearer token as ``/users/{id}/demand``);
    the reader thread starts with the worker and stops with it. When category demand is off, the view
    answers 404 saying so, and there is no reader (None)."""
    s = c.settings
    app = c.app
    if not s.demand_window_s:

        @app.page("/categories/demand")
        @require_token
        async def categories_demand_off(self: View, request: Request) -> Response:
            # a bare 404 would read as a wrong URL; the setting is what is missing
            return self.json({"error": CATEGORY_DEMAND_OFF}, status=404)

        return None
    reader = DemandBoardReader(s)

    @app.task
    async def start_demand_view() -> None:
        reader.start()

    @app.on_before_shutdown.connect
    async def stop_demand_view(app, **kwargs) -> None:
        reader.stop()

    @app.page("/categories/demand")
    @require_token
    async def categories_demand(self: View, request: Request) -> Response:
        try:
            top = int(request.query.get("top", VIEW_TOP_DEFAULT))
            start = request.query.get("window")
            start = None if start is None else int(start)
        except ValueError:
            return self.json({"error": "top and window must be integers"}, status=400)
        if not 1 <= top <= VIEW_TOP_MAX:
            return self.json({"error": f"top must be between 1 and {VIEW_TOP_MAX}"}, status=400)
        if start is not None and not 0 <= start <= WINDOW_START_MAX:
            # beyond it the answer, which echoes the window, could not even be written as JSON
            return self.json(
                {"error": f"window must be a unix time in seconds (0 to {WINDOW_START_MAX})"}, status=400
            )
        return self.json(reader.view(top, start))

    return reader
