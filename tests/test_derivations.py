"""The handbook's derivations, each checked against torch: the cross-entropy gradient (chapter 5),
Adam's bias correction and decoupled weight decay (chapter 5), backpropagation through LayerNorm and
a transformer block (chapter 4), and the policy-gradient theorem behind PPO (chapter 8)."""

import itertools

import torch
import torch.nn.functional as F

from minigpt.blocks import LayerNorm, TransformerBlock
from minigpt.config import GPTConfig, TrainConfig
from minigpt.rlhf import ppo_policy_loss
from minigpt.train import calc_loss_batch, make_optimizer


# ---------------------------------------------------------------------------------------
# Chapter 5, section 5.1: d loss / d logits = (softmax(z) - onehot(y)) / N
# ---------------------------------------------------------------------------------------

class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are one trainable tensor, so that autograd's gradient is d loss / d logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits  # (B, T, V), whatever the ids


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    torch.manual_seed(0)
    batch, num_tokens, vocab = 2, 3, 5
    model = FixedLogits(3 * torch.randn(batch, num_tokens, vocab, dtype=torch.float64))
    targets = torch.randint(vocab, (batch, num_tokens))
    calc_loss_batch(torch.zeros_like(targets), targets, model, "cpu").backward()
    n = batch * num_tokens  # the loss is a mean over every position
    derived = (torch.softmax(model.logits.detach(), dim=-1) - F.one_hot(targets, vocab)) / n
    assert torch.allclose(model.logits.grad, derived, atol=1e-12)
    # Each position's gradient sums to zero: raising every logit by the same amount changes nothing.
    assert torch.allclose(model.logits.grad.sum(-1), torch.zeros(batch, num_tokens, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------------------------
# Chapter 5, section 5.4: Adam's moments, bias correction, decoupled weight decay
# ---------------------------------------------------------------------------------------

def test_moving_average_from_zero_is_short_by_one_minus_beta_to_the_t():
    beta2, g = 0.999, 2.0
    v = 0.0
    for t in range(1, 11):
        v = beta2 * v + (1 - beta2) * g**2  # a constant squared gradient of 4
        assert abs(v - (1 - beta2**t) * g**2) < 1e-12   # the average is short by the factor 1 - beta^t
        assert abs(v / (1 - beta2**t) - g**2) < 1e-12   # and the correction restores it
    assert round(1 - beta2, 6) == 0.001 and round(1 - beta2**10, 6) == 0.009955


def adamw_by_hand(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float,
                  betas: tuple[float, float], eps: float, decays: list[float]) -> list[torch.Tensor]:
    """AdamW written from the formulas of section 5.4, one list of gradients per step."""
    beta1, beta2 = betas
    weights = [w.clone() for w in weights]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v[i] / (1 - beta2**t)
            weights[i] = weights[i] - lr * (m_hat / (v_hat.sqrt() + eps) + decays[i] * weights[i])
    return weights


def test_adamw_by_hand_equals_make_optimizer_after_several_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)  # a matrix (decayed) and a bias (not decayed)
    cfg = TrainConfig(learning_rate=0.05, weight_decay=0.1, beta1=0.9, beta2=0.99)
    optimizer = make_optimizer(model, cfg)
    start = [p.detach().clone() for p in model.parameters()]
    grads = [[torch.randn_like(p) * scale for p in model.parameters()] for scale in (1.0, 10.0, 0.1, 3.0, 1.0)]
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
    expected = adamw_by_hand(start, grads, lr=0.05, betas=(0.9, 0.99), eps=1e-8, decays=[0.1, 0.0])
    for p, w in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), w, atol=1e-6), (p, w)


def test_decoupled_decay_differs_from_decay_added_to_the_gradient():
    # Coupled (Adam + L2): lambda w joins the gradient and is then divided by sqrt(v_hat).
    w0, g = torch.tensor([1.0, -2.0]), torch.tensor([10.0, 0.0])
    weights = {}
    for name, cls in (("coupled", torch.optim.Adam), ("decoupled", torch.optim.AdamW)):
        w = torch.nn.Parameter(w0.clone())
        optimizer = cls([w], lr=0.1, weight_decay=0.1)
        w.grad = g.clone()
        optimizer.step()
        weights[name] = w.detach()
    # Step 1 of Adam moves every weight with a nonzero gradient by lr * sign(gradient): the decay
    # hidden in the gradient is normalised away ...
    assert torch.allclose(weights["coupled"], w0 - 0.1 * torch.sign(g + 0.1 * w0), atol=1e-6)
    # ... while the decoupled decay shrinks every weight by (1 - lr * lambda) whatever its gradient.
    assert torch.allclose(weights["decoupled"], w0 * (1 - 0.1 * 0.1) - 0.1 * torch.sign(g), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Chapter 4, sections 4.5-4.6: backpropagation through LayerNorm and a block
# ---------------------------------------------------------------------------------------

def layer_norm_backward(x: torch.Tensor, scale: torch.Tensor, upstream: torch.Tensor, eps: float) -> torch.Tensor:
    """d loss / d x of LayerNorm from chapter 4's formula: (g - mean(g) - x_hat * mean(g * x_hat)) / sigma."""
    sigma = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + eps)  # (..., 1)
    x_hat = (x - x.mean(dim=-1, keepdim=True)) / sigma                     # (..., C)
    g = scale * upstream                                                   # (..., C)
    return (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) / sigma


def test_layer_norm_backward_formula_equals_autograd():
    torch.manual_seed(0)
    norm = LayerNorm(6).double()
    with torch.no_grad():
        norm.scale.copy_(torch.randn(6))
        norm.shift.copy_(torch.randn(6))
    x = (torch.randn(2, 3, 6, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    upstream = torch.randn(2, 3, 6, dtype=torch.float64)
    (norm(x) * upstream).sum().backward()  # the loss whose d/d output is `upstream`
    derived = layer_norm_backward(x.detach(), norm.scale.detach(), upstream, norm.eps)
    assert torch.allclose(x.grad, derived, atol=1e-10)
    # The gradient is orthogonal to the directions LayerNorm ignores: a shift of every input.
    assert torch.allclose(x.grad.sum(-1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-10)


def small_block() -> TransformerBlock:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
    return TransformerBlock(cfg).double().eval()


def test_block_jacobian_is_identity_plus_the_branches():
    block = small_block()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    size = x.numel()

    def attention_branch(x):
        return block.att(block.norm1(x))

    def ffn_branch(h):
        return block.ff(block.norm2(h))

    def jacobian(f, at):
        return torch.autograd.functional.jacobian(f, at).reshape(size, size)

    eye = torch.eye(size, dtype=torch.float64)
    h = x + attention_branch(x)  # the stream between the two branches
    chain_rule = (eye + jacobian(ffn_branch, h)) @ (eye + jacobian(attention_branch, x))
    assert torch.allclose(jacobian(block, x), chain_rule, atol=1e-10)
    # With both branches' output projections zeroed the block is the identity, and so is its
    # Jacobian: the upstream gradient reaches x unchanged ...
    with torch.no_grad():
        for layer in (block.att.out_proj, block.ff.layers[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    assert torch.equal(jacobian(block, x), eye)
    # ... and the zeroed projections still get a gradient, so they leave zero at the first step.
    block(x).pow(2).sum().backward()
    assert block.att.out_proj.weight.grad.abs().max() > 0 and block.ff.layers[2].weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------
# Chapter 8, section 8.4: the policy-gradient theorem, the baseline, and PPO at ratio 1
# ---------------------------------------------------------------------------------------

VOCAB, LENGTH = 3, 2  # sequences y = (y1, y2), each token one of 3


def sequence_logprob(first: torch.Tensor, second: torch.Tensor, y: tuple[int, int]) -> torch.Tensor:
    """log pi(y) = log pi(y1) + log pi(y2 | y1): the per-token sum."""
    return torch.log_softmax(first, -1)[y[0]] + torch.log_softmax(second[y[0]], -1)[y[1]]


def policy_and_rewards():
    torch.manual_seed(0)
    first = torch.randn(VOCAB, dtype=torch.float64, requires_grad=True)            # logits of y1
    second = torch.randn(VOCAB, VOCAB, dtype=torch.float64, requires_grad=True)    # logits of y2, one row per y1
    sequences = list(itertools.product(range(VOCAB), repeat=LENGTH))                # all 9 answers
    rewards = torch.randn(len(sequences), dtype=torch.float64) + 2.0               # R(y), mostly positive
    return first, second, sequences, rewards


def score_functions(first, second, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """pi(y) and grad log pi(y) (flattened over both logit tensors) for every sequence."""
    probs, grads = [], []
    for y in sequences:
        logp = sequence_logprob(first, second, y)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, (first, second))]))
        probs.append(logp.exp().detach())
    return torch.stack(probs), torch.stack(grads)  # (9,), (9, 12)


def test_policy_gradient_theorem_on_a_sequence_policy():
    first, second, sequences, rewards = policy_and_rewards()
    # The exact gradient: autograd through the expected reward sum_y pi(y) R(y).
    expected_reward = sum(sequence_logprob(first, second, y).exp() * r for y, r in zip(sequences, rewards))
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(expected_reward, (first, second))])
    probs, score = score_functions(first, second, sequences)
    assert torch.allclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    # The log-derivative trick, enumerated: E[R grad log pi] = sum_y pi(y) R(y) grad log pi(y).
    assert torch.allclose((probs * rewards) @ score, exact, atol=1e-12)
    # A baseline adds b E[grad log pi] = b grad sum_y pi(y) = 0.
    assert torch.allclose(probs @ score, torch.zeros_like(exact), atol=1e-12)
    # REINFORCE: sample sequences, average R(y) grad log pi(y); within 4 standard errors of the exact gradient.
    generator = torch.Generator().manual_seed(1)
    samples = torch.multinomial(probs, 20_000, replacement=True, generator=generator)
    baseline = (probs * rewards).sum()  # the expected reward, the best constant baseline's usual stand-in
    for b in (0.0, baseline):
        per_sample = (rewards[samples] - b)[:, None] * score[samples]  # (20000, 12)
        mean = per_sample.mean(0)
        standard_error = per_sample.std(0) / per_sample.shape[0] ** 0.5
        assert ((mean - exact).abs() <= 4 * standard_error + 1e-12).all(), (mean, exact, standard_error)
    # The baseline keeps the mean and lowers the variance.
    plain = rewards[samples, None] * score[samples]
    centred = (rewards[samples] - baseline)[:, None] * score[samples]
    assert centred.var(0).sum() < plain.var(0).sum()


def test_ppo_gradient_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, VOCAB, dtype=torch.float64, requires_grad=True)   # (B, T, V)
    tokens = torch.randint(VOCAB, (2, 4))
    advantages = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    # The first PPO step: the policy is the one that sampled, so every ratio is 1.
    loss, clipped = ppo_policy_loss(logps, logps.detach(), advantages, mask, clip=0.2)
    (ppo_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    surrogate = -(advantages * logps * mask).sum() / mask.sum()  # -mean over tokens of A_t log pi(y_t)
    (pg_grad,) = torch.autograd.grad(surrogate, logits)
    assert clipped == 0.0
    assert torch.allclose(loss, -(advantages * mask).sum() / mask.sum())
    assert torch.allclose(ppo_grad, pg_grad, atol=1e-12)
