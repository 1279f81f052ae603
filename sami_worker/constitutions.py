"""Constitutions: which principles a prompt lists, each kept or negated (docs/method.md,
'Constitutions').

A constitution names principles and says for each whether the prompt states its definition
(kept) or its antithesis (negated). Sampling works on flip patterns: an integer whose bit k is
set when the k-th principle is negated. Every sampler takes a `random.Random`; `derive_rng`
gives each (seed, iteration, query) its own stream, so a query gets the same constitutions
whichever worker processes it and in whatever order.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sami_operator.models import Principle

Mode = Literal["pair", "diverse"]
MODES: tuple[str, ...] = ("pair", "diverse")


@dataclass(frozen=True)
class Constitution:
    """Principles in prompt order, as (principle name, kept) with kept=False meaning negated."""

    items: tuple[tuple[str, bool], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.items]
        if not names:
            raise ValueError("a constitution needs at least one principle")
        if len(set(names)) != len(names):
            raise ValueError(f"a constitution lists each principle once; got names {names}")

    @property
    def key(self) -> frozenset[tuple[str, bool]]:
        """What the constitution asks for, ignoring the order the prompt lists it in."""
        return frozenset(self.items)

    def render(self, principles_by_name: Mapping[str, Principle]) -> str:
        """The numbered list a prompt shows: "1. <definition or antithesis>\\n2. ..."."""
        lines = []
        for number, (name, kept) in enumerate(self.items, start=1):
            if name not in principles_by_name:
                raise ValueError(
                    f"constitution names principle {name!r}, which is not among the given "
                    f"principles {sorted(principles_by_name)}"
                )
            principle = principles_by_name[name]
            lines.append(f"{number}. {principle.definition if kept else principle.antithesis}")
        return "\n".join(lines)


def derive_rng(
    seed: int, iteration: int, query_index: int, stream: str = "constitutions"
) -> random.Random:
    """A generator for one query, fixed by (seed, iteration, query index, stream name).

    Hashed with SHA-256 rather than Python's hash(), which is salted per process for strings.
    """
    material = f"{stream}\x00{seed}\x00{iteration}\x00{query_index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))


def _check_principles(principles: Sequence[Principle]) -> None:
    if not principles:
        raise ValueError("need at least one principle; got none")
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise ValueError(f"principle names must be distinct; got {names}")


def _sample_patterns(rng: random.Random, n_patterns: int, k: int, excluded: set[int]) -> list[int]:
    """k distinct integers from range(n_patterns) minus `excluded`, uniformly, in drawn order."""
    skip = sorted(excluded)
    drawn = rng.sample(range(n_patterns - len(skip)), k)
    patterns = []
    for index in drawn:
        # Map the index-th allowed value to its integer by stepping over excluded ones.
        for e in skip:
            if index >= e:
                index += 1
        patterns.append(index)
    return patterns


def _from_pattern(names: Sequence[str], pattern: int, rng: random.Random | None) -> Constitution:
    items = [(name, not (pattern >> bit & 1)) for bit, name in enumerate(names)]
    if rng is not None:
        # docs/method.md, 'Constitutions': principle order is shuffled per use, so the model
        # cannot tie a principle's meaning to its position in the list.
        rng.shuffle(items)
    return Constitution(tuple(items))


def sample_pair_mode(
    principles: Sequence[Principle], rng: random.Random, c: int = 2
) -> list[Constitution]:
    """The paper's two-principle mode, for any number n of principles.

    Constitution 0 keeps every principle. The other c-1 negate a nonempty subset each, drawn
    without replacement from the 2**n - 1 negating variants (for n=2: negate the first, the
    second, or both), so all c constitutions differ.
    """
    _check_principles(principles)
    n = len(principles)
    if c < 2:
        raise ValueError(f"c (constitutions per query) must be at least 2; got {c}")
    if c - 1 > 2**n - 1:
        raise ValueError(
            f"c={c} needs {c - 1} distinct negating variants but {n} principle(s) allow only "
            f"{2**n - 1}; use c <= {2**n}"
        )
    names = [p.name for p in principles]
    patterns = [0, *_sample_patterns(rng, 2**n, c - 1, excluded={0})]
    return [_from_pattern(names, pattern, rng) for pattern in patterns]


def sample_diverse_mode(
    principles: Sequence[Principle], rng: random.Random, per_constitution: int = 2, c: int = 2
) -> list[Constitution]:
    """The paper's many-principle mode.

    Draws `per_constitution` of the principles; constitution A flips a coin per principle,
    B is A with every principle flipped. For c > 2 the others are further distinct flip
    patterns over the same drawn principles.
    """
    _check_principles(principles)
    if not 1 <= per_constitution <= len(principles):
        raise ValueError(
            f"per_constitution must be between 1 and the number of principles "
            f"({len(principles)}); got {per_constitution}"
        )
    if c < 2:
        raise ValueError(f"c (constitutions per query) must be at least 2; got {c}")
    n_patterns = 2**per_constitution
    if c > n_patterns:
        raise ValueError(
            f"c={c} needs {c} distinct flip patterns but per_constitution={per_constitution} "
            f"allows only {n_patterns}; use c <= {n_patterns} or a larger per_constitution"
        )
    names = [p.name for p in rng.sample(list(principles), per_constitution)]
    a = rng.randrange(n_patterns)
    b = a ^ (n_patterns - 1)
    patterns = [a, b, *_sample_patterns(rng, n_patterns, c - 2, excluded={a, b})]
    return [_from_pattern(names, pattern, rng) for pattern in patterns]


def sample_constitutions(
    principles: Sequence[Principle],
    mode: Mode,
    c: int,
    rng: random.Random,
    per_constitution: int = 2,
) -> list[Constitution]:
    """c constitutions for one query; `per_constitution` applies to diverse mode only."""
    if mode == "pair":
        return sample_pair_mode(principles, rng, c=c)
    if mode == "diverse":
        return sample_diverse_mode(principles, rng, per_constitution=per_constitution, c=c)
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def evaluation_constitutions(principles: Sequence[Principle], k: int) -> list[Constitution]:
    """The K fixed evaluation constitutions of the MI metrics (docs/method.md, 'Evaluation and
    win rates'); no shuffling.

    k=2: all kept, then all negated (the complements used for diverse principles).
    k=2**n: every flip pattern, ordered all kept, all negated, then by how many principles
    are negated and by position (for two principles: both kept, both negated, first negated
    alone, second negated alone).
    """
    _check_principles(principles)
    n = len(principles)
    full = 2**n - 1
    if k == 2:
        patterns = [0, full]
    elif k == 2**n:

        def order(pattern: int) -> tuple[int, list[int]]:
            negated = [i for i in range(n) if pattern >> i & 1]
            return len(negated), negated

        rest = sorted(range(1, full), key=order)
        patterns = [0, full, *rest]
    else:
        raise ValueError(
            f"k must be 2 (complements) or 2**n = {2**n} (every variant of the {n} "
            f"principle(s)); got {k}"
        )
    names = [p.name for p in principles]
    return [_from_pattern(names, pattern, None) for pattern in patterns]
