"""Trains a byte-level BPE tokenizer in xAI's tiktoken JSON format (Grok-2's `tokenizer.tok.json`).

The texts are split into words with the "V1" pattern (`grokscope.tokenizer.V1_PATTERN`), the
distinct words are counted, and merges are learned on the counted words; pair counts are
updated only for the words that hold the merged pair, so the text itself is read once.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from grokscope.tokenizer import EOS, PAD, SEPARATOR, V1_PATTERN, parse_tok_json

__all__ = ["train_tok_json", "write_tok_json"]

SPECIAL_TOKENS = (PAD, SEPARATOR, EOS)
_FIRST_BYTE_ID = len(SPECIAL_TOKENS)  # byte b has id b + 3
_FIRST_MERGE_ID = _FIRST_BYTE_ID + 256


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, with any lone surrogate replaced by U+FFFD (as tiktoken encodes it)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def count_words(texts: Iterable[str]) -> Counter:
    """How often each V1 word (as UTF-8 bytes) occurs in `texts`."""
    import regex

    split = regex.compile(V1_PATTERN)
    counts: Counter = Counter()
    for text in texts:
        counts.update(split.findall(text))
    words: Counter = Counter()
    for word, n in counts.items():
        words[_utf8(word)] += n
    return words


def train_tok_json(texts: Iterable[str], vocab_size: int) -> dict:
    """A byte-level BPE tokenizer trained on `texts`, as a tiktoken JSON dict.

    Ids 0, 1 and 2 are the special tokens `<|pad|>`, `<|separator|>` and `<|eos|>`; ids 3..258
    are the 256 single bytes (byte b is id b + 3); later ids are merges in the order they were
    learned, which is the rank tiktoken gives them. Each step merges the adjacent pair with the
    largest count over all word occurrences (a pair repeated inside a word counts every time);
    ties go to the pair whose (left bytes, right bytes) sort first. A merge whose bytes are
    already a token reuses that token. Merging stops at `vocab_size` tokens, or earlier when no
    word has two tokens left.

    Raises:
      ValueError: `vocab_size` below 259 (the special tokens and single bytes).
    """
    if vocab_size < _FIRST_MERGE_ID:
        raise ValueError(f"vocab_size: expected >= {_FIRST_MERGE_ID} (3 special tokens and 256 bytes), "
                         f"got {vocab_size}")
    token_bytes = [s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
    id_of = {raw: i for i, raw in enumerate(token_bytes) if i >= _FIRST_BYTE_ID}

    words: list[list[int]] = []
    freqs: list[int] = []
    for word, n in count_words(texts).items():
        if len(word) > 1:
            words.append([b + _FIRST_BYTE_ID for b in word])
            freqs.append(n)

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    holders: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (symbols, n) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_count[pair] += n
            holders[pair].add(w)
    heap = [(-n, token_bytes[a], token_bytes[b], a, b) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)

    while len(token_bytes) < vocab_size and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_count.get((a, b)) != -neg:
            continue  # a stale entry: the pair's count has changed since it was pushed
        merged = token_bytes[a] + token_bytes[b]
        new = id_of.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            id_of[merged] = new
        changed: set[tuple[int, int]] = set()
        for w in holders.pop((a, b)):
            symbols = words[w]
            out: list[int] = []
            i, end = 0, len(symbols)
            while i < end:
                if i + 1 < end and symbols[i] == a and symbols[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            if len(out) == end:
                continue  # the word no longer holds the pair
            n = freqs[w]
            for pair in zip(symbols, symbols[1:]):
                pair_count[pair] -= n
                changed.add(pair)
            for pair in zip(out, out[1:]):
                pair_count[pair] += n
                holders[pair].add(w)
                changed.add(pair)
            words[w] = out
        for pair in changed:
            n = pair_count[pair]
            if n > 0:
                heapq.heappush(heap, (-n, token_bytes[pair[0]], token_bytes[pair[1]], *pair))
            else:
                del pair_count[pair]
                holders.pop(pair, None)

    return {
        "regular_tokens": [{"bytes": list(raw), "token": i}
                           for i, raw in enumerate(token_bytes) if i >= _FIRST_BYTE_ID],
        "special_tokens": [{"bytes": list(token_bytes[i]), "token": i} for i in range(_FIRST_BYTE_ID)],
        "word_split": "V1",
        "vocab_size": len(token_bytes),
    }


def write_tok_json(d: dict, path: str | os.PathLike) -> Path:
    """Writes a tiktoken JSON dict (such as `train_tok_json`'s) to `path` after checking it as
    `grokscope.Tokenizer` would read it; returns the path.

    Raises:
      TokenizerError: the dict is not a valid tiktoken JSON tokenizer (nothing is written).
    """
    path = Path(path)
    parse_tok_json(d, path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d), encoding="utf-8")
    os.replace(tmp, path)
    return path
