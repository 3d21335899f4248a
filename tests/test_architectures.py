"""Chapter 10's switches against formulas and against the plain architecture they generalise:
RoPE's relative positions, RMSNorm, SwiGLU, grouped-query attention, a mixture of experts,
the KV cache for every architecture, and every preset training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import find_verdict
from minigpt.attention import MultiHeadAttention, RotaryEmbedding
from minigpt.blocks import MixtureOfExperts, RMSNorm, SwiGLU
from minigpt.config import ConfigError, GPTConfig, model_config
from minigpt.settings import resolve_run_config
from minigpt.generation import generate
from minigpt.model import GPTModel, save_hf_gpt2, sinusoidal_positions

SMALL = dict(vocab_size=50, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def test_rope_scores_depend_only_on_relative_position_and_position_0_is_the_identity():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, max_positions=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    assert torch.allclose(rope(q, start=0), q)  # angle 0: no rotation
    score = lambda m, n: (rope(q, start=m) * rope(k, start=n)).sum().item()  # noqa: E731
    for shift in (1, 7, 30):
        assert score(3 + shift, 1 + shift) == pytest.approx(score(3, 1), abs=1e-5)
    assert score(5, 1) != pytest.approx(score(3, 1), abs=1e-3)  # the distance itself matters
    # a rotation keeps lengths, and the pair (i, i + D/2) turns by position x base^(-2i/D)
    x = torch.randn(1, 1, 1, 8)
    assert rope(x, start=9).norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
    angle = 9 * 10000 ** (-2 * 1 / 8)
    a, b = x[..., 1].item(), x[..., 5].item()
    turned = rope(x, start=9)
    assert turned[..., 1].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
    assert turned[..., 5].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-5)


def test_rmsnorm_and_swiglu_match_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    norm = RMSNorm(8)
    norm.scale.data = torch.randn(8)
    by_hand = norm.scale * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), by_hand, atol=1e-6)
    cfg = GPTConfig(**{**SMALL, "ffn": "swiglu", "bias": False})
    assert cfg.hidden_dim == 88  # 8/3 x 32 = 85.3, rounded up to a multiple of 8
    ffn = SwiGLU(cfg)
    gate, up, down = ffn.gate.weight, ffn.up.weight, ffn.down.weight
    silu = lambda z: z / (1 + torch.exp(-z))  # noqa: E731
    h = torch.randn(2, 3, 32)
    assert torch.allclose(ffn(h), (silu(h @ gate.T) * (h @ up.T)) @ down.T, atol=1e-5)
    dense = GPTConfig(**SMALL)  # three 32 x 88 matrices ~ two 32 x 128: the same parameter budget
    assert abs(3 * 32 * cfg.hidden_dim - 2 * 32 * dense.hidden_dim) / (2 * 32 * dense.hidden_dim) < 0.04


def test_sinusoidal_positions_follow_the_formula():
    table = sinusoidal_positions(10, 6)
    p = 7  # with i = 2: dimension 2i = 4 is a sine, 2i + 1 = 5 a cosine, both at frequency 10000^(-2i/6)
    assert table[p, 4].item() == pytest.approx(math.sin(p / 10000 ** (4 / 6)), abs=1e-6)
    assert table[p, 5].item() == pytest.approx(math.cos(p / 10000 ** (4 / 6)), abs=1e-6)


def test_grouped_query_attention_equals_multi_head_attention_with_shared_key_value_heads():
    torch.manual_seed(0)
    H, D, C = 4, 8, 32
    gqa = MultiHeadAttention(C, C, H, num_kv_heads=2)
    mha = MultiHeadAttention(C, C, H)  # the same, with each K/V head written out once per query head
    q_w, k_w, v_w = gqa.qkv.weight.split([H * D, 2 * D, 2 * D])
    repeat = lambda w: w.view(2, D, C).repeat_interleave(2, dim=0).reshape(H * D, C)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(2, 5, C)
    assert torch.allclose(gqa(x), mha(x), atol=1e-6)
    assert gqa.qkv.weight.shape == (H * D + 2 * 2 * D, C)  # the K/V projections are half as big
    same = MultiHeadAttention(C, C, H, num_kv_heads=H)  # n_kv_heads == n_heads is plain MHA
    assert same.qkv.weight.shape == mha.qkv.weight.shape


def test_the_kv_cache_holds_only_the_key_value_heads():
    full = GPTModel(GPTConfig(**SMALL)).new_kv_cache(2).memory_bytes()
    grouped = GPTModel(GPTConfig(**SMALL, n_kv_heads=2)).new_kv_cache(2).memory_bytes()
    single = GPTModel(GPTConfig(**SMALL, n_kv_heads=1)).new_kv_cache(2).memory_bytes()
    assert full == 2 * 2 * 2 * 4 * 32 * 8 * 4  # K and V x layers x batch x heads x positions x head_dim x fp32
    assert (grouped, single) == (full // 2, full // 4)


def test_one_expert_with_top_1_is_the_dense_ffn():
    torch.manual_seed(0)
    cfg = GPTConfig(**SMALL, ffn="moe", n_experts=1, moe_top_k=1, moe_aux_coef=0.0)
    moe, dense = MixtureOfExperts(cfg), SwiGLU(cfg)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_routing_sends_each_token_to_k_experts_and_the_aux_loss_matches_its_formula():
    torch.manual_seed(0)
    cfg = GPTConfig(**SMALL, ffn="moe", n_experts=4, moe_top_k=2, moe_aux_coef=1.0, moe_z_coef=0.5)
    moe = MixtureOfExperts(cfg)
    x = torch.randn(10, 32)
    logits, chosen, weights = moe.route(x)
    assert chosen.shape == (10, 2) and all(len(set(row)) == 2 for row in chosen.tolist())
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    # A hand-built router output: 4 tokens, 2 experts of 4 each, known probabilities.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2 + [[0.1, 0.2, 0.3, 0.4]] * 2))
    chosen = logits.topk(2, dim=-1).indices  # experts (0, 1) twice, then (3, 2) twice
    share = torch.tensor([2, 2, 2, 2]) / 8    # f_e: each expert got 2 of the 8 slots
    mean_prob = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert moe.balance_loss(logits, chosen).item() == pytest.approx(4 * (share * mean_prob).sum().item())
    skewed = torch.log(torch.tensor([[0.7, 0.2, 0.05, 0.05]] * 4))
    f = torch.tensor([0.5, 0.5, 0.0, 0.0])  # every token to experts 0 and 1
    assert moe.balance_loss(skewed, skewed.topk(2, -1).indices).item() == pytest.approx(
        4 * (f * torch.tensor([0.7, 0.2, 0.05, 0.05])).sum().item())  # 1.8: above the even 1.0
    assert moe.router_z_loss(logits).item() == pytest.approx(0.5 * (torch.logsumexp(logits, -1) ** 2).mean().item())


def test_the_mixture_of_experts_loss_enters_training_only():
    from minigpt.train import calc_loss_batch

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**SMALL, ffn="moe", n_experts=4, moe_top_k=2))
    x, y = torch.randint(50, (2, 8)), torch.randint(50, (2, 8))
    train_loss = calc_loss_batch(x, y, model, "cpu")
    aux_loss = model(x, details=True).aux_loss
    assert aux_loss is not None and aux_loss.item() > 0
    cross_entropy = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert train_loss.item() == pytest.approx(cross_entropy.item() + aux_loss.item(), rel=1e-5)
    model.eval()
    assert calc_loss_batch(x, y, model, "cpu").item() == pytest.approx(cross_entropy.item(), rel=1e-5)


ARCHITECTURES = {
    "gpt2": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "sinusoidal": {"pos_emb": "sinusoidal"},
    "rope+gqa": {"pos_emb": "rope", "n_kv_heads": 2},
    "rope+mqa": {"pos_emb": "rope", "n_kv_heads": 1},
    "swiglu": {"ffn": "swiglu", "bias": False},
    "moe+shared": {"ffn": "moe", "n_experts": 3, "moe_top_k": 2, "moe_shared_expert": True, "pos_emb": "rope"},
}


@pytest.mark.parametrize("switches", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_the_kv_cache_gives_the_same_text_and_logits_for_every_architecture(switches):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**SMALL, **switches})).eval()
    prompt = torch.randint(50, (2, 6))
    assert torch.equal(generate(model, prompt, 12, use_cache=True), generate(model, prompt, 12, use_cache=False))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        full = model(prompt)
        stepwise = torch.cat([model(prompt[:, :4], cache), model(prompt[:, 4:5], cache), model(prompt[:, 5:], cache)], 1)
    assert torch.allclose(full, stepwise, atol=1e-5)


def test_bad_switches_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="n_kv_heads \\(3\\) must divide n_heads \\(4\\)"):
        GPTConfig(**SMALL, n_kv_heads=3)
    with pytest.raises(ConfigError, match="Did you mean 'rope'"):
        GPTConfig(**SMALL, pos_emb="rop")
    with pytest.raises(ConfigError, match="moe_top_k must be between 1 and 2"):
        GPTConfig(**SMALL, ffn="moe", n_experts=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="not GPT-2's architecture"):
        save_hf_gpt2(GPTModel(GPTConfig(**SMALL, norm="rmsnorm")), tmp_path / "hf")


@pytest.mark.parametrize("preset", ["llama-tiny", "moe-tiny"])
def test_the_modern_presets_train_in_quick_mode(preset, tmp_path):
    from minigpt.task_pretrain import pretrain

    verdict = find_verdict()
    if verdict is None:
        pytest.skip("the-verdict.txt is not available offline")
    run = resolve_run_config({}, {"model": preset, "data": str(verdict), "out": str(tmp_path / preset),
                                  "max_steps": 12, "eval_freq": 4})
    _, _, metrics, _ = pretrain(run)
    assert metrics["final_val_loss"] < metrics["val_losses"][0] - 0.5, metrics["val_losses"]
    saved = json.loads((tmp_path / preset / "config.json").read_text())
    assert saved["model"]["pos_emb"] == "rope" and saved["model"]["n_kv_heads"] == 2
    assert model_config(preset).ffn == ("moe" if preset == "moe-tiny" else "swiglu")


def test_a_token_runs_through_top_k_experts_only():
    cfg = GPTConfig(**SMALL, ffn="moe", n_experts=4, moe_top_k=2, bias=False)
    with torch.device("meta"):
        moe, dense = GPTModel(cfg), GPTModel(GPTConfig(**{**SMALL, "ffn": "swiglu", "bias": False}))
    expert = 3 * 32 * cfg.hidden_dim  # gate, up and down of one SwiGLU expert, no biases
    router = 32 * 4
    assert moe.num_parameters() - dense.num_parameters() == 2 * (3 * expert + router)  # 2 layers
    assert moe.num_active_parameters() == dense.num_parameters() + 2 * (expert + router)
    assert dense.num_active_parameters() == dense.num_parameters()
    # the training FLOPs count the same weights: 6 per active matrix weight, plus attention
    assert moe.flops_per_token(16) - dense.flops_per_token(16) == 6 * 2 * (expert + router)
