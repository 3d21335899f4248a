"""Scoring generated text: ROUGE-L against hand-worked examples and a brute-force LCS, and the
LLM judge against a loopback fake of Ollama's HTTP API (no test touches the internet)."""

import http.server
import itertools
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import loopback_server
from minigpt.config import ConfigError
from minigpt.evaluate import (judge_available, judge_prompt, judge_responses, judge_score,
                              longest_common_subsequence, mean_rouge_l, overlap_tokens, rouge_l)

# ---------------------------------------------------------------------------------------
# Longest common subsequence
# ---------------------------------------------------------------------------------------


def brute_force_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of `a` (tried longest first, every choice of positions) found in `b`."""
    def is_subsequence(sub, seq):
        rest = iter(seq)
        return all(item in rest for item in sub)  # `in` consumes the iterator up to the match

    for length in range(len(a), 0, -1):
        if any(is_subsequence([a[i] for i in positions], b) for positions in itertools.combinations(range(len(a)), length)):
            return length
    return 0


def test_lcs_textbook_example():
    # Cormen et al.: X = ABCBDAB, Y = BDCABA have an LCS of length 4 (e.g. BCBA).
    assert longest_common_subsequence(list("ABCBDAB"), list("BDCABA")) == 4
    assert longest_common_subsequence(list("BDCABA"), list("ABCBDAB")) == 4


def test_lcs_small_hand_worked_pairs():
    assert longest_common_subsequence(["a", "b", "c"], ["a", "b", "c"]) == 3
    assert longest_common_subsequence(["a", "b", "c"], ["c", "b", "a"]) == 1
    assert longest_common_subsequence(["a", "x", "b", "y", "c"], ["a", "b", "c"]) == 3
    assert longest_common_subsequence(["a", "b"], ["c", "d"]) == 0


def test_lcs_of_empty_lists_is_zero():
    assert longest_common_subsequence([], []) == 0
    assert longest_common_subsequence([], ["a"]) == 0
    assert longest_common_subsequence(["a"], []) == 0


words = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=7)


@given(words, words)
def test_lcs_agrees_with_brute_force(a, b):
    assert longest_common_subsequence(a, b) == brute_force_lcs(a, b)


# ---------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------


def test_overlap_tokens_lowercases_and_drops_punctuation():
    assert overlap_tokens("The Cat, the MAT! 42 times.") == ["the", "cat", "the", "mat", "42", "times"]
    assert overlap_tokens("Straße ÉCOLE") == ["strasse", "école"]  # casefold, not just lower
    assert overlap_tokens("  ...  ") == []


def test_rouge_l_equal_lengths():
    # LCS = "the cat on the mat" = 5 of 6 tokens on either side: P = R = F1 = 5/6.
    score = rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert score["precision"] == pytest.approx(5 / 6)
    assert score["recall"] == pytest.approx(5 / 6)
    assert score["f1"] == pytest.approx(5 / 6)


def test_rouge_l_unequal_lengths():
    # candidate: 3 tokens, reference: 7 tokens, LCS = "the cat sat" = 3.
    # P = 3/3 = 1, R = 3/7, F1 = 2 * 1 * 3/7 / (1 + 3/7) = (6/7) / (10/7) = 0.6.
    score = rouge_l("the cat sat", "the black cat sat on the mat")
    assert score["precision"] == pytest.approx(1.0)
    assert score["recall"] == pytest.approx(3 / 7)
    assert score["f1"] == pytest.approx(0.6)


def test_rouge_l_beta_weighs_recall():
    # Same pair, beta = 2: F = (1 + 4) * 1 * 3/7 / (3/7 + 4 * 1) = (15/7) / (31/7) = 15/31.
    score = rouge_l("the cat sat", "the black cat sat on the mat", beta=2.0)
    assert score["f1"] == pytest.approx(15 / 31)
    # beta = 0.5 leans towards precision: (1.25 * 3/7) / (3/7 + 0.25) = (15/28) / (19/28) = 15/19.
    assert rouge_l("the cat sat", "the black cat sat on the mat", beta=0.5)["f1"] == pytest.approx(15 / 19)


def test_rouge_l_ignores_case_and_punctuation():
    assert rouge_l("The CAT sat; on the mat!", "the cat sat on the mat") == rouge_l("the cat sat on the mat",
                                                                                  "the cat sat on the mat")
    assert rouge_l("The CAT sat; on the mat!", "the cat sat on the mat")["f1"] == pytest.approx(1.0)


def test_rouge_l_identical_disjoint_and_empty():
    assert rouge_l("Paris is the capital.", "Paris is the capital.") == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert rouge_l("red green", "blue yellow") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l("", "the cat") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l("the cat", "") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l("!!!", "???") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_mean_rouge_l_is_the_macro_average():
    # pair 1: P = R = F1 = 5/6 (above); pair 2: identical, all 1; pair 3: P = 1, R = 3/7, F1 = 0.6.
    mean = mean_rouge_l(["the cat sat on the mat", "hello world", "the cat sat"],
                        ["the cat is on the mat", "Hello, world!", "the black cat sat on the mat"])
    assert mean["precision"] == pytest.approx((5 / 6 + 1 + 1) / 3)
    assert mean["recall"] == pytest.approx((5 / 6 + 1 + 3 / 7) / 3)
    assert mean["f1"] == pytest.approx((5 / 6 + 1 + 0.6) / 3)


def test_mean_rouge_l_rejects_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 candidates and 1 references"):
        mean_rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        mean_rouge_l([], [])


# ---------------------------------------------------------------------------------------
# The LLM judge, against a fake Ollama on loopback
# ---------------------------------------------------------------------------------------


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """GET /api/tags lists no models; POST /api/chat records the request and answers the next reply."""

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._send(200, {"models": []})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/api/chat":
            self._send(404, {"error": "not found"})
            return
        content = self.server.replies.pop(0) if self.server.replies else "Score: 85"
        self._send(200, {"model": body["model"], "message": {"role": "assistant", "content": content}, "done": True})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_judge():
    with loopback_server(FakeOllama) as server:
        server.requests, server.replies = [], []
        yield server


@pytest.fixture
def dead_url():
    """A loopback URL where nothing listens: a port the OS gave out, then closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_judge_prompt_holds_the_three_texts_and_the_scale():
    prompt = judge_prompt("Rewrite: he go home.", "He goes home.", "He went home.")
    for part in ("Rewrite: he go home.", "He goes home.", "He went home.", "0 to 100", "integer"):
        assert part in prompt


def test_judge_available_and_score(fake_judge):
    available, message = judge_available(fake_judge.url, timeout=1.0)
    assert available, message
    prompt = judge_prompt("Name the capital of France.", "Paris.", "Paris")
    assert judge_score(prompt, url=fake_judge.url, model="tiny-judge", timeout=2.0) == 85
    sent = fake_judge.requests[-1]
    assert sent["model"] == "tiny-judge"
    assert sent["stream"] is False
    assert sent["messages"][0] == {"role": "user", "content": prompt}
    assert sent["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_judge_score_without_a_score_in_range_is_none(fake_judge):
    fake_judge.replies = ["I cannot rate this.", "150", "-3", "  7"]
    assert judge_score("p", url=fake_judge.url, timeout=2.0) is None  # no integer
    assert judge_score("p", url=fake_judge.url, timeout=2.0) is None  # above 100
    assert judge_score("p", url=fake_judge.url, timeout=2.0) is None  # below 0
    assert judge_score("p", url=fake_judge.url, timeout=2.0) == 7


def test_judge_score_network_error_says_what_to_do(dead_url):
    with pytest.raises(ConfigError, match="ollama serve"):
        judge_score("p", url=dead_url, timeout=1.0)


def test_judge_responses_averages_the_scores_it_got(fake_judge):
    fake_judge.replies = ["80", "no idea", "Score: 90"]
    items = [{"prompt": f"q{i}", "reference": f"r{i}", "response": f"a{i}"} for i in range(3)]
    result = judge_responses(items, url=fake_judge.url, model="tiny-judge", progress=False)
    assert result["scores"] == [80, None, 90]
    assert result["mean_score"] == pytest.approx(85.0)
    assert result["unparsed"] == 1
    assert result["judge_model"] == "tiny-judge" and result["judge_url"] == fake_judge.url
    # Each request carried its own item's prompt.
    assert [r["messages"][0]["content"] for r in fake_judge.requests] == [
        judge_prompt(item["prompt"], item["reference"], item["response"]) for item in items]


def test_no_judge_is_reported_not_raised(dead_url, capsys):
    available, message = judge_available(dead_url, timeout=1.0)
    assert not available
    assert dead_url in message and "ollama serve" in message
    items = [{"prompt": "q", "reference": "r", "response": "a"}]
    assert judge_responses(items, url=dead_url, progress=False) is None
    err = capsys.readouterr().err
    assert dead_url in err and "skipped" in err
    assert err.count(dead_url) == 1  # said once, not once per item


def test_a_fine_tuning_run_attaches_judge_scores_to_its_answers(fake_judge, dead_url, capsys):
    from minigpt.config import FinetuneConfig
    from minigpt.task_finetune import score_responses

    answered = [{"instruction": "Name a primary color.", "input": "", "output": "Red.", "model_response": "Red"},
                {"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "six"}]
    fake_judge.replies = ["90", "Score: 10"]
    scores = score_responses(answered, FinetuneConfig(judge_url=fake_judge.url, judge_model="tiny-judge"))
    assert scores["rouge_l"]["f1"] == pytest.approx(0.5)  # "red" matches, "six" does not
    assert scores["judge"]["mean_score"] == pytest.approx(50.0)
    assert [a["judge_score"] for a in answered] == [90, 10]
    assert "Name a primary color." in fake_judge.requests[0]["messages"][0]["content"]

    scores = score_responses(answered, FinetuneConfig(judge_url=dead_url))
    assert scores["judge"] is None and scores["rouge_l"]["f1"] == pytest.approx(0.5)
    assert "skipped" in capsys.readouterr().err
    assert score_responses(answered, FinetuneConfig(judge=False))["judge"] is None
