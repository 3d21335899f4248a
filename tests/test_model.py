"""GPTModel: shapes, causality, sizes by formula, initial loss, and that it can learn."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.blocks import GELU, LayerNorm, gelu_by_hand, layer_norm_by_hand
from minigpt.config import GPTConfig, model_config
from minigpt.model import GPTModel


def formula_parameters(cfg: GPTConfig) -> int:
    """Parameters counted by hand: embeddings, blocks, final norm, untied head (no qkv bias)."""
    C, V = cfg.emb_dim, cfg.vocab_size
    per_block = (3 * C * C                   # fused Q, K, V projections
                 + C * C + C                 # attention output projection with bias
                 + C * 4 * C + 4 * C         # feed-forward up-projection
                 + 4 * C * C + C             # feed-forward down-projection
                 + 2 * 2 * C)                # two LayerNorms (scale and shift)
    head = 0 if cfg.tie_weights else V * C
    return V * C + cfg.context_length * C + cfg.n_layers * per_block + 2 * C + head


def meta_model(cfg: GPTConfig) -> GPTModel:
    with torch.device("meta"):  # shapes only: no memory, no time
        return GPTModel(cfg)


def test_gpt2_small_has_the_published_parameter_counts():
    untied = meta_model(model_config("gpt2-small"))
    assert untied.num_parameters() == 163_009_536
    assert untied.num_parameters(exclude_output_head=True) == 124_412_160
    tied = meta_model(model_config("gpt2-small", tie_weights=True))
    assert tied.num_parameters() == 124_412_160
    assert untied.parameter_memory_bytes() == 163_009_536 * 4
    assert untied.parameter_memory_bytes(torch.bfloat16) == 163_009_536 * 2


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-mini", "gpt-nano"])
def test_parameter_counts_match_the_formula(preset):
    cfg = model_config(preset)
    assert meta_model(cfg).num_parameters() == formula_parameters(cfg)


def test_tied_head_shares_the_embedding(tiny_cfg):
    from dataclasses import replace

    model = GPTModel(replace(tiny_cfg, tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight
    # The shared matrix also scores the output, so it starts small like the other linear
    # layers (std 0.02), unlike an untied embedding (PyTorch's N(0, 1)).
    assert 0.015 < model.tok_emb.weight.std().item() < 0.025
    assert 0.9 < GPTModel(tiny_cfg).tok_emb.weight.std().item() < 1.1
    assert model.num_parameters() == formula_parameters(replace(tiny_cfg, tie_weights=True))


def test_logits_shape_and_too_long_input(tiny_cfg):
    model = GPTModel(tiny_cfg)
    assert model(torch.randint(0, 97, (3, 11))).shape == (3, 11, 97)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.randint(0, 97, (1, 17)))


def test_changing_a_later_token_never_changes_earlier_logits(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    before, after = model(idx), model(changed)
    assert torch.allclose(before[:, :7], after[:, :7], atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_layer_norm_and_gelu_match_their_formulas():
    x = torch.randn(4, 5, 32) * 3 + 1
    norm = LayerNorm(32)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
        norm.shift.uniform_(-1, 1)
    # The formula with explicit sums over the last dimension (n = 32, variance divided by n).
    mean = x.sum(-1, keepdim=True) / 32
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / 32
    expected = norm.scale * (x - mean) / torch.sqrt(var + 1e-5) + norm.shift
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert torch.allclose(layer_norm_by_hand(x, norm.scale, norm.shift), expected, atol=1e-5)
    # GELU's tanh form, written with math.tanh on every element (Hendrycks & Gimpel, 2016).
    expected = torch.tensor([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
                             for v in x.flatten().tolist()]).view_as(x)
    assert torch.allclose(GELU()(x), expected, atol=1e-5)
    assert torch.allclose(gelu_by_hand(x), expected, atol=1e-5)


def test_initial_loss_is_close_to_log_vocab_size():
    cfg = GPTConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, 1000, (8, 32))
    targets = torch.randint(0, 1000, (8, 32))
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_a_tiny_model_overfits_a_short_text(tiny_cfg):
    text = "the quick brown fox jumps over the lazy dog. " * 3
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    cfg = GPTConfig(vocab_size=len(chars), context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs = torch.stack([ids[i:i + 32] for i in range(0, len(ids) - 33, 8)])
    targets = torch.stack([ids[i + 1:i + 33] for i in range(0, len(ids) - 33, 8)])
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 2.5 and losses[-1] < 0.2
