"""Length buckets: the few padded shapes a session compiles.

A prefill program is keyed on its padded piece length and its cache capacity, never on a prompt's exact
length (that is a traced input). Both come from a ladder: multiples of a unit (2·C·64 tokens for pieces,
so each of the 2C zigzag chunks holds whole GDN chunks) up to `STEPS` units, then `STEPS` evenly spaced
values per doubling. Padding therefore wastes less than 1/STEPS of the tokens (12.5%), and a session
of prompts up to N tokens compiles about STEPS·log2(N / (STEPS·unit)) + STEPS prefill programs.

Long prompts go in pieces (`plan_pieces`): with `chunk_size="auto"` a prompt longer than the piece that
fits the memory budget is split into equal pieces of one ladder length, so every long prompt reuses the
programs of the pieces up to that budget.
"""

from __future__ import annotations

import dataclasses

STEPS = 8           # ladder values per doubling
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
