"""Every notebook in notebooks/ runs top to bottom in test size and shows what it promises.

Each one runs in a fresh Jupyter kernel (nbclient) that imports this checkout's
tx_jax, with TX_JAX_NOTEBOOK_SIZE=test, in a temporary working directory; a
cell that raises fails the test. The `summary` cell's JSON line carries the
numbers checked here.
"""

import json
import os
import subprocess
import sys

import pytest

from xla_flags import xla_flags

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def test_notebooks_match_their_generator():
  out = subprocess.run([sys.executable, os.path.join(NOTEBOOKS, "build.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith(".ipynb"):
      nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      nbformat.validate(nb)
      code = [c for c in nb.cells if c.cell_type == "code"]
      assert all(not c.outputs and c.execution_count is None for c in code), name
      assert "TX_JAX_NOTEBOOK_SIZE" in "".join(c.source for c in code), name
      assert "jax.default_backend()" in "".join(c.source for c in code), name
      install = code[0].source
      assert 'find_spec("tx_jax") is None' in install and "pip" in install, name


def execute(name, tmp_path, monkeypatch):
  """Runs notebooks/NAME in test size; returns (notebook with outputs, summary dict)."""
  # The kernel sees this checkout, one CPU device (notebook 04 asks for its own
  # 8 fake devices before importing JAX), and the tiny settings.
  monkeypatch.setenv("XLA_FLAGS", xla_flags())
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("TX_JAX_NOTEBOOK_SIZE", "test")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  summary_cell = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
  assert len(summary_cell) == 1
  text = "".join(o.get("text", "") for o in summary_cell[0].outputs if o.output_type == "stream")
  return nb, json.loads(text.strip().splitlines()[-1])


def outputs_of(nb, needle):
  """Outputs of the one code cell whose source contains `needle`."""
  cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  assert len(cells) == 1, needle
  return cells[0].outputs


def has_png(outputs):
  return any("image/png" in o.get("data", {}) for o in outputs)


def stdout(outputs):
  return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_01_pretrain_gpt(tmp_path, monkeypatch):
  nb, s = execute("01_pretrain_gpt.ipynb", tmp_path, monkeypatch)
  assert has_png(outputs_of(nb, "eval_curve = "))
  assert s["last_loss"] < s["first_loss"] - 0.5, s          # ~5.5 -> ~3.7 nats
  assert 0 < s["bits_per_byte"] < 8, s                       # below a uniform byte's 8 bits
  # Resumed (not restarted): the second run starts at the first run's last step.
  resumed = stdout(outputs_of(nb, "train_command(STEPS + "))
  assert f"resuming from step {s['first_run_steps']}" in resumed
  logged = s["logged_steps"]
  assert logged == sorted(set(logged)) and logged[-1] == s["final_step"] == 40, logged
  assert any(step > s["first_run_steps"] for step in logged)
  assert len(s["samples"]) == 3 and all(isinstance(t, str) and t for t in s["samples"])
  assert os.path.isdir(tmp_path / "runs" / "gpt" / "checkpoints" / "40")


@pytest.mark.slow
def test_02_mae_images(tmp_path, monkeypatch):
  nb, s = execute("02_mae_images.ipynb", tmp_path, monkeypatch)
  assert has_png(outputs_of(nb, "reconstructions/*.png"))
  assert has_png(outputs_of(nb, "analysis.tsne"))
  assert s["grid"].endswith("step_000040.png") and os.path.isfile(tmp_path / s["grid"])
  assert s["embeddings"] == [1797, 32]
  # Masked patches predicted better than by each patch's own mean.
  assert s["eval_loss"] < s["mean_predictor_loss"], s
  for key in ("linear_probe_accuracy", "knn_accuracy"):
    assert 0.15 < s[key] <= 1.0, s                           # ten classes: chance is 0.1
  assert 0 <= s["kmeans_nmi"] <= 1
  assert s["probes"]["raw pixels"]["linear_probe_accuracy"] > 0.9
  assert 0.15 < s["probes"]["MAE encoder"]["linear_probe_accuracy"] <= 1.0


@pytest.mark.slow
def test_03_social_topics(tmp_path, monkeypatch):
  nb, s = execute("03_social_topics.ipynb", tmp_path, monkeypatch)
  table = outputs_of(nb, "| cluster | posts |")
  assert any("text/markdown" in o.get("data", {}) for o in table)
  assert has_png(outputs_of(nb, 'filename=f"{OUT}/report/map.png"'))
  assert has_png(outputs_of(nb, 'filename=f"{PRE}/report/map.png"'))
  assert s["k"] == 4 and len(s["sizes"]) == 4 and all(size > 0 for size in s["sizes"])
  assert sum(s["sizes"]) == s["posts"] == s["assigned"] == 160
  assert all(len(terms) == 5 for terms in s["top_terms"])
  assert 0.05 < s["metrics"]["nmi"] <= 1, s                  # labels found above chance
  assert -1 <= s["metrics"]["silhouette"] <= 1
  md = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
  assert "tx-jax import" in md
  # The imported sentence encoder clusters the posts by package better than TF-IDF.
  assert s["pretrained_encoder"].endswith("runs/minilm")
  assert s["pretrained_metrics"]["nmi"] > s["tfidf_metrics"]["nmi"], s


@pytest.mark.slow
def test_04_use_in_your_project(tmp_path, monkeypatch):
  nb, s = execute("04_use_in_your_project.ipynb", tmp_path, monkeypatch)
  assert s["devices"] == 8 and s["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert s["pre_logits"] == [8, 64, 64] and s["block_00"] == [8, 64, 64]
  assert s["sharding_error"] < 1e-5
  for key in ("nnx_losses", "optax_losses"):
    losses = s[key]
    assert len(losses) == 30 and losses[-1] < 0.8 * losses[0], (key, losses)
  assert 0 < s["eval"]["bits_per_byte"] < 8
  assert has_png(outputs_of(nb, "two training loops"))
  shards = stdout(outputs_of(nb, "parallel.logical_shardings"))
  assert "P('fsdp', 'tensor')" in shards and "shard (32, 128)" in shards


@pytest.mark.slow
def test_05_transfer_and_generation(tmp_path, monkeypatch):
  nb, s = execute("05_transfer_and_generation.ipynb", tmp_path, monkeypatch)
  assert s["loaded"] > 0 and s["new"] > 0                      # body loaded, head new
  assert 0 <= s["accuracy"] <= 1 and 0 <= s["macro_f1"] <= 1
  assert s["vae_kl"] >= 0 and s["gan_fid"] > 0
  assert s["samples"][0] == 16 and s["samples"][1:3] == [8, 8]
  assert 0 <= s["pixel_range"][0] <= s["pixel_range"][1] <= 1
  interpolation = outputs_of(nb, "--interpolate")
  lines = "".join(o.get("text", "") for o in interpolation if o.output_type == "stream")
  assert lines.count("\n") >= 5, lines
  assert has_png(outputs_of(nb, "confusion/*.png")) and has_png(outputs_of(nb, "gan_samples.png"))
