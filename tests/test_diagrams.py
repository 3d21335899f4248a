"""The diagrams say what the code does: shapes from a real forward pass equal the shapes worked out
by hand, labels follow the config, LoRA's counts equal r (d_in + d_out), and no two labels collide."""

import itertools

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from minigpt import diagrams
from minigpt.config import TASKS, GPTConfig

# GPT-2's architecture at the width of chapter 3's example: C = 12, H = 4, D = 3.
SMALL = GPTConfig(vocab_size=10, context_length=16, emb_dim=12, n_heads=4, n_layers=1, drop_rate=0.0)
# Llama's: RMSNorm, RoPE, SwiGLU and 2 key/value heads serving 4 query heads; C = 16, D = 4.
GROUPED = GPTConfig(vocab_size=10, context_length=16, emb_dim=16, n_heads=4, n_kv_heads=2, n_layers=2,
                    drop_rate=0.0, norm="rmsnorm", pos_emb="rope", ffn="swiglu", bias=False)


def texts(fig: Figure) -> str:
    """Every text drawn on the figure, one per line."""
    return "\n".join(text.get_text() for ax in fig.axes for text in ax.texts)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_attention_shapes_are_the_shapes_worked_out_by_hand():
    # B = 2, T = 6, C = 12, H = 4, D = 3 (chapter 3's table).
    assert diagrams.attention_shapes(SMALL, batch=2, num_tokens=6) == {
        "x": (2, 6, 12), "qkv": (2, 6, 36), "queries": (2, 6, 12), "keys": (2, 6, 12), "values": (2, 6, 12),
        "query heads": (2, 4, 6, 3), "key heads": (2, 4, 6, 3), "value heads": (2, 4, 6, 3),
        "keys per query head": (2, 4, 6, 3), "values per query head": (2, 4, 6, 3),
        "scores": (2, 4, 6, 6), "weights": (2, 4, 6, 6), "context": (2, 4, 6, 3), "merged": (2, 6, 12),
        "output": (2, 6, 12)}
    # B = 3, T = 5, C = 16, H = 4, H_kv = 2, D = 4: qkv is (4 + 2 + 2) x 4 = 32 wide.
    assert diagrams.attention_shapes(GROUPED, batch=3, num_tokens=5) == {
        "x": (3, 5, 16), "qkv": (3, 5, 32), "queries": (3, 5, 16), "keys": (3, 5, 8), "values": (3, 5, 8),
        "query heads": (3, 4, 5, 4), "key heads": (3, 2, 5, 4), "value heads": (3, 2, 5, 4),
        "keys per query head": (3, 4, 5, 4), "values per query head": (3, 4, 5, 4),
        "scores": (3, 4, 5, 5), "weights": (3, 4, 5, 5), "context": (3, 4, 5, 4), "merged": (3, 5, 16),
        "output": (3, 5, 16)}


def test_attention_shapes_refuse_steps_that_no_longer_match_the_module(monkeypatch):
    """If MultiHeadAttention computed something else (here: scores left unscaled), the diagram says so."""
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr("minigpt.attention.F.scaled_dot_product_attention",
                        lambda *args, **kwargs: fused(*args, **kwargs, scale=1.0))
    with pytest.raises(RuntimeError, match="_attention_steps"):
        diagrams.attention_shapes(SMALL)


def test_block_labels_follow_the_config():
    gpt2 = diagrams.block_labels(SMALL)
    assert gpt2["norm"] == "LayerNorm"
    assert gpt2["attention"] == "causal multi-head attention"
    assert gpt2["ffn"] == "feed-forward (GELU)"
    assert "Linear 12 → 48" in gpt2["ffn_detail"] and "Linear 48 → 12" in gpt2["ffn_detail"]  # 4 x emb_dim
    assert "qkv: Linear 12 → 36" in gpt2["attention_detail"] and "RoPE" not in gpt2["attention_detail"]
    llama = diagrams.block_labels(GROUPED)
    assert llama["norm"] == "RMSNorm"
    assert llama["attention"] == "grouped-query attention"
    assert "2 K/V heads" in llama["attention_detail"] and "RoPE" in llama["attention_detail"]
    assert llama["ffn"] == "feed-forward (SwiGLU)"
    # 8/3 x 16 = 42.7, rounded up to a multiple of 8: 48.
    assert "gate, up: Linear 16 → 48" in llama["ffn_detail"] and "down: Linear 48 → 16" in llama["ffn_detail"]
    moe = diagrams.block_labels(GPTConfig(emb_dim=16, n_heads=4, n_layers=1, ffn="moe", n_experts=3, moe_top_k=1))
    assert moe["ffn"] == "mixture of experts" and "3 SwiGLU experts, top 1" in moe["ffn_detail"]


def test_the_block_diagram_draws_the_labels_of_its_config():
    gpt2, llama = texts(diagrams.draw_transformer_block(SMALL)), texts(diagrams.draw_transformer_block(GROUPED))
    assert "LayerNorm" in gpt2 and "feed-forward (GELU)" in gpt2 and "RMSNorm" not in gpt2
    assert "RMSNorm" in llama and "feed-forward (SwiGLU)" in llama and "LayerNorm" not in llama
    assert "× n_layers = 2" in llama and "residual stream" in llama


def test_the_attention_diagram_shows_the_measured_shapes():
    drawn = texts(diagrams.draw_attention_flow(GROUPED, batch=3, num_tokens=5))
    for shape in ("(3, 5, 16)", "(3, 5, 32)", "(3, 4, 5, 4)", "(3, 2, 5, 4)", "(3, 4, 5, 5)"):
        assert shape in drawn
    assert "scores  (B, h, T, T)" in drawn and "K  (B, h_kv, T, d_h)" in drawn


def test_the_kv_cache_grows_by_one_position_per_decoding_step():
    steps = diagrams.kv_cache_steps(GROUPED, batch=2, prompt_tokens=3, new_tokens=2)
    assert [step["fed"] for step in steps] == [3, 1, 1]
    assert [step["computed"] for step in steps] == [(0, 3), (3, 4), (4, 5)]
    assert [step["keys"] for step in steps] == [(2, 2, 3, 4), (2, 2, 4, 4), (2, 2, 5, 4)]  # (B, h_kv, T, d_h)
    assert all(step["values"] == step["keys"] for step in steps)
    assert all(step["reused"] for step in steps)
    assert all(step["storage"] == (2, 2, 5, 4) for step in steps)
    drawn = texts(diagrams.draw_kv_cache(GROUPED, batch=2, prompt_tokens=3, new_tokens=2))
    assert "prefill" in drawn and "decode step 2" in drawn and "K, V: (2, 2, 5, 4) each" in drawn


def test_lora_counts_are_r_times_d_in_plus_d_out():
    counts = diagrams.lora_counts(768, 2304, rank=8, alpha=16)
    assert counts["trainable"] == 8 * (768 + 2304) == 24_576   # chapter 7's GPT-2 small qkv
    assert counts["frozen"] == 768 * 2304 == 1_769_472
    assert (counts["A"], counts["B"], counts["W"], counts["scaling"]) == ((8, 768), (2304, 8), (2304, 768), 2.0)
    assert diagrams.lora_counts(10, 6, rank=2, alpha=1)["trainable"] == 2 * (10 + 6)
    drawn = texts(diagrams.draw_lora(768, 2304, rank=8, alpha=16))
    assert "24,576" in drawn and "1,769,472" in drawn and "α / r = 16 / 8 = 2" in drawn


def test_the_pipeline_names_minigpt_tasks():
    tasks = [stage[0] for stage in diagrams.PIPELINE]
    assert set(tasks) <= set(TASKS)
    assert {"pretrain", "sft", "reward", "ppo", "dpo", "grpo"} == set(tasks)
    drawn = texts(diagrams.draw_training_pipeline())
    assert all(f"--task {task}" in drawn for task in tasks)
    assert "instruction-data-with-preference.json" in drawn


def colliding_labels(fig: Figure) -> list:
    """Texts that overlap another text, or leave the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for ax in fig.axes for text in ax.texts
             if text.get_text().strip()]
    outside = [name for name, box in boxes
               if box.x0 < 0 or box.y0 < 0 or box.x1 > fig.bbox.width or box.y1 > fig.bbox.height]
    return outside + [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


@pytest.mark.parametrize("draw", [
    lambda: diagrams.draw_transformer_block(GROUPED), lambda: diagrams.draw_attention_flow(GROUPED),
    lambda: diagrams.draw_kv_cache(SMALL), lambda: diagrams.draw_lora(), lambda: diagrams.draw_lora(64, 64, 4, 8),
    diagrams.draw_training_pipeline], ids=["block", "attention", "kv-cache", "lora", "lora-square", "pipeline"])
def test_no_label_overlaps_another_or_leaves_the_figure(draw):
    fig = draw()
    assert isinstance(fig, Figure) and round(fig.get_figwidth() * fig.dpi) == 803  # the handbook's ~800 px
    assert colliding_labels(fig) == []


def test_the_collision_check_finds_a_collision():
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.52, 0.5, "another label")
    assert colliding_labels(fig) == [("one label", "another label")]
