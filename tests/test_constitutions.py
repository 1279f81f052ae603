"""Constitution sampling: the paper's modes, reproducibility, and the evaluation sets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sami_operator.models import Principle
from sami_worker.constitutions import (
    Constitution,
    derive_rng,
    evaluation_constitutions,
    sample_constitutions,
    sample_diverse_mode,
    sample_pair_mode,
)

HELPFUL = Principle(name="helpful", definition="Be helpful.", antithesis="Be unhelpful.")
HARMLESS = Principle(name="harmless", definition="Be harmless.", antithesis="Be harmful.")
PAIR = [HELPFUL, HARMLESS]
MANY = [
    Principle(name=f"p{k}", definition=f"Do {k}.", antithesis=f"Do not do {k}.") for k in range(6)
]
BY_NAME = {p.name: p for p in PAIR + MANY}


def test_render_numbers_definitions_and_antitheses_in_order():
    constitution = Constitution((("harmless", False), ("helpful", True)))
    assert constitution.render(BY_NAME) == "1. Be harmful.\n2. Be helpful."


def test_key_ignores_order():
    a = Constitution((("helpful", True), ("harmless", False)))
    b = Constitution((("harmless", False), ("helpful", True)))
    assert a != b and a.key == b.key
    assert a.key != Constitution((("helpful", True), ("harmless", True))).key


def test_constitution_rejects_empty_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="at least one"):
        Constitution(())
    with pytest.raises(ValueError, match="once"):
        Constitution((("helpful", True), ("helpful", False)))
    with pytest.raises(ValueError, match="'kind'"):
        Constitution((("kind", True),)).render(BY_NAME)


def test_pair_mode_keeps_all_first_and_negates_uniformly():
    all_kept = frozenset({("helpful", True), ("harmless", True)})
    seen = Counter()
    for seed in range(3000):
        first, second = sample_pair_mode(PAIR, random.Random(seed))
        assert first.key == all_kept
        assert second.key != all_kept
        seen[second.key] += 1
    # Three negating variants (first, second, both), each about a third of the time.
    assert len(seen) == 3
    assert all(850 < count < 1150 for count in seen.values())


def test_pair_mode_shuffles_order_per_use():
    orders = {
        tuple(name for name, _ in sample_pair_mode(PAIR, random.Random(seed))[0].items)
        for seed in range(50)
    }
    assert orders == {("helpful", "harmless"), ("harmless", "helpful")}


def test_pair_mode_more_constitutions_are_distinct():
    constitutions = sample_pair_mode(PAIR, random.Random(0), c=4)
    assert len({c.key for c in constitutions}) == 4  # all 2**2 variants
    with pytest.raises(ValueError, match="c=5 needs 4 distinct negating variants"):
        sample_pair_mode(PAIR, random.Random(0), c=5)
    with pytest.raises(ValueError, match="at least 2"):
        sample_pair_mode(PAIR, random.Random(0), c=1)


def test_diverse_mode_draws_principles_and_complements():
    for seed in range(200):
        a, b = sample_diverse_mode(MANY, random.Random(seed), per_constitution=2)
        assert len(a.items) == 2
        assert {name for name, _ in a.items} == {name for name, _ in b.items}
        assert b.key == {(name, not kept) for name, kept in a.items}


def test_diverse_mode_coin_is_fair_and_draws_every_principle():
    kept = Counter()
    drawn = Counter()
    for seed in range(2000):
        a, _ = sample_diverse_mode(MANY, random.Random(seed), per_constitution=2)
        kept.update(k for _, k in a.items)
        drawn.update(name for name, _ in a.items)
    assert 1800 < kept[True] < 2200  # 4000 coin flips
    assert set(drawn) == {p.name for p in MANY}


def test_diverse_mode_more_constitutions_use_other_patterns():
    constitutions = sample_diverse_mode(MANY, random.Random(1), per_constitution=2, c=4)
    a, b = constitutions[:2]
    assert b.key == {(name, not kept) for name, kept in a.items}
    assert len({c.key for c in constitutions}) == 4
    assert len({frozenset(name for name, _ in c.items) for c in constitutions}) == 1
    with pytest.raises(ValueError, match="c=5 needs 5 distinct flip patterns"):
        sample_diverse_mode(MANY, random.Random(1), per_constitution=2, c=5)
    with pytest.raises(ValueError, match="per_constitution"):
        sample_diverse_mode(MANY, random.Random(1), per_constitution=7)


def test_dispatcher_and_derived_rng_are_reproducible():
    def draw(seed, iteration, query):
        rng = derive_rng(seed, iteration, query)
        return sample_constitutions(MANY, "diverse", 2, rng, per_constitution=3)

    assert draw(7, 1, 42) == draw(7, 1, 42)
    assert len({tuple(draw(7, 1, q)[0].items) for q in range(20)}) > 10
    assert draw(7, 1, 42) != draw(7, 2, 42)
    # SHA-256 of the inputs, not the per-process salted hash(): the value is pinned.
    assert derive_rng(1, 2, 3).random() == 0.843353174748967
    assert derive_rng(0, 0, 0, "constitutions").random() != derive_rng(0, 0, 0, "eval").random()
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_constitutions(PAIR, "both", 2, random.Random(0))


def test_evaluation_constitutions_for_two_principles():
    constitutions = evaluation_constitutions(PAIR, k=4)
    assert [c.items for c in constitutions] == [
        (("helpful", True), ("harmless", True)),
        (("helpful", False), ("harmless", False)),
        (("helpful", False), ("harmless", True)),
        (("helpful", True), ("harmless", False)),
    ]


def test_evaluation_constitutions_complements():
    a, b = evaluation_constitutions(MANY[:2], k=2)
    assert a.items == (("p0", True), ("p1", True))
    assert b.items == (("p0", False), ("p1", False))
    with pytest.raises(ValueError, match=r"k must be 2 .* or 2\*\*n = 4"):
        evaluation_constitutions(PAIR, k=3)
    with pytest.raises(ValueError, match="distinct"):
        evaluation_constitutions([HELPFUL, HELPFUL], k=2)
    with pytest.raises(ValueError, match="at least one"):
        evaluation_constitutions([], k=2)
