"""Docs that run: the code blocks of README.md and docs/*.md marked runnable are run, in
document order, so a stale snippet fails CI.

A block is marked by an HTML comment on the line before its fence (invisible on GitHub):

    <!-- runnable -->
    ```bash
    python -m experiments.fit --config experiments/configs/demo.yaml
    ```

Marked fences must be `bash` or `python`. The blocks of one document share a sandbox: a
working directory whose `casa/ data/ experiments/ callbacks/ tests/ docs/` are the
repository's, with its own `runs/`, so a block can use what an earlier block wrote (a
checkpoint, an export). The tiny settings are substituted, never written in the docs:

- every `python -m experiments.fit` command gets `--config tests/configs/tiny.yaml` after its
  last `--config` (the tiny model and synthetic set; the command's own dotted overrides still
  win), and its `--trainer.max_steps N` / `--trainer.val_check_interval N` become 2;
- `runs/demo-synth` and `runs/test-synth` are the tiny synthetic benchmark (tests/configs/tiny.yaml's).

bash blocks run through `bash -euo pipefail` (a timeout each), with this interpreter first on
PATH; python blocks run in this process (the imports are paid once), in the sandbox.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^\s*<!--\s*runnable\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
LANGUAGES = ("bash", "python")
TIMEOUT_S = 600
TINY = "tests/configs/tiny.yaml"


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks of a Markdown file marked `<!-- runnable -->`, in order. ValueError for a marker
    not followed by a bash/python fence (a typo would otherwise skip the block silently)."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not MARK.match(line):
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None or fence.group(2) not in LANGUAGES:
            raise ValueError(f"{path}:{i + 1}: <!-- runnable --> must precede a ```bash or ```python fence, "
                             f"not {lines[i + 1] if i + 1 < len(lines) else 'the end of the file'!r}")
        indent, body = fence.group(1), []
        for j in range(i + 2, len(lines)):
            if lines[j].strip() == "```":
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
        else:
            raise ValueError(f"{path}:{i + 2}: the runnable block is never closed")
        blocks.append(Block(path, i + 2, fence.group(2), "\n".join(body) + "\n"))
    return blocks


def tiny_bash(code: str) -> str:
    """The command text with the tiny settings substituted (see the module docstring)."""
    code = code.replace("\\\n", " ")  # one line per command
    out = []
    for line in code.splitlines():
        if re.search(r"\bpython -m experiments\.fit\b", line):
            configs = list(re.finditer(r"--config[ =]\S+", line))
            at = configs[-1].end() if configs else re.search(r"experiments\.fit\b", line).end()
            line = f"{line[:at]} --config {TINY}{line[at:]}"
            line = re.sub(r"--trainer\.(max_steps|val_check_interval)[ =]\d+", r"--trainer.\1 2", line)
        out.append(line)
    return "\n".join(out) + "\n"


def test_runnable_blocks_are_extracted_with_their_language_and_place(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- runnable -->\n```bash\necho a\n```\n```bash\necho not marked\n```\n"
                   "1. item\n   <!-- runnable -->\n   ```python\n   print(1)\n   ```\n")
    assert [(b.line, b.lang, b.code) for b in runnable_blocks(doc)] == [(3, "bash", "echo a\n"),
                                                                        (11, "python", "print(1)\n")]
    doc.write_text("<!-- runnable -->\n```\nls\n```\n")
    with pytest.raises(ValueError, match="must precede a ```bash or ```python fence"):
        runnable_blocks(doc)


def test_fit_commands_get_the_tiny_config_after_their_own():
    code = ("python -m experiments.fit --config a.yaml \\\n    --config b.yaml --trainer.max_steps 30\n"
            "python -m experiments.export --ckpt x --out y\n")
    assert tiny_bash(code) == (f"python -m experiments.fit --config a.yaml      --config b.yaml --config {TINY} "
                               "--trainer.max_steps 2\npython -m experiments.export --ckpt x --out y\n")


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    """The tiny synthetic benchmark, generated once (shared with tests/test_configs.py's runs)."""
    from data.synth import ensure_synth

    shared = tmp_path_factory.getbasetemp().parent / "test-synth"
    s = yaml.safe_load((ROOT / TINY).read_text())["synth"]
    ensure_synth(shared, s.get("seed", 0), s["train"], s["val"], s["test"], s["tasks"], progress=False)
    return shared


def _sandbox(tmp_path: Path, synth: Path) -> Path:
    box = tmp_path / "sandbox"
    (box / "runs").mkdir(parents=True)
    for name in ("casa", "data", "experiments", "callbacks", "tests", "docs"):
        (box / name).symlink_to(ROOT / name, target_is_directory=True)
    for name in ("demo-synth", "test-synth"):
        (box / "runs" / name).symlink_to(synth, target_is_directory=True)
    return box


def _run_bash(block: Block, box: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("CASA_TRACEBACK", None)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", tiny_bash(block.code)], cwd=box, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{block} failed (exit {r.returncode}):\n{block.code}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _run_python(block: Block, box: Path, monkeypatch) -> None:
    monkeypatch.chdir(box)
    code = compile(block.code, str(block), "exec")
    try:
        exec(code, {"__name__": "__main__"})
    except Exception as e:
        raise AssertionError(f"{block} raised {type(e).__name__}: {e}\n{block.code}") from e


DOCUMENTED = [p for p in DOCS if runnable_blocks(p)]


def test_the_readme_has_runnable_blocks():
    assert ROOT / "README.md" in DOCUMENTED


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[p.name for p in DOCUMENTED])
def test_runnable_blocks_run(doc, tmp_path, tiny_synth, monkeypatch, capsys):
    box = _sandbox(tmp_path, tiny_synth)
    monkeypatch.setattr(sys, "argv", ["docs"])  # LightningCLI in a block must not read pytest's argv
    for block in runnable_blocks(doc):
        if block.lang == "bash":
            _run_bash(block, box)
        else:
            _run_python(block, box, monkeypatch)
