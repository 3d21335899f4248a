"""The teaching path computes what the production attention computes, and each step is
checked against a hand-worked or independently written reference."""

import math

import pytest
import torch

from minigpt.attention import (CausalAttention, ExplicitMultiHeadAttention, MultiHeadAttention,
                               MultiHeadAttentionWrapper, SelfAttention, simple_self_attention)

# "Your journey starts with one step": the book's six 3-d token embeddings.
INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                       [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])


def test_simple_self_attention_matches_the_hand_worked_example():
    context = simple_self_attention(INPUTS)
    # The book works out the context vector of "journey" (row 2) by hand: [0.4419, 0.6515, 0.5683].
    assert torch.allclose(context[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4)
    # And every row, written as explicit loops over the formula softmax(x_i . x_j) x_j:
    for i in range(6):
        scores = torch.tensor([float(INPUTS[i] @ INPUTS[j]) for j in range(6)])
        weights = torch.exp(scores) / torch.exp(scores).sum()
        assert torch.allclose(context[i], sum(weights[j] * INPUTS[j] for j in range(6)), atol=1e-6)


def test_self_attention_is_scaled_softmax_of_projections():
    attention = SelfAttention(3, 2)
    q, k, v = attention.W_query(INPUTS), attention.W_key(INPUTS), attention.W_value(INPUTS)
    expected = torch.softmax(q @ k.T / math.sqrt(2), dim=-1) @ v
    assert torch.allclose(attention(INPUTS), expected, atol=1e-6)


def test_causal_attention_equals_self_attention_on_each_prefix():
    causal = CausalAttention(3, 2, context_length=6, dropout=0.0)
    full = SelfAttention(3, 2)
    full.load_state_dict(causal.state_dict())  # same W_query / W_key / W_value
    out = causal(INPUTS.unsqueeze(0))[0]
    for t in range(6):  # position t attends over tokens 0..t only
        assert torch.allclose(out[t], full(INPUTS[: t + 1])[t], atol=1e-6)


def test_causal_dropout_zeros_some_weights_in_training_only():
    causal = CausalAttention(3, 2, context_length=6, dropout=0.5)
    causal.eval()
    assert torch.equal(causal(INPUTS.unsqueeze(0)), causal(INPUTS.unsqueeze(0)))
    causal.train()
    assert not torch.equal(causal(INPUTS.unsqueeze(0)), causal(INPUTS.unsqueeze(0)))


def copy_wrapper_into_explicit(wrapper: MultiHeadAttentionWrapper, explicit: ExplicitMultiHeadAttention):
    """Head h of the wrapper owns rows [h*D, (h+1)*D) of each explicit projection."""
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            stacked = torch.cat([getattr(head, name).weight for head in wrapper.heads], dim=0)
            getattr(explicit, name).weight.copy_(stacked)
            if getattr(explicit, name).bias is not None:
                getattr(explicit, name).bias.copy_(torch.cat([getattr(h, name).bias for h in wrapper.heads]))
        explicit.out_proj.load_state_dict(wrapper.out_proj.state_dict())


def copy_explicit_into_fused(explicit: ExplicitMultiHeadAttention, fused: MultiHeadAttention):
    """The fused projection is the query, key and value matrices stacked in that order."""
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([explicit.W_query.weight, explicit.W_key.weight,
                                          explicit.W_value.weight], dim=0))
        if fused.qkv.bias is not None:
            fused.qkv.bias.copy_(torch.cat([explicit.W_query.bias, explicit.W_key.bias, explicit.W_value.bias]))
        fused.out_proj.load_state_dict(explicit.out_proj.state_dict())


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.3, False)])
def test_teaching_and_production_multi_head_attention_are_the_same_function(qkv_bias, dropout, training):
    d_model, heads, context_length = 24, 4, 10
    wrapper = MultiHeadAttentionWrapper(d_model, d_model, context_length, dropout, heads, qkv_bias)
    explicit = ExplicitMultiHeadAttention(d_model, d_model, context_length, dropout, heads, qkv_bias)
    fused = MultiHeadAttention(d_model, d_model, heads, dropout=dropout, qkv_bias=qkv_bias)
    copy_wrapper_into_explicit(wrapper, explicit)
    copy_explicit_into_fused(explicit, fused)
    for module in (wrapper, explicit, fused):
        module.train(training)
    x = torch.randn(3, 7, d_model)
    reference = wrapper(x)
    assert reference.shape == (3, 7, d_model)
    assert torch.allclose(explicit(x), reference, atol=1e-5)
    assert torch.allclose(fused(x), reference, atol=1e-5)


def test_multi_head_attention_is_causal():
    fused = MultiHeadAttention(16, 16, 2).eval()
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[0, 5:] = torch.randn(3, 16)  # change the future of position 4
    assert torch.allclose(fused(x)[0, :5], fused(changed)[0, :5], atol=1e-6)
    assert not torch.allclose(fused(x)[0, 5:], fused(changed)[0, 5:])
