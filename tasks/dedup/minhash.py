"""MinHash building blocks for `near_dedup`, vectorised over batches of documents.

Shingles are word n-grams of normalised text (NFKC, lower case, runs of whitespace
collapsed to one space), hashed once each with SHA-1 exactly like datasketch's
``sha1_hash64`` (the first 8 digest bytes, little endian); the low 32 bits are datasketch's
``sha1_hash32``. Signatures use datasketch's default ``affine32`` permutation scheme (the
MurmurHash3 finalizer, then ``a * h + b mod 2**32``) with the permutation parameters taken
from ``datasketch.MinHash(num_perm, seed)``, so a signature here equals
``MinHash(num_perm, seed).update_batch(shingles).hashvalues`` bit for bit
(tests/tasks/dedup/test_near_dedup.py checks it) while costing one numpy matrix operation per
batch instead of a Python call per shingle. Within a batch, a shingle that occurs several
times (boilerplate, near-duplicate pages) is SHA-1 hashed once: occurrences are grouped by
a vectorised 64-bit fingerprint of their bytes first.

Try it: ``python -m lmfoundry.tasks.dedup.minhash "some text here" "some other text here"`` prints the
estimated and the exact Jaccard similarity of two texts.
"""
from __future__ import annotations

import hashlib
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from operator import methodcaller

import numpy as np
from datasketch import MinHash

_DIGEST = methodcaller("digest")
# 20-byte SHA-1 digests read as (first 8 bytes little endian, the rest): datasketch's sha1_hash64
_SHA1_HEAD = np.dtype([("head", "<u8"), ("rest", "V12")])
_SPACE, _DOC_END = 32, 10  # normalised text has single spaces; documents are joined by newlines
_ROWS_PER_CHUNK = 1 << 14  # shingles per permutation chunk: an 8 MiB uint32 matrix at 128 perms
_MIX64 = np.uint64(0x9E3779B97F4A7C15)


def fmix64(h: np.ndarray) -> np.ndarray:
    """The MurmurHash3 64-bit finalizer: a bijection that spreads every input bit (uint64 arrays)."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


# --------------------------------------------------------------------------- shingles


def normalize(text: str) -> bytes:
    """NFKC, lower case, whitespace runs collapsed to one space, stripped; UTF-8 bytes.

    The reference definition; `normalized_buffer` computes the same bytes for a whole batch.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.lower().split()).encode("utf-8", "surrogatepass")


# str.split() treats these ASCII bytes as whitespace; they all become a space
_ASCII_SPACE = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)
# the other characters str.split() splits on that NFKC leaves alone (NFKC maps the rest to a space)
_UNICODE_SPACES = ("\x85", "\u1680", "\u2028", "\u2029")


def _lowered_bytes(text: str) -> bytes:
    """normalize(text) except that runs of spaces are not collapsed yet."""
    if text.isascii():
        return text.encode("ascii").lower().translate(_ASCII_SPACE)
    text = unicodedata.normalize("NFKC", text).lower()
    for space in _UNICODE_SPACES:
        if space in text:
            text = text.replace(space, " ")
    return text.encode("utf-8", "surrogatepass").translate(_ASCII_SPACE)


def normalized_buffer(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The normalised texts joined by newlines (a uint8 array) and where each one starts.

    Equal to the newline-joined normalize(text) of every text; runs of spaces are collapsed
    here in one vectorised pass rather than by splitting every text into word objects.
    """
    raw = np.frombuffer(b"\n".join(map(_lowered_bytes, texts)), np.uint8)
    # keep the first space of a run that follows a word, then drop it again before a document end
    sep = (raw == _SPACE) | (raw == _DOC_END)
    arr = raw[~((raw == _SPACE) & np.concatenate(([True], sep[:-1])))]
    arr = arr[~((arr == _SPACE) & np.concatenate((arr[1:] == _DOC_END, [True])))]
    doc_starts = np.concatenate(([0], np.flatnonzero(arr == _DOC_END) + 1)) if len(texts) else np.zeros(0, np.int64)
    return arr, doc_starts


@dataclass(frozen=True)
class ShingleSets:
    """Per document, the sorted distinct 64-bit hashes of its shingles (a CSR layout).

    ``hashes[offsets[i]:offsets[i + 1]]`` is document i's set; an empty document (no word)
    has an empty set.
    """

    hashes: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len(docs) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def of(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class Shingles:
    """Every shingle occurrence of a batch: its byte span in the buffer and its document."""

    starts: np.ndarray
    ends: np.ndarray
    docs: np.ndarray


def word_spans(arr: np.ndarray, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, document) of every word of a normalised buffer."""
    cuts = np.flatnonzero((arr == _SPACE) | (arr == _DOC_END))
    starts = np.concatenate(([0], cuts + 1))
    ends = np.concatenate((cuts, [len(arr)]))
    docs = np.concatenate(([0], np.cumsum(arr[cuts] == _DOC_END)))
    real = ends > starts  # an empty document leaves an empty "word" between two newlines
    if not real.all():
        starts, ends, docs = starts[real], ends[real], docs[real]
    return starts, ends, docs


def shingle_spans(word_starts: np.ndarray, word_ends: np.ndarray, word_doc: np.ndarray, n_docs: int, n: int) -> Shingles:
    """Every word n-gram that stays inside one document, in buffer order (starts and ends increase).

    A document with fewer than n words (but at least one) has one shingle: all its words.
    """
    if len(word_starts) >= n:
        first = np.flatnonzero(word_doc[: len(word_doc) - n + 1] == word_doc[n - 1 :])
    else:
        first = np.zeros(0, np.int64)
    last = first + (n - 1)
    words_per_doc = np.bincount(word_doc, minlength=n_docs)
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < n))
    if len(short):
        doc_first_word = np.concatenate(([0], np.cumsum(words_per_doc)))
        at = np.searchsorted(first, doc_first_word[short])
        first = np.insert(first, at, doc_first_word[short])
        last = np.insert(last, at, doc_first_word[short + 1] - 1)
    return Shingles(word_starts[first], word_ends[last], word_doc[first])


_POLY_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_POLY_BASE_INV = np.uint64(pow(int(_POLY_BASE), -1, 1 << 64))
_FINGERPRINT_CHUNK = 1 << 14  # buffer bytes per fingerprinting step: its temporaries stay in cache


def span_fingerprints(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of the bytes of every span (a polynomial hash modulo 2**64, mixed).

    Only used to find repeated shingles before SHA-1: equal bytes give equal fingerprints.
    Spans must be in buffer order with increasing ends. Two different spans could share a
    fingerprint only with crafted input (such as long Thue-Morse strings); they would then
    count as one shingle.
    """
    out = np.empty(len(starts), np.uint64)
    i = 0
    while i < len(starts):
        lo = int(starts[i])
        # the spans that end within one chunk (a longer span gets a chunk of its own)
        stop = max(i + 1, int(np.searchsorted(ends, lo + _FINGERPRINT_CHUNK, side="right")))
        hi = int(ends[stop - 1])
        powers, inverse = _powers(max(hi - lo, _FINGERPRINT_CHUNK))
        values = arr[lo:hi].astype(np.uint64)
        values += np.uint64(1)  # so that a zero byte still counts
        values *= powers[: hi - lo]
        prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(values)))
        s, e = starts[i:stop] - lo, ends[i:stop] - lo
        out[i:stop] = (prefix[e] - prefix[s]) * inverse[s]
        i = stop
    return fmix64(out ^ (ends - starts).astype(np.uint64) * _MIX64)


@lru_cache(maxsize=2)
def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """B**j and B**-j modulo 2**64 for j < length (uint64 products wrap, which is the modulo)."""
    one = np.ones(1, np.uint64)
    powers = np.concatenate((one, np.cumprod(np.full(length - 1, _POLY_BASE, np.uint64))))
    inverse = np.concatenate((one, np.cumprod(np.full(length - 1, _POLY_BASE_INV, np.uint64))))
    return powers, inverse


def sha1_head64(buffer, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """datasketch's sha1_hash64 of every span of buffer, without a Python loop per span."""
    view = memoryview(buffer)
    spans = map(view.__getitem__, map(slice, starts.tolist(), ends.tolist()))
    digests = b"".join(map(_DIGEST, map(hashlib.sha1, spans)))
    return np.frombuffer(digests, _SHA1_HEAD)["head"].copy()


def shingle_sets(texts: list[str], n: int) -> ShingleSets:
    """Hashed word n-gram sets of a batch of texts (datasketch's sha1_hash64 of each shingle).

    A shingle repeated anywhere in the batch (boilerplate, near-duplicates) is hashed once.
    """
    arr, doc_starts = normalized_buffer(texts)
    shingles = shingle_spans(*word_spans(arr, doc_starts), len(texts), n)
    fp = span_fingerprints(arr, shingles.starts, shingles.ends)
    order = np.argsort(fp)
    sorted_fp = fp[order]
    new_group = np.concatenate(([True], sorted_fp[1:] != sorted_fp[:-1]))
    group = np.empty(len(fp), np.int64)
    group[order] = np.cumsum(new_group) - 1
    # hash one occurrence of each distinct shingle, visiting the buffer in order (cache friendly)
    first = order[new_group]
    by_position = np.argsort(first)
    hashes = np.empty(len(first), np.uint64)
    hashes[by_position] = sha1_head64(arr, shingles.starts[first[by_position]], shingles.ends[first[by_position]])
    return _distinct_per_doc(hashes, group, shingles.docs, len(texts))


def _distinct_per_doc(hashes: np.ndarray, group: np.ndarray, docs: np.ndarray, n_docs: int) -> ShingleSets:
    """Per document, its distinct shingle hashes in increasing order (one sort of (doc, rank) keys)."""
    by_hash = np.argsort(hashes)
    rank = np.empty(len(hashes), np.int64)
    rank[by_hash] = np.arange(len(hashes))
    width = max(len(hashes), 1)
    keys = np.sort(docs.astype(np.int64) * width + rank[group])
    if len(keys):
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    doc, ranks = np.divmod(keys, width)
    offsets = np.searchsorted(doc, np.arange(n_docs + 1)).astype(np.int64)
    return ShingleSets(hashes[by_hash][ranks], offsets)


# --------------------------------------------------------------------------- signatures


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a odd, b) for this num_perm and seed."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.ascontiguousarray(a, np.uint32), np.ascontiguousarray(b, np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer that datasketch applies before permuting."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(sets: ShingleSets, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures [docs, num_perm] uint32; an empty set gets datasketch's empty value (all 2**32-1)."""
    a, b = permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    out = np.full((len(sets), num_perm), np.iinfo(np.uint32).max, np.uint32)
    mixed = fmix32((sets.hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    row_doc = np.repeat(np.arange(len(sets)), sets.sizes())
    # [num_perm, rows]: reducing along the contiguous axis is ~20x faster than along rows;
    # one buffer for all chunks saves the page faults of a fresh 8 MiB array each time
    buffer = np.empty((num_perm, min(_ROWS_PER_CHUNK, len(mixed))), np.uint32)
    for lo in range(0, len(mixed), _ROWS_PER_CHUNK):
        chunk, chunk_doc = mixed[lo : lo + _ROWS_PER_CHUNK], row_doc[lo : lo + _ROWS_PER_CHUNK]
        permuted = buffer[:, : len(chunk)]
        np.multiply(a, chunk[None, :], out=permuted)
        permuted += b
        seg = np.flatnonzero(np.concatenate(([True], chunk_doc[1:] != chunk_doc[:-1])))
        mins = np.minimum.reduceat(permuted, seg, axis=1).T
        docs = chunk_doc[seg]
        # a document cut by a chunk boundary is combined with the part already seen
        out[docs] = np.minimum(out[docs], mins)
    return out


# --------------------------------------------------------------------------- LSH banding


def collision_probability(similarity: float, bands: int, rows: int) -> float:
    """The S-curve: probability that two sets of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def choose_bands(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight * FP area + fn_weight * FN area of the S-curve.

    The same grid search as datasketch's MinHashLSH optimiser (bands x rows <= num_perm, the
    first minimum in (bands, rows) order wins), with the areas integrated exactly by
    Gauss-Legendre quadrature for all layouts at once instead of one scipy call each.
    """
    layouts = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], np.float64)
    fp, fn = _s_curve_areas(threshold, layouts[:, :1], layouts[:, 1:], num_perm)
    best = int(np.argmin(fp * fp_weight + fn * fn_weight))
    return int(layouts[best, 0]), int(layouts[best, 1])


def s_curve_areas(threshold: float, bands: int, rows: int) -> tuple[float, float]:
    """(false-positive area below the threshold, false-negative area above it) of the S-curve."""
    fp, fn = _s_curve_areas(threshold, np.array([[bands]], np.float64), np.array([[rows]], np.float64), bands * rows)
    return float(fp[0]), float(fn[0])


@lru_cache(maxsize=4)
def _legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


def _s_curve_areas(threshold: float, bands: np.ndarray, rows: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    # the S-curve is a polynomial of degree bands * rows: n Gauss-Legendre nodes integrate
    # polynomials up to degree 2n - 1 exactly
    nodes, weights = _legendre(max(32, degree // 2 + 1))

    def integral(f, lo: float, hi: float) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        return f(s[None, :]) @ weights * (hi - lo) / 2

    def collide(s):
        return 1.0 - (1.0 - s**rows) ** bands

    return integral(collide, 0.0, threshold), integral(lambda s: 1.0 - collide(s), threshold, 1.0)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band); equal bands give equal keys, and the band index is
    mixed in so that equal values in two different bands do not collide."""
    grid = sigs[:, : bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    keys = np.broadcast_to(fmix64(np.arange(1, bands + 1, dtype=np.uint64)), (len(sigs), bands)).copy()
    for j in range(rows):
        keys = fmix64((keys ^ grid[:, :, j]) * _MIX64)
    return keys


# --------------------------------------------------------------------------- similarity


def jaccard_one_to_many(sets: ShingleSets, one: int, many: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of set `one` with each set in `many` (sets must be non-empty)."""
    ref = sets.of(one)
    starts, ends = sets.offsets[many], sets.offsets[many + 1]
    flat = sets.hashes[gather_ranges(starts, ends)]
    pos = np.minimum(np.searchsorted(ref, flat), len(ref) - 1)
    hits = np.concatenate(([0], np.cumsum(ref[pos] == flat)))
    sizes = ends - starts
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    inter = hits[bounds[1:]] - hits[bounds[:-1]]
    return inter / (len(ref) + sizes - inter)


def gather_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of ranges [starts[0], ends[0]), [starts[1], ends[1]), ... concatenated."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total) + shift


def estimated_jaccard_one_to_many(sigs: np.ndarray, one: int, many: np.ndarray) -> np.ndarray:
    """Jaccard similarity estimated from MinHash signatures (the fraction of equal values)."""
    return (sigs[many] == sigs[one]).mean(axis=1)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lmfoundry.tasks.dedup.minhash TEXT_A TEXT_B", file=sys.stderr)
        return 2
    sets = shingle_sets(argv, 5)
    sigs = signatures(sets, 128, 1)
    print(f"exact {jaccard_one_to_many(sets, 0, np.array([1]))[0]:.3f}  estimated {estimated_jaccard_one_to_many(sigs, 0, np.array([1]))[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
