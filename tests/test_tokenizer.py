"""Tokenizers: CLIP BPE (from OpenAI's merges file / a HF folder) and the word-level one."""

import gzip
import os
import pickle

import numpy as np
import pytest
import regex

from cma_jax.data.tokenizer import (CLIP_VOCAB_SIZE, ClipBPETokenizer, WordTokenizer, bytes_to_unicode,
                                    load_tokenizer)

BPE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "clip", "bpe_simple_vocab_16e6.txt.gz")
if not os.path.exists(BPE_PATH):
    BPE_PATH = "/work/shared/clip/bpe_simple_vocab_16e6.txt.gz"

SENTENCES = [
    "a photo of a cat",
    "A man is playing a GUITAR on stage.",
    "two dogs   run\tthrough the   snow, don't they? it's 2024!",
    "café naïve résumé — “quoted” words",
    "someone slices tomatoes & onions; then cooks them (slowly)",
    "x" * 120,
]


class ReferenceBPE:
    """Minimal independent re-implementation of OpenAI's SimpleTokenizer algorithm (no ftfy)."""

    def __init__(self, path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(m.split()) for m in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text):
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for tok in regex.findall(self.pat, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(tok)]
        return ids


@pytest.fixture(scope="module")
def clip_tok():
    return load_tokenizer(BPE_PATH)


def test_known_ids_and_vocab(clip_tok):
    assert isinstance(clip_tok, ClipBPETokenizer)
    assert clip_tok.vocab_size == CLIP_VOCAB_SIZE == 49408
    assert (clip_tok.start_id, clip_tok.end_id) == (49406, 49407)
    ids, mask = clip_tok.tokenize(["a photo of a cat"], max_words=10)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (1, 10)
    np.testing.assert_array_equal(ids[0], [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_matches_reference_simple_tokenizer(clip_tok):
    ref = ReferenceBPE(BPE_PATH)
    for s in SENTENCES:
        assert clip_tok.encode(s) == ref.encode(s), s


def test_truncation_keeps_start_and_end(clip_tok):
    text = " ".join(["dog"] * 50)
    full = clip_tok.encode(text)
    assert len(full) == 50
    ids, mask = clip_tok.tokenize([text, "cat"], max_words=8)
    np.testing.assert_array_equal(ids[0], [49406] + full[:6] + [49407])
    assert mask[0].sum() == 8
    np.testing.assert_array_equal(ids[1], [49406, clip_tok.encode("cat")[0], 49407, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 0, 0, 0, 0, 0])
    # The text tower takes the end position by argmax(ids): it must be the end token's position.
    np.testing.assert_array_equal(ids.argmax(-1), [7, 2])


def test_empty_caption_and_html_unescape(clip_tok):
    ids, mask = clip_tok.tokenize(["", "salt &amp;amp; pepper"], max_words=6)
    np.testing.assert_array_equal(ids[0], [49406, 49407, 0, 0, 0, 0])
    assert clip_tok.encode("salt &amp;amp; pepper") == clip_tok.encode("salt & pepper")


def test_cached_once_per_process_and_picklable(clip_tok):
    assert load_tokenizer(BPE_PATH) is clip_tok
    assert pickle.loads(pickle.dumps(clip_tok)) is clip_tok


def test_hf_folder_roundtrip(clip_tok, tmp_path):
    clip_tok.hf.save_pretrained(str(tmp_path / "tok"))
    folder_tok = load_tokenizer(str(tmp_path / "tok"))
    assert folder_tok.vocab_size == 49408 and folder_tok.end_id == 49407
    for s in SENTENCES:
        a = folder_tok.tokenize([s], 20)
        b = clip_tok.tokenize([s], 20)
        np.testing.assert_array_equal(a[0], b[0])
    (tmp_path / "bpe_only").mkdir()
    (tmp_path / "bpe_only" / "bpe_simple_vocab_16e6.txt.gz").symlink_to(os.path.abspath(BPE_PATH))
    np.testing.assert_array_equal(load_tokenizer(str(tmp_path / "bpe_only")).tokenize(SENTENCES, 20)[0],
                                  clip_tok.tokenize(SENTENCES, 20)[0])


def test_word_tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nred\ncircle\nblue\nsquare\n.\n")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, WordTokenizer)
    assert (tok.unk_id, tok.start_id, tok.end_id, tok.vocab_size) == (6, 7, 8, 9)
    ids, mask = tok.tokenize(["A red circle.", "a green square", "a red circle a blue square"], max_words=6)
    np.testing.assert_array_equal(ids, [[7, 0, 1, 2, 5, 8], [7, 0, 6, 4, 8, 0], [7, 0, 1, 2, 0, 8]])
    np.testing.assert_array_equal(mask, [[1] * 6, [1, 1, 1, 1, 1, 0], [1] * 6])
    np.testing.assert_array_equal(ids.argmax(-1), [5, 4, 5])
    assert pickle.loads(pickle.dumps(tok)) is tok
    listed = load_tokenizer(["a", "red", "circle", "blue", "square", "."])
    np.testing.assert_array_equal(listed.tokenize(["A red circle."], 6)[0], ids[:1])
    (tmp_path / "tokenizer").mkdir()  # a backbone's tokenizer/ holding a word list (the demo's)
    (tmp_path / "tokenizer" / "synthetic_vocab.txt").write_text(path.read_text())
    folder = load_tokenizer(str(tmp_path / "tokenizer"))
    np.testing.assert_array_equal(folder.tokenize(["A red circle."], 6)[0], ids[:1])


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.txt.gz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown kind"):
        load_tokenizer(str(tmp_path / "weights.bin"))
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="CLIP BPE merges file"):
        load_tokenizer(str(tmp_path / "short.txt.gz"))
    with pytest.raises(ValueError, match="max_words"):
        load_tokenizer(["a"]).tokenize(["a"], 1)
