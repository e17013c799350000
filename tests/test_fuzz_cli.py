"""Property-based fuzzing of every command: hostile config overrides, data files and flags.

Each generated case runs `tx_jax.cli.main(argv)` in this process and must end
with exit 0, 2 (bad input) or 3 (I/O failure), or reach the first `jax.jit`
(a valid case that would start compiling: `jax.jit` is replaced by a function
that raises `WouldCompile`, so nothing is compiled here). No traceback, at most
3 stderr lines for an error, the last one `tx-jax: error: ...`, and the
trained workdir stays byte-identical whenever a case fails. The example counts
sum to well over 1,000 cases; TX_JAX_FUZZ_SCALE multiplies them.
"""

import contextlib
import os
import shutil
import string

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tx_jax import cli
from tx_jax.train import config as config_lib
from tx_jax.train import metrics as metrics_lib

from test_bad_inputs import GPT, ROOT, TINY, run_main, tree_digest

SCALE = float(os.environ.get("TX_JAX_FUZZ_SCALE", "1"))
CONFIGS = {name: os.path.join(ROOT, "configs", f"{name}.py")
           for name in ("gpt", "bert", "t5", "mae", "contrastive")}


def fuzz_settings(n):
  return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))


class WouldCompile(Exception):
  """A valid case reached jax.jit: everything before compiling checked out."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run, trained before jax.jit is taken away."""
  workdir = str(tmp_path_factory.mktemp("fuzz_trained") / "run")
  assert run_main(["train", "--config", GPT, "--workdir", workdir, *TINY]) == 0
  return workdir


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory):
  """The trained workdir (and its digest), a small .npz, and jax.jit that refuses."""
  base = tmp_path_factory.mktemp("fuzz")
  rng = np.random.default_rng(0)
  np.savez(base / "emb.npz", embeddings=rng.normal(size=(24, 3)).astype(np.float32),
           ids=np.arange(24), labels=np.arange(24) % 3)
  (base / "docs.txt").write_text("\n".join(f"doc {i} about {'abc'[i % 3]}" for i in range(40)))
  patch = pytest.MonkeyPatch()

  def refuse(*args, **kwargs):
    raise WouldCompile
  # Functions jitted when their module was imported (earlier in the suite) refuse too.
  from tx_jax import generate  # pylint: disable=g-import-not-at-top
  patch.setattr(jax, "jit", refuse)
  for name in ("sample", "greedy_decode", "beam_search"):
    patch.setattr(generate, name, refuse)
  patch.setattr(metrics_lib, "measure_peak_flops", lambda *a, **k: 1e12)
  yield {"trained": trained, "digest": tree_digest(trained), "base": base,
         "counter": [0]}
  patch.undo()


def run_case(world, capfd, argv, workdir=None):
  """Runs one case; asserts the contract; returns the exit status or 'compile'."""
  world["counter"][0] += 1
  capfd.readouterr()
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  except WouldCompile:
    code = "compile"
  out, err = capfd.readouterr()
  lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not
           l.startswith(("train:", "embed:", "eval:"))]
  assert "Traceback" not in out + err, (argv, err[-3000:])
  assert code in (0, 2, 3, "compile"), (argv, code, err[-2000:])
  if code in (2, 3):
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("tx-jax: error: "), (argv, lines)
    trained = world["trained"]
    if os.path.isdir(trained) and tree_digest(trained) != world["digest"]:
      raise AssertionError(f"{argv} changed the trained workdir")
  if code == "compile" and workdir == world["trained"]:
    restore(world)  # a valid resume may rewrite config.json and logs: start again clean
  return code


def restore(world):
  """Puts the trained workdir back (a valid resume case may have written run records)."""
  backup = world["trained"] + ".backup"
  if not os.path.isdir(backup):
    raise AssertionError("no backup of the trained workdir")
  shutil.rmtree(world["trained"])
  shutil.copytree(backup, world["trained"])


@pytest.fixture(scope="module", autouse=True)
def backup(trained):
  shutil.copytree(trained, trained + ".backup")
  yield


# --- Strategies ------------------------------------------------------------------------------

def flat_keys(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


KEYS = {name: sorted(flat_keys(config_lib.load_config_file(path)))
        for name, path in CONFIGS.items()}
HOSTILE = ["-1", "0", "1", "-0", "2", "3", "7", "1e999", "-1e999", "nan", "NaN", "inf", "-inf",
           "1e308", "1e-320", "2**64", str(2**63), str(2**31), "99999999999999999999999", "",
           " ", "[]", "{}", "()", "None", "True", "false", "'x'", "\"x\"", "1.5", "0.0", "-0.5",
           "ü", "\u202e", "日本語", "\ud800", "x" * 300, "file:", "byte", "spm-train:0",
           "spm-train:-5", "spm-train:x", "embedded:", "tfds:", "float16", "bfloat16",
           "int8", "fsdp_tp", "none", "full", "[1, 2]", "lambda: 0", "__import__('os')",
           "0x10", "1_000", "+5", "١٢"]
values = st.one_of(st.sampled_from(HOSTILE), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(max_size=12))


def overrides_for(name):
  keys = st.one_of(st.sampled_from(KEYS[name]),
                   st.sampled_from(KEYS[name]).map(lambda k: k + ".x"),
                   st.text(string.ascii_letters + "._", min_size=0, max_size=12))
  return st.lists(st.tuples(keys, values), min_size=1, max_size=3)


# --- Config overrides ----------------------------------------------------------------------------

@fuzz_settings(450)
@given(overrides=overrides_for("gpt"), resume=st.booleans())
def test_fuzz_gpt_overrides(world, capfd, tmp_path_factory, overrides, resume):
  workdir = world["trained"] if resume else str(tmp_path_factory.mktemp("o") / "wd")
  argv = ["train", "--config", GPT, "--workdir", workdir, *TINY,
          *[f"--config.{k}={v}" for k, v in overrides]]
  code = run_case(world, capfd, argv, workdir)
  if not resume and code != "compile":
    assert not os.path.exists(workdir), argv  # a failed first run leaves nothing


@fuzz_settings(150)
@given(name=st.sampled_from(["bert", "t5", "mae", "contrastive"]), data=st.data())
def test_fuzz_other_config_overrides(world, capfd, tmp_path_factory, name, data):
  overrides = data.draw(overrides_for(name))
  workdir = str(tmp_path_factory.mktemp("c") / "wd")
  argv = ["train", "--config", CONFIGS[name], "--workdir", workdir,
          *[f"--config.{k}={v}" for k, v in overrides]]
  run_case(world, capfd, argv, workdir)


# --- Data files ------------------------------------------------------------------------------------

def csv_text(rows):
  return "\n".join(",".join(r) for r in rows)


file_bodies = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"\x00\n")),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.lists(st.sampled_from(["text", "label", "", "\"", "a\"b", "\"x", "1",
                                       "a,b", "\"q,\"\"\"", "\r", "ü"]), max_size=4),
             max_size=6).map(lambda rows: csv_text(rows).encode()),
    st.lists(st.sampled_from(['{"text": "a"}', '{"text": 1}', '{"text": "b", "label": [1]}',
                              '{"text": "c", "label": "x"}', '[1]', '{"text"', 'null', '"s"',
                              '{"label": 1}', '', '{"text": "\\ud800"}', '{"text": ""}',
                              '\ufeff{"text": "bom"}']),
             max_size=6).map(lambda lines: "\n".join(lines).encode()))
extensions = st.sampled_from([".txt", ".jsonl", ".csv", ".md", ".rst", "", ".dat", ".txt.gz",
                              ".jsonl.gz", ".csv.gz", ".zst", ".parquet", ".JSONL", ".gz"])


@fuzz_settings(300)
@given(body=file_bodies, ext=extensions, policy=st.sampled_from(["error", "replace", "skip"]),
       layout=st.sampled_from(["plain", "deep", "loop", "dangling", "dir", "gz_raw"]))
def test_fuzz_data_files(world, capfd, tmp_path_factory, body, ext, policy, layout):
  d = tmp_path_factory.mktemp("f")
  path = d / f"data{ext}"
  if layout == "deep":
    deep = d.joinpath(*["d" * 50] * 30)
    deep.mkdir(parents=True)
    path = deep / f"data{ext}"
  if layout == "loop":
    os.symlink(d / f"other{ext}", path)
    os.symlink(path, d / f"other{ext}")
  elif layout == "dangling":
    os.symlink(d / "gone", path)
  elif layout == "dir":
    path.mkdir()
  elif ext.endswith(".gz") and layout != "gz_raw":
    import gzip
    path.write_bytes(gzip.compress(body))
  else:
    path.write_bytes(body)
  workdir = str(d / "wd")
  argv = ["train", "--config", GPT, "--workdir", workdir, *TINY,
          f"--config.data.source=file:{path}", "--config.data.eval_source=",
          f"--config.data.invalid_utf8={policy}"]
  code = run_case(world, capfd, argv, workdir)
  if code != "compile":
    assert not os.path.exists(workdir)


# --- Flags of every command -----------------------------------------------------------------------

text_args = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20))
int_args = st.one_of(st.integers(-10, 40).map(str), st.sampled_from(HOSTILE))


def maybe(flag, strategy):
  return st.one_of(st.just([]), strategy.map(lambda v: [flag, v]))


def flags(*pairs):
  return st.tuples(*[maybe(f, s) for f, s in pairs]).map(lambda parts: sum(parts, []))


@fuzz_settings(60)
@given(extra=flags(("--data", text_args), ("--frob", text_args)))
def test_fuzz_eval_flags(world, capfd, extra):
  run_case(world, capfd, ["eval", "--workdir", world["trained"], *extra])


@fuzz_settings(60)
@given(prompt=text_args, extra=flags(("--max-new-tokens", int_args), ("--temperature", text_args),
                                     ("--top-k", int_args), ("--top-p", text_args),
                                     ("--num-samples", int_args), ("--beam-size", int_args),
                                     ("--seed", int_args), ("--length-penalty", text_args)))
def test_fuzz_generate_flags(world, capfd, prompt, extra):
  run_case(world, capfd, ["generate", "--workdir", world["trained"], "--prompt", prompt, *extra])


@fuzz_settings(60)
@given(data_spec=st.one_of(text_args, st.just("file:{docs}")), out=text_args,
       extra=flags(("--layer", text_args), ("--pooling", text_args), ("--batch-size", int_args),
                   ("--seq-len", int_args), ("--sample", int_args)))
def test_fuzz_embed_flags(world, capfd, tmp_path_factory, data_spec, out, extra):
  d = tmp_path_factory.mktemp("e")
  out_path = str(d / (out.replace("/", "_").replace("\x00", "") or "x"))
  if len(out) % 2:
    out_path += ".npz"
  data_spec = data_spec.format(docs=world["base"] / "docs.txt") if data_spec == "file:{docs}" \
      else data_spec
  run_case(world, capfd, ["embed", "--workdir", world["trained"], "--data", data_spec, "--out",
                          out_path, *extra])


@fuzz_settings(40)
@given(emb=st.sampled_from(["good", "missing", "text", "empty"]),
       extra=flags(("--method", st.sampled_from(["kmeans", "dbscan", "spectral",
                                                 "agglomerative", "x", ""])),
                   ("--k", int_args), ("--k-min", int_args), ("--k-max", int_args),
                   ("--reduce", st.sampled_from(["pca", "x", ""])),
                   ("--normalize", text_args), ("--eps", text_args),
                   ("--min-samples", int_args), ("--examples", int_args), ("--seed", int_args)))
def test_fuzz_analyze_flags(world, capfd, tmp_path_factory, emb, extra):
  d = tmp_path_factory.mktemp("a")
  path = {"good": world["base"] / "emb.npz", "missing": d / "none.npz"}.get(emb, d / "e.npz")
  if emb == "text":
    path.write_text("not an npz")
  elif emb == "empty":
    path.write_bytes(b"")
  if "--reduce" not in extra:
    extra = [*extra, "--reduce", "pca"]  # t-SNE is slow; pca keeps the cases short
  run_case(world, capfd, ["analyze", "--embeddings", str(path), "--out", str(d / "r"), *extra])


@fuzz_settings(60)
@given(data_spec=st.one_of(text_args, st.just("docs")), vocab=int_args, out=text_args)
def test_fuzz_tokenizer_flags(world, capfd, tmp_path_factory, data_spec, vocab, out):
  d = tmp_path_factory.mktemp("t")
  if data_spec == "docs":
    data_spec = f"file:{world['base'] / 'docs.txt'}"
  prefix = str(d / (out.replace("/", "_").replace("\x00", "") or "spm"))
  run_case(world, capfd, ["tokenizer", "--data", data_spec, "--vocab-size", vocab, "--out",
                          prefix])


@fuzz_settings(60)
@given(data_spec=st.one_of(text_args, st.just("docs")),
       extra=flags(("--steps", int_args), ("--vocab-size", int_args),
                   ("--objective", st.sampled_from(["contrastive", "causal_lm", "masked_lm", "x"])),
                   ("--layer", text_args), ("--pooling", text_args), ("--k", int_args),
                   ("--seq-len", int_args), ("--sample", int_args)))
def test_fuzz_topics_flags(world, capfd, tmp_path_factory, data_spec, extra):
  d = tmp_path_factory.mktemp("p")
  if data_spec == "docs":
    data_spec = f"file:{world['base'] / 'docs.txt'}"
  if "--vocab-size" not in extra:
    extra = [*extra, "--vocab-size", "0"]  # byte tokens: no tokenizer training per case
  run_case(world, capfd, ["topics", "--data", data_spec, "--out", str(d / "out"), *extra])


@fuzz_settings(60)
@given(config=st.one_of(st.sampled_from([GPT, GPT + ":tiny", GPT + ":huge", GPT + ":",
                                         CONFIGS["mae"], "configs/none.py", "", ROOT]),
                        text_args),
       steps=int_args, overrides=overrides_for("gpt"))
def test_fuzz_benchmark_and_train_flags(world, capfd, tmp_path_factory, config, steps,
                                        overrides):
  over = [*TINY, *[f"--config.{k}={v}" for k, v in overrides]]
  run_case(world, capfd, ["benchmark", "--config", config, "--steps", steps, *over])
  workdir = str(tmp_path_factory.mktemp("b") / "wd")
  run_case(world, capfd, ["train", "--config", config, "--workdir", workdir, *over,
                          *(["--num-processes", steps] if len(over) > 1 else [])], workdir)
