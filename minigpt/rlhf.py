"""Alignment (chapter 8): teaching a model which of two answers people prefer.

All the methods here push up the probability of preferred answers while a KL "leash" keeps
the model near a frozen reference (the instruction-tuned model it started from):

    maximise  E[r(x, y)] - beta * KL(pi(. | x) || pi_ref(. | x))

- DPO (Rafailov et al., 2023) solves this objective in closed form for a Bradley-Terry
  preference model and trains on (prompt, chosen, rejected) pairs directly, with no reward
  model and no sampling: `dpo_loss`.
- PPO-RLHF samples answers, scores them with a reward, and follows the policy gradient with
  a clipped ratio and a learned value baseline: `gae`, `ppo_policy_loss`, `ppo_value_loss`,
  and the per-token KL estimators `kl_k1`, `kl_k3`.

Every method compares log-probabilities of answer tokens, which `sequence_logprobs` reads
from a model's logits and the IGNORE_INDEX-masked targets that
`minigpt.data.preference_collate` builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minigpt.config import ConfigError
from minigpt.data import IGNORE_INDEX

DPO_LOSS_TYPES = ("sigmoid", "ipo")


# ---------------------------------------------------------------------------------------
# Log-probabilities of answers
# ---------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position (B, T); 0 where the target is IGNORE_INDEX."""
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    logprobs = torch.log_softmax(logits.float(), dim=-1)                    # (B, T, V)
    picked = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)   # (B, T)
    return picked * mask


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """The log-probability of each row's answer (B,): the sum over its scored tokens, or with
    `average` their mean (which does not favour short answers)."""
    per_token = token_logprobs(logits, targets)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    return total / (targets != IGNORE_INDEX).sum(dim=-1).clamp(min=1)


def answer_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    average: bool = False) -> torch.Tensor:
    """`sequence_logprobs` of a model's answers: one forward pass over the padded batch."""
    return sequence_logprobs(model(inputs), targets, average)


# ---------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation: (mean loss, chosen rewards, rejected rewards).

    The implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)); the loss asks
    the chosen answer's reward to exceed the rejected one's. With the margin
    h = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid  -log sigma(beta h): Bradley-Terry's likelihood of the preference. With
             `label_smoothing` eps (conservative DPO: eps of the labels may be wrong) it is
             -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    ipo      (h - 1 / (2 beta))^2 (Azar et al., 2023): drives the margin to a fixed size
             instead of to infinity, so it cannot overfit the preferences as far.

    At the first step the policy is the reference, h = 0, and the sigmoid loss is ln 2.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}.")
    if not beta > 0:
        raise ConfigError(f"dpo beta must be positive, got {beta}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo label_smoothing must lie in [0, 0.5), got {label_smoothing}.")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# ---------------------------------------------------------------------------------------
# PPO's pieces
# ---------------------------------------------------------------------------------------

def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate log pi - log pi_ref: unbiased, but noisy and can be negative."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate r - 1 - log r with r = pi_ref / pi (Schulman's k3): unbiased under
    samples from pi, never negative, and lower in variance than k1."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - 1 - log_ratio


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens: (advantages, returns), each (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t, and A_t = delta_t + gamma lam A_{t+1}, computed from
    the last token backwards; V after an answer's last token (mask 0) is 0. lam = 1 gives
    the Monte-Carlo return minus V, lam = 0 the one-step TD error. Returns = A + V are the
    value head's targets.
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al., 2017): (loss, fraction of tokens clipped).

    ratio = pi / pi_old; the objective min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) stops
    rewarding a token's probability for moving further than eps from where the samples were
    drawn, so several epochs over one batch of samples stay safe.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """Half the squared error of the value head against the returns, taking the larger of the
    plain and the clipped error (the value may move at most `clip` from its old estimate
    before it stops earning credit), as in PPO's reference implementation."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    errors = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(errors, mask)


# ---------------------------------------------------------------------------------------
# The reward model
# ---------------------------------------------------------------------------------------

def add_reward_head(model: torch.nn.Module) -> torch.nn.Module:
    """Turn a GPT into a reward model: its vocabulary head becomes one scalar per position,
    started at zero so that every answer's first reward is the same (0)."""
    from minigpt.finetune import replace_head  # rlhf builds on fine-tuning, which imports the training loop

    return replace_head(model, 1, std=0.0)


def last_scored_positions(targets: torch.Tensor) -> torch.Tensor:
    """Each row's last position whose target counts (B,): where the answer's last token is
    read, the one position that has seen the prompt and the whole answer."""
    positions = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    return torch.where(targets != IGNORE_INDEX, positions, -1).max(dim=1).values


def reward_scores(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """r(prompt, answer) for each row (B,): the reward head at the answer's last token."""
    rewards = model(inputs).squeeze(-1)  # (B, T)
    return rewards.gather(1, last_scored_positions(targets).unsqueeze(1)).squeeze(1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigma(r_chosen - r_rejected): the Bradley-Terry model says the chosen answer wins
    with probability sigma(r_c - r_r); the loss is that probability's negative log-likelihood."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, batches) -> float:
    """The share of pairs whose chosen answer gets the higher reward, over `preference_collate` batches."""
    was_training = model.training
    model.eval()
    wins, pairs = 0, 0
    for batch in batches:
        chosen = reward_scores(model, batch["chosen_inputs"], batch["chosen_targets"])
        rejected = reward_scores(model, batch["rejected_inputs"], batch["rejected_targets"])
        wins += int((chosen > rejected).sum())
        pairs += len(chosen)
    model.train(was_training)
    return wins / max(pairs, 1)


# ---------------------------------------------------------------------------------------
# DPO training: a policy, its frozen reference, and preference batches
# ---------------------------------------------------------------------------------------

def dpo_batch_loss(policy: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor],
                   beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss on one `preference_collate` batch, and what to log: the mean implicit rewards
    of the chosen and rejected answers, their margin, and the share of pairs ranked right."""
    policy_chosen = answer_logprobs(policy, batch["chosen_inputs"], batch["chosen_targets"])
    policy_rejected = answer_logprobs(policy, batch["rejected_inputs"], batch["rejected_targets"])
    with torch.no_grad():  # the reference only measures: no graph, no gradient
        ref_chosen = answer_logprobs(reference, batch["chosen_inputs"], batch["chosen_targets"])
        ref_rejected = answer_logprobs(reference, batch["rejected_inputs"], batch["rejected_targets"])
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                      beta, loss_type, label_smoothing)
    margins = chosen_rewards - rejected_rewards
    return loss, {"loss": loss.item(), "chosen_reward": chosen_rewards.mean().item(),
                  "rejected_reward": rejected_rewards.mean().item(), "margin": margins.mean().item(),
                  "accuracy": (margins > 0).float().mean().item()}


@torch.no_grad()
def evaluate_dpo(policy: torch.nn.Module, reference: torch.nn.Module, batches, beta: float = 0.1) -> dict[str, float]:
    """`dpo_batch_loss`'s numbers averaged over batches (pairs weighted equally), dropout off."""
    was_training = policy.training
    policy.eval()
    totals: dict[str, float] = {}
    pairs = 0
    for batch in batches:
        size = len(batch["chosen_inputs"])
        _, numbers = dpo_batch_loss(policy, reference, batch, beta)
        for key, value in numbers.items():
            totals[key] = totals.get(key, 0.0) + value * size
        pairs += size
    policy.train(was_training)
    return {key: value / pairs for key, value in totals.items()}
