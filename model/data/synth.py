"""A synthetic, realistic clickstream: a catalog, shoppers with drifting intent, sessions and a funnel.

Real logs cannot be shipped with tests or demos, so :func:`generate` produces events in the schema of
docs/ARCHITECTURE.md §Events whose structure a model can learn and a baseline can exploit, the same way as in
real logs:

- the next category repeats the previous one about 55-65 % of the time (docs/ARCHITECTURE.md §Model),
  otherwise it comes from the user's latent intent, a related/complement category or a popular one;
- a purchase raises the weight of the purchased category's complements (smartphone -> phone_case)
  in the user's intent, and damps buying the same category again for a while;
- purchases follow the funnel view -> add_to_cart -> purchase, shaped by a personal propensity.

docs/SYNTH.md describes every parameter of :class:`SynthConfig` and why it has its default.
Output depends only on the arguments: same seed, same events, in any process.

>>> events = list(generate(n_users=20, n_events=200, seed=7))
>>> len(events), all(a.ts <= b.ts for a, b in zip(events, events[1:]))
(200, True)
>>> list(generate(5, 30, seed=7)) == list(generate(5, 30, seed=7))
True
"""

from __future__ import annotations

import bisect
import gzip
import logging
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from demandstream.model.core.events import EVENT_TYPES, TYPE_INDEX, Event
from demandstream.model.core.state import SESSION_GAP_S
from demandstream.model.errors import OptionError

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0

#: Draws are taken from numpy in blocks of this size and consumed one by one: a per-draw numpy call
#: costs ~1 µs, a list element ~0.05 µs, and the generator must reach 100k events/s.
_DRAW_BLOCK = 1 << 16

#: gzip level for ``write_jsonl``: 6 is zlib's default trade-off; 9 (gzip.open's default) is ~3x slower
#: for a ~5 % smaller file.
_GZIP_LEVEL = 6

#: A browsing step is one view plus, on average, this many other events (searches, carts, purchases);
#: used to turn a user's event budget into an expected number of sessions.
_EVENTS_PER_STEP = 1.2

#: Bounds of the price factor of the cart odds, so that one odd price cannot make an item a sure buy.
_PRICE_FACTOR_RANGE = (0.25, 4.0)

#: Cap of the per-item buy-after-cart probability, however high a user's propensity: nobody buys everything.
_MAX_BUY_PROB = 0.9

#: Early interests cluster in one department (a shopper furnishing a flat) this often; else any category.
_SAME_DEPARTMENT_INTEREST = 0.6

#: Log-normal spread of a new user's initial intent weights: a main interest and minor ones.
_INTENT_WEIGHT_SIGMA = 0.5

#: A new interest (intent switch) is related to an existing one this often; else a popular category.
_RELATED_NEW_INTEREST = 0.5

_VIEW, _SEARCH, _CART, _REMOVE, _FAVORITE, _PURCHASE = (TYPE_INDEX[t] for t in EVENT_TYPES)

# -- the hand-named catalog -----------------------------------------------------------------------------

#: department -> (query adjectives, "leaf median_price" list). Median prices (in any currency) set each
#: category's log-normal price scale; the leaf names, with "_" as a space, are the query nouns.
TAXONOMY: dict[str, tuple[str, str]] = {
    "electronics": (
        "wireless|bluetooth|portable|black|4k|fast|compact|gaming|smart|usb-c",
        "smartphone 450, phone_case 15, charger 20, screen_protector 9, headphones 90, earbuds 60, "
        "laptop 900, laptop_bag 40, mouse 25, keyboard 45, monitor 220, camera 650, memory_card 18, "
        "tripod 35, tv 600, soundbar 250",
    ),
    "apparel": (
        "red|black|summer|slim|leather|cotton|floral|oversized|vintage|white",
        "dress 60, heels 80, handbag 90, jeans 55, t_shirt 20, shirt 40, jacket 120, coat 160, "
        "sneakers 90, boots 130, socks 10, belt 30, scarf 25, hat 25, sunglasses 70, swimsuit 45",
    ),
    "home": (
        "modern|wooden|grey|scandinavian|velvet|large|minimalist|led|round|cozy",
        "sofa 800, cushion 25, coffee_table 180, rug 150, lamp 60, light_bulb 8, bed_frame 400, "
        "mattress 500, bedding 70, pillow 30, curtains 50, mirror 90, storage_box 20, vacuum_cleaner 250, "
        "vacuum_bags 12, plant_pot 18",
    ),
    "kitchen": (
        "stainless|non-stick|electric|ceramic|glass|espresso|bamboo|cast iron|large|compact",
        "coffee_machine 300, coffee_beans 15, coffee_mug 12, blender 80, frying_pan 40, cookware_set 150, "
        "knife_set 90, cutting_board 25, kettle 45, toaster 50, food_container 20, dish_rack 25, "
        "baking_tray 18, stand_mixer 350",
    ),
    "beauty": (
        "matte|waterproof|vegan|organic|hydrating|nude|long-lasting|spf 50|fragrance-free|travel size",
        "lipstick 20, lip_liner 12, mascara 18, eyeliner 14, foundation 35, makeup_brush 15, "
        "face_cream 40, serum 45, cleanser 18, sunscreen 22, shampoo 12, conditioner 12, hair_dryer 70, "
        "perfume 85, nail_polish 9, nail_polish_remover 6",
    ),
    "sports": (
        "lightweight|waterproof|adjustable|pro|trail|breathable|foldable|carbon|insulated|kids",
        "running_shoes 120, running_socks 14, yoga_mat 35, yoga_block 15, dumbbells 60, "
        "resistance_bands 20, bicycle 700, bike_helmet 70, bike_light 25, tent 200, sleeping_bag 90, "
        "backpack 80, water_bottle 18, fitness_tracker 120, football 30, tennis_racket 110",
    ),
    "toys": (
        "educational|wooden|kids|remote control|giant|1000 piece|magnetic|musical|classic|outdoor",
        "lego_set 60, doll 30, board_game 35, puzzle 20, action_figure 25, toy_car 20, plush_toy 18, "
        "rc_drone 120, batteries 10, kids_scooter 80, building_blocks 30, craft_kit 22",
    ),
    "books": (
        "bestseller|hardcover|paperback|illustrated|new|classic|signed|award winning|large print|used",
        "fiction 15, mystery 14, science_fiction 15, cookbook 28, childrens_book 12, biography 20, "
        "self_help 16, textbook 70, comic 12, bookmark 5, book_light 15, ebook_reader 130",
    ),
    "grocery": (
        "organic|gluten-free|sugar-free|family pack|vegan|decaf|dark|bulk|low fat|premium",
        "tea 8, pasta 3, olive_oil 12, snacks 5, chocolate 4, cereal 5, baby_formula 30, diapers 35, "
        "baby_wipes 8, protein_powder 40, vitamins 20, energy_drink 2, sparkling_water 6",
    ),
    "pets": (
        "grain-free|small breed|large|chew-proof|indoor|senior|puppy|kitten|natural|orthopedic",
        "dog_food 45, dog_treats 12, dog_leash 20, dog_bed 60, cat_food 35, cat_litter 18, litter_box 30, "
        "cat_toy 8, scratching_post 45, aquarium 120, fish_food 8, pet_carrier 50",
    ),
    "automotive": (
        "12v|heavy duty|universal|synthetic|all season|magnetic|wireless|1080p|waterproof|premium",
        "car_battery 130, jump_starter 90, motor_oil 35, oil_filter 12, wiper_blades 25, tires 120, "
        "tire_inflator 45, car_phone_mount 20, dash_cam 90, car_charger 15, seat_cover 50, car_wax 18",
    ),
    "garden": (
        "cordless|electric|expandable|heavy duty|folding|outdoor|gas|solar|organic|large",
        "lawn_mower 350, grass_seed 25, garden_hose 40, hose_nozzle 12, pruning_shears 25, "
        "gardening_gloves 12, bbq_grill 300, grill_cover 35, charcoal 20, patio_chair 90, parasol 80, "
        "plant_seeds 4",
    ),
}

#: Hand-named complements: after buying the left side, shoppers look for the right side. A target
#: without a dot is in the same department. Leaves left with fewer than ``min_complements`` get random ones.
COMPLEMENTS = """
electronics.smartphone: phone_case charger screen_protector earbuds automotive.car_phone_mount
electronics.laptop: laptop_bag mouse keyboard monitor
electronics.camera: memory_card tripod
electronics.tv: soundbar
apparel.dress: heels handbag
apparel.jeans: belt t_shirt
apparel.sneakers: socks
apparel.swimsuit: sunglasses hat
apparel.coat: scarf
home.sofa: cushion coffee_table rug
home.bed_frame: mattress bedding pillow
home.lamp: light_bulb
home.vacuum_cleaner: vacuum_bags
kitchen.coffee_machine: coffee_beans coffee_mug
kitchen.cookware_set: knife_set cutting_board
kitchen.stand_mixer: baking_tray
beauty.lipstick: lip_liner
beauty.foundation: makeup_brush
beauty.shampoo: conditioner
beauty.nail_polish: nail_polish_remover
beauty.cleanser: face_cream serum
sports.running_shoes: running_socks fitness_tracker
sports.yoga_mat: yoga_block
sports.bicycle: bike_helmet bike_light water_bottle
sports.tent: sleeping_bag backpack
toys.rc_drone: batteries
toys.lego_set: building_blocks
books.ebook_reader: book_light
books.fiction: bookmark
grocery.baby_formula: diapers baby_wipes
grocery.diapers: baby_wipes
grocery.protein_powder: vitamins
pets.dog_food: dog_treats
pets.cat_food: cat_litter
pets.litter_box: cat_litter
pets.aquarium: fish_food
automotive.car_battery: jump_starter
automotive.motor_oil: oil_filter
automotive.tires: tire_inflator
garden.lawn_mower: grass_seed
garden.garden_hose: hose_nozzle
garden.bbq_grill: grill_cover charcoal
"""

#: Noun and median price of generated leaves when a config asks for more than the hand-named ones.
_FILLER_NOUN, _FILLER_PRICE = "product", 40.0


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generator; docs/SYNTH.md says why each default is what it is.

    Probabilities are per event (or per session / per purchase where the name says so).
    """

    # catalog
    n_departments: int | None = None  # None: the 12 hand-named ones; more get generated names
    leaves_per_department: int | None = None  # None: all hand-named leaves (12-16 each, 167 in all)
    items_per_category: int = 300  # median; actual counts are log-normal around it
    items_count_sigma: float = 0.6
    item_zipf_exponent: float = 1.1  # popularity of the item of rank r within its category ~ r**-a
    category_zipf_exponent: float = 0.8  # global popularity of categories, same form
    price_sigma: float = 0.45  # log-normal spread of item prices around the category median
    min_complements: int = 2
    complement_same_department: float = 0.75  # generated complements stay in the department this often
    # users
    activity_sigma: float = 1.5  # log-normal spread of users' event budgets (heavy tail)
    propensity_sigma: float = 0.8  # log-normal spread of the personal purchase propensity (mean 1)
    initial_intent_max: int = 3  # a user starts interested in 1..this many categories
    max_intent: int = 6
    intent_drift_sigma: float = 0.35  # per-session log random walk of intent weights
    intent_switch_prob: float = 0.2  # per session: a new category joins the intent
    # sessions and time
    session_steps_median: float = 4.0  # browsing steps (views/searches) per session, log-normal
    session_steps_sigma: float = 0.9
    idle_gap_sigma: float = 1.2  # log-normal spread of gaps between sessions
    min_idle_gap_s: float = SESSION_GAP_S  # 30 min: the usual session cut, the one the state applies
    click_gap_median_s: float = 25.0
    click_gap_sigma: float = 1.0
    min_click_gap_s: float = 1.0
    max_click_gap_s: float = 1500.0  # 25 min: stays inside one session
    # browsing
    stay_prob: float = 0.5  # the next browsing step stays in the current category
    move_to_intent: float = 0.55  # when moving: to an intent category ...
    move_to_related: float = 0.3  # ... to a complement/sibling; else to a globally popular one
    search_start_prob: float = 0.2  # a session opens with a search
    search_on_move_prob: float = 0.12
    revisit_item_prob: float = 0.2  # view again an item already seen in this category this session
    # funnel
    cart_prob: float = 0.045  # add_to_cart right after a view, times propensity and price factor
    price_sensitivity: float = 0.5  # cart odds scale with (median / price) ** this
    buy_after_cart_prob: float = 0.3  # the added item will be bought (times sqrt(propensity))
    checkout_delay_steps: float = 2.0  # mean browsing steps between the decisive add_to_cart and checkout
    later_buy_prob: float = 0.1  # per session: an item left in the cart is bought after all
    cart_abandon_prob: float = 0.5  # per session end: the cart is forgotten
    remove_prob: float = 0.04  # per step with an item not to be bought in the cart
    favorite_prob: float = 0.015
    direct_buy_prob: float = 0.001  # "buy now" without a cart, times propensity
    # after a purchase
    complement_boost: float = 0.5  # intent weight added, shared by the complements (intent sums to 1)
    complement_browse_prob: float = 0.4  # right after checkout, go on to a complement in the session
    repurchase_cooldown_days: float = 14.0
    repurchase_factor: float = 0.1  # cart odds in a category bought within the cooldown
    purchased_intent_factor: float = 0.3  # the bought category's intent weight is multiplied by this
    # noise
    null_category_prob: float = 0.01
    null_price_prob: float = 0.02


# -- catalog ---------------------------------------------------------------------------------------------


@dataclass
class Catalog:
    """Categories, complements, items and search queries of one synthetic shop.

    Item indices of category ``c`` are ``category_items[c]`` (a range), most popular first; item ``k``
    (0-based) of a category of ``n`` is drawn with the probability mass of ``[k + 1, k + 2)`` under a
    density ``~ x ** -item_zipf_exponent`` on ``[1, n + 1)``: Zipf-like, and sampled with one power.
    ``query_category[q]`` is the category whose vocabulary made query ``q``.
    """

    categories: list[str]
    department: list[int]
    departments: list[str]
    complements: list[list[int]]
    siblings: list[list[int]]
    category_price: list[float]
    category_cum: list[float]  # cumulative global popularity of categories
    category_items: list[range]
    item_ids: list[str]
    item_category: list[int]
    item_price: list[float]
    queries: list[str]
    category_queries: list[list[int]]
    query_category: list[int]
    category_index: dict[str, int] = field(default_factory=dict)

    def complements_of(self, category: str) -> list[str]:
        """Names of the complement categories of ``category``.

        >>> build_catalog().complements_of("electronics.camera")
        ['electronics.memory_card', 'electronics.tripod']
        """
        return [self.categories[c] for c in self.complements[self.category_index[category]]]


def build_catalog(seed: int = 0, config: SynthConfig | None = None) -> Catalog:
    """The catalog that :func:`generate` uses for ``seed`` and ``config`` (independent of user counts).

    >>> cat = build_catalog()
    >>> len(cat.categories), cat.categories[0], cat.item_ids[0][0]
    (167, 'electronics.smartphone', 'i')
    """
    cfg = config or SynthConfig()
    rng = np.random.Generator(np.random.PCG64(seed))
    names, dept, dept_names, medians, adjectives = _category_tree(cfg)
    index = {n: i for i, n in enumerate(names)}
    n_cat = len(names)

    complements = _complements(cfg, rng, names, dept, index)
    by_dept: dict[int, list[int]] = {}
    for c, d in enumerate(dept):
        by_dept.setdefault(d, []).append(c)
    siblings = [[s for s in by_dept[dept[c]] if s != c] for c in range(n_cat)]

    # Which categories are popular is random, how unequal popularity is is fixed by the exponent.
    rank = rng.permutation(n_cat) + 1
    pop = rank.astype(np.float64) ** -cfg.category_zipf_exponent
    category_cum = (np.cumsum(pop) / pop.sum()).tolist()

    counts = np.maximum(
        2, np.round(cfg.items_per_category * np.exp(cfg.items_count_sigma * rng.standard_normal(n_cat)))
    ).astype(np.int64)
    n_items = int(counts.sum())
    digits = max(6, len(str(n_items * 3)))
    low = 10 ** (digits - 1)
    numbers = rng.choice(9 * low, size=n_items, replace=False) + low
    item_ids = [f"i{x}" for x in numbers.tolist()]
    item_category = np.repeat(np.arange(n_cat), counts)
    log_median = np.log(np.asarray(medians))[item_category]
    prices = np.round(np.exp(log_median + cfg.price_sigma * rng.standard_normal(n_items)), 2)
    prices = np.maximum(prices, 0.01)

    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    category_items = [range(starts[c], starts[c + 1]) for c in range(n_cat)]

    queries: list[str] = []
    category_queries, query_category = [], []
    for c, name in enumerate(names):
        noun = name.split(".", 1)[1].replace("_", " ")
        own = [noun] + [f"{a} {noun}" for a in adjectives[dept[c]]]
        category_queries.append(list(range(len(queries), len(queries) + len(own))))
        queries.extend(own)
        query_category.extend([c] * len(own))

    return Catalog(
        categories=names,
        department=dept,
        departments=dept_names,
        complements=complements,
        siblings=siblings,
        category_price=medians,
        category_cum=category_cum,
        category_items=category_items,
        item_ids=item_ids,
        item_category=item_category.tolist(),
        item_price=prices.tolist(),
        queries=queries,
        category_queries=category_queries,
        query_category=query_category,
        category_index=index,
    )


def _category_tree(cfg: SynthConfig) -> tuple[list[str], list[int], list[str], list[float], list[list[str]]]:
    """Leaf names, their department index, department names, median prices and query adjectives."""
    hand = list(TAXONOMY.items())
    n_dept = len(hand) if cfg.n_departments is None else cfg.n_departments
    names, dept, medians, dept_names, adjectives = [], [], [], [], []
    for d in range(n_dept):
        if d < len(hand):
            dname, (adj, leaves) = hand[d]
            pairs = [leaf.split() for leaf in leaves.split(", ")]
        else:
            dname, adj, pairs = f"department{d + 1}", "new|popular|cheap", []
        n_leaves = len(pairs) if cfg.leaves_per_department is None else cfg.leaves_per_department
        for k in range(len(pairs), n_leaves):
            pairs.append([f"{_FILLER_NOUN}_{k + 1}", str(_FILLER_PRICE)])
        dept_names.append(dname)
        adjectives.append(adj.split("|"))
        for leaf, price in pairs[:n_leaves]:
            names.append(f"{dname}.{leaf}")
            dept.append(d)
            medians.append(float(price))
    return names, dept, dept_names, medians, adjectives


def _complements(
    cfg: SynthConfig, rng: np.random.Generator, names: list[str], dept: list[int], index: dict[str, int]
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in names]
    for line in COMPLEMENTS.strip().splitlines():
        src, targets = line.split(":")
        if src not in index:
            continue
        d = src.split(".")[0]
        for t in targets.split():
            full = t if "." in t else f"{d}.{t}"
            if full in index:
                out[index[src]].append(index[full])
    n = len(names)
    by_dept: dict[int, list[int]] = {}
    for c, d in enumerate(dept):
        by_dept.setdefault(d, []).append(c)
    for c in range(n):
        tries = 0
        # Bounded: a one-leaf catalog has no possible complement at all.
        while len(out[c]) < cfg.min_complements and tries < 20 * cfg.min_complements:  # 20: ample retries
            tries += 1
            pool = by_dept[dept[c]] if rng.random() < cfg.complement_same_department else range(n)
            t = int(pool[int(rng.integers(len(pool)))])
            if t != c and t not in out[c]:
                out[c].append(t)
    return out


# -- generation ------------------------------------------------------------------------------------------


class _BudgetSpent(Exception):
    """Raised inside a user's simulation when its event budget is used up."""


def _draws(fn: Callable[[int], np.ndarray]) -> Callable[[], float]:
    """A function returning the next draw of ``fn(n)`` (e.g. ``rng.random``), drawn in blocks."""

    def stream() -> Iterator[float]:
        while True:
            yield from fn(_DRAW_BLOCK).tolist()

    return stream().__next__


def generate(
    n_users: int,
    n_events: int,
    seed: int = 0,
    *,
    start_ts: float = 1_730_000_000.0,
    days: float = 30.0,
    config: SynthConfig | None = None,
) -> Iterator[Event]:
    """Yield exactly ``n_events`` synthetic events of up to ``n_users`` users, in time order.

    Parameters
    ----------
    n_users
        Users to draw; every one gets at least one event when ``n_events >= n_users``.
    n_events
        Exact number of events yielded.
    seed
        Everything (catalog, users, events) depends only on the arguments and this seed.
    start_ts, days
        Events fall in ``[start_ts, start_ts + days * 86400]``.
    config
        Behaviour parameters, :class:`SynthConfig` defaults when None.

    Yields
    ------
    Event
        In ``ts`` order; equal timestamps keep generation order (user, then the user's own order).
        ``event_id`` is ``e<rank>``, ``session_id`` is ``s<n>``, ``user_id`` is ``u<n>``.

    Examples
    --------
    >>> e = next(generate(10, 50, seed=1))
    >>> e.event_id, e.type in ("view", "search")
    ('e0', True)
    """
    if n_events < 0 or n_users < 0:
        raise OptionError("n_users and n_events must be >= 0")
    if n_events > 0 and n_users == 0:
        raise OptionError("n_events > 0 needs n_users > 0")
    if days <= 0:
        raise OptionError("days must be > 0")
    return _generate(n_users, n_events, seed, start_ts, days * SECONDS_PER_DAY, config or SynthConfig())


def _generate(
    n_users: int, n_events: int, seed: int, start_ts: float, window_s: float, cfg: SynthConfig
) -> Iterator[Event]:
    """The body of :func:`generate`: all users are simulated before the first event is yielded."""
    if n_events == 0:
        return
    catalog = build_catalog(seed, cfg)
    # A jumped stream: user behaviour is independent of the catalog's draws yet fixed by the same seed.
    rng = np.random.Generator(np.random.PCG64(seed).jumped())
    sim = _Simulator(catalog, cfg, rng, window_s)
    budgets = _budgets(rng, n_users, n_events, cfg.activity_sigma)
    for u, b in enumerate(budgets.tolist()):
        if b:
            sim.user(u, b)
    yield from sim.events(n_users, start_ts)


def _budgets(rng: np.random.Generator, n_users: int, n_events: int, sigma: float) -> np.ndarray:
    """Events per user: one each (when there are enough), the rest split by heavy-tailed activity."""
    weights = np.exp(sigma * rng.standard_normal(n_users))
    base = 1 if n_events >= n_users else 0
    rest = n_events - base * n_users
    return base + rng.multinomial(rest, weights / weights.sum())


class _Simulator:
    """Simulates users one at a time into two compact columns, then adds time, noise and order in bulk.

    Only what depends on a user's history is simulated event by event: the event type and its item (or
    query). What does not (click gaps, null noise, the placement of a user's timeline in the window) is
    drawn afterwards with numpy, which is what lets plain Python reach 100k events/s.
    """

    def __init__(self, catalog: Catalog, cfg: SynthConfig, rng: np.random.Generator, window_s: float):
        self.cat = catalog
        self.cfg = cfg
        self.rng = rng
        self.window = window_s
        self.U = _draws(rng.random)
        self.Z = _draws(rng.standard_normal)
        # Cheaper than its category's median makes an item more likely to go to the cart.
        med = np.asarray(catalog.category_price)[np.asarray(catalog.item_category)]
        factor = (med / np.asarray(catalog.item_price)) ** cfg.price_sensitivity
        self.price_factor = np.clip(factor, *_PRICE_FACTOR_RANGE).tolist()
        self.related = [
            catalog.complements[c] * 2 + catalog.siblings[c] for c in range(len(catalog.categories))
        ]
        self.mean_steps = cfg.session_steps_median * math.exp(cfg.session_steps_sigma**2 / 2)
        # Item sampling by inverse CDF of the density x ** -a on [1, n + 1) (see Catalog).
        a = cfg.item_zipf_exponent
        sizes = [len(r) for r in catalog.category_items]
        self.item_first = [r.start for r in catalog.category_items]
        self.item_n = sizes
        self.zipf_log = a == 1.0
        self.item_c = [math.log(n + 1) if self.zipf_log else (n + 1) ** (1 - a) - 1 for n in sizes]
        self.item_inv = 0.0 if self.zipf_log else 1 / (1 - a)
        # per event: type, and the item index (or the query index for a search)
        self.e_type = array("b")
        self.e_obj = array("i")
        # per session: user, the user's idle time before it, index of its first event
        self.s_user = array("i")
        self.s_gap = array("d")
        self.s_first = array("q")

    def user(self, u: int, budget: int) -> None:
        """Simulate user ``u`` until ``budget`` events are written."""
        cfg, cat, U, Z = self.cfg, self.cat, self.U, self.Z
        item_cat, price_factor = cat.item_category, self.price_factor
        item_first, item_n, item_c, item_inv, zipf_log = (
            self.item_first,
            self.item_n,
            self.item_c,
            self.item_inv,
            self.zipf_log,
        )
        add_type, add_obj = self.e_type.append, self.e_obj.append
        stay, remove, search_on_move = cfg.stay_prob, cfg.remove_prob, cfg.search_on_move_prob
        revisit, favorite = cfg.revisit_item_prob, cfg.favorite_prob

        prop = math.exp(cfg.propensity_sigma * Z() - cfg.propensity_sigma**2 / 2)
        p_cart = cfg.cart_prob * prop
        p_buy = min(_MAX_BUY_PROB, cfg.buy_after_cart_prob * math.sqrt(prop))
        p_direct = cfg.direct_buy_prob * prop
        # Idle gaps scaled so that the expected timeline just fills the window (its mean, not median).
        expected_sessions = max(1.0, budget / (self.mean_steps * _EVENTS_PER_STEP))
        idle_mean_factor = math.exp(cfg.idle_gap_sigma**2 / 2)
        idle_med = max(cfg.min_idle_gap_s, self.window / ((expected_sessions + 1.0) * idle_mean_factor))
        cooldown_s = cfg.repurchase_cooldown_days * SECONDS_PER_DAY

        ic, iw = self._initial_intent()
        cooldown: dict[int, float] = {}  # category -> user clock until which buying it again is damped
        cart: list[list] = []  # [item, will_buy]
        left = budget
        # The user's clock for cooldowns: idle time only. Sessions last minutes, cooldowns days, and
        # the click gaps are drawn after the simulation.
        clock = 0.0

        def emit(etype: int, obj: int) -> None:
            nonlocal left
            add_type(etype)
            add_obj(obj)
            left -= 1
            if not left:
                raise _BudgetSpent

        def search(c: int) -> None:
            qs = cat.category_queries[c]
            emit(_SEARCH, qs[int(U() * len(qs))])

        def pick_item(c: int, seen: dict[int, list[int]]) -> int:
            s = seen.get(c)
            if s is not None and U() < revisit:
                return s[int(U() * len(s))]
            x = math.exp(U() * item_c[c]) if zipf_log else (1.0 + U() * item_c[c]) ** item_inv
            k = int(x) - 1
            it = item_first[c] + (k if k < item_n[c] else item_n[c] - 1)
            if s is None:
                seen[c] = [it]
            else:
                s.append(it)
            return it

        def sample_intent() -> int:
            r = U() * sum(iw)
            for c, w in zip(ic, iw, strict=True):
                r -= w
                if r < 0:
                    return c
            return ic[-1]

        def checkout() -> int:
            """Buy every item flagged in the cart; returns the category to browse next (or -1)."""
            bought = [x for x in cart if x[1]]
            cart[:] = [x for x in cart if not x[1]]
            nxt = -1
            for it, _ in bought:
                emit(_PURCHASE, it)
                nxt = self._after_purchase(item_cat[it], ic, iw, cooldown, clock + cooldown_s)
            return nxt

        try:
            while True:
                if self.s_user and self.s_user[-1] == u:  # not the user's first session
                    clock += max(cfg.min_idle_gap_s, idle_med * math.exp(cfg.idle_gap_sigma * Z()))
                    self._drift(ic, iw)
                    for x in cart:
                        if U() < cfg.later_buy_prob:
                            x[1] = True
                self.s_user.append(u)
                self.s_gap.append(clock)
                self.s_first.append(len(self.e_type))
                seen: dict[int, list[int]] = {}
                steps = 1 + int(cfg.session_steps_median * math.exp(cfg.session_steps_sigma * Z()))
                checkout_in = 1 if any(x[1] for x in cart) else -1
                c = sample_intent()
                if U() < cfg.search_start_prob:
                    search(c)
                while steps > 0:
                    steps -= 1
                    if checkout_in == 0:
                        checkout_in = -1
                        nxt = checkout()
                        if nxt >= 0:
                            c = nxt
                    elif checkout_in > 0:
                        checkout_in -= 1
                    if cart and U() < remove:
                        keep = [x for x in cart if not x[1]]
                        if keep:
                            x = keep[int(U() * len(keep))]
                            cart.remove(x)
                            emit(_REMOVE, x[0])
                    if U() >= stay:
                        c = self._move(c, sample_intent)
                        if U() < search_on_move:
                            search(c)
                    it = pick_item(c, seen)
                    emit(_VIEW, it)
                    r = U()
                    pc = p_cart * price_factor[it]
                    if cooldown and cooldown.get(c, -1.0) > clock:
                        pc *= cfg.repurchase_factor
                    if r < pc:
                        emit(_CART, it)
                        buy = U() < p_buy
                        cart.append([it, buy])
                        if buy and checkout_in < 0:
                            # A geometric number of further browsing steps before paying.
                            checkout_in = int(-math.log(1.0 - U()) * cfg.checkout_delay_steps)
                            steps = max(steps, checkout_in + 1)
                    elif r < pc + favorite:
                        emit(_FAVORITE, it)
                    elif r < pc + favorite + p_direct:
                        emit(_PURCHASE, it)
                        nxt = self._after_purchase(c, ic, iw, cooldown, clock + cooldown_s)
                        if nxt >= 0:
                            c = nxt
                if checkout_in >= 0:
                    checkout()
                if U() < cfg.cart_abandon_prob:
                    cart.clear()
        except _BudgetSpent:
            pass

    def _initial_intent(self) -> tuple[list[int], list[float]]:
        cfg, cat, U, Z = self.cfg, self.cat, self.U, self.Z
        first = min(len(cat.categories) - 1, bisect.bisect(cat.category_cum, U()))
        ic = [first]
        k = 1 + int(U() * cfg.initial_intent_max)
        for _ in range(k - 1):
            sib = cat.siblings[first]
            if sib and U() < _SAME_DEPARTMENT_INTEREST:
                c = sib[int(U() * len(sib))]
            else:
                c = min(len(cat.categories) - 1, bisect.bisect(cat.category_cum, U()))
            if c not in ic:
                ic.append(c)
        iw = [math.exp(_INTENT_WEIGHT_SIGMA * Z()) for _ in ic]
        s = sum(iw)
        return ic, [w / s for w in iw]

    def _drift(self, ic: list[int], iw: list[float]) -> None:
        """Between sessions: weights random-walk, sometimes a new interest appears, the smallest goes."""
        cfg, cat, U, Z = self.cfg, self.cat, self.U, self.Z
        for i in range(len(iw)):
            iw[i] *= math.exp(cfg.intent_drift_sigma * Z())
        if U() < cfg.intent_switch_prob:
            base = ic[int(U() * len(ic))]
            rel = self.related[base]
            if rel and U() < _RELATED_NEW_INTEREST:
                c = rel[int(U() * len(rel))]
            else:
                c = min(len(cat.categories) - 1, bisect.bisect(cat.category_cum, U()))
            if c not in ic:
                ic.append(c)
                iw.append(sum(iw) / len(iw))
        _trim(ic, iw, cfg.max_intent)

    def _after_purchase(
        self, c: int, ic: list[int], iw: list[float], cooldown: dict[int, float], until: float
    ) -> int:
        """Damp the bought category, boost its complements; maybe browse one of them next."""
        cfg = self.cfg
        cooldown[c] = until
        total = sum(iw)
        if c in ic:
            iw[ic.index(c)] *= cfg.purchased_intent_factor
        comps = self.cat.complements[c]
        if not comps:
            return -1
        share = cfg.complement_boost * total / len(comps)
        for d in comps:
            if d in ic:
                iw[ic.index(d)] += share
            else:
                ic.append(d)
                iw.append(share)
        _trim(ic, iw, cfg.max_intent + len(comps))
        if self.U() < cfg.complement_browse_prob:
            return comps[int(self.U() * len(comps))]
        return -1

    def _move(self, c: int, sample_intent: Callable[[], int]) -> int:
        cfg, U = self.cfg, self.U
        r = U()
        if r < cfg.move_to_intent:
            return sample_intent()
        if r < cfg.move_to_intent + cfg.move_to_related:
            rel = self.related[c]
            if rel:
                return rel[int(U() * len(rel))]
        return min(len(self.cat.categories) - 1, bisect.bisect(self.cat.category_cum, U()))

    def _timestamps(self, start_ts: float) -> tuple[np.ndarray, np.ndarray]:
        """Unix timestamps of all events and their session index.

        Click gaps are cumulated inside each session; each user's timeline (idle gaps between sessions,
        session durations) is squeezed into the window if it overflows (idle gaps first, then
        everything) and shifted to a uniformly random place in it.
        """
        cfg, rng = self.cfg, self.rng
        n = len(self.e_type)
        s_first = np.frombuffer(self.s_first, dtype=np.int64)
        s_user = np.frombuffer(self.s_user, dtype=np.int32)
        s_gap = np.frombuffer(self.s_gap, dtype=np.float64)
        counts = np.diff(np.append(s_first, n))
        sess = np.repeat(np.arange(len(s_first)), counts)

        gaps = np.clip(
            cfg.click_gap_median_s * np.exp(cfg.click_gap_sigma * rng.standard_normal(n)),
            cfg.min_click_gap_s,
            cfg.max_click_gap_s,
        )
        gaps[s_first[counts > 0]] = 0.0
        cum = np.cumsum(gaps)
        t = cum - cum[s_first[sess]]  # time since the session's first event
        dur = np.where(counts > 0, t[np.maximum(s_first + counts - 1, 0)], 0.0)

        # Sessions of one user are contiguous: group them, and cumulate durations within a user.
        u_first = np.flatnonzero(np.r_[True, s_user[1:] != s_user[:-1]])
        group = np.repeat(np.arange(len(u_first)), np.diff(np.append(u_first, len(s_user))))
        before = np.cumsum(dur) - dur
        dur_before = before - before[u_first][group]
        u_last = np.append(u_first[1:], len(s_user)) - 1
        gap_total = s_gap[u_last]
        dur_total = dur_before[u_last] + dur[u_last]

        window = self.window
        g_scale = np.ones(len(u_first))
        d_scale = np.ones(len(u_first))
        over = gap_total + dur_total > window
        fits = over & (dur_total < window)
        g_scale[fits] = (window - dur_total[fits]) / gap_total[fits]
        crush = over & ~fits
        g_scale[crush] = 0.0
        d_scale[crush] = window / dur_total[crush]
        span = gap_total * g_scale + dur_total * d_scale
        offset = rng.random(len(u_first)) * np.maximum(0.0, window - span)

        g = group[sess]
        ts = start_ts + offset[g] + g_scale[g] * s_gap[sess] + d_scale[g] * (dur_before[sess] + t)
        # Millisecond timestamps, as in real logs; the 1 s minimum click gap keeps each user's order.
        return np.minimum(np.round(ts, 3), start_ts + window), sess

    def events(self, n_users: int, start_ts: float) -> Iterator[Event]:
        """All simulated events as :class:`Event` in time order (equal times: generation order)."""
        cfg, cat = self.cfg, self.cat
        ts, sess = self._timestamps(start_ts)
        etype = np.frombuffer(self.e_type, dtype=np.int8)
        obj = np.frombuffer(self.e_obj, dtype=np.int32)
        is_search = etype == _SEARCH
        item = np.where(is_search, -1, obj)
        query = np.where(is_search, obj, -1)
        safe_item = np.maximum(item, 0)
        category = np.asarray(cat.item_category, dtype=np.int32)[safe_item]
        category[is_search] = np.asarray(cat.query_category, dtype=np.int32)[obj[is_search]]
        price = np.asarray(cat.item_price)[safe_item]
        price[is_search] = np.nan
        # Noise, as in real feeds: a few events lose their category, a few item events their price.
        r = self.rng.random(len(etype))
        category[r < cfg.null_category_prob] = -1
        price[(r >= cfg.null_category_prob) & (r < cfg.null_category_prob + cfg.null_price_prob)] = np.nan
        user = np.frombuffer(self.s_user, dtype=np.int32)[sess]

        order = np.argsort(ts, kind="stable")
        logger.debug("synth: %d events, %d sessions", len(order), len(self.s_user))
        # Index -1 means "none": the lookup lists end with None so that list[-1] is None.
        users = [f"u{u}" for u in range(n_users)]
        items = cat.item_ids + [None]
        cats = cat.categories + [None]
        queries = cat.queries + [None]
        types = list(EVENT_TYPES)
        sessions = [f"s{s}" for s in range(len(self.s_user))]
        # Chunks bound the Python objects alive at once (a 10M-event run would otherwise hold ~10^8).
        for lo in range(0, len(order), _DRAW_BLOCK):
            rows = order[lo : lo + _DRAW_BLOCK]
            columns = zip(
                user[rows].tolist(),
                ts[rows].tolist(),
                etype[rows].tolist(),
                item[rows].tolist(),
                category[rows].tolist(),
                query[rows].tolist(),
                price[rows].tolist(),
                sess[rows].tolist(),
                strict=True,
            )
            for rank, (u, t, et, it, c, q, p, s) in enumerate(columns, lo):
                yield Event(
                    f"e{rank}",
                    users[u],
                    t,
                    types[et],
                    items[it],
                    cats[c],
                    None if p != p else p,  # NaN is the only value unequal to itself
                    queries[q],
                    sessions[s],
                )


def _trim(ic: list[int], iw: list[float], keep: int) -> None:
    """Drop the weakest interests beyond ``keep`` and renormalize the weights to sum 1."""
    while len(ic) > keep:
        i = min(range(len(iw)), key=iw.__getitem__)  # first minimum: deterministic on ties
        del ic[i], iw[i]
    s = sum(iw)
    for i in range(len(iw)):
        iw[i] /= s


def write_jsonl(events: Iterable[Event], path: str | Path) -> int:
    """Write events as JSON lines (docs/ARCHITECTURE.md §Events schema, nulls included); gzip when ``path``
    ends in .gz.

    Returns the number of events written.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl.gz")
    >>> write_jsonl(generate(3, 10, seed=1), p)
    10
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as checkpoints and reports do
    opener = (
        (lambda: gzip.open(path, "wb", compresslevel=_GZIP_LEVEL))
        if path.suffix == ".gz"
        else (lambda: open(path, "wb"))
    )
    n = 0
    buf: list[bytes] = []
    with opener() as f:
        for e in events:
            buf.append(orjson.dumps(e.to_dict(), option=orjson.OPT_APPEND_NEWLINE))
            n += 1
            if len(buf) >= _DRAW_BLOCK:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return n
