"""The README's chain of stages, run as written (at test sizes): pretrain -> sft -> reward / dpo ->
ppo -> generate -> evaluate -> export, each starting from the run directory of the one before."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("chain")

# What each task adds to the README's command to run in seconds (the commands are the README's).
TEST_SIZES = {"pretrain": ["--max-steps", "3"], "sft": ["--max-steps", "2", "--max-new-tokens", "3"],
              "reward": ["--max-steps", "2"], "dpo": ["--max-steps", "2"],
              "ppo": ["--iterations", "1", "--max-new-tokens", "3"], "generate": ["--max-new-tokens", "3"],
              "evaluate": [], "export": []}


def chain_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Every stage, chained", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_readmes_chain_runs_end_to_end(tmp_path):
    commands = chain_commands()
    tasks = []
    for command in commands:
        assert command[:2] == ["python", "main.py"], command
        flags = command[2:]
        task = flags[flags.index("--task") + 1] if "--task" in flags else "pretrain"
        tasks.append(task)
        result = subprocess.run([sys.executable, str(ROOT / "main.py"), *flags, *TEST_SIZES[task]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
    assert tasks == ["pretrain", "sft", "reward", "dpo", "ppo", "generate", "evaluate", "export"]
    chain = tmp_path / "runs" / "chain"
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo"):
        assert (chain / stage / "checkpoint.pt").is_file(), stage
    assert (chain / "hf" / "model.safetensors").is_file() and (chain / "pretrain" / "evaluation.json").is_file()
