"""Offline loaders: event files (our JSONL, REES46 CSV, RetailRocket CSV, Taobao CSV) into an EventLog.

Rows are streamed, one line at a time, from plain or gzip files into an
:class:`~demandstream.model.data.eventlog.EventLogBuilder`; every row becomes a dict in the schema of docs/ARCHITECTURE.md
§Events and goes through :func:`~demandstream.model.core.events.validate_event`, so files and the Kafka topic obey the same
rules. A row that fails (wrong column count, unparseable number or time, :class:`BadEvent`) is
counted by reason in :class:`LoadStats` and skipped. The loaded log is then cleaned
(:func:`~demandstream.model.data.cleaning.clean_log`) unless ``clean=None``.

Formats
-------
``jsonl``
    One event object per line, our schema.
``rees46``
    The public REES46 CSV (``event_time,event_type,product_id,category_id,category_code,brand,
    price,user_id,user_session``). The category is ``category_code`` when filled, else
    ``category_id`` (the cosmetics shop rarely fills the code); ``session_id`` is
    ``user_session``; ``event_id`` is ``<file stem>:<line number>``, stable across loads.
``retailrocket``
    ``events.csv`` (``timestamp,visitorid,event,itemid,transactionid``, timestamps in ms).
    The category comes from ``item_properties*.csv`` rows with property ``categoryid``: the
    value in force at the event's time, or the item's earliest known value for events before
    it. The category is the leaf ``categoryid`` string; the parent from ``category_tree.csv``
    is not folded into the name, so one category keeps one name whatever the tree says
    (:func:`read_category_tree` gives the tree to whoever wants parents). Side files are found
    next to ``events.csv`` or passed explicitly.
``taobao``
    The Taobao UserBehavior CSV, without a header: ``user_id,item_id,category_id,behavior_type,
    timestamp`` with behaviors ``pv``/``cart``/``fav``/``buy`` (view, add_to_cart, favorite,
    purchase) and unix seconds; no price. The category is ``category_id``; ``event_id`` is
    ``<file stem>:<line number>``.
``auto``
    The command line's default: the format is told by each file's first line (:func:`detect_format`).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "s.csv").write_text(
...     "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\\n"
...     "2019-10-01 00:00:05 UTC,purchase,p1,17,,acme,2.50,u1,s1\\n"
...     "2019-10-01 00:00:00 UTC,cart,p1,17,,acme,2.50,u1,s1\\n"
...     "2019-10-01 00:00:00 UTC,cart,p1,17,,acme,not-a-price,u1,s1\\n")
>>> stats = LoadStats()
>>> log = load_log(d / "s.csv", "rees46", stats=stats)
>>> [(e.event_id, e.type, e.category) for e in log.user_events(0)]
[('s:3', 'add_to_cart', '17'), ('s:2', 'purchase', '17')]
>>> stats.rows_read, stats.rows_kept, dict(stats.malformed), stats.out_of_order_fixed
(3, 2, {'bad_number': 1}, 1)
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import glob
import gzip
import io
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import orjson

from demandstream.model.core.events import (
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    TYPE_INDEX,
    BadEvent,
    Event,
    iso_seconds,
    parse_event,
    validate_event,
)
from demandstream.model.data.cleaning import CleaningConfig, clean_log
from demandstream.model.data.eventlog import EventLog, EventLogBuilder
from demandstream.model.data.loadstats import LoadStats
from demandstream.model.data.sampling import check_fraction, in_user_sample
from demandstream.model.errors import DataError, DataNotFound, OptionError

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl", "rees46", "retailrocket", "taobao")
#: The command line's default format: each file's format is told by its first line (:func:`detect_format`).
AUTO = "auto"
#: How much of a file's first line :func:`detect_format` reads: a file of binary garbage has no line end.
SNIFF_CHARS = 64 * 1024

REES46_HEADER = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
RR_EVENTS_HEADER = ("timestamp", "visitorid", "event", "itemid", "transactionid")
RR_PROPERTIES_HEADER = ("timestamp", "itemid", "property", "value")
RR_TREE_HEADER = ("categoryid", "parentid")

#: Public event names of each CSV format mapped to ours (docs/ARCHITECTURE.md §Events); anything else is
#: passed on unchanged so that validate_event rejects it with its own reason code.
REES46_TYPES = {
    "view": "view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}
RR_TYPES = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}
TAOBAO_TYPES = {"pv": "view", "cart": "add_to_cart", "fav": "favorite", "buy": "purchase"}

#: Columns of a Taobao UserBehavior row (the file has no header).
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")

#: Reason codes of rows rejected before validation (validate_event's own codes come from BadEvent).
COLUMN_COUNT = "column_count"
BAD_NUMBER = "bad_number"
BAD_TIME = "bad_time"
BAD_CSV = "bad_csv"
#: validate_event's code for an unknown event type, used for a Taobao behavior outside TAOBAO_TYPES.
BAD_TYPE = "bad_type"

#: RetailRocket timestamps are unix milliseconds.
MS_PER_S = 1000.0

#: The gzip magic number: files are decompressed by content, whatever their name says.
GZIP_MAGIC = b"\x1f\x8b"
#: What reading a truncated or corrupt gzip file raises: a stream that ends before its end marker, a
#: bad header, bad compressed data.
CORRUPT_COMPRESSED = (EOFError, gzip.BadGzipFile, zlib.error)

DEFAULT_CLEANING = CleaningConfig()

PathsArg = str | Path | Sequence[str | Path]


# -- public entry points -----------------------------------------------------------------------


def load_log(
    paths: PathsArg,
    fmt: str,
    *,
    keep_ids: bool = True,
    clean: CleaningConfig | None = DEFAULT_CLEANING,
    stats: LoadStats | None = None,
    item_properties: Sequence[str | Path] | None = None,
    category_tree: str | Path | None = None,
    user_sample: float = 1.0,
) -> EventLog:
    """Load event files into one :class:`EventLog`, cleaned and sorted by user and time.

    Parameters
    ----------
    paths
        A path, a glob, or a sequence of them; a directory stands for its data files.
        Files are read in the given order (globs sorted); ``.gz`` is read transparently.
    fmt
        One of :data:`FORMATS`, or :data:`AUTO` to tell it from the files (:func:`detect_format`).
    keep_ids
        Keep event and session ids (about 130 more bytes a row at peak; training does not need them).
    clean
        Cleaning to apply; ``None`` returns the rows as read, in file order, without ``user_start``.
    stats
        Filled with counts when given.
    item_properties, category_tree
        RetailRocket side files; by default ``item_properties*.csv[.gz]`` and
        ``category_tree.csv[.gz]`` next to each events file (or among ``paths``) are used.
    user_sample
        Keep only this stable fraction of the users, with all of their events
        (:mod:`~demandstream.model.data.sampling`): how a log too large for memory is trained and
        evaluated. Rows of the other users are validated and counted, then dropped before they cost
        memory; 1.0 keeps everyone.

    Raises
    ------
    demandstream.model.errors.OptionError
        Unknown format (a ``ValueError``).
    demandstream.model.errors.DataError
        A file whose header does not match the format, rows none of which is a valid event of the
        format (the message names the format the first file looks like, when another one), or
        (``auto``) files whose format cannot be told or differs (a ``ValueError``).
    demandstream.model.errors.DataNotFound
        A path or glob that names no file (a ``FileNotFoundError``).
    """
    if fmt not in FORMATS and fmt != AUTO:
        raise OptionError(f"unknown format {fmt!r}; expected one of {', '.join((AUTO, *FORMATS))}")
    stats = stats if stats is not None else LoadStats()
    stats.user_sample = check_fraction(user_sample)
    started = time.perf_counter()
    files = expand_paths(paths)
    if fmt == AUTO:
        fmt = detect_format(files)
    sink = _Sink(EventLogBuilder(keep_ids=keep_ids), stats, user_sample)
    if fmt == "retailrocket":  # several kinds of file, told apart by their headers
        _load_retailrocket(files, sink, item_properties, category_tree)
    else:
        read = _FILE_READERS[fmt]
        for p in files:
            stats.files.append(str(p))
            read(p, sink)
    log = sink.builder.build()
    del sink  # the builder's chunks are copies of the log's columns: free them before cleaning
    stats.rows_kept = len(log)
    if stats.rows_read and not stats.rows_kept:
        if stats.rows_outside_sample:
            raise DataError(
                f"the user sample {user_sample:g} kept none of the {stats.rows_outside_sample:,} rows' users; "
                "take a larger fraction"
            )
        raise DataError(_nothing_valid(files, fmt, stats))
    if clean is not None:
        log = clean_log(log, clean, stats)
    stats.seconds += time.perf_counter() - started
    logger.info("loaded %s: %s", fmt, stats.summary().replace("\n", "; "))
    return log


def detect_format(paths: PathsArg) -> str:
    """The format of event files, told by each file's first non-empty line (:func:`sniff_line`).

    Empty files say nothing; with no line at all the answer is ``jsonl`` (an empty log). RetailRocket's
    side files (item properties, category tree) count as ``retailrocket``.

    Raises
    ------
    demandstream.model.errors.DataError
        A file whose first line matches no format, or files of different formats.
    """
    found: dict[str, Path] = {}
    for p in expand_paths(paths):
        line = _first_line(p)
        if line is None:
            continue
        fmt = sniff_line(line)
        if fmt is None:
            raise DataError(
                f"{p}: cannot tell its format from its first line {line[:80]!r}; "
                f"pass --format {'|'.join(FORMATS)}"
            )
        found.setdefault(fmt, p)
    if len(found) > 1:
        kinds = ", ".join(f"{p} is {fmt}" for fmt, p in found.items())
        raise DataError(f"the files are in different formats ({kinds}): load them separately")
    fmt = next(iter(found), "jsonl")
    logger.info("format %s, told by the files' first lines", fmt)
    return fmt


def sniff_line(line: str) -> str | None:
    """The format whose files begin with ``line`` (a file's first non-empty line), None if none does:
    a JSON object is ``jsonl``; a header of REES46 or of any RetailRocket file names its format; five
    fields with a Taobao behavior in the fourth and digits elsewhere are a (headerless) Taobao row.

    >>> sniff_line('{"event_id": "e1", "user_id": "u1"}'), sniff_line("1,2268318,2520377,pv,1511544070")
    ('jsonl', 'taobao')
    >>> sniff_line(",".join(REES46_HEADER)), sniff_line("timestamp,visitorid,event,itemid,transactionid")
    ('rees46', 'retailrocket')
    >>> sniff_line("user,item,category,pv,yesterday") is None
    True
    """
    text = line.lstrip("\ufeff").strip()
    if text.startswith("{"):
        return "jsonl"
    header = _split_header(text)
    if header == REES46_HEADER:
        return "rees46"
    if header in (RR_EVENTS_HEADER, RR_PROPERTIES_HEADER, RR_TREE_HEADER):
        return "retailrocket"
    fields = [f.strip() for f in text.split(",")]
    if len(fields) == len(TAOBAO_COLUMNS):
        user, item, category, behavior, ts = fields
        if behavior in TAOBAO_TYPES and all(x.isdigit() for x in (user, item, category, ts)):
            return "taobao"
    return None


def _first_line(path: Path) -> str | None:
    """The first non-empty line of a file (at most :data:`SNIFF_CHARS` of it), None for an empty file."""
    with open_text(path) as f:
        while line := f.readline(SNIFF_CHARS):
            if line.strip():
                return line
    return None


def _nothing_valid(files: list[Path], fmt: str, stats: LoadStats) -> str:
    """The error of a load that read rows and kept none: the reasons, and the format the files look like
    when it is another one (the usual cause: a CSV read as ``jsonl``)."""
    reasons = ", ".join(f"{r} {n:,}" for r, n in stats.malformed.most_common(3))
    msg = f"none of the {stats.rows_read:,} rows read is a valid {fmt} event ({reasons})"
    line = _first_line(files[0])
    guess = sniff_line(line) if line is not None else None
    if guess is not None and guess != fmt:
        msg += f"; {files[0]} looks like {guess}: pass --format {guess} (or {AUTO})"
    return msg


def expand_paths(paths: PathsArg) -> list[Path]:
    """Paths, globs and directories as a list of files (globs and directories sorted)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise DataNotFound("no input files given")
    out: list[Path] = []
    for item in items:
        s = str(item)
        if glob.has_magic(s):
            matches = sorted(Path(m) for m in glob.glob(s) if Path(m).is_file())
            if not matches:
                raise DataNotFound(f"no files match {s}")
            out.extend(matches)
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_data_name(q.name))
            if not found:
                raise DataNotFound(f"no data files in directory {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataNotFound(f"no such file: {p}")
    return out


@contextlib.contextmanager
def open_binary(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a plain or gzip file for reading bytes, decompressed; gzip is told by its magic number, not
    by the file's name (the one place that decides, for every reader of input files).

    A compressed file that turns out truncated or corrupt while it is read inside the ``with`` block (a
    download cut short) raises :class:`~demandstream.model.errors.DataError` naming the file, so the
    command line says it in one line instead of a traceback from deep inside gzip.
    """
    with open(path, "rb") as f:
        magic = f.read(len(GZIP_MAGIC))
    try:
        with gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb") as fh:
            yield fh
    except CORRUPT_COMPRESSED as exc:
        raise DataError(
            f"{path}: cannot be read to its end, the file is truncated or corrupt ({exc})"
        ) from exc


@contextlib.contextmanager
def open_text(path: str | Path) -> Iterator[IO[str]]:
    """Open a plain or gzip file as UTF-8 text (undecodable bytes replaced, not fatal); a truncated or
    corrupt compressed file raises as in :func:`open_binary`."""
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as f:
        yield f


def read_category_tree(path: str | Path) -> dict[str, str | None]:
    """RetailRocket ``category_tree.csv`` as ``{categoryid: parentid or None}``.

    Malformed lines are skipped (and logged): the tree is auxiliary data.
    """
    tree: dict[str, str | None] = {}
    bad = 0
    with open_text(path) as f:
        rows = csv.reader(f)
        _expect_header(path, next(rows, None), RR_TREE_HEADER)
        for row in rows:
            if len(row) != 2 or not row[0]:
                bad += 1
                continue
            tree[row[0]] = row[1] or None
    if bad:
        logger.warning("%s: skipped %d malformed lines", path, bad)
    return tree


class ItemCategories:
    """RetailRocket item -> ``categoryid`` over time, from ``item_properties*.csv`` files.

    Most items never change category, so those are stored as one string; the rest keep their
    (timestamp, value) history for a bisect at event time.

    >>> ic = ItemCategories()
    >>> ic.add("i1", 1000, "5"); ic.add("i1", 3000, "7"); ic.add("i2", 1000, "9"); ic.freeze()
    >>> ic.at("i1", 500), ic.at("i1", 2000), ic.at("i1", 3000), ic.at("i2", 0), ic.at("i3", 0)
    ('5', '5', '7', '9', None)
    """

    def __init__(self) -> None:
        self._raw: dict[str, list[tuple[int, str]]] = {}
        self._fixed: dict[str, str] = {}
        self._history: dict[str, tuple[list[int], list[str]]] = {}

    def add(self, item: str, ts_ms: int, value: str) -> None:
        self._raw.setdefault(item, []).append((ts_ms, value))

    def freeze(self) -> None:
        """Index what was added; call once before :meth:`at`."""
        for item, hist in self._raw.items():
            hist.sort()
            if all(v == hist[0][1] for _, v in hist):
                self._fixed[item] = hist[0][1]
            else:
                self._history[item] = ([t for t, _ in hist], [v for _, v in hist])
        self._raw = {}

    def at(self, item: str, ts_ms: float) -> str | None:
        """The category in force at ``ts_ms``, the earliest one before it, or None if unknown."""
        cat = self._fixed.get(item)
        if cat is not None or not self._history:
            return cat
        hist = self._history.get(item)
        if hist is None:
            return None
        i = bisect.bisect_right(hist[0], ts_ms) - 1
        return hist[1][max(i, 0)]

    def __len__(self) -> int:
        return len(self._fixed) + len(self._history)


def read_item_categories(paths: Sequence[str | Path], stats: LoadStats | None = None) -> ItemCategories:
    """Read the ``categoryid`` rows of RetailRocket ``item_properties`` files (other rows skipped)."""
    ic = ItemCategories()
    bad = 0
    for p in paths:
        with open_text(p) as f:
            _expect_header(p, _split_header(f.readline()), RR_PROPERTIES_HEADER)
            for line in f:
                # Nine in ten property rows are other properties: skip them before splitting.
                if ",categoryid," not in line:
                    continue
                parts = line.rstrip("\r\n").split(",")
                if len(parts) != 4 or parts[2] != "categoryid" or not parts[3]:
                    bad += 1
                    continue
                try:
                    ts_ms = int(parts[0])
                except ValueError:
                    bad += 1
                    continue
                ic.add(parts[1], ts_ms, parts[3])
    ic.freeze()
    if bad:
        logger.warning("item_properties: skipped %d malformed categoryid rows", bad)
    logger.info("item_properties: categories of %d items", len(ic))
    return ic


# -- row sink ------------------------------------------------------------------------------------

#: users whose sample membership a load remembers at once (~25 MB of short ids at most)
SAMPLE_MEMO_USERS = 1 << 18


class _Sink:
    """Validates dicts and appends them to the builder, counting rejects."""

    def __init__(self, builder: EventLogBuilder, stats: LoadStats, user_sample: float = 1.0):
        self.builder = builder
        self.stats = stats
        self.user_sample = user_sample
        self.keep_ids = builder.keep_ids
        # One "now" per load: the same upper bound for every row, and no clock read per row.
        self.now = time.time()
        # Sessions repeat over many rows; sharing one string per session saves ~90 bytes a row.
        self._sessions: dict[str, str] = {}
        self._sample_of: dict[str, bool] = {}

    def reject(self, reason: str) -> None:
        self.stats.malformed[reason] += 1

    def outside_sample(self, user: str) -> bool:
        """Whether a row of ``user`` (its raw column) belongs to a user outside the sample: then it is
        counted as such and goes no further, neither parsed nor validated. With a sample of a tenth of
        a large log's users, most rows are other users', and validating them took 80 % of the load. A
        user column that is no valid id is not decided here, so the row is validated (and rejected)."""
        if self.user_sample >= 1.0 or not 0 < len(user) <= MAX_ID_CHARS:
            return False
        if self._in_sample(user):
            return False
        self.stats.rows_outside_sample += 1
        return True

    def _in_sample(self, user: str) -> bool:
        """:func:`in_user_sample`, remembered for the users of recent rows (a user's rows come in runs
        and sessions; the hash is most of a skipped row's cost). Bounded: forgotten all at once when full."""
        known = self._sample_of.get(user)
        if known is None:
            if len(self._sample_of) >= SAMPLE_MEMO_USERS:
                self._sample_of.clear()
            known = self._sample_of[user] = in_user_sample(user, self.user_sample)
        return known

    def add(self, obj: object) -> None:
        try:
            e = validate_event(obj, now=self.now)
        except BadEvent as exc:
            self.stats.malformed[exc.reason] += 1
            return
        self.append(e)

    def add_raw(self, raw: bytes) -> None:
        if self.user_sample < 1.0 and len(raw) <= MAX_EVENT_BYTES:
            # Only the user id decides a sample, so look at it first (orjson alone is a fifth of
            # parse_event); a row of a sampled user, or one this cannot read, is parsed in full below.
            try:
                user = orjson.loads(raw).get("user_id")
            except (orjson.JSONDecodeError, AttributeError):
                user = None
            if isinstance(user, str) and self.outside_sample(user):
                return
        try:
            e = parse_event(raw, now=self.now)
        except BadEvent as exc:
            self.stats.malformed[exc.reason] += 1
            return
        self.append(e)

    def append(self, e: Event) -> None:
        if self.user_sample < 1.0 and not self._in_sample(e.user_id):
            self.stats.rows_outside_sample += 1
            return
        sid = e.session_id
        if self.keep_ids and sid is not None:
            sid = self._sessions.setdefault(sid, sid)
        self.builder.append_fields(
            e.user_id, e.ts, TYPE_INDEX[e.type], e.item_id, e.category, e.price, e.query, e.event_id, sid
        )


# -- formats -------------------------------------------------------------------------------------


def _read_jsonl(path: Path, sink: _Sink) -> None:
    stats = sink.stats
    with open_binary(path) as f:
        for line in f:
            if not line.strip():
                continue
            stats.rows_read += 1
            # The topic's own parser: same size limit, JSON rules and reason codes as the stream.
            sink.add_raw(line)


def _read_rees46(path: Path, sink: _Sink) -> None:
    stats = sink.stats
    stem = _stem(path)
    keep_ids = sink.keep_ids
    parse_time = _Rees46Time()
    with open_text(path) as f:
        rows = csv.reader(f)
        _expect_header(path, next(rows, None), REES46_HEADER)
        for row in _csv_rows(rows, sink):
            if not row:
                continue
            stats.rows_read += 1
            if len(row) != len(REES46_HEADER):
                sink.reject(COLUMN_COUNT)
                continue
            event_time, etype, product, cat_id, cat_code, _brand, price_s, user, session = row
            if sink.outside_sample(user):
                continue
            ts = parse_time(event_time)
            if ts is None:
                sink.reject(BAD_TIME)
                continue
            if price_s:
                try:
                    price: float | None = float(price_s)
                except ValueError:
                    sink.reject(BAD_NUMBER)
                    continue
            else:
                price = None
            sink.add(
                {
                    # Without ids the event id only has to pass validation, so skip formatting it.
                    "event_id": f"{stem}:{rows.line_num}" if keep_ids else stem,
                    "user_id": user,
                    "ts": ts,
                    "type": REES46_TYPES.get(etype, etype),
                    "item_id": product or None,
                    "category": cat_code or cat_id or None,
                    "price": price,
                    "session_id": session or None,
                }
            )


class _Rees46Time:
    """Parses ``2019-10-01 00:00:00 UTC`` to unix seconds, remembering the previous answer
    (consecutive rows usually share the second)."""

    __slots__ = ("last", "last_ts")

    def __init__(self) -> None:
        self.last = ""
        self.last_ts: float | None = None

    def __call__(self, s: str) -> float | None:
        if s == self.last:
            return self.last_ts
        try:
            ts = iso_seconds(s, naive_is_utc=False, utc_word=True)  # a time without its zone is ambiguous
        except ValueError:
            return None
        self.last, self.last_ts = s, ts
        return ts


def _read_taobao(path: Path, sink: _Sink) -> None:
    stats = sink.stats
    stem = _stem(path)
    keep_ids = sink.keep_ids
    with open_text(path) as f:
        rows = csv.reader(f)
        for row in _csv_rows(rows, sink):
            if not row:
                continue
            stats.rows_read += 1
            if len(row) != len(TAOBAO_COLUMNS):
                sink.reject(COLUMN_COUNT)
                continue
            user, item, cat_id, behavior, ts_s = row
            if sink.outside_sample(user):
                continue
            etype = TAOBAO_TYPES.get(behavior)
            if etype is None:
                # Only the four Taobao behaviors: an alias validate_event would take is still wrong here.
                sink.reject(BAD_TYPE)
                continue
            try:
                ts = float(ts_s)
            except ValueError:
                sink.reject(BAD_TIME)
                continue
            sink.add(
                {
                    "event_id": f"{stem}:{rows.line_num}" if keep_ids else stem,
                    "user_id": user,
                    "ts": ts,
                    "type": etype,
                    "item_id": item or None,
                    "category": cat_id or None,
                }
            )


def _load_retailrocket(
    files: list[Path],
    sink: _Sink,
    item_properties: Sequence[str | Path] | None,
    category_tree: str | Path | None,
) -> None:
    roles: dict[tuple[str, ...], list[Path]] = {
        RR_EVENTS_HEADER: [],
        RR_PROPERTIES_HEADER: [],
        RR_TREE_HEADER: [],
    }
    for p in files:
        header = _first_header(p)
        if header not in roles:
            raise DataError(f"{p}: not a RetailRocket file (header {','.join(header)[:80]!r})")
        roles[header].append(p)
    events = roles[RR_EVENTS_HEADER]
    if not events:
        raise DataError("retailrocket: no events.csv among the inputs")
    props = expand_paths(item_properties) if item_properties else roles[RR_PROPERTIES_HEADER]
    trees = expand_paths(category_tree) if category_tree else roles[RR_TREE_HEADER]
    if not item_properties and not props:
        props = _side_files(events, "item_properties*.csv")
    if not category_tree and not trees:
        trees = _side_files(events, "category_tree.csv")

    item_cats = read_item_categories(props) if props else ItemCategories()
    sink.stats.files.extend(str(p) for p in props)
    for p in events:
        sink.stats.files.append(str(p))
        _read_rr_events(p, sink, item_cats)
    if trees:
        sink.stats.files.append(str(trees[0]))
        tree = read_category_tree(trees[0])
        cats = sink.builder.categories.values
        missing = sum(1 for c in cats if c not in tree)
        logger.info("category_tree: %d of %d event categories not in the tree", missing, len(cats))


def _read_rr_events(path: Path, sink: _Sink, item_cats: ItemCategories) -> None:
    stats = sink.stats
    stem = _stem(path)
    keep_ids = sink.keep_ids
    category_at: Callable[[str, float], str | None] = item_cats.at
    with open_text(path) as f:
        rows = csv.reader(f)
        _expect_header(path, next(rows, None), RR_EVENTS_HEADER)
        for row in _csv_rows(rows, sink):
            if not row:
                continue
            stats.rows_read += 1
            if len(row) != len(RR_EVENTS_HEADER):
                sink.reject(COLUMN_COUNT)
                continue
            ts_s, visitor, etype, item, _transaction = row
            if sink.outside_sample(visitor):
                continue
            try:
                ts_ms = int(ts_s)
            except ValueError:
                sink.reject(BAD_NUMBER)
                continue
            sink.add(
                {
                    "event_id": f"{stem}:{rows.line_num}" if keep_ids else stem,
                    "user_id": visitor,
                    "ts": ts_ms / MS_PER_S,
                    "type": RR_TYPES.get(etype, etype),
                    "item_id": item or None,
                    "category": category_at(item, ts_ms) if item else None,
                }
            )


#: The reader of one file of each format whose files are all alike (RetailRocket's are not).
_FILE_READERS: dict[str, Callable[[Path, _Sink], None]] = {
    "jsonl": _read_jsonl,
    "rees46": _read_rees46,
    "taobao": _read_taobao,
}


# -- helpers -------------------------------------------------------------------------------------


def _csv_rows(reader: Iterator[list[str]], sink: _Sink) -> Iterator[list[str]]:
    """The rows of ``reader``; a line it cannot split (an oversized field, a stray NUL) counts as a
    ``bad_csv`` row and reading goes on, instead of ending the load."""
    while True:
        try:
            yield from reader
            return
        except csv.Error:
            sink.stats.rows_read += 1
            sink.reject(BAD_CSV)


_DATA_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")


def _is_data_name(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(_DATA_SUFFIXES)


def _stem(path: Path) -> str:
    """``cosmetics_2019-oct-nov.csv.gz`` -> ``cosmetics_2019-oct-nov``."""
    name = path.name
    for suffix in (".gz", ".csv", ".jsonl"):
        name = name.removesuffix(suffix)
    return name


def _split_header(line: str) -> tuple[str, ...]:
    return tuple(c.strip().strip('"').lower() for c in line.strip().lstrip("\ufeff").split(","))


def _first_header(path: Path) -> tuple[str, ...]:
    """The names of a CSV file's first line, read to at most :data:`SNIFF_CHARS` (a file without line
    ends is not read whole just to be told it is not a RetailRocket file)."""
    with open_text(path) as f:
        return _split_header(f.readline(SNIFF_CHARS))


def _expect_header(path: str | Path, header: Sequence[str] | None, expected: tuple[str, ...]) -> None:
    got = _split_header(",".join(header)) if header else ()
    if got != expected:
        raise DataError(
            f"{path}: expected header {','.join(expected)}, got {','.join(got)[:80] or 'nothing'}"
        )


def _side_files(events: list[Path], pattern: str) -> list[Path]:
    found: list[Path] = []
    for d in dict.fromkeys(p.parent for p in events):
        found.extend(sorted(d.glob(pattern)) + sorted(d.glob(pattern + ".gz")))
    return found
