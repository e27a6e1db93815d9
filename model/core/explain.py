"""Why a category is in a user's top list: its logit split into named contributions.

The next-category head (:meth:`demandstream.model.core.network.DemandLSTM.heads`) scores a candidate as a
sum of terms: explicit features times context-dependent weights, plus the LSTM's own term. That makes
an exact explanation cheap: group the terms by what they mean to a person and report the largest.
The contributions of one candidate sum to its logit (up to float rounding); a softmax over all
candidates turns logits into the probabilities of the signal, so a contribution is in log-odds units
("this reason made the category e^x times more likely than without it").

Reasons (docs/ARCHITECTURE.md §Signals, the ``why`` field):

- ``last_category``: it is the category of the user's current event (and the streak in it);
- ``previous_category``: it was the category of the event before;
- ``in_cart``: items of it are in the cart;
- ``frequency``: how often the user touched it (``count`` events), overall and in this session;
- ``recency``: how long ago, in events and in seconds;
- ``last_action``: the type of the user's last event on it (view, add to cart, ...);
- ``transition``: users who were in the current category (``from``), or in the user's other recent
  categories, moved to it next (the Markov table and its mixture over the user's history);
- ``popularity``: how common it is in the shop;
- ``history``: the base weight of any category the user touched;
- ``lstm``: what the recurrent state adds beyond the explicit features.

>>> from demandstream.model.core.network import SLOT_FEATURES, WINDOW_SLOT_FEATURES
>>> from demandstream.model.core.network import WINDOW_SLOT_FEATURES
>>> [REASONS[i] for i in SLOT_REASON_INDEX[:4]], len(SLOT_REASON_INDEX) == len(SLOT_FEATURES + WINDOW_SLOT_FEATURES)
(['history', 'last_category', 'previous_category', 'in_cart'], True)
"""

from __future__ import annotations

import torch

from demandstream.model.core.network import SLOT_FEATURES, WINDOW_SLOT_FEATURES

REASONS = (
    "last_category",
    "previous_category",
    "in_cart",
    "frequency",
    "recency",
    "last_action",
    "transition",
    "popularity",
    "history",
    "lstm",
)
_R = {name: i for i, name in enumerate(REASONS)}


def _slot_reason(feature: str) -> str:
    if feature.startswith("last_") and feature != "last_streak":
        return "last_action"
    return {
        "in_history": "history",
        "in_vocabulary": "history",
        "is_last": "last_category",
        "last_streak": "last_category",
        "is_previous": "previous_category",
        "in_cart": "in_cart",
        "cart_items": "in_cart",
        "log_count": "frequency",
        "log_session_count": "frequency",
        "log_age_events": "recency",
        "log_age_seconds": "recency",
        "markov": "transition",
        "markov_history": "transition",
        "popularity": "popularity",
        # a slot beyond the history window: how long ago it was seen decides it, with its terms
        "beyond_window": "recency",
        "beyond_window_markov": "transition",
        "beyond_window_log_count": "frequency",
        "beyond_window_in_cart": "in_cart",
        "beyond_window_markov_history": "transition",
    }[feature]


#: The reason (index into REASONS) of each slot feature, in SLOT_FEATURES order, then those of
#: WINDOW_SLOT_FEATURES (a model with a history window stacks them last).
SLOT_REASON_INDEX = tuple(_R[_slot_reason(f)] for f in SLOT_FEATURES + WINDOW_SLOT_FEATURES)


def contributions(
    out: dict[str, torch.Tensor], f: dict[str, torch.Tensor], pop_logp: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contributions of each reason to the logits of chosen output columns.

    ``out`` comes from ``heads(..., explain=True)`` and ``f`` are the same features, both [n, ...];
    ``cols`` [n, k] are columns of :meth:`~demandstream.model.core.network.DemandLSTM.category_probs`'s
    output (vocabulary index, or C + slot for a slot outside the vocabulary). Returns
    ``(terms [n, k, len(REASONS)], count [n, k])``: ``count`` is the user's events in the candidate's
    category (0 for a category outside the user's history). A vocabulary column whose category is in
    the history is explained by its slot, as the head scores it.
    """
    hv, valid = f["hist_vocab"], f["hist_cats"] > 0
    n_vocab = out["x_mk"].shape[-1]
    n_reasons = len(REASONS)
    n_features = out["x_phi"].shape[-1]
    group = torch.zeros(n_features, n_reasons, device=cols.device)
    group[torch.arange(n_features), torch.tensor(SLOT_REASON_INDEX[:n_features])] = 1.0
    slot_terms = (out["x_phi"] * out["x_sw"].unsqueeze(-2)) @ group  # [n, K, R]
    slot_terms[..., _R["lstm"]] += out["x_repeat"]

    is_slot_col = cols >= n_vocab
    vocab_col = cols.clamp(max=n_vocab - 1)
    match = (hv.unsqueeze(-2) == vocab_col.unsqueeze(-1)) & (valid & (hv > 0)).unsqueeze(-2)  # [n, k, K]
    use_slot = is_slot_col | match.any(-1)
    slot_idx = torch.where(is_slot_col, cols - n_vocab, match.float().argmax(-1))
    from_slot = slot_terms.gather(1, slot_idx.unsqueeze(-1).expand(-1, -1, n_reasons))
    vw = out["x_vw"]
    from_vocab = torch.zeros_like(from_slot)
    from_vocab[..., _R["transition"]] = vw[..., 0:1] * out["x_mk"].gather(-1, vocab_col) + vw[..., 2:3] * out[
        "x_mix"
    ].gather(-1, vocab_col)
    from_vocab[..., _R["popularity"]] = vw[..., 1:2] * pop_logp[vocab_col]
    from_vocab[..., _R["lstm"]] = out["x_explore"].gather(-1, vocab_col)
    terms = torch.where(use_slot.unsqueeze(-1), from_slot, from_vocab)
    count = torch.where(use_slot, f["hist_counts"].gather(-1, slot_idx), 0)
    return terms, count


def top_reasons(terms: list[float], count: int, source: str | None, n: int) -> list[dict]:
    """The ``n`` largest contributions of one candidate, largest first, as the signal carries them.

    Reasons that do not apply to the candidate (a term of exactly 0) are left out.

    >>> top_reasons([8.0, 0, 0, 0.35, -0.001, 0, -1.2, 0, 2.0, 0.1], 3, "lipstick", 3)
    [{'reason': 'last_category', 'logit': 8.0}, {'reason': 'history', 'logit': 2.0}, {'reason': 'frequency', 'logit': 0.35, 'count': 3}]
    >>> top_reasons([0, 0, 0, 0, 0, 0, -2.5, -0.5, 0, 0], 1, "lipstick", 3)
    [{'reason': 'popularity', 'logit': -0.5}, {'reason': 'transition', 'logit': -2.5, 'from': 'lipstick'}]
    """
    order = sorted((i for i in range(len(REASONS)) if terms[i] != 0.0), key=lambda i: -terms[i])[:n]
    why = []
    for i in order:
        item: dict = {"reason": REASONS[i], "logit": round(terms[i], 3)}
        if i == _R["frequency"]:
            item["count"] = int(count)
        elif i == _R["transition"] and source is not None:
            item["from"] = source
        why.append(item)
    return why
