"""The one packer: consecutive pieces of a document into chunks under a budget.

Used wherever long text must fit a window: ``filter`` (statute articles into judge-sized
chunks, characters, with overlap), ``summarize`` (report pages into map calls, estimated
tokens) and ``mix`` (report pages into training examples, tokenizer tokens). Each caller
measures its pieces in its own unit; the packing rule is the same:

- pieces stay in order and whole (a caller cuts a piece longer than the budget first);
- a chunk costs the sum of its pieces plus one joiner between neighbours, at most ``limit``
  (a single piece over the limit still makes a chunk of its own);
- with ``overlap``, the next chunk starts with the trailing whole pieces of the previous one
  that cost at most ``overlap`` together (and still leave room for the new piece).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Segment:
    """A piece of one page of a document: a paragraph or article, a whole page, or part
    ``part`` of ``parts`` of a page too long for one chunk."""
    page: int
    text: str
    part: int = 1
    parts: int = 1


@dataclass(frozen=True)
class Chunk:
    """Consecutive segments, joined by ``joiner``; ``cost`` in the packer's unit."""
    index: int
    segments: tuple[Segment, ...]
    cost: int
    joiner: str = "\n"

    @property
    def text(self) -> str:
        return self.joiner.join(s.text for s in self.segments)

    @property
    def pages(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(s.page for s in self.segments))


def pack(items: Sequence[T], cost: Callable[[T], int], limit: int, joiner_cost: int = 0,
         overlap: int = 0) -> list[list[T]]:
    """``items`` in order, greedily grouped under ``limit`` (see the module docstring)."""
    costs = [cost(item) for item in items]
    groups: list[list[int]] = []
    current: list[int] = []
    used, fresh = 0, 0  # cost of ``current``; its items not already in the previous group

    def total(indexes: Sequence[int]) -> int:
        return sum(costs[i] for i in indexes) + joiner_cost * max(0, len(indexes) - 1)

    for index in range(len(items)):
        if current and used + joiner_cost + costs[index] > limit:
            if fresh:
                groups.append(current)
            carried: list[int] = []
            for previous in reversed(current):
                if total([previous, *carried]) > overlap or \
                        total([previous, *carried, index]) > limit:
                    break
                carried.insert(0, previous)
            current, fresh, used = carried, 0, total(carried)
        used += (joiner_cost if current else 0) + costs[index]
        current = [*current, index]
        fresh += 1
    if current and fresh:
        groups.append(current)
    return [[items[i] for i in group] for group in groups]


def chunk_segments(segments: Sequence[Segment], cost: Callable[[Segment], int], limit: int,
                   joiner: str, joiner_cost: int, overlap: int = 0) -> list[Chunk]:
    """Segments packed into numbered chunks (see :func:`pack`)."""
    groups = pack(segments, cost, limit, joiner_cost, overlap)
    return [Chunk(index, tuple(group), sum(cost(s) for s in group) + joiner_cost * (len(group) - 1),
                  joiner) for index, group in enumerate(groups)]
