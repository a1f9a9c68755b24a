"""Length buckets: the few padded shapes a session compiles.

A prefill program is keyed on its padded piece length and its cache capacity, never on a prompt's exact
length (that is a traced input). Both come from a ladder: multiples of a unit (2·C·64 tokens for pieces,
so each of the 2C zigzag chunks holds whole GDN chunks) up to `STEPS` units, then `STEPS` evenly spaced
values per doubling. Padding therefore wastes less than 1/STEPS of the tokens (12.5%), and a session
of prompts up to N tokens compiles about STEPS·log2(N / (STEPS·unit)) + STEPS prefill programs.

Long prompts go in pieces (`plan_pieces`): with `chunk_size="auto"` a prompt longer than the piece that
fits the memory budget is split into equal pieces of one ladder length, so every long prompt reuses the
programs of the pieces up to that budget.

A coarse ladder (`COARSE_STEPS`, one value per doubling) is what a cold start compiles first: `coarse_pieces`
plans a prompt with it (at most 2x padding), so a few programs serve every length soon after start, while
the fine ladder is compiled in the background. `alternatives` lists every other way to feed a prompt with
programs of the fine ladder, cheapest first, so a request can take the smallest program already compiled;
`all_plans` enumerates the plans of every length up to a maximum from the ladder, without walking lengths.
"""

from __future__ import annotations

import dataclasses
import numbers

from pcp_jax.inputs import is_int

STEPS = 8           # ladder values per doubling
COARSE_STEPS = 1    # the coarse ladder a cold start compiles first: one value per doubling
MIN_ROOM = 256      # decode slots per rank reserved at least, when any are asked for


def ladder_up(n: int, unit: int, steps: int = STEPS) -> int:
    """The smallest ladder value >= n: a multiple of `unit`, and above steps·unit one of `steps` evenly
    spaced values per doubling."""
    n = max(int(n), 1)
    units = -(-n // unit)
    if units <= steps:
        return units * unit
    step = 1 << ((units - 1).bit_length() - 1 - (steps.bit_length() - 1))  # units in (2^e, 2^(e+1)]: 2^e / steps
    return -(-units // step) * step * unit


def ladder(max_n: int, unit: int, steps: int = STEPS) -> list[int]:
    """Every ladder value up to ladder_up(max_n), ascending."""
    out, n = [], unit
    top = ladder_up(max_n, unit, steps)
    while n <= top:
        out.append(n)
        n = ladder_up(n + 1, unit, steps)
    return out


def ladder_down(n: int, unit: int, steps: int = STEPS) -> int:
    """The largest ladder value <= n (at least `unit`)."""
    best = unit
    for v in ladder(n, unit, steps):
        if v <= n:
            best = v
    return best


def decode_room(max_new_tokens: int, cp: int) -> int:
    """KV slots per rank reserved after the prompt for `max_new_tokens` (round-robin: ceil(n / cp) each),
    rounded up to a power of two of at least MIN_ROOM so that nearby requests share programs."""
    room = -(-max(int(max_new_tokens), 0) // cp)
    return 0 if room == 0 else max(MIN_ROOM, 1 << (room - 1).bit_length())


CAPACITY_STEPS = 4  # capacities per doubling: decode programs are keyed on the capacity alone


def capacity(slots: int) -> int:
    """Cache slots per rank: `slots` rounded up on a coarser ladder of 64-slot units (4 values per
    doubling: at most 25% more KV memory than needed), so that prompts of nearby buckets share one
    decode program."""
    return ladder_up(slots, 64, CAPACITY_STEPS)


@dataclasses.dataclass(frozen=True)
class Pieces:
    """How one prompt batch is fed: `count` pieces of `tokens` prompt tokens each (the last may be
    partial), each padded to `n_pad` (a ladder value, zigzag-split over cp)."""
    tokens: int
    n_pad: int
    count: int


def plan_pieces(n: int, cp: int, chunk_size, auto_piece: int, fixed: bool = False, steps: int | None = STEPS) -> Pieces:
    """Pieces for a prompt batch whose longest row has n tokens.
    chunk_size None: one piece. An int S: pieces of S tokens. "auto": one piece up to `auto_piece` tokens
    (a ladder value), else the fewest equal pieces of one ladder length <= auto_piece (`fixed`: pieces of
    exactly auto_piece, so that boundaries do not move with the prompt length, as the prefix cache needs).
    steps=None pads to a multiple of the unit only (exact lengths: one program per length)."""
    unit = 2 * cp * 64
    pad = (lambda t: -(-t // unit) * unit) if steps is None else (lambda t: ladder_up(t, unit, steps))
    if chunk_size is None or (chunk_size == "auto" and n <= auto_piece):
        tokens = n
    elif chunk_size == "auto":
        count = -(-n // auto_piece)
        tokens = auto_piece if fixed else pad(-(-n // count))
    else:
        tokens = min(int(chunk_size), n)
    n_pad = pad(tokens)
    if chunk_size is not None and tokens < n:
        tokens = n_pad if chunk_size == "auto" else tokens  # auto pieces fill their padded length
    return Pieces(tokens, n_pad, -(-n // tokens))


def unit_of(cp: int) -> int:
    """Tokens of the smallest piece: 2·cp zigzag chunks of 64 tokens (one GDN chunk each)."""
    return 2 * cp * 64


def check_chunk_size(chunk_size, cp: int) -> None:
    """chunk_size: None, "auto" or an int of at least half a unit (cp·64 tokens): every piece occupies at least
    a unit of KV slots, so smaller pieces would waste more slots than they hold."""
    if chunk_size is None or chunk_size == "auto":
        return
    if not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer, 'auto' or None")
    if chunk_size < cp * 64:
        raise ValueError(f"chunk_size={chunk_size} is below {cp * 64} tokens: at cp={cp} every piece occupies "
                         f"{unit_of(cp)} KV slots (2·cp·64), so a smaller piece wastes more slots than it holds")


def coarse_pieces(n: int, cp: int, chunk_size, auto_piece: int, steps: int | None = STEPS) -> Pieces:
    """The plan of a prompt of n tokens on the coarse ladder (what a cold start compiles first): one piece of
    the next power-of-two multiple of the unit, or, above the coarse piece that fits the budget, equal pieces
    of one coarse length. Explicit chunk sizes keep their pieces (a one-piece prompt is padded to the coarse
    ladder, at most to its piece's padded length). Exact lengths (steps None) have no coarse ladder."""
    unit = unit_of(cp)
    if steps is None:
        return plan_pieces(n, cp, chunk_size, auto_piece, steps=None)
    if chunk_size == "auto":
        return plan_pieces(n, cp, "auto", ladder_down(auto_piece, unit, COARSE_STEPS), steps=COARSE_STEPS)
    coarse = ladder_up(n, unit, COARSE_STEPS)
    if chunk_size is None:
        return Pieces(n, coarse, 1)
    if n <= chunk_size:
        return Pieces(n, min(coarse, ladder_up(chunk_size, unit, steps)), 1)
    return plan_pieces(n, cp, chunk_size, auto_piece, steps=steps)


def alternatives(n: int, cp: int, chunk_size, auto_piece: int, steps: int = STEPS) -> list[Pieces]:
    """Every plan that feeds a prompt of n tokens with pieces of a fine-ladder length, cheapest first (padded
    tokens, then fewer pieces): one piece of any length >= n (at most the auto piece, or the chunk's padded
    length), or pieces filling any ladder length up to the auto piece. The plan `plan_pieces` gives is among
    the cheapest. Fixed plans (prefix cache) and exact lengths have no alternatives: ask plan_pieces."""
    unit = unit_of(cp)
    if chunk_size is None:
        return [Pieces(n, p, 1) for p in ladder(2 * n, unit, steps) if p >= n]
    if chunk_size == "auto":
        out = [Pieces(n, p, 1) for p in ladder(auto_piece, unit, steps) if n <= p <= auto_piece]
        out += [Pieces(p, p, -(-n // p)) for p in ladder(auto_piece, unit, steps) if p < n and p <= auto_piece]
    else:
        top = ladder_up(chunk_size, unit, steps)
        out = ([Pieces(n, p, 1) for p in ladder(top, unit, steps) if n <= p <= top] if n <= chunk_size
               else [plan_pieces(n, cp, chunk_size, auto_piece, steps=steps)])
    return sorted(out, key=lambda p: (p.count * p.n_pad, p.count))


def all_plans(max_tokens: int, cp: int, chunk_size, auto_piece: int, *, fixed: bool = False,
              steps: int | None = STEPS, coarse: bool = False) -> set[tuple[int, int]]:
    """{(count, n_pad)} of the plan (`plan_pieces`, or `coarse_pieces` with `coarse`) of every prompt length
    1..max_tokens, without walking the lengths: a plan is constant between consecutive multiples c·v (and
    c·v + 1) of the values v where a piece's padded length or the piece count can change (the ladder's
    values, the auto piece and the chunk size) for every count c it reaches, so it is evaluated only there."""
    unit = unit_of(cp)
    if coarse:
        plan = lambda n: coarse_pieces(n, cp, chunk_size, auto_piece, steps)
    else:
        plan = lambda n: plan_pieces(n, cp, chunk_size, auto_piece, fixed=fixed, steps=steps)
    if steps is None:
        values = list(range(unit, max_tokens + unit, unit))
    else:
        values = ladder(max_tokens, unit, steps)
    if auto_piece > 0:
        values += [auto_piece, ladder_down(auto_piece, unit, COARSE_STEPS)]
    if isinstance(chunk_size, numbers.Integral):
        values.append(int(chunk_size))
    points = {1, max_tokens}
    for v in set(values):
        for c in range(1, plan(max_tokens).count + 1):
            points.update(m for m in (c * v, c * v + 1) if m <= max_tokens)
    return {(p.count, p.n_pad) for p in map(plan, points)}
