"""The user's own Markov transitions left out of their rows' features (model/training/leave_out.py)."""

import numpy as np
import torch


def test_markov_pairs_and_own_counts_of_a_user():

    from demandstream.model.core.events import Event
    from demandstream.model.data.eventlog import EventLog
    from demandstream.model.training.leave_out import markov_pairs, own_markov_counts

    evs = [
        Event(f"e{i}", "u", 100.0 + i, "view", "i", c) for i, c in enumerate(["a", "b", None, "c", "a", "b"])
    ]
    evs.append(Event("x1", "v", 100.0, "view", "i", "a"))
    evs.append(Event("x2", "v", 101.0, "view", "i", "b"))
    log = EventLog.from_events(evs).sorted_by_user_time()
    cats = np.array([1, 2, 0, 3, 1, 2, 1, 2])  # user u: a b - c a b; user v: a b
    pairs, rows, current = markov_pairs(log, cats, np.ones(8, bool))
    # row 1's successor has no category; row 2 carries b as its current category
    assert pairs.tolist() == [[1, 2], [2, 3], [3, 1], [1, 2], [1, 2]] and rows.tolist() == [0, 2, 3, 4, 6]
    assert current.tolist() == [1, 2, 2, 3, 1, 2, 1, 2]
    table_next = np.zeros((4, 2), np.int64)
    table_next[1] = [2, 0]
    by_user = own_markov_counts(log, pairs, rows, current, table_next, "user")
    by_row = own_markov_counts(log, pairs, rows, current, table_next, "row")
    (count, total), (row_count, row_total) = (
        by_user.current_counts(np.arange(8)),
        by_row.current_counts(np.arange(8)),
    )
    assert total[0] == 2 and count[0, 0] == 2  # u went a->b twice
    assert total[6] == 1 and count[6, 0] == 1  # v once
    assert row_total[0] == 1 and row_count[0, 0] == 1 and row_total[1] == 0
    assert own_markov_counts(log, pairs, rows, current, table_next, "none") is None


def test_own_slot_counts_equal_a_count_of_the_users_transitions():
    """Every history slot's left-out counts, looked up per batch from per-user tables ("user") or by
    binary search from the row on ("past"), equal a plain count over the user's (current, next)
    pairs, to each stored successor of the slot's category."""

    from demandstream.model.core.events import Event
    from demandstream.model.data.eventlog import EventLog
    from demandstream.model.training.leave_out import markov_pairs, own_markov_counts

    rng = np.random.default_rng(3)
    evs = [
        Event(f"e{u}.{i}", f"u{u}", 100.0 + i, "view", "i", f"c{rng.integers(1, 6)}")
        for u in range(4)
        for i in range(int(rng.integers(2, 30)))
    ]
    log = EventLog.from_events(evs).sorted_by_user_time()
    cats = np.array([int(log.categories[c][1:]) for c in log.category])  # "c3" -> vocabulary index 3
    pairs, rows, current = markov_pairs(log, cats, np.ones(len(log), bool))
    table_next = np.array([[0, 0, 0]] + [[(a % 5) + 1, ((a + 1) % 5) + 1, 0] for a in range(1, 6)])
    user = np.repeat(np.arange(log.n_users), np.diff(log.user_start))
    hv = rng.integers(0, 6, (len(log), 4))  # any slot contents: the lookup does not depend on them
    idx = np.arange(len(log))
    for mode in ("user", "past"):
        slot_total, slot_count = own_markov_counts(log, pairs, rows, current, table_next, mode)._slot_counts(
            hv, idx
        )
        for r in range(len(log)):
            mine = (user[rows] == user[r]) & ((rows >= r) if mode == "past" else True)
            for s, a in enumerate(hv[r]):
                out = mine & (pairs[:, 0] == a) & (a > 0)
                assert slot_total[r, s] == out.sum(), (mode, r, s)
                want = [(out & (pairs[:, 1] == b)).sum() if b > 0 else 0 for b in table_next[a]]
                assert slot_count[r, s].tolist() == want, (mode, r, s)


def test_own_counts_of_every_history_slot():
    """attach() gives each history slot its user's own transitions (user mode) or, in row mode, only the
    current category's slot the row's own transition; the current category's slot equals the row's."""

    from demandstream.model.core.events import Event
    from demandstream.model.data.eventlog import EventLog
    from demandstream.model.training.leave_out import markov_pairs, own_markov_counts

    evs = [Event(f"e{i}", "u", 100.0 + i, "view", "i", c) for i, c in enumerate(["a", "b", "a", "b"])]
    log = EventLog.from_events(evs).sorted_by_user_time()
    cats = np.array([1, 2, 1, 2])
    pairs, rows, current = markov_pairs(log, cats, np.ones(4, bool))
    table_next = np.array([[0, 0], [2, 0], [1, 0]])
    hv = torch.tensor([[1, 0], [2, 1], [1, 2], [2, 1]])  # slots at each row, current first
    for mode, expect_other in (("user", True), ("row", False)):
        own = own_markov_counts(log, pairs, rows, current, table_next, mode)
        f = {"hist_vocab": hv}
        own.attach(f, np.arange(4), torch.device("cpu"))
        assert torch.equal(f["markov_own_slot_total"][:, 0], f["markov_own_total"])
        assert torch.equal(f["markov_own_slot_count"][:, 0], f["markov_own_count"])
        # row 1: the other slot (a) holds u's a->b transitions (2) in user mode, nothing in row mode
        assert float(f["markov_own_slot_total"][1, 1]) == (2.0 if expect_other else 0.0)
