"""Every setting a user can get wrong fails early, naming the setting, the value and the fix."""

import pytest

from minigpt.config import MODEL_PRESETS, ConfigError, GPTConfig, TrainConfig, model_config
from minigpt.settings import resolve_resume_config, resolve_run_config


def resolve(**settings):
    return resolve_run_config(settings)


def test_defaults_resolve_to_quick_pretraining():
    run = resolve()
    assert (run.task, run.mode, run.model_name) == ("pretrain", "quick", "gpt-mini")
    assert run.model.context_length <= 128 and run.train.num_epochs == 1


def test_full_mode_is_the_books_124m_run():
    run = resolve(QUICK_MODE=False)
    assert run.mode == "full"
    assert (run.model.emb_dim, run.model.n_layers, run.model.n_heads) == (768, 12, 12)
    assert run.model.context_length == 256 and run.train.max_length == 256
    assert (run.train.num_epochs, run.train.learning_rate, run.train.weight_decay) == (10, 4e-4, 0.1)


def test_custom_mode_uses_custom_params_and_cli_overrides_win():
    run = resolve_run_config(
        dict(QUICK_MODE=False, CUSTOM_MODE=True,
             custom_params=dict(batch_size=3, max_length=32, stride=16,
                                model_overrides=dict(emb_dim=64, n_heads=2, n_layers=1, context_length=32))),
        dict(num_epochs=7, learning_rate=1e-3))
    assert run.mode == "custom"
    assert (run.train.batch_size, run.train.max_length, run.train.stride) == (3, 32, 16)
    assert (run.model.emb_dim, run.model.n_heads, run.model.n_layers) == (64, 2, 1)
    assert (run.train.num_epochs, run.train.learning_rate) == (7, 1e-3)


@pytest.mark.parametrize("settings, words", [
    (dict(QUIK_MODE=True), ["QUIK_MODE", "QUICK_MODE"]),
    (dict(custom_param={}), ["custom_param", "custom_params"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(batchsize=4)), ["batchsize", "batch_size"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(model_overrides=dict(n_head=4))),
     ["n_head", "n_heads"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(model_overrides=dict(emb_dim=100, n_heads=12))),
     ["emb_dim (100)", "n_heads (12)", "divisible"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(learning_rate=-1.0)), ["learning_rate", "-1.0"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(batch_size=0)), ["batch_size", "at least 1", "0"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(batch_size="8")), ["batch_size", "'8'"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(model_overrides=dict(drop_rate=1.5))),
     ["drop_rate", "1.5"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(max_length=512)),
     ["max_length (512)", "context_length (256)", "lower"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=True), ["QUICK_MODE", "CUSTOM_MODE", "both"]),
    (dict(MODEL="gpt2-smal"), ["gpt2-smal", "gpt2-small"]),
    (dict(DEVICE="gpu"), ["DEVICE", "'gpu'"]),
    (dict(TOKENIZER="bpe2"), ["TOKENIZER", "'bpe2'", "neither", "gpt2", "train", "Did you mean 'bpe'"]),
    (dict(TOKENIZER="runs/x/tokenizer.bpe"), ["TOKENIZER", "runs/x/tokenizer.bpe", "existing file"]),
    (dict(TOKENIZER="train", BPE_VOCAB_SIZE=100), ["BPE_VOCAB_SIZE", "--vocab-size", "257", "100"]),
    (dict(TASK="pretrian"), ["pretrian", "pretrain"]),
    (dict(CUSTOM_MODE=True, QUICK_MODE=False, custom_params=dict(lr_schedule="cosin")), ["cosin", "cosine"]),
    (dict(SEED=-1), ["SEED", "-1"]),
])
def test_config_errors_name_the_setting_and_the_fix(settings, words):
    with pytest.raises(ConfigError) as err:
        resolve(**settings)
    for word in words:
        assert word in str(err.value)


def test_generate_without_checkpoint_says_what_to_pass():
    with pytest.raises(ConfigError, match="--checkpoint"):
        resolve_run_config({}, {"task": "generate"})
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        resolve_run_config({}, {"task": "generate", "checkpoint": "runs/x", "max_new_tokens": 0})
    with pytest.raises(ConfigError, match="one model"):
        resolve_run_config({}, {"task": "generate", "checkpoint": "runs/x", "pretrained": "gpt2"})


@pytest.mark.parametrize("params, words", [
    (dict(temprature=0.5), ["temprature", "temperature"]),
    (dict(num_beams=4), ["temperature to 0"]),
    (dict(top_p=1.5), ["top_p", "1.5"]),
    (dict(stop_strings="\n"), ["stop_strings", "list"]),
    (dict(repetition_penalty=0), ["repetition_penalty"]),
])
def test_generation_params_are_checked(params, words):
    with pytest.raises(ConfigError) as err:
        resolve_run_config({"generation_params": params}, {"task": "generate", "pretrained": "gpt2"})
    for word in words:
        assert word in str(err.value)
    run = resolve_run_config({"generation_params": dict(num_beams=4, temperature=0)},
                             {"task": "generate", "pretrained": "gpt2", "top_k": 5})
    assert run.generation["num_beams"] == 4 and run.generation["top_k"] == 5


def test_gpt_config_is_frozen_and_validated():
    cfg = GPTConfig()
    with pytest.raises(Exception):
        cfg.emb_dim = 5
    with pytest.raises(ConfigError, match="n_layers"):
        GPTConfig(n_layers=0)
    with pytest.raises(ConfigError, match="qkv_bias"):
        GPTConfig(qkv_bias="yes")
    with pytest.raises(ConfigError, match="start_context"):
        TrainConfig(start_context="  ")


def test_presets_have_gpt2_shapes():
    assert set(MODEL_PRESETS) >= {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    shapes = {name: (model_config(name).emb_dim, model_config(name).n_layers, model_config(name).n_heads)
              for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert shapes == {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16),
                      "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}


def test_resume_keeps_the_run_and_allows_only_more_epochs():
    saved = resolve().to_dict()
    run = resolve_resume_config(saved, {"resume": "runs/x", "num_epochs": 3})
    assert run.train.num_epochs == 3 and run.resume == "runs/x" and run.model == resolve().model
    with pytest.raises(ConfigError, match="--model cannot change"):
        resolve_resume_config(saved, {"resume": "runs/x", "model": "gpt2-small"})
    with pytest.raises(ConfigError, match="--lr cannot change"):
        resolve_resume_config(saved, {"resume": "runs/x", "learning_rate": 1e-3})


def test_tokenizer_names_paths_and_the_bpe_size_resolve(tmp_path):
    assert resolve().tokenizer == "gpt2" and resolve().bpe_vocab_size == 1024
    run = resolve_run_config({"TOKENIZER": "train", "BPE_VOCAB_SIZE": 2048}, {"bpe_vocab_size": 512})
    assert (run.tokenizer, run.bpe_vocab_size) == ("train", 512)  # the flag wins
    saved = tmp_path / "tokenizer.bpe"
    saved.write_text("minigpt-bpe v1\n")
    assert resolve(TOKENIZER=str(saved)).tokenizer == str(saved)  # read when the run starts
    with pytest.raises(ConfigError, match="--vocab-size cannot change"):
        resolve_resume_config(run.to_dict(), {"resume": "runs/x", "bpe_vocab_size": 300})


def test_the_readme_documents_every_setting_and_flag():
    """Every custom_params key, model override and command-line flag appears in the README."""
    import re
    from dataclasses import fields

    from conftest import ROOT
    from minigpt.config import AlignConfig, FinetuneConfig
    from minigpt.settings import MODEL_OVERRIDE_KEYS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in [field.name for field in fields(TrainConfig) + fields(FinetuneConfig) + fields(AlignConfig)] + MODEL_OVERRIDE_KEYS:
        assert f"`{name}`" in readme, name
    flags = re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "minigpt" / "cli.py").read_text(encoding="utf-8"))
    assert len(flags) > 30
    for flag in flags:
        assert f"`{flag}" in readme, flag
