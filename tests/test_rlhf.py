"""Alignment's building blocks (chapter 8) against hand-worked values and second formulas:
preference batches, answer log-probabilities, DPO's losses, GAE, PPO's clipped losses, KL."""

import math

import pytest
import torch

from conftest import SHARED_DATA
from minigpt.config import ConfigError
from minigpt.data import IGNORE_INDEX, PreferenceDataset, load_preference_data, preference_collate
from minigpt.rlhf import (dpo_loss, gae, kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss, sequence_logprobs,
                          token_logprobs)
from minigpt.tokenizer import get_tokenizer


def test_preference_batches_score_only_the_answers():
    eos = 0
    batch = [([5, 6, 7, 8], [5, 6, 9], 2)]  # prompt [5, 6]; chosen [7, 8]; rejected [9]
    out = preference_collate(batch, eos_id=eos)
    assert out["chosen_inputs"].tolist() == [[5, 6, 7, 8]]
    assert out["chosen_targets"].tolist() == [[IGNORE_INDEX, 7, 8, eos]]
    assert out["rejected_inputs"].tolist() == [[5, 6, 9]]
    assert out["rejected_targets"].tolist() == [[IGNORE_INDEX, 9, eos]]


def test_the_preference_data_loads_and_encodes():
    if not (SHARED_DATA / "instruction-data-with-preference.json").is_file():
        pytest.skip("instruction-data-with-preference.json is not available offline")
    records = load_preference_data()
    assert len(records) == 1100 and {"chosen", "rejected"} <= set(records[0])
    tokenizer = get_tokenizer("gpt2")
    chosen, rejected, prompt_length = PreferenceDataset(records[:1], tokenizer)[0]
    assert chosen[:prompt_length] == rejected[:prompt_length]
    assert tokenizer.decode(chosen[prompt_length:]) == records[0]["chosen"]
    assert tokenizer.decode(rejected[prompt_length:]) == records[0]["rejected"]


def test_sequence_logprobs_equal_a_direct_sum_over_the_answer_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    targets = torch.tensor([[IGNORE_INDEX, 3, 1, 0, IGNORE_INDEX],
                            [IGNORE_INDEX, IGNORE_INDEX, 6, 2, 4]])
    expected = []
    for row in range(2):
        total, count = 0.0, 0
        for position in range(5):
            target = targets[row, position].item()
            if target != IGNORE_INDEX:
                probabilities = torch.exp(logits[row, position]) / torch.exp(logits[row, position]).sum()
                total += math.log(probabilities[target].item())
                count += 1
        expected.append((total, total / count))
    summed = sequence_logprobs(logits, targets)
    averaged = sequence_logprobs(logits, targets, average=True)
    for row, (total, mean) in enumerate(expected):
        assert summed[row].item() == pytest.approx(total, abs=1e-5)
        assert averaged[row].item() == pytest.approx(mean, abs=1e-5)
    assert token_logprobs(logits, targets)[0, 0] == 0 and token_logprobs(logits, targets)[1, 1] == 0


def test_dpo_loss_by_hand_and_by_a_second_formula():
    # margin h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 2) - (-3 + 2) = 2; beta = 0.1
    policy_c, policy_r = torch.tensor([-1.0]), torch.tensor([-3.0])
    ref_c, ref_r = torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)  # -log sigma(x) = log(1 + e^-x)
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    smoothed, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.2)) + 0.2 * math.log(1 + math.exp(0.2))
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)
    ipo, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / 0.2) ** 2)  # (2 - 5)^2 = 9
    with pytest.raises(ConfigError, match="loss_type"):
        dpo_loss(policy_c, policy_r, ref_c, ref_r, loss_type="hinge")


def test_dpo_loss_is_ln_2_while_the_policy_is_the_reference():
    logps = torch.randn(8) * 20
    other = torch.randn(8) * 20
    loss, chosen, rejected = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(chosen, torch.zeros(8)) and torch.equal(rejected, torch.zeros(8))


def test_gae_on_a_hand_worked_trajectory():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the fourth position is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 - 0.7 = 0.3;  delta_1 = 0.7 - 0.6 = 0.1;  delta_0 = 0.6 - 0.5 = 0.1
    # A_2 = 0.3;  A_1 = 0.1 + 0.5 * 0.3 = 0.25;  A_0 = 0.1 + 0.5 * 0.25 = 0.225
    assert advantages.tolist()[0] == pytest.approx([0.225, 0.25, 0.3, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.725, 0.85, 1.0, 0.0])
    # lam = 1: the discounted return minus the value, the Monte-Carlo advantage
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert advantages.tolist()[0][:3] == pytest.approx([0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.7])


def test_ppo_clipped_objective_on_hand_built_tensors():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1]))  # ratios 1.5, 0.5, 0.5, 1.1
    advantages = torch.tensor([1.0, 1.0, -1.0, 2.0])
    mask = torch.ones(4)
    loss, clip_fraction = ppo_policy_loss(logps, old, advantages, mask, clip=0.2)
    # min(r A, clip(r) A): 1.5 -> 1.2 (clipped); 0.5 -> 0.5; 0.5 with A = -1 -> -0.8 (clipped); 1.1 * 2 = 2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 0.8 + 2.2) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    masked, _ = ppo_policy_loss(logps, old, advantages, torch.tensor([1.0, 1.0, 0.0, 0.0]), clip=0.2)
    assert masked.item() == pytest.approx(-(1.2 + 0.5) / 2)


def test_ppo_value_loss_clips_the_value_step():
    old, returns = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])
    values = torch.tensor([2.0, 1.1])
    # row 0: plain error 0, clipped value 1.2 -> error 0.64, the larger counts; row 1: 0.81 both ways
    loss = ppo_value_loss(values, old, returns, torch.ones(2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)


def test_kl_estimators_average_to_the_exact_kl_under_the_policy():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    for estimator in (kl_k1, kl_k3):
        assert (p * estimator(p.log(), q.log())).sum().item() == pytest.approx(exact.item(), abs=1e-6)
    assert (kl_k3(p.log(), q.log()) >= 0).all() and (kl_k1(p.log(), q.log()) < 0).any()
    assert torch.equal(kl_k3(p.log(), p.log()), torch.zeros(3))


def test_the_reward_is_read_at_the_answers_last_token(tiny_cfg):
    from minigpt.model import GPTModel
    from minigpt.rlhf import add_reward_head, last_scored_positions, reward_scores

    targets = torch.tensor([[IGNORE_INDEX, 4, 0, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 5, 0]])
    assert last_scored_positions(targets).tolist() == [2, 3]
    model = add_reward_head(GPTModel(tiny_cfg))
    torch.nn.init.normal_(model.out_head.weight)
    inputs = torch.tensor([[1, 2, 3, 9], [1, 2, 3, 4]])
    rewards = reward_scores(model, inputs, targets)
    assert torch.allclose(rewards[0], model(inputs[:1, :3])[0, -1, 0], atol=1e-6)  # padding after it: no change
    assert torch.allclose(rewards[1], model(inputs[1:])[0, -1, 0])


def test_a_reward_model_learns_a_clear_preference_rule():
    """Chosen answers are fruit words, rejected ones space words: > 90% of held-out pairs ranked right."""
    import random

    from minigpt.config import GPTConfig
    from minigpt.model import GPTModel
    from minigpt.rlhf import add_reward_head, bradley_terry_loss, preference_accuracy, reward_scores

    rng = random.Random(0)
    fruits, space = ["apple", "pear", "plum", "grape", "lemon"], ["rocket", "comet", "orbit", "star", "moon"]
    records = [{"instruction": f"Say something about item {i}.", "input": "",
                "chosen": " ".join(rng.choice(fruits) for _ in range(rng.randint(2, 5))),
                "rejected": " ".join(rng.choice(space) for _ in range(rng.randint(2, 5)))} for i in range(120)]
    tokenizer = get_tokenizer("gpt2")
    dataset = PreferenceDataset(records, tokenizer)
    batches = [preference_collate(dataset.examples[i:i + 8], eos_id=tokenizer.eos_id) for i in range(0, 120, 8)]
    train, held_out = batches[:10], batches[10:]
    torch.manual_seed(0)
    model = add_reward_head(GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2,
                                               n_layers=2, drop_rate=0.0)))
    assert preference_accuracy(model, held_out) == 0.5  # a zero head ties every pair: half right
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        for batch in train:
            loss = bradley_terry_loss(reward_scores(model, batch["chosen_inputs"], batch["chosen_targets"]),
                                      reward_scores(model, batch["rejected_inputs"], batch["rejected_targets"]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    accuracy = preference_accuracy(model, held_out)
    assert accuracy > 0.9, accuracy


def test_bradley_terry_loss_by_hand():
    from minigpt.rlhf import bradley_terry_loss

    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(2)) / 2)


def test_dpo_widens_the_chosen_over_rejected_margin_on_held_out_pairs():
    import copy
    import random

    from minigpt.config import GPTConfig
    from minigpt.model import GPTModel
    from minigpt.rlhf import dpo_batch_loss, evaluate_dpo

    rng = random.Random(1)
    polite, rude = ["please", "thanks", "kindly", "gladly"], ["stupid", "whatever", "ugh", "nonsense"]
    records = [{"instruction": f"Answer question {i}.", "input": "",
                "chosen": " ".join(rng.choice(polite) for _ in range(3)),
                "rejected": " ".join(rng.choice(rude) for _ in range(3))} for i in range(96)]
    tokenizer = get_tokenizer("gpt2")
    dataset = PreferenceDataset(records, tokenizer)
    batches = [preference_collate(dataset.examples[i:i + 8], eos_id=tokenizer.eos_id) for i in range(0, 96, 8)]
    train, held_out = batches[:9], batches[9:]
    torch.manual_seed(0)
    policy = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    reference = copy.deepcopy(policy).requires_grad_(False)
    frozen = [p.clone() for p in reference.parameters()]
    before = evaluate_dpo(policy, reference, held_out)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["margin"] == 0.0
    first_loss, _ = dpo_batch_loss(policy, reference, train[0])
    assert first_loss.item() == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for batch in train:
        loss, _ = dpo_batch_loss(policy, reference, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_dpo(policy, reference, held_out)
    # 9 steps: the held-out margin goes from 0 to about 0.54 (beta = 0.1), every pair ranked right
    assert after["margin"] > 0.3 and after["accuracy"] > 0.9 and after["loss"] < math.log(2) - 0.1
    assert after["chosen_reward"] > 0 > after["rejected_reward"]
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), frozen))  # the reference never moves


# ---------------------------------------------------------------------------------------
# PPO and GRPO move the reward they are given
# ---------------------------------------------------------------------------------------

def tiny_policy(vocab_size: int, seed: int = 0, **sizes):
    from minigpt.config import GPTConfig
    from minigpt.model import GPTModel

    torch.manual_seed(seed)
    shape = {"context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, **sizes}
    return GPTModel(GPTConfig(vocab_size=vocab_size, drop_rate=0.0, **shape))


def test_sampled_answers_become_rows_whose_targets_are_the_answer_tokens():
    from minigpt.rlhf import byte_tokenizer, sample_responses

    tokenizer = byte_tokenizer()
    policy = tiny_policy(tokenizer.vocab_size)
    prompts = [tokenizer.encode("ab"), tokenizer.encode("xyz")]
    rollout = sample_responses(policy, prompts, tokenizer, samples_per_prompt=3, max_new_tokens=5,
                               generator=torch.Generator().manual_seed(0))
    assert rollout.prompt_index == [0, 0, 0, 1, 1, 1]
    for row, i in enumerate(rollout.prompt_index):
        prompt = prompts[i]
        answer = rollout.targets[row][rollout.mask[row]].tolist()
        assert rollout.inputs[row, :len(prompt)].tolist() == prompt
        assert 1 <= len(answer) <= 5 and (tokenizer.eos_id not in answer[:-1])
        # the inputs hold prompt + answer shifted by one: position t predicts token t + 1
        assert rollout.inputs[row, len(prompt):len(prompt) + len(answer) - 1].tolist() == answer[:-1]
        assert rollout.texts[row] == tokenizer.decode([t for t in answer if t != tokenizer.eos_id])


def test_group_advantages_are_each_answers_standing_in_its_group():
    from minigpt.rlhf import group_advantages

    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(scores, group_size=3)
    std = math.sqrt(2 / 9)  # the population std of (1, 0, 0)
    assert advantages[:3].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4),
                                                     (-1 / 3) / (std + 1e-4)])
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]  # a group that agrees teaches nothing


def test_ppo_on_a_rule_based_reward_raises_the_mean_reward_with_the_kl_bounded():
    """Reward: the share of answer bytes that are lowercase letters (about 10% for a new model)."""
    import copy

    from minigpt.rlhf import RLModels, RLSettings, add_reward_head, byte_tokenizer, ppo_update

    torch.set_num_threads(1)
    tokenizer = byte_tokenizer()
    policy = tiny_policy(tokenizer.vocab_size)
    reference = copy.deepcopy(policy).requires_grad_(False)
    critic = add_reward_head(copy.deepcopy(policy))
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=3e-3, weight_decay=0.0)
    prompts = [tokenizer.encode(f"Q{i}:") for i in range(32)]

    def lowercase_share(rollout):
        return torch.tensor([sum(c.islower() for c in text) / max(len(text), 1) for text in rollout.texts])

    settings = RLSettings(beta=0.05, epochs=2, minibatch_size=32, max_new_tokens=4)
    generator = torch.Generator().manual_seed(0)
    models = RLModels(policy, reference, critic)
    logs = [ppo_update(models, optimizer, prompts, tokenizer, lowercase_share, settings, generator) for _ in range(25)]
    first, last = [sum(log["reward"] for log in part) / 5 for part in (logs[:5], logs[-5:])]
    assert first < 0.2 and last > first + 0.3, (first, last)
    assert all(log["kl"] < 6.0 for log in logs), [round(log["kl"], 2) for log in logs]
    assert all(0.0 <= log["clip_fraction"] <= 1.0 for log in logs)


def test_grpo_raises_the_accuracy_of_a_task_whose_answers_are_checked():
    """Sums a + b with a, b <= 4 after a short SFT: GRPO raises both the greedy accuracy and the chance
    that a sampled answer is right (what it maximises). Seeds 0, 1, 2 gave greedy +0.12 / +0.08 / +0.24
    and sampled +0.22 / +0.14 / +0.35."""
    import copy

    from minigpt.data import encode_prompt, format_prompt
    from minigpt.rlhf import (RLModels, RLSettings, arithmetic_records, byte_tokenizer, exact_match_accuracy,
                              exact_match_rewards, grpo_update, sample_responses, supervised_warmup)

    torch.set_num_threads(1)
    tokenizer = byte_tokenizer()
    records = arithmetic_records(max_operand=4, seed=0)
    prompts = [encode_prompt(format_prompt(r, "chat"), tokenizer, "chat") for r in records]
    answers = [r["output"] for r in records]
    policy = tiny_policy(tokenizer.vocab_size, context_length=40, emb_dim=64)
    generator = torch.Generator().manual_seed(0)
    supervised_warmup(policy, records, tokenizer, "chat", steps=150, batch_size=16, learning_rate=3e-3,
                      generator=generator)

    def accuracy() -> tuple[float, float]:  # greedy, and over 16 samples per problem
        rollout = sample_responses(policy, prompts, tokenizer, 16, 3, torch.Generator().manual_seed(99))
        return (exact_match_accuracy(policy, prompts, answers, tokenizer, max_new_tokens=3),
                exact_match_rewards(rollout, answers).mean().item())

    greedy_before, sampled_before = accuracy()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3, weight_decay=0.0)
    settings = RLSettings(beta=0.01, epochs=1, minibatch_size=100, max_new_tokens=3, group_size=8)
    check = lambda rollout: exact_match_rewards(rollout, answers)  # noqa: E731  (every prompt, every round)
    for _ in range(30):
        grpo_update(RLModels(policy, reference), optimizer, prompts, tokenizer, check, settings, generator)
    greedy_after, sampled_after = accuracy()
    assert greedy_after > greedy_before, (greedy_before, greedy_after)
    assert sampled_after >= sampled_before + 0.1, (sampled_before, sampled_after)
