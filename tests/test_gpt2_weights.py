"""GPT-2 weights in the Hugging Face layout: minigpt computes what `transformers` computes.

Pretrained weights cannot be downloaded here, so the checks use randomly initialised GPT-2s
saved by `transformers` itself, with every weight (biases and norms included) drawn at random
so that a misplaced transpose or a swapped name cannot hide behind zeros and ones.
"""

import json
import socket
from dataclasses import replace

import pytest
import torch

from minigpt.config import ConfigError
from minigpt.generation import generate
from minigpt.model import (GPTModel, load_hf_gpt2_state_dict, read_safetensors, save_hf_gpt2,
                           to_hf_gpt2_state_dict)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def random_hf_gpt2(**overrides):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=32,
                                     bos_token_id=None, eos_token_id=None, **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = random_hf_gpt2()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(folder)
    return hf, folder


def test_loaded_weights_give_the_same_logits_as_transformers(hf_folder):
    hf, folder = hf_folder
    model = GPTModel.from_pretrained(str(folder))
    assert model.cfg.qkv_bias and model.cfg.tie_weights and model.cfg.context_length == 32
    ids = torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_greedy_continuation_matches_transformers_generate(hf_folder):
    hf, folder = hf_folder
    model = GPTModel.from_pretrained(str(folder))
    prompt = torch.randint(0, 97, (2, 6))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 20), expected)
    assert torch.equal(generate(model, prompt, 20, use_cache=False), expected)


def test_the_hub_layout_loads_too(hf_folder):
    """Files on the hub have no "transformer." prefix and may carry attention-mask buffers."""
    hf, _ = hf_folder
    state = {key.removeprefix("transformer."): value for key, value in hf.state_dict().items()
             if key != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # a buffer, not a weight
    model = GPTModel(replace(GPTModel.from_pretrained(str(hf_folder[1])).cfg))
    load_hf_gpt2_state_dict(model, state)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie_weights, qkv_bias, bias, activation", [
    (False, False, True, "gelu_tanh"), (True, True, True, "gelu_tanh"), (True, False, False, "gelu")])
def test_exported_model_loads_into_transformers_with_the_same_logits(tmp_path, tiny_cfg, tie_weights, qkv_bias,
                                                                     bias, activation):
    model = GPTModel(replace(tiny_cfg, tie_weights=tie_weights, qkv_bias=qkv_bias, bias=bias,
                             activation=activation)).eval()
    save_hf_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is tie_weights


@pytest.mark.parametrize("qkv_bias, bias", [(True, True), (False, False)])
def test_export_then_import_restores_every_weight(tiny_cfg, qkv_bias, bias):
    model = GPTModel(replace(tiny_cfg, qkv_bias=qkv_bias, bias=bias))
    copy = GPTModel(replace(tiny_cfg, qkv_bias=qkv_bias, bias=bias))
    load_hf_gpt2_state_dict(copy, to_hf_gpt2_state_dict(model))
    for (name, ours), (_, theirs) in zip(model.named_parameters(), copy.named_parameters()):
        assert torch.equal(ours, theirs), name
    if not bias:
        assert all(p.dim() == 2 or name.endswith("scale") for name, p in model.named_parameters())


def test_weights_that_do_not_fit_are_refused(hf_folder, tiny_cfg):
    hf, folder = hf_folder
    with pytest.raises(ConfigError, match="missing"):
        load_hf_gpt2_state_dict(GPTModel(replace(tiny_cfg, n_layers=3, qkv_bias=True)), hf.state_dict())
    with pytest.raises(ConfigError, match="shape"):
        load_hf_gpt2_state_dict(GPTModel(replace(tiny_cfg, emb_dim=64, qkv_bias=True)), hf.state_dict())
    with pytest.raises(ConfigError, match="qkv_bias=True"):
        load_hf_gpt2_state_dict(GPTModel(replace(tiny_cfg, context_length=32)), hf.state_dict())
    with pytest.raises(ConfigError, match="non-zero h.0.attn.c_proj.bias .* bias=True"):  # GPT-2 has biases
        load_hf_gpt2_state_dict(GPTModel(replace(tiny_cfg, context_length=32, qkv_bias=True, bias=False)),
                                hf.state_dict())


def test_unsupported_variants_and_broken_files_get_clear_errors(tmp_path, hf_folder):
    _, folder = hf_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="activation_function"):
        GPTModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ConfigError, match="download it again"):
        read_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="gpt2-medium"):
        GPTModel.from_pretrained("gpt2-meduim")


def test_from_pretrained_downloads_once_from_the_hub_layout(tmp_path, hf_folder, local_server):
    hf, folder = hf_folder
    served, url = local_server
    repo = served / "openai-community" / "gpt2" / "resolve" / "main"
    repo.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (repo / name).write_bytes((folder / name).read_bytes())
    cache = tmp_path / "cache"
    model = GPTModel.from_pretrained("gpt2", cache=cache, base_url=url)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "model.safetensors"]
    # Offline now (nothing listens there), the cached copy is used without asking the network.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    GPTModel.from_pretrained("gpt2", cache=cache, base_url=dead_url)
    with pytest.raises(ConfigError, match="offline"):
        GPTModel.from_pretrained("gpt2", cache=tmp_path / "empty", base_url=dead_url)
