"""The appendices stay true: every citation in the handbook reaches a bibliography entry and every
entry is cited; the PyTorch appendix's snippets print the numbers the page quotes, which are also
computed here another way; its notebook runs those snippets in the page's order."""

import contextlib
import io
import math
import re
import struct

import nbformat
import pytest
import torch

from conftest import ROOT

CHAPTERS = ROOT / "chapters"
BIBLIOGRAPHY = CHAPTERS / "appendix-bibliography.md"
PYTORCH = CHAPTERS / "appendix-pytorch.md"
ANCHOR = re.compile(r'<a id="([a-z0-9-]+)"></a>')
# [Vaswani et al., 2017](appendix-bibliography.md#vaswani2017), also from chapters/zh/ (../appendix-…).
CITATION = re.compile(r"\[([^\]]*)\]\((?:\.\./)?appendix-bibliography\.md#([^)\s]+)\)")


def citing_pages() -> list:
    """Every handbook page but the bibliography itself, translations included."""
    return sorted(path for path in CHAPTERS.rglob("*.md") if path != BIBLIOGRAPHY)


def citations() -> list[tuple[str, str, str]]:
    """(page, link text, anchor) for every link into the bibliography."""
    return [(path.relative_to(CHAPTERS).as_posix(), text, anchor) for path in citing_pages()
            for text, anchor in CITATION.findall(path.read_text(encoding="utf-8"))]


def entries() -> list[str]:
    return ANCHOR.findall(BIBLIOGRAPHY.read_text(encoding="utf-8"))


def test_every_anchor_is_unique_and_named_author_year():
    anchors = entries()
    assert len(anchors) == len(set(anchors)), sorted(a for a in anchors if anchors.count(a) > 1)
    assert len(anchors) >= 30
    for anchor in anchors:
        assert re.fullmatch(r"[a-z]+(19|20)\d\d", anchor), f"{anchor!r}: name an entry firstauthorYEAR"


def test_every_entry_says_who_when_what_and_why():
    """Each entry: bold authors and year, a title, then one line on what the handbook uses it for."""
    text = BIBLIOGRAPHY.read_text(encoding="utf-8")
    blocks = re.split(r'(?=<a id=")', text)[1:]
    for block in blocks:
        anchor = ANCHOR.match(block).group(1)
        head = re.search(r"\*\*(.+?)\s\(((?:19|20)\d\d)\)\.\*\*", block, re.S)
        assert head, f"{anchor}: the entry must open with **Authors (YEAR).**"
        assert anchor.endswith(head.group(2)), f"{anchor}: the anchor's year is not the entry's {head.group(2)}"
        assert re.search(r"chapter|appendix", block.split("\n\n")[0].strip().splitlines()[-1]), \
            f"{anchor}: the last line should say where the handbook uses it"


def test_every_citation_link_reaches_an_entry():
    anchors = set(entries())
    broken = [(page, text, anchor) for page, text, anchor in citations() if anchor not in anchors]
    assert not broken, f"links to bibliography entries that do not exist: {broken}"
    own = re.findall(r"\]\(#([^)\s]+)\)", BIBLIOGRAPHY.read_text(encoding="utf-8"))
    assert set(own) <= anchors, sorted(set(own) - anchors)


def test_a_citation_names_the_year_of_its_entry():
    """`[Su et al., 2021](…#su2021)`: a year in the link text must be the entry's year."""
    wrong = [(page, text, anchor) for page, text, anchor in citations()
             for year in re.findall(r"\b(?:19|20)\d\d\b", text) if not anchor.endswith(year)]
    assert not wrong, f"citations whose year is not their entry's: {wrong}"


def test_every_entry_is_cited_by_a_chapter():
    cited = {anchor for _, _, anchor in citations()}
    uncited = sorted(set(entries()) - cited)
    assert not uncited, f"bibliography entries no chapter cites (cite them or remove them): {uncited}"


@pytest.mark.parametrize("chapter", sorted(CHAPTERS.glob("[0-9][0-9]-*.md")), ids=lambda path: path.stem)
def test_every_numbered_chapter_cites_the_bibliography(chapter):
    assert CITATION.search(chapter.read_text(encoding="utf-8")), \
        f"{chapter.name} links nowhere into appendix-bibliography.md"


# ---------------------------------------------------------------------------------------
# PyTorch in one hour
# ---------------------------------------------------------------------------------------

def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PYTORCH.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def printed() -> str:
    """What the page's snippets print, run in order in one namespace as the notebook runs them."""
    if not (ROOT / "the-verdict.txt").is_file():
        pytest.skip("the-verdict.txt is not in the repository root")
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, code in enumerate(snippets()):
            exec(compile(code, f"{PYTORCH.name}, snippet {i + 1}", "exec"), namespace)
    return out.getvalue()


def bfloat16_of(value: float) -> float:
    """Round a float32 to bfloat16 by hand: keep the top 16 bits, rounding to nearest even."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits += 0x7FFF + ((bits >> 16) & 1)
    return struct.unpack("<f", struct.pack("<I", (bits >> 16) << 16))[0]


def softmax(scores: list[float]) -> list[float]:
    exps = [math.exp(s) for s in scores]
    return [e / sum(exps) for e in exps]


def least_squares_line() -> tuple[float, float]:
    """P.7's data, fitted by the normal equations in float64 (not by torch.linalg)."""
    torch.manual_seed(0)
    inputs = torch.rand(256, 1) * 4 - 2
    targets = 3 * inputs - 2 + 0.1 * torch.randn(256, 1)
    x, y = inputs.double().flatten().tolist(), targets.double().flatten().tolist()
    n, sx, sy = len(x), sum(x), sum(y)
    sxx, sxy = sum(a * a for a in x), sum(a * b for a, b in zip(x, y))
    w = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return w, (sy - w * sx) / n


def character_windows() -> tuple[int, int]:
    """The-verdict's distinct characters, and P.8's batches: 8 windows of 32, one every 32 characters."""
    text = (ROOT / "the-verdict.txt").read_text(encoding="utf-8")
    train_chars = int(0.9 * len(text))  # the first 90% trains
    return len(set(text)), len(range(0, train_chars - 32, 32)) // 8


PYTORCH_QUOTED = [
    ("tensor([-0.1115,  0.1204, -0.3696])", None),
    ("torch.bfloat16 2 bytes 0.3339843750", lambda: f"torch.bfloat16 2 bytes {bfloat16_of(1 / 3):.10f}"),
    ("torch.float32 4 bytes 0.3333333433", lambda: f"torch.float32 4 bytes {struct.unpack('<f', struct.pack('<f', 1 / 3))[0]:.10f}"),
    ("tensor([100,   3,   1,   4,   2,   5])", None),
    ("tensor([[-0.1818, -1.7534]])", lambda: "tensor([[{:.4f}, {:.4f}]])".format(
        math.log(softmax([0.1, 2.0, -1.0])[1]), math.log(softmax([1.5, 0.3, 0.2])[2]))),
    ("tensor(0.9676) tensor(0.9676)", lambda: "tensor({0:.4f}) tensor({0:.4f})".format(
        -(math.log(softmax([0.1, 2.0, -1.0])[1]) + math.log(softmax([1.5, 0.3, 0.2])[2])) / 2)),
    ("tensor(14.)", lambda: f"tensor({3 * 2.0 ** 2 + 2:.0f}.)"),
    ("tensor(28.)", lambda: f"tensor({2 * (3 * 2.0 ** 2 + 2):.0f}.)"),
    ("0.4170 tensor([-0.3410,  0.2424,  0.0986])", lambda: "{:.4f} tensor([{:.4f},  {:.4f},  {:.4f}])".format(
        -math.log(softmax([2.0, 1.0, 0.1])[0]), softmax([2.0, 1.0, 0.1])[0] - 1, *softmax([2.0, 1.0, 0.1])[1:])),
    ("33", lambda: str((2 * 8 + 8) + (8 * 1 + 1))),
    ("tensor([2., 2., 2., 2., 0., 2., 2., 0.])", None),
    ("9", lambda: str(8 * 1 + 1)),
    ("w = 3.00, b = -1.99", lambda: "w = {:.2f}, b = {:.2f}".format(*least_squares_line())),
    ("least squares: w = 3.00, b = -1.99", lambda: "least squares: w = {:.2f}, b = {:.2f}".format(*least_squares_line())),
    ("30,272 parameters; 71 batches; ln 62 = 4.1271", lambda: "30,272 parameters; {1} batches; ln {0} = {2:.4f}".format(
        *character_windows(), math.log(character_windows()[0]))),
]


@pytest.mark.parametrize("quoted, compute", PYTORCH_QUOTED, ids=[q for q, _ in PYTORCH_QUOTED])
def test_the_pytorch_appendix_quotes_what_its_code_prints(quoted, compute, printed):
    page = PYTORCH.read_text(encoding="utf-8")
    assert re.search(rf"# {re.escape(quoted)}($|[\s:])", page, re.M), \
        f"the appendix no longer quotes {quoted!r} in a comment: update this test or the page"
    assert re.search(rf"(^|\s){re.escape(quoted)}($|\s|:)", printed, re.M), \
        f"the appendix's code no longer prints {quoted!r}"
    if compute is not None:  # the same number, computed without the appendix's code
        assert compute() == quoted


def test_the_trained_gpt_numbers_match_the_page(printed):
    """P.8's losses: the first to four decimals (one forward pass); after one epoch of training,
    within 0.02, since another CPU may round the 71 steps' sums in another order."""
    quoted = re.search(r"# first batch ([\d.]+), last batch ([\d.]+), validation ([\d.]+)",
                       PYTORCH.read_text(encoding="utf-8"))
    measured = re.search(r"first batch ([\d.]+), last batch ([\d.]+), validation ([\d.]+)", printed)
    assert quoted and measured
    first, last, validation = (float(v) for v in quoted.groups())
    assert measured.group(1) == quoted.group(1)
    assert float(measured.group(2)) == pytest.approx(last, abs=0.02)
    assert float(measured.group(3)) == pytest.approx(validation, abs=0.02)
    assert abs(first - math.log(62)) < 0.05 and validation < first - 1.0  # "down by more than a nat"


def test_the_notebook_runs_every_snippet_in_the_pages_order():
    notebook = nbformat.read(ROOT / "notebooks" / "appendix-pytorch.ipynb", as_version=4)
    cells = [cell.source.strip() for cell in notebook.cells if cell.cell_type == "code"]
    position = 0
    for i, code in enumerate(snippets()):
        found = [j for j in range(position, len(cells)) if cells[j] == code.strip()]
        assert found, f"snippet {i + 1} of the appendix is not a code cell of the notebook (after the last one found)"
        position = found[0] + 1
    assert "FIGURES = notebook_figures(ROOT)" in cells[0]
