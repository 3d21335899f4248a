"""Chapter 8 section 8.7 over several seeds: GRPO and PPO on the sums, with their spread.

One seed is exactly the notebook's run: the 400 sums a + b (0 <= a, b <= 19) shuffled with the
seed, the first 320 to train and the last 80 held out; a byte-level GPT (emb_dim 64, two layers)
from new weights (`torch.manual_seed(seed)`); 400 supervised warm-up steps of 16 answers at
3e-3; then GRPO (16 prompts x 8 answers, one pass) and PPO (64 prompts, a critic, two passes),
each for 60 rounds from the same warmed-up weights, AdamW at 5e-4, beta 0.02, answers of at most
4 tokens, random streams seeded with seed + 1. Greedy exact-match accuracy is measured every 20
rounds on the training and the held-out problems.

A seed changes the split, the initial weights, the warm-up batches and the samples, so over N
seeds the held-out accuracy is measured on N different sets of 80 problems. Each held-out
change (after - before) is paired with its own seed's start; the p-value is the exact sign-flip
(permutation) test of a mean change of zero over the 2^N sign patterns.

--quick also runs the notebook's preference runs (sections 8.2 and 8.6: a reward model and DPO on
155 pairs, 80 steps each), so that one command recomputes every seeded number of sections 8.2, 8.6
and 8.7 (tests/test_chapter_numbers_ch08.py compares them with the chapter).

A run of a few hundred steps is chaotic: the last bits of a sum, which differ between the AVX2
and AVX-512 kernels of ATen and MKL, grow into a different warm-up loss and different answers.
So that a quoted number reproduces on any x86-64 CPU with AVX2, the script pins the AVX2 kernels
of ATen and oneDNN and MKL's strict conditional-numerical-reproducibility mode (PORTABLE_KERNELS,
set before torch loads; --native keeps the CPU's fastest kernels, and its numbers differ by CPU).

    python benchmarks/bench_align.py              # 10 seeds, one thread (9 minutes on a busy 2-core CPU)
    python benchmarks/bench_align.py --quick      # seed 0 (the notebook's run) and the preference runs: 45 s of CPU
    python benchmarks/bench_align.py --seeds 0 1 2 --json runs/align-seeds.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if __name__ == "__main__" and "--native" not in sys.argv[1:]:
    os.environ.update(PORTABLE_KERNELS)  # read once, when torch first dispatches and MKL starts

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt.config import model_config  # noqa: E402
from minigpt.data import (PreferenceDataset, encode_prompt, format_prompt, load_preference_data,  # noqa: E402
                          preference_collate)
from minigpt.evaluate import sign_flip_p_value  # noqa: E402
from minigpt.model import GPTModel  # noqa: E402
from minigpt.scale import cpu_description, cpu_features  # noqa: E402
from minigpt.rlhf import (RLModels, RLSettings, add_reward_head, arithmetic_records, bradley_terry_loss,  # noqa: E402
                          byte_tokenizer, dpo_batch_loss, evaluate_dpo, exact_match_accuracy, exact_match_rewards,
                          grpo_update, ppo_update, preference_accuracy, reward_scores, sample_responses,
                          supervised_warmup)

FULL_SEEDS = tuple(range(10))
QUICK_SEEDS = (0,)
NUM_TRAIN, WARMUP_STEPS, ROUNDS, EVAL_EVERY = 320, 400, 60, 20
SIZE = dict(emb_dim=64, n_layers=2, n_heads=4)


class SumsTask:
    """The split, its encoded prompts and greedy accuracy on both halves, for one seed."""

    def __init__(self, seed: int):
        self.tokenizer = byte_tokenizer()
        problems = arithmetic_records(19, seed=seed)
        self.train, self.test = problems[:NUM_TRAIN], problems[NUM_TRAIN:]
        encode = lambda records: [encode_prompt(format_prompt(r, "chat"), self.tokenizer, "chat") for r in records]
        self.train_prompts, self.test_prompts = encode(self.train), encode(self.test)

    def accuracy(self, model: torch.nn.Module) -> tuple[float, float]:
        """Greedy exact-match accuracy on the training and on the held-out problems."""
        return (exact_match_accuracy(model, self.train_prompts, [r["output"] for r in self.train], self.tokenizer, 4),
                exact_match_accuracy(model, self.test_prompts, [r["output"] for r in self.test], self.tokenizer, 4))


def warmed_up_model(task: SumsTask, seed: int) -> tuple[GPTModel, list[float]]:
    """A new byte-level GPT fine-tuned on the training answers; returns it and its warm-up losses."""
    torch.manual_seed(seed)
    cfg = model_config("gpt-mini", context_length=48, drop_rate=0.0, vocab_size=task.tokenizer.vocab_size, **SIZE)
    model = GPTModel(cfg)
    losses = supervised_warmup(model, task.train, task.tokenizer, "chat", steps=WARMUP_STEPS, batch_size=16,
                               learning_rate=3e-3, generator=torch.Generator().manual_seed(seed))
    return model, losses


def run_method(task: SumsTask, base: GPTModel, method: str, seed: int, rounds: int = ROUNDS) -> dict:
    """GRPO or PPO from `base` for `rounds` rounds; greedy accuracy every EVAL_EVERY rounds."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy, reference = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    if method == "ppo":
        critic = add_reward_head(copy.deepcopy(base))  # the value head: a copy with a scalar head at 0
        models, params = RLModels(policy, reference, critic), [*policy.parameters(), *critic.parameters()]
        settings = RLSettings(beta=0.02, max_new_tokens=4, minibatch_size=64, epochs=2)
    else:
        models, params = RLModels(policy, reference), list(policy.parameters())
        settings = RLSettings(beta=0.02, max_new_tokens=4, minibatch_size=64, epochs=1, group_size=8)
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    update, prompts_per_round = (grpo_update, 16) if method == "grpo" else (ppo_update, 64)
    log = {"reward": [], "kl": [], "train_acc": [], "test_acc": []}
    start = time.perf_counter()
    for round_ in range(1, rounds + 1):
        rows = torch.randperm(len(task.train_prompts), generator=generator)[:prompts_per_round].tolist()
        answers = [task.train[i]["output"] for i in rows]
        out = update(models, optimizer, [task.train_prompts[i] for i in rows], task.tokenizer,
                     lambda rollout: exact_match_rewards(rollout, answers), settings, generator)
        log["reward"].append(out["reward"])
        log["kl"].append(out["kl"])
        if round_ % EVAL_EVERY == 0:
            train_acc, test_acc = task.accuracy(policy)
            log["train_acc"].append(train_acc)
            log["test_acc"].append(test_acc)
    log["seconds"] = time.perf_counter() - start
    return log


def run_seed(seed: int, rounds: int = ROUNDS) -> dict:
    """Warm-up, then GRPO and PPO, for one seed: the notebook's run when seed is 0."""
    task = SumsTask(seed)
    start = time.perf_counter()
    base, losses = warmed_up_model(task, seed)
    warmup_seconds = time.perf_counter() - start
    train_acc, test_acc = task.accuracy(base)
    rollout = sample_responses(base, task.train_prompts[:2], task.tokenizer, samples_per_prompt=4, max_new_tokens=4,
                               generator=torch.Generator().manual_seed(seed))  # the notebook's two groups of four
    result = dict(seed=seed, warmup_first=losses[0], warmup_last=losses[-1], warmup_seconds=warmup_seconds,
                  start_train=train_acc, start_test=test_acc, held_out=len(task.test),
                  samples=dict(questions=[r["instruction"] for r in task.train[:2]], answers=rollout.texts))
    for method in ("grpo", "ppo"):
        result[method] = run_method(task, base, method, seed + 1, rounds)
    return result


def preference_runs(pairs: int = 200, steps: int = 80, max_length: int = 128) -> dict[str, list]:
    """The notebook's sections 8.2 and 8.6: a reward model and DPO, each from new weights (seed 0), on the
    pairs of the first `pairs` records that fit; held-out accuracy / DPO numbers every 20 steps."""
    tokenizer = byte_tokenizer()
    dataset = PreferenceDataset(load_preference_data()[:pairs], tokenizer, "chat")
    examples = [e for e in dataset.examples if e[2] <= max_length - 16]  # room for an answer
    split = int(0.8 * len(examples))
    batches = lambda rows: [preference_collate(rows[i:i + 8], eos_id=tokenizer.eos_id, allowed_max_length=max_length)
                            for i in range(0, len(rows), 8)]
    train, test = batches(examples[:split]), batches(examples[split:])

    def new_model() -> GPTModel:
        torch.manual_seed(0)
        return GPTModel(model_config("gpt-mini", context_length=max_length, drop_rate=0.0,
                                     vocab_size=tokenizer.vocab_size, **SIZE))

    reward_model = add_reward_head(new_model())
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=1e-3, weight_decay=0.0)
    reward_accuracy = []
    for step in range(1, steps + 1):
        b = train[(step - 1) % len(train)]
        loss = bradley_terry_loss(reward_scores(reward_model, b["chosen_inputs"], b["chosen_targets"]),
                                  reward_scores(reward_model, b["rejected_inputs"], b["rejected_targets"]))
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if step % 20 == 0:
            reward_accuracy.append(preference_accuracy(reward_model, test))
    policy = new_model()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    dpo = [dict(step=0, **evaluate_dpo(policy, reference, test))]
    for step in range(1, steps + 1):
        loss, _ = dpo_batch_loss(policy, reference, train[(step - 1) % len(train)], beta=0.1)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if step % 20 == 0:
            dpo.append(dict(step=step, **evaluate_dpo(policy, reference, test)))
    return dict(pairs=[len(examples), split], reward_accuracy=reward_accuracy, dpo=dpo)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def summarise(results: list[dict]) -> dict[str, dict]:
    """Mean, standard deviation and per-seed values of each quoted quantity, and the paired tests."""
    columns = {"warm-up loss": [r["warmup_last"] for r in results],
               "train, start": [r["start_train"] for r in results],
               "held-out, start": [r["start_test"] for r in results]}
    for method in ("grpo", "ppo"):
        columns[f"{method} train, end"] = [r[method]["train_acc"][-1] for r in results]
        columns[f"{method} held-out, end"] = [r[method]["test_acc"][-1] for r in results]
        columns[f"{method} held-out change"] = [r[method]["test_acc"][-1] - r["start_test"] for r in results]
        columns[f"{method} train change"] = [r[method]["train_acc"][-1] - r["start_train"] for r in results]
    columns["grpo - ppo, held-out end"] = [r["grpo"]["test_acc"][-1] - r["ppo"]["test_acc"][-1] for r in results]
    summary = {}
    for name, values in columns.items():
        mean, std = spread(values)
        paired = name.endswith("change") or name.startswith("grpo - ppo")
        summary[name] = dict(values=values, mean=mean, std=std,
                             p=sign_flip_p_value(values) if paired and len(values) > 1 else None)
    return summary


def print_report(results: list[dict], seconds: float) -> None:
    pct = lambda x: f"{100 * x:.1f}%"
    print(f"{len(results)} seed(s), {results[0]['held_out']} held-out sums each, {seconds:.0f} s in all")
    print("\nper seed: warm-up loss | greedy accuracy train / held-out: start -> GRPO end, PPO end "
          "(rounds " + ", ".join(str(EVAL_EVERY * (i + 1)) for i in range(len(results[0]['grpo']['test_acc']))) + ")")
    for r in results:
        print(f"  seed {r['seed']}: {r['warmup_first']:.3f} -> {r['warmup_last']:.3f} ({r['warmup_seconds']:.1f} s) | "
              f"train {pct(r['start_train'])} -> {pct(r['grpo']['train_acc'][-1])}, {pct(r['ppo']['train_acc'][-1])} | "
              f"held-out {pct(r['start_test'])} -> {pct(r['grpo']['test_acc'][-1])}, {pct(r['ppo']['test_acc'][-1])}")
        print(f"    samples for {r['samples']['questions']}: {r['samples']['answers']}")
        for method in ("grpo", "ppo"):
            log = r[method]
            print(f"    {method.upper()} {log['seconds']:.1f} s: train {[pct(a) for a in log['train_acc']]} "
                  f"held-out {[pct(a) for a in log['test_acc']]} | reward first/last 10 rounds "
                  f"{statistics.fmean(log['reward'][:10]):.3f} / {statistics.fmean(log['reward'][-10:]):.3f} "
                  f"| KL last round {log['kl'][-1]:.3f}")
    print("\nover seeds: mean +- sample standard deviation; p: exact sign-flip test of a zero mean")
    for name, row in summarise(results).items():
        scale, unit = (1, "") if name == "warm-up loss" else (100, " pts" if "change" in name or " - " in name else "%")
        p = "" if row["p"] is None else f"   p = {row['p']:.3f}"
        print(f"  {name:<26} {scale * row['mean']:+8.2f} +- {scale * row['std']:5.2f}{unit}{p}")


def markdown_tables(results: list[dict]) -> str:
    """Section 8.7's two tables, from `summarise`: every seed's numbers, their mean and standard
    deviation, and the changes after the last round with their sign-flip p-values."""
    summary = summarise(results)
    columns = ["warm-up loss", "train, start", "held-out, start",
               "grpo train, end", "grpo held-out, end", "ppo train, end", "ppo held-out, end"]
    show = lambda name, x: f"{x:.3f}" if name == "warm-up loss" else f"{100 * x:.1f}%"
    mean_sd = lambda name, row: (f"{row['mean']:.3f} ± {row['std']:.3f}" if name == "warm-up loss" else
                                 f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}%")
    header = [name.replace("grpo", "GRPO").replace("ppo", "PPO") for name in columns]
    lines = ["| seed | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(show(name, summary[name]["values"][i]) for name in columns) + " |"
              for i, r in enumerate(results)]
    lines += ["| mean ± sd | " + " | ".join(mean_sd(name, summary[name]) for name in columns) + " |", "",
              "| change after 60 rounds | GRPO | PPO |", "|---|---|---|"]
    for label, column in (("training", "train"), ("held-out", "held-out")):
        cells = [f"{100 * row['mean']:+.1f} ± {100 * row['std']:.1f} points (p = {row['p']:.3f})".replace("-", "\u2212")
                 for row in (summary[f"{method} {column} change"] for method in ("grpo", "ppo"))]
        lines.append(f"| {label} problems | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_preferences(runs: dict[str, list]) -> None:
    print(f"\npreference runs (sections 8.2 and 8.6): {runs['pairs'][0]} pairs, {runs['pairs'][1]} to train")
    print("  reward model, held-out pairs ranked right every 20 steps:",
          [f"{100 * a:.1f}%" for a in runs["reward_accuracy"]])
    for row in runs["dpo"]:
        print(f"  DPO step {row['step']:>3}: loss {row['loss']:.4f}  chosen {row['chosen_reward']:+.3f}  "
              f"rejected {row['rejected_reward']:+.3f}  margin {row['margin']:+.3f}  "
              f"ranked right {100 * row['accuracy']:.1f}%")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 (the notebook's run) and the preference runs")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {list(FULL_SEEDS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--native", action="store_true", help="the CPU's own kernels (numbers differ by CPU)")
    parser.add_argument("--json", type=Path, help="write every seed's numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    features = cpu_features()
    print("bench_align:", cpu_description(features), "| python", platform.python_version())
    start = time.perf_counter()
    report = dict(cpu=features, results=[])
    if args.quick:
        report["preferences"] = preference_runs()
        print_preferences(report["preferences"])
    for seed in seeds:
        report["results"].append(run_seed(seed))
        print(f"  seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print_report(report["results"], time.perf_counter() - start)
    if len(report["results"]) > 1:
        print("\nsection 8.7's tables:\n" + markdown_tables(report["results"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
