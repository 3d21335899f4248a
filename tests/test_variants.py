"""Research variants (chapter 11): low-rank and tau-gated attention, adaptive depth, and the
Python training API. Each switch, off or at its neutral setting, must be exactly the standard
model; halting is checked against ACT's formulas on hand-built cases."""

import math
from dataclasses import replace

import pytest
import torch

from minigpt.blocks import AdaptiveDepth
from minigpt.config import ConfigError, GPTConfig
from minigpt.settings import resolve_run_config
from minigpt.generation import generate
from minigpt.model import GPTModel
from minigpt.task_pretrain import pretrain, train_model

BASE = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)


def built(cfg, seed=0):
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("switch", [dict(attn_rank=None), dict(attn_tau=False), dict(halting=False)])
def test_each_switch_off_is_the_standard_model_with_the_same_weights(switch):
    standard, switched = built(BASE), built(replace(BASE, **switch))
    assert standard.state_dict().keys() == switched.state_dict().keys()
    switched.load_state_dict(standard.state_dict())
    assert torch.equal(standard(ids()), switched(ids()))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_rank_equal_to_the_head_size_is_standard_attention(pos_emb):
    cfg = replace(BASE, pos_emb=pos_emb)
    standard, full_rank = built(cfg), built(replace(cfg, attn_rank=cfg.head_dim))
    full_rank.load_state_dict(standard.state_dict())  # same shapes: the projections are the identity's
    assert torch.equal(standard(ids()), full_rank(ids()))


def test_low_rank_attention_saves_the_parameters_and_flops_it_should():
    low = built(replace(BASE, attn_rank=2))
    C, H, D, r = 32, 4, 8, 2
    assert low.trf_blocks[0].att.qkv.weight.shape == (2 * H * r + H * D, C)
    assert built(BASE).num_parameters() - low.num_parameters() == BASE.n_layers * 2 * C * H * (D - r)
    T = 16
    saved = built(BASE).flops_per_token(T) - low.flops_per_token(T)
    assert saved == 6 * BASE.n_layers * 2 * C * H * (D - r) + 6 * BASE.n_layers * H * (D - r) * T
    # its keys are cached at rank r, and cached decoding equals recomputing
    prompt = ids(1, 5)
    torch.manual_seed(0)
    assert torch.equal(generate(low, prompt, 8, use_cache=True), generate(low, prompt, 8, use_cache=False))
    assert low.new_kv_cache(1).layers[0].keys.shape[-1] == r
    with pytest.raises(ConfigError, match="attn_rank"):
        GPTConfig(emb_dim=32, n_heads=4, attn_rank=9)
    with pytest.raises(ConfigError, match="even with RoPE"):
        GPTConfig(emb_dim=32, n_heads=4, attn_rank=3, pos_emb="rope")


def test_tau_starts_at_one_and_then_is_standard_attention():
    standard, gated = built(BASE), built(replace(BASE, attn_tau=True))
    gated.load_state_dict(standard.state_dict(), strict=False)  # every weight but the tau units
    x = torch.randn(2, 12, 32)
    assert torch.allclose(gated.trf_blocks[0].att.tau(x), torch.ones(2, 4, 12, 1), atol=1e-6)
    assert torch.allclose(standard(ids()), gated(ids()), atol=1e-5)


def test_tau_divides_the_scores_per_head_and_token():
    gated = built(replace(BASE, attn_tau=True, n_layers=1))
    att = gated.trf_blocks[0].att
    with torch.no_grad():
        att.temperature.weight.normal_()
    x = torch.randn(1, 6, 32)
    q, k, v = att.qkv(x).split(32, dim=2)
    q, k, v = (t.view(1, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    scores = (q / att.tau(x)) @ k.transpose(2, 3) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    by_hand = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(1, 6, 32)
    assert torch.allclose(att(x), att.out_proj(by_hand), atol=1e-5)


def halting_model(biases, n_layers=3):
    """A halting model whose units ignore the state: block n halts with probability sigmoid(bias_n)."""
    model = built(replace(BASE, n_layers=n_layers, halting=True))
    with torch.no_grad():
        for unit, bias in zip(model.halt_units, biases):
            unit.linear.bias.fill_(bias)
    return model


def logit(p):
    return math.log(p / (1 - p))


def test_ponder_cost_and_halting_weights_on_hand_built_cases():
    # h = 0.3 then 0.5: 0.8 < 0.99, so every token runs all 3 blocks; the last gets R = 0.2.
    output = halting_model([logit(0.3), logit(0.5)])(ids(), details=True)
    assert torch.allclose(output.depth, torch.full((2, 12), 3.0))
    assert output.aux_loss.item() == pytest.approx(0.01 * (3 + 0.2), abs=1e-6)
    # h = 0.3 then 0.75: 1.05 >= 0.99, so every token stops after block 2 with R = 0.7.
    output = halting_model([logit(0.3), logit(0.75)])(ids(), details=True)
    assert torch.allclose(output.depth, torch.full((2, 12), 2.0))
    assert output.aux_loss.item() == pytest.approx(0.01 * (2 + 0.7), abs=1e-6)


def input_dependent_halting_model():
    """Four blocks whose halting units read the state, so that tokens stop at different depths."""
    model = built(replace(BASE, n_layers=4, halting=True))
    with torch.no_grad():
        for unit in model.halt_units:
            unit.linear.weight.normal_(std=0.5)
            unit.linear.bias.fill_(0.0)
    return model


def test_the_halting_weights_of_every_token_sum_to_one():
    model = input_dependent_halting_model()
    x = model.drop_emb(model.tok_emb(ids()) + model.pos_emb(torch.arange(12)))
    adaptive = AdaptiveDepth(x, 0.01)
    for layer, block in enumerate(model.trf_blocks):
        x = adaptive.carry(x, block(x))
        last = layer == 3
        adaptive.step(x, torch.ones_like(adaptive.cumulative) if last else model.halt_units[layer](x), last)
    assert torch.allclose(torch.stack(adaptive.weights).sum(0), torch.ones(2, 12), atol=1e-6)
    assert len(set(adaptive.depth.flatten().tolist())) > 1  # tokens stopped at different depths


def test_a_unit_that_always_halts_after_the_first_block_is_the_one_block_model():
    model = halting_model([10.0, 10.0])         # sigmoid(10) = 0.99995 >= 1 - 0.01
    one_block = built(replace(BASE, n_layers=1))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("halt_units", "trf_blocks.1",
                                                                                  "trf_blocks.2"))}
    one_block.load_state_dict(state)
    assert torch.equal(model(ids()), one_block(ids()))
    assert torch.equal(model(ids(), details=True).depth, torch.ones(2, 12))


def test_halting_decodes_the_same_with_and_without_the_kv_cache():
    model = input_dependent_halting_model()
    prompt = ids(1, 4)
    full = model(torch.cat([prompt, ids(1, 6, seed=5)], dim=1))
    cache = model.new_kv_cache(1)
    steps = [model(prompt, cache)] + [model(ids(1, 6, seed=5)[:, i:i + 1], cache) for i in range(6)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.equal(generate(model, prompt, 10, use_cache=True), generate(model, prompt, 10, use_cache=False))


@pytest.mark.parametrize("preset", ["tau-tiny", "halting-tiny", "moe-tiny"])
def test_the_variant_presets_train_in_quick_mode(preset, tmp_path, verdict_text):
    text = tmp_path / "verdict.txt"
    text.write_text(verdict_text, encoding="utf-8")
    run = resolve_run_config({"QUICK_MODE": True, "MODEL": preset, "LOG_EVERY": 1000},
                             {"out": str(tmp_path / preset), "data": str(text), "max_steps": 20})
    assert run.mode == "quick" and run.model_name == preset
    model, _, metrics, _ = pretrain(run)
    assert metrics["val_losses"][-1] < metrics["val_losses"][0] - 1.0, metrics["val_losses"]
    if model.cfg.halting:
        depth = model(torch.randint(model.cfg.vocab_size, (1, 16)), details=True).depth
        assert 1 <= depth.mean() <= model.cfg.n_layers


def test_train_model_trains_on_a_bilingual_text_and_round_trips_the_chinese(tmp_path):
    texts = ["The cat sat on the mat. 猫坐在垫子上。", "A dog runs in the park. 狗在公园里跑。"] * 20
    model, tokenizer, metrics = train_model(texts=texts, model="gpt-nano", tokenizer="gpt2", epochs=3, batch_size=4,
                                            learning_rate=3e-3, max_length=16, eval_freq=4, eval_iter=2,
                                            out=str(tmp_path / "bilingual"), start_context="The cat")
    assert metrics["completed"] and metrics["val_losses"][-1] < metrics["val_losses"][0]
    for text in texts[:2]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tmp_path / "bilingual" / "texts.txt").read_text(encoding="utf-8") == "\n\n".join(texts)
    assert (tmp_path / "bilingual" / "checkpoint.pt").is_file()  # a run directory, as main.py writes
    with pytest.raises(ConfigError, match="either texts"):
        train_model()
    with pytest.raises(ConfigError, match="no setting 'emb_dimm'"):
        train_model(texts=texts, emb_dimm=64)
