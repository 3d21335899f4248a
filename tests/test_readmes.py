"""The READMEs against the code: every `python main.py` command they show uses flags and values
`main.py` accepts, every script and repository file they name exists, the Chinese README's
commands are the English README's, and its Chinese BPE snippet prints the numbers it quotes.
Offline and fast: nothing is trained except the snippet's 143-merge BPE."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import main
from minigpt.config import MODEL_PRESETS, MODES, TASKS

ROOT = Path(__file__).resolve().parent.parent
READMES = ["README.md", "README.zh-CN.md"]
CHINESE_BPE_HEADING = "## 在中文文本上训练 BPE"

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_COMMAND = re.compile(r"`((?:python|torchrun) [^`]*?main\.py[^`]*|python benchmarks/[^`]*)`")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def fenced_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang.strip() == language]


def defined_flags() -> set[str]:
    """Every option string main.py's parser (minigpt/cli.py) defines (BooleanOptionalAction adds --no-X)."""
    source = read("minigpt/cli.py")
    flags = set()
    for call in re.finditer(r"add_argument\(\s*\"(--[a-z0-9-]+)\"(.*?)\)\s*$", source, re.MULTILINE | re.DOTALL):
        flags.add(call.group(1))
        if "BooleanOptionalAction" in call.group(2):
            flags.add("--no-" + call.group(1)[2:])
    flags.update({"-h", "--help"})
    return flags


FLAGS = defined_flags()


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks (continuation lines joined, `&&` chains split) and
    the inline `python main.py ...` / `python benchmarks/...` commands."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            command: list[str] = []
            for token in tokens + ["&&"]:
                if token in ("&&", "||", ";"):
                    if command:
                        commands.append(shlex.join(command))
                    command = []
                else:
                    command.append(token)
    for match in INLINE_COMMAND.finditer(text):
        commands.append(" ".join(match.group(1).split()))
    return commands


def main_py_arguments(command: str) -> list[str] | None:
    """The arguments after main.py when the command runs it, else None."""
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        if token == "main.py" and i > 0 and (tokens[0] in ("python", "torchrun")):
            return [t for t in tokens[i + 1:] if t != "..."]
    return None


@pytest.mark.parametrize("readme", READMES)
def test_main_py_commands_use_defined_flags_and_valid_choices(readme):
    commands = [c for c in shell_commands(read(readme)) if main_py_arguments(c) is not None]
    assert len(commands) >= 20, f"{readme}: found only {len(commands)} main.py commands"
    choices = {"--task": TASKS, "--mode": MODES, "--model": tuple(MODEL_PRESETS)}
    for command in commands:
        args = main_py_arguments(command)
        for i, token in enumerate(args):
            if not token.startswith("-") or re.fullmatch(r"-?\d", token):
                continue
            flag, _, inline_value = token.partition("=")
            assert flag in FLAGS, f"{readme}: `{command}` uses {flag}, which main.py does not define"
            if flag in choices:
                value = inline_value or args[i + 1]
                assert value in choices[flag], f"{readme}: `{command}`: {flag} {value} is not one of {choices[flag]}"
        if {"-h", "--help", "N", "NAME", "DIR"} & set(args):  # help, or a placeholder (`--epochs N`)
            continue
        try:  # the parser itself: types, choices, values present (paths need not exist)
            main.parse_args(args)
        except SystemExit as error:
            pytest.fail(f"{readme}: main.py's parser rejects `{command}` ({error})")


@pytest.mark.parametrize("readme", READMES)
def test_scripts_named_in_commands_exist(readme):
    text = read(readme)
    scripts = set(re.findall(r"python ((?:benchmarks/)?[\w-]+\.py)", text))
    scripts.update(re.findall(r"torchrun [^\n`]*?([\w-]+\.py)", text))
    assert "main.py" in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), f"{readme} names {script}, which does not exist"


@pytest.mark.parametrize("readme", READMES)
def test_relative_links_point_at_repository_files(readme):
    text = FENCE.sub("", read(readme))
    links = [target for target in LINK.findall(text)
             if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]
    assert links, f"{readme} has no relative links"
    for target in links:
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"{readme} links to {target}, which does not exist"


def test_the_readmes_link_to_each_other():
    assert "(README.zh-CN.md)" in read("README.md")
    assert "[English](README.md)" in read("README.zh-CN.md")


def test_chinese_readme_commands_are_the_english_ones():
    english = "\n".join(fenced_blocks(read("README.md"), "bash"))
    for block in fenced_blocks(read("README.zh-CN.md"), "bash"):
        for line in block.splitlines():
            assert line in english, f"README.zh-CN.md's command is not in README.md: {line}"


def test_chinese_readme_links_every_chapter():
    text = read("README.zh-CN.md")
    for chapter in sorted((ROOT / "chapters").glob("[0-9][0-9]-*.md")):
        assert f"(chapters/{chapter.name})" in text, f"README.zh-CN.md does not link {chapter.name}"


def test_chinese_bpe_snippet_prints_the_numbers_quoted():
    text = read("README.zh-CN.md")
    assert text.count(CHINESE_BPE_HEADING) == 1
    section = text.split(CHINESE_BPE_HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = FENCE.findall(section)
    code = next(body for lang, body in blocks if lang.strip() == "python")
    quoted = next(body for lang, body in blocks if lang.strip() == "")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.zh-CN.md (Chinese BPE snippet)", "exec"), {"__name__": "__readme__"})
    assert printed.getvalue() == quoted
    # and the prose quotes the same figures
    numbers = re.findall(r"\d+\.\d\d tokens per character", quoted)
    assert len(numbers) == 4
    assert "1.27" in section.split("```", 6)[-1] and "143" in section


def test_the_readme_shakespeare_command_is_the_one_raced_against_nanogpt():
    """benchmarks/bench_vs_nanogpt.py times the README's command: the two must not drift apart."""
    import ast

    source = (ROOT / "benchmarks" / "bench_vs_nanogpt.py").read_text(encoding="utf-8")
    raced = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MINIGPT_ARGS")
    readme = [args for args in map(main_py_arguments, shell_commands(read("README.md")))
              if args and "gpt-char" in args]
    assert readme, "README.md has no python main.py command with --model gpt-char"
    flags = lambda args: dict(zip(args[::2], args[1::2]))  # every flag here takes one value
    assert flags(readme[0]) == flags(raced + ["--max-steps", "2000"])
