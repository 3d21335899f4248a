"""Hugging Face both ways: every model minigpt exports loads whole in `transformers` (model and
tokenizer), and the GPT-2, Llama and Qwen2 models `transformers` saves load into minigpt.

Pretrained weights cannot be downloaded here, so the models are randomly initialised ones that
`transformers` itself makes and saves, every weight drawn at random (norms and biases too) so
that a misplaced name or a swapped q/k/v cannot hide behind ones and zeros. Tokenizers are
checked on 1,000 random strings each, against the `tokenizers` library that runs tokenizer.json.
"""

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from minigpt.config import ConfigError, GPTConfig
from minigpt.data import format_prompt
from minigpt.generation import generate
from minigpt.hub import load_pretrained, save_pretrained, tokenizer_from_hf
from minigpt.model import GPTModel
from minigpt.tokenizer import BPETokenizer, CharTokenizer, VocabTokenizer, get_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

TEXT = (SHARED_DATA / "the-verdict.txt").read_text(encoding="utf-8")
CHAT = ["<|user|>", "<|assistant|>"]
# Pieces random strings are made of: words, digits, runs of every kind of whitespace, accents written
# two ways (NFC and NFD), CJK, emoji, and the special tokens.
PIECES = ["the", " cat", "Ünïcödé", "e\u0301", "日本語", "😀", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000",
          "\u2028", "\x0b", "\x1c", "'s", "'LL", "123", "4567", "٣", ".,!?", "--", "<|endoftext|>", *CHAT]


def random_strings(count=1000, seed=0, pieces=PIECES):
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


LLAMA_SHAPE = dict(vocab_size=131, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64)
HF_MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=131, n_positions=64, layer_norm_epsilon=1e-6)),
    "llama-gqa-untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-5)),
    "llama-mqa-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA_SHAPE, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-biases": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA_SHAPE, num_key_value_heads=2, attention_bias=True, mlp_bias=False)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **LLAMA_SHAPE, num_key_value_heads=2, sliding_window=None)),
}


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_hugging_face_models_load_with_their_logits_and_greedy_text(tmp_path, kind):
    hf = randomize(HF_MODELS[kind]())
    hf.save_pretrained(tmp_path)
    ours = GPTModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 131, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
        theirs = hf.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, ids[:1, :6], 10), theirs)


MINIGPT_ARCHITECTURES = {  # each exports as the class that computes it
    "gpt2": (dict(), "GPT2LMHeadModel"),
    "gpt2-tied-no-bias": (dict(tie_weights=True, bias=False, qkv_bias=True), "GPT2LMHeadModel"),
    "llama": (dict(norm="rmsnorm", pos_emb="rope", ffn="swiglu", n_kv_heads=2, bias=False, rope_base=5e5,
                   norm_eps=1e-6), "LlamaForCausalLM"),
    "llama-tied-biases": (dict(norm="rmsnorm", pos_emb="rope", ffn="swiglu", n_kv_heads=1, tie_weights=True,
                               bias=True), "LlamaForCausalLM"),
    "qwen2": (dict(norm="rmsnorm", pos_emb="rope", ffn="swiglu", n_kv_heads=2, qkv_bias=True, bias=False),
              "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="module")
def trained_bpe():
    return BPETokenizer.train(TEXT, 400, progress=False)


@pytest.mark.parametrize("kind", list(MINIGPT_ARCHITECTURES))
def test_every_minigpt_architecture_exports_to_transformers(tmp_path, trained_bpe, kind):
    overrides, hf_class = MINIGPT_ARCHITECTURES[kind]
    model = randomize(GPTModel(GPTConfig(vocab_size=400, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                                         drop_rate=0.0, **overrides)))
    folder = save_pretrained(model, trained_bpe, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == hf_class
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    back = GPTModel.from_pretrained(str(folder))  # and minigpt reads it back (GPT-2's files always hold biases)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("overrides", [dict(ffn="moe"), dict(pos_emb="sinusoidal"), dict(norm="rmsnorm"),
                                       dict(norm="rmsnorm", pos_emb="rope", ffn="swiglu", attn_tau=True)])
def test_an_architecture_no_hugging_face_class_computes_is_refused_before_writing(tmp_path, overrides):
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=1, **overrides))
    with pytest.raises(ConfigError, match="no Hugging Face class computes it"):
        save_pretrained(model, get_tokenizer("gpt2"), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def train_sentencepiece(style, folder):
    """A Llama 2-style tokenizer trained by the `tokenizers` library: "▁" for spaces, put before the text by
    a Prepend normalizer ("always") or a Metaspace pre-tokenizer ("first"), bytes for unknown characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    theirs = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "always":
        theirs.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        theirs.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    theirs.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    theirs.train_from_iterator(TEXT.splitlines(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                                      show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    theirs.save(str(folder / "tokenizer.json"))
    return theirs, tokenizer_from_hf(folder)


TOKENIZER_KINDS = {
    "gpt2": lambda: get_tokenizer("gpt2"),
    "gpt2-chat": lambda: get_tokenizer("gpt2").with_special_tokens(CHAT),
    "bpe": lambda: get_tokenizer("bpe"),
    "trained": lambda: BPETokenizer.train(TEXT, 500, progress=False),
    "trained-chat": lambda: BPETokenizer.train(TEXT, 500, progress=False).with_special_tokens(CHAT),
    "trained-gpt4-pattern": lambda: BPETokenizer.train(
        TEXT, 500, pattern=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                           r"""|\s*[\r\n]|\s+(?!\S)|\s+""", progress=False),
    "char": lambda: CharTokenizer.from_text(TEXT),
    "sentencepiece": lambda: train_sentencepiece("always", Path(tempfile.mkdtemp()))[1],
    "sentencepiece-first": lambda: train_sentencepiece("first", Path(tempfile.mkdtemp()))[1],
}


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_the_exported_tokenizer_encodes_and_decodes_as_minigpt_does(tmp_path, kind):
    ours = TOKENIZER_KINDS[kind]()
    model = GPTModel(GPTConfig(vocab_size=ours.vocab_size, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    folder = save_pretrained(model, ours, tmp_path / "export")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(theirs) == ours.vocab_size
    pieces = list(ours.chars) if kind == "char" else PIECES
    specials = set(getattr(ours, "special_tokens", {}))
    strings = [s for s in random_strings(pieces=pieces) if kind == "char" or not set(CHAT) - specials
               or not any(token in s for token in CHAT)]
    reread = tokenizer_from_hf(folder)  # and minigpt reads its own export back
    for text in strings:
        ids = ours.encode(text, allowed_special="all")
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        # SentencePiece decodes by dropping the first space: the "▁" it put there, or the text's own ("first")
        lost = kind == "sentencepiece-first" and text.startswith(" ")
        assert theirs.decode(ids) == ours.decode(ids) == (text[1:] if lost else text)
        assert reread.encode(text, allowed_special="all") == ids
    assert len(strings) > 500


def test_gpt2_tokenizer_class_reads_an_export_too(tmp_path, trained_bpe):
    """The bug this replaces: GPT2Tokenizer.from_pretrained(export) loaded without an error and was empty."""
    model = GPTModel(GPTConfig(vocab_size=400, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    folder = save_pretrained(model, trained_bpe, tmp_path / "export")
    theirs = transformers.GPT2Tokenizer.from_pretrained(folder)
    assert len(theirs) == 400
    assert theirs.encode("I had always thought") == trained_bpe.encode("I had always thought")


@pytest.mark.parametrize("style", ["chat", "alpaca"])
def test_the_chat_template_writes_the_prompt_the_run_was_trained_on(tmp_path, style):
    tokenizer = get_tokenizer("gpt2").with_special_tokens(CHAT if style == "chat" else [])
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    theirs = transformers.AutoTokenizer.from_pretrained(save_pretrained(model, tokenizer, tmp_path / "x", style))
    messages = [{"role": "user", "content": "Name a primary color."}]
    prompt = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == format_prompt({"instruction": "Name a primary color."}, style)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer.encode(prompt, allowed_special="all")


@pytest.mark.parametrize("kind", ["llama+bpe", "gpt2+char"])
def test_pipeline_text_generation_continues_as_minigpt_does(tmp_path, trained_bpe, kind):
    tokenizer = trained_bpe if kind == "llama+bpe" else CharTokenizer.from_text(TEXT)
    llama = dict(norm="rmsnorm", pos_emb="rope", ffn="swiglu", n_kv_heads=2, bias=False) if kind == "llama+bpe" else {}
    model = randomize(GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=32, n_heads=4,
                                         n_layers=2, drop_rate=0.0, **llama)))
    with torch.no_grad():  # small weights: a random model's greedy tokens then vary instead of repeating
        for param in model.parameters():
            param.mul_(0.2)
    folder = save_pretrained(model, tokenizer, tmp_path / "export")
    generator = transformers.pipeline("text-generation", model=str(folder))
    out = generator("I had always thought", max_new_tokens=12, do_sample=False, return_tensors=True)
    prompt = tokenizer.encode("I had always thought")
    ours = generate(model, torch.tensor([prompt]), 12, eos_id=tokenizer.eos_id)[0].tolist()
    assert out[0]["generated_token_ids"] == ours
    assert len(set(ours[len(prompt):])) > 1


def test_an_export_never_writes_a_tokenizer_it_cannot_write_exactly(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<unk>": 0, "</s>": 1, "\u2581the": 2, "\u2581cat": 3, "s": 4}))
    tokenizer = VocabTokenizer.from_vocab_json(vocab)
    model = GPTModel(GPTConfig(vocab_size=5, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    folder = tmp_path / "export"
    save_pretrained(model, CharTokenizer("abcde"), folder)  # a good export first
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ConfigError, match="merges.txt"):
        save_pretrained(model, tokenizer, folder)
    assert sorted(p.name for p in folder.iterdir()) == before  # the last good export is untouched
    assert transformers.AutoTokenizer.from_pretrained(folder).encode("bad") == [1, 0, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "vocab.json"]  # nothing half-written
    (folder / "checkpoint.pt").write_text("a run's weights")  # an export never replaces a folder of other things
    with pytest.raises(ConfigError, match="checkpoint.pt"):
        save_pretrained(model, CharTokenizer("abcde"), folder)
    assert (folder / "checkpoint.pt").read_text() == "a run's weights"


def test_tokenizers_made_by_the_tokenizers_library_are_read_exactly(tmp_path):
    """SmolLM's kind (every digit apart, then GPT-2's pattern), Qwen2's (NFC, its own pattern) and Llama 3's
    (a chunk that is a token as a whole is that token: ignore_merges); each read, then exported, exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    qwen_pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    kinds = {
        "smollm": (None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])),
        "qwen2": (normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
        "llama3": (None, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    }
    for name, (normalizer, pre_tokenizer) in kinds.items():
        theirs = Tokenizer(models.BPE(ignore_merges=name == "llama3"))
        if normalizer is not None:
            theirs.normalizer = normalizer
        theirs.pre_tokenizer, theirs.decoder = pre_tokenizer, decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        theirs.train_from_iterator([TEXT + " 2024 résumé résumé" * 3], trainer)
        (tmp_path / name).mkdir()
        theirs.save(str(tmp_path / name / "tokenizer.json"))
        ours = tokenizer_from_hf(tmp_path / name)
        assert ours.vocab_size == theirs.get_vocab_size()
        model = GPTModel(GPTConfig(vocab_size=ours.vocab_size, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
        exported = tokenizers.Tokenizer.from_file(str(save_pretrained(model, ours, tmp_path / f"{name}-out")
                                                      / "tokenizer.json"))
        for text in random_strings(seed=3, pieces=PIECES + ["<|im_start|>", " résumé", "2024"]):
            ids = theirs.encode(text).ids
            assert ours.encode(text, allowed_special="all") == ids, (name, text)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
            assert exported.encode(text).ids == ids


def test_ignore_merges_takes_a_chunk_that_is_a_token_whole(tmp_path):
    """A hand-worked case: merges b+c, a+b, ab+c. For "abc" the merges give a, bc (b+c goes first and
    a+bc is no merge), but "abc" is in the vocabulary, and with ignore_merges (Llama 3's) that wins."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{char: i for i, char in enumerate(alphabet)}, "bc": 256, "ab": 257, "abc": 258}
    for whole in (False, True):
        theirs = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=whole))
        theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        (tmp_path / str(whole)).mkdir()
        theirs.save(str(tmp_path / str(whole) / "tokenizer.json"))
        ours = tokenizer_from_hf(tmp_path / str(whole))
        assert ours.encode("abc") == theirs.encode("abc").ids == ([258] if whole else [vocab["a"], 256])
        assert ours.encode("abc abcd") == theirs.encode("abc abcd").ids


@pytest.mark.parametrize("style", ["always", "first"])
def test_llama_2_style_sentencepiece_tokenizers_are_read_exactly(tmp_path, style):
    theirs, ours = train_sentencepiece(style, tmp_path)
    assert type(ours).__name__ == "SentencePieceBPE" and ours.eos_id == theirs.token_to_id("</s>")
    for text in random_strings(seed=4, pieces=PIECES + ["<s>", "</s>", "\u02ac"]):
        ids = theirs.encode(text).ids
        assert ours.encode(text, allowed_special="all") == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.encode(TEXT) == theirs.encode(TEXT).ids  # a whole text is one sequence of merges


def test_what_minigpt_cannot_compute_is_refused_with_the_reason(tmp_path):
    cases = {
        "rope_scaling": transformers.LlamaConfig(**LLAMA_SHAPE, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "sliding_window": transformers.Qwen2Config(**LLAMA_SHAPE, use_sliding_window=True, sliding_window=16),
    }
    for reason, config in cases.items():
        folder = tmp_path / reason
        folder.mkdir()
        (folder / "config.json").write_text(config.to_json_string())
        with pytest.raises(ConfigError, match=reason):
            GPTModel.from_pretrained(str(folder))
    metaspace = {"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": None,
                 "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(metaspace))
    with pytest.raises(ConfigError, match="Metaspace"):
        tokenizer_from_hf(tmp_path)


def small_llama_folder(folder, tokenizer):
    """A Llama-family model as the hub has them (transformers' own files) with its tokenizer beside."""
    hf = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**LLAMA_SHAPE, "vocab_size": tokenizer.vocab_size + 8, "max_position_embeddings": 128},
        num_key_value_heads=2, tie_word_embeddings=True)))
    hf.save_pretrained(folder)
    for name, text in tokenizer_files_of(tokenizer).items():
        (folder / name).write_text(text, encoding="utf-8")
    return hf


def tokenizer_files_of(tokenizer):
    from minigpt.hub import tokenizer_files

    return tokenizer_files(tokenizer, 128)


def test_a_hub_repository_downloads_its_model_and_tokenizer_once(tmp_path, local_server, trained_bpe):
    served, url = local_server
    repo = served / "someone" / "tiny-llama" / "resolve" / "main"
    repo.mkdir(parents=True)
    hf = small_llama_folder(repo, trained_bpe)
    index = {"weight_map": {}}  # shard it, as larger hub models are
    from safetensors.torch import load_file, save_file
    state = load_file(str(repo / "model.safetensors"))
    (repo / "model.safetensors").unlink()
    names = sorted(state)
    for shard, part in (("model-00001-of-00002.safetensors", names[:5]), ("model-00002-of-00002.safetensors", names[5:])):
        save_file({name: state[name] for name in part}, str(repo / shard), metadata={"format": "pt"})
        index["weight_map"].update({name: shard for name in part})
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    model, tokenizer = load_pretrained("someone/tiny-llama", cache=tmp_path / "cache", base_url=url)
    ids = torch.tensor([tokenizer.encode("I had always thought Jack Gisburn")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert tokenizer.encode("a cheap genius 123") == trained_bpe.encode("a cheap genius 123")
    assert {"tokenizer.json", "model-00002-of-00002.safetensors"} <= {p.name for p in (tmp_path / "cache").iterdir()}


def run_main(*args, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_llama_family_model_is_brought_in_fine_tuned_and_taken_back_out(tmp_path, trained_bpe):
    """The README's round trip: a Hugging Face Llama (with its own tokenizer) generates, fine-tunes with
    LoRA through minigpt's SFT, and the run exports (--export-hf) as a folder transformers loads whole."""
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    small_llama_folder(folder, trained_bpe)
    out = run_main("--task", "generate", "--pretrained", str(folder), "--prompt", "I had", "--max-new-tokens", "5",
                   "--temperature", "0", cwd=tmp_path)
    assert "rmsnorm, RoPE, SwiGLU" in out and "bpe tokenizer, 400 tokens" in out
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(json.loads((SHARED_DATA / "instruction-data.json").read_text())[:40]))
    out = run_main("--task", "sft", "--pretrained", str(folder), "--trainable", "lora", "--data", str(data),
                   "--max-steps", "4", "--batch-size", "4", "--max-length", "64", "--no-judge",
                   "--max-new-tokens", "4", "--export-hf", "--out", str(tmp_path / "sft"), cwd=tmp_path)
    assert "hf/final" in out
    export = tmp_path / "sft" / "hf" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(export)
    from minigpt.runs import load_model
    model, tokenizer, _ = load_model(tmp_path / "sft")
    prompt = format_prompt({"instruction": "Name a primary color."}, "alpaca")
    assert theirs.apply_chat_template([{"role": "user", "content": "Name a primary color."}], tokenize=False,
                                      add_generation_prompt=True) == prompt
    ids = torch.tensor([tokenizer.encode(prompt)])
    assert theirs.encode(prompt) == ids[0].tolist()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
