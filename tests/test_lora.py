"""LoRA: starts as the base model, computes W x + (alpha / r) B A x, trains only A and B,
merges exactly, counts by formula, saves only the adapters, and rejects bad settings."""

import copy

import pytest
import torch

from minigpt.config import ConfigError, GPTConfig
from minigpt.lora import (LoRALinear, count_parameters, inject_lora, load_adapter, lora_layers,
                          merge_lora, save_adapter, unmerge_lora)
from minigpt.model import GPTModel


def random_ids(cfg: GPTConfig, batch_size: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length))


def lora_model(cfg: GPTConfig, **kwargs) -> GPTModel:
    model = GPTModel(cfg)
    inject_lora(model, **kwargs)
    return model


def formula_lora_weights(cfg: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """rank * (d_in + d_out) per adapted layer, from the shapes the config implies."""
    C, V = cfg.emb_dim, cfg.vocab_size
    per_block = {"qkv": rank * (C + 3 * C), "out_proj": rank * (C + C),
                 "ff": rank * (C + 4 * C) + rank * (4 * C + C)}
    total = cfg.n_layers * sum(per_block[t] for t in targets if t in per_block)
    return total + (rank * (C + V) if "out_head" in targets else 0)


def test_injected_model_starts_exactly_as_the_base_model(tiny_cfg):
    base = GPTModel(tiny_cfg).eval()
    model = copy.deepcopy(base)
    replaced = inject_lora(model, rank=4, alpha=8.0)
    ids = random_ids(tiny_cfg)
    assert len(replaced) == 4 * tiny_cfg.n_layers
    assert torch.equal(model.eval()(ids), base(ids))


def test_lora_linear_matches_the_formula_by_hand():
    base = torch.nn.Linear(12, 20)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero update
    x = torch.randn(2, 5, 12)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ (W + 6.0 / 3 * B @ A).T + b
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert A.shape == (3, 12) and B.shape == (20, 3)


def test_training_changes_only_the_adapters_and_merging_is_exact(tiny_cfg):
    model = lora_model(tiny_cfg, rank=4, alpha=8.0, targets=("qkv", "out_proj", "ff", "out_head"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = random_ids(tiny_cfg)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, param in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert torch.equal(param, before[name]) != is_adapter, name

    model.eval()
    ids = random_ids(tiny_cfg)
    unmerged = model(ids)
    merge_lora(model)
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, before[f"{name}.base.weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [("qkv", "out_proj", "ff"), ("qkv",), ("ff", "out_head")])
def test_count_parameters_follows_the_rank_formula(tiny_cfg, targets):
    base_total = GPTModel(tiny_cfg).num_parameters()
    model = lora_model(tiny_cfg, rank=4, targets=targets)
    trainable, total = count_parameters(model)
    assert trainable == formula_lora_weights(tiny_cfg, 4, targets)
    assert total == base_total + trainable


def test_count_parameters_counts_a_tied_head_once():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, tie_weights=True)
    base_total = GPTModel(cfg).num_parameters()
    trainable, total = count_parameters(lora_model(cfg, rank=2))
    assert total == base_total + trainable


def test_adapter_roundtrip_gives_the_same_logits_and_holds_only_the_adapters(tiny_cfg, tmp_path):
    model = lora_model(tiny_cfg, rank=4, alpha=8.0).eval()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_()  # as if trained
            layer.lora_B.normal_(std=0.1)
    path = save_adapter(model, tmp_path / "adapter.pt", {"rank": 4, "alpha": 8.0})

    torch.manual_seed(0)  # the same base weights ...
    fresh = GPTModel(tiny_cfg)
    inject_lora(fresh, rank=4, alpha=8.0)  # ... with fresh adapters
    assert load_adapter(fresh, path) == {"rank": 4, "alpha": 8.0}
    ids = random_ids(tiny_cfg)
    assert torch.equal(fresh.eval()(ids), model(ids))

    saved = torch.load(path, weights_only=True)
    assert set(saved["state"]) == {f"{name}.lora_{p}" for name in lora_layers(model) for p in "AB"}
    full = tmp_path / "full.pt"
    torch.save(model.state_dict(), full)
    assert path.stat().st_size < full.stat().st_size / 2


@pytest.mark.parametrize("kwargs", [dict(rank=2), dict(rank=4, targets=("qkv",))])
def test_adapter_refuses_a_model_with_another_rank_or_targets(tiny_cfg, tmp_path, kwargs):
    path = save_adapter(lora_model(tiny_cfg, rank=4), tmp_path / "adapter.pt", {"rank": 4})
    with pytest.raises(ConfigError, match="inject_lora"):
        load_adapter(lora_model(tiny_cfg, **kwargs), path)


@pytest.mark.parametrize("kwargs, value", [
    (dict(rank=0), "0"), (dict(rank=33), "33"), (dict(rank=2.5), "2.5"),
    (dict(alpha=0.0), "0.0"), (dict(alpha=-1), "-1"),
    (dict(targets=("qkvv",)), "qkvv"),
])
def test_bad_settings_raise_config_errors_naming_the_value(tiny_cfg, kwargs, value):
    model = GPTModel(tiny_cfg)
    with pytest.raises(ConfigError, match=value) as err:
        inject_lora(model, **kwargs)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())  # a refused injection changes nothing
    if "targets" in kwargs:
        assert "'out_proj'" in str(err.value)  # it names the valid targets


def test_lora_twice_or_on_a_tied_head_is_refused(tiny_cfg):
    model = lora_model(tiny_cfg)
    with pytest.raises(ConfigError, match="already has LoRA layers"):
        inject_lora(model)
    tied = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                              tie_weights=True))
    with pytest.raises(ConfigError, match="tie_weights"):
        inject_lora(tied, targets=("out_head",))
