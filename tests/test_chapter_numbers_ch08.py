"""Chapter 8's seeded numbers are what the code gives: sections 8.2, 8.6 and 8.7 against a rerun of
`benchmarks/bench_align.py --quick`, section 8.7's over-seeds summary against its own per-seed rows,
and section 8.3's Monte Carlo estimates recomputed here.

The quick setting runs with the AVX2 kernels of ATen, oneDNN and MKL pinned (strict reproducibility
mode), so on any x86-64 CPU with AVX2 and the torch the chapter names it gives the same bits. The
tolerance is therefore the chapter's own rounding: each recomputed number, printed with the digits
the chapter prints, must read exactly as the chapter does (a loss to 0.001, an accuracy to 0.1%).
Summary rows must match the per-seed rows they summarise within half their last digit.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from conftest import ROOT
from minigpt.evaluate import sign_flip_p_value

CHAPTER = ROOT / "chapters" / "08-alignment.md"
NOTEBOOK = ROOT / "notebooks" / "ch08-alignment.ipynb"


def section(number: str) -> str:
    text = CHAPTER.read_text(encoding="utf-8")
    start = text.index(f"\n## {number} ")
    return text[start:text.index("\n## ", start + 1)]


def flat(number: str) -> str:
    """A section's text with every run of white space as one space (sentences wrap across lines)."""
    return " ".join(section(number).split())


def quoted(pattern: str, number: str) -> tuple[str, ...]:
    found = re.search(pattern, flat(number))
    assert found, f"section {number} no longer matches {pattern!r}: update the chapter or this test"
    return found.groups()


def table_rows(number: str, header_start: str) -> list[list[str]]:
    """The body rows of the first table in a section whose header row starts with `header_start`."""
    lines = section(number).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def cpu_supports_the_pinned_kernels() -> tuple[bool, str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if platform.machine() not in ("x86_64", "AMD64") or " avx2" not in flags:
        return False, f"the quoted numbers need an x86-64 CPU with AVX2 (this is {platform.machine()})"
    recorded = re.search(r"torch (\d+\.\d+\.\d+)", flat("8.7"))
    if recorded and not torch.__version__.startswith(recorded.group(1)):
        return False, f"the chapter's numbers were measured with torch {recorded.group(1)}, this is {torch.__version__}"
    return True, ""


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of the quick setting (seed 0 of section 8.7 and the preference runs), in its own process:
    the pinned kernels must be chosen before torch loads."""
    supported, why = cpu_supports_the_pinned_kernels()
    if not supported:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("bench_align") / "quick.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_align.py"), "--quick", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bench_align.py --quick failed:\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["cpu"]["aten_capability"] == "AVX2" and report["cpu"]["mkl_cbwr"] == "AVX2,STRICT"
    return report


def test_reward_model_and_dpo_numbers(quick):
    runs = quick["preferences"]
    kept, train, held_out = quoted(r"\((\d+) of them: (\d+) to train on, (\d+) held out\)", "8.2")
    pairs, train_pairs = runs["pairs"]
    assert [int(kept), int(train), int(held_out)] == [pairs, train_pairs, pairs - train_pairs]
    accuracy = quoted(r"reads ([\d.]+%), ([\d.]+%), ([\d.]+%) and \*\*([\d.]+%)\*\* after 20, 40, 60 and 80 steps",
                      "8.2")
    assert list(accuracy) == [pct(a) for a in runs["reward_accuracy"]]
    rows = table_rows("8.6", "| step | loss")
    expected = [[str(r["step"]), f"{r['loss']:.4f}", f"{r['chosen_reward']:+.3f}", f"{r['rejected_reward']:+.3f}",
                 f"{r['margin']:+.3f}", pct(r["accuracy"])] for r in runs["dpo"]]
    assert [[cell.replace("−", "-") for cell in row] for row in rows] == expected


def test_section_8_7_seed_0_is_the_quick_setting(quick):
    run = quick["results"][0]
    assert run["seed"] == 0
    assert quoted(r"loss ([\d.]+) → ([\d.]+)\)", "8.7") == (f"{run['warmup_first']:.3f}", f"{run['warmup_last']:.3f}")
    start = quoted(r"gets ([\d.]+%) of the training problems and ([\d.]+%) of the held-out ones", "8.7")
    assert start == (pct(run["start_train"]), pct(run["start_test"]))
    first, second = (answers.split(", ") for answers in quoted(
        r'four samples for "What is 7 \+ 10\?" were ([\d, ]+?) \(rewards'
        r'.*?four for "What is 19 \+ 1\?" were ([\d, ]+?):', "8.7"))
    assert run["samples"]["questions"] == ["What is 7 + 10?", "What is 19 + 1?"]
    assert first + second == run["samples"]["answers"]
    table = {row[0]: row[1:] for row in table_rows("8.7", "| | round 0")}
    for method in ("grpo", "ppo"):
        log = run[method]
        for label, start_acc, accuracies in (("training", run["start_train"], log["train_acc"]),
                                             ("held-out", run["start_test"], log["test_acc"])):
            assert table[f"{method.upper()}, {label} problems"] == [pct(a) for a in [start_acc, *accuracies]]
    rewards = quoted(r"goes from ([\d.]+) to ([\d.]+) \(GRPO\) and from ([\d.]+) to ([\d.]+) \(PPO\)", "8.7")
    assert rewards == tuple(f"{statistics.fmean(run[m]['reward'][part]):.3f}" for m in ("grpo", "ppo")
                            for part in (slice(0, 10), slice(-10, None)))
    assert quoted(r"ending at ([\d.]+) \(GRPO\) and ([\d.]+) \(PPO\)", "8.7") == (
        f"{run['grpo']['kl'][-1]:.3f}", f"{run['ppo']['kl'][-1]:.3f}")
    five_round_means = {m: [statistics.fmean(run[m]["kl"][max(0, i - 4):i + 1]) for i in range(len(run[m]["kl"]))]
                        for m in ("grpo", "ppo")}  # the figure's curves; the text quotes them from round 40 on
    assert quoted(r"between ([\d.]+) and ([\d.]+) \(GRPO\) and ([\d.]+) and ([\d.]+) \(PPO\)", "8.7") == tuple(
        f"{f(five_round_means[m][39:]):.2f}" for m in ("grpo", "ppo") for f in (min, max))
    seed_rows = {row[0]: row[1:] for row in table_rows("8.7", "| seed |")}
    assert seed_rows["0"] == [f"{run['warmup_last']:.3f}", pct(run["start_train"]), pct(run["start_test"]),
                              pct(run["grpo"]["train_acc"][-1]), pct(run["grpo"]["test_acc"][-1]),
                              pct(run["ppo"]["train_acc"][-1]), pct(run["ppo"]["test_acc"][-1])]


# Accuracies are printed to 0.1%, finer than one problem of 320 (0.3125%) or of 80 (1.25%), so each
# per-seed accuracy read from the text gives back its exact count of problems.
PROBLEMS = {"train": 320, "held-out": 80}


def per_seed_columns() -> tuple[dict[str, list[float]], dict[str, str]]:
    """Section 8.7's over-seeds table: every column's per-seed values (accuracies as exact shares,
    in points) and the summary row as printed."""
    assert "the first 320 train and the last 80 are held out" in flat("8.7")
    lines = section("8.7").splitlines()
    header = next(line for line in lines if line.startswith("| seed |"))
    names = [cell.strip() for cell in header.strip("|").split("|")][1:]
    rows = table_rows("8.7", "| seed |")
    seeds = [row for row in rows if row[0].isdigit()]
    columns = {}
    for i, name in enumerate(names):
        printed = [float(row[i + 1].rstrip("%")) for row in seeds]
        problems = next((n for part, n in PROBLEMS.items() if f"{part}," in name), None)  # None: the loss
        columns[name] = printed if problems is None else [100 * round(x * problems / 100) / problems for x in printed]
    summary = next(row for row in rows if row[0].startswith("mean"))
    return columns, dict(zip(names, summary[1:]))


def mean_and_sd(printed: str) -> tuple[float, float]:
    mean, sd = re.fullmatch(r"([−+-]?[\d.]+) ± ([\d.]+)%?", printed.replace("−", "-")).groups()
    return float(mean), float(sd)


def test_section_8_7_summary_is_the_mean_and_spread_of_its_seeds():
    columns, summary = per_seed_columns()
    assert len(next(iter(columns.values()))) >= 5, "section 8.7 should report at least five seeds"
    for name, values in columns.items():
        # Half the summary's last digit; losses are read rounded to 0.001 themselves, which adds as much again.
        slack = (0.001 if "loss" in name else 0.05) + 1e-9
        mean, sd = mean_and_sd(summary[name])
        assert abs(statistics.fmean(values) - mean) <= slack, f"column {name!r}: mean"
        assert abs(statistics.stdev(values) - sd) <= slack, f"column {name!r}: standard deviation"


def changes(columns: dict[str, list[float]], method: str, part: str) -> list[float]:
    start = columns[f"{part}, start"]
    return [end - s for end, s in zip(columns[f"{method} {part}, end"], start)]


def test_section_8_7_changes_and_p_values_follow_from_the_seeds():
    columns, _ = per_seed_columns()
    table = {row[0]: row[1:] for row in table_rows("8.7", "| change after 60 rounds |")}
    for i, method in enumerate(("GRPO", "PPO")):
        for label, part in (("training", "train"), ("held-out", "held-out")):
            diff = changes(columns, method, part)
            mean, sd, p = re.fullmatch(r"([+-][\d.]+) ± ([\d.]+) points \(p = ([\d.]+)\)",
                                       table[f"{label} problems"][i].replace("−", "-")).groups()
            assert abs(statistics.fmean(diff) - float(mean)) <= 0.05 + 1e-9, f"{method} {label}: mean"
            assert abs(statistics.stdev(diff) - float(sd)) <= 0.05 + 1e-9, f"{method} {label}: sd"
            assert p == f"{sign_flip_p_value(diff):.3f}", f"{method} {label}: p-value"


def test_section_8_7_welch_and_grpo_against_ppo_follow_from_the_seeds():
    from minigpt.evaluate import welch_t_test

    columns, _ = per_seed_columns()
    grpo, ppo = quoted(r"finds no significant change \(p = ([\d.]+) for GRPO, ([\d.]+) for PPO\)", "8.7")
    for quoted_p, method in ((grpo, "GRPO"), (ppo, "PPO")):
        unpaired = welch_t_test(columns[f"{method} held-out, end"], columns["held-out, start"])
        assert quoted_p == f"{unpaired['p']:.3f}", method
    diff = [g - p for g, p in zip(columns["GRPO held-out, end"], columns["PPO held-out, end"])]
    mean, sd, p = quoted(r"GRPO ends ([+-][\d.]+) ± ([\d.]+) points above PPO on the held-out problems "
                         r"\(p = ([\d.]+)\)", "8.7")
    assert (mean, sd, p) == (f"{statistics.fmean(diff):+.2f}", f"{statistics.stdev(diff):.2f}",
                             f"{sign_flip_p_value(diff):.3f}")


def test_the_notebook_prints_what_section_8_7_quotes():
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    printed = "\n".join(output.get("text", "") for cell in cells if cell.cell_type == "code"
                        for output in cell.get("outputs", []))
    first, last = quoted(r"loss ([\d.]+) → ([\d.]+)\)", "8.7")
    train, held_out = quoted(r"gets ([\d.]+%) of the training problems and ([\d.]+%) of the held-out ones", "8.7")
    assert f"loss {first} -> {last}; greedy accuracy train {train}, held-out {held_out}" in printed, (
        "the notebook's stored outputs differ from section 8.7: re-execute notebooks/ch08-alignment.ipynb")
    table = {row[0]: row[1:] for row in table_rows("8.7", "| | round 0")}
    for method in ("GRPO", "PPO"):
        held = ", ".join(f"'{cell}'" for cell in table[f"{method}, held-out problems"])
        assert f"| held-out [{held}]" in printed, f"the notebook's {method} accuracies differ from section 8.7"


def test_section_8_3_monte_carlo_kl_estimates():
    from minigpt.rlhf import kl_k1, kl_k3

    k1, k3 = quoted(r"100,000 samples from \$p\$ average to ([\d.]+) \(\$k_1\$\) and ([\d.]+) \(\$k_3\$\)", "8.3")
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])  # the section's policy and reference
    draws = torch.multinomial(p, 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert (k1, k3) == (f"{kl_k1(p.log(), q.log())[draws].mean().item():.4f}",
                        f"{kl_k3(p.log(), q.log())[draws].mean().item():.4f}")


def test_the_reward_row_of_section_8_9_is_what_main_py_gives(tmp_path):
    """Section 8.9's table is `python main.py` in quick mode on the CPU's own kernels; its reward-model row
    (the cheapest, about 45 s on one thread) is rerun here, the other rows take minutes each."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("section 8.9's table was measured with the CPU's own AVX-512 kernels; this CPU rounds differently")
    row = next(row for row in table_rows("8.9", "| run |") if row[0] == "`--task reward`")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "main.py", "--task", "reward", "--out", str(tmp_path / "reward")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "reward" / "metrics.json").read_text())
    assert row[2:4] == [pct(metrics["before"]["test_accuracy"]), pct(metrics["after"]["test_accuracy"])]
