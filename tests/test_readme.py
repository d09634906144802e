"""README.md's code works as written: its quick blocks run, and its links point at files.

Every fenced ``python`` and ``bash`` block runs, from the checkout's root, without network
access to a model hub (``HF_HUB_OFFLINE=1``, empty torch hub and Hugging Face caches), unless
an HTML comment right above it says ``<!-- skip-test: REASON -->`` (installs, the whole suite;
``.ci/run`` runs the install lines and the quickstart as printed); those are reported as
skipped with their reason. A block marked ``<!-- offline-error: REASON -->`` needs weights
from a hub: it must fail, and its error must print a constructor line that works offline. Under
``D2SM_TEST_INSTALLED=1`` the blocks run in a directory that mirrors the checkout without its
``d2sm_loss/``, so that they import the installed wheel, as the rest of the suite does;
otherwise the checkout is on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from d2sm_loss.weights import installed_weight_packages

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->")
OFFLINE_ERROR = re.compile(r"<!--\s*offline-error:\s*(.*?)\s*-->")


@dataclass
class Block:
    language: str
    code: str
    line: int
    skip: str | None
    offline_error: str | None = None
    marks: tuple[str, ...] = ()


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        # the HTML comments between the previous non-comment line and the fence
        above = text[: match.start()].rstrip("\n").split("\n")
        comments = []
        while above and above[-1].strip().startswith("<!--"):
            comments.append(above.pop())
        reasons = [m.group(1) for c in comments if (m := SKIP.search(c))]
        offline = [m.group(1) for c in comments if (m := OFFLINE_ERROR.search(c))]
        line = text.count("\n", 0, match.start()) + 1
        marks = tuple(c.strip()[4:-3].strip() for c in comments)
        blocks.append(
            Block(
                match.group(1), match.group(2), line, reasons[0] if reasons else None,
                offline[0] if offline else None, marks,
            )
        )
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.language in ("python", "bash")]
#: The docs site's landing page shows a runnable example too.
LANDING = REPO / "docs" / "index.md"
LANDING_BLOCKS = [b for b in readme_blocks(LANDING.read_text()) if b.language == "python"]


def test_the_parser_sees_the_blocks_and_their_markers():
    text = "a\n<!-- skip-test: slow -->\n<!-- other -->\n```bash\nsleep 99\n```\n\n```python\nprint(1)\n```\n"
    slow, quick = readme_blocks(text)
    assert (slow.language, slow.code, slow.line, slow.skip) == ("bash", "sleep 99\n", 4, "slow")
    assert (quick.language, quick.code, quick.line, quick.skip) == ("python", "print(1)\n", 8, None)
    assert len(BLOCKS) >= 5 and any(b.skip is None for b in BLOCKS)


def test_the_development_section_names_one_test_command():
    """`.ci/run` runs the line after ``<!-- test-command -->`` as written."""
    lines = README.read_text().split("\n")
    marks = [i for i, line in enumerate(lines) if line.strip() == "<!-- test-command -->"]
    assert len(marks) == 1
    fence, command, end = lines[marks[0] + 1 : marks[0] + 4]
    assert (fence, end) == ("```bash", "```")
    assert command.startswith("pytest ") and "python -m pytest" not in command
    for path in command.split()[1:]:
        if not path.startswith("-"):
            assert (REPO / path).is_dir(), f"the test command names {path}, which is not a folder"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The checkout, or under D2SM_TEST_INSTALLED=1 a mirror of it without d2sm_loss/."""
    if os.environ.get("D2SM_TEST_INSTALLED") != "1":
        return REPO
    mirror = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in ("d2sm_loss", ".git", ".venv"):
            (mirror / entry.name).symlink_to(entry)
    return mirror


@pytest.mark.parametrize(
    "block",
    BLOCKS + LANDING_BLOCKS,
    ids=[f"line{b.line}-{b.language}" for b in BLOCKS] + [f"docs-index-line{b.line}" for b in LANDING_BLOCKS],
)
def test_readme_block_runs(block, workdir, tmp_path):
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    if block.language == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        # `python` in the block is this interpreter (the one whose environment is being tested)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    env = {**os.environ, "PATH": path} if block.language == "bash" else dict(os.environ)
    env.pop("PYTHONPATH", None)
    if workdir == REPO:  # the checkout is what this run tests: blocks import it too
        env["PYTHONPATH"] = str(REPO)
    # no model hub: offline, with empty caches (an earlier download must not make a block pass)
    env.update(
        HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
    )
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if block.offline_error:
        assert result.returncode != 0, f"README.md line {block.line} ran offline; drop its offline-error mark"
        assert "could not download pretrained weights" in result.stderr, result.stderr[-2000:]
        if installed_weight_packages():  # a line that works, with a package installed here
            working = r"SemanticStatisticsLoss\('[\w.]+', checkpoint='package:[\w.-]+'\)"
            assert re.search(working, result.stderr.splitlines()[-1]), result.stderr[-2000:]
        return
    assert result.returncode == 0, (
        f"README.md line {block.line} ({block.language}) failed:\n{block.code}\n"
        f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    )


def test_readme_links_point_at_files():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "no local links found"
    missing = [link for link in local if link and not (REPO / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _block_after(mark: str) -> Block:
    (block,) = [b for b in readme_blocks(README.read_text()) if mark in b.marks]
    return block


def _pip_lines(block: Block) -> list[list[str]]:
    """The ``pip install`` lines of a block, as argument lists without comments."""
    return [line.split("#")[0].split()[2:] for line in block.code.splitlines() if line.startswith("pip install")]


def test_the_ci_installs_what_the_readme_prints():
    """.ci/run runs the development block's pip lines (the wheel for ``-e .``), which hold
    everything the user's install block installs."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_block dev-install" in ci and "readme_block ci-quickstart" in ci
    user, dev = _pip_lines(_block_after("user-install")), _pip_lines(_block_after("dev-install"))
    assert dev and dev[0][:1] == ["-e"], dev

    def extras(args: list[str]) -> set[str]:
        (spec,) = [a.strip('"') for a in args if a.strip('"').startswith(".[")]
        return set(spec[2:-1].split(","))

    assert extras([a for line in user for a in line]) <= extras(dev[0])
    no_deps = lambda lines: {a for line in lines if "--no-deps" in line for a in line if a != "--no-deps"}  # noqa: E731
    assert no_deps(user) <= no_deps(dev)
    assert _block_after("ci-quickstart").code.strip() == "python examples/quickstart.py"
