"""minigpt installs like a library: a wheel built from pyproject.toml holds the package and its
files, and once installed `import minigpt`, the `minigpt` command and the README's library
example work from a folder that is not the checkout."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import minigpt

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("package")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, installed (without its dependencies, which this interpreter has) into a folder of its own."""
    pytest.importorskip("setuptools")
    work = tmp_path_factory.mktemp("package")
    source = work / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "minigpt", source / "minigpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=300,
                           cwd=work)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((work / "dist").glob("minigpt-*.whl"))
    target = work / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return wheel, target


def run_installed(target, *command, cwd):
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, never the checkout
    return subprocess.run(list(command), capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_the_wheel_holds_the_package_its_files_and_the_command(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("minigpt/__init__.py", "minigpt/cli.py", "minigpt/assets/gpt2/encoder.json",
                   "minigpt/assets/gpt2/vocab.bpe", "minigpt/studio/index.html", "minigpt/studio/studio.js"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "minigpt = minigpt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_import_and_the_command_work_from_another_folder(installed, tmp_path):
    _, target = installed
    result = run_installed(target, sys.executable, "-c",
                           "import minigpt; print(minigpt.__file__); print(minigpt.GPTModel.__module__); "
                           "print(minigpt.get_tokenizer('gpt2').encode('Hello, world'))", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    where, module, ids = result.stdout.splitlines()
    assert Path(where).is_relative_to(target) and module == "minigpt.model" and ids == "[15496, 11, 995]"
    command = target / "bin" / "minigpt"
    result = run_installed(target, sys.executable, str(command), "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--task" in result.stdout and "--show-probs" in result.stdout
    result = run_installed(target, sys.executable, "-m", "minigpt", "--epochs", "0", cwd=tmp_path)
    assert result.returncode == 2 and "error:" in result.stderr  # the same program, refusing the same way


def test_the_readmes_library_example_runs_on_the_installed_package(installed, tmp_path):
    _, target = installed
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## As a library", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    result = run_installed(target, sys.executable, "-c", example, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()  # after the run's own header and summary
    assert any(line.startswith("validation loss") for line in lines) and lines[-1].endswith("parameters")
    assert (tmp_path / "runs" / "library-demo" / "checkpoint.pt").is_file()


def test_every_public_name_resolves():
    for name in minigpt.__all__:
        assert getattr(minigpt, name) is not None, name
    with pytest.raises(AttributeError):
        minigpt.no_such_thing
