"""The README's commands run as written.

Every ```bash block preceded by a `<!-- tested -->` line is run one command at
a time (lines split on `&&`, `#` comments dropped) in a scratch directory that
holds `configs/` and a small `posts.csv`, in the block's order. The only change
to a command, as the README says: `--config.train.steps=2` is appended to
`tx-jax train`, `--steps 2` to `tx-jax topics` and `tx-jax benchmark`.
`pip install`, `python -m pytest` and `python benchmarks/...` lines are left
out. The Python block under "Use as a library" runs too.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- tested -->"
SHORTEN = {"train": ["--config.train.steps=2"], "topics": ["--steps", "2"],
           "benchmark": ["--steps", "2"]}


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def marked_blocks(text: str) -> dict[str, list[list[str]]]:
  """{section heading: commands (argv lists)} of the marked ```bash blocks."""
  blocks, heading, lines = {}, None, text.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("## "):
      heading = line[3:].strip()
    if line.strip() != MARKER:
      continue
    assert lines[i + 1].strip() == "```bash", f"line {i + 1}: {MARKER} must precede ```bash"
    end = lines.index("```", i + 2)
    commands = []
    for source in lines[i + 2:end]:
      argv = shlex.split(source, comments=True)
      while argv:
        cut = argv.index("&&") if "&&" in argv else len(argv)
        commands.append(argv[:cut])
        argv = argv[cut + 1:]
    assert heading not in blocks
    blocks[heading] = commands
  return blocks


def runnable(argv: list[str]) -> bool:
  return not (argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]
              or (argv[0] == "python" and argv[1].startswith("benchmarks/")))


def shortened(argv: list[str]) -> list[str]:
  return argv + SHORTEN.get(argv[1], []) if argv[0] == "tx-jax" else argv


BLOCKS = marked_blocks(_readme())


def test_marked_blocks_are_found_and_hold_the_documented_commands():
  assert set(BLOCKS) >= {"Quickstart", "BERT and T5: masked LM, span corruption, seq2seq",
                         "Masked autoencoders on images (ViT + MAE)",
                         "Embeddings, clusters and topics"}
  commands = [" ".join(c[:2]) for block in BLOCKS.values() for c in block if runnable(c)]
  for name in ("train", "eval", "generate", "embed", "analyze", "topics", "benchmark"):
    assert f"tx-jax {name}" in commands, name
  # Nothing a reader could not type: no [optional] or a|b synopsis in a tested block.
  for block in BLOCKS.values():
    for argv in filter(runnable, block):
      assert not any(re.fullmatch(r"\[.*|.*\]|\w+\|\w+.*", a) for a in argv), argv


@pytest.fixture
def scratch(tmp_path):
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  from tx_jax.data import stdlib_docstrings
  texts, labels = stdlib_docstrings()
  with open(tmp_path / "posts.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for text, label in list(zip(texts, labels))[::5]:   # 431 posts, 18 packages
      writer.writerow([" ".join(text.split()), label])
  return tmp_path


def _env():
  env = dict(os.environ, XLA_FLAGS=xla_flags())   # one CPU device
  env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  return env


def run(argv, cwd, timeout=900):
  if argv[0] == "tx-jax" and shutil.which("tx-jax") is None:
    argv = [sys.executable, "-m", "tx_jax"] + argv[1:]   # the same, per the README
  out = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-3000:]}"
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.stdout


def check_output(argv, stdout, cwd):
  """What each kind of command promises besides exiting 0."""
  kind = argv[1] if argv[0] == "tx-jax" else None
  last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
  if kind in ("eval", "embed", "analyze", "benchmark"):
    record = json.loads(last)
    if kind == "eval":
      assert record["step"] == 2 and any(k.startswith("eval/loss") for k in record), record
  if kind == "generate":
    assert stdout.strip(), "generate printed nothing"
  if kind == "train":
    workdir = argv[argv.index("--workdir") + 1]
    assert os.path.isdir(os.path.join(cwd, workdir, "checkpoints", "2"))
  if "--out" in argv:
    assert os.path.exists(os.path.join(cwd, argv[argv.index("--out") + 1]))
  if kind == "topics":
    out = os.path.join(cwd, argv[argv.index("--out") + 1])
    with open(os.path.join(out, "report", "report.json")) as f:
      assert json.load(f)["k"] == int(argv[argv.index("--k") + 1])


@pytest.mark.slow
@pytest.mark.parametrize("heading", sorted(BLOCKS))
def test_readme_block_runs_as_written(heading, scratch):
  commands = [c for c in BLOCKS[heading] if runnable(c)]
  assert commands
  for argv in commands:
    argv = shortened(argv)
    check_output(argv, run(argv, scratch), scratch)


def test_library_example_runs():
  text = _readme()
  section = text[text.index("## Use as a library"):]
  start = section.index("```python\n") + len("```python\n")
  code = section[start:section.index("\n```", start)]
  check = '\nprint(tuple(logits.shape), tuple(out["pre_logits"].shape))\n'
  out = subprocess.run([sys.executable, "-c", code + check], env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "(2, 16, 1024) (2, 16, 128)"
