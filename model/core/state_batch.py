"""A micro-batch's user states as arrays: decoded from their records at once, stepped, encoded at once.

The stream reads one state record per user and micro-batch, advances it and writes it back. One
:class:`~demandstream.model.core.state.UserState` per user cost about 12 µs a user in Python: the
record's slots turned into lists by :func:`~demandstream.model.core.state.unpack`, the lists into the
arrays the compiled encoder updates, and back, and into bytes again by
:func:`~demandstream.model.core.state.pack`. At one event per user (the low-load regime, where latency
matters) that was about a quarter of the engine. :class:`StateBatch` decodes every record of a batch
with one numpy view of their bytes and encodes them with one, in the layout of
:mod:`demandstream.model.core.state` (the same bytes: tests/unit/model/core/test_state_batch.py checks
both directions against ``pack`` and ``unpack``).

>>> from demandstream.model.core.state import new_state, pack
>>> s = new_state(1, 4, 3); s.model_version = "0a1b2c3d"; s.last_top = [(2, 0.5)]
>>> b, status = StateBatch.decode([pack(s), None, b"junk"], layers=1, hidden=4, slots=3, model_version="0a1b2c3d")
>>> status[0], status[1], status[2].startswith("undecodable")
('ok', 'absent', True)
>>> b.encode([0], "0a1b2c3d") == [pack(s)]
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from demandstream.model.core import encoding_kernel as kernel
from demandstream.model.core.encoding import Summaries, fresh_summaries, store_summaries, summary_arrays
from demandstream.model.core.state import (
    FORMAT,
    HEADER_BYTES,
    HEADER_FIELDS,
    MAGIC,
    SLOT_BYTES,
    SLOT_FIELDS,
    StateFormatError,
    UserState,
    unpack,
)

#: struct codes of the record layout -> numpy type codes (little-endian, unaligned: the record is packed)
_NUMPY_CODE = {
    "2s": "S2",
    "4s": "S4",
    "B": "u1",
    "i": "<i4",
    "q": "<i8",
    "I": "<u4",
    "d": "<f8",
    "H": "<u2",
    "f": "<f4",
}
_SEEN = kernel.INT_FIELDS.index("events_seen")
_LAST_TS = kernel.FLOAT_FIELDS.index("last_ts")


def record_dtype(layers: int, hidden: int, slots: int, ntop: int) -> np.dtype:
    """The numpy view of one state record (the layout of :mod:`demandstream.model.core.state`)."""
    n = layers * hidden
    fields = [(name, _NUMPY_CODE[code]) for name, code in HEADER_FIELDS]
    fields += [("h", "<f4", (n,)), ("c", "<f4", (n,))]
    fields += [(name, _NUMPY_CODE[code], (slots,)) for name, code in SLOT_FIELDS]
    fields += [("top_i", "<i4", (ntop,)), ("top_p", "<f4", (ntop,))]
    dt = np.dtype(fields)
    expected = HEADER_BYTES + 8 * n + SLOT_BYTES * slots + 8 * ntop
    if dt.itemsize != expected:  # a layout changed in state.py without this view
        raise AssertionError(f"record view of {dt.itemsize} bytes, layout of {expected}")
    return dt


class StateBatch:
    """The states of ``n`` users: h and c [layers, n, hidden], the history summaries (the arrays of
    :class:`~demandstream.model.core.encoding.Summaries`), and per user the last source partition and
    offset applied, the stored top-k ``(code, p)`` and propensity. Rows are users; ``reset`` makes a row
    a user never seen."""

    def __init__(self, n: int, layers: int, hidden: int, slots: int):
        self.n, self.layers, self.hidden, self.slots = n, layers, hidden, slots
        self.h = np.zeros((layers, n, hidden), np.float32)
        self.c = np.zeros((layers, n, hidden), np.float32)
        self.summaries: Summaries = fresh_summaries(n, slots)
        self.partition = [-1] * n
        self.offset = [-1] * n
        self.last_top: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.last_propensity = [math.nan] * n

    @classmethod
    def decode(
        cls,
        raws: Sequence[bytes | None],
        layers: int,
        hidden: int,
        slots: int,
        model_version: str,
    ) -> tuple[StateBatch, list[str]]:
        """The states of stored records (None: no record), and per row what was found: ``ok``,
        ``absent``, ``other_version`` (a record of another model, never fed to this one) or
        ``undecodable: <why>`` (:class:`~demandstream.model.core.state.StateFormatError`'s message). Every
        row that is not ``ok`` is a user never seen.

        Records of the common length are read with one numpy view; any other is read by ``unpack``.
        """
        b = cls(len(raws), layers, hidden, slots)
        status = ["absent"] * len(raws)
        present = [i for i, r in enumerate(raws) if r is not None]
        if not present:
            return b, status
        lengths = {}
        for i in present:
            lengths.setdefault(len(raws[i]), []).append(i)
        version = bytes.fromhex(model_version)
        for length, rows in lengths.items():
            dt = _dtype_for_length(length, layers, hidden, slots)
            if dt is None:
                for i in rows:
                    status[i] = b._decode_one(i, raws[i], model_version)
                continue
            rec = np.frombuffer(b"".join(raws[i] for i in rows), dt)
            shape_ok = (
                (rec["magic"] == MAGIC)
                & (rec["format"] == FORMAT)
                & (rec["layers"] == layers)
                & (rec["hidden"] == hidden)
                & (rec["slots"] == slots)
                & (rec["n_top"] == dt["top_i"].shape[0])
            )
            ours = shape_ok & (rec["model_version"] == version)
            for j, i in enumerate(rows):
                if not shape_ok[j]:
                    status[i] = b._decode_one(i, raws[i], model_version)  # unpack says why
                elif not ours[j]:
                    status[i] = "other_version"
            keep = np.flatnonzero(ours)
            if len(keep):
                b._fill(np.asarray(rows)[keep], rec[keep])
                for i in np.asarray(rows)[keep].tolist():
                    status[i] = "ok"
        return b, status

    def _decode_one(self, i: int, raw: bytes, model_version: str) -> str:
        """Row ``i`` from ``raw`` through :func:`unpack` (a record of an unusual length or shape)."""
        try:
            s = unpack(raw)
        except StateFormatError as exc:
            return f"undecodable: {exc}"
        if s.model_version != model_version:
            return "other_version"
        if s.h.shape != (self.layers, self.hidden) or len(s.hist_cats) != self.slots:
            return "undecodable: a state of another network shape under the same model version"
        self.set_state(i, s)
        return "ok"

    def _fill(self, rows: np.ndarray, rec: np.ndarray) -> None:
        """Rows ``rows`` from records viewed with :func:`record_dtype`."""
        shape = (len(rows), self.layers, self.hidden)
        self.h[:, rows] = rec["h"].reshape(shape).transpose(1, 0, 2)
        self.c[:, rows] = rec["c"].reshape(shape).transpose(1, 0, 2)
        sm = self.summaries
        for j, name in enumerate(kernel.SLOT_ROWS):
            sm.hist[rows, j] = rec[name]
        for j, name in enumerate(kernel.INT_FIELDS):
            sm.ints[rows, j] = rec[name]
        for j, name in enumerate(kernel.FLOAT_FIELDS):
            sm.floats[rows, j] = rec[name]
        top_i, top_p = rec["top_i"].tolist(), rec["top_p"].tolist()
        for r, part, off, prop, ti, tp in zip(
            rows.tolist(),
            rec["partition"].tolist(),
            rec["offset"].tolist(),
            rec["last_propensity"].tolist(),
            top_i,
            top_p,
            strict=True,
        ):
            self.partition[r], self.offset[r], self.last_propensity[r] = part, off, prop
            self.last_top[r] = list(zip(ti, tp, strict=True))

    def encode(self, rows: Sequence[int], model_version: str) -> list[bytes]:
        """The records of ``rows`` (bytes equal to :func:`~demandstream.model.core.state.pack`'s)."""
        out: list[bytes | None] = [None] * len(rows)
        by_ntop: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            by_ntop.setdefault(len(self.last_top[r]), []).append(k)
        version = bytes.fromhex(model_version)
        sm = self.summaries
        for ntop, ks in by_ntop.items():
            rs = np.asarray([rows[k] for k in ks], np.int64)
            rec = np.zeros(len(rs), record_dtype(self.layers, self.hidden, self.slots, ntop))
            rec["magic"], rec["format"], rec["flags"], rec["model_version"] = MAGIC, FORMAT, 0, version
            rec["partition"] = [self.partition[r] for r in rs.tolist()]
            rec["offset"] = [self.offset[r] for r in rs.tolist()]
            for j, name in enumerate(kernel.INT_FIELDS):
                rec[name] = sm.ints[rs, j]
            for j, name in enumerate(kernel.FLOAT_FIELDS):
                rec[name] = sm.floats[rs, j]
            rec["hidden"], rec["layers"], rec["slots"], rec["n_top"] = (
                self.hidden,
                self.layers,
                self.slots,
                ntop,
            )
            rec["last_propensity"] = [self.last_propensity[r] for r in rs.tolist()]
            rec["h"] = self.h[:, rs].transpose(1, 0, 2).reshape(len(rs), -1)
            rec["c"] = self.c[:, rs].transpose(1, 0, 2).reshape(len(rs), -1)
            for j, name in enumerate(kernel.SLOT_ROWS):
                rec[name] = sm.hist[rs, j]
            if ntop:
                tops = [self.last_top[r] for r in rs.tolist()]
                rec["top_i"] = [[code for code, _ in t] for t in tops]
                rec["top_p"] = [[p for _, p in t] for t in tops]
            data, size = rec.tobytes(), rec.dtype.itemsize
            for m, k in enumerate(ks):
                out[k] = data[m * size : (m + 1) * size]
        return out  # type: ignore[return-value]

    def reset(self, row: int) -> None:
        """Row ``row`` becomes a user never seen (an erasure, a new user)."""
        self.h[:, row] = 0.0
        self.c[:, row] = 0.0
        fresh = fresh_summaries(1, self.slots)
        for mine, new in zip(self.summaries, fresh, strict=True):
            mine[row] = new[0]
        self.partition[row] = self.offset[row] = -1
        self.last_top[row] = []
        self.last_propensity[row] = math.nan

    def events_seen(self, row: int) -> int:
        return int(self.summaries.ints[row, _SEEN])

    def last_ts(self, row: int) -> float:
        return float(self.summaries.floats[row, _LAST_TS])

    # -- UserState views (the offline and test API) --------------------------------------------------

    @classmethod
    def from_states(cls, states: Sequence[UserState]) -> StateBatch:
        """The arrays of ``states`` (all of one network shape)."""
        s0 = states[0]
        layers, hidden = s0.h.shape
        b = cls(len(states), layers, hidden, len(s0.hist_cats))
        b.h[:] = np.stack([s.h for s in states], axis=1)
        b.c[:] = np.stack([s.c for s in states], axis=1)
        b.summaries = summary_arrays(states)
        b.partition = [s.partition for s in states]
        b.offset = [s.offset for s in states]
        b.last_top = [list(s.last_top) for s in states]
        b.last_propensity = [s.last_propensity for s in states]
        return b

    def into_states(self, states: Sequence[UserState]) -> None:
        """Write rows 0..len(states)-1 back into ``states``."""
        store_summaries(states, self.summaries)
        for j, s in enumerate(states):
            s.h = self.h[:, j].copy()
            s.c = self.c[:, j].copy()
            s.partition, s.offset = self.partition[j], self.offset[j]
            s.last_top = list(self.last_top[j])
            s.last_propensity = self.last_propensity[j]

    def set_state(self, row: int, s: UserState) -> None:
        """Row ``row`` from one state."""
        one = StateBatch.from_states([s])
        self.h[:, row] = one.h[:, 0]
        self.c[:, row] = one.c[:, 0]
        for mine, theirs in zip(self.summaries, one.summaries, strict=True):
            mine[row] = theirs[0]
        self.partition[row], self.offset[row] = s.partition, s.offset
        self.last_top[row] = list(s.last_top)
        self.last_propensity[row] = s.last_propensity


def _dtype_for_length(length: int, layers: int, hidden: int, slots: int) -> np.dtype | None:
    """The record view of a record of ``length`` bytes for this network shape, None if none fits."""
    rest = length - (HEADER_BYTES + 8 * layers * hidden + SLOT_BYTES * slots)
    if rest < 0 or rest % 8:
        return None
    return record_dtype(layers, hidden, slots, rest // 8)
