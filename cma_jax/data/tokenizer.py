"""Caption tokenizers: CLIP's BPE (through transformers' CLIPTokenizer) and a word-level one.

Both give CLIP4Clip's layout, ``[start] + tokens[:max_words - 2] + [end]`` zero-padded to ``max_words`` with
a text mask, end-of-text being the vocabulary's largest id (the text tower pools at ``argmax(ids)``);
``load_tokenizer(spec)`` builds one from a Hugging Face tokenizer folder, OpenAI's BPE merges file or a word
list (the synthetic data's). docs/data.md ("The input pipeline") has the layout and the accepted specs.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from typing import Sequence

import numpy as np

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
UNK_WORD = "<|unk|>"
CLIP_VOCAB_SIZE = 49408
# OpenAI keeps the first 49152 - 256 - 2 merges: 256 byte tokens + their </w> variants + merges + 2
# special tokens gives 49408.
_NUM_CLIP_MERGES = 49152 - 256 - 2


def _layout(token_lists: Sequence[Sequence[int]], max_words: int, start_id: int, end_id: int):
    """CLIP4Clip's layout: [start] + tokens[:max_words-2] + [end], zero pad -> (ids, mask) [N, L].

    The mask is 1 on real tokens, start and end included. End-of-text must be the vocabulary's largest id:
    the text tower picks its output position by argmax(ids).
    """
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2 (room for start and end tokens), got {max_words}")
    ids = np.zeros((len(token_lists), max_words), np.int32)
    mask = np.zeros((len(token_lists), max_words), np.int32)
    for i, toks in enumerate(token_lists):
        row = [start_id, *toks[: max_words - 2], end_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"tokenize expects str captions, got {type(t).__name__}: {t!r}")
    return texts


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries).

    Insertion order matters: printable bytes first, then the others (shifted above 255) - CLIP's
    vocabulary ids follow this order.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clip_vocab_from_bpe(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz -> (vocab {token: id} of 49408, merges list), rebuilt as
    OpenAI's SimpleTokenizer does (built once per process by `load_tokenizer`)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; OpenAI uses the next _NUM_CLIP_MERGES lines.
    merges = [tuple(line.split()) for line in lines[1: _NUM_CLIP_MERGES + 1]]
    if len(merges) != _NUM_CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected a CLIP BPE merges file with at least {_NUM_CLIP_MERGES} "
                         "'a b' merge lines after a header (OpenAI's bpe_simple_vocab_16e6.txt.gz)")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clean(text: str) -> str:
    # OpenAI's basic_clean (minus ftfy): undo double HTML escaping; HF's normaliser then does NFC,
    # whitespace collapsing and lower-casing.
    return html.unescape(html.unescape(text)).strip()


class ClipBPETokenizer:
    """CLIP BPE through transformers' CLIPTokenizer; ``tokenize(texts, max_words) -> (ids, mask)``."""

    kind = "clip_bpe"

    def __init__(self, hf_tokenizer, spec: str):
        self.hf = hf_tokenizer
        self.spec = spec
        self.start_id = int(hf_tokenizer.convert_tokens_to_ids(START_TOKEN))
        self.end_id = int(hf_tokenizer.convert_tokens_to_ids(END_TOKEN))
        self.vocab_size = len(hf_tokenizer)
        if self.end_id != self.vocab_size - 1:
            raise ValueError(f"tokenizer {spec}: {END_TOKEN} has id {self.end_id}, expected the largest id "
                             f"{self.vocab_size - 1} (the text tower picks the end position by argmax)")

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start/end tokens."""
        return list(self.hf(_clean(text), add_special_tokens=False)["input_ids"])

    def tokenize(self, texts, max_words: int):
        """texts (str or list of str) -> (ids [N, max_words] int32, mask [N, max_words] int32)."""
        texts = _as_list(texts)
        enc = self.hf([_clean(t) for t in texts], add_special_tokens=False)["input_ids"] if texts else []
        return _layout(enc, max_words, self.start_id, self.end_id)

    def __reduce__(self):
        # Worker processes rebuild from the spec (cached per process) instead of pickling the backend.
        return load_tokenizer, (self.spec,)


class WordTokenizer:
    """Word-level tokenizer for the synthetic data: vocab words get ids 0..V-1 in the order given,
    then <|unk|> = V, <|startoftext|> = V+1, <|endoftext|> = V+2 (the largest id)."""

    kind = "word"

    def __init__(self, words: Sequence[str], spec=None):
        words = [w.strip().lower() for w in words if w.strip()]
        if not words:
            raise ValueError(f"word vocabulary {spec!r} is empty; expected one word per line")
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"word vocabulary {spec!r} has duplicate words: {dup[:10]}")
        self.words = tuple(words)
        self.spec = spec
        self.index = {w: i for i, w in enumerate(words)}
        self.unk_id = len(words)
        self.start_id = len(words) + 1
        self.end_id = len(words) + 2
        self.vocab_size = len(words) + 3

    def encode(self, text: str) -> list[int]:
        """Lower-cased words and punctuation marks -> ids; unknown words -> <|unk|>."""
        return [self.index.get(w, self.unk_id) for w in re.findall(r"[\w']+|[^\w\s]", text.lower())]

    def tokenize(self, texts, max_words: int):
        """texts (str or list of str) -> (ids [N, max_words] int32, mask [N, max_words] int32)."""
        return _layout([self.encode(t) for t in _as_list(texts)], max_words, self.start_id, self.end_id)

    def __reduce__(self):
        if isinstance(self.spec, str):
            return load_tokenizer, (self.spec,)
        return WordTokenizer, (self.words, self.spec)


@functools.lru_cache(maxsize=None)
def _clip_from_bpe(path: str) -> ClipBPETokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_from_bpe(path)
    return ClipBPETokenizer(CLIPTokenizer(vocab=vocab, merges=merges), path)


@functools.lru_cache(maxsize=None)
def _clip_from_folder(path: str) -> ClipBPETokenizer:
    from transformers import CLIPTokenizer

    return ClipBPETokenizer(CLIPTokenizer.from_pretrained(path), path)


@functools.lru_cache(maxsize=None)
def _word_from_file(path: str) -> WordTokenizer:
    with open(path, encoding="utf-8") as f:
        return WordTokenizer(f.read().splitlines(), path)


def load_tokenizer(spec):
    """Tokenizer from a spec; each distinct spec is built once per process.

    spec: a Hugging Face CLIP tokenizer folder, OpenAI's BPE merges file ``*.txt.gz``, a word
    vocabulary file ``*.txt`` (one word per line), a folder holding one of those two files (a
    converted backbone's tokenizer/), a list/tuple of words, or an already-built tokenizer.
    """
    if isinstance(spec, (ClipBPETokenizer, WordTokenizer)):
        return spec
    if isinstance(spec, (list, tuple)):
        return WordTokenizer(spec, None)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be a path or a list of words, got {type(spec).__name__}")
    path = os.path.abspath(os.path.expanduser(os.fspath(spec)))
    if os.path.isdir(path):
        has = set(os.listdir(path))
        if "tokenizer.json" in has or {"vocab.json", "merges.txt"} <= has:
            return _clip_from_folder(path)
        bpe = sorted(f for f in has if f.endswith(".txt.gz"))
        if len(bpe) == 1:  # e.g. a converted backbone's tokenizer/ holding OpenAI's merges file
            return _clip_from_bpe(os.path.join(path, bpe[0]))
        words = sorted(f for f in has if f.endswith(".txt"))
        if not bpe and len(words) == 1:  # e.g. the demo backbone's tokenizer/ holding its word list
            return _word_from_file(os.path.join(path, words[0]))
        raise ValueError(f"tokenizer folder {path} has neither tokenizer.json, vocab.json + merges.txt, one "
                         "BPE .txt.gz file nor one word-list .txt file; expected a Hugging Face CLIP tokenizer "
                         "folder")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {spec!r} not found; expected a Hugging Face tokenizer folder, "
                                "OpenAI's bpe_simple_vocab_16e6.txt.gz or a word-vocabulary .txt file")
    if path.endswith(".txt.gz"):
        return _clip_from_bpe(path)
    if path.endswith(".txt"):
        return _word_from_file(path)
    raise ValueError(f"tokenizer {spec!r}: unknown kind; expected a Hugging Face tokenizer folder, "
                     "a CLIP BPE merges file ending in .txt.gz, or a word-vocabulary file ending in .txt")


__all__ = ["load_tokenizer", "ClipBPETokenizer", "WordTokenizer", "clip_vocab_from_bpe", "bytes_to_unicode",
           "CLIP_VOCAB_SIZE"]
