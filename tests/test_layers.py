"""The package keeps its shape: chapter modules below, the run layer above them, the task
pipelines on top, no import circle; and every function stays short enough to read.

The imports are read from the source (every `import` and `from ... import`, at the top of a
module or inside a function: a lazy import that reaches upward is still an upward import).
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "minigpt"

# The chapter modules in reading order, each with its chapter (0: the foundation every chapter uses).
# A chapter module may import only the modules before it in this list.
CHAPTERS = [("config", 0), ("plot", 0), ("download", 0), ("data", 2), ("tokenizer", 2), ("attention", 3), ("blocks", 4),
            ("model", 4), ("train", 5), ("generation", 6), ("hub", 6), ("lora", 7), ("finetune", 7), ("rlhf", 8),
            ("diagrams", 8), ("memory", 9), ("scale", 9), ("evaluate", 12),
            ("graph", 13), ("graph_script", 13)]  # 13: the studio's appendix
RUN_LAYER = ["settings", "runs"]   # what every run needs: config_run resolution, run directories, checkpoints ...
PIPELINES = ["task_pretrain", "task_finetune", "task_align", "task_generate", "task_evaluate", "task_export"]
TOP = ["studio", "cli", "__main__"]  # over the pipelines, in this order: the page, the command line, python -m

# Functions the package keeps longer than 80 lines or with more than 8 parameters, and why.
_DECODING = "the decoding options of generation_params, each a keyword set by name (the DESIGN contract of generate)"
LONG_FUNCTIONS: dict[str, str] = {
    "generation.generate": _DECODING,
    "generation.generate_text": _DECODING,
    "generation.stream_text": _DECODING,
    "generation.iter_next_tokens": _DECODING,
    "attention.MultiHeadAttention.__init__": "one keyword per attention switch of GPTConfig (chapters 3, 10, 11)",
    "data.create_dataloader": "the book's create_dataloader(txt, batch_size, max_length, stride, shuffle, drop_last, "
                              "num_workers) and chapter 9's micro-batches, ranks and random windows, all by keyword",
    "studio.create_app": "the Flask app with its routes as nested functions, each short; the studio is rebuilt next",
}
MAX_LINES, MAX_PARAMETERS = 80, 8


def package_imports(folder: Path = PACKAGE) -> dict[str, set[str]]:
    """module name -> the minigpt modules it imports, read from the source."""
    graph = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minigpt"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    imported.add(parts[1])
                else:  # from minigpt import memory
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[1] for alias in node.names
                                if alias.name.startswith("minigpt."))
        graph[path.stem] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that reaches up a layer, or up the chapter order."""
    position = {name: i for i, (name, _) in enumerate(CHAPTERS)}
    allowed = {name: set(list(position)[:position[name]]) for name in position}
    chapters = set(position)
    allowed.update({name: chapters | set(RUN_LAYER[:i]) for i, name in enumerate(RUN_LAYER)})
    allowed.update({name: chapters | set(RUN_LAYER) for name in PIPELINES})
    allowed.update({name: chapters | set(RUN_LAYER) | set(PIPELINES) | set(TOP[:i]) for i, name in enumerate(TOP)})
    problems = []
    for module, imported in sorted(graph.items()):
        if module not in allowed:
            problems.append(f"{module} is in no layer: add it to CHAPTERS, RUN_LAYER, PIPELINES or TOP")
            continue
        for other in sorted(imported - allowed[module] - {module}):
            problems.append(f"{module} imports {other}, which is above it")
    return problems


def test_the_package_has_no_import_circle():
    assert find_cycle(package_imports()) is None, find_cycle(package_imports())


def test_no_module_imports_a_layer_above_it():
    assert layer_violations(package_imports()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The two checks above on made-up graphs: they would fail if the package broke its shape."""
    assert find_cycle({"train": {"finetune"}, "finetune": {"rlhf"}, "rlhf": {"train"}}) == \
        ["finetune", "rlhf", "train", "finetune"]
    assert find_cycle({"model": {"blocks"}, "blocks": {"attention"}, "attention": set()}) is None
    upward = {"train": {"model", "generation"}, "runs": {"task_pretrain"}, "task_align": {"task_finetune"},
              "model": set(), "newmodule": set()}
    assert layer_violations(upward) == ["newmodule is in no layer: add it to CHAPTERS, RUN_LAYER, PIPELINES or TOP",
                                        "runs imports task_pretrain, which is above it",
                                        "task_align imports task_finetune, which is above it",
                                        "train imports generation, which is above it"]


def test_the_chapter_modules_are_the_handbooks_chapters_in_order():
    numbers = [number for _, number in CHAPTERS]
    assert numbers == sorted(numbers)
    assert {name for name, _ in CHAPTERS} | set(RUN_LAYER) | set(PIPELINES) | set(TOP) == \
        {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}


def test_a_lazy_import_inside_a_function_counts(tmp_path):
    (tmp_path / "train.py").write_text("def f():\n    from minigpt.finetune import build_model\n")
    (tmp_path / "finetune.py").write_text("import minigpt.train\n")
    assert package_imports(tmp_path) == {"train": {"finetune"}, "finetune": {"train"}}


def functions(path: Path):
    """(qualified name, lines, parameters) of every function and method in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                found.append((f"{path.stem}.{prefix}{child.name}", child.end_lineno - start + 1, len(params)))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(tree, "")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda path: path.stem)
def test_functions_are_short_and_take_few_parameters(path):
    too_big = [f"{name}: {lines} lines, {params} parameters" for name, lines, params in functions(path)
               if (lines > MAX_LINES or params > MAX_PARAMETERS) and name not in LONG_FUNCTIONS]
    assert not too_big, f"longer than {MAX_LINES} lines or more than {MAX_PARAMETERS} parameters: {too_big}"
