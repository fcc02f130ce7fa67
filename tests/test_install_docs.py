"""The documented install lines keep torch at the Makefile's pin (issue #29): an unpinned install of an extra lets pip
replace the local CPU torch with a multi-GB CUDA build. Nothing is installed or downloaded here: the Makefile is read
and dry-run (``make -n``), the docs are parsed."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def torch_pin() -> str:
    match = re.search(r"^TORCH_PIN\s*:=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile defines no TORCH_PIN"
    return match.group(1)


def code_lines(text: str) -> list[str]:
    """Every line of a fenced code block and every inline code span of a Markdown text."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
        else:
            lines += re.findall(r"`([^`]+)`", line)
    return lines


def test_the_pin_is_one_exact_torch_version():
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", torch_pin())


@pytest.mark.parametrize("target", ["hf", "test", "demo"])
def test_every_package_install_of_a_make_target_names_the_pin(target, tmp_path):
    # make runs this suite (`make test`), so it is there. -n: print the commands without running them;
    # -B: as on a fresh machine, every step (no .venv stamp counts)
    commands = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, check=True).stdout
    installs = [line for line in commands.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs, f"make {target} installs nothing?\n{commands}"
    for line in installs:
        assert line.split()[0].startswith(".venv/bin/"), f"make {target} installs outside .venv: {line}"
        assert torch_pin() in line, f"make {target} installs without {torch_pin()}: {line}"


def test_the_readme_sets_the_hugging_face_path_up_with_make_hf():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^hf:", makefile, re.MULTILINE), "the Makefile has no hf target"
    readme = (ROOT / "README.md").read_text()
    hf_section = readme.split("### A pretrained Hugging Face encoder", 1)[1].split("\n### ", 1)[0]
    assert "make hf" in code_lines(hf_section)[0], "the Hugging Face section's first command is not `make hf`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_no_documented_pip_install_of_an_extra_leaves_torch_unpinned(doc):
    for line in code_lines(doc.read_text()):
        if re.search(r"pip install\b.*\[", line):  # an extra: transformers, onnxscript... may swap torch
            assert torch_pin().split("==")[0] + "==" in line, f"{doc.name}: {line.strip()!r} does not pin torch"
