"""The tokenizers against independent references: tiktoken's "gpt2", hand-worked merges,
the naive trainer, and round trips on arbitrary Unicode (hypothesis)."""

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, SHARED_DATA
import minigpt.tokenizer as tokenizer_module
from minigpt.config import ConfigError
from minigpt.tokenizer import (END_OF_TEXT, GPT2_ASCII_SPLIT, GPT2_FILES, GPT2_SPLIT_PATTERN, UNKNOWN, BPETokenizer,
                               CharTokenizer, WordTokenizer, bytes_to_unicode, count_pairs, download_gpt2_files,
                               get_tokenizer, gpt2_encoding, gpt2_files, learn_merges, learn_merges_naive, merge_pair,
                               split_into_chunks, tokenizer_from_spec)

# Pieces of text where tokenizers tend to differ, mixed by hypothesis with arbitrary Unicode.
AWKWARD = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "don't", "I'M", "  ", "   x", "\n\n", "\t",
           " \n ", "\r\n", "\u00a0", "\u3000", "123", "4.56", "1,000,000", "  42", "你好，世界。",
           "日本語のテキスト", "한국어", "🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "e\u0301", "a\u0308\u0323",
           "Ω≈ç√", "def f(x):\n    return x ** 2\n", "{'key': [1, 2]}", "<|endof", "ĠHello", "....",
           "--", "\u200b", "\x00", "\U0001F600\U0001F600"]
# Characters assigned in Python's Unicode database. (The `regex` package follows a newer Unicode
# than tiktoken's Rust regex: letters first assigned in Unicode 17, such as CJK Extension J, are
# letters to one and unassigned to the other, so GPT-2's pattern cuts them differently.)
assigned = st.text(st.characters(exclude_categories=("Cn", "Cs")))
texts = st.lists(st.one_of(assigned, st.sampled_from(AWKWARD)), max_size=12).map("".join)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def gpt2_bpe():
    """minigpt's own BPE loaded with GPT-2's published files (offline copies in ../shared)."""
    return get_tokenizer("bpe")


@pytest.fixture(scope="module")
def shakespeare():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("tinyshakespeare.txt is not available offline (put ../shared beside the checkout)")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------
# GPT-2 parity
# ---------------------------------------------------------------------------------------

def test_gpt2_vocabulary_loads_with_gpt2s_sizes_and_ids(gpt2_bpe):
    assert (gpt2_bpe.vocab_size, gpt2_bpe.eos_id, len(gpt2_bpe.merges)) == (50257, 50256, 50000)
    assert gpt2_bpe.encode("Hello, world") == [15496, 11, 995]  # published GPT-2 ids


def test_bpe_encodes_the_verdict_and_shakespeare_exactly_like_tiktoken(gpt2_bpe, tiktoken_gpt2, verdict_text,
                                                                         shakespeare):
    for text in (verdict_text, shakespeare):
        ids = gpt2_bpe.encode(text)
        assert ids == tiktoken_gpt2.encode(text)
        assert gpt2_bpe.decode(ids) == text


@settings(max_examples=400, deadline=None)
@given(text=texts)
def test_bpe_matches_tiktoken_on_arbitrary_unicode(gpt2_bpe, tiktoken_gpt2, text):
    ids = gpt2_bpe.encode(text, disallowed_special=())
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2_bpe.decode(ids) == text


def test_the_tokenizer_module_imports_and_encodes_without_torch():
    # Chapter 2 needs no PyTorch: a fresh interpreter imports minigpt.tokenizer and encodes
    # with GPT-2's vocabulary, and torch is still not loaded.
    program = ("import sys; from minigpt.tokenizer import get_tokenizer; "
               "ids = get_tokenizer('bpe').encode('Hello, world'); "
               "assert 'torch' not in sys.modules, 'torch was imported'; print(ids)")
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}  # TIKTOKEN_CACHE_DIR, MINIGPT_CACHE_DIR pass through
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15496, 11, 995]"


def test_lone_surrogates_and_cut_characters_decode_like_tiktoken(gpt2_bpe, tiktoken_gpt2):
    text = "a\ud800b \udc00"  # unpaired surrogates cannot be UTF-8: both turn them into U+FFFD
    assert gpt2_bpe.encode(text) == tiktoken_gpt2.encode(text)
    ids = gpt2_bpe.encode("🙂")  # one character, several byte-level tokens
    assert len(ids) > 1
    cut = ids[:-1]
    assert gpt2_bpe.decode(cut) == tiktoken_gpt2.decode(cut) and "\ufffd" in gpt2_bpe.decode(cut)


def test_bytes_to_unicode_is_gpt2s_table(gpt2_bpe):
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[32] == "Ġ" and table[10] == "Ċ"  # space and newline moved
    # Decoding GPT-2's ids for " the" and "\n\n" through the table gives the bytes back.
    assert gpt2_bpe.vocab[gpt2_bpe.encode(" the")[0]] == b" the"
    assert gpt2_bpe.decode(gpt2_bpe.encode("\n\n")) == "\n\n"


# ---------------------------------------------------------------------------------------
# The algorithm by hand, and the fast trainer against the naive one
# ---------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(max_codepoint=127)) | st.lists(st.sampled_from(
    ["'s", "'ll", "  ", " \n ", "\t\n", "\x0b", "\x1c", "x1", " 42", "..", " ?!", "\r\n", "a"]), max_size=15).map("".join))
def test_gpt2s_ascii_pattern_cuts_ascii_text_like_the_unicode_one(text):
    assert GPT2_ASCII_SPLIT.findall(text) == regex.findall(GPT2_SPLIT_PATTERN, text)


def test_a_full_chunk_cache_forgets_its_older_half_only(monkeypatch, tiktoken_gpt2):
    monkeypatch.setattr(tokenizer_module, "_CACHE_LIMIT", 4)
    tokenizer = BPETokenizer.from_gpt2(*gpt2_files())  # a fresh one: its cache starts empty
    text = " one two three four five"
    assert tokenizer.encode(text) == tiktoken_gpt2.encode(text)
    assert list(tokenizer._cache) == [" three", " four", " five"]  # " one", " two" went when " five" came


def test_the_two_helpers_on_a_hand_example():
    assert count_pairs([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert count_pairs([7, 7, 7]) == {(7, 7): 2}  # overlapping occurrences count
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge_pair([7, 7, 7], (7, 7), 9) == [9, 7]  # left to right, no overlap


def test_classic_example_aaabdaaabac_three_merges_by_hand():
    # Pairs: aa 4, ab 2, others 1 -> merge (a, a) = 256: [aa a b d aa a b a c].
    # Then (aa, a) and (a, b) both occur twice; the tie goes to the greater byte strings,
    # ("aa", "a") > ("a", "b") -> 257 = "aaa": [aaa b d aaa b a c]. Then (aaa, b) twice -> 258.
    a, b, c, d = map(ord, "abcd")
    expected = {(a, a): 256, (256, a): 257, (257, b): 258}
    for algorithm in ("fast", "naive"):
        tokenizer = BPETokenizer.train("aaabdaaabac", 259, special_tokens=(), algorithm=algorithm)
        assert tokenizer.merges == expected
        assert tokenizer.encode("aaabdaaabac") == [258, d, 258, a, c]
        assert tokenizer.vocab[258] == b"aaab"


@pytest.mark.parametrize("name, num_merges", [("verdict", 500), ("chinese", 200), ("code", 200),
                                              ("repeats", 100)])
def test_fast_trainer_learns_exactly_the_naive_merges(verdict_text, name, num_merges):
    text = {"verdict": verdict_text[:8000],
            "chinese": "语言模型把文字切成词元。" * 20 + "机器学习和深度学习都需要数据。" * 15 + "你好，世界！" * 9,
            "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 12,
            "repeats": "aaaaaaa bbbb aaaa ab ab ab aaa " * 30 + "x" * 64}[name]
    chunks = split_into_chunks(text)
    fast = learn_merges(Counter(chunks), num_merges, progress=False)
    assert fast == learn_merges_naive(chunks, num_merges)  # same merges, same order
    assert len(fast) == num_merges or name != "verdict"  # the small texts run out of pairs first


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab c\n", max_size=150))
def test_fast_and_naive_agree_on_tie_heavy_texts(text):
    chunks = split_into_chunks(text)
    assert learn_merges(Counter(chunks), 40, progress=False) == learn_merges_naive(chunks, 40)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_a_trained_bpe_round_trips_any_text(text):
    tokenizer = BPETokenizer.train("the cat sat on the mat, 你好你好 🙂🙂 the end" * 3, 280,
                                   progress=False)
    assert tokenizer.decode(tokenizer.encode(text, disallowed_special=())) == text


def test_training_on_chinese_learns_whole_characters():
    text = "语言模型把文字切成词元，再预测下一个词元。" * 30
    tokenizer = BPETokenizer.train(text, 300, progress=False)
    ids = tokenizer.encode("语言模型")
    assert tokenizer.decode(ids) == "语言模型"
    assert len(ids) < len("语言模型")  # fewer tokens than characters: merges span characters
    assert len("语言模型".encode("utf-8")) == 12  # 3 bytes per character, 12 byte tokens untrained


def test_special_tokens_are_never_merged_and_take_the_last_ids():
    text = f"hello world{END_OF_TEXT}hello there{END_OF_TEXT}" * 10
    tokenizer = BPETokenizer.train(text, 270, special_tokens=(END_OF_TEXT, "<|pad|>"), progress=False)
    assert tokenizer.special_tokens == {END_OF_TEXT: 268, "<|pad|>": 269} and tokenizer.eos_id == 268
    assert all(b"<|" not in token for i, token in tokenizer.vocab.items() if i < 268)


def test_training_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="at least 257"):
        BPETokenizer.train("some text", 200)
    with pytest.raises(ConfigError, match="at most"):
        BPETokenizer.train("tiny text", 5000, progress=False)


# ---------------------------------------------------------------------------------------
# Special tokens: tiktoken's rules
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_special_tokens_follow_tiktokens_rules(gpt2_bpe, tiktoken_gpt2, kind):
    tokenizer = gpt2_bpe if kind == "bpe" else get_tokenizer("gpt2")
    text = f"The end.{END_OF_TEXT}A new story"
    with pytest.raises(ConfigError, match="special token '<\\|endoftext\\|>'.*allowed_special"):
        tokenizer.encode(text)
    assert tokenizer.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert 50256 in tokenizer.encode(text, allowed_special={END_OF_TEXT})
    as_text = tokenizer.encode(text, disallowed_special=())
    assert as_text == tiktoken_gpt2.encode(text, disallowed_special=()) and 50256 not in as_text
    with pytest.raises(ConfigError, match="does not have"):
        tokenizer.encode(text, allowed_special={"<|im_start|>"})


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------

def test_save_and_load_round_trip_a_trained_bpe(tmp_path, verdict_text):
    tokenizer = BPETokenizer.train(verdict_text, 500, progress=False)
    path = tokenizer.save(tmp_path / "tokenizer.bpe")
    content = path.read_text(encoding="utf-8")
    assert content.startswith("minigpt-bpe v1\n") and '"<|endoftext|>"' in content
    assert "merge\t256\t" in content  # one readable line per merge
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tokenizer.merges and loaded.special_tokens == tokenizer.special_tokens
    sample = verdict_text[-500:] + " 你好 🙂"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    assert get_tokenizer(str(path)).encode(sample) == tokenizer.encode(sample)
    assert tokenizer_from_spec(tokenizer.spec()).encode(sample) == tokenizer.encode(sample)


def test_gpt2s_vocabulary_survives_saving(tmp_path, gpt2_bpe, tiktoken_gpt2):
    loaded = BPETokenizer.load(gpt2_bpe.save(tmp_path / "gpt2.bpe"))
    text = "Byte-level BPE: bytes Ġ→ ids, 你好 🙂"
    assert loaded.encode(text) == tiktoken_gpt2.encode(text) and loaded.byte_ids == gpt2_bpe.byte_ids
    assert tokenizer_from_spec(gpt2_bpe.spec()).encode(text) == tiktoken_gpt2.encode(text)


def test_loading_a_foreign_or_corrupt_file_says_what_is_wrong(tmp_path, verdict_text):
    good = BPETokenizer.train(verdict_text[:3000], 300, progress=False).to_text().splitlines()
    cases = {
        "foreign.bpe": ("#version: 0.2\nĠ t\n", "not a minigpt BPE tokenizer file"),
        "truncated.bpe": ("\n".join(good[:-5] + ["merge\t295\t32"]), "line"),
        "undefined.bpe": ("\n".join(good + ["merge\t300\t999\t32\tx"]), "no earlier line defines"),
        "gap.bpe": ("\n".join(good + ["merge\t400\t32\t32\tx"]), "no gaps"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            BPETokenizer.load(tmp_path / name)
    (tmp_path / "binary.bpe").write_bytes(b"\x80\x81\xff")
    with pytest.raises(ConfigError, match="not a minigpt BPE tokenizer file"):
        BPETokenizer.load(tmp_path / "binary.bpe")
    with pytest.raises(ConfigError, match="no tokenizer file"):
        BPETokenizer.load(tmp_path / "missing.bpe")


def test_decoding_an_unknown_id_names_the_valid_range():
    tokenizer = BPETokenizer.train("abc abc abd", 260, progress=False)
    with pytest.raises(ConfigError, match="0..259"):
        tokenizer.decode([1, 260])


# ---------------------------------------------------------------------------------------
# GPT-2's files, downloaded (from a local server: tests never use the internet)
# ---------------------------------------------------------------------------------------

def test_gpt2_files_download_once_with_their_checksums(local_server, tmp_path, tiktoken_gpt2):
    served, url = local_server
    for name in GPT2_FILES:
        (served / name).write_bytes((SHARED_DATA / "gpt2" / name).read_bytes())
    encoder, vocab = download_gpt2_files(tmp_path / "cache", base_url=url)
    assert hashlib.sha256(encoder.read_bytes()).hexdigest() == GPT2_FILES["encoder.json"][1]
    assert BPETokenizer.from_gpt2(encoder, vocab).encode("Hello, world") == [15496, 11, 995]
    (served / "vocab.bpe").write_bytes(b"#version: 0.2\nchanged\n")  # cached: not fetched again
    download_gpt2_files(tmp_path / "cache", base_url=url)
    with pytest.raises(ConfigError, match="SHA-256"):  # a tampered file is refused
        download_gpt2_files(tmp_path / "other", base_url=url)
    assert not (tmp_path / "other" / "vocab.bpe").exists()


# ---------------------------------------------------------------------------------------
# The other tokenizers, and choosing one
# ---------------------------------------------------------------------------------------

def test_the_shipped_gpt2_files_are_openais():
    for path in gpt2_files():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_FILES[path.name][1], path.name


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_tiktoken_built_from_the_shipped_files_is_tiktokens_gpt2(tiktoken_gpt2, text):
    """tiktoken's own "gpt2" (downloaded or cached) against the one built from minigpt's copies."""
    ours = gpt2_encoding()
    assert ours.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert ours.n_vocab == tiktoken_gpt2.n_vocab and ours.eot_token == tiktoken_gpt2.eot_token


def test_gpt2_adapter_matches_tiktoken(verdict_text, tiktoken_gpt2):
    tokenizer = get_tokenizer("gpt2")
    sample = verdict_text[:3000] + " Hello world  ünïcödé 你好 🙂"
    ids = tokenizer.encode(sample)
    assert ids == tiktoken_gpt2.encode(sample)
    assert tokenizer.decode(ids) == sample
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)


def test_word_tokenizer_by_hand():
    tokenizer = WordTokenizer.from_text("Hello, world. Is this-- a test?")
    assert WordTokenizer.split("Hello, world. Is this-- a test?") == [
        "Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]
    assert tokenizer.vocab[-2:] == [END_OF_TEXT, UNKNOWN] and tokenizer.vocab_size == 12
    ids = tokenizer.encode("Hello, unseen world?")
    assert tokenizer.decode(ids) == f"Hello, {UNKNOWN} world?"
    assert ids[2] == tokenizer.vocab.index(UNKNOWN)


def test_char_tokenizer_round_trips_and_is_sorted():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.chars == " dehlorw"
    assert tokenizer.encode("hello") == [3, 2, 4, 4, 5]
    assert tokenizer.decode(tokenizer.encode("world hello")) == "world hello"
    assert tokenizer.vocab_size == 8


def test_char_tokenizer_names_an_unknown_character():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ConfigError, match="'z'"):
        tokenizer.encode("abz")


def test_get_tokenizer_by_name_training_and_path(tmp_path, verdict_text):
    trained = get_tokenizer("train", text=verdict_text, vocab_size=400)
    assert isinstance(trained, BPETokenizer) and trained.vocab_size == 400 and trained.eos_id == 399
    path = trained.save(tmp_path / "t.bpe")
    assert get_tokenizer(str(path)).merges == trained.merges
    assert get_tokenizer("bpe").encode("to be") == get_tokenizer("gpt2").encode("to be")
    with pytest.raises(ConfigError, match="Did you mean 'bpe'"):
        get_tokenizer("bep")


def test_specs_rebuild_the_same_tokenizer():
    char = CharTokenizer.from_text("to be or not to be 你好")
    assert tokenizer_from_spec(char.spec()).encode("not 你") == char.encode("not 你")
    assert tokenizer_from_spec({"name": "gpt2"}).encode("to be") == get_tokenizer("gpt2").encode("to be")
