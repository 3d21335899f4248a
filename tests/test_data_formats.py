"""Your data in: each format of --data trains (the loss falls) and a wrong one gets its clear error.

Pre-tokenized ids are made by Hugging Face `tokenizers` (the reference for decoding and encoding),
Hugging Face datasets are saved by `datasets` itself, and the named corpora with standard splits
(WikiText, the Penn Treebank) are served by a local HTTP server from archives the test builds.
"""

import hashlib
import json
import zipfile

import pytest

from minigpt.config import ConfigError
from minigpt import data
from minigpt.data import Download, NamedCorpus, data_format, read_token_files, token_id_chunks
from minigpt.runs import load_model
from minigpt.settings import resolve_run_config
from minigpt.task_evaluate import evaluation_ids
from minigpt.task_pretrain import pretrain
from minigpt.tokenizer import BPETokenizer, VocabTokenizer, vocabulary_style

# A run small enough for tests: a 2-layer model, one epoch of 32-token windows.
SETTINGS = dict(
    QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", SEED=7, LOG_EVERY=1000,
    custom_params=dict(num_epochs=2, batch_size=4, learning_rate=3e-3, eval_freq=10, eval_iter=2,
                       max_length=32, stride=32, lr_schedule="cosine",
                       warmup_steps=5, grad_clip=1.0,
                       model_overrides=dict(emb_dim=32, n_heads=2, n_layers=2, context_length=32,
                                            drop_rate=0.0)))


def run_config(tmp_path, name, data_arg, task="pretrain", **cli):
    settings = {**SETTINGS, "TASK": task}
    return resolve_run_config(settings, {"out": str(tmp_path / name), "data": str(data_arg), **cli})


def loss_falls(metrics):
    return metrics["val_losses"][-1] < metrics["val_losses"][0] - 0.5


# ---------------------------------------------------------------------------------------
# Choosing the format
# ---------------------------------------------------------------------------------------

def test_the_format_follows_what_the_data_is_and_a_wrong_one_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    (tmp_path / "texts.jsonl").write_text('{"text": "a story"}\n', encoding="utf-8")
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 2, 3]}\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    assert data_format(tmp_path / "a.txt") == "text"
    assert data_format(tmp_path / "texts.jsonl") == "json"
    assert data_format(tmp_path / "ids.jsonl") == "tokens"
    assert data_format(tmp_path / "folder") == "text"
    assert data_format("hf:wikitext:wikitext-2-raw-v1") == "hf"
    assert data_format("ptb") == "text"
    assert data_format(tmp_path / "texts.jsonl", "text") == "text"  # asked for: the raw JSON as text
    with pytest.raises(ConfigError, match="rename a.txt to .jsonl"):
        data_format(tmp_path / "a.txt", "tokens")
    with pytest.raises(ConfigError, match="names a Hugging Face dataset, but --data-format is 'text'"):
        data_format("hf:some/dataset", "text")
    with pytest.raises(ConfigError, match="is a folder of plain text"):
        data_format(tmp_path / "folder", "json")
    with pytest.raises(ConfigError, match="DATA_FORMAT .* must be one of"):
        data_format(tmp_path / "a.txt", "parquet")
    with pytest.raises(ConfigError, match="--text-field and --data-format .* --task sft reads its own records"):
        resolve_run_config({**SETTINGS, "TASK": "sft"}, {"data_format": "json"})


def test_a_jsonl_read_as_text_on_request_trains_on_the_json_itself(tmp_path):
    corpus = tmp_path / "records.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"story {i} " * 8}) for i in range(40)), encoding="utf-8")
    _, tokenizer, _, _ = pretrain(run_config(tmp_path, "raw", corpus, data_format="text", num_epochs=1))
    assert "{" in tokenizer.chars  # what the user asked for: the characters of the JSON
    _, tokenizer, _, _ = pretrain(run_config(tmp_path, "records", corpus, num_epochs=1))
    assert "{" not in tokenizer.chars


# ---------------------------------------------------------------------------------------
# Pre-tokenized data with its vocabulary
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory, verdict_text):
    """A byte-level BPE trained by Hugging Face `tokenizers` on the-verdict, saved as vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("hf_bpe")
    reference = ByteLevelBPETokenizer()
    reference.train_from_iterator([verdict_text], vocab_size=400, min_frequency=2,
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    reference.save_model(str(folder))
    return reference, folder


def write_pretokenized(folder, reference, paragraphs, merges=True):
    """Data as a user of Hugging Face would bring it: one {"input_ids": [...]} per line, the vocabulary beside."""
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"input_ids": reference.encode(p).ids, "attention_mask": [1]}) for p in paragraphs]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "train.jsonl"


def test_pretokenized_ids_train_with_their_vocabulary_and_decode_as_the_tool_that_made_them(
        tmp_path, hf_bpe, verdict_text):
    reference, saved = hf_bpe
    paragraphs = [p for p in verdict_text[:12000].split("\n\n") if p.strip()]
    corpus = write_pretokenized(tmp_path / "ids", reference, paragraphs)
    (tmp_path / "ids" / "vocab.json").write_bytes((saved / "vocab.json").read_bytes())

    model, tokenizer, metrics, run_dir = pretrain(run_config(tmp_path, "run", corpus, tokenizer="gpt2"))
    assert isinstance(tokenizer, VocabTokenizer) and tokenizer.style == "byte-level"
    assert tokenizer.vocab_size == reference.get_vocab_size() == model.cfg.vocab_size
    assert loss_falls(metrics)
    # Every id is used as it is: the records, joined by the end-of-text id, in order.
    joined = []
    for p in paragraphs:
        joined += ([tokenizer.eos_id] if joined else []) + reference.encode(p).ids
    saved_config = json.loads((run_dir / "config.json").read_text())
    assert saved_config["train_tokens"] + saved_config["val_tokens"] == len(joined)
    for p in paragraphs[:20]:
        assert tokenizer.decode(reference.encode(p).ids) == reference.decode(reference.encode(p).ids) == p
    # The run reloads with its vocabulary, and generates text from a prompt.
    again, again_tokenizer, _ = load_model(run_dir, "cpu")
    assert again_tokenizer.decode(again_tokenizer.encode("I had always thought")) == "I had always thought"


def test_with_merges_txt_a_byte_level_vocabulary_encodes_exactly_as_hugging_face(tmp_path, hf_bpe, verdict_text):
    reference, saved = hf_bpe
    corpus = write_pretokenized(tmp_path / "ids", reference, [verdict_text[:3000], verdict_text[3000:6000]])
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "ids" / name).write_bytes((saved / name).read_bytes())
    _, tokenizer, metrics, _ = pretrain(run_config(tmp_path, "run", corpus, tokenizer="gpt2", num_epochs=1))
    assert isinstance(tokenizer, BPETokenizer)
    for text in (verdict_text[6000:7000], "Gisburn's   café, 1,024 ways!\n\n", "<|endoftext|> and after"):
        assert tokenizer.encode(text, allowed_special="all") == reference.encode(text).ids


def test_sentencepiece_and_word_vocabularies_decode_by_hand():
    pieces = VocabTokenizer(["<unk>", "<s>", "</s>", "\u2581Hello", "\u2581wor", "ld", "<0x0A>", "<0xE4>", "<0xBD>",
                             "<0xA0>", "!"])
    assert pieces.style == "sentencepiece" and pieces.eos_id == 2 and pieces.unk_id == 0
    assert pieces.decode([3, 4, 5, 10, 6]) == " Hello world!\n"
    assert pieces.decode([7, 8, 9]) == "你"  # byte tokens: U+4F60 is E4 BD A0 in UTF-8
    assert pieces.encode("Hello world!") == [3, 4, 5, 10]
    assert pieces.encode("Hello 你") == [3, 0, 7, 8, 9]  # no "▁" token: <unk>; no "你" token: its bytes
    words = VocabTokenizer(["<unk>", "the", "cat", "sat", "<eos>"])
    assert vocabulary_style(words.tokens) == "word"
    assert words.decode([1, 2, 3]) == "the cat sat"
    assert words.encode("the dog sat <eos>", allowed_special="all") == [1, 0, 3, 4]


def test_pretokenized_data_that_does_not_fit_its_vocabulary_says_which_line(tmp_path):
    folder = tmp_path / "ids"
    folder.mkdir()
    corpus = folder / "data.jsonl"
    corpus.write_text('{"input_ids": [1, 2]}\n{"input_ids": [3, 9]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="need the vocabulary that made them: put its vocab.json"):
        pretrain(run_config(tmp_path, "no-vocab", corpus, tokenizer="gpt2"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate("abcd")}), encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 of .* has token id 9, outside its vocabulary"):
        list(token_id_chunks(corpus, 4, None, 0.9))
    corpus.write_text('{"input_ids": [1, 2]}\n{"ids": [3]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 of .* has no list of whole numbers \"input_ids\" \\(it has 'ids'\\)"):
        list(token_id_chunks(corpus, 4, None, 0.9))
    with pytest.raises(ConfigError, match="brings its own tokenizer: drop --tokenizer"):
        pretrain(run_config(tmp_path, "char", corpus, tokenizer="char"))
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 0}), encoding="utf-8")
    with pytest.raises(ConfigError, match="gives id 0 to both 'a' and 'b'"):
        VocabTokenizer.from_vocab_json(folder / "vocab.json")


def test_large_pretokenized_data_streams_into_token_files(tmp_path, hf_bpe, verdict_text, monkeypatch):
    reference, saved = hf_bpe
    paragraphs = [p for p in verdict_text.split("\n\n") if p.strip()]
    corpus = write_pretokenized(tmp_path / "ids", reference, paragraphs)
    (tmp_path / "ids" / "vocab.json").write_bytes((saved / "vocab.json").read_bytes())
    monkeypatch.setattr(data, "LARGE_TEXT_BYTES", 1000)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    _, tokenizer, metrics, _ = pretrain(run_config(tmp_path, "run", corpus, tokenizer="gpt2", max_steps=30))
    folder = next((tmp_path / "cache" / "tokens").iterdir())
    train, val, meta = read_token_files(folder)
    expected = []
    for p in paragraphs:
        expected += ([tokenizer.eos_id] if expected else []) + reference.encode(p).ids
    assert train[:len(train)].tolist() + val[:len(val)].tolist() == expected
    assert meta["val_tokens"] == pytest.approx(0.1 * len(expected), rel=0.15)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------

def stories(count, offset=0):
    return [f"Story {i + offset}: the painter went to the sea and painted it again." for i in range(count)]


def test_a_hugging_face_dataset_trains_on_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": stories(300), "id": list(range(300))}),
        "validation": datasets.Dataset.from_dict({"body": stories(20, 300), "id": list(range(20))}),
        "test": datasets.Dataset.from_dict({"body": stories(10, 400), "id": list(range(10))}),
    }).save_to_disk(str(folder))
    with pytest.raises(ConfigError, match=r"has no column 'text' \(it has body, id\); set --text-field"):
        pretrain(run_config(tmp_path, "wrong-field", f"hf:{folder}"))
    _, tokenizer, metrics, run_dir = pretrain(run_config(tmp_path, "run", f"hf:{folder}", text_field="body"))
    assert loss_falls(metrics)
    saved_config = json.loads((run_dir / "config.json").read_text())
    assert saved_config["val_tokens"] == len("".join(s + "\n\n" for s in stories(20, 300)))  # its own validation
    assert saved_config["data_path"] == f"hf:{folder}"
    evaluate = run_config(tmp_path, "evaluate", f"hf:{folder}", task="evaluate", checkpoint=str(run_dir),
                          text_field="body")
    where, ids = evaluation_ids(evaluate, tokenizer)
    assert "its test split" in where and tokenizer.decode(ids) == "".join(s + "\n\n" for s in stories(10, 400))
    only_test = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": stories(3)})}).save_to_disk(str(only_test))
    assert data.hf_evaluation_text(f"hf:{only_test}", "body") == ("test", "".join(s + "\n\n" for s in stories(3)))


def test_a_dataset_without_a_validation_split_holds_out_its_last_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in stories(100)), encoding="utf-8")
    _, _, metrics, run_dir = pretrain(run_config(tmp_path, "run", f"hf:{folder}", val_fraction=0.2,
                                                 num_epochs=1))
    saved_config = json.loads((run_dir / "config.json").read_text())
    assert saved_config["val_tokens"] == len("".join(s + "\n\n" for s in stories(100)[80:]))
    assert datasets  # (load_dataset read the folder of data files: no dataset_dict.json in it)


def test_a_missing_datasets_library_or_dataset_says_what_to_do(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    with pytest.raises(ConfigError, match="could not load the Hugging Face dataset .*no-such-folder"):
        data.hf_split_texts(f"hf:{tmp_path / 'no-such-folder'}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ConfigError, match="pip install datasets"):
        data.hf_split_texts("hf:wikitext")


def test_a_large_dataset_streams_into_token_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories(200)}),
                          "validation": datasets.Dataset.from_dict({"text": stories(20, 200)})}).save_to_disk(str(folder))
    monkeypatch.setattr(data, "LARGE_TEXT_BYTES", 1000)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    _, tokenizer, _, _ = pretrain(run_config(tmp_path, "run", f"hf:{folder}", max_steps=20))
    train, val, meta = read_token_files(next((tmp_path / "cache" / "tokens").iterdir()))
    assert tokenizer.decode(val[:len(val)].tolist()) == "".join(s + "\n\n" for s in stories(20, 200))
    assert tokenizer.decode(train[:len(train)].tolist()) == "".join(s + "\n\n" for s in stories(200))


# ---------------------------------------------------------------------------------------
# Named corpora with standard splits, served by a local HTTP server
# ---------------------------------------------------------------------------------------

SPLIT_TEXTS = {"train": " = Story = \n\n" + "The painter went to the sea . \n" * 300,
               "valid": " = Another = \n\n" + "The sea went to the painter . \n" * 30,
               "test": " = Last = \n\n" + "A painter , a sea . \n" * 20}


def test_wikitext_downloads_once_from_a_mirror_and_uses_its_own_splits(tmp_path, local_server, monkeypatch):
    served, url = local_server
    with zipfile.ZipFile(served / "wikitext-2-raw-v1.zip", "w") as bundle:
        for name, text in SPLIT_TEXTS.items():
            bundle.writestr(f"wikitext-2-raw/wiki.{name}.raw", text)
    digest = hashlib.sha256((served / "wikitext-2-raw-v1.zip").read_bytes()).hexdigest()
    real = data.NAMED_CORPORA["wikitext-2"]
    (served / "stale").mkdir()
    (served / "stale" / "wikitext-2-raw-v1.zip").write_bytes(b"<html>moved</html>")
    mirrors = [f"{url}/stale/wikitext-2-raw-v1.zip", f"{url}/gone/wikitext-2-raw-v1.zip", f"{url}/wikitext-2-raw-v1.zip"]
    download = Download("wikitext-2-raw-v1.zip", tuple(mirrors), digest)  # wrong bytes, a 404, then the file
    monkeypatch.setitem(data.NAMED_CORPORA, "wikitext-2", NamedCorpus(
        real.about, {split: (download, member) for split, (_, member) in real.splits.items()}))
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))

    _, tokenizer, metrics, run_dir = pretrain(run_config(tmp_path, "run", "wikitext-2"))
    assert loss_falls(metrics)
    saved_config = json.loads((run_dir / "config.json").read_text())
    assert saved_config["train_tokens"] == len(SPLIT_TEXTS["train"])  # one token per character: the whole split
    assert saved_config["val_tokens"] == len(SPLIT_TEXTS["valid"])
    assert (tmp_path / "cache" / "wikitext-2" / "wiki.test.raw").read_text() == SPLIT_TEXTS["test"]
    (served / "wikitext-2-raw-v1.zip").unlink()  # downloaded once: a second run needs no server
    evaluate = run_config(tmp_path, "evaluate", "wikitext-2", task="evaluate", checkpoint=str(run_dir))
    where, ids = evaluation_ids(evaluate, tokenizer)
    assert where == "wikitext-2, its test split" and tokenizer.decode(ids) == SPLIT_TEXTS["test"]


def test_ptb_files_are_checked_against_their_sha256(tmp_path, local_server, monkeypatch):
    served, url = local_server
    downloads = {}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        (served / f"ptb.{name}.txt").write_text(SPLIT_TEXTS[name].lower(), encoding="utf-8")
        digest = hashlib.sha256((served / f"ptb.{name}.txt").read_bytes()).hexdigest()
        downloads[split] = (Download(f"ptb.{name}.txt", (f"{url}/ptb.{name}.txt",), digest), None)
    downloads["test"] = (Download("ptb.test.txt", (f"{url}/ptb.test.txt",), "0" * 64), None)
    monkeypatch.setitem(data.NAMED_CORPORA, "ptb", NamedCorpus("ptb", downloads))
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="ptb.test.txt has SHA-256 .*expected 0000"):
        pretrain(run_config(tmp_path, "run", "ptb"))
    assert not (tmp_path / "cache" / "ptb" / "ptb.test.txt").exists()


def test_every_named_corpus_is_checksummed():
    """Every download has an https address and a SHA-256; a corpus is one text or three standard splits."""
    for name, corpus in data.NAMED_CORPORA.items():
        for download, member in corpus.splits.values():
            assert len(download.sha256) == 64 and int(download.sha256, 16) >= 0
            assert download.urls and all(url.startswith("https://") for url in download.urls)
        assert set(corpus.splits) in ({"text"}, {"train", "val", "test"}), name


def test_train_model_takes_the_data_settings_the_flags_do(tmp_path):
    from minigpt.task_pretrain import train_model

    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": s}) for s in stories(60)), encoding="utf-8")
    _, tokenizer, metrics = train_model(data=str(corpus), text_field="body", model="gpt-nano", tokenizer="char",
                                        max_length=16, emb_dim=16, n_heads=2, n_layers=1, context_length=16,
                                        max_steps=3, out=str(tmp_path / "run"))
    assert set(tokenizer.chars) == set("".join(s + "\n\n" for s in stories(60)))
    with pytest.raises(ConfigError, match="has no string field 'text'"):
        train_model(data=str(corpus), model="gpt-nano", tokenizer="char", max_steps=1, out=str(tmp_path / "bad"))
