"""Text to token ids and back (chapter 2).

A model reads numbers, not text. This module builds up the tokenizers a GPT uses:

- `WordTokenizer`: the first idea, words and punctuation as tokens from a fixed vocabulary,
  with `<|unk|>` for anything unseen. Simple, and stuck on every word it never saw.
- `BPETokenizer`: byte-level byte-pair encoding, GPT-2's answer. Start from the 256 byte
  values (so any text can be encoded), then repeatedly merge the most frequent adjacent
  pair of tokens into a new token. Trained here from scratch, or loaded from GPT-2's
  published files, in which case it encodes exactly like tiktoken's "gpt2".
- `GPT2Tokenizer`: the same GPT-2 encoding through tiktoken (fast, written in Rust).
- `CharTokenizer`: one token per character of the training text.

The three a run can use (BPE, tiktoken, characters) share a small interface: `encode(text,
allowed_special=..., disallowed_special=...)`, `decode`, `vocab_size`, `eos_id`, `name` and
`spec()`, a JSON-able description from which `tokenizer_from_spec` rebuilds them.
`WordTokenizer` is for the chapter only: `encode`, `decode` and `vocab_size`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import regex
from tqdm.auto import tqdm

from minigpt.config import TOKENIZERS, ConfigError, did_you_mean
from minigpt.download import cache_dir, download_file

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"

# GPT-2's pre-tokenization: text is first cut into chunks (contractions, runs of letters
# with one leading space, runs of digits, runs of other symbols, whitespace), and merges
# never cross a chunk boundary. So " dog" and " dog." share the token " dog".
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same pattern for ASCII text, where a letter is A-Z or a-z, a number 0-9, and whitespace one
# of " \t\n\v\f\r": no Unicode classes, so Python's built-in `re`, faster than `regex`, can run it.
# It cuts ASCII text into the same chunks (a test checks it).
_SPACE, _NOT_SPACE = r"[\t\n\x0b\x0c\r ]", r"[^\t\n\x0b\x0c\r ]"
GPT2_ASCII_SPLIT = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"""
                              rf"""|{_SPACE}+(?!{_NOT_SPACE})|{_SPACE}+""")


# ---------------------------------------------------------------------------------------
# The first idea: a vocabulary of words
# ---------------------------------------------------------------------------------------

class WordTokenizer:
    """Words and punctuation marks as tokens, from a vocabulary built out of one text.

    Words the vocabulary lacks become `<|unk|>`; `<|endoftext|>` separates documents.
    It shows why real tokenizers work on bytes: anything new is lost.
    """

    name = "word"
    SPLIT = regex.compile(r'([,.:;?_!"()\']|--|\s)')

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self._id_of = {token: i for i, token in enumerate(self.vocab)}
        if len(self._id_of) != len(self.vocab) or UNKNOWN not in self._id_of:
            raise ValueError(f"the vocabulary must hold distinct tokens, {UNKNOWN!r} among them.")
        self.vocab_size = len(self.vocab)
        self.eos_id = self._id_of.get(END_OF_TEXT)

    @classmethod
    def split(cls, text: str) -> list[str]:
        """Cut text at whitespace and punctuation, keeping the punctuation as tokens."""
        return [piece for piece in cls.SPLIT.split(text) if piece.strip()]

    @classmethod
    def from_text(cls, text: str) -> "WordTokenizer":
        return cls(sorted(set(cls.split(text))) + [END_OF_TEXT, UNKNOWN])

    def encode(self, text: str) -> list[int]:
        unknown = self._id_of[UNKNOWN]
        return [self._id_of.get(word, unknown) for word in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        text = " ".join(self.vocab[i] for i in ids)
        return regex.sub(r'\s+([,.:;?!"()\'])', r"\1", text)  # no space before punctuation


# ---------------------------------------------------------------------------------------
# Byte-pair encoding: two helpers and two trainers
# ---------------------------------------------------------------------------------------

def count_pairs(ids: list[int], counts: dict[tuple[int, int], int] | None = None,
                weight: int = 1) -> dict[tuple[int, int], int]:
    """How often each adjacent pair occurs in `ids` (added, `weight` times, to `counts`)."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def find_chunks(text: str, pattern: regex.Pattern) -> list[str]:
    """`pattern.findall(text)`; ASCII text and GPT-2's pattern go through its ASCII twin."""
    if pattern.pattern == GPT2_SPLIT_PATTERN and text.isascii():
        return GPT2_ASCII_SPLIT.findall(text)
    return pattern.findall(text)


def split_into_chunks(text: str, pattern: str = GPT2_SPLIT_PATTERN,
                      special_tokens: Iterable[str] = ()) -> list[str]:
    """Pre-tokenize: special tokens removed, the rest cut into chunks that merges never cross."""
    specials = sorted(special_tokens, key=len, reverse=True)
    pieces = regex.split("|".join(map(regex.escape, specials)), text) if specials else [text]
    compiled = regex.compile(pattern)
    return [chunk for piece in pieces for chunk in find_chunks(piece, compiled)]


def split_isolated(text: str, pattern: regex.Pattern) -> list[str]:
    """Cut `text` at `pattern`'s matches, keeping each match and each stretch between them as a
    piece: what Hugging Face's Split pre-tokenizer calls "Isolated". For GPT-2's pattern, which
    matches every character, this is the list of matches."""
    if pattern.pattern == GPT2_SPLIT_PATTERN:
        return find_chunks(text, pattern)  # it matches every character: nothing lies between matches
    pieces, end = [], 0
    for match in pattern.finditer(text):
        if match.start() > end:
            pieces.append(text[end:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        end = match.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def merge_priority(pair: tuple[int, int], count: int, token_bytes: list[bytes]) -> tuple:
    """The pair with the greatest priority merges next: the most frequent; ties go to the
    greatest pair of byte strings (then of ids), so training is deterministic and trainers agree."""
    return count, token_bytes[pair[0]], token_bytes[pair[1]], pair


def learn_merges_naive(chunks: list[str], num_merges: int) -> list[tuple[int, int]]:
    """The readable trainer: after every merge, count every pair in the whole text again.

    Cost: corpus size x merges. Kept as the reference the fast trainer is tested against.
    """
    pieces = [list(chunk.encode("utf-8")) for chunk in chunks]
    token_bytes = [bytes([b]) for b in range(256)]
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids in pieces:
            count_pairs(ids, counts)
        if not counts:
            break
        best = max(counts, key=lambda pair: merge_priority(pair, counts[pair], token_bytes))
        pieces = [merge_pair(ids, best, new_id) for ids in pieces]
        merges.append(best)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
    return merges


_COMPLEMENT = bytes(range(255, -1, -1))  # byte b -> 255 - b
_MAX_VOCAB = 0x110000  # the fast trainer writes token ids as characters: at most Unicode's 1,114,112


def reversed_order_key(data: bytes) -> str:
    """A key that sorts byte strings the other way round (b"b" before b"a", b"ab" before b"a"):
    each byte complemented, then a character above them all. Python's heap pops its smallest
    entry, and the fast trainer wants the greatest byte strings first."""
    return data.translate(_COMPLEMENT).decode("latin-1") + "\u0100"


def heap_entry(pair: str, count: int, order_keys: list[str]) -> tuple:
    """The fast trainer's heap entry for `pair` (two tokens, one character each): `merge_priority`
    turned around, so that the smallest entry is the pair that merges first; the pair last."""
    left, right = ord(pair[0]), ord(pair[1])
    return -count, order_keys[left], order_keys[right], -left, -right, pair


def count_chunk_pairs(chunks: list[str], freqs: list[int]) -> tuple[dict[str, int], dict[str, set[int]]]:
    """Each adjacent pair's count (chunk i counted `freqs[i]` times), and the chunks that hold it."""
    pair_counts: dict[str, int] = defaultdict(int)
    where: dict[str, set[int]] = defaultdict(set)
    for c, chunk in enumerate(chunks):
        for i in range(len(chunk) - 1):
            pair = chunk[i:i + 2]
            pair_counts[pair] += freqs[c]
            where[pair].add(c)
    return pair_counts, where


def merge_everywhere(pair: str, new_token: str, chunks: list[str], freqs: list[int],
                     pair_counts: dict[str, int], where: dict[str, set[int]]) -> list[str]:
    """Merge `pair` into `new_token` in every chunk that holds it, and update the pair counts
    where the chunk changes: an occurrence with x on its left turns (x, a) into (x, new), one
    with y on its right turns (b, y) into (new, y). Returns the new pairs (those with new_token)."""
    made: dict[str, set[int]] = defaultdict(set)
    for c in where.pop(pair):
        chunk, freq = chunks[c], freqs[c]
        at, end = chunk.find(pair), -1  # end: where the occurrence before this one ended
        if at < 0:
            continue  # an earlier merge took the pair from this chunk
        while at >= 0:
            if at > 0:  # x is the new token itself when the occurrence before ends here ("abab")
                pair_counts[chunk[at - 1:at + 1]] -= freq
                left = (new_token if at == end else chunk[at - 1]) + new_token
                pair_counts[left] += freq
                made[left].add(c)
            end = at + 2
            if end < len(chunk) and not chunk.startswith(pair, end):  # (if it does, see the line above)
                pair_counts[chunk[end - 1:end + 1]] -= freq
                right = new_token + chunk[end]
                pair_counts[right] += freq
                made[right].add(c)
            at = chunk.find(pair, end)
        chunks[c] = chunk.replace(pair, new_token)  # left to right, like merge_pair
    del pair_counts[pair]
    where.update(made)  # pairs with the new token are new: no chunk held them before
    return list(made)


def learn_merges(chunk_counts: dict[str, int], num_merges: int, progress: bool = True) -> list[tuple[int, int]]:
    """The fast trainer: the same merges as `learn_merges_naive`, without recounting.

    Three ideas make it scale with the corpus rather than corpus x merges:
    1. each distinct chunk is stored once with its frequency (" the" occurs thousands of times);
    2. pair counts are kept up to date: a merge only touches the chunks that contain the pair
       (`where` remembers them), and in them only the pairs beside each occurrence;
    3. a heap finds the most frequent pair. Counts only fall, except for pairs with the new
       token, so an entry whose count went stale is fixed when it reaches the top.
    A chunk is kept as a string with one character per token, the character's number being the
    token's id (bytes read as Latin-1 are characters 0..255), so that Python's `str.find` and
    `str.replace` find and merge a pair, in C.
    """
    chunks = [chunk.encode("utf-8").decode("latin-1") for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts, where = count_chunk_pairs(chunks, freqs)
    token_bytes = [bytes([b]) for b in range(256)]
    order_keys = [reversed_order_key(data) for data in token_bytes]
    heap = [heap_entry(pair, count, order_keys) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    for new_id in tqdm(range(256, 256 + num_merges), desc="training BPE", unit="merge",
                       disable=not progress, delay=1.0, leave=False):
        best = None
        while heap:
            entry = heapq.heappop(heap)
            pair, current = entry[-1], pair_counts.get(entry[-1], 0)
            if -entry[0] == current:
                best = pair
                break
            if current > 0:  # stale: the pair lost occurrences since this entry was pushed
                heapq.heappush(heap, heap_entry(pair, current, order_keys))
        if best is None:
            break  # every chunk is a single token: nothing left to merge
        left, right = ord(best[0]), ord(best[1])
        merges.append((left, right))
        token_bytes.append(token_bytes[left] + token_bytes[right])
        order_keys.append(reversed_order_key(token_bytes[-1]))
        for pair in merge_everywhere(best, chr(new_id), chunks, freqs, pair_counts, where):
            heapq.heappush(heap, heap_entry(pair, pair_counts[pair], order_keys))
    return merges


# ---------------------------------------------------------------------------------------
# GPT-2's byte-to-character table (how its files write bytes as text)
# ---------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's files store tokens as text, one printable character per byte: bytes that are
    printable Latin-1 characters stand for themselves; the other 68 (controls, space,
    non-breaking space, soft hyphen) are moved to characters 256, 257, ... in byte order.
    So the space byte 32 is written 'Ġ' (chr(288)) and a token " the" is "Ġthe"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# ---------------------------------------------------------------------------------------
# Special tokens, shared by the BPE and tiktoken tokenizers
# ---------------------------------------------------------------------------------------

def resolve_special_tokens(text: str, special_tokens: Iterable[str], allowed_special, disallowed_special) -> set[str]:
    """The special tokens to encode as single tokens; raises if `text` holds a disallowed one.

    Same rules as tiktoken: by default no special token is allowed, and text that contains
    one raises, because a user's text that merely mentions "<|endoftext|>" must not end a
    document by accident. `allowed_special="all"` allows every special token;
    `disallowed_special=()` encodes unallowed ones as ordinary text instead of raising.
    """
    specials = set(special_tokens)
    allowed = specials if allowed_special == "all" else set(allowed_special)
    unknown = allowed - specials
    if unknown:
        raise ConfigError(f"allowed_special names {sorted(unknown)}, which this tokenizer does not "
                          f"have as special tokens; it has {sorted(specials) or 'none'}.")
    disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
    if disallowed:
        found = regex.search("|".join(map(regex.escape, sorted(disallowed))), text)
        if found:
            raise ConfigError(
                f"the text contains the special token {found.group()!r} (at character "
                f"{found.start()}), which is not allowed here. Pass allowed_special="
                f"{{{found.group()!r}}} (or 'all') to encode it as its one special token, or "
                "disallowed_special=() to encode it as ordinary text.")
    return allowed


def encode_around_specials(text: str, allowed: set[str], special_tokens: dict[str, int],
                           encode_ordinary: Callable[[str], list[int]]) -> list[int]:
    """Each allowed special token in `text` as its one id, the text between them by `encode_ordinary`."""
    if not allowed:
        return encode_ordinary(text)
    ids = []
    # Capturing the specials in the split keeps them: even items are text, odd are specials.
    specials = "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True)))
    for i, piece in enumerate(regex.split(f"({specials})", text)):
        ids.extend([special_tokens[piece]] if i % 2 else encode_ordinary(piece))
    return ids


# ---------------------------------------------------------------------------------------
# The byte-level BPE tokenizer
# ---------------------------------------------------------------------------------------

BPE_FILE_VERSION = "minigpt-bpe v1"
_CACHE_LIMIT = 200_000  # chunks remembered by `encode`


class BPETokenizer:
    """Byte-level BPE: byte tokens, an ordered list of merges, and special tokens.

    `merges` maps a pair of token ids to the id of the token that replaces it, in the order
    the merges were learned: encoding applies them in that order (earliest first). For a
    trained tokenizer the bytes have ids 0..255 and the merges 256, 257, ...; GPT-2's files
    number the bytes differently, which `byte_ids` records.

    Before the merges, text is cut into chunks by `pattern` (GPT-2's by default), or by several
    patterns in turn, each cutting the pieces of the one before (SmolLM's tokenizer first sets
    every digit apart, then applies GPT-2's); `normalization` ("NFC", ...) is a Unicode form the
    text takes first (Qwen2's tokenizer uses NFC); with `ignore_merges`, a chunk that is a token
    as a whole is that token, whatever the merges would make of it (Llama 3's tokenizer). All
    three are what tokenizers made elsewhere need.
    """

    name = "bpe"

    def __init__(self, merges: dict[tuple[int, int], int], special_tokens: dict[str, int] | None = None,
                 pattern: str | list[str] = GPT2_SPLIT_PATTERN, byte_ids: list[int] | None = None,
                 source: str | None = None, normalization: str | None = None, ignore_merges: bool = False) -> None:
        self.merges = dict(merges)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.normalization = normalization
        self.ignore_merges = ignore_merges
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        self.source = source  # "gpt2" when loaded from GPT-2's files
        self.vocab = self._build_vocab()  # id -> the bytes it stands for
        self.vocab_size = len(self.vocab)
        self.eos_id = self.special_tokens.get(END_OF_TEXT)
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._merged = list(self.merges.values())  # rank -> the id its merge makes
        self._splits = [regex.compile(p) for p in ([pattern] if isinstance(pattern, str) else pattern)]
        self._cache: dict[str, list[int]] = {}
        specials = set(self.special_tokens.values())
        self._whole = {token: i for i, token in self.vocab.items() if i not in specials} if ignore_merges else {}

    def _build_vocab(self) -> dict[int, bytes]:
        """Every id's bytes, checking that the ids are 0..N-1, each used once."""
        if len(self.byte_ids) != 256 or len(set(self.byte_ids)) != 256:
            raise ConfigError("invalid BPE tokenizer: byte_ids must give 256 distinct ids.")
        vocab = {token_id: bytes([b]) for b, token_id in enumerate(self.byte_ids)}
        for (left, right), new_id in self.merges.items():
            if left not in vocab or right not in vocab:
                raise ConfigError(f"invalid BPE tokenizer: merge ({left}, {right}) -> {new_id} uses "
                                  "a token that no earlier line defines.")
            if new_id in vocab:
                raise ConfigError(f"invalid BPE tokenizer: token id {new_id} is defined twice.")
            vocab[new_id] = vocab[left] + vocab[right]
        for token, token_id in self.special_tokens.items():
            if not token or token_id in vocab:
                raise ConfigError(f"invalid BPE tokenizer: special token {token!r} has id {token_id}, "
                                  "which is already used (or the token is empty).")
            vocab[token_id] = token.encode("utf-8")
        if set(vocab) != set(range(len(vocab))):
            raise ConfigError(f"invalid BPE tokenizer: the {len(vocab)} token ids must be "
                              f"0..{len(vocab) - 1} with no gaps.")
        return vocab

    # -- training --------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (END_OF_TEXT,),
              pattern: str = GPT2_SPLIT_PATTERN, algorithm: str = "fast",
              progress: bool = True) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`.

        Special tokens get the last ids. `algorithm="naive"` uses the readable trainer that
        recounts every pair after every merge (same result, much slower).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        smallest = 256 + len(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not smallest <= vocab_size <= _MAX_VOCAB:
            raise ConfigError(f"vocab_size must be a whole number of at least {smallest} (256 byte tokens + "
                              f"{len(special_tokens)} special) and at most {_MAX_VOCAB:,}, got {vocab_size!r}.")
        if algorithm not in ("fast", "naive"):
            raise ConfigError(f"algorithm must be 'fast' or 'naive', got {algorithm!r}.")
        num_merges = vocab_size - smallest
        chunks = split_into_chunks(text, pattern, special_tokens)
        if algorithm == "fast":
            pairs = learn_merges(Counter(chunks), num_merges, progress=progress)
        else:
            pairs = learn_merges_naive(chunks, num_merges)
        if len(pairs) < num_merges:
            raise ConfigError(
                f"the text is too short for a vocabulary of {vocab_size}: after {len(pairs)} merges "
                "every chunk is a single token. Lower the vocabulary size to at most "
                f"{smallest + len(pairs)}, or train on more text.")
        merges = {pair: 256 + i for i, pair in enumerate(pairs)}
        specials = {token: 256 + num_merges + i for i, token in enumerate(special_tokens)}
        return cls(merges, specials, pattern)

    # -- encoding and decoding ---------------------------------------------------------

    def encode_chunk(self, chunk: str) -> list[int]:
        """BPE on one chunk: apply the earliest-learned merge present (the leftmost, if it occurs
        twice) until none applies. `ranks[i]` is the rank of the pair (ids[i], ids[i + 1]), so a
        merge only looks up the two pairs beside it, and `min` and `index` search in C."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        data = chunk.encode("utf-8")
        ids = [self._whole[data]] if data in self._whole else [self.byte_ids[b] for b in data]
        no_merge = len(self._merged)  # the rank of a pair that is no merge: after every real one
        ranks = [self._ranks.get(pair, no_merge) for pair in zip(ids, ids[1:])]
        while ranks:
            rank = min(ranks)
            if rank == no_merge:
                break
            i = ranks.index(rank)
            new_id = self._merged[rank]
            ids[i:i + 2] = [new_id]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = self._ranks.get((ids[i - 1], new_id), no_merge)
            if i < len(ranks):
                ranks[i] = self._ranks.get((new_id, ids[i + 1]), no_merge)
        if len(self._cache) >= _CACHE_LIMIT:  # full: forget the older half (dicts keep insertion order)
            for old in list(itertools.islice(self._cache, _CACHE_LIMIT // 2)):
                del self._cache[old]
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special tokens as plain text. Natural text repeats its chunks (" the"),
        so most are found in the cache of chunks already encoded."""
        ids, cache = [], self._cache
        for chunk in self.pre_tokenize(_replace_lone_surrogates(text)):
            ids.extend(cache.get(chunk) or self.encode_chunk(chunk))
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The chunks merges never cross: the text normalized, then cut by each pattern in turn."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        pieces = split_isolated(text, self._splits[0])
        for split in self._splits[1:]:
            pieces = [chunk for piece in pieces for chunk in split_isolated(piece, split)]
        return pieces

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset(),
               disallowed_special: Iterable[str] | str = "all") -> list[int]:
        """Text to token ids; special tokens follow tiktoken's rules (see `resolve_special_tokens`)."""
        text = _replace_lone_surrogates(text)
        allowed = resolve_special_tokens(text, self.special_tokens, allowed_special, disallowed_special)
        return encode_around_specials(text, allowed, self.special_tokens, self.encode_ordinary)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as err:
            raise ConfigError(f"token id {err.args[0]} is not in this tokenizer's vocabulary "
                              f"(ids 0..{self.vocab_size - 1}).") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids to text. A cut through a multi-byte character becomes '\ufffd'."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- saving and loading ------------------------------------------------------------

    def to_text(self) -> str:
        """The tokenizer as a human-readable text file (see `save`)."""
        byte_ids = "identity" if self.byte_ids == list(range(256)) else " ".join(map(str, self.byte_ids))
        lines = [BPE_FILE_VERSION,
                 "# A byte-level BPE tokenizer saved by minigpt (minigpt/tokenizer.py). Tab-separated.",
                 "# bytes: the ids of bytes 0..255. merge NEW LEFT RIGHT: tokens LEFT RIGHT side by",
                 "# side become NEW, in this order; the quoted text is for reading only.",
                 f"pattern\t{json.dumps(self.pattern)}",
                 f"bytes\t{byte_ids}"]
        lines += [f"normalize\t{self.normalization}"] if self.normalization else []
        lines += ["ignore_merges\ttrue"] if self.ignore_merges else []
        lines += [f"special\t{token_id}\t{json.dumps(token)}" for token, token_id in self.special_tokens.items()]
        for (left, right), new_id in self.merges.items():
            readable = self.vocab[new_id].decode("utf-8", errors="backslashreplace")
            lines.append(f"merge\t{new_id}\t{left}\t{right}\t{json.dumps(readable, ensure_ascii=False)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, where: str = "the tokenizer text") -> "BPETokenizer":
        """Parse what `to_text` wrote; errors name the line that is wrong."""
        lines = text.splitlines()
        if not lines or lines[0].strip() != BPE_FILE_VERSION:
            first = lines[0][:60] if lines else ""
            raise ConfigError(f"{where} is not a minigpt BPE tokenizer file: its first line is "
                              f"{first!r}, expected {BPE_FILE_VERSION!r}. Give a file written by "
                              "BPETokenizer.save (e.g. a run directory's tokenizer.bpe).")
        pattern, byte_ids, specials, merges, normalization, whole = GPT2_SPLIT_PATTERN, None, {}, {}, None, False
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            try:
                if fields[0] == "pattern":
                    pattern = json.loads(fields[1])
                    for one in [pattern] if isinstance(pattern, str) else pattern:
                        regex.compile(one)
                elif fields[0] == "normalize":
                    unicodedata.normalize(fields[1], "")  # an unknown form raises ValueError
                    normalization = fields[1]
                elif fields[0] == "ignore_merges":
                    whole = fields[1] == "true"
                elif fields[0] == "bytes":
                    byte_ids = None if fields[1] == "identity" else [int(x) for x in fields[1].split()]
                elif fields[0] == "special":
                    specials[json.loads(fields[2])] = int(fields[1])
                elif fields[0] == "merge":
                    merges[(int(fields[2]), int(fields[3]))] = int(fields[1])
                else:
                    raise ValueError(f"unknown line kind {fields[0]!r}")
            except (IndexError, ValueError, regex.error) as err:
                raise ConfigError(f"{where}, line {number}: cannot read {line[:60]!r} ({err}); "
                                  "the file is corrupt. Save the tokenizer again.") from None
        try:
            return cls(merges, specials, pattern, byte_ids, normalization=normalization, ignore_merges=whole)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err} The file is corrupt; save the tokenizer again.") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no tokenizer file at {path}; check the path (a run directory's "
                              "tokenizer.bpe, or a file written by BPETokenizer.save).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a minigpt BPE tokenizer file (it is not UTF-8 text).") from None
        return cls.from_text(text, where=str(path))

    # -- GPT-2's published vocabulary ----------------------------------------------------

    @classmethod
    def from_gpt2(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> "BPETokenizer":
        """GPT-2's tokenizer from its two published files.

        encoder.json maps each token, written with `bytes_to_unicode`, to its id; vocab.bpe
        lists the 50,000 merges in the order they were learned, one "left right" per line.
        """
        return cls.from_vocab_files(encoder_json, vocab_bpe, source="gpt2")

    @classmethod
    def from_vocab_files(cls, vocab_json: str | Path, merges_txt: str | Path,
                         source: str | None = None) -> "BPETokenizer":
        """A byte-level BPE from a vocabulary (token -> id, each token written with
        `bytes_to_unicode`) and its merges in order: GPT-2's encoder.json and vocab.bpe, or the
        vocab.json and merges.txt a Hugging Face byte-level BPE saves. A token that is neither a
        byte nor a merge's result (such as "<|endoftext|>") is a special token."""
        try:
            encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            merge_lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not read the BPE files {vocab_json} and {merges_txt} "
                              f"({type(err).__name__}: {err}); give the right paths, or download them again.") from None
        pairs = [line.split(" ") for line in merge_lines if line.strip() and not line.startswith("#version")]
        return cls.from_vocab(encoder, pairs, f"the BPE files {vocab_json}, {merges_txt}", source=source)

    @classmethod
    def from_vocab(cls, encoder: dict[str, int], pairs: Iterable[Iterable[str]], where: str,
                   **options: Any) -> "BPETokenizer":
        """A byte-level BPE from its vocabulary (token text -> id) and its merges as pairs of token
        texts, in order; `options` go to the constructor (source, pattern, normalization ...)."""
        char_of = bytes_to_unicode()
        try:
            byte_ids = [encoder[char_of[b]] for b in range(256)]
            merges = {}
            for pair in pairs:
                left, right = pair
                merges[(encoder[left], encoder[right])] = encoder[left + right]
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{where} do not fit together ({err!r} is missing or malformed): every byte and "
                              "every merge's two sides and result must be in the vocabulary, written the way "
                              "GPT-2's files write bytes. Give a vocabulary and the merges saved with it.") from None
        made = set(byte_ids) | set(merges.values())
        specials = {token: token_id for token, token_id in encoder.items() if token_id not in made}
        return cls(merges, specials, byte_ids=byte_ids, **options)

    def with_special_tokens(self, tokens: Iterable[str]) -> "BPETokenizer":
        """This tokenizer plus new special tokens (ids after the last one), e.g. a chat format's
        `<|user|>` and `<|assistant|>` (chapter 7). Tokens it already has keep their ids."""
        specials = dict(self.special_tokens)
        for token in tokens:
            specials.setdefault(token, self.vocab_size + len(specials) - len(self.special_tokens))
        return BPETokenizer(self.merges, specials, self.pattern, self.byte_ids, self.source, self.normalization,
                            self.ignore_merges)

    def spec(self) -> dict[str, Any]:
        """GPT-2's vocabulary is named (its files are cached); any other BPE is stored whole."""
        if self.source == "gpt2":
            extra = [token for token in self.special_tokens if token != END_OF_TEXT]
            return {"name": self.name, "source": "gpt2", **({"special_tokens": extra} if extra else {})}
        return {"name": self.name, "saved": self.to_text()}


def _replace_lone_surrogates(text: str) -> str:
    """Python strings may hold unpaired surrogates, which UTF-8 cannot store; like tiktoken,
    pair up the ones that form a character and turn the rest into U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# GPT-2's files as OpenAI publishes them, with their SHA-256 (the hashes tiktoken checks too).
GPT2_FILES = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


# ... and the same two files as they ship inside minigpt (assets/gpt2, with their license), so
# that GPT-2's tokenizer never needs a network.
GPT2_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"


def gpt2_files() -> tuple[Path, Path]:
    """The copies of GPT-2's encoder.json and vocab.bpe that ship with minigpt."""
    return GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"


def download_gpt2_files(directory: str | Path | None = None,
                        base_url: str | None = None) -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe, downloaded once into `directory` (default
    <cache>/gpt2) and checked against their SHA-256. `base_url` replaces OpenAI's address."""
    directory = Path(directory) if directory is not None else cache_dir() / "gpt2"
    paths = []
    for filename, (url, sha256) in GPT2_FILES.items():
        if base_url is not None:
            url = f"{base_url.rstrip('/')}/{filename}"
        paths.append(download_file(url, directory / filename, sha256=sha256))
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------
# GPT-2 through tiktoken, and characters
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's "gpt2" encoding, built from the files that ship with minigpt (no download, no
    cache): each token's id in encoder.json is its merge rank, which is what tiktoken reads.
    The split pattern is tiktoken's own for GPT-2."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    encoder = json.loads(gpt2_files()[0].read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[char] for char in token): rank for token, rank in encoder.items() if token != END_OF_TEXT}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: encoder[END_OF_TEXT]}, explicit_n_vocab=len(encoder))


class GPT2Tokenizer:
    """GPT-2's tokenizer through tiktoken (Rust, fast), built from the files minigpt ships."""

    name = "gpt2"

    def __init__(self, special_tokens: Iterable[str] = ()) -> None:
        """`special_tokens`: extra ones after GPT-2's 50,257 tokens (ids 50257, 50258, ...)."""
        import tiktoken

        encoding = gpt2_encoding()
        self.extra_special_tokens = [t for t in dict.fromkeys(special_tokens) if t != END_OF_TEXT]
        if self.extra_special_tokens:
            # tiktoken builds an encoding from GPT-2's merges plus any special tokens we name.
            added = {token: encoding.n_vocab + i for i, token in enumerate(self.extra_special_tokens)}
            encoding = tiktoken.Encoding(name="gpt2+" + ",".join(added), pat_str=encoding._pat_str,
                                         mergeable_ranks=encoding._mergeable_ranks,
                                         special_tokens={**encoding._special_tokens, **added})
        self._encoding = encoding
        self.special_tokens = {token: encoding.encode_single_token(token) for token in encoding.special_tokens_set}
        self.vocab_size = self._encoding.n_vocab  # 50257, plus the extra special tokens
        self.eos_id = self._encoding.eot_token    # 50256, "<|endoftext|>"

    def with_special_tokens(self, tokens: Iterable[str]) -> "GPT2Tokenizer":
        """GPT-2's tokenizer plus new special tokens (see `BPETokenizer.with_special_tokens`)."""
        return GPT2Tokenizer(self.extra_special_tokens + list(tokens))

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset(),
               disallowed_special: Iterable[str] | str = "all") -> list[int]:
        allowed = resolve_special_tokens(text, self._encoding.special_tokens_set, allowed_special,
                                   disallowed_special)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        extra = self.extra_special_tokens
        return {"name": self.name, **({"special_tokens": extra} if extra else {})}


class CharTokenizer:
    """One token per character: the vocabulary is the sorted set of characters seen."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("CharTokenizer needs a non-empty string of distinct characters.")
        self.chars = chars
        self.vocab_size = len(chars)
        self.eos_id = None  # no end-of-text token: the vocabulary is only the characters
        self._id_of = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str, allowed_special: Any = None, disallowed_special: Any = None) -> list[int]:
        """Every character is ordinary here (there are no special tokens)."""
        try:
            return [self._id_of[ch] for ch in text]
        except KeyError as err:
            raise ConfigError(
                f"character {err.args[0]!r} does not occur in the text this character-level "
                "tokenizer was built from, so it has no token for it: use only characters of that text, "
                "or train with --tokenizer gpt2, which can encode any text.") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def with_special_tokens(self, tokens: Iterable[str]) -> "CharTokenizer":
        raise ConfigError(f"the character tokenizer has no special tokens, so it cannot add {list(tokens)}; "
                          "use prompt_style 'alpaca' (plain text), or --tokenizer gpt2.")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


# ---------------------------------------------------------------------------------------
# A vocabulary from elsewhere: data tokenized by another tool
# ---------------------------------------------------------------------------------------

# Names under which vocabularies write their end-of-text and unknown tokens.
END_OF_TEXT_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
UNKNOWN_NAMES = ("<unk>", "[UNK]", UNKNOWN)
# Tokens that stand for a control signal rather than text: <s>, </s>, <|endoftext|>, [CLS] ...
SPECIAL_TOKEN = regex.compile(r"<\|?/?[\w.-]+\|?>|\[[A-Z]+\]")
SENTENCEPIECE_SPACE = "\u2581"  # "▁"
SENTENCEPIECE_BYTE = regex.compile(r"<0x([0-9A-Fa-f]{2})>")


def vocabulary_style(tokens: Iterable[str]) -> str:
    """How a vocabulary writes text: "byte-level" (each character stands for a byte, a space is
    "Ġ": GPT-2 and its kin), "sentencepiece" (a space is "▁", raw bytes are "<0x0A>": Llama and
    its kin), or "word" (whole words, written between spaces)."""
    tokens = [t for t in tokens if t is not None]
    if any(SENTENCEPIECE_SPACE in t for t in tokens):
        return "sentencepiece"
    byte_chars = set(bytes_to_unicode().values())
    if any("\u0120" in t for t in tokens) and all(set(t) <= byte_chars for t in tokens):
        return "byte-level"
    return "word"


class VocabTokenizer:
    """The vocabulary of a corpus tokenized by another tool: a Hugging Face `vocab.json`
    (token -> id) beside pre-tokenized data.

    The ids in the data are the truth, and `decode` turns them back into text exactly, the way
    the vocabulary writes it (`vocabulary_style`). New text (a prompt) is encoded by longest
    match against the vocabulary: close to the tool that made the data, not always the same.
    (With its merges.txt beside it, a byte-level vocabulary is rebuilt exactly as a
    `BPETokenizer` instead: `BPETokenizer.from_vocab_files`.)
    """

    name = "vocab"

    def __init__(self, tokens: list[str | None], style: str | None = None) -> None:
        """`tokens[i]` is the token of id i (None for an id the vocabulary leaves unused)."""
        self.tokens = list(tokens)
        self.style = style or vocabulary_style(self.tokens)
        self.vocab_size = len(self.tokens)
        self._id_of = {token: i for i, token in enumerate(self.tokens) if token is not None}
        self.special_tokens = {t: i for t, i in self._id_of.items()
                               if SPECIAL_TOKEN.fullmatch(t) and not SENTENCEPIECE_BYTE.fullmatch(t)}
        self.eos_id = next((self._id_of[t] for t in END_OF_TEXT_NAMES if t in self._id_of), None)
        self.unk_id = next((self._id_of[t] for t in UNKNOWN_NAMES if t in self._id_of), None)
        self._longest = max(map(len, self._id_of))
        self._char_of = bytes_to_unicode()
        self._byte_of = {char: byte for byte, char in self._char_of.items()}

    @classmethod
    def from_vocab_json(cls, path: str | Path) -> "VocabTokenizer":
        """Read a vocab.json: one JSON object mapping each token to a distinct id >= 0."""
        try:
            vocab = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not read the vocabulary {path} ({type(err).__name__}: {err}); a "
                              'vocab.json is one JSON object, {"token": id, ...}.') from None
        if not isinstance(vocab, dict) or not vocab or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
            raise ConfigError(f'{path} is not a vocabulary: a vocab.json is one JSON object {{"token": id, ...}} '
                              "whose ids are whole numbers >= 0.")
        tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
        for token, token_id in vocab.items():
            if tokens[token_id] is not None:
                raise ConfigError(f"{path} gives id {token_id} to both {tokens[token_id]!r} and {token!r}; "
                                  "each id must name one token.")
            tokens[token_id] = token
        return cls(tokens)

    # -- decoding: exact ---------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        pieces = []
        for i in ids:
            token = self.tokens[int(i)] if 0 <= int(i) < self.vocab_size else None
            if token is None:
                raise ConfigError(f"token id {int(i)} is not in this vocabulary (ids 0..{self.vocab_size - 1}, "
                                  "some unused).")
            pieces.append(self._token_bytes(token))
        if self.style == "word":
            return b" ".join(pieces)
        return b"".join(pieces)

    def _token_bytes(self, token: str) -> bytes:
        if token in self.special_tokens or self.style == "word":
            return token.encode("utf-8")
        if self.style == "byte-level":
            return bytes(self._byte_of[char] for char in token)
        byte = SENTENCEPIECE_BYTE.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- encoding: longest match -------------------------------------------------------

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset(),
               disallowed_special: Iterable[str] | str = "all") -> list[int]:
        """Text to ids by longest match; special tokens follow tiktoken's rules (`resolve_special_tokens`)."""
        allowed = resolve_special_tokens(text, self.special_tokens, allowed_special, disallowed_special)
        return encode_around_specials(text, allowed, self.special_tokens, self.encode_ordinary)

    def encode_ordinary(self, text: str) -> list[int]:
        if self.style == "word":
            return [self._word_id(word) for word in text.split()]
        if self.style == "byte-level":
            text = "".join(self._char_of[b] for b in text.encode("utf-8"))
        else:  # SentencePiece writes spaces as "▁" and starts the text with one
            text = SENTENCEPIECE_SPACE + text.replace(" ", SENTENCEPIECE_SPACE) if text else text
        ids, start = [], 0
        while start < len(text):
            end = min(len(text), start + self._longest)
            while end > start and text[start:end] not in self._id_of:
                end -= 1
            if end > start:
                ids.append(self._id_of[text[start:end]])
                start = end
            else:  # no token starts with this character
                ids.extend(self._unknown(text[start]))
                start += 1
        return ids

    def _word_id(self, word: str) -> int:
        if word in self._id_of:
            return self._id_of[word]
        if self.unk_id is not None:
            return self.unk_id
        raise ConfigError(f"the word {word!r} is not in this vocabulary, which has no unknown token; use "
                          "only words of the data's vocab.json.")

    def _unknown(self, char: str) -> list[int]:
        """A character no token covers: SentencePiece's byte tokens, else the unknown token."""
        byte_ids = [self._id_of.get(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        if None not in byte_ids:
            return byte_ids
        if self.unk_id is not None:
            return [self.unk_id]
        raise ConfigError(f"character {char!r} has no token in this vocabulary (and it has no unknown "
                          "token); use only characters of the data.")

    def with_special_tokens(self, tokens: Iterable[str]) -> "VocabTokenizer":
        """This vocabulary plus new special tokens at the end (a chat format's); tokens it has keep their ids."""
        added = [t for t in dict.fromkeys(tokens) if t not in self._id_of]
        tokenizer = VocabTokenizer(self.tokens + added, self.style)
        tokenizer.special_tokens.update({t: tokenizer._id_of[t] for t in tokens})
        return tokenizer

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": self.tokens, "style": self.style,
                "special_tokens": sorted(self.special_tokens)}


# ---------------------------------------------------------------------------------------
# SentencePiece's BPE: the tokenizer of Llama 2 and TinyLlama
# ---------------------------------------------------------------------------------------

def merge_by_rank(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Join adjacent symbols, the pair of lowest rank first (the leftmost among equals), until no
    pair has a rank. With no pre-tokenizer a whole text is one sequence, so instead of rescanning
    it after every merge, a heap holds the candidate pairs and a linked list the symbols."""
    symbols = list(symbols)
    after = list(range(1, len(symbols))) + [-1]   # index of the next live symbol (-1: none)
    before = list(range(-1, len(symbols) - 1))
    heap = [(ranks[pair], i, *pair) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = after[i]
        if j == -1 or symbols[i] != left or symbols[j] != right:
            continue  # stale: one side was merged since (symbols only grow, so a change shows)
        symbols[i], symbols[j] = left + right, ""
        after[i] = after[j]
        if after[j] != -1:
            before[after[j]] = i
        for a, b in ((before[i], i), (i, after[i])):  # the new symbol's pairs with its neighbours
            if a != -1 and b != -1 and (symbols[a], symbols[b]) in ranks:
                heapq.heappush(heap, (ranks[(symbols[a], symbols[b])], a, symbols[a], symbols[b]))
    return [symbol for symbol in symbols if symbol]


class SentencePieceBPE:
    """BPE over characters, as SentencePiece trains it for Llama 2 and TinyLlama: spaces are
    written "▁" and one goes before the text; the merges join characters across the whole text
    (nothing cuts it into chunks first), in the order they were learned; a character no token
    covers falls back to its UTF-8 bytes, the tokens <0x00> ... <0xFF>.

    `prepend` says where the "▁" goes: "always" (before every stretch of text between special
    tokens, as the first conversions of Llama's tokenizer do) or "first" (only at the very start,
    and not when the text starts with a space already: the later conversions).
    """

    name = "sentencepiece"

    def __init__(self, tokens: list[str], merges: list[tuple[str, str]], special_tokens: dict[str, int],
                 prepend: str = "always") -> None:
        if prepend not in ("always", "first"):
            raise ConfigError(f"prepend must be 'always' or 'first', got {prepend!r}.")
        self.tokens, self.merges, self.prepend = list(tokens), [tuple(pair) for pair in merges], prepend
        self._id_of = {token: i for i, token in enumerate(self.tokens)}
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.special_tokens = dict(special_tokens)
        self.vocab_size = len(self.tokens)
        self.eos_id = next((self._id_of[t] for t in END_OF_TEXT_NAMES if t in self.special_tokens), None)
        self.unk_id = next((self._id_of[t] for t in UNKNOWN_NAMES if t in self._id_of), None)
        self._byte_of = {self._id_of[f"<0x{b:02X}>"]: b for b in range(256) if f"<0x{b:02X}>" in self._id_of}

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset(),
               disallowed_special: Iterable[str] | str = "all") -> list[int]:
        """Text to ids; special tokens follow tiktoken's rules (`resolve_special_tokens`)."""
        allowed = resolve_special_tokens(text, self.special_tokens, allowed_special, disallowed_special)
        pieces = regex.split(f"({'|'.join(map(regex.escape, sorted(allowed, key=len, reverse=True)))})", text) \
            if allowed else [text]
        ids = []
        for i, piece in enumerate(pieces):  # even items are text, odd ones special tokens
            ids.extend([self.special_tokens[piece]] if i % 2 else
                       self.encode_ordinary(piece, start=i == 0 or self.prepend == "always"))
        return ids

    def encode_ordinary(self, text: str, start: bool = True) -> list[int]:
        if not text:
            return []
        if self.prepend == "first" and text.startswith(" "):
            start = False
        text = (SENTENCEPIECE_SPACE if start else "") + text.replace(" ", SENTENCEPIECE_SPACE)
        ids = []
        for symbol in merge_by_rank(list(text), self._ranks):
            if symbol in self._id_of:
                ids.append(self._id_of[symbol])
            else:  # a character the vocabulary lacks: its bytes
                ids.extend(self._id_of.get(f"<0x{b:02X}>", self.unk_id) for b in symbol.encode("utf-8"))
        if None in ids:
            raise ConfigError(f"{text[:40]!r} holds a character this tokenizer has no token for (and no byte "
                              "or unknown token either).")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        pieces = []
        for i in map(int, ids):
            if not 0 <= i < self.vocab_size:
                raise ConfigError(f"token id {i} is not in this tokenizer's vocabulary (ids 0..{self.vocab_size - 1}).")
            token = self.tokens[i]
            pieces.append(bytes([self._byte_of[i]]) if i in self._byte_of else
                          token.encode("utf-8") if token in self.special_tokens else
                          token.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
        data = b"".join(pieces)
        return data[1:] if data.startswith(b" ") else data  # the "▁" put before the text

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def with_special_tokens(self, tokens: Iterable[str]) -> "SentencePieceBPE":
        """This tokenizer plus new special tokens at the end (a chat format's); tokens it has keep their ids."""
        added = [t for t in dict.fromkeys(tokens) if t not in self._id_of]
        specials = {**self.special_tokens, **{t: self.vocab_size + i for i, t in enumerate(added)}}
        specials.update({t: self._id_of[t] for t in tokens if t in self._id_of})
        return SentencePieceBPE(self.tokens + added, self.merges, specials, self.prepend)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": self.tokens, "merges": [list(pair) for pair in self.merges],
                "special_tokens": sorted(self.special_tokens), "prepend": self.prepend}


# ---------------------------------------------------------------------------------------
# Choosing one
# ---------------------------------------------------------------------------------------

def get_tokenizer(name: str, text: str | None = None,
                  vocab_size: int | None = None) -> GPT2Tokenizer | BPETokenizer | CharTokenizer:
    """The tokenizer called `name`:

    "gpt2"  GPT-2's tokenizer through tiktoken (from the files minigpt ships: no network);
    "bpe"   minigpt's own BPE loaded with GPT-2's vocabulary (the same ids as "gpt2");
    "char"  one token per character of `text`;
    "train" a new BPE of `vocab_size` tokens learned from `text`;
    or the path of a tokenizer saved with `BPETokenizer.save`.
    """
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bpe":
        return BPETokenizer.from_gpt2(*gpt2_files())
    if name in ("char", "train") and not text:
        raise ValueError(f"the {name!r} tokenizer is built from a text; pass text=...")
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "train":
        if vocab_size is None:
            raise ValueError("training a BPE needs vocab_size=...")
        return BPETokenizer.train(text, vocab_size)
    if Path(name).is_file():
        return BPETokenizer.load(name)
    raise ConfigError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}, or give the "
                      f"path of a saved BPE tokenizer file.{did_you_mean(name, TOKENIZERS)}")


def tokenizer_from_spec(spec: dict[str, Any]) -> GPT2Tokenizer | BPETokenizer | CharTokenizer | VocabTokenizer | SentencePieceBPE:
    """Rebuild a tokenizer from what `spec()` returned (stored in every checkpoint)."""
    if spec.get("name") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("name") == "vocab":
        tokenizer = VocabTokenizer(spec["tokens"], spec["style"])
        tokenizer.special_tokens.update({t: tokenizer._id_of[t] for t in spec.get("special_tokens", [])})
        return tokenizer
    if spec.get("name") == "sentencepiece":
        tokens = spec["tokens"]
        return SentencePieceBPE(tokens, spec["merges"], {t: tokens.index(t) for t in spec["special_tokens"]},
                                spec["prepend"])
    if spec.get("name") == "bpe" and "saved" in spec:
        return BPETokenizer.from_text(spec["saved"], where="the checkpoint's tokenizer")
    if spec.get("name") in ("gpt2", "bpe"):
        tokenizer = get_tokenizer(spec["name"])
        return tokenizer.with_special_tokens(spec["special_tokens"]) if spec.get("special_tokens") else tokenizer
    raise ConfigError(f"the checkpoint names an unknown tokenizer {spec.get('name')!r}; it was "
                      "saved by another version of minigpt.")
