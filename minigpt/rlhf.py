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

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minigpt.config import DPO_LOSSES, ConfigError
from minigpt.data import CHAT_TOKENS, IGNORE_INDEX, InstructionDataset, instruction_collate
from minigpt.finetune import replace_head
from minigpt.generation import generate
from minigpt.tokenizer import END_OF_TEXT, BPETokenizer
from minigpt.train import StepSetup, calc_loss_batch


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
    if loss_type not in DPO_LOSSES:
        raise ConfigError(f"dpo loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}.")
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
    group_size: int = 8         # GRPO: answers sampled per prompt, each judged against its group


@dataclass
class RLModels:
    """The models a round of PPO or GRPO reads and trains."""

    policy: torch.nn.Module     # samples the answers and is trained
    reference: torch.nn.Module  # frozen: the KL leash ties the policy to it
    critic: torch.nn.Module | None = None  # PPO: the value model (GRPO has none)


def _minibatches(rows: int, size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(rows, generator=generator)
    return [order[i:i + size] for i in range(0, rows, size)]


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor],
          settings: RLSettings, setup: StepSetup) -> None:
    """One update: the gradient of `loss` (scaled in fp16 by a chapter-9 setup), clipped, applied."""
    optimizer.zero_grad(set_to_none=True)
    setup.backward(loss)
    setup.update(optimizer, params, settings.grad_clip)


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


def ppo_update(models: RLModels, optimizer: torch.optim.Optimizer, prompts: list[list[int]], tokenizer,
               reward_fn: Callable[[Rollout], torch.Tensor], settings: RLSettings,
               generator: torch.Generator | None = None, setup: StepSetup | None = None) -> dict[str, float]:
    """One PPO round: sample an answer per prompt, score it, and take `settings.epochs` passes of
    clipped updates over the samples. Returns what to log.

    The reward of each answer token is -beta * KL(policy || reference) at that token, plus the
    answer's score at its last token; GAE turns these into advantages with the critic's values
    as the baseline, and the critic learns to predict the returns. Dropout stays off so the
    ratio compares the policy with itself. `setup` says how the forward passes and updates are
    computed (chapter 9: autocast, fp16's gradient scaler); by default plainly, in fp32.
    """
    policy, critic, reference = models.policy, models.critic, models.reference
    setup = setup or StepSetup(next(policy.parameters()).device)
    policy.eval(), critic.eval(), reference.eval()
    with setup.autocast(), torch.no_grad():  # the forward passes in the run's precision (chapter 9)
        rollout = sample_responses(policy, prompts, tokenizer, 1, settings.max_new_tokens, generator)
        inputs, targets, mask = rollout.inputs, rollout.targets, rollout.mask
        scores = reward_fn(rollout).to(inputs.device).float()                    # (B,)
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
            with setup.autocast():
                _, policy_loss, clip_fraction, entropy = _policy_terms(policy, rollout, rows, old_logps, advantages,
                                                                       settings.clip)
                values = critic(inputs[rows]).squeeze(-1).float()
                value_loss = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], settings.value_clip)
                loss = policy_loss - settings.entropy_coef * entropy + settings.value_coef * value_loss
            _step(optimizer, loss, params, settings, setup)
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


def grpo_update(models: RLModels, optimizer: torch.optim.Optimizer, prompts: list[list[int]], tokenizer,
                reward_fn: Callable[[Rollout], torch.Tensor], settings: RLSettings,
                generator: torch.Generator | None = None, setup: StepSetup | None = None) -> dict[str, float]:
    """One GRPO round: `settings.group_size` answers per prompt, each answer's advantage its reward
    against its group's, every token of an answer sharing it; PPO's clipped ratio, and beta times the
    k3 estimate of KL(policy || reference) added to the loss (beta 0: no leash, the KL only logged)."""
    policy, reference, group_size = models.policy, models.reference, settings.group_size
    setup = setup or StepSetup(next(policy.parameters()).device)
    policy.eval(), reference.eval()
    with setup.autocast(), torch.no_grad():  # the forward passes in the run's precision (chapter 9)
        rollout = sample_responses(policy, prompts, tokenizer, group_size, settings.max_new_tokens, generator)
        inputs, targets, mask = rollout.inputs, rollout.targets, rollout.mask
        scores = reward_fn(rollout).to(inputs.device).float()
        old_logps = token_logprobs(policy(inputs), targets)
        ref_logps = token_logprobs(reference(inputs), targets)
    advantages = group_advantages(scores, group_size).unsqueeze(1) * mask                  # (B, T)
    params = [p for p in policy.parameters() if p.requires_grad]
    logged = {"policy_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    updates = 0
    for _ in range(settings.epochs):
        for rows in _minibatches(len(inputs), settings.minibatch_size, generator):
            with setup.autocast():
                logps, policy_loss, clip_fraction, entropy = _policy_terms(policy, rollout, rows, old_logps,
                                                                           advantages, settings.clip)
                loss = policy_loss - settings.entropy_coef * entropy
                if settings.beta > 0:
                    loss = loss + settings.beta * masked_mean(kl_k3(logps, ref_logps[rows]), mask[rows])
            _step(optimizer, loss, params, settings, setup)
            for key, value in (("policy_loss", policy_loss), ("clip_fraction", clip_fraction), ("entropy", entropy)):
                logged[key] += value.item()
            updates += 1
    numbers = _round_summary(logged, updates, scores, rollout, old_logps, ref_logps)
    solved = scores.view(-1, group_size)
    numbers["informative_groups"] = ((solved.max(1).values - solved.min(1).values) > 0).float().mean().item()
    return numbers
