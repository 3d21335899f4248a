"""Evaluation against hand-worked values: BLEU on textbook examples, perplexity and next-token
accuracy computed another way, and multiple-choice scoring where the answer is forced."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, GPTConfig
from minigpt.evaluate import (bleu, choose_ending, cohens_kappa, contamination_report, ending_logprobs,
                              evaluate_multiple_choice, evaluate_text, frequency_bucket, judge_position_consistency,
                              load_multiple_choice, loss_breakdown, ngram_overlap, ngram_set, overlap_tokens,
                              regularized_incomplete_beta, rouge_l, seed_statistics, sign_flip_p_value,
                              student_t_p_value, token_kind, token_losses, welch_from_summary, welch_t_test)
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer


def test_bleu_clips_repeated_words_as_in_the_paper():
    # Papineni et al.'s example: seven "the"s earn two, the most any one reference has.
    result = bleu("the the the the the the the", ["The cat is on the mat.", "There is a cat on the mat."], max_n=1)
    assert result["precisions"] == [pytest.approx(2 / 7)]


def test_bleu_by_hand_with_and_without_smoothing():
    # the cat sat on the mat | the cat is on the mat: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3, same length
    plain = bleu("the cat sat on the mat", "the cat is on the mat", smooth=False)
    assert plain["precisions"] == pytest.approx([5 / 6, 3 / 5, 1 / 4, 0.0]) and plain["bleu"] == 0.0
    smoothed = bleu("the cat sat on the mat", "the cat is on the mat")
    assert smoothed["precisions"] == pytest.approx([5 / 6, 4 / 6, 2 / 5, 1 / 4])
    assert smoothed["bleu"] == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)  # 0.4855
    assert bleu("the cat is on the mat", "the cat is on the mat")["bleu"] == pytest.approx(1.0)
    short = bleu("the cat", "the cat is on the mat", max_n=1)  # brevity penalty e^(1 - 6/2)
    assert short["brevity_penalty"] == pytest.approx(math.exp(-2)) and short["bleu"] == pytest.approx(math.exp(-2))


def test_perplexity_and_next_token_accuracy_equal_a_direct_computation():
    torch.manual_seed(0)
    text = "abcabcabcabcabcabcabcabcabcabcabcab"
    tokenizer = CharTokenizer.from_text(text)
    model = GPTModel(GPTConfig(vocab_size=3, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    result = evaluate_text(model, tokenizer, text, max_length=8, batch_size=3)
    ids = torch.tensor(tokenizer.encode(text))
    windows = (len(ids) - 1) // 8
    inputs = torch.stack([ids[i * 8:(i + 1) * 8] for i in range(windows)])
    targets = torch.stack([ids[i * 8 + 1:(i + 1) * 8 + 1] for i in range(windows)])
    with torch.no_grad():
        logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["next_token_accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert result["tokens"] == windows * 8


class FixedModel(torch.nn.Module):
    """A "model" whose next-token distribution is set by hand: after a token in `preferred`, the
    token it names gets probability `p` and the others share the rest; after any other token,
    every token is equally likely."""

    def __init__(self, vocab_size: int, preferred: dict[int, int], p: float = 0.9) -> None:
        super().__init__()
        self.cfg = GPTConfig(vocab_size=vocab_size, context_length=32, emb_dim=8, n_heads=1, n_layers=1)
        table = torch.full((vocab_size, vocab_size), 1 / vocab_size)
        for token, following in preferred.items():
            table[token] = (1 - p) / (vocab_size - 1)
            table[token, following] = p
        self.logprobs = table.log()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logprobs[idx]  # (B, T, V): the distribution after each token


def test_multiple_choice_picks_the_ending_the_model_prefers_and_normalises_by_length():
    tokenizer = CharTokenizer(" abcxyz")  # ids: ' ' 0, a 1, b 2, c 3, x 4, y 5, z 6
    # After "a" comes "b", after "b" comes "c", after "c" comes " " and after " " comes "a".
    model = FixedModel(7, {1: 2, 2: 3, 3: 0, 0: 1})
    item = {"context": "abc", "endings": ["xyz", "abc", "zz"], "label": 1}
    scores = ending_logprobs(model, tokenizer, item["context"], item["endings"])
    assert [n for _, n in scores] == [4, 4, 3]  # " xyz", " abc", " zz"
    p_other = math.log(0.1 / 6)
    assert scores[1][0] == pytest.approx(4 * math.log(0.9), rel=1e-5)  # c->' ', ' '->a, a->b, b->c: all preferred
    assert scores[0][0] == pytest.approx(math.log(0.9) + p_other + 2 * math.log(1 / 7), rel=1e-5)  # x, y: uniform
    result = evaluate_multiple_choice(model, tokenizer, [item, {**item, "label": 0}], progress=False)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "items": 2}
    # Length normalisation: a short ending with a poor mean loses on the total but not always on the mean.
    short = {"context": "abc", "endings": [" a", "abcabc"], "label": 1}  # "  a" is 3 tokens, " abcabc" 7
    totals = ending_logprobs(model, tokenizer, short["context"], short["endings"])
    assert totals[0][0] > totals[1][0] and totals[0][0] / totals[0][1] < totals[1][0] / totals[1][1]
    assert evaluate_multiple_choice(model, tokenizer, [short], progress=False) == {"acc": 0.0, "acc_norm": 1.0,
                                                                                  "items": 1}


def test_multiple_choice_files_are_read_and_checked(tmp_path):
    good = tmp_path / "items.jsonl"
    good.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", "sings."], "label": "1"}) + "\n\n"
                    + json.dumps({"context": "B", "endings": ["x", "y", "z"], "label": 0}) + "\n")
    assert load_multiple_choice(str(good)) == [{"context": "A man", "endings": ["runs.", "sings."], "label": 1},
                                               {"context": "B", "endings": ["x", "y", "z"], "label": 0}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "A", "endings": ["x", "y"], "label": 2}) + "\n")
    with pytest.raises(ConfigError, match="line 1: label 2 does not index"):
        load_multiple_choice(str(bad))
    bad.write_text('{"context": "A"}\n')
    with pytest.raises(ConfigError, match="line 1: expected a JSON object with context"):
        load_multiple_choice(str(bad))


# ---------------------------------------------------------------------------------------
# Chapter 12: each new function against a case worked by hand or a closed form.
# ---------------------------------------------------------------------------------------

def test_bleu_and_rouge_l_fail_the_way_chapter_12_works_out_by_hand():
    # A faithful paraphrase shares two words: p1 = 2/7, smoothed p2..p4 = 1/7, 1/6, 1/5.
    paraphrase = bleu("a cat was sitting upon the rug", "the cat sat on the mat")
    assert paraphrase["bleu"] == pytest.approx((2 / 7 * 1 / 7 * 1 / 6 * 1 / 5) ** 0.25)
    # Swapping the roles keeps every word: p1 = 6/6, bigrams 4/5, trigrams 1/4, 4-grams 0/3 (smoothed).
    swapped = bleu("the mat sat on the cat", "the cat sat on the mat")
    assert swapped["bleu"] == pytest.approx((1 * 5 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    assert swapped["bleu"] > 2.5 * paraphrase["bleu"]
    # ROUGE-L: LCS "the sat on the" (4 of 6 words) for the swap, "cat the" (2 of 7 and 6) for the paraphrase.
    assert rouge_l("the mat sat on the cat", "the cat sat on the mat")["f1"] == pytest.approx(4 / 6)
    assert rouge_l("a cat was sitting upon the rug", "the cat sat on the mat")["f1"] == pytest.approx(
        2 * (2 / 7) * (2 / 6) / (2 / 7 + 2 / 6))


def test_choose_ending_by_sum_per_token_and_per_byte_as_worked_by_hand():
    # A: total -6.0 over 2 tokens and " abcdefghijk" (12 bytes); B: -8.0 over 4 tokens and " abcdefghi" (10 bytes).
    scores, endings = [(-6.0, 2), (-8.0, 4)], ["abcdefghijk", "abcdefghi"]
    # sum: -6 > -8 -> A; per token: -3 < -2 -> B; per byte: -0.5 > -0.8 -> A.
    assert choose_ending(scores, endings) == {"sum": 0, "per_token": 1, "per_byte": 0}
    assert choose_ending([(-1.0, 1), (-0.5, 1)], ["é", "e"]) == {"sum": 1, "per_token": 1, "per_byte": 1}
    with pytest.raises(ValueError, match="one .* score per ending"):
        choose_ending([(-1.0, 1)], ["a", "b"])


def test_ngram_overlap_counts_the_shared_share_of_an_items_ngrams():
    training = "The quick brown fox jumps over the lazy dog while the cat sleeps."
    grams = ngram_set(training, 3)
    assert ("the", "quick", "brown") in grams and len(grams) == 11  # 13 words -> 11 trigrams, all distinct
    # "the lazy dog while a bird sings": 5 trigrams, of which "the lazy dog" and "lazy dog while" are shared.
    assert ngram_overlap("the lazy dog while a bird sings", grams, n=3) == pytest.approx(2 / 5)
    assert ngram_overlap("The QUICK brown, fox!", grams, n=3) == 1.0  # case and punctuation do not hide a copy
    assert ngram_overlap("too short", grams, n=3) == 0.0


def test_contamination_report_flags_copied_items_at_13_words():
    training = ("it had always been my habit to look at the pictures in the gallery before the visitors came "
                "in the morning and to stay there until noon")
    copied = "It had always been my habit to look at the pictures in the gallery before the visitors came."
    paraphrased = "I always liked to look at the gallery's pictures early, before any visitors arrived."
    report = contamination_report([copied, paraphrased, "Short item."], training, n=13)
    assert report["overlaps"] == [1.0, 0.0, 0.0] and report["contaminated"] == [0]
    assert report["share"] == pytest.approx(1 / 3)
    # The text's first 16 words, then 9 new ones: 25 words, 13 grams of 13 words; only the 4 that
    # start at words 1-4 lie inside the copied part.
    partly = " ".join(training.split()[:16]) + " then something else entirely happened to me this morning"
    assert len(overlap_tokens(partly)) == 25
    assert contamination_report([partly], training)["overlaps"] == [pytest.approx(4 / 13)]
    assert contamination_report([partly], training, n=8)["overlaps"] == [pytest.approx(9 / 18)]
    with pytest.raises(ValueError, match="threshold"):
        contamination_report([copied], training, threshold=0)


def always_first(question, first, second):
    return "A"


def prefers_longer(question, first, second):
    return "A" if len(first) >= len(second) else "B"


def knows_the_answer(question, first, second):
    """A fair judge: prefers the answer that contains "Paris", whichever position it is in."""
    return "A" if "Paris" in first else "B"


def test_judge_position_consistency_with_fake_judges():
    items = [("Capital of France?", "Paris.", "It is Lyon, a large and beautiful city."),
             ("Capital of France, in one word?", "Lyon", "Paris, of course")]
    biased = judge_position_consistency(always_first, items)
    assert biased["consistent"] == 0.0 and biased["first_wins"] == 1.0  # every verdict follows the order
    fair = judge_position_consistency(knows_the_answer, items)
    assert fair["consistent"] == 1.0 and fair["first_wins"] == 0.5
    assert fair["winners"] == [("Paris.", "Paris."), ("Paris, of course", "Paris, of course")]
    assert fair["longer_wins"] == 0.5  # the right answer is the shorter one in item 1, the longer in item 2
    verbose = judge_position_consistency(prefers_longer, items)
    assert verbose["consistent"] == 1.0 and verbose["longer_wins"] == 1.0
    with pytest.raises(ValueError, match="'A', 'B' or 'tie'"):
        judge_position_consistency(lambda q, a, b: "first", items)


def test_cohens_kappa_on_hand_worked_tables():
    assert cohens_kappa(list("abcabc"), list("abcabc")) == 1.0
    # 2 x 2, 50 items: both yes 20, a yes / b no 5, a no / b yes 10, both no 15.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    # p_o = 35/50 = 0.7; p_e = (25/50)(30/50) + (25/50)(20/50) = 0.5; kappa = 0.2 / 0.5 = 0.4
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    # 3 classes, 10 items: agree on 7; a's counts (good 4, ok 3, bad 3), b's (good 3, ok 4, bad 3).
    a = ["good"] * 4 + ["ok"] * 3 + ["bad"] * 3
    b = ["good", "good", "good", "ok", "ok", "ok", "bad", "bad", "bad", "ok"]
    p_o, p_e = 0.7, (4 * 3 + 3 * 4 + 3 * 3) / 100
    assert cohens_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e))  # 0.5522...
    # Two raters who label at random agree only by chance: kappa near 0.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 3, (20_000,), generator=gen).tolist(), torch.randint(0, 3, (20_000,), generator=gen).tolist()
    assert abs(cohens_kappa(a, b)) < 0.02
    # Always disagreeing on two balanced labels is worse than chance.
    assert cohens_kappa(list("abab"), list("baba")) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kappa is undefined"):
        cohens_kappa(["x"] * 3, ["x"] * 3)


def test_token_losses_are_the_terms_of_evaluate_texts_mean():
    torch.manual_seed(0)
    text = "the cat sat. the dog ran! a cat, a dog; " * 3
    tokenizer = CharTokenizer.from_text(text)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=16, n_heads=2,
                               n_layers=1, drop_rate=0.0))
    ids = tokenizer.encode(text)
    per_token = token_losses(model, ids, max_length=16, batch_size=3)
    summary = evaluate_text(model, tokenizer, text, max_length=16, batch_size=3)
    assert len(per_token["loss"]) == summary["tokens"]
    assert per_token["loss"].mean().item() == pytest.approx(summary["loss"], rel=1e-5)
    assert per_token["target"].tolist() == ids[1:len(per_token["loss"]) + 1]      # in order, as scored
    assert per_token["previous"].tolist() == ids[:len(per_token["loss"])]
    assert per_token["position"].tolist()[:18] == list(range(16)) + [0, 1]
    first = F.cross_entropy(model(torch.tensor([ids[:16]]))[0, 0:1], torch.tensor([ids[1]])).item()
    assert per_token["loss"][0].item() == pytest.approx(first, rel=1e-5)


def test_token_kind_and_frequency_bucket_by_hand():
    kinds = [token_kind(token, previous) for previous, token in
             [("", "T"), ("T", "h"), ("e", " "), (" ", "c"), ("t", "."), ("x", " cat"), ("cat", "'s"), ("\n", "\n")]]
    assert kinds == ["word start", "continuation", "space", "word start", "punctuation", "word start",
                     "continuation", "space"]
    assert [frequency_bucket(c) for c in (0, 9, 10, 99, 100, 999, 1000, 50_000)] == [
        "<10", "<10", "10-99", "10-99", "100-999", "100-999", ">=1000", ">=1000"]


def test_loss_breakdown_by_hand():
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0])
    table = loss_breakdown(losses, ["x", "y", "x", "x"])
    # x: 1 + 2 + 2 = 5 over 3 tokens; y: 3 over 1; total 8.
    assert table == {"x": {"tokens": 3, "mean_loss": pytest.approx(5 / 3), "share": pytest.approx(5 / 8)},
                     "y": {"tokens": 1, "mean_loss": 3.0, "share": pytest.approx(3 / 8)}}
    with pytest.raises(ValueError, match="one group label per token"):
        loss_breakdown(losses, ["x"])


def test_regularized_incomplete_beta_against_closed_forms():
    for x in (0.01, 0.2, 0.5, 0.77, 0.99):
        assert regularized_incomplete_beta(x, 1, 1) == pytest.approx(x)                     # uniform
        assert regularized_incomplete_beta(x, 3, 1) == pytest.approx(x ** 3)                # I_x(a, 1) = x^a
        assert regularized_incomplete_beta(x, 1, 2.5) == pytest.approx(1 - (1 - x) ** 2.5)  # I_x(1, b)
        assert regularized_incomplete_beta(x, 2.5, 4) == pytest.approx(1 - regularized_incomplete_beta(1 - x, 4, 2.5))
    # I_x(1/2, 1/2) is the arcsine law: (2 / pi) asin(sqrt(x)).
    assert regularized_incomplete_beta(0.3, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)))


def test_student_t_p_value_against_tables_and_closed_forms():
    assert student_t_p_value(2.0, 10) == pytest.approx(0.0734, abs=5e-5)   # t table
    assert student_t_p_value(2.571, 5) == pytest.approx(0.05, abs=5e-5)    # critical values at 5%
    assert student_t_p_value(4.303, 2) == pytest.approx(0.05, abs=5e-5)
    assert student_t_p_value(12.706, 1) == pytest.approx(0.05, abs=5e-5)
    for t in (0.1, 0.7, 1.0, 2.5, 8.0, 40.0):
        assert student_t_p_value(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t))      # Cauchy
        assert student_t_p_value(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t))      # df = 2
    assert student_t_p_value(1.959964, 1e8) == pytest.approx(0.05, abs=1e-6)               # the normal limit
    assert student_t_p_value(0.0, 3.7) == pytest.approx(1.0)


def test_student_t_p_value_matches_a_monte_carlo_t_distribution():
    # T = Z / sqrt(chi^2_df / df), df = 3, drawn 200,000 times: the tail share beyond 2.353 (the table's 10%).
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(200_000, 3, generator=gen, dtype=torch.float64) ** 2).sum(1)
    t = z / (chi2 / 3).sqrt()
    for threshold in (1.0, 2.353, 5.0):
        share = (t.abs() >= threshold).double().mean().item()
        p = student_t_p_value(threshold, 3)
        assert share == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 200_000))
    assert student_t_p_value(2.353, 3) == pytest.approx(0.10, abs=2e-4)


def test_welch_t_test_by_hand_and_its_degrees_of_freedom():
    a, b = [2.0, 2.2, 2.4], [1.0, 1.1, 1.2]
    # means 2.2 and 1.1, sample variances 0.04 and 0.01: SE = sqrt(0.04/3 + 0.01/3) = sqrt(1/60)
    result = welch_t_test(a, b)
    se = math.sqrt(0.05 / 3)
    df = (0.05 / 3) ** 2 / ((0.04 / 3) ** 2 / 2 + (0.01 / 3) ** 2 / 2)  # 2.94...
    assert result["difference"] == pytest.approx(1.1) and result["se"] == pytest.approx(se)
    assert result["t"] == pytest.approx(1.1 / se) and result["df"] == pytest.approx(df)
    assert result["p"] == pytest.approx(student_t_p_value(1.1 / se, df))
    # Equal spreads and sizes: df = 2 (n - 1), Student's pooled test.
    equal = welch_from_summary(1.0, 0.5, 5, 0.0, 0.5, 5)
    assert equal["df"] == pytest.approx(8) and equal["t"] == pytest.approx(1.0 / math.sqrt(0.1))
    # One arm with no spread: all the noise is the other's, df = n - 1.
    assert welch_from_summary(1.0, 0.3, 4, 0.0, 0.0, 4)["df"] == pytest.approx(3)
    assert seed_statistics([1.0, 2.0, 3.0]) == {"n": 3, "mean": 2.0, "std": 1.0, "se": pytest.approx(1 / math.sqrt(3))}
    with pytest.raises(ValueError, match="at least two values"):
        seed_statistics([1.0])
    with pytest.raises(ValueError, match="zero spread"):
        welch_t_test([1.0, 1.0], [2.0, 2.0])


def test_welch_rejects_about_five_percent_of_true_null_comparisons():
    # Three seeds per arm, the same mean, spreads 1 and 3: Welch's p < 0.05 in close to 5% of 4,000 trials
    # (two standard errors, the rule chapter 11 used to state, rejects several times as often).
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    b = 3 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    tests = [welch_t_test(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    welch_rate = sum(r["p"] < 0.05 for r in tests) / len(tests)
    two_se_rate = sum(abs(r["t"]) > 2 for r in tests) / len(tests)
    assert 0.03 < welch_rate < 0.07 and two_se_rate > 0.12


# ---------------------------------------------------------------------------------------
# Chapter 12 quotes these results; each is computed again here from the code (cheap, exact or
# seeded), and the chapter must still say it.
# ---------------------------------------------------------------------------------------

def bleu_rouge_row(candidate: str, meaning: str) -> str:
    scores = bleu(candidate, "the cat sat on the mat")["bleu"], rouge_l(candidate, "the cat sat on the mat")["f1"]
    return f"| {candidate} | {meaning} | {scores[0]:.3f} | {scores[1]:.3f} |"


def contamination_row(label: str, probe: str) -> str:
    from minigpt.data import split_text

    from conftest import find_verdict

    path = find_verdict()
    if path is None:
        pytest.skip("the-verdict.txt is not available offline")
    train_text, _ = split_text(path.read_text(encoding="utf-8"), train_ratio=0.9)
    overlaps = [ngram_overlap(probe, ngram_set(train_text, n), n) for n in (8, 13)]
    return f"| {label} | {overlaps[0]:.2f} | {overlaps[1]:.2f} |"


OPENING = ("I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no great "
           "surprise to me to hear that")
JUDGE_PAIRS = [
    ("What is the capital of France?", "Paris.", "The capital of France is Lyon, a large and historic city."),
    ("How many legs does a spider have?", "Spiders have six legs, like every insect they resemble.", "Eight."),
    ("What is 7 x 8?", "56", "7 x 8 is 54, since 7 x 7 is 49 and adding 7 gives 54."),
    ("Who wrote 'Hamlet'?", "Marlowe.", "Shakespeare wrote Hamlet around 1600, in London."),
    ("What gas do plants take in?", "Oxygen.", "Carbon dioxide, which they turn into sugar with light."),
    ("Boiling point of water at sea level?", "90 degrees.", "100 degrees Celsius at sea level, less on a mountain."),
]
FACTS = dict(zip([q for q, _, _ in JUDGE_PAIRS], ["Paris", "Eight", "56", "Shakespeare", "Carbon", "100"]))


def judge_row(label: str, judge, repeats: int = 1) -> str:
    asked = JUDGE_PAIRS * repeats
    r = judge_position_consistency(judge, asked)
    winners = [(q, w) for (q, _, _), both in zip(asked, r["winners"]) for w in both]
    right = sum(w is not None and FACTS[q] in w for q, w in winners) / len(winners)
    return (f"| {label} | {r['items']} | {r['consistent']:.2f} | {r['first_wins']:.2f} | {r['longer_wins']:.2f} "
            f"| {right:.2f} |")


def leaning_judge():
    import random

    coin = random.Random(0)
    return lambda q, first, second: "A" if coin.random() < 0.3 else knows_the_fact(q, first, second)


def knows_the_fact(question, first, second):
    return "A" if FACTS[question] in first else "B"


def random_raters_kappa() -> str:
    import random

    gen = random.Random(1)
    a = [gen.choice(["good", "ok", "bad"]) for _ in range(1000)]
    b = [gen.choice(["good", "ok", "bad"]) for _ in range(1000)]
    agree = sum(x == y for x, y in zip(a, b)) / 1000
    return f"agree on {agree:.3f} of them\n(chance is 1/3) and get κ = {cohens_kappa(a, b):+.3f}".replace("-", "−")


BASELINE_11 = (2.172, 0.026, 3)  # chapter 11's table (section 11.8): mean, std, seeds
TABLE_11 = {"+tau": (2.233, 0.008, 3), "+rank16": (2.190, 0.040, 3), "moe-tiny": (2.171, 0.035, 3),
            "tau-tiny": (2.250, 0.037, 3), "halting-tiny": (2.301, 0.027, 3)}
EARLIER_TAU_11 = (2.233, 0.002, 3)  # +tau in the previous run of bench_variants.py
# Per-seed validation losses (seeds 123, 124, 125) of the run that gave TABLE_11.
SEEDS_11 = {"llama-tiny": [2.1860, 2.1874, 2.1416], "+tau": [2.2334, 2.2244, 2.2413],
            "+rank16": [2.2345, 2.1557, 2.1804], "moe-tiny": [2.1878, 2.1952, 2.1312],
            "tau-tiny": [2.2749, 2.2070, 2.2679], "halting-tiny": [2.2958, 2.3299, 2.2760]}
SEED_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def signed(x: float, spec: str) -> str:
    # The chapters print a minus sign (−), not a hyphen.
    return format(x, spec).replace("-", "−")


def welch_row(name: str) -> str:
    r = welch_from_summary(*TABLE_11[name], *BASELINE_11)
    verdict = "worse" if r["p"] < 0.05 else "not shown"
    return (f"| `{name}` | {signed(r['difference'], '+.3f')} | {r['se']:.3f} | {signed(r['t'], '.2f')} "
            f"| {r['df']:.2f} | {r['p']:.3f} | {verdict} |")


def critical_t(df: float) -> str:
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_p_value(mid, df) > 0.05 else (lo, mid)
    return f"{(lo + hi) / 2:.3f}"


def false_alarm_rates() -> str:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    b = 3 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    tests = [welch_t_test(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    two_se = sum(abs(r["t"]) > 2 for r in tests) / 4000
    welch = sum(r["p"] < 0.05 for r in tests) / 4000
    return f"rule calls {two_se:.1%} of them different, Welch's $p < 0.05$ calls {welch:.1%}"


def seeds_needed(name: str, alpha: float = 0.05) -> int:
    return next(n for n in range(2, 200) if welch_from_summary(TABLE_11[name][0], TABLE_11[name][1], n,
                                                               BASELINE_11[0], BASELINE_11[1], n)["p"] < alpha)


def seeds_for_one_percent() -> str:
    # The chapter gives one number for both borderline rows; it must hold for each.
    needed = {seeds_needed(name, 0.01) for name in ("+tau", "tau-tiny")}
    words = SEED_WORDS[needed.pop()] if len(needed) == 1 else f"different numbers ({needed})"
    return f"{words} seeds per model would give $p < 0.01$"


def tau_line() -> str:
    r = welch_from_summary(*TABLE_11["+tau"], *BASELINE_11)
    closed = 1 - r["t"] / math.sqrt(2 + r["t"] ** 2)
    return (f"$\\nu = {r['df']:.2f}$, not far above one arm's $n - 1$; and $p = {r['p']:.3f}$ "
            f"({closed:.3f}\nwith $\\nu = 2$ exactly")


def earlier_tau_line() -> str:
    r = welch_from_summary(*EARLIER_TAU_11, *BASELINE_11)
    verdict = "worse" if r["p"] < 0.05 else "not shown"
    return f"had `+tau` at {EARLIER_TAU_11[0]:.3f} ± {EARLIER_TAU_11[1]:.3f}, which gives $p = {r['p']:.3f}$: {verdict}"


def critical_t_line() -> str:
    tau_df = welch_from_summary(*TABLE_11["+tau"], *BASELINE_11)["df"]
    return (f"the t needed for $p < 0.05$ is {critical_t(tau_df)} at this $\\nu$, {critical_t(2)} at\n"
            f"$\\nu = 2$ and {critical_t(4)} at $\\nu = 4$")


def win_rate_sizes() -> str:
    n = [math.ceil(1.96 ** 2 * 0.25 / h ** 2) for h in (0.05, 0.03, 0.01)]
    return f"$N = 1.96^2 \\times 0.25 / 0.05^2 = {n[0]}$ comparisons, ±3 points\n{n[1]:,} and ±1 point {n[2]:,}"


CHAPTER_12_QUOTES = [
    ("BLEU $= (5/6 \\cdot 4/6 \\cdot 2/5 \\cdot\n1/4)^{1/4} = 0.4855$",
     lambda: f"BLEU $= (5/6 \\cdot 4/6 \\cdot 2/5 \\cdot\n1/4)^{{1/4}} = {bleu('the cat sat on the mat', 'the cat is on the mat')['bleu']:.4f}$"),
    ("$p_1 = 2/7 = 0.286$", lambda: "$p_1 = 2/7 = {:.3f}$".format(
        bleu("the the the the the the the", ["The cat is on the mat.", "There is a cat on the mat."], max_n=1)["bleu"])),
    ("$\\mathrm{BP} = e^{1-6/2} = 0.1353$",
     lambda: f"$\\mathrm{{BP}} = e^{{1-6/2}} = {bleu('the cat', 'the cat is on the mat')['brevity_penalty']:.4f}$"),
    ("$P = R = F_1 = 5/6 = 0.8333$",
     lambda: f"$P = R = F_1 = 5/6 = {rouge_l('the cat sat on the mat', 'the cat lay on the mat')['f1']:.4f}$"),
    ("| the cat sat on the mat | the same | 1.000 | 1.000 |", lambda: bleu_rouge_row("the cat sat on the mat", "the same")),
    ("| a cat was sitting upon the rug | the same (paraphrase) | 0.192 | 0.308 |",
     lambda: bleu_rouge_row("a cat was sitting upon the rug", "the same (paraphrase)")),
    ("| the mat sat on the cat | wrong (roles swapped) | 0.537 | 0.667 |",
     lambda: bleu_rouge_row("the mat sat on the cat", "wrong (roles swapped)")),
    ("| on the mat the cat sat | the same, word salad | 0.595 | 0.500 |",
     lambda: bleu_rouge_row("on the mat the cat sat", "the same, word salad")),
    ("| the cat | incomplete | 0.135 | 0.500 |", lambda: bleu_rouge_row("the cat", "incomplete")),
    ("| the opening sentence, copied | 1.00 | 1.00 |", lambda: contamination_row("the opening sentence, copied", OPENING)),
    ("| the same with one word changed (\"cheap\" → \"minor\") | 0.58 | 0.36 |",
     lambda: contamination_row("the same with one word changed (\"cheap\" → \"minor\")",
                               OPENING.replace("cheap", "minor"))),
    ("| always prefers the first answer | 6 | 0.00 | 1.00 | 0.50 | 0.50 |",
     lambda: judge_row("always prefers the first answer", lambda q, a, b: "A")),
    ("| prefers the longer answer | 6 | 1.00 | 0.50 | 1.00 | 0.50 |",
     lambda: judge_row("prefers the longer answer", lambda q, a, b: "A" if len(a) >= len(b) else "B")),
    ("| fair (knows the fact) | 6 | 1.00 | 0.50 | 0.50 | 1.00 |", lambda: judge_row("fair (knows the fact)", knows_the_fact)),
    ("| fair, but says \"A\" 30% of the time | 300 | 0.72 | 0.64 | 0.49 | 0.86 |",
     lambda: judge_row("fair, but says \"A\" 30% of the time", leaning_judge(), repeats=50)),
    ("$N = 1.96^2 \\times 0.25 / 0.05^2 = 385$ comparisons, ±3 points\n1,068 and ±1 point 9,604", win_rate_sizes),
    ("Fifty comparisons give ±13.9 points", lambda: f"Fifty comparisons give ±{196 * math.sqrt(0.25 / 50):.1f} points"),
    ("$\\kappa = 0.37/0.67 = 0.5522$", lambda: "$\\kappa = 0.37/0.67 = {:.4f}$".format(cohens_kappa(
        ["good"] * 4 + ["ok"] * 3 + ["bad"] * 3, ["good"] * 3 + ["ok"] * 3 + ["bad"] * 3 + ["ok"]))),
    ("agree on 0.329 of them\n(chance is 1/3) and get κ = −0.007", random_raters_kappa),
    ("get κ = −0.053", lambda: f"get κ = {cohens_kappa(['good'] * 95 + ['bad'] * 5, ['good'] * 90 + ['bad'] * 5 + ['good'] * 5):+.3f}".replace("-", "−")),
    ("$\\Delta = +0.061$, SE = 0.0157, $t = 3.88$", lambda: "$\\Delta = {difference:+.3f}$, SE = {se:.4f}, $t = {t:.2f}$".format(
        **welch_from_summary(*TABLE_11["+tau"], *BASELINE_11))),
    ("$\\nu = 2.38$, not far above one arm's $n - 1$; and $p = 0.045$ (0.060\nwith $\\nu = 2$ exactly", tau_line),
    ("the t needed for $p < 0.05$ is 3.713 at this $\\nu$, 4.303 at\n$\\nu = 2$ and 2.776 at $\\nu = 4$", critical_t_line),
    ("$t = 2$ gives $p = 0.184$ at $\\nu = 2$ and $p = 0.116$ at $\\nu = 4$",
     lambda: f"$t = 2$ gives $p = {student_t_p_value(2, 2):.3f}$ at $\\nu = 2$ and $p = {student_t_p_value(2, 4):.3f}$ at $\\nu = 4$"),
    ("rule calls 15.4% of them different, Welch's $p < 0.05$ calls 5.5%", false_alarm_rates),
    ("| `+tau` | +0.061 | 0.016 | 3.88 | 2.38 | 0.045 | worse |", lambda: welch_row("+tau")),
    ("| `+rank16` | +0.018 | 0.028 | 0.65 | 3.43 | 0.555 | not shown |", lambda: welch_row("+rank16")),
    ("| `moe-tiny` | −0.001 | 0.025 | −0.04 | 3.69 | 0.970 | not shown |", lambda: welch_row("moe-tiny")),
    ("| `tau-tiny` | +0.078 | 0.026 | 2.99 | 3.59 | 0.046 | worse |", lambda: welch_row("tau-tiny")),
    ("| `halting-tiny` | +0.129 | 0.022 | 5.96 | 3.99 | 0.004 | worse |", lambda: welch_row("halting-tiny")),
    ("$+0.051$, gives $p = 0.133$", lambda: "${difference:+.3f}$, gives $p = {p:.3f}$".format(
        **welch_from_summary(*TABLE_11["halting-tiny"], *TABLE_11["tau-tiny"]))),
    ("had `+tau` at 2.233 ± 0.002, which gives $p = 0.055$: not shown",
     earlier_tau_line),
    ("p-value of 0.045 at $\\nu = 2.4$ is weak evidence", lambda: "p-value of {p:.3f} at $\\nu = {df:.1f}$ is weak evidence".format(
        **welch_from_summary(*TABLE_11["+tau"], *BASELINE_11))),
    ("five seeds per model would give $p < 0.01$", seeds_for_one_percent),
    ("accuracy of 30% has SE 0.0046 (a 95% interval of ±0.9 points); on a 1,000-item benchmark ±2.8\npoints; "
     "on this chapter's 60 items ±11.6 points",
     lambda: "accuracy of 30% has SE {:.4f} (a 95% interval of ±{:.1f} points); on a 1,000-item benchmark ±{:.1f}\n"
             "points; on this chapter's 60 items ±{:.1f} points".format(
                 math.sqrt(0.21 / 10_042), *(196 * math.sqrt(0.21 / n) for n in (10_042, 1_000, 60)))),
]


@pytest.mark.parametrize("quoted, compute", CHAPTER_12_QUOTES, ids=[q[:40] for q, _ in CHAPTER_12_QUOTES])
def test_chapter_12_quotes_what_the_code_gives(quoted, compute):
    from conftest import ROOT

    chapter = ROOT / "chapters" / "12-evaluation.md"
    assert quoted in chapter.read_text(encoding="utf-8"), f"chapter 12 no longer says {quoted!r}: update this test"
    assert compute() == quoted


def seed_row_11(name: str) -> str:
    # A row's loss and "vs baseline" cells, as bench_variants.py computes them from the seeds.
    stats, r = seed_statistics(SEEDS_11[name]), welch_t_test(SEEDS_11[name], SEEDS_11["llama-tiny"])
    noise = " (noise)" if r["p"] >= 0.05 else ""
    return f"| {stats['mean']:.3f} ± {stats['std']:.3f} | {signed(r['difference'], '+.3f')} ± {r['se']:.3f}{noise} |"


def seed_welch_11(a: str, b: str = "llama-tiny") -> dict:
    return welch_t_test(SEEDS_11[a], SEEDS_11[b])


CHAPTER_11_QUOTES = [
    *((row, lambda name=name: seed_row_11(name)) for name, row in (
        ("+tau", "| 2.233 ± 0.008 | +0.061 ± 0.016 |"), ("+rank16", "| 2.190 ± 0.040 | +0.019 ± 0.028 (noise) |"),
        ("moe-tiny", "| 2.171 ± 0.035 | −0.000 ± 0.025 (noise) |"), ("tau-tiny", "| 2.250 ± 0.037 | +0.078 ± 0.026 |"),
        ("halting-tiny", "| 2.301 ± 0.027 | +0.129 ± 0.022 |"))),
    ("`+tau`, +0.061 ± 0.016, almost four standard errors ($t = 3.88$),\n  has $p = 0.044$",
     lambda: "`+tau`, {difference:+.3f} ± {se:.3f}, almost four standard errors ($t = {t:.2f}$),\n  has $p = {p:.3f}$".format(
         **seed_welch_11("+tau"))),
    ("`+tau` (+0.061 ± 0.016, $p = 0.044$)", lambda: "`+tau` ({difference:+.3f} ± {se:.3f}, $p = {p:.3f}$)".format(
        **seed_welch_11("+tau"))),
    ("about 2.4 degrees of freedom and asks for $t > 3.7$; this one is 3.88",
     lambda: "about {:.1f} degrees of freedom and asks for $t > {:.1f}$; this one is {:.2f}".format(
         seed_welch_11("+tau")["df"], float(critical_t(seed_welch_11("+tau")["df"])), seed_welch_11("+tau")["t"])),
    ("`+rank16` (+0.019 ± 0.028, $p = 0.55$) and `moe-tiny` (−0.000 ± 0.025,\n  $p = 0.99$)",
     lambda: "`+rank16` ({} ± {:.3f}, $p = {:.2f}$) and `moe-tiny` ({} ± {:.3f},\n  $p = {:.2f}$)".format(
         *(x for name in ("+rank16", "moe-tiny") for r in [seed_welch_11(name)]
           for x in (signed(r["difference"], "+.3f"), r["se"], r["p"])))),
    ("(+0.078 ± 0.026, $p = 0.047$", lambda: "({difference:+.3f} ± {se:.3f}, $p = {p:.3f}$".format(
        **seed_welch_11("tau-tiny"))),
    ("(+0.129 ± 0.022, $p = 0.004$)", lambda: "({difference:+.3f} ± {se:.3f}, $p = {p:.3f}$)".format(
        **seed_welch_11("halting-tiny"))),
    ("it is 0.051 ± 0.027 behind ($p = 0.14$)", lambda: "it is {difference:.3f} ± {se:.3f} behind ($p = {p:.2f}$)".format(
        **seed_welch_11("halting-tiny", "tau-tiny"))),
]


@pytest.mark.parametrize("quoted, compute", CHAPTER_11_QUOTES, ids=[q[:40] for q, _ in CHAPTER_11_QUOTES])
def test_chapter_11_quotes_what_welch_gives_on_the_seeds(quoted, compute):
    from conftest import ROOT

    chapter = ROOT / "chapters" / "11-research-variants.md"
    assert quoted in chapter.read_text(encoding="utf-8"), f"chapter 11 no longer says {quoted!r}: update this test"
    assert compute() == quoted


def test_sign_flip_p_value_by_hand():
    # Three differences: of the 8 sign patterns, the mean of (+1, +2, +3) is matched in size only by
    # (-1, -2, -3); the pair (1, 1) has 2 of 4 patterns as extreme; all zeros are always as extreme.
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == 2 / 8
    assert sign_flip_p_value([1.0, 1.0]) == 2 / 4
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p_value([3.0, -1.0]) == 1.0  # (+3, -1), (-3, +1), (+3, +1), (-3, -1): |mean| 1, 1, 2, 2
