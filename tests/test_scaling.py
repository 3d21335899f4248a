"""Chapter 9.13's scaling-law sweep: the power-law fits recover known exponents, N is the count
Kaplan et al. use, and the quick sweep gives the numbers the chapter quotes."""

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED_DATA

LOSS_TOLERANCE = 0.02  # relative: the quick sweep's losses move by well under 1% between CPUs and thread counts


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "benchmarks" / "bench_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_plain_fit_recovers_a_kaplan_style_law():
    # Kaplan et al. (2020): L(N) = (N_c / N)^alpha_N with alpha_N = 0.076, N_c = 8.8e13.
    n = np.geomspace(1e4, 1e9, 9)
    loss = (8.8e13 / n) ** 0.076
    fit = bench.fit_power_law(n, loss)
    assert fit["alpha"] == pytest.approx(0.076, abs=1e-9)
    assert fit["a"] == pytest.approx(8.8e13 ** 0.076, rel=1e-9)


def test_offset_fit_recovers_a_chinchilla_style_law():
    # Hoffmann et al. (2022)'s N term and irreducible loss: L(N) = E + A / N^alpha.
    n = np.geomspace(1e7, 1e10, 7)
    loss = 1.69 + 406.4 * n ** -0.34
    fit = bench.fit_power_law_with_offset(n, loss)
    assert fit["alpha"] == pytest.approx(0.34, abs=1e-3)
    assert fit["c"] == pytest.approx(1.69, abs=1e-2)
    assert not fit["at_edge"]


def test_offset_fit_recovers_a_law_at_this_sweeps_sizes():
    n = np.geomspace(1.2e4, 1.8e6, 6)  # the sweep's range of N
    loss = 1.35 + 9.0 * n ** -0.25
    fit = bench.fit_power_law_with_offset(n, loss)
    assert fit["alpha"] == pytest.approx(0.25, abs=1e-3)
    assert fit["c"] == pytest.approx(1.35, abs=1e-3)
    assert bench.predict(fit, n) == pytest.approx(loss, abs=1e-6)


def test_line_fit_matches_numpy_polyfit_on_noisy_points():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 50)
    y = 3.0 - 0.7 * x + rng.normal(0, 0.3, 50)
    intercept, slope = bench.fit_line(x, y)
    slope_np, intercept_np = np.polyfit(x, y, 1)
    assert (intercept, slope) == pytest.approx((intercept_np, slope_np), rel=1e-10)


@pytest.mark.parametrize("n_layers, emb_dim", [(1, 32), (3, 96), (6, 160)])
def test_non_embedding_parameters_is_12_L_d_squared_plus_the_norms(n_layers, emb_dim):
    with torch.device("meta"):
        model = bench.build_model(n_layers, emb_dim, vocab_size=65, context_length=64, seed=0)
    # q, k, v, out: 4 d^2; the MLP: 8 d^2; a scale per norm (no biases): 2 per block and a final one.
    assert bench.non_embedding_parameters(model) == 12 * n_layers * emb_dim**2 + (2 * n_layers + 1) * emb_dim


def quoted_quick_rows() -> list[tuple[int, int, int, int, float]]:
    """The chapter's table of the quick sweep: (n_layers, emb_dim, N, D, loss) per row."""
    text = (ROOT / "chapters" / "09-training-at-scale.md").read_text(encoding="utf-8")
    table = text.split("| quick sweep: n_layers x emb_dim |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (\d+) x (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|$", table, re.MULTILINE)
    return [(int(a), int(b), int(n.replace(",", "")), int(d.replace(",", "")), float(loss))
            for a, b, n, d, loss in rows]


def test_quick_sweep_gives_the_numbers_the_chapter_quotes():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("tinyshakespeare.txt is not available offline (put ../shared beside the checkout)")
    quoted = quoted_quick_rows()
    assert [(a, b) for a, b, *_ in quoted] == bench.QUICK_SIZES
    rows = bench.run_sweep(bench.QUICK_SIZES, bench.QUICK, path.read_text(encoding="utf-8"), report=lambda line: None)
    for row, (_, _, n, d, loss) in zip(rows, quoted):
        assert (row["N"], row["D"]) == (n, d)
        assert row["loss"] == pytest.approx(loss, rel=LOSS_TOLERANCE)
    losses = [row["loss"] for row in rows]
    assert losses == sorted(losses, reverse=True), "a larger model should end lower after the same tokens"
