"""Alignment (chapter 8): teaching a model which of two answers people prefer.

All the methods here push up the probability of preferred answers while a KL "leash" keeps
the model near a frozen reference (the instruction-tuned model it started from):

    maximise  E[r(x, y)] - beta * KL(pi(. | x) || pi_ref(. | x))

- DPO (Rafailov et al., 2023) solves this objective in closed form for a Bradley-Terry
  preference model and trains on (prompt, chosen, rejected) pairs directly, with no reward
  model and no sampling: `dpo_loss`.
- A reward model learns to score answers from the same pairs (Bradley-Terry): `add_reward_head`,
  `reward_scores`, `bradley_terry_loss`.
- PPO-RLHF samples answers, scores them with a reward, and follows the policy gradient with
  a clipped ratio and a learned value baseline: `sample_responses`, `gae`, `ppo_policy_loss`,
  `ppo_value_loss`, the per-token KL estimators `kl_k1`, `kl_k3`, and `ppo_update`.
- GRPO (Shao et al., 2024) drops the value model: it samples a group of answers per prompt
  and uses each answer's reward relative to its group as the advantage: `group_advantages`,
  `grpo_update`. It needs a reward it can check, such as `exact_match_rewards` on the
  arithmetic problems of `arithmetic_records`.

Every method compares log-probabilities of answer tokens, which `sequence_logprobs` reads
from a model's logits and the IGNORE_INDEX-masked targets that
`minigpt.data.preference_collate` builds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt.config import ConfigError, RunConfig
from minigpt.data import (CHAT_TOKENS, IGNORE_INDEX, InstructionDataset, PreferenceDataset, encode_prompt,
                          format_prompt, instruction_collate, load_instruction_data, load_preference_data,
                          preference_collate, require_end_of_text, split_dataset)
from minigpt.finetune import (SFT_SPLIT, fingerprint, grow_vocabulary, make_loader, replace_head,
                              starting_point)
from minigpt.generation import generate
from minigpt.model import GPTModel
from minigpt.plot import plot_panels
from minigpt.tokenizer import END_OF_TEXT, BPETokenizer, get_tokenizer, tokenizer_from_spec
from minigpt.train import (BEST_NAME, CHECKPOINT_NAME, StopRequest, calc_loss_batch, choose_run_dir,
                           learning_rate_at, load_checkpoint, load_model, pick_device, print_rows, save_checkpoint,
                           save_weights)

DPO_LOSS_TYPES = ("sigmoid", "ipo")


# ---------------------------------------------------------------------------------------
# Log-probabilities of answers
# ---------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position (B, T); 0 where the target is IGNORE_INDEX.

    The softmax runs over the scored positions only (N, V): with GPT-2's 50,257 tokens and a
    prompt longer than its answer, that is most of the memory and time saved."""
    mask = targets != IGNORE_INDEX
    scored = torch.log_softmax(logits[mask].float(), dim=-1)                # (N, V)
    picked = torch.zeros(targets.shape, dtype=scored.dtype, device=logits.device)
    picked[mask] = scored.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    return picked                                                           # (B, T)


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
    return replace_head(model, 1, std=0.0)


def last_scored_positions(targets: torch.Tensor) -> torch.Tensor:
    """Each row's last position whose target counts (B,): where the answer's last token is
    read, the one position that has seen the prompt and the whole answer."""
    positions = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    return torch.where(targets != IGNORE_INDEX, positions, -1).max(dim=1).values


def reward_scores(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """r(prompt, answer) for each row (B,): the reward head at the answer's last token."""
    positions = last_scored_positions(targets)
    if bool((positions < 0).any()):
        raise ConfigError("a row has no answer tokens to score (its prompt fills the whole window); keep "
                          "prompts shorter than max_length, or raise max_length.")
    rewards = model(inputs).squeeze(-1)  # (B, T)
    return rewards.gather(1, positions.unsqueeze(1)).squeeze(1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigma(r_chosen - r_rejected): the Bradley-Terry model says the chosen answer wins
    with probability sigma(r_c - r_r); the loss is that probability's negative log-likelihood."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, batches) -> float:
    """The share of pairs whose chosen answer gets the higher reward, over `preference_collate`
    batches; a tie counts as half a win (a model that cannot tell answers apart scores 0.5)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins, pairs = 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        chosen = reward_scores(model, batch["chosen_inputs"], batch["chosen_targets"])
        rejected = reward_scores(model, batch["rejected_inputs"], batch["rejected_targets"])
        wins += float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())
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
    ranked_right = (margins > 0).float() + 0.5 * (margins == 0).float()  # a tie is half right, as for reward models
    return loss, {"loss": loss.item(), "chosen_reward": chosen_rewards.mean().item(),
                  "rejected_reward": rejected_rewards.mean().item(), "margin": margins.mean().item(),
                  "accuracy": ranked_right.mean().item()}


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


# ---------------------------------------------------------------------------------------
# Rollouts: the policy answers prompts, and the answers become training rows
# ---------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Sampled answers laid out like a training batch.

    Row i is prompt + answer (its <|endoftext|> included when the model stopped), as
    `inputs` (B, T) and next-token `targets` (B, T) whose only scored entries are the answer's
    tokens: the actions the policy took. `prompt_index[i]` says which prompt row i answers
    (GRPO's groups); `texts[i]` is the answer decoded, without the end-of-text.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    prompt_index: list[int]
    texts: list[str]

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


@torch.no_grad()
def sample_responses(policy: torch.nn.Module, prompts: list[list[int]], tokenizer, samples_per_prompt: int = 1,
                     max_new_tokens: int = 32, generator: torch.Generator | None = None,
                     greedy: bool = False) -> Rollout:
    """Sample `samples_per_prompt` answers to every prompt at temperature 1 with no top-k or top-p,
    so the answers come from exactly the distribution whose log-probabilities the losses read
    (`greedy`: the most likely answer instead, to measure the policy).

    The model has no padding mask, so prompts are batched by length: every batch is a set of
    prompts of one length (GRPO's group is one prompt repeated).
    """
    device = next(policy.parameters()).device
    eos = tokenizer.eos_id
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if len(prompt) + 1 > policy.cfg.context_length:
            raise ConfigError(f"a prompt of {len(prompt)} tokens leaves no room to answer in the model's "
                              f"context of {policy.cfg.context_length}; use shorter prompts.")
        by_length.setdefault(len(prompt), []).append(i)
    rows: list[tuple[int, list[int], list[int]]] = []  # (prompt index, prompt ids, answer ids)
    for length, members in by_length.items():
        batch = torch.tensor([prompts[i] for i in members for _ in range(samples_per_prompt)], device=device)
        room = min(max_new_tokens, policy.cfg.context_length - length)
        out = generate(policy, batch, room, temperature=0.0 if greedy else 1.0, eos_id=eos,
                       generator=generator)[:, length:].tolist()
        for row, answer in enumerate(out):
            if eos in answer:  # keep the end-of-text (stopping is an action too), drop the padding
                answer = answer[:answer.index(eos) + 1]
            rows.append((members[row // samples_per_prompt], prompts[members[row // samples_per_prompt]], answer))
    rows.sort(key=lambda r: r[0])  # prompt order; a group's samples stay in sampled order
    width = max(len(p) + len(a) for _, p, a in rows) - 1
    inputs = torch.full((len(rows), width), eos, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (_, prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        inputs[r, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        targets[r, len(prompt) - 1:len(sequence) - 1] = torch.tensor(answer)  # position t predicts token t + 1
    texts = [tokenizer.decode([t for t in answer if t != eos]) for _, _, answer in rows]
    return Rollout(inputs.to(device), targets.to(device), [i for i, _, _ in rows], texts)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of the next-token distribution at every position (logits (..., V) -> (...)), in nats."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def exact_match_rewards(rollout: Rollout, answers: list[str]) -> torch.Tensor:
    """1 for an answer that equals its prompt's reference (spaces at the ends ignored), else 0:
    a reward that cannot be fooled, for tasks whose answers can be checked."""
    return torch.tensor([float(text.strip() == answers[i].strip())
                         for text, i in zip(rollout.texts, rollout.prompt_index)])


def byte_tokenizer(special_tokens: tuple[str, ...] = CHAT_TOKENS) -> BPETokenizer:
    """One token per byte (a BPE with no merges), <|endoftext|>, and the chat format's tokens: 259
    tokens, so a small model's output head is tiny, and every digit of a number is its own token."""
    return BPETokenizer({}, {END_OF_TEXT: 256}).with_special_tokens(special_tokens)


def arithmetic_records(max_operand: int = 19, seed: int = 0) -> list[dict[str, str]]:
    """Every sum a + b with 0 <= a, b <= max_operand as an instruction record, shuffled with `seed`:
    {"instruction": "What is 7 + 5?", "input": "", "output": "12"}. A task whose answers a
    program can check, so a policy's accuracy is an honest number."""
    records = [{"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
               for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(records)
    return records


def supervised_warmup(model: torch.nn.Module, records: list[dict[str, str]], tokenizer, style: str = "chat",
                      steps: int = 300, batch_size: int = 16, learning_rate: float = 1e-3,
                      generator: torch.Generator | None = None) -> list[float]:
    """A short instruction fine-tuning (loss on the answers only) on the task's own records, so that a
    new model knows the answer format before reinforcement learning rewards it. Returns the losses."""
    dataset = InstructionDataset(records, tokenizer, style)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        inputs, targets = instruction_collate([dataset[i] for i in rows], eos_id=tokenizer.eos_id, mask_prompt=True)
        loss = calc_loss_batch(inputs, targets, model, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def exact_match_accuracy(policy: torch.nn.Module, prompts: list[list[int]], answers: list[str], tokenizer,
                         max_new_tokens: int = 8) -> float:
    """The share of prompts the policy answers exactly right when decoding greedily."""
    rollout = sample_responses(policy, prompts, tokenizer, 1, max_new_tokens, greedy=True)
    return exact_match_rewards(rollout, answers).mean().item()


# ---------------------------------------------------------------------------------------
# PPO-RLHF: one round of sampling, scoring and clipped updates
# ---------------------------------------------------------------------------------------

@dataclass
class RLSettings:
    """How PPO and GRPO sample and update (the run's AlignConfig carries these)."""

    beta: float = 0.05          # weight of the KL to the reference (PPO: in the reward; GRPO: in the loss)
    kl_estimator: str = "k1"    # PPO's per-token KL penalty: "k1" or "k3"
    clip: float = 0.2           # the ratio's clip range
    value_clip: float = 0.2     # PPO: how far a value estimate may move before its error stops counting
    value_coef: float = 0.5     # PPO: weight of the value loss
    entropy_coef: float = 0.0   # a bonus for keeping the policy's entropy up
    gamma: float = 1.0          # PPO: discount of later rewards
    lam: float = 0.95           # PPO: GAE's lambda
    epochs: int = 2             # passes over each round's samples
    minibatch_size: int = 16    # rows per update
    grad_clip: float | None = 1.0
    max_new_tokens: int = 8


def _minibatches(rows: int, size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(rows, generator=generator)
    return [order[i:i + size] for i in range(0, rows, size)]


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor],
          grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _policy_terms(policy: torch.nn.Module, rollout: Rollout, rows: torch.Tensor, old_logps: torch.Tensor,
                  advantages: torch.Tensor, clip: float) -> tuple[torch.Tensor, ...]:
    """On the minibatch `rows`: the new log-probabilities, PPO's clipped loss, its clipped share, and
    the policy's mean entropy over the answer tokens."""
    logits = policy(rollout.inputs[rows])
    logps = token_logprobs(logits, rollout.targets[rows])
    mask = rollout.mask[rows]
    loss, clip_fraction = ppo_policy_loss(logps, old_logps[rows], advantages[rows], mask, clip)
    return logps, loss, clip_fraction, token_entropy(logits[mask]).mean()  # over the answer tokens


def _round_summary(logged: dict[str, float], updates: int, scores: torch.Tensor, rollout: Rollout,
                   old_logps: torch.Tensor, ref_logps: torch.Tensor) -> dict[str, float]:
    """What a round logs: the mean of each loss term over its updates, the answers' mean reward, their
    KL to the reference (k1, summed over each answer, as the policy stood when it sampled) and length."""
    mask = rollout.mask
    numbers = {key: value / updates for key, value in logged.items()}
    numbers.update(reward=scores.mean().item(), kl=(kl_k1(old_logps, ref_logps) * mask).sum(-1).mean().item(),
                   answer_tokens=mask.sum(-1).float().mean().item())
    return numbers


def ppo_update(policy: torch.nn.Module, critic: torch.nn.Module, reference: torch.nn.Module,
               optimizer: torch.optim.Optimizer, prompts: list[list[int]], tokenizer,
               reward_fn: Callable[[Rollout], torch.Tensor], settings: RLSettings,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One PPO round: sample an answer per prompt, score it, and take `settings.epochs` passes of
    clipped updates over the samples. Returns what to log.

    The reward of each answer token is -beta * KL(policy || reference) at that token, plus the
    answer's score at its last token; GAE turns these into advantages with the critic's values
    as the baseline, and the critic learns to predict the returns. Dropout stays off so the
    ratio compares the policy with itself.
    """
    policy.eval(), critic.eval(), reference.eval()
    rollout = sample_responses(policy, prompts, tokenizer, 1, settings.max_new_tokens, generator)
    inputs, targets, mask = rollout.inputs, rollout.targets, rollout.mask
    scores = reward_fn(rollout).to(inputs.device).float()                        # (B,)
    with torch.no_grad():
        old_logps = token_logprobs(policy(inputs), targets)                       # (B, T)
        ref_logps = token_logprobs(reference(inputs), targets)
        old_values = critic(inputs).squeeze(-1).float() * mask                    # (B, T)
    estimator = kl_k3 if settings.kl_estimator == "k3" else kl_k1
    kl = estimator(old_logps, ref_logps) * mask
    rewards = -settings.beta * kl
    last = last_scored_positions(targets)
    rewards[torch.arange(len(last)), last] += scores
    advantages, returns = gae(rewards, old_values, mask, settings.gamma, settings.lam)
    # Whitening (mean 0, std 1 over the round's tokens) keeps the step size independent of the reward's scale.
    mean = masked_mean(advantages, mask)
    std = masked_mean((advantages - mean) ** 2, mask).sqrt()
    advantages = (advantages - mean) / (std + 1e-8) * mask

    params = [p for p in list(policy.parameters()) + list(critic.parameters()) if p.requires_grad]
    logged = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    updates = 0
    for _ in range(settings.epochs):
        for rows in _minibatches(len(inputs), settings.minibatch_size, generator):
            _, policy_loss, clip_fraction, entropy = _policy_terms(policy, rollout, rows, old_logps, advantages,
                                                                   settings.clip)
            values = critic(inputs[rows]).squeeze(-1).float()
            value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], settings.value_clip)
            loss = policy_loss - settings.entropy_coef * entropy + settings.value_coef * value_loss
            _step(optimizer, loss, params, settings.grad_clip)
            for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                               ("clip_fraction", clip_fraction), ("entropy", entropy)):
                logged[key] += value.item()
            updates += 1
    return _round_summary(logged, updates, scores, rollout, old_logps, ref_logps)


# ---------------------------------------------------------------------------------------
# GRPO: a group of answers per prompt is its own baseline
# ---------------------------------------------------------------------------------------

def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps) for rows laid out group by group (B,).
    A group whose answers all score the same teaches nothing: its advantages are 0."""
    groups = scores.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=False)
    return ((groups - mean) / (std + eps)).view(-1)


def grpo_update(policy: torch.nn.Module, reference: torch.nn.Module, optimizer: torch.optim.Optimizer,
                prompts: list[list[int]], tokenizer, reward_fn: Callable[[Rollout], torch.Tensor],
                settings: RLSettings, group_size: int = 8,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """One GRPO round: `group_size` answers per prompt, each answer's advantage its reward against
    its group's, every token of an answer sharing it; PPO's clipped ratio, and beta times the
    k3 estimate of KL(policy || reference) added to the loss (beta 0: no leash, the KL only logged)."""
    policy.eval(), reference.eval()
    rollout = sample_responses(policy, prompts, tokenizer, group_size, settings.max_new_tokens, generator)
    inputs, targets, mask = rollout.inputs, rollout.targets, rollout.mask
    scores = reward_fn(rollout).to(inputs.device).float()
    advantages = group_advantages(scores, group_size).unsqueeze(1) * mask                  # (B, T)
    with torch.no_grad():
        old_logps = token_logprobs(policy(inputs), targets)
        ref_logps = token_logprobs(reference(inputs), targets)
    params = [p for p in policy.parameters() if p.requires_grad]
    logged = {"policy_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    updates = 0
    for _ in range(settings.epochs):
        for rows in _minibatches(len(inputs), settings.minibatch_size, generator):
            logps, policy_loss, clip_fraction, entropy = _policy_terms(policy, rollout, rows, old_logps,
                                                                       advantages, settings.clip)
            loss = policy_loss - settings.entropy_coef * entropy
            if settings.beta > 0:
                loss = loss + settings.beta * masked_mean(kl_k3(logps, ref_logps[rows]), mask[rows])
            _step(optimizer, loss, params, settings.grad_clip)
            for key, value in (("policy_loss", policy_loss), ("clip_fraction", clip_fraction), ("entropy", entropy)):
                logged[key] += value.item()
            updates += 1
    numbers = _round_summary(logged, updates, scores, rollout, old_logps, ref_logps)
    solved = scores.view(-1, group_size)
    numbers["informative_groups"] = ((solved.max(1).values - solved.min(1).values) > 0).float().mean().item()
    return numbers


# ---------------------------------------------------------------------------------------
# The pipeline behind `python main.py --task reward | dpo | ppo | grpo`
# ---------------------------------------------------------------------------------------

HELD_OUT_SHARE = 0.2  # ppo/grpo: the last fifth of the task's records measures the policy, never trains it
MEASURED_PROMPTS = 100  # ppo/grpo: greedy answers to at most this many held-out (and training) prompts are scored


@dataclass
class AlignState:
    """Where an alignment run stands: a resumed run continues from here exactly."""

    step: int = 0          # optimizer steps (reward, dpo) or rounds of sampling (ppo, grpo) done
    history: list[dict[str, float]] = field(default_factory=list)  # what each step logged
    evals: list[dict[str, float]] = field(default_factory=list)    # held-out numbers, with their step
    elapsed_s: float = 0.0
    best: float | None = None  # the best held-out score so far (the method's `best_score`), kept as best.pt


@dataclass
class AlignData:
    """What a task trains and measures on."""

    description: str
    fingerprint: str
    train: Any                    # reward/dpo: a PreferenceDataset; ppo/grpo: records
    val: Any
    test: Any


def align(run: RunConfig, stop: StopRequest | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any], Path]:
    """Align as `run` says (task reward, dpo, ppo or grpo), writing the run directory; returns
    (model, tokenizer, metrics, run directory). One process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("alignment runs in one process (torchrun is for pretraining); start it with "
                          "python main.py --task reward | dpo | ppo | grpo.")
    if run.train.micro_batch_size is not None:
        raise ConfigError(f"{run.task} trains on whole batches (its batch_size, or minibatch_size for ppo and grpo); "
                          "micro_batch_size and --batch-size auto are for pretrain, classify and sft. Lower "
                          "--batch-size instead.")
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    start_file = Path(run.checkpoint or "")
    if checkpoint is None and run.checkpoint and not (start_file.is_file() or (start_file / CHECKPOINT_NAME).is_file()):
        raise ConfigError(f"{run.task} starts from the run in {run.checkpoint}, which does not exist yet: train it "
                          f"first (e.g. python main.py --task sft --mode {run.mode} --out {run.checkpoint}), or "
                          "start elsewhere with --checkpoint DIR, --pretrained NAME or INIT = 'scratch'.")
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    run_dir = choose_run_dir(run)
    task, acfg = run.task, run.align
    checked = task == "grpo" or (task == "ppo" and acfg.reward_model is None)  # rewards a program checks
    reward_model = None
    if task == "ppo" and not checked:  # answers are written in the template the reward model learned to score
        reward_model, reward_tokenizer, style = _load_reward_model(acfg.reward_model, device)
        acfg = replace(acfg, prompt_style=style)
        run = replace(run, align=acfg)

    if checkpoint is not None:
        start, tokenizer, origin = None, tokenizer_from_spec(checkpoint["tokenizer_spec"]), "its checkpoint"
    else:
        _check_template(run.checkpoint, acfg.prompt_style)
        start, tokenizer, origin = starting_point(run, device)
    if tokenizer is None:  # new weights
        tokenizer = byte_tokenizer() if checked else get_tokenizer(run.tokenizer)
    require_end_of_text(tokenizer, "alignment")
    if acfg.prompt_style == "chat":
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    data = _task_data(run, tokenizer, checked)
    if checkpoint is not None and checkpoint["data_sha256"] != data.fingerprint:
        raise ConfigError(f"the data differs from what the run in {run_dir} started with; resume with the "
                          "same --data, or start a new run.")

    # The models: the one that trains, and the frozen reference the KL leash ties it to.
    if start is not None:
        model = GPTModel(replace(start.cfg, drop_rate=0.0)).to(device)
        model.load_state_dict(start.state_dict())
        run = replace(run, model_name=run.pretrained or run.checkpoint)
        grow_vocabulary(model, tokenizer.vocab_size)
    else:
        model = GPTModel(replace(run.model, vocab_size=tokenizer.vocab_size, drop_rate=0.0)).to(device)
    if task == "reward":
        add_reward_head(model)
    run = replace(run, model=model.cfg)
    cfg = run.train
    if cfg.max_length > model.cfg.context_length:
        raise ConfigError(f"max_length ({cfg.max_length}) is longer than the model's context_length "
                          f"({model.cfg.context_length}); lower max_length to at most {model.cfg.context_length}.")
    generator = torch.Generator().manual_seed(run.seed)  # sampling, minibatch order, warm-up batches
    warm_up = checked and start is None and checkpoint is None and acfg.sft_steps > 0
    reference = critic = None
    if task != "reward":
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    if task == "ppo":  # the value model: a copy of the policy with a scalar head, its values starting at 0
        critic = add_reward_head(copy.deepcopy(model))
    if reward_model is not None and reward_tokenizer.spec() != tokenizer.spec():
        raise ConfigError(f"the reward model in {acfg.reward_model} reads a different vocabulary "
                          f"({reward_tokenizer.name}, {reward_tokenizer.vocab_size:,} tokens) from the policy's "
                          f"({tokenizer.name}, {tokenizer.vocab_size:,} tokens); train the reward model from the "
                          "same starting run or tokenizer as the policy.")
    trained = [model] + ([critic] if critic is not None else [])
    optimizer = torch.optim.AdamW([p for m in trained for p in m.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    state = AlignState()
    before: dict[str, Any] = {}
    warmup_losses: list[float] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        for other, key in ((reference, "reference"), (critic, "critic")):
            if other is not None:
                other.load_state_dict(checkpoint[key])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = AlignState(**checkpoint["state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        generator.set_state(checkpoint["generator"])
        before, warmup_losses = checkpoint["before"], checkpoint["warmup_losses"]

    method = _make_method(task, run, model, reference, critic, reward_model, optimizer, tokenizer, data,
                          generator, device)
    total = method.total_steps
    if state.step >= total:
        raise ConfigError(f"the run in {run_dir} already finished; start a new run (--out) to train further.")
    run_dir.mkdir(parents=True, exist_ok=True)
    print_rows(f"minigpt | {task} | {run.mode} mode", [
        ("device", f"{device}, torch {torch.__version__}"),
        ("starting from", origin + (f"; then {acfg.sft_steps} supervised steps on the task's training answers "
                                    f"(batch {cfg.batch_size}, lr 1e-3), so that it knows the answer format"
                                    if warm_up else "")),
        ("model", f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, emb_dim {model.cfg.emb_dim}, "
                  f"context {model.cfg.context_length}; {model.num_parameters():,} parameters"
                  + ("; head: one reward per position" if task == "reward" else "")),
        ("tokenizer", f"{tokenizer.name}, {tokenizer.vocab_size:,} tokens"
                      + (" (one per byte, and the special tokens)" if getattr(tokenizer, "merges", None) == {} else "")),
        ("data", data.description),
        ("method", method.description),
        ("seed", str(run.seed)),
        ("run directory", str(run_dir) + (f" (resuming at step {state.step})" if state.step else "")),
    ])
    if warm_up:
        warmup_losses = supervised_warmup(model, data.train, tokenizer, acfg.prompt_style, acfg.sft_steps,
                                          cfg.batch_size, 1e-3, generator)
        reference.load_state_dict(model.state_dict())  # the leash ties the policy to the warmed-up model
        if critic is not None:  # and the value model starts from its backbone too (its own head stays)
            critic.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("out_head.")},
                                   strict=False)
        print(f"supervised warm-up: answer loss {warmup_losses[0]:.3f} -> {warmup_losses[-1]:.3f}", flush=True)
    if not before:
        before = method.measure()
        print("before: " + method.describe(before), flush=True)

    extra_keys = {"tokenizer_spec": tokenizer.spec(), "data_sha256": data.fingerprint}

    def save() -> None:
        extra = {**extra_keys, "before": before, "warmup_losses": warmup_losses, "generator": generator.get_state(),
                 "reference": reference.state_dict() if reference is not None else None,
                 "critic": critic.state_dict() if critic is not None else None}
        save_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer, state, run, extra,
                        {"torch": torch.get_rng_state()})

    start_time = time.perf_counter() - state.elapsed_s
    with (stop or StopRequest()) as stop:
        bar = tqdm(total=total, initial=state.step, desc=task, unit="step" if task in ("reward", "dpo") else "round",
                   leave=False, dynamic_ncols=True)
        while state.step < total and not stop.requested:
            numbers = method.step(state.step)
            for key in ("loss", "reward"):
                if key in numbers and not math.isfinite(numbers[key]):
                    raise ConfigError(f"the {key} became {numbers[key]} at step {state.step + 1}; training "
                                      f"diverged. Start a new run with a lower learning_rate (now {cfg.learning_rate}).")
            state.step += 1
            state.history.append({"step": state.step, **numbers})
            bar.update(1)
            bar.set_postfix({key: f"{numbers[key]:.3f}" for key in method.shown if key in numbers})
            if state.step % cfg.eval_freq == 0 and state.step < total:
                state.evals.append({"step": state.step, **method.evaluate()})
                tqdm.write(f"step {state.step:>5}: " + "  ".join(
                    f"{key} {value:.3f}" for key, value in state.evals[-1].items() if key != "step"))
                score = method.best_score(state.evals[-1])
                if state.best is None or score > state.best:  # the best held-out weights so far
                    state.best = score
                    save_weights(run_dir / BEST_NAME, model, run, extra_keys)
            state.elapsed_s = time.perf_counter() - start_time
        bar.close()
    completed = state.step >= total
    save()
    metrics: dict[str, Any] = {"completed": completed, "task": task, "steps": state.step, "elapsed_s": state.elapsed_s,
                               "num_parameters": model.num_parameters(), "device": str(device),
                               "before": before, "warmup_losses": warmup_losses,
                               "history": state.history, "evals": state.evals}
    if completed:
        metrics["after"] = method.measure()
        print("after:  " + method.describe(metrics["after"]), flush=True)
    config = {**run.to_dict(), **extra_keys, "torch_version": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    files = [CHECKPOINT_NAME, "config.json", "metrics.json"] + ([BEST_NAME] if state.best is not None else [])
    if state.history:
        method.plot(state, before, metrics.get("after"), run_dir / f"{task}_curves.png",
                    f"{task}, {run.mode} mode")
        files.append(f"{task}_curves.png")
    status = "finished" if completed else f"stopped early (resume with --resume {run_dir})"
    print(f"\n{task} {status} in {state.elapsed_s:.1f} s, {state.step} {'steps' if task in ('reward', 'dpo') else 'rounds'}")
    if completed:
        print(f"  before  {method.describe(before)}\n  after   {method.describe(metrics['after'])}")
    print(f"  wrote   {run_dir}/: {', '.join(files)}")
    return model, tokenizer, metrics, run_dir


def _check_template(run_dir: str | None, style: str) -> None:
    """An instruction-tuned starting run answers in its own template: the answers scored here must too."""
    folder = Path(run_dir or "")
    config = (folder.parent if folder.is_file() else folder) / "config.json"  # a run, or its best.pt
    if not run_dir or not config.is_file():
        return
    saved = json.loads(config.read_text())
    settings = saved.get("finetune") if saved.get("task") == "sft" else saved.get("align")
    if settings and settings.get("prompt_style", style) != style:
        raise ConfigError(f"{run_dir} was trained with the {settings['prompt_style']!r} template and this run would "
                          f"write answers in {style!r}; add --prompt-style {settings['prompt_style']}.")


def _task_data(run: RunConfig, tokenizer, checked: bool) -> AlignData:
    """Preference pairs (reward, dpo), instruction prompts (ppo with a reward model), or records whose
    answers a program checks (grpo, and ppo without a reward model): the arithmetic task by default."""
    style, limit = run.align.prompt_style, run.train.max_length
    if run.task in ("reward", "dpo"):
        records = load_preference_data(run.data)
        train, val, test = split_dataset(records, *SFT_SPLIT)
        if not val or not test:
            raise ConfigError(f"{len(records)} preference records are too few for an 85/5/10 split with a "
                              "validation and a test pair; give at least 20.")
        splits = [PreferenceDataset(split, tokenizer, style) for split in (train, val, test)]
        dropped = 0
        for split in splits:  # a prompt that fills the whole window leaves no answer to compare
            kept = [example for example in split.examples if example[2] < limit]
            dropped, split.examples = dropped + len(split.examples) - len(kept), kept
        if not all(len(split) for split in splits):
            raise ConfigError(f"no preference pair in some split has a prompt shorter than max_length ({limit}); "
                              "raise max_length.")
        name = Path(run.data).name if run.data else "instruction-data-with-preference.json"
        return AlignData(f"{name}: {len(records):,} preference pairs; train / validation / test "
                         f"{len(splits[0]):,} / {len(splits[1]):,} / {len(splits[2]):,}"
                         + (f" ({dropped} dropped: prompt of {limit}+ tokens)" if dropped else "")
                         + f"; {style} template; prompt + answer cut to {limit} tokens", fingerprint(records), *splits)
    if not checked:  # the reward model's own prompts, split as it was, so held-out prompts stay unseen
        records = load_preference_data(run.data)
        train, val, test = split_dataset(records, *SFT_SPLIT)
        name = Path(run.data).name if run.data else "instruction-data-with-preference.json"
        return AlignData(f"{name}: {len(train):,} training prompts, {len(test):,} held out; {style} template; "
                         f"reward: the reward model in {run.align.reward_model}", fingerprint(records),
                         train, val, test)
    if run.data is None:
        records = arithmetic_records(run.align.max_operand)
        name = f"sums a + b with 0 <= a, b <= {run.align.max_operand}"
    else:
        records, name = load_instruction_data(run.data), Path(run.data).name
    held_out = max(1, round(HELD_OUT_SHARE * len(records)))
    if len(records) - held_out < run.align.prompts_per_iteration:
        raise ConfigError(f"{name} gives {len(records)} records: too few to hold out {held_out} and sample "
                          f"{run.align.prompts_per_iteration} prompts per round; give more records or lower "
                          "prompts_per_iteration.")
    train, test = records[:-held_out], records[-held_out:]
    return AlignData(f"{name}: {len(train):,} training problems, {len(test):,} held out; {style} template; "
                     "reward 1 for an answer equal to the reference, else 0", fingerprint(records),
                     train, test, test)


def _load_reward_model(path: str, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """A reward run's model (frozen), its tokenizer, and the template its answers were written in."""
    if not (Path(path) / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"reward_model is {path!r}, which holds no run; train one first with python main.py "
                          "--task reward (same tokenizer as the policy), or leave reward_model unset to reward "
                          "exact answers to the task's records.")
    model, rm_tokenizer, saved = load_model(path, device)
    if saved["task"] != "reward":
        raise ConfigError(f"{path} holds a {saved['task']} run, not a reward model; give a --task reward run.")
    return model.requires_grad_(False).eval(), rm_tokenizer, saved["align"]["prompt_style"]


def _preference_loader(dataset, run: RunConfig, tokenizer, train: bool):
    collate = partial(preference_collate, eos_id=tokenizer.eos_id, allowed_max_length=run.train.max_length)
    return make_loader(dataset, collate, run.train.batch_size, run.train.batch_size, train, run.seed,
                       "the training pairs" if train else "the held-out pairs")


class _PairMethod:
    """Reward-model and DPO training: optimizer steps over batches of preference pairs, epoch by
    epoch in a seeded order (so a resumed run sees the batches it would have seen)."""

    def __init__(self, run: RunConfig, model, optimizer, tokenizer, data: AlignData, device) -> None:
        self.run, self.model, self.optimizer, self.device = run, model, optimizer, device
        self.train_loader = _preference_loader(data.train, run, tokenizer, True)
        self.val_loader = _preference_loader(data.val, run, tokenizer, False)
        self.test_loader = _preference_loader(data.test, run, tokenizer, False)
        self.steps_per_epoch = self.train_loader.sampler.steps_per_epoch
        self.total_steps = min(self.steps_per_epoch * run.train.num_epochs, run.train.max_steps or math.inf)
        self._batches, self._epoch = None, None

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch or self._batches is None:
            self.train_loader.sampler.set_epoch(epoch, start=within * self.run.train.batch_size)
            self._batches, self._epoch = iter(self.train_loader), epoch
        return {key: value.to(self.device) for key, value in next(self._batches).items()}

    def update(self, loss: torch.Tensor, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, self.run.train, self.total_steps)
        _step(self.optimizer, loss, [p for g in self.optimizer.param_groups for p in g["params"]],
              self.run.train.grad_clip)

    def batches(self, loader, limit: int | None = None):
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield {key: value.to(self.device) for key, value in batch.items()}


class _RewardMethod(_PairMethod):
    shown = ("loss", "accuracy")

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.description = (f"Bradley-Terry loss -log sigma(r_chosen - r_rejected); {self.total_steps:,} steps of "
                            f"{self.run.train.batch_size} pairs, AdamW lr {self.run.train.learning_rate:g}")

    def step(self, step: int) -> dict[str, float]:
        self.model.train()
        batch = self.next_batch(step)
        chosen = reward_scores(self.model, batch["chosen_inputs"], batch["chosen_targets"])
        rejected = reward_scores(self.model, batch["rejected_inputs"], batch["rejected_targets"])
        loss = bradley_terry_loss(chosen, rejected)
        self.update(loss, step)
        return {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item()}

    def evaluate(self) -> dict[str, float]:
        return {"val_accuracy": preference_accuracy(self.model, self.batches(self.val_loader))}

    def best_score(self, numbers: dict[str, float]) -> float:
        return numbers["val_accuracy"]

    def measure(self) -> dict[str, float]:
        return {"val_accuracy": preference_accuracy(self.model, self.batches(self.val_loader)),
                "test_accuracy": preference_accuracy(self.model, self.batches(self.test_loader))}

    def describe(self, numbers: dict[str, float]) -> str:
        return (f"held-out preference accuracy: validation {100 * numbers['val_accuracy']:.1f}%, "
                f"test {100 * numbers['test_accuracy']:.1f}% (ties count half)")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [(0, before["val_accuracy"])] + [(e["step"], e["val_accuracy"]) for e in state.evals]
        if after:
            evals.append((state.step, after["val_accuracy"]))
        plot_panels([
            ("Bradley-Terry loss (train batches)", {"loss": (steps, [h["loss"] for h in state.history])}),
            ("reward margin r_chosen - r_rejected", {"train batches": (steps, [h["margin"] for h in state.history])}),
            ("preference accuracy", {"train batches": (steps, [h["accuracy"] for h in state.history]),
                                     "validation": ([e[0] for e in evals], [e[1] for e in evals])}),
        ], path, title)


class _DPOMethod(_PairMethod):
    shown = ("loss", "margin")

    def __init__(self, run, model, reference, optimizer, tokenizer, data, device) -> None:
        super().__init__(run, model, optimizer, tokenizer, data, device)
        self.reference = reference
        a = run.align
        self.description = (f"DPO ({a.dpo_loss}, beta {a.beta:g}"
                            + (f", label smoothing {a.label_smoothing:g}" if a.label_smoothing else "")
                            + f") against a frozen copy of the starting model; {self.total_steps:,} steps of "
                            f"{run.train.batch_size} pairs, AdamW lr {run.train.learning_rate:g}")

    def step(self, step: int) -> dict[str, float]:
        self.model.train()
        a = self.run.align
        loss, numbers = dpo_batch_loss(self.model, self.reference, self.next_batch(step), a.beta, a.dpo_loss,
                                       a.label_smoothing)
        self.update(loss, step)
        return numbers

    def evaluate(self) -> dict[str, float]:
        numbers = evaluate_dpo(self.model, self.reference, self.batches(self.val_loader), self.run.align.beta)
        return {"val_loss": numbers["loss"], "val_margin": numbers["margin"], "val_accuracy": numbers["accuracy"]}

    def best_score(self, numbers: dict[str, float]) -> float:
        return -numbers["val_loss"]  # the held-out DPO loss, lower is better

    def measure(self) -> dict[str, float]:
        numbers = {}
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            for key, value in evaluate_dpo(self.model, self.reference, self.batches(loader),
                                           self.run.align.beta).items():
                numbers[f"{split}_{key}"] = value
        return numbers

    def describe(self, numbers: dict[str, float]) -> str:
        return (f"test pairs: implicit reward margin {numbers['test_margin']:+.3f} "
                f"(chosen {numbers['test_chosen_reward']:+.3f}, rejected {numbers['test_rejected_reward']:+.3f}), "
                f"ranked right {100 * numbers['test_accuracy']:.1f}%, DPO loss {numbers['test_loss']:.4f}")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [(0, before["val_margin"], before["val_accuracy"])]
        evals += [(e["step"], e["val_margin"], e["val_accuracy"]) for e in state.evals]
        if after:
            evals.append((state.step, after["val_margin"], after["val_accuracy"]))
        at = [e[0] for e in evals]
        plot_panels([
            ("DPO loss (train batches)", {"loss": (steps, [h["loss"] for h in state.history])}),
            ("implicit rewards (train batches)", {"chosen": (steps, [h["chosen_reward"] for h in state.history]),
                                                  "rejected": (steps, [h["rejected_reward"] for h in state.history])}),
            ("margin chosen - rejected", {"train batches": (steps, [h["margin"] for h in state.history]),
                                          "validation": (at, [e[1] for e in evals])}),
            ("pairs ranked right", {"train batches": (steps, [h["accuracy"] for h in state.history]),
                                    "validation": (at, [e[2] for e in evals])}),
        ], path, title)


class _RLMethod:
    """PPO or GRPO: rounds of sampling answers to training prompts and updating on them."""

    shown = ("reward", "kl")

    def __init__(self, run: RunConfig, model, reference, critic, reward_model, optimizer, tokenizer,
                 data: AlignData, generator, device) -> None:
        a, cfg = run.align, run.train
        self.run, self.model, self.reference, self.critic, self.optimizer = run, model, reference, critic, optimizer
        self.tokenizer, self.generator, self.reward_model = tokenizer, generator, reward_model
        self.total_steps = a.iterations
        room = model.cfg.context_length - a.max_new_tokens  # a prompt must leave room for a whole answer
        self.dropped = 0
        self.train_prompts, self.train_records = self.fitting(data.train, tokenizer, room)
        self.test_prompts, self.test_records = self.fitting(data.test, tokenizer, room)
        if len(self.train_prompts) < a.prompts_per_iteration or not self.test_prompts:
            raise ConfigError(f"too few prompts fit the model's context of {model.cfg.context_length} tokens with "
                              f"room for {a.max_new_tokens} answer tokens; lower max_new_tokens or start from a model "
                              "with a longer context.")
        # Measured: the first MEASURED_PROMPTS of each (answering one prompt at a time costs a generation each)
        self.measured = {"held_out": (self.test_prompts[:MEASURED_PROMPTS], self.test_records[:MEASURED_PROMPTS]),
                         "train": (self.train_prompts[:MEASURED_PROMPTS], self.train_records[:MEASURED_PROMPTS])}
        self.settings = RLSettings(beta=a.beta, kl_estimator=a.kl_estimator, clip=a.clip, value_clip=a.value_clip,
                                   value_coef=a.value_coef, entropy_coef=a.entropy_coef, gamma=a.gamma, lam=a.lam,
                                   epochs=a.update_epochs, minibatch_size=a.minibatch_size, grad_clip=cfg.grad_clip,
                                   max_new_tokens=a.max_new_tokens)
        samples = a.prompts_per_iteration * (a.group_size if run.task == "grpo" else 1)
        reward = "a reward model" if reward_model is not None else "exact match"
        self.description = (
            f"{run.task.upper()}: {a.iterations} rounds of {a.prompts_per_iteration} prompts"
            + (f" x {a.group_size} answers" if run.task == "grpo" else "")
            + f" ({samples} samples at temperature 1, at most {a.max_new_tokens} tokens), {a.update_epochs} pass(es) "
            f"in minibatches of {a.minibatch_size}; reward: {reward}; "
            + (f"KL penalty beta {a.beta:g} ({a.kl_estimator}) in the reward, value head, GAE gamma {a.gamma:g} "
               f"lambda {a.lam:g}" if run.task == "ppo" else f"beta {a.beta:g} x KL (k3) in the loss")
            + f"; clip {a.clip:g}; AdamW lr {cfg.learning_rate:g}"
            + (f"; {self.dropped} prompt(s) too long for the context left out" if self.dropped else ""))

    def fitting(self, records: list[dict[str, str]], tokenizer, room: int) -> tuple[list[list[int]], list[dict]]:
        """The encoded prompts of `records` that are at most `room` tokens long, and their records."""
        style = self.run.align.prompt_style
        encoded = [(encode_prompt(format_prompt(r, style), tokenizer, style), r) for r in records]
        kept = [(ids, r) for ids, r in encoded if len(ids) <= room]
        self.dropped += len(encoded) - len(kept)
        return [ids for ids, _ in kept], [r for _, r in kept]

    def rewards_for(self, records: list[dict[str, str]]) -> Callable[[Rollout], torch.Tensor]:
        if self.reward_model is not None:
            return lambda rollout: reward_scores(self.reward_model, rollout.inputs, rollout.targets).float()
        return lambda rollout: exact_match_rewards(rollout, [r["output"] for r in records])

    def step(self, step: int) -> dict[str, float]:
        a = self.run.align
        rows = torch.randperm(len(self.train_prompts), generator=self.generator)[:a.prompts_per_iteration].tolist()
        prompts = [self.train_prompts[i] for i in rows]
        reward_fn = self.rewards_for([self.train_records[i] for i in rows])
        if self.run.task == "grpo":
            return grpo_update(self.model, self.reference, self.optimizer, prompts, self.tokenizer, reward_fn,
                               self.settings, a.group_size, self.generator)
        return ppo_update(self.model, self.critic, self.reference, self.optimizer, prompts, self.tokenizer,
                          reward_fn, self.settings, self.generator)

    @torch.no_grad()
    def greedy_reward(self, prompts, records) -> float:
        """Mean reward of the policy's greedy answers: exact-match accuracy, or the reward model's score."""
        rollout = sample_responses(self.model, prompts, self.tokenizer, 1, self.run.align.max_new_tokens, greedy=True)
        return self.rewards_for(records)(rollout).mean().item()

    def measure(self) -> dict[str, float]:
        return {split: self.greedy_reward(*self.measured[split]) for split in ("held_out", "train")}

    evaluate = measure

    def best_score(self, numbers: dict[str, float]) -> float:
        return numbers["held_out"]  # greedy accuracy, or the reward model's mean score

    def describe(self, numbers: dict[str, float]) -> str:
        held_out, train = (len(self.measured[split][0]) for split in ("held_out", "train"))
        if self.reward_model is not None:
            return (f"mean reward of greedy answers: {held_out} held-out prompts {numbers['held_out']:+.3f}, "
                    f"{train} training prompts {numbers['train']:+.3f}")
        return (f"exact-match accuracy (greedy): {held_out} held-out problems {100 * numbers['held_out']:.1f}%, "
                f"{train} training problems {100 * numbers['train']:.1f}%")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [{"step": 0, **before}] + state.evals + ([{"step": state.step, **after}] if after else [])
        at = [e["step"] for e in evals]
        measured = "accuracy" if self.reward_model is None else "mean reward"
        plot_panels([
            ("reward of sampled answers", {"reward": (steps, [h["reward"] for h in state.history])}),
            ("KL(policy || reference) per answer", {"k1": (steps, [h["kl"] for h in state.history])}),
            (f"greedy {measured}", {"training prompts": (at, [e["train"] for e in evals]),
                                    "held-out prompts": (at, [e["held_out"] for e in evals])}),
            ("entropy and clipped share", {"entropy": (steps, [h["entropy"] for h in state.history]),
                                           "clip fraction": (steps, [h["clip_fraction"] for h in state.history])}),
        ], path, title, xlabel="round")


def _make_method(task, run, model, reference, critic, reward_model, optimizer, tokenizer, data, generator, device):
    if task == "reward":
        return _RewardMethod(run, model, optimizer, tokenizer, data, device)
    if task == "dpo":
        return _DPOMethod(run, model, reference, optimizer, tokenizer, data, device)
    return _RLMethod(run, model, reference, critic, reward_model, optimizer, tokenizer, data, generator, device)
