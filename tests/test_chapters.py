"""The handbook stays true to the code: every `minigpt.…` name a chapter mentions exists, every
chapter has its notebook and figures, and results the chapters quote are what the code gives
(counts and hand-worked cases here; seeded and trained numbers in test_chapter_numbers.py)."""

import importlib
import inspect
import math
import re

import pytest
import torch

from conftest import ROOT

CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]-*.md"))
# `minigpt.module.Name` or `minigpt.module.Name.attribute`, as the chapters write them in code spans.
NAME = re.compile(r"`(minigpt(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def resolve(dotted: str):
    """Import the longest module prefix of `dotted`, then follow attributes; raises if any is missing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if isinstance(obj, type) and not hasattr(obj, attribute):
                # An instance attribute set in __init__, such as GPTModel.tok_emb.
                if f"self.{attribute} =" not in inspect.getsource(obj):
                    raise AttributeError(f"{obj.__name__} has no attribute {attribute!r}")
                return obj
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_name_a_chapter_mentions_exists(chapter):
    names = sorted(set(NAME.findall(chapter.read_text(encoding="utf-8"))))
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{chapter.name} names things the package does not have: {missing}"


@pytest.mark.parametrize("appendix", sorted((ROOT / "chapters").glob("appendix-*.md")), ids=lambda path: path.stem)
def test_every_name_and_figure_an_appendix_mentions_exists(appendix):
    text = appendix.read_text(encoding="utf-8")
    missing = []
    for name in sorted(set(NAME.findall(text))):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{appendix.name} names things the package does not have: {missing}"
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        assert (ROOT / "chapters" / figure).is_file(), figure
    assert appendix.name in (ROOT / "chapters" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_chapter_has_its_notebook_and_its_figures(chapter):
    number, slug = chapter.stem.split("-", 1)
    assert (ROOT / "notebooks" / f"ch{number}-{slug}.ipynb").is_file()
    text = chapter.read_text(encoding="utf-8")
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        assert (ROOT / "chapters" / figure).is_file(), figure
    index = (ROOT / "chapters" / "README.md").read_text(encoding="utf-8")
    assert chapter.name in index, f"chapters/README.md does not list {chapter.name}"


def chapter_text(prefix: str) -> str:
    matches = [path for path in CHAPTERS if path.name.startswith(prefix)]
    if not matches:
        pytest.skip(f"chapter {prefix} is not written yet")
    return matches[0].read_text(encoding="utf-8")


def meta_model(preset: str, **overrides):
    from minigpt.config import model_config
    from minigpt.model import GPTModel

    with torch.device("meta"):  # shapes only: nothing is allocated
        return GPTModel(model_config(preset, **overrides))


# ---------------------------------------------------------------------------------------
# Results the chapters quote, computed again here. Each entry: the chapter, the text as the
# chapter writes it, and a function that computes that text from the code.
# ---------------------------------------------------------------------------------------

def verdict_counts():
    from minigpt.data import load_text
    from minigpt.tokenizer import get_tokenizer

    path = ROOT / "the-verdict.txt"
    if not path.is_file():
        pytest.skip("the-verdict.txt is not in the repository root")
    text = load_text(path)
    return len(text), len(get_tokenizer("gpt2").encode(text))


def kv_cache_megabytes(preset: str) -> str:
    cache = meta_model(preset).new_kv_cache(batch_size=1, max_tokens=1024)
    return f"{cache.memory_bytes() / 1e6:.1f}"


def best_two_beams_probability() -> str:
    from types import SimpleNamespace

    from minigpt.generation import beam_search

    table = torch.tensor([[0.10, 0.50, 0.40], [0.33, 0.33, 0.34], [0.05, 0.05, 0.90]])

    class TableModel(torch.nn.Module):
        cfg = SimpleNamespace(context_length=8, vocab_size=3)

        def forward(self, idx, cache=None, last_only=False):
            return torch.log(table)[idx]

    path = beam_search(TableModel(), torch.tensor([[0]]), 2, num_beams=2, length_penalty=0.0,
                       use_cache=False)[0].tolist()
    return f"{table[path[0], path[1]] * table[path[1], path[2]]:.2f}"


def initial_loss_of_gpt_mini() -> str:
    import torch.nn.functional as F

    from minigpt.config import model_config
    from minigpt.model import GPTModel

    torch.manual_seed(123)
    model = GPTModel(model_config("gpt-mini", drop_rate=0.0)).eval()
    torch.manual_seed(123)
    idx, targets = torch.randint(0, 50257, (4, 64)), torch.randint(0, 50257, (4, 64))
    with torch.no_grad():
        return f"{F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).item():.4f}"


def block_parameters() -> str:
    from minigpt.blocks import TransformerBlock
    from minigpt.config import GPTConfig

    return f"{sum(p.numel() for p in TransformerBlock(GPTConfig(emb_dim=768, n_heads=4)).parameters()):,}"


def verdict_split_tokens() -> str:
    from minigpt.data import load_text, split_text
    from minigpt.tokenizer import get_tokenizer

    if not (ROOT / "the-verdict.txt").is_file():
        pytest.skip("the-verdict.txt is not in the repository root")
    tokenizer = get_tokenizer("gpt2")
    train, val = (len(tokenizer.encode(part)) for part in split_text(load_text(ROOT / "the-verdict.txt")))
    return f"{train:,} + {val:,} = {train + val:,}"


def hand_worked_cross_entropy() -> str:
    from minigpt.train import calc_loss_batch

    logits = torch.tensor([[[2.0, 1.0, 0.1, -1.0], [0.5, 2.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])

    class Fixed(torch.nn.Module):
        def forward(self, idx):
            return logits

    targets = torch.tensor([[0, 1, 3]])
    return f"**{calc_loss_batch(targets, targets, Fixed(), 'cpu').item():.4f}**"


def decayed_parameters(model, group: int) -> str:
    from minigpt.config import TrainConfig
    from minigpt.train import make_optimizer

    return f"{sum(p.numel() for p in make_optimizer(model, TrainConfig()).param_groups[group]['params']):,}"


def adamw_pure_decay() -> str:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.1)
    weight.grad = torch.zeros(2)
    optimizer.step()
    return f"$[1, -2]$ becomes $[{weight[0].item():.2f}, {weight[1].item():.2f}]$"


SIX_TOKENS = [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
              [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]]  # "Your journey starts with one step"


def journey_context() -> str:
    from minigpt.attention import simple_self_attention

    values = simple_self_attention(torch.tensor(SIX_TOKENS))[1].tolist()
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def attention_parameters() -> str:
    from minigpt.attention import MultiHeadAttention

    return f"{sum(p.numel() for p in MultiHeadAttention(768, 768, 12, qkv_bias=True).parameters()):,}"


def gpt_mini_flops() -> str:
    from minigpt.config import model_config
    from minigpt.model import GPTModel

    model = GPTModel(model_config("gpt-mini", vocab_size=65, drop_rate=0.0))
    return f"{int(model.flops_per_token(128) * 4 * 128):,}"


def first_global_batch() -> str:
    from minigpt.data import SeededSampler

    batch = list(SeededSampler(100, shuffle=True, seed=123, batch_size=8))[:8]
    halves = [list(SeededSampler(100, shuffle=True, seed=123, batch_size=8, rank=r, world_size=2))[:4]
              for r in range(2)]
    return f"{batch} in one process; with\n  two, rank 0 gets {halves[0]} and rank 1 {halves[1]}"


def activation_bytes_formula(L: int, C: int, H: int, V: int) -> str:
    return f"{4 * (L * (16 * C + H + 4) + 2 * C + V + 2) + 16:,} bytes"


def largest_micro_batches(gigabytes) -> str:
    """Section 9.10's table, gpt2-small in bf16: the most sequences of 1,024 tokens whose estimated
    peak fits, found by stepping up one sequence at a time (not by the chapter's arithmetic)."""
    from minigpt.memory import estimate_training_memory

    model = meta_model("gpt2-small", drop_rate=0.0)
    counts = []
    for gb in gigabytes:
        sequences = 0
        while estimate_training_memory(model, sequences + 1, 1024, "bf16").total <= gb * 1e9:
            sequences += 1
        counts.append(str(sequences))
    return " / ".join(counts)


def rank_activations(num_tokens: int) -> int:
    from minigpt.config import model_config
    from minigpt.memory import activation_bytes_per_token

    return activation_bytes_per_token(model_config("llama-tiny", vocab_size=65, drop_rate=0.0, attn_rank=16),
                                      "fp32", num_tokens)


def quick_memory_row() -> str:
    """The header's memory row for quick mode: gpt-mini, 2 sequences of 64 tokens, fp32."""
    from minigpt.memory import estimate_training_memory

    e = estimate_training_memory(meta_model("gpt-mini", drop_rate=0.0), 2, 64)
    return (f"about {e.total / 2**20:,.0f} MiB estimated: states {e.states / 2**20:,.0f}, "
            f"{e.per_sequence / 2**20:,.1f} per sequence of 64 tokens")


def memory_quote(field: str) -> float:
    from minigpt.memory import estimate_training_memory

    micro = 32 if field == "total" else 8
    return getattr(estimate_training_memory(meta_model("gpt2-small", drop_rate=0.0), micro, 1024, "bf16"), field) / 2**20


def activation_row(preset: str, precision: str) -> str:
    from minigpt.config import model_config
    from minigpt.memory import activation_bytes_per_token

    return f"{activation_bytes_per_token(model_config(preset, vocab_size=65, drop_rate=0.0, context_length=64), precision, 64):,}"


QUOTED = [
    ("09", "| 2,844,131,328 |", lambda: f"| {gpt_mini_flops()} |"),
    ("09", "854.4 MFLOPs per token", lambda: f"{meta_model('gpt2-small').flops_per_token(1024) / 1e6:.1f} MFLOPs per token"),
    ("09", "[82, 92, 2, 36, 32, 1, 5, 90] in one process; with\n  two, rank 0 gets [82, 92, 2, 36] and rank 1 [32, 1, 5, 90]", first_global_batch),
    ("09", "34,204 bytes", lambda: activation_bytes_formula(4, 128, 4, 65)),
    ("09", "19 / 34 / 70", lambda: largest_micro_batches((24, 40, 80))),
    ("09", "training needs about 35,714 MiB", lambda: f"training needs about {memory_quote('total'):,.0f} MiB"),
    ("09", "3,926.3 MiB beside 4,204.7 MiB",
     lambda: f"{memory_quote('loss_buffers'):,.1f} MiB beside {memory_quote('activations'):,.1f} MiB"),
    ("09", "| llama-tiny | 44,408 | 44,408 | 28,024 |",
     lambda: f"| llama-tiny | {activation_row('llama-tiny', 'fp32')} | {activation_row('llama-tiny', 'fp32')} | "
             f"{activation_row('llama-tiny', 'bf16')} |"),
    ("09", "| moe-tiny | 79,048 |", lambda: f"| moe-tiny | {activation_row('moe-tiny', 'fp32')} |"),
    ("09", "$\\log_2 62 = 5.95$", lambda: f"$\\log_2 62 = {math.log2(62):.2f}$"),
    ("03", "(0.4419, 0.6515, 0.5683)", journey_context),
    ("03", "0.2379", lambda: f"{torch.softmax(torch.tensor(SIX_TOKENS) @ torch.tensor(SIX_TOKENS[1]), 0)[1]:.4f}"),
    ("03", "2,362,368", attention_parameters),
    ("03", "402{,}653{,}184", lambda: f"{8 * 12 * 1024 * 1024 * 4:,}".replace(",", "{,}")),
    ("05", "**0.6992**", hand_worked_cross_entropy),
    ("05", "162,915,840", lambda: decayed_parameters(meta_model("gpt2-small"), 0)),
    ("05", "93,696", lambda: decayed_parameters(meta_model("gpt2-small"), 1)),
    ("05", "925,696", lambda: decayed_parameters(meta_model("gpt-mini", vocab_size=512, context_length=64), 0)),
    ("05", "ln 50{,}257 = 10.8249", lambda: f"ln 50{{,}}257 = {math.log(50257):.4f}"),
    ("05", "$[1, -2]$ becomes $[0.99, -1.98]$", adamw_pure_decay),
    ("01", "13,673,984", lambda: f"{meta_model('gpt-mini').num_parameters():,}"),
    ("11", "**693,632**", lambda: f"**{meta_model('llama-tiny', vocab_size=65, attn_rank=16).num_parameters():,}**"),
    ("11", "**4,694,784**",
     lambda: f"**{meta_model('llama-tiny', vocab_size=65, attn_rank=16).flops_per_token(128):,.0f}**"),
    ("11", "46,392 bytes with 64-token windows, 50,488 with 128 and 107,832",
     lambda: "{:,} bytes with 64-token windows, {:,} with 128 and {:,}".format(*(
         rank_activations(T) for T in (64, 128, 1024)))),
    ("01", "about 260 MiB estimated: states 209, 39.4 per sequence of 64 tokens", quick_memory_row),
    ("01", "36.8 MiB\n  of which", lambda: f"{12 * 50257 * 64 / 2**20:.1f} MiB\n  of which"),
    ("01", "7,241,088", lambda: f"{meta_model('gpt-mini').num_parameters(exclude_output_head=True):,}"),
    ("01", "162,419,712", lambda: f"{meta_model('gpt2-small', context_length=256).num_parameters():,}"),
    ("01", "49,336,320", lambda: f"{meta_model('gpt2-small', context_length=256, n_layers=6, emb_dim=384, n_heads=6).num_parameters():,}"),
    ("01", "4,612 + 534 = 5,146", verdict_split_tokens),
    ("04", "163,009,536", lambda: f"{meta_model('gpt2-small').num_parameters():,}"),
    ("04", "124,412,160", lambda: f"{meta_model('gpt2-small', tie_weights=True).num_parameters():,}"),
    ("04", "124,439,808", lambda: f"{meta_model('gpt2-small', tie_weights=True, qkv_bias=True).num_parameters():,}"),
    ("04", "38,597,376", lambda: f"{meta_model('gpt2-small').num_parameters() - meta_model('gpt2-small', tie_weights=True).num_parameters():,}"),
    ("04", "7,085,568", block_parameters),
    ("04", "10.8478", initial_loss_of_gpt_mini),
    ("04", "10.8249", lambda: f"{math.log(50257):.4f}"),
    ("02", "20,479 characters", lambda: f"{verdict_counts()[0]:,} characters"),
    ("02", "(5,145 tokens each)", lambda: f"({verdict_counts()[1]:,} tokens each)"),
    ("06", "= 75.5$ MB", lambda: f"= {kv_cache_megabytes('gpt2-small')}$ MB"),
    ("06", "GPT-2 xl needs 629 MB", lambda: f"GPT-2 xl needs {float(kv_cache_megabytes('gpt2-xl')):.0f} MB"),
    ("06", "$0.4 \\times 0.9 = 0.36$", lambda: f"$0.4 \\times 0.9 = {best_two_beams_probability()}$"),
    ("06", "$\\ln 62 = 4.13$", lambda: f"$\\ln 62 = {math.log(62):.2f}$"),
    ("07", "1,179,648", lambda: f"{lora_parameters(meta_model('gpt2-small')):,}"),
    ("07", "24,576", lambda: f"{lora_parameters(meta_model('gpt2-small'), layer='trf_blocks.0.att.qkv'):,}"),
    ("07", "65,794 of 7,306,882", lambda: "{:,} of {:,}".format(*classifier_trainable("lora"))),
    ("07", "198,402 (2.74%)", lambda: "{:,} ({:.2%})".format(*classifier_trainable("last_blocks", share=True))),
    ("07", "precision, recall and F1 all 0.8333", lambda: rouge_of_the_cat()),
    ("10", "| **344** |", lambda: f"| **{meta_model('llama-tiny').cfg.hidden_dim}** |"),
    ("10", "`llama-tiny` **742,784**", lambda: f"`llama-tiny` **{meta_model('llama-tiny', vocab_size=65).num_parameters():,}**"),
    ("10", "| **25,165,824** |", lambda: f"| **{meta_model('llama-124m').new_kv_cache(1, 1024).memory_bytes():,}** |"),
    ("10", "| **6,291,456** |", lambda: f"| **{meta_model('llama-124m', n_kv_heads=1).new_kv_cache(1, 1024).memory_bytes():,}** |"),
    ("10", "only **1,273,216** a token runs", lambda: f"only **{meta_model('moe-tiny', vocab_size=65).num_active_parameters():,}** a token runs"),
    ("08", "= 0.5981$", lambda: f"= {dpo_by_hand()[0]:.4f}$"),
    ("08", "the example gives 0.6381", lambda: f"the example gives {dpo_by_hand(label_smoothing=0.2)[0]:.4f}"),
    ("08", "(2 - 5)^2 = 9.0000", lambda: f"(2 - 5)^2 = {dpo_by_hand(loss_type='ipo')[0]:.4f}"),
    ("08", "`[0.225, 0.25, 0.3, 0.0]`", lambda: hand_worked_gae()),
    ("08", "The exact KL is 0.223805", lambda: kl_of_three_outcomes()),
    ("08", "= -0.775$ and half the tokens are clipped", lambda: clipped_by_hand()),
]


def dpo_by_hand(**options) -> tuple[float, float, float]:
    """Section 8.5's pair: policy log-probabilities -1 (chosen), -3 (rejected); reference -2 for both."""
    from minigpt.rlhf import dpo_loss

    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                      torch.tensor([-2.0]), beta=0.1, **options)
    return loss.item(), chosen.item(), rejected.item()


def hand_worked_gae() -> str:
    from minigpt.rlhf import gae

    advantages, _ = gae(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.7, 9.0]]),
                        torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=0.5)
    return f"`{[round(a, 4) + 0.0 for a in advantages[0].tolist()]}`"  # + 0.0: masked -0.0 prints as 0.0


def kl_of_three_outcomes() -> str:
    """KL(p || q) exactly, and as the mean of the k1 and k3 estimators under p (both unbiased)."""
    from minigpt.rlhf import kl_k1, kl_k3

    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    for estimator in (kl_k1, kl_k3):
        assert (p * estimator(p.log(), q.log())).sum().item() == pytest.approx(exact)
    return f"The exact KL is {exact:.6f}"


def clipped_by_hand() -> str:
    from minigpt.rlhf import ppo_policy_loss

    loss, clipped = ppo_policy_loss(torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1])), torch.zeros(4),
                                     torch.tensor([1.0, 1.0, -1.0, 2.0]), torch.ones(4), clip=0.2)
    assert clipped.item() == 0.5
    return f"= {loss.item():.3f}$ and half the tokens are clipped"


def lora_parameters(model, layer: str | None = None) -> int:
    """Trainable weights after LoRA at rank 8 on every block's Linear layers (or one layer's)."""
    from minigpt.lora import count_parameters, inject_lora

    inject_lora(model, rank=8, alpha=16)
    if layer is None:
        return count_parameters(model)[0]
    return sum(p.numel() for p in model.get_submodule(layer).parameters() if p.requires_grad)


def classifier_trainable(setting: str, share: bool = False):
    """A two-class gpt-mini classifier's trainable weights under `setting` (and their share, or the total)."""
    from minigpt.config import FinetuneConfig
    from minigpt.finetune import add_classification_head, choose_trainable
    from minigpt.lora import count_parameters

    model = choose_trainable(add_classification_head(meta_model("gpt-mini"), 2), FinetuneConfig(trainable=setting))
    trainable, total = count_parameters(model)
    return (trainable, trainable / total) if share else (trainable, total)


def rouge_of_the_cat() -> str:
    from minigpt.evaluate import rouge_l

    scores = rouge_l("the cat sat on the mat", "the cat lay on the mat")
    assert scores["precision"] == scores["recall"] == scores["f1"]
    return f"precision, recall and F1 all {scores['f1']:.4f}"


@pytest.mark.parametrize("prefix, quoted, compute", QUOTED, ids=[f"{c}:{q}" for c, q, _ in QUOTED])
def test_quoted_results_are_what_the_code_gives(prefix, quoted, compute):
    text = chapter_text(prefix)
    assert quoted in text, f"chapter {prefix} no longer says {quoted!r}: update this test or the chapter"
    assert compute() == quoted


def test_every_test_a_chapter_cites_exists():
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("test_*.py")), re.M))
    cited = {name for chapter in CHAPTERS for name in re.findall(r"`(test_\w+)`", chapter.read_text(encoding="utf-8"))}
    assert cited <= defined, f"chapters cite tests that do not exist: {sorted(cited - defined)}"
