"""Vectorised hashing for dedup and decontamination (numpy, deterministic, no Python ``hash``).

Text is compared with whitespace removed: Korean spacing (띄어쓰기) varies between sources of
the same sentence, so character n-grams over the unspaced text match where word n-grams would
not. Every hash is a 64-bit polynomial rolling hash over Unicode code points followed by the
splitmix64 finaliser, computed for a whole batch of texts at once.

- :func:`exact_key`: 64-bit key of an example's full text (exact duplicates).
- :func:`minhash_signatures` + :func:`near_duplicates`: MinHash over character shingles with
  LSH banding; candidate pairs are verified on the full signature (estimated Jaccard).
- :class:`EvalIndex`: the n-grams of every evaluation item; an example containing at least
  ``threshold`` of one item's n-grams is contaminated by it.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from stages.sources.evalsets import EvalItem
from stages.common.text import unspaced

_MULT = np.uint64(0x100000001B3)  # FNV prime: odd, spreads code points over the word
# Fixed permutation seed: MinHash signatures must not change between runs or versions,
# otherwise the same pair would be judged differently by different mixtures.
MINHASH_SEED = 20240901
# Rows of shingle-by-permutation values computed at once (bounds temporary memory).
_MINHASH_ROWS = 1 << 15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def mix_keys(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per key: the deterministic shuffles of selection/split."""
    return _mix64(keys.astype(np.uint64) ^ _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0])


def text_key(text: str) -> int:
    """64-bit content key of one string (blake2b)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def exact_key(text: str) -> int:
    """Key for exact-duplicate detection: whitespace-insensitive, as the n-grams are."""
    return text_key(unspaced(text))


def ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """All character n-gram hashes of each (already unspaced) text.

    Returns ``(hashes, owner)``: uint64 hashes and the index of the text each came from, in
    text order. Texts shorter than ``n`` contribute nothing.
    """
    encoded = [t.encode("utf-32-le") for t in texts]
    lengths = np.fromiter((len(e) // 4 for e in encoded), dtype=np.int64, count=len(encoded))
    if not len(encoded) or lengths.sum() < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    cps = np.frombuffer(b"".join(encoded), dtype=np.uint32).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    windows = len(cps) - n + 1
    h = np.zeros(windows, dtype=np.uint64)
    for j in range(n):  # polynomial hash of every window at once
        h = h * _MULT + cps[j:j + windows]
    positions = np.arange(windows, dtype=np.int64)
    owner = np.searchsorted(starts, positions, side="right") - 1
    valid = positions + n <= starts[owner] + lengths[owner]
    return _mix64(h[valid]), owner[valid]


def minhash_signatures(texts: Sequence[str], shingle: int, num_perm: int) -> np.ndarray:
    """MinHash signature per text: ``(len(texts), num_perm)`` uint16.

    Each permutation is ``a*h + b`` (mod 2^64) over the shingle hashes; the minimum is taken on
    the full 64 bits and 16 of its bits are kept (b-bit MinHash: two different minima agree by
    chance with probability 2^-16, negligible next to the estimate's own spread). A text
    shorter than ``shingle`` has one shingle: itself.
    """
    rng = np.random.default_rng(MINHASH_SEED)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    flat = [unspaced(t) for t in texts]
    hashes, owner = ngram_hashes(flat, shingle)
    short = [i for i, t in enumerate(flat) if len(t) < shingle]
    if short:
        extra = _mix64(np.array([text_key(flat[i]) for i in short], dtype=np.uint64))
        hashes = np.concatenate([hashes, extra])
        owner = np.concatenate([owner, np.array(short, dtype=np.int64)])
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint16)
    if not len(hashes):
        return signatures
    # Segment starts per owner; process runs of whole owners, ~_MINHASH_ROWS rows at a time.
    seg_starts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
    seg_owner = owner[seg_starts]
    begin = 0
    while begin < len(seg_starts):
        end = int(np.searchsorted(seg_starts, seg_starts[begin] + _MINHASH_ROWS, side="left"))
        end = max(end, begin + 1)
        row_lo = seg_starts[begin]
        row_hi = seg_starts[end] if end < len(seg_starts) else len(hashes)
        values = hashes[row_lo:row_hi, None] * a[None, :] + b[None, :]
        minima = np.minimum.reduceat(values, seg_starts[begin:end] - row_lo, axis=0)
        signatures[seg_owner[begin:end]] = ((minima >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.uint16)
        begin = end
    return signatures


def _runs(keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first, member) and (previous, member) within runs of equal keys. ``index`` gives
    each key's example index; ties keep index order, so the first is the earliest example."""
    order = np.lexsort((index, keys))
    k, idx = keys[order], index[order]
    same = np.concatenate([[False], k[1:] == k[:-1]])
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_start = np.maximum.accumulate(np.where(~same, np.arange(len(k)), 0))
    members = np.flatnonzero(same)
    first = idx[run_start[members]]
    previous = idx[members - 1]
    later = idx[members]
    return np.concatenate([first, previous]), np.concatenate([later, later])


def exact_duplicates(keys: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    """``{later index: earlier index}`` for examples whose key equals an earlier example's
    in another group (the first occurrence is kept)."""
    earlier, later = _runs(keys, np.arange(len(keys), dtype=np.int64))
    keep = groups[earlier] != groups[later]
    out: dict[int, int] = {}
    for i, j in sorted(zip(earlier[keep].tolist(), later[keep].tolist()), key=lambda p: (p[1], p[0])):
        out.setdefault(j, i)
    return out


class ChunkedRows:
    """Rows of equal-width signature chunks addressed as one matrix, without concatenating
    them: a full copy would double the largest array of the build (128 bytes per example at
    64 permutations) at its peak."""

    def __init__(self, chunks: Sequence[np.ndarray]) -> None:
        self.chunks = [c for c in chunks if len(c)]
        sizes = np.array([len(c) for c in self.chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.width = self.chunks[0].shape[1] if self.chunks else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def column(self, col: int) -> np.ndarray:
        out = np.empty(len(self), dtype=self.chunks[0].dtype if self.chunks else np.uint16)
        for chunk, lo in zip(self.chunks, self.offsets[:-1]):
            out[lo:lo + len(chunk)] = chunk[:, col]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.width), dtype=self.chunks[0].dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for c in np.unique(which):
            mask = which == c
            out[mask] = self.chunks[c][rows[mask] - self.offsets[c]]
        return out


def near_duplicates(signatures: np.ndarray | Sequence[np.ndarray], groups: np.ndarray,
                    alive: np.ndarray, bands: int, threshold: float) -> dict[int, tuple[int, float]]:
    """``{later index: (earlier index, similarity)}`` among ``alive`` examples: a later example
    whose estimated Jaccard with an earlier one (another group) is at least ``threshold``.

    ``signatures``: one matrix, or its row chunks in order (as the build makes them).
    LSH: the signature is cut into ``bands`` bands (≤ 4 rows of 16 bits = one uint64 key);
    examples sharing a band key are candidates, verified on the whole signature.
    """
    sig = ChunkedRows([signatures] if isinstance(signatures, np.ndarray) else signatures)
    index = np.flatnonzero(alive).astype(np.int64)
    if len(index) < 2:
        return {}
    rows = sig.width // bands
    pairs_i, pairs_j = [], []
    for band in range(bands):  # one band at a time: temporary memory is one uint64 per example
        key = np.zeros(len(index), dtype=np.uint64)
        for r in range(rows):
            key |= sig.column(band * rows + r)[index].astype(np.uint64) << np.uint64(16 * r)
        earlier, later = _runs(key, index)
        pairs_i.append(earlier)
        pairs_j.append(later)
    i = np.concatenate(pairs_i)
    j = np.concatenate(pairs_j)
    if not len(i):
        return {}
    pair = np.unique(np.stack([j, i], axis=1), axis=0)  # sorted by (later, earlier)
    j, i = pair[:, 0], pair[:, 1]
    keep = groups[i] != groups[j]
    i, j = i[keep], j[keep]
    similarity = np.zeros(len(i))
    for lo in range(0, len(i), _MINHASH_ROWS):
        hi = lo + _MINHASH_ROWS
        similarity[lo:hi] = (sig.take(i[lo:hi]) == sig.take(j[lo:hi])).mean(axis=1)
    out: dict[int, tuple[int, float]] = {}
    for a, b, s in zip(i.tolist(), j.tolist(), similarity.tolist()):
        if s >= threshold and b not in out:
            out[b] = (a, s)
    return out


class EvalIndex:
    """The character n-grams of every evaluation item (question and each choice separately, so
    no n-gram spans the join that a formatted prompt renders differently), without template
    text: an n-gram found in more than ``max_items_per_ngram`` items, or in more than
    ``template_share`` of one set's items (at least 2), counts for no item. Generated sets are
    templated ("다음은 … 주식의 최근 5거래일 일별 시세와 …"): an item's overlap is measured on
    what is its own (its figures, names, dates), and one training text cannot hit thousands of
    items through the template (2,000 stock test items took a decontamination pass past 20 GB
    before). An item with no n-gram at all (all its parts shorter than n) is matched by
    containment of its whole text; one whose n-grams are all template text (counted in
    ``templated``) by containment of its question and of every choice."""

    def __init__(self, items: Sequence[EvalItem], n: int, threshold: float,
                 max_items_per_ngram: int = 20, template_share: float = 0.05) -> None:
        self.n, self.threshold = n, threshold
        self.labels = [f"{item.set}/{item.id}" for item in items]  # "<eval set>/<item id>"
        hashes, owners, self.short = [], [], []
        for index, item in enumerate(items):
            parts = [unspaced(s) for s in (item.question, *item.choices) if s]
            h, _ = ngram_hashes(parts, n)
            h = np.unique(h)
            if not len(h):
                whole = "".join(parts)
                if whole:
                    self.short.append((index, whole))
                continue
            hashes.append(h)
            owners.append(np.full(len(h), index, dtype=np.int64))
        hashes_all = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        owners_all = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        own = self._own(items, hashes_all, owners_all, max_items_per_ngram, template_share)
        self.template_ngrams = int(len(np.unique(hashes_all[~own])))
        had = np.unique(owners_all)
        hashes_all, owners_all = hashes_all[own], owners_all[own]
        templated = np.setdiff1d(had, owners_all)
        self.templated = int(len(templated))
        # all template text: a copy is caught by containing its question and every choice
        self.whole: list[tuple[int, list[str]]] = [
            (i, [unspaced(s) for s in (items[i].question, *items[i].choices) if s])
            for i in templated.tolist()]
        order = np.argsort(hashes_all, kind="stable")
        self.hashes, self.owners = hashes_all[order], owners_all[order]
        self.sizes = np.bincount(owners_all, minlength=len(items)).astype(np.float64)

    @staticmethod
    def _own(items: Sequence[EvalItem], hashes: np.ndarray, owners: np.ndarray, most: int,
             share: float) -> np.ndarray:
        """Per (item, n-gram) row: not template text, overall nor within the item's set."""
        own = np.ones(len(hashes), dtype=bool)
        if not len(hashes):
            return own
        _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        own &= counts[inverse.ravel()] <= most
        set_of = np.array([item.set for item in items], dtype=object)[owners]
        for name in sorted({item.set for item in items}):
            rows = set_of == name  # one set's (item, n-gram) rows; an item's n-grams are unique
            size = sum(1 for item in items if item.set == name)
            limit = min(most, max(2, int(share * size)))
            _, inverse, counts = np.unique(hashes[rows], return_inverse=True, return_counts=True)
            own[rows] &= counts[inverse.ravel()] <= limit
        return own

    def __len__(self) -> int:
        return len(self.labels)

    def match(self, texts: Sequence[str]) -> list[tuple[str, float] | None]:
        """Per text: ``(eval label, overlap)`` of the most overlapping item at or above the
        threshold, else ``None``."""
        flat = [unspaced(t) for t in texts]
        result: list[tuple[str, float] | None] = [None] * len(texts)
        if len(self.hashes):
            h, owner = ngram_hashes(flat, self.n)
            if len(h):
                # look up every n-gram first (few hit), then count each text's distinct hits
                at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
                hit = self.hashes[at] == h
                if hit.any():
                    pair = np.unique(np.stack([owner[hit].astype(np.uint64), h[hit]], axis=1), axis=0)
                    owner, h = pair[:, 0].astype(np.int64), pair[:, 1]
                    lo = np.searchsorted(self.hashes, h, side="left")
                    hi = np.searchsorted(self.hashes, h, side="right")
                    hit = hi > lo
                    counts = (hi - lo)[hit]
                    text_of = np.repeat(owner[hit], counts)
                    starts = np.repeat(lo[hit], counts)
                    step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
                    item_of = self.owners[starts + step]
                    key = text_of * len(self.labels) + item_of
                    keys, hits = np.unique(key, return_counts=True)
                    texts_hit, items_hit = keys // len(self.labels), keys % len(self.labels)
                    overlap = hits / self.sizes[items_hit]
                    for t, item, o in zip(texts_hit.tolist(), items_hit.tolist(), overlap.tolist()):
                        if o >= self.threshold and (result[t] is None or o > result[t][1]):
                            result[t] = (self.labels[item], round(o, 4))
        for index, whole in self.short:
            for t, text in enumerate(flat):
                if result[t] is None and whole in text:
                    result[t] = (self.labels[index], 1.0)
        for index, parts in self.whole:
            for t, text in enumerate(flat):
                if result[t] is None and all(part in text for part in parts):
                    result[t] = (self.labels[index], 1.0)
        return result
