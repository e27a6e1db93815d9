"""DemandLSTM: a one-step-at-a-time LSTM over a user's events with two heads.

- Next-category head, repeat-aware (RepeatNet, Ren et al., AAAI 2019): a *repeat* distribution over the
  categories in the user's bounded history (scored from the hidden state, counts and recency) and an
  *explore* distribution over every category (softmax of the hidden state), mixed by a learned gate.
  Shoppers mostly return to what they just looked at (DESIGN §10), which a global softmax learns badly.
- Purchase head: P(purchase within the horizon) from the hidden state plus the funnel position (event
  type, cart size, purchases so far, time gap), which is what the ``funnel`` baseline lives on; its
  logit is Platt-scaled by two buffers fitted on validation points after training (identity before).

:meth:`DemandLSTM.forward` runs whole sequences (training, offline scoring); :meth:`DemandLSTM.step`
advances a batch of users by one event each (streaming). Both use the same ``nn.LSTM`` weights and give
the same numbers (tests/unit/model/test_network.py checks max |Δ| ≤ 1e-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.events import EVENT_TYPES
from model.features import N_GAP_BUCKETS, N_PRICE_BUCKETS

#: Events after which the purchase head's history-length input reaches 1/2 (it saturates toward 1):
#: about one shopping session, the scale at which a personal purchase rate starts to mean something.
HISTORY_HALF_WEIGHT = 16.0

_EPS = 1e-9  # keeps log() finite when a category has zero probability under both components


@dataclass
class ModelConfig:
    """Hyper-parameters of DemandLSTM; saved in every checkpoint.

    The defaults keep the per-user state under 1 KB (hidden 96 float32 h and c = 768 bytes) while
    leaving the repeat head, not the hidden state, to remember recent categories.
    """

    n_categories: int = 2
    hidden: int = 96
    layers: int = 1
    history_slots: int = 16
    item_buckets: int = 1 << 14
    query_buckets: int = 1 << 12
    query_tokens: int = 8
    emb_type: int = 8
    emb_item: int = 32
    emb_category: int = 32
    emb_price: int = 4
    emb_gap: int = 8
    emb_query: int = 16
    emb_repeat: int = 32
    purchase_hidden: int = 32
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


#: Names of the feature tensors a batch carries (see model/encoding.py), with their trailing dims.
FEATURES = ("etype", "item", "cat", "price", "gap", "query", "hist_cats", "hist_counts", "hist_ages",
            "cart", "purchases", "events_seen")


def _identity_calibration_if_missing(state_dict, prefix, *_args) -> None:
    """Checkpoints written before calibration existed load with the identity (a=1, b=0), i.e. unchanged.

    ``load_state_dict`` hands hooks its own copy of the dict, so the caller's dict (from which
    :mod:`model.checkpoint` recomputes model_version) is not touched.
    """
    state_dict.setdefault(prefix + "purchase_scale", torch.tensor(1.0))
    state_dict.setdefault(prefix + "purchase_shift", torch.tensor(0.0))


class DemandLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_types = len(EVENT_TYPES)
        self.emb_type = nn.Embedding(n_types, cfg.emb_type)
        self.emb_item = nn.Embedding(cfg.item_buckets, cfg.emb_item, padding_idx=0)
        self.emb_cat = nn.Embedding(cfg.n_categories, cfg.emb_category, padding_idx=0)
        self.emb_price = nn.Embedding(N_PRICE_BUCKETS, cfg.emb_price)
        self.emb_gap = nn.Embedding(N_GAP_BUCKETS, cfg.emb_gap)
        self.emb_query = nn.Embedding(cfg.query_buckets, cfg.emb_query, padding_idx=0)
        d_in = cfg.emb_type + cfg.emb_item + cfg.emb_category + cfg.emb_price + cfg.emb_gap + cfg.emb_query
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(d_in, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        # explore: every category from the hidden state
        self.explore = nn.Linear(cfg.hidden, cfg.n_categories)
        # repeat: a query from h matched against an output embedding of each history category,
        # plus count/recency features of the slot
        self.repeat_query = nn.Linear(cfg.hidden, cfg.emb_repeat)
        self.repeat_emb = nn.Embedding(cfg.n_categories, cfg.emb_repeat, padding_idx=0)
        self.repeat_feats = nn.Linear(4, 1)
        self.gate = nn.Linear(cfg.hidden + 2, 1)
        n_funnel = n_types + 3 + N_GAP_BUCKETS + 2
        self.purchase = nn.Sequential(
            nn.Linear(cfg.hidden + n_funnel, cfg.purchase_hidden), nn.ReLU(), nn.Linear(cfg.purchase_hidden, 1)
        )
        # Platt scaling of the purchase logit (a * logit + b), fitted after training on validation
        # points (model.train.calibrate). Buffers, not parameters: the optimizer never moves them, the
        # checkpoint (and so model_version) carries them, and the stream and offline scoring both apply
        # them because both go through heads(). The identity (1, 0) is what an uncalibrated model has.
        self.register_buffer("purchase_scale", torch.tensor(1.0))
        self.register_buffer("purchase_shift", torch.tensor(0.0))
        self._register_load_state_dict_pre_hook(_identity_calibration_if_missing)

    # -- inputs ---------------------------------------------------------------------------------

    def embed(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        q = f["query"]
        q_mask = (q > 0).unsqueeze(-1).float()
        q_emb = (self.emb_query(q) * q_mask).sum(-2) / q_mask.sum(-2).clamp(min=1.0)
        x = torch.cat(
            [self.emb_type(f["etype"]), self.emb_item(f["item"]), self.emb_cat(f["cat"]),
             self.emb_price(f["price"]), self.emb_gap(f["gap"]), q_emb],
            dim=-1,
        )
        return self.drop(x)

    # -- heads ----------------------------------------------------------------------------------

    def heads(self, h: torch.Tensor, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head outputs from LSTM outputs ``h`` [..., hidden] and the step's features."""
        hd = self.drop(h)
        explore = self.explore(hd)
        explore[..., 0] = float("-inf")  # index 0 = unknown category: never predicted
        cats = f["hist_cats"]
        valid = cats > 0
        ages = f["hist_ages"]
        slot_feats = torch.stack(
            [torch.log1p(f["hist_counts"]), torch.log1p(ages), (ages == 0).float(), (ages == 1).float()], dim=-1
        )
        scores = (self.repeat_emb(cats.clamp(min=0)) * self.repeat_query(hd).unsqueeze(-2)).sum(-1)
        scores = scores + self.repeat_feats(slot_feats).squeeze(-1)
        scores = scores.masked_fill(~valid, float("-inf"))
        any_valid = valid.any(-1)
        repeat = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows give NaN -> 0
        filled = valid.float().mean(-1, keepdim=True)
        gate_in = torch.cat([hd, filled, torch.log1p(f["events_seen"]).unsqueeze(-1)], dim=-1)
        gate = torch.sigmoid(self.gate(gate_in).squeeze(-1)) * any_valid.float()
        funnel = torch.cat(
            [
                nn.functional.one_hot(f["etype"], len(EVENT_TYPES)).float(),
                torch.log1p(f["cart"]).unsqueeze(-1),
                (f["cart"] > 0).float().unsqueeze(-1),
                torch.log1p(f["purchases"]).unsqueeze(-1),
                # The user's own purchase rate and how much history backs it, as the user_history
                # baseline uses: a hidden state learns such a ratio slowly, a direct input gives it at
                # once. Both are bounded, so later (longer) histories do not push the head outside the
                # range it was trained on.
                (f["purchases"] / f["events_seen"].clamp(min=1.0)).unsqueeze(-1),
                (f["events_seen"] / (f["events_seen"] + HISTORY_HALF_WEIGHT)).unsqueeze(-1),
                nn.functional.one_hot(f["gap"], N_GAP_BUCKETS).float(),
            ],
            dim=-1,
        )
        purchase_logit = self.purchase(torch.cat([hd, funnel], dim=-1)).squeeze(-1)
        purchase_logit = self.purchase_scale * purchase_logit + self.purchase_shift  # identity unless calibrated
        return {"explore": explore, "repeat": repeat, "gate": gate, "purchase_logit": purchase_logit}

    @staticmethod
    def category_probs(out: dict[str, torch.Tensor], hist_cats: torch.Tensor) -> torch.Tensor:
        """Full next-category distribution [..., C]: gate * repeat (scattered) + (1 - gate) * explore."""
        explore = torch.softmax(out["explore"], dim=-1)
        g = out["gate"].unsqueeze(-1)
        rep = torch.zeros_like(explore).scatter_add_(-1, hist_cats.clamp(min=0), out["repeat"])
        return g * rep + (1.0 - g) * explore

    @staticmethod
    def category_log_prob(out: dict[str, torch.Tensor], hist_cats: torch.Tensor, target: torch.Tensor):
        """log P(next category = target) without materializing the mixed distribution (training loss)."""
        explore_lp = torch.log_softmax(out["explore"], dim=-1)
        p_explore = explore_lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()
        p_repeat = (out["repeat"] * (hist_cats == target.unsqueeze(-1)).float()).sum(-1)
        g = out["gate"]
        return torch.log(g * p_repeat + (1.0 - g) * p_explore + _EPS)

    # -- running --------------------------------------------------------------------------------

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(self.cfg.layers, batch, self.cfg.hidden, device=device)
        return z, z.clone()

    def forward(self, f: dict[str, torch.Tensor], state=None):
        """Whole sequences: features [B, T, ...] -> (head outputs [B, T, ...], (h, c) [layers, B, hidden])."""
        x = self.embed(f)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        out, state = self.lstm(x, state)
        return self.heads(out, f), state

    def forward_packed(self, f: dict[str, torch.Tensor], lengths: torch.Tensor,
                       state: tuple[torch.Tensor, torch.Tensor]):
        """Sequences of different lengths [B, T] from given states: (head outputs at valid steps
        [n_valid, ...] in row-major (user, step) order, final (h, c) of each user at its own last step).

        The stream uses it when a micro-batch holds several events of one user: one call instead of
        one ``step`` per event, with the same numbers.
        """
        x = self.embed(f)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = self.lstm(packed, state)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        valid = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        valid = valid.to(out.device)
        return self.heads(out[valid], {k: v[valid] for k, v in f.items()}), state, valid

    def step(self, f: dict[str, torch.Tensor], state: tuple[torch.Tensor, torch.Tensor]):
        """One event per user: features [B, ...] -> (head outputs [B, ...], new (h, c))."""
        x = self.embed(f).unsqueeze(1)
        out, state = self.lstm(x, state)
        return self.heads(out.squeeze(1), f), state
