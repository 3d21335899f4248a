"""Evaluation (chapters 9 and 12): turning a model's outputs into numbers that compare fairly.

The loss is in nats per token, so it depends on the tokenizer: a character-level model
predicts many easy tokens, a BPE model fewer, harder ones. Two conversions help:

- perplexity = e^loss, "as unsure as a uniform choice among this many tokens";
- bits per byte = the total loss over a text, in bits, divided by the text's UTF-8 bytes.
  It does not care how the text was cut into tokens, so it compares a character model with
  a BPE model, or minigpt with any other language model, on the same text.

Chapter 12 adds the rest of the evaluator's kit: length-normalised multiple choice and
contamination checks, a judge's position bias, agreement between human raters (Cohen's kappa),
a model's loss broken down token by token, and Welch's t-test for runs over several seeds.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt.config import ConfigError
from minigpt.data import create_dataloader, read_text
from minigpt.download import cache_dir, download_file
from minigpt.model import GPTModel


def perplexity(loss: float) -> float:
    """e^loss: the number of equally likely tokens the model is as unsure as; inf once e^loss
    overflows a float (a loss above about 709, as an untrained or diverging model can have)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
    """Mean loss (nats per token) over `num_tokens` tokens that encode `num_bytes` UTF-8 bytes,
    as bits per byte: loss x tokens / bytes / ln 2."""
    if num_tokens <= 0 or num_bytes <= 0:
        raise ValueError(f"need positive token and byte counts, got {num_tokens} tokens and {num_bytes} bytes.")
    return loss * num_tokens / (num_bytes * math.log(2))


@torch.no_grad()
def evaluate_text(model: torch.nn.Module, tokenizer, text: str, max_length: int, batch_size: int = 8,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Loss, perplexity and bits per byte of `model` on `text`, over non-overlapping windows
    (and, for a model with adaptive depth, the mean number of blocks a token ran: "mean_depth").

    Every token but the first is predicted once, from the tokens before it in its window
    (so from up to `max_length - 1` tokens of context). Bits per byte counts the bytes of the
    text the scored tokens cover.
    """
    return evaluate_ids(model, tokenizer, tokenizer.encode(text, allowed_special="all"), max_length, batch_size, device)


def scored_windows(model: torch.nn.Module, ids: list[int], max_length: int, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """The non-overlapping windows every evaluation here scores, in order, each batch with the model's
    output: yields (inputs, targets, output), output being the logits (B, T, V) or, for a model with
    adaptive depth, its `ModelOutput` (logits and each token's depth). The model is in eval mode
    and under no_grad meanwhile, and goes back to its mode after."""
    loader = create_dataloader(ids, batch_size=batch_size, max_length=max_length, stride=max_length,
                               shuffle=False, drop_last=False, name="the evaluation text")
    halting = isinstance(model, GPTModel) and model.cfg.halting  # adaptive depth: count the blocks each token ran
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, targets in loader:
                yield inputs, targets.to(device), model(inputs.to(device), details=True) if halting \
                    else model(inputs.to(device))
    finally:
        model.train(was_training)


def evaluate_ids(model: torch.nn.Module, tokenizer, ids: list[int], max_length: int, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> dict[str, float]:
    """`evaluate_text` on token ids already made (pre-tokenized data); `tokenizer` decodes them to count bytes."""
    total_loss, correct, count, depth, halting = 0.0, 0, 0, 0.0, False
    for _, targets, output in scored_windows(model, ids, max_length, batch_size, device):
        if not torch.is_tensor(output):  # a ModelOutput: adaptive depth
            halting = True
            depth += output.depth.sum().item()
            output = output.logits
        logits = output.float()                                             # (B, T, V)
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == targets).sum())
        count += targets.numel()
    loss = total_loss / count
    scored = ids[1:count + 1]  # the targets of every (full) window, in order
    num_bytes = len(tokenizer.decode(scored).encode("utf-8"))
    result = {"loss": loss, "perplexity": perplexity(loss), "bits_per_byte": bits_per_byte(loss, len(scored), num_bytes),
              "next_token_accuracy": correct / count, "tokens": len(scored), "bytes": num_bytes}
    if halting:
        result["mean_depth"] = depth / count
    return result


def report_markdown(report: dict[str, Any]) -> str:
    """A short Markdown table of an evaluation report (what `--task evaluate` writes beside its JSON).
    An ensemble's report has a column for the ensemble and one for each of its "members"."""
    columns = [report] + report.get("members", [])
    lines = [f"# Evaluation of {report['model']}", ""]
    if len(columns) == 1:
        lines += ["| measure | value |", "|---|---|"]
    else:
        lines += ["| measure | ensemble | " + " | ".join(member["model"] for member in columns[1:]) + " |",
                  "|---" * (len(columns) + 1) + "|"]

    def row(measure: str, section: str, show, shared: bool = False) -> str:
        """One measure per column; a `shared` one (the same for every column) is shown once."""
        cells = [show(column[section]) if not shared or i == 0 else "" for i, column in enumerate(columns)]
        return f"| {measure} | " + " | ".join(cells) + " |"

    if report.get("text"):
        lines += [row("text", "text", lambda t: f"{t['file']} ({t['tokens']:,} tokens scored, {t['bytes']:,} bytes)",
                      shared=True),
                  row("loss (nats per token)", "text", lambda t: f"{t['loss']:.4f}"),
                  row("perplexity", "text", lambda t: f"{t['perplexity']:,.2f}"),
                  row("bits per byte", "text", lambda t: f"{t['bits_per_byte']:.4f}"),
                  row("next-token accuracy", "text", lambda t: f"{100 * t['next_token_accuracy']:.2f}%")]
        if any("mean_depth" in column["text"] for column in columns):
            lines.append(row("blocks per token (adaptive depth)", "text",
                             lambda t: f"{t['mean_depth']:.2f}" if "mean_depth" in t else ""))
    if report.get("multiple_choice"):
        lines += [row("multiple choice", "multiple_choice", lambda c: f"{c['file']} ({c['items']:,} items)",
                      shared=True),
                  row("acc (total log-probability)", "multiple_choice", lambda c: f"{c['acc']:.4f}"),
                  row("acc_norm (mean log-probability per token)", "multiple_choice", lambda c: f"{c['acc_norm']:.4f}")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Multiple choice, HellaSwag style: which ending does the model find most likely?
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def ending_logprobs(model: torch.nn.Module, tokenizer, context: str, endings: list[str],
                    device: torch.device | str = "cpu") -> list[tuple[float, int]]:
    """(log P(ending | context) summed over the ending's tokens, number of those tokens) for each
    ending, written after the context with a space as in HellaSwag. A context too long for the
    model keeps its last tokens."""
    context_ids = tokenizer.encode(context, allowed_special="all")
    rows = [tokenizer.encode(" " + ending, allowed_special="all") for ending in endings]
    limit = model.cfg.context_length + 1  # inputs are all but the last token
    if max(len(ids) for ids in rows) >= limit:
        raise ConfigError(f"an ending of {max(len(ids) for ids in rows)} tokens does not fit, with any "
                          f"context, in the model's {model.cfg.context_length} positions.")
    scores = []
    for ending_ids in rows:
        ids = (context_ids + ending_ids)[-limit:]
        start = len(ids) - len(ending_ids)                     # where the ending begins
        logits = model(torch.tensor([ids[:-1]], device=device))[0].float()
        logprobs = torch.log_softmax(logits[start - 1:], dim=-1)  # the positions that predict the ending
        picked = logprobs.gather(-1, torch.tensor(ids[start:], device=device).unsqueeze(-1))
        scores.append((picked.sum().item(), len(ending_ids)))
    return scores


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, items: list[dict], device: torch.device | str = "cpu",
                             progress: bool = True) -> dict[str, float]:
    """acc: the share of items whose highest-scoring ending (total log-probability) is the labelled
    one; acc_norm: the same with the mean log-probability per token, which does not penalise
    long endings. Items are {"context", "endings", "label"} (label: the right ending's index)."""
    was_training = model.training
    model.eval()
    right = right_norm = 0
    for item in tqdm(items, desc="multiple choice", disable=not progress, leave=False):
        scores = ending_logprobs(model, tokenizer, item["context"], item["endings"], device)
        total = max(range(len(scores)), key=lambda i: scores[i][0])
        mean = max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
        right += total == item["label"]
        right_norm += mean == item["label"]
    model.train(was_training)
    return {"acc": right / len(items), "acc_norm": right_norm / len(items), "items": len(items)}


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def load_multiple_choice(path: str | None = None) -> list[dict]:
    """Items {context, endings, label} from a JSONL file, or HellaSwag's 10,042 validation items
    (downloaded once) when `path` is None or "hellaswag". HellaSwag's own fields (ctx, endings,
    label) are read too."""
    if path in (None, "hellaswag"):
        path = download_file(HELLASWAG_URL, cache_dir() / "hellaswag_val.jsonl")
    items = []
    for number, line in enumerate(read_text(Path(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            item = {"context": record["context"] if "context" in record else record["ctx"],
                    "endings": list(record["endings"]), "label": int(record["label"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}, line {number}: expected a JSON object with context (or ctx), endings "
                              f"and label ({type(err).__name__}: {err}).") from None
        if not 0 <= item["label"] < len(item["endings"]) or len(item["endings"]) < 2:
            raise ConfigError(f"{path}, line {number}: label {item['label']} does not index one of its "
                              f"{len(item['endings'])} endings (at least two are needed).")
        items.append(item)
    if not items:
        raise ConfigError(f"{path} holds no items; give JSON Lines of {{context, endings, label}}.")
    return items


# ---------------------------------------------------------------------------------------
# Scoring generated text (chapter 7)
#
# Loss and perplexity say how well a model predicts a reference text; they say nothing about
# the answer it actually writes. Two ways to score a generated response against the correct one:
#
# - ROUGE-L counts words: the longest common subsequence (LCS) of the response and the
#   reference, the words both have in the same order, not necessarily side by side. Precision
#   is the share of the response that is in it, recall the share of the reference. Cheap,
#   deterministic, but blind to meaning: "Paris" and "the capital is Paris" overlap little.
# - A judge model reads the instruction, the correct output and the response, and answers a
#   score from 0 to 100. It sees meaning, but needs a larger model served locally (Ollama),
#   and its scores are only as good as that model.
# ---------------------------------------------------------------------------------------

JUDGE_URL = "http://localhost:11434"  # Ollama's default address
JUDGE_MODEL = "llama3"


def overlap_tokens(text: str) -> list[str]:
    """Lowercased words and numbers (regex \\w+ over the casefolded text, Unicode-aware) — the units ROUGE compares."""
    return re.findall(r"\w+", text.casefold())


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    """Length of the LCS by dynamic programming, O(len(a) * len(b)) time, O(min) memory (two rows).

    lcs[i][j] = the LCS of a[:i] and b[:j]: one more than lcs[i-1][j-1] when a[i-1] == b[j-1],
    else the larger of lcs[i-1][j] and lcs[i][j-1]. Each row needs only the one before it.
    """
    if len(b) > len(a):
        a, b = b, a  # the rows run over the shorter list
    previous = [0] * (len(b) + 1)
    for word_a in a:
        current = [0] * (len(b) + 1)
        for j, word_b in enumerate(b, start=1):
            if word_a == word_b:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> dict[str, float]:
    """ROUGE-L (Lin, 2004) of a generated `candidate` against a `reference`.

    precision = LCS / len(candidate), recall = LCS / len(reference), in tokens, and the
    F-measure (1 + beta^2) P R / (R + beta^2 P), which weighs recall beta times as much as
    precision (beta = 1: the harmonic mean, F1). All 0.0 when either side has no tokens or LCS is 0.
    """
    candidate_tokens, reference_tokens = overlap_tokens(candidate), overlap_tokens(reference)
    lcs = longest_common_subsequence(candidate_tokens, reference_tokens)
    if lcs == 0:  # also covers an empty side
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision = lcs / len(candidate_tokens)
    recall = lcs / len(reference_tokens)
    f1 = (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    return {"precision": precision, "recall": recall, "f1": f1}


def mean_rouge_l(candidates: list[str], references: list[str]) -> dict[str, float]:
    """Macro-average of rouge_l over (candidate, reference) pairs: every response counts the same."""
    if len(candidates) != len(references):
        raise ValueError(f"need one reference per candidate, got {len(candidates)} candidates and "
                         f"{len(references)} references.")
    if not candidates:
        raise ValueError("need at least one candidate and reference to average ROUGE-L over, got none.")
    scores = [rouge_l(candidate, reference) for candidate, reference in zip(candidates, references)]
    return {key: sum(score[key] for score in scores) / len(scores) for key in ("precision", "recall", "f1")}


def ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidate: str, references: str | list[str], max_n: int = 4, smooth: bool = True) -> dict[str, Any]:
    """Sentence BLEU (Papineni et al., 2002), with the same words as ROUGE-L (`overlap_tokens`).

    For n = 1 .. max_n, the candidate's n-grams are counted, each clipped to the most times any
    one reference has it ("the the the" earns one "the" per "the" in a reference), and divided
    by the candidate's n-gram count: the modified precision p_n. BLEU is their geometric mean
    times a brevity penalty, e^(1 - r / c) when the candidate (c words) is shorter than the
    reference closest in length (r words), else 1. With `smooth` (Lin and Och, 2004), 1 is added
    to the matches and the count of every n > 1, so a short answer without a shared 4-gram is
    not scored 0.
    """
    refs = [overlap_tokens(r) for r in ([references] if isinstance(references, str) else references)]
    cand = overlap_tokens(candidate)
    precisions = []
    for n in range(1, max_n + 1):
        counts = ngram_counts(cand, n)
        most = Counter()
        for ref in refs:
            most |= ngram_counts(ref, n)  # per n-gram, the largest count in any one reference
        matches, total = sum(min(c, most[g]) for g, c in counts.items()), sum(counts.values())
        if smooth and n > 1:
            matches, total = matches + 1, total + 1
        precisions.append(matches / total if total else 0.0)
    closest = min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]
    brevity = 0.0 if not cand else 1.0 if len(cand) > closest else math.exp(1 - closest / len(cand))
    mean_log = sum(math.log(p) for p in precisions) / max_n if min(precisions) > 0 else -math.inf
    return {"bleu": brevity * math.exp(mean_log), "precisions": precisions, "brevity_penalty": brevity,
            "candidate_length": len(cand), "reference_length": closest}


def judge_prompt(instruction_prompt: str, reference: str, response: str) -> str:
    """The text sent to the judge: the instruction, the correct output and the response, asking
    for a score from 0 to 100 as a bare integer (easy to read back)."""
    return (f"Given the input `{instruction_prompt}` and correct output `{reference}`, "
            f"score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
            "Respond with the integer number only.")


def judge_available(url: str = JUDGE_URL, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether an Ollama-compatible server answers at `url` (GET {url}/api/tags), and a message
    saying so or what to do. Never raises on network errors: no judge only means no judge scores."""
    import requests

    url = url.rstrip("/")
    advice = (f"start Ollama (`ollama serve`) and pull a model (`ollama pull {JUDGE_MODEL}`) "
              "to get judge scores")
    try:
        response = requests.get(f"{url}/api/tags", timeout=timeout)
    except requests.ConnectionError:
        return False, f"no judge at {url} (connection refused); {advice}"
    except requests.Timeout:
        return False, f"no judge at {url} (no answer within {timeout} s); {advice}"
    except requests.RequestException as err:
        return False, f"no judge at {url} ({type(err).__name__}: {err}); {advice}"
    if response.status_code != 200:
        return False, (f"the server at {url} answered GET /api/tags with HTTP {response.status_code}, "
                       f"so it is not an Ollama judge; {advice}")
    return True, f"judge server at {url} answers"


def judge_score(prompt: str, url: str = JUDGE_URL, model: str = JUDGE_MODEL, timeout: float = 120.0) -> int | None:
    """Ask the judge `model` at `url` for a score: the first integer of its reply if it is in
    0..100, else None (a judge that does not answer with a score gives no score, not a guess).

    Seed 123 and temperature 0 make the judge repeatable on the same server and model.
    """
    import requests

    url = url.rstrip("/")
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,  # one JSON answer instead of a line per token
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    try:
        response = requests.post(f"{url}/api/chat", json=payload, timeout=timeout)
        if response.status_code == 404:
            raise ConfigError(f"the judge at {url} has no model {model!r} (HTTP 404); "
                              f"pull it with `ollama pull {model}`, or name a model it has.")
        response.raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(f"could not get a score from the judge at {url} ({type(err).__name__}: {err}); "
                          f"check that `ollama serve` is running and `ollama pull {model}` was done.") from None
    try:
        content = response.json()["message"]["content"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"the judge at {url} did not answer in Ollama's /api/chat format "
                          f"(got {response.text[:200]!r}); point the URL at an Ollama server.") from None
    match = re.search(r"-?\d+", content)
    if match is None:
        return None
    score = int(match.group())
    return score if 0 <= score <= 100 else None


def judge_responses(items: list[dict], url: str = JUDGE_URL, model: str = JUDGE_MODEL,
                    progress: bool = True) -> dict | None:
    """Score every item ({"prompt", "reference", "response"}) with the judge; None, with a note
    on stderr, when no judge is reachable, so a run without Ollama still finishes.

    `mean_score` averages the scores the judge gave (None if it gave none); `unparsed` counts
    the replies with no score in them.
    """
    available, message = judge_available(url)
    if not available:
        print(f"{message}. Judge scores are skipped.", file=sys.stderr)
        return None
    scores = []
    for item in tqdm(items, desc=f"judging with {model}", unit="response", disable=not progress):
        prompt = judge_prompt(item["prompt"], item["reference"], item["response"])
        scores.append(judge_score(prompt, url=url, model=model))
    given = [score for score in scores if score is not None]
    return {
        "judge_model": model,
        "judge_url": url.rstrip("/"),
        "scores": scores,
        "mean_score": sum(given) / len(given) if given else None,
        "unparsed": len(scores) - len(given),
    }


# ---------------------------------------------------------------------------------------
# Multiple choice, continued (chapter 12): which length to normalise by, and was the item
# in the training text?
#
# A total log-probability favours short endings (every token costs something); the mean per
# token favours endings cut into many easy tokens; the total per byte of text is the same
# whatever the tokenizer did. Contamination: an item whose long n-grams appear word for word
# in the training text measures memory, not skill.
# ---------------------------------------------------------------------------------------

def choose_ending(scores: list[tuple[float, int]], endings: list[str]) -> dict[str, int]:
    """The ending each rule picks from `ending_logprobs`' (total log-probability, tokens) pairs:
    "sum" the total, "per_token" the mean per token (acc_norm), "per_byte" the total over the
    UTF-8 bytes of the ending as scored (with its leading space)."""
    if len(scores) != len(endings) or not scores:
        raise ValueError(f"need one (log-probability, tokens) score per ending, got {len(scores)} scores "
                         f"for {len(endings)} endings.")
    per_byte = [total / len((" " + ending).encode("utf-8")) for (total, _), ending in zip(scores, endings)]
    rules = {"sum": [total for total, _ in scores],
             "per_token": [total / tokens for total, tokens in scores],
             "per_byte": per_byte}
    return {rule: max(range(len(values)), key=values.__getitem__) for rule, values in rules.items()}


def ngram_set(text: str, n: int) -> set[tuple[str, ...]]:
    """The distinct word n-grams of `text` (words as ROUGE and BLEU cut them: `overlap_tokens`)."""
    return set(ngram_counts(overlap_tokens(text), n))


def ngram_overlap(item: str, training_ngrams: set[tuple[str, ...]], n: int = 13) -> float:
    """The share of `item`'s distinct word n-grams found in `training_ngrams` (from `ngram_set`
    of the training text, same n); 0.0 for an item shorter than n words, which has none."""
    grams = ngram_set(item, n)
    return len(grams & training_ngrams) / len(grams) if grams else 0.0


def contamination_report(items: list[str], training_text: str, n: int = 13, threshold: float = 0.5) -> dict[str, Any]:
    """Each item's `ngram_overlap` with the training text, and the items at or above `threshold`.

    n = 13 words is the longest n of GPT-3's contamination study (Brown et al., 2020): a 13-word run
    is almost never shared by chance, while n = 8 already catches idioms and quotations.
    """
    if n < 1 or not 0 < threshold <= 1:
        raise ValueError(f"need n >= 1 and 0 < threshold <= 1, got n={n}, threshold={threshold}.")
    training = ngram_set(training_text, n)
    overlaps = [ngram_overlap(item, training, n) for item in items]
    flagged = [i for i, overlap in enumerate(overlaps) if overlap >= threshold]
    return {"n": n, "threshold": threshold, "overlaps": overlaps, "contaminated": flagged,
            "share": len(flagged) / len(items) if items else 0.0}


# ---------------------------------------------------------------------------------------
# Judges (chapter 12): a judge that prefers whatever it reads first is measuring the order.
# Ask every question twice with the answers swapped; a fair judge picks the same answer both
# times. Any callable works: a model behind an API, a person's form, or a fake for tests.
# ---------------------------------------------------------------------------------------

Judge = Callable[[str, str, str], str]  # judge(question, answer shown first, answer shown second) -> "A", "B" or "tie"


def judge_position_consistency(judge: Judge, items: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Ask `judge` about every (question, x, y) in both orders, (x, y) then (y, x).

    consistent: the share of items whose two verdicts name the same answer (or tie twice);
    first_wins: the share of decided verdicts (not ties) that picked the answer shown first
    (0.5 for a judge with no position bias); longer_wins: the share of decided verdicts on
    answers of different lengths that picked the longer one (verbosity bias).
    """
    if not items:
        raise ValueError("need at least one (question, answer, answer) item to judge, got none.")
    verdicts, consistent, first, decided, longer, unequal = [], 0, 0, 0, 0, 0
    for question, x, y in items:
        pair = []
        for shown in ((x, y), (y, x)):
            verdict = judge(question, *shown)
            if verdict not in ("A", "B", "tie"):
                raise ValueError(f"a judge must answer 'A', 'B' or 'tie', got {verdict!r}.")
            winner = None if verdict == "tie" else shown[verdict == "B"]
            if winner is not None:
                decided += 1
                first += verdict == "A"
                if len(x) != len(y):
                    unequal += 1
                    longer += winner == max(x, y, key=len)
            pair.append(winner)
        consistent += pair[0] == pair[1]
        verdicts.append(tuple(pair))
    return {"items": len(items), "consistent": consistent / len(items),
            "first_wins": first / decided if decided else float("nan"),
            "longer_wins": longer / unequal if unequal else float("nan"), "winners": verdicts}


# ---------------------------------------------------------------------------------------
# Human raters (chapter 12): how much do two raters agree beyond what chance gives?
# ---------------------------------------------------------------------------------------

def cohens_kappa(rater_a: list[Hashable], rater_b: list[Hashable]) -> float:
    """Cohen's kappa (1960) of two raters' labels for the same items: (p_o - p_e) / (1 - p_e), with
    p_o the share of items they agree on and p_e the agreement expected if each labelled at
    random with their own label frequencies. 1: perfect; 0: no better than chance."""
    if len(rater_a) != len(rater_b) or not rater_a:
        raise ValueError(f"need the same, non-zero number of labels from both raters, got {len(rater_a)} "
                         f"and {len(rater_b)}.")
    n = len(rater_a)
    observed = sum(a == b for a, b in zip(rater_a, rater_b)) / n
    count_a, count_b = Counter(rater_a), Counter(rater_b)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / n ** 2
    if expected == 1:
        raise ValueError("both raters gave every item the same single label, so chance agreement is 1 and "
                         "kappa is undefined; rate items that differ, or report the raw agreement.")
    return (observed - expected) / (1 - expected)


# ---------------------------------------------------------------------------------------
# Error analysis (chapter 12): where does the loss come from? One mean hides which tokens a
# model gets wrong; the loss of every token, grouped, shows it.
# ---------------------------------------------------------------------------------------

def token_losses(model: torch.nn.Module, ids: list[int], max_length: int, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The loss of every token `evaluate_ids` scores (same windows, same order), as (N,) tensors:
    "loss" (nats), "target" (the token), "previous" (the token before it), "predicted" (the
    model's most likely token) and "position" (the target's index in its window, 0 .. max_length - 1)."""
    parts = {key: [] for key in ("loss", "target", "previous", "predicted", "position")}
    for inputs, targets, output in scored_windows(model, ids, max_length, batch_size, device):
        logits = (output if torch.is_tensor(output) else output.logits).float().cpu()  # (B, T, V)
        targets = targets.cpu()
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        parts["loss"].append(losses)                                             # (B * T,)
        parts["target"].append(targets.flatten())
        parts["previous"].append(inputs.flatten())
        parts["predicted"].append(logits.argmax(dim=-1).flatten())
        parts["position"].append(torch.arange(targets.shape[1]).repeat(targets.shape[0]))
    return {key: torch.cat(values) for key, values in parts.items()}


def token_kind(token: str, previous: str) -> str:
    """What a token is, from its text and the text of the token before it: "space" (only
    whitespace), "punctuation" (no letter or digit), "word start" (begins a word: starts with a
    space, or follows whitespace or punctuation) or "continuation" (goes on with a word)."""
    if not token or token.isspace():
        return "space"
    if not any(ch.isalnum() for ch in token):
        return "punctuation"
    if token[0].isspace() or not previous or not previous[-1].isalnum():
        return "word start"
    return "continuation"


def frequency_bucket(count: int, edges: tuple[int, ...] = (10, 100, 1000)) -> str:
    """The label of the bucket a training-text count falls in: edges (10, 100, 1000) give
    "<10", "10-99", "100-999" and ">=1000"."""
    for i, edge in enumerate(edges):
        if count < edge:
            return f"<{edge}" if i == 0 else f"{edges[i - 1]}-{edge - 1}"
    return f">={edges[-1]}"


def loss_breakdown(losses: torch.Tensor, groups: list[str]) -> dict[str, dict[str, float]]:
    """Per group label (sorted): "tokens", "mean_loss", and "share" of the total loss (the shares
    sum to 1: where the mean's nats come from). `groups` has one label per token of `losses`."""
    if len(groups) != len(losses) or not groups:
        raise ValueError(f"need one group label per token, got {len(groups)} labels for {len(losses)} losses.")
    total = losses.sum().item()
    table = {}
    for group in sorted(set(groups)):
        mask = torch.tensor([g == group for g in groups])
        chosen = losses[mask]
        table[group] = {"tokens": int(mask.sum()), "mean_loss": chosen.mean().item(),
                        "share": chosen.sum().item() / total}
    return table


# ---------------------------------------------------------------------------------------
# Comparing runs over seeds (chapter 12): is a difference of two means larger than the
# seed-to-seed noise would make it by chance? Welch's t-test, with Student's t distribution
# written out through the regularised incomplete beta function (no scipy).
# ---------------------------------------------------------------------------------------

def seed_statistics(values: list[float]) -> dict[str, float]:
    """n, mean, sample standard deviation s (divides by n - 1) and standard error s / sqrt(n)."""
    if len(values) < 2:
        raise ValueError(f"a standard deviation needs at least two values (two seeds), got {len(values)}.")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n)}


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), by its continued fraction (evaluated with Lentz's method),
    on the side of x where the fraction converges fast (else through I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if not 0.0 <= x <= 1.0 or a <= 0 or b <= 0:
        raise ValueError(f"need 0 <= x <= 1 and a, b > 0, got x={x}, a={a}, b={b}.")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    fraction, c, d = 1.0, 1.0, 0.0  # 1 + d_1 / (1 + d_2 / (1 + ...)), term by term
    for j in range(1, 10_000):
        m = j // 2
        if j % 2:  # d_{2m+1}
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:      # d_{2m}
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) / (a * fraction)


def student_t_p_value(t: float, df: float) -> float:
    """Two-sided p-value of Student's t distribution with `df` degrees of freedom (any df > 0, not
    only whole numbers): P(|T| >= |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if df <= 0:
        raise ValueError(f"need positive degrees of freedom, got {df}.")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def welch_from_summary(mean_a: float, std_a: float, n_a: int,
                       mean_b: float, std_b: float, n_b: int) -> dict[str, float]:
    """Welch's t-test of mean_a - mean_b from each arm's mean, sample std and size.

    SE = sqrt(s_a^2/n_a + s_b^2/n_b), t = difference / SE, and the Welch-Satterthwaite degrees of
    freedom (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a - 1) + (s_b^2/n_b)^2/(n_b - 1)).
    """
    if n_a < 2 or n_b < 2:
        raise ValueError(f"each arm needs at least two runs (seeds) for a standard deviation, got {n_a} and {n_b}.")
    var_a, var_b = std_a ** 2 / n_a, std_b ** 2 / n_b
    se = math.sqrt(var_a + var_b)
    if se == 0:
        raise ValueError("both arms have zero spread, so the test is undefined: did every seed give the same value?")
    difference = mean_a - mean_b
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    t = difference / se
    return {"difference": difference, "se": se, "t": t, "df": df, "p": student_t_p_value(t, df)}


def welch_t_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Welch's t-test of mean(a) - mean(b) from the runs themselves (e.g. final losses, one per seed):
    difference, se, t, df and the two-sided p. It does not assume the two spreads are equal."""
    sa, sb = seed_statistics(a), seed_statistics(b)
    return welch_from_summary(sa["mean"], sa["std"], sa["n"], sb["mean"], sb["std"], sb["n"])


def sign_flip_p_value(differences: list[float]) -> float:
    """Two-sided exact test that paired differences (one per seed, e.g. a run's end minus its own start)
    have mean 0: if nothing changed, each was as likely negative as positive, so p is the share of the
    2^n sign patterns whose mean lies as far from 0 as the observed one (the pattern itself included;
    float noise below a millionth of the largest difference counts as a tie). Chapter 8 uses it."""
    observed = abs(statistics.fmean(differences))
    tolerance = 1e-6 * max(abs(d) for d in differences)
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    extreme = sum(abs(statistics.fmean(s * d for s, d in zip(signs, differences))) >= observed - tolerance
                  for signs in patterns)
    return extreme / len(patterns)
