"""Sliding windows, seeded batching, text loading and downloads (against a local server)."""

import hashlib
import json

import pytest
import torch

from minigpt.config import ConfigError
from minigpt.data import GPTDataset, SeededSampler, create_dataloader, read_text, split_text
from minigpt.download import download_file


def test_windows_are_shifted_by_one_and_start_every_stride():
    ids = list(range(100, 120))  # 20 tokens
    dataset = GPTDataset(ids, max_length=4, stride=3)
    # starts 0, 3, ..., 15: the last start s needs s + 4 + 1 <= 20 tokens
    assert [dataset.starts[i] for i in range(len(dataset))] == [0, 3, 6, 9, 12, 15]
    for i in range(len(dataset)):
        inputs, targets = dataset[i]
        start = 3 * i
        assert inputs.tolist() == ids[start:start + 4]
        assert targets.tolist() == ids[start + 1:start + 5]


def test_window_count_matches_the_formula():
    for n, length, stride in [(50, 8, 8), (50, 8, 1), (9, 8, 8), (1000, 64, 17)]:
        expected = (n - length - 1) // stride + 1  # windows whose target fits in n tokens
        assert len(GPTDataset(list(range(n)), length, stride)) == expected


def test_text_too_short_for_one_window_says_how_many_tokens_and_what_to_lower():
    with pytest.raises(ConfigError) as err:
        GPTDataset(list(range(30)), max_length=64, stride=64, name="the validation split")
    message = str(err.value)
    assert "the validation split has 30 tokens" in message and "max_length" in message and "29" in message


def test_too_few_windows_for_a_batch_says_to_lower_batch_size():
    with pytest.raises(ConfigError, match="batch_size"):
        create_dataloader(list(range(40)), batch_size=8, max_length=8, stride=8)


def test_loader_order_depends_only_on_seed_and_epoch():
    ids = list(range(201))  # 50 windows of 4: an even number of batches of 2

    def first_inputs(seed, epoch):
        loader = create_dataloader(ids, batch_size=2, max_length=4, stride=4, seed=seed)
        loader.sampler.set_epoch(epoch)
        return [batch[0][:, 0].tolist() for batch in loader]

    assert first_inputs(1, 0) == first_inputs(1, 0)
    assert first_inputs(1, 0) != first_inputs(2, 0)
    assert first_inputs(1, 0) != first_inputs(1, 1)
    assert sorted(sum(first_inputs(1, 0), [])) == list(range(0, 200, 4))  # each window once


def test_worker_processes_give_the_same_batches():
    ids = list(range(301))
    single = create_dataloader(ids, batch_size=3, max_length=5, stride=5, seed=4)
    workers = create_dataloader(ids, batch_size=3, max_length=5, stride=5, seed=4, num_workers=2)
    for (x1, y1), (x2, y2) in zip(single, workers, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_sampler_can_start_part_way_through_an_epoch():
    sampler = SeededSampler(10, shuffle=True, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6


def test_loading_does_not_touch_the_global_random_state():
    loader = create_dataloader(list(range(100)), batch_size=2, max_length=4, stride=4, seed=0)
    state = torch.get_rng_state()
    list(loader)
    assert torch.equal(state, torch.get_rng_state())


def test_split_is_ninety_ten_by_characters():
    train, val = split_text("a" * 90 + "b" * 10)
    assert (train, val) == ("a" * 90, "b" * 10)


def test_read_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="no text file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_download_fetches_once_and_checks_the_checksum(local_server, tmp_path):
    served, url = local_server
    payload = "I HAD always thought Jack Gisburn rather a cheap genius".encode()
    (served / "story.txt").write_bytes(payload)
    target = tmp_path / "data" / "story.txt"
    download_file(f"{url}/story.txt", target, sha256=hashlib.sha256(payload).hexdigest())
    assert target.read_bytes() == payload
    (served / "story.txt").write_bytes(b"changed")  # cached: no second download
    download_file(f"{url}/story.txt", target)
    assert target.read_bytes() == payload


def test_download_with_wrong_checksum_leaves_no_file(local_server, tmp_path):
    served, url = local_server
    (served / "story.txt").write_bytes(b"tampered")
    target = tmp_path / "story.txt"
    with pytest.raises(ConfigError, match="SHA-256"):
        download_file(f"{url}/story.txt", target, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


def test_download_offline_says_where_to_put_the_file(local_server, tmp_path):
    _, url = local_server
    target = tmp_path / "the-verdict.txt"
    with pytest.raises(ConfigError) as err:
        download_file(f"{url}/missing.txt", target)  # 404
    assert str(target) in str(err.value)
    with pytest.raises(ConfigError, match="place it at"):
        download_file("http://127.0.0.1:9/none.txt", target, timeout=2)  # nothing listens on port 9


def test_instruction_and_preference_records_read_the_common_field_names(tmp_path):
    from minigpt.data import load_instruction_data, load_preference_data

    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"prompt": "Name a color.", "response": "Blue."},
        {"question": "Capital of France?", "context": "Europe", "answer": "Paris"},
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
    ]), encoding="utf-8")
    records = load_instruction_data(path)
    assert [(r["instruction"], r.get("input", ""), r["output"]) for r in records] == [
        ("Add 2 and 3.", "", "5"), ("Name a color.", "", "Blue."), ("Capital of France?", "Europe", "Paris"),
        ("Say hi.", "", "Hi!"), ("2+2?", "", "4")]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "Greet me.", "chosen": "Hello!", "rejected": "No."}]), encoding="utf-8")
    assert load_preference_data(pairs)[0]["instruction"] == "Greet me."
    pairs.write_text(json.dumps([{"query": "Greet me.", "chosen": "Hello!", "rejected": "No."}]), encoding="utf-8")
    with pytest.raises(ConfigError, match="instruction may be prompt or question"):
        load_preference_data(pairs)


def test_a_json_corpus_trains_on_its_text_field_never_on_the_raw_json(tmp_path):
    from minigpt.data import read_corpus

    lines = [{"text": "The first story.", "id": 1}, {"text": "The second one.", "id": 2}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    assert read_corpus(path) == "The first story.\n\nThe second one."
    listed = tmp_path / "corpus.json"
    listed.write_text(json.dumps([{"body": "One."}, {"body": "Two."}]), encoding="utf-8")
    assert read_corpus(listed, "body") == "One.\n\nTwo."
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["One.", "Two."]), encoding="utf-8")
    assert read_corpus(strings) == "One.\n\nTwo."
    (tmp_path / "wrong.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 1 of .* has no string field 'text' \(it has 'body'\); set --text-field"):
        read_corpus(tmp_path / "wrong.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2 of .* is not valid JSON"):
        read_corpus(tmp_path / "broken.jsonl")


def test_token_files_of_a_json_corpus_hold_its_texts(tmp_path):
    """A large .jsonl goes to token files: their tokens are the records' texts, split by val share."""
    from minigpt.data import DOCUMENT_SEPARATOR, read_token_files, write_token_files
    from minigpt.tokenizer import CharTokenizer

    texts = [f"story number {i} " * 20 for i in range(50)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    tokenizer = CharTokenizer.from_text("".join(texts) + DOCUMENT_SEPARATOR)
    meta = write_token_files([path], tokenizer, tmp_path / "tokens", train_ratio=0.8)
    train, val, _ = read_token_files(tmp_path / "tokens")
    everything = tokenizer.decode(train[:len(train)].tolist() + val[:len(val)].tolist())
    assert everything == "".join(t + DOCUMENT_SEPARATOR for t in texts)
    assert meta["val_tokens"] == pytest.approx(0.2 * len(everything), abs=len(texts[0]) + 2)
