"""T5 span corruption and seq2seq data: noise statistics, sentinel layout, packing, metrics, CLI."""

import collections
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tx_jax import cli
from tx_jax.data import pairs, sources, tokenizers
from tx_jax.data import span_corruption as span_data
from tx_jax.data.masking import (corrupt_spans, noise_counts, random_spans_noise_mask,
                                 span_corruption_lengths)
from tx_jax.errors import UserError
from tx_jax.objectives.span_corruption import exact_matches

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizers.ByteTokenizer(span_data.t5_specials(20))  # <pad> 256, </s> 257, sentinels 258..
PAD, EOS = 256, 257
SENTINELS = np.arange(258, 278, dtype=np.int32)


def test_lengths_follow_t5():
  # T5's published setting: 512 inputs <- 568 raw tokens, 114 targets.
  assert span_corruption_lengths(512) == (568, 114)
  # 141 raw tokens: 21 noise in 7 spans -> 120 kept + 7 sentinels + EOS = 128; 21 + 7 + 1 = 29.
  assert span_corruption_lengths(128) == (141, 29)
  rng = np.random.default_rng(0)
  for inputs_len in (32, 128, 512):
    raw, targets_len = span_corruption_lengths(inputs_len)
    tokens = rng.integers(0, 256, raw).astype(np.int32)
    noise = random_spans_noise_mask(1, raw, rng)[0]
    inputs, targets = corrupt_spans(tokens, noise, np.arange(1000, 1100, dtype=np.int32), EOS)
    assert (len(inputs), len(targets)) == (inputs_len, targets_len)   # full pieces fill rows
    # Shorter pieces never overflow either side.
    for n in range(2, raw):
      num_noise, spans = noise_counts(n, 0.15, 3.0)
      assert n - num_noise + spans + 1 <= inputs_len and num_noise + spans + 1 <= targets_len


def _composition_pmf(k, total, parts):
  """P(a given part = k) for a uniformly random composition of total into parts."""
  return math.comb(total - k - 1, parts - 2) / math.comb(total - 1, parts - 1)


def test_noise_mask_statistics_over_10k_rows():
  rows, n = 10_000, 141
  mask = random_spans_noise_mask(rows, n, np.random.default_rng(0))
  # Exactly round(0.15 n) noise tokens per row, in round(noise / 3) spans.
  assert (mask.sum(1) == 21).all()
  starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
  assert (starts.sum(1) == 7).all()
  assert not mask[:, 0].any() and mask[:, -1].all()   # kept tokens first, noise last
  # Span lengths: mean 3, and distributed like a uniform composition of 21 into 7.
  ends = mask & ~np.pad(mask, ((0, 0), (0, 1)))[:, 1:]
  lengths = np.flatnonzero(ends.ravel()) - np.flatnonzero(starts.ravel()) + 1
  assert lengths.size == rows * 7 and lengths.mean() == 3.0
  for k in range(1, 6):
    p = _composition_pmf(k, 21, 7)
    assert abs((lengths == k).mean() - p) <= 4 * np.sqrt(p * (1 - p) / lengths.size), k
  # Gaps (kept runs) likewise: 120 kept tokens in 7 runs.
  kept_starts = ~mask & np.pad(mask, ((0, 0), (1, 0)), constant_values=True)[:, :-1]
  first_gap = np.argmax(mask, axis=1)   # the run before the first span
  p1 = _composition_pmf(1, 120, 7)
  assert (kept_starts.sum(1) == 7).all()
  assert abs((first_gap == 1).mean() - p1) <= 4 * np.sqrt(p1 * (1 - p1) / rows)
  # Noise positions are spread over the row, not bunched.
  per_position = mask.mean(0)
  assert per_position[10:-10].min() > 0.1 and per_position[10:-10].max() < 0.2
  # Same generator seed, same masks.
  np.testing.assert_array_equal(random_spans_noise_mask(rows, n, np.random.default_rng(0)), mask)


def _reconstruct(inputs, targets, sentinels, eos):
  """Original tokens from T5 inputs/targets: each sentinel in the inputs is
  replaced by what follows the same sentinel in the targets."""
  assert inputs[-1] == eos and targets[-1] == eos
  spans, current = {}, None
  for t in targets[:-1]:
    if t in sentinels:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inputs[:-1]:
    out += spans.pop(int(t)) if t in sentinels else [int(t)]
  assert not spans
  return out


def test_sentinel_layout_reconstructs_the_original():
  rng = np.random.default_rng(1)
  for _ in range(300):
    n = int(rng.integers(2, 200))
    tokens = rng.integers(0, 256, n).astype(np.int32)
    noise = random_spans_noise_mask(1, n, rng)[0]
    inputs, targets = corrupt_spans(tokens, noise, SENTINELS, EOS)
    num_spans = noise_counts(n, 0.15, 3.0)[1]
    # Sentinels 0, 1, ... in order on both sides, each once.
    np.testing.assert_array_equal(inputs[np.isin(inputs, SENTINELS)], SENTINELS[:num_spans])
    np.testing.assert_array_equal(targets[np.isin(targets, SENTINELS)], SENTINELS[:num_spans])
    assert targets[0] == SENTINELS[0]
    assert _reconstruct(inputs, targets, set(SENTINELS.tolist()), EOS) == tokens.tolist()
  with pytest.raises(ValueError, match="sentinels"):
    corrupt_spans(np.arange(100, dtype=np.int32), random_spans_noise_mask(1, 100, rng)[0],
                  SENTINELS[:2], EOS)


def _docs(n=30, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "list", "dict", "return", "yield"]
  return [" ".join(rng.choice(words, rng.integers(1, 80))) for _ in range(n)]


def _examples(batches, start_id):
  """Unpacked (inputs, targets) examples of encoder-decoder batches, checking the rows."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      se, sd = b["inputs_segment_ids"][r], b["targets_segment_ids"][r]
      assert se.max() == sd.max()
      np.testing.assert_array_equal(b["weights"][r], sd > 0)
      for s in range(1, se.max() + 1):
        ie, it = se == s, sd == s
        np.testing.assert_array_equal(b["inputs_positions"][r][ie], np.arange(ie.sum()))
        np.testing.assert_array_equal(b["targets_positions"][r][it], np.arange(it.sum()))
        targets = b["targets"][r][it]
        np.testing.assert_array_equal(b["decoder_inputs"][r][it],
                                      np.concatenate([[start_id], targets[:-1]]))
        out.append((b["inputs"][r][ie], targets))
  return out


def test_span_eval_batches_reconstruct_the_documents():
  docs = _docs()
  settings = span_data.SpanSettings.from_tokenizer(TOK)
  batches = list(span_data.span_eval_batches(sources.ListSource(docs), TOK, 32, 4, settings))
  raw_len, targets_len = span_corruption_lengths(32)
  assert batches[0]["targets"].shape == (4, targets_len)
  got = collections.Counter(tuple(_reconstruct(inputs, targets, set(SENTINELS.tolist()), EOS))
                            for inputs, targets in _examples(batches, PAD))
  # Pieces of raw_len tokens, each once (packing may reorder); 1-token
  # leftovers cannot be corrupted and are dropped.
  want = collections.Counter(tuple(d.encode()[i:i + raw_len]) for d in docs
                             for i in range(0, len(d.encode()), raw_len)
                             if len(d.encode()[i:i + raw_len]) >= 2)
  assert got == want
  fill = np.mean([b["inputs_segment_ids"].astype(bool).mean() for b in batches])
  assert fill > 0.8   # packing fills the encoder rows


def test_span_train_iterator_is_deterministic_and_resumes():
  src = sources.ListSource(_docs(20, seed=1))
  settings = span_data.SpanSettings.from_tokenizer(TOK)
  make = lambda: span_data.span_train_iterator(src, TOK, 32, 2, 3, settings)
  ref = make()
  ref_batches = [next(ref) for _ in range(30)]
  for k in (0, 11, 25):
    it = make()
    for _ in range(k):
      next(it)
    fresh = make()
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    for j in range(5):
      got = next(fresh)
      for key in got:
        np.testing.assert_array_equal(got[key], ref_batches[k + j][key])
  other = span_data.span_train_iterator(
      src, TOK, 32, 2, 3, span_data.SpanSettings.from_tokenizer(TOK, noise_density=0.3))
  with pytest.raises(UserError, match="noise_density"):
    other.set_state(make().get_state())
  with pytest.raises(UserError, match="sentinels"):
    span_data.span_train_iterator(src, tokenizers.ByteTokenizer(span_data.t5_specials(2)), 128,
                                  2, 0, span_data.SpanSettings.from_tokenizer(
                                      tokenizers.ByteTokenizer(span_data.t5_specials(2))))


def test_exact_match_counts_examples_in_packed_rows():
  rng = np.random.default_rng(2)
  b, t, v = 6, 12, 7
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  pred = logits.argmax(-1)
  seg = np.zeros((b, t), np.int32)
  for r in range(b):   # 1-3 examples per row, then padding
    cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(1, 4), replace=False))
    for s, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts), 1):
      seg[r, lo:hi] = s
  targets = np.where(rng.random((b, t)) < 0.8, pred, (pred + 1) % v)
  exact, examples = exact_matches(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(seg))
  want_exact = want_examples = 0
  for r in range(b):
    for s in set(seg[r].tolist()) - {0}:
      want_examples += 1
      want_exact += bool((pred[r][seg[r] == s] == targets[r][seg[r] == s]).all())
  assert 0 < want_exact < want_examples
  assert (int(exact), int(examples)) == (want_exact, want_examples)


def test_pair_files_and_bad_input(tmp_path):
  jl = tmp_path / "pairs.jsonl"
  jl.write_text('{"input": "hello", "target": "bonjour"}\n\n'
                '{"input": "a long input sentence", "target": "x"}\n')
  src = pairs.open_pair_source(f"file:{jl}")
  assert len(src) == 2 and src[0] == {"input": "hello", "target": "bonjour"}
  settings = span_data.SpanSettings.from_tokenizer(TOK)
  (batch,) = list(span_data.pair_eval_batches(src, TOK, 8, 6, 2, settings))
  examples = _examples([batch], PAD)
  assert examples[0][0].tolist() == list(b"hello") + [EOS]
  assert examples[0][1].tolist() == list(b"bonjo") + [EOS]          # truncated to 6 with EOS
  assert examples[1][0].tolist() == list(b"a long ") + [EOS]
  cs = tmp_path / "pairs.csv"
  cs.write_text('input,target\n"one, two",deux\n')
  assert pairs.open_pair_source(f"file:{cs}")[0] == {"input": "one, two", "target": "deux"}
  bad = {"nocols.jsonl": '{"text": "hello"}\n', "nocols.csv": "text,label\nhi,1\n",
         "bad.jsonl": "{not json\n", "types.jsonl": '{"input": 1, "target": "x"}\n',
         "pairs.txt": "hello\n"}
  for name, content in bad.items():
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as e:
      pairs.open_pair_source(f"file:{tmp_path / name}")
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="input"):
    pairs.open_pair_source(f"file:{tmp_path / 'nocols.jsonl'}")
  with pytest.raises(UserError, match="not a pair file"):
    pairs.open_pair_source("embedded:python-docs")
  with pytest.raises(UserError, match="does not exist"):
    pairs.open_pair_source(f"file:{tmp_path / 'missing.jsonl'}")


def run_cli(args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


TINY = ["--config.model.num_layers=1", "--config.model.num_encoder_layers=1",
        "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.model.max_len=32", "--config.data.seq_len=32", "--config.train.batch_size=4",
        "--config.train.log_every=2", "--config.data.eval_batches=2"]


@pytest.mark.slow
def test_t5_train_eval_generate_cli(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  wd = str(tmp_path / "t5")
  out = run_cli(["train", "--config", "configs/t5.py", "--workdir", wd, *TINY,
                 "--config.train.steps=4", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=4"])
  assert out.returncode == 0, out.stderr[-2000:]
  # eval, generate and a bad seq2seq file through the CLI entry point, in this process.
  assert cli.main(["eval", "--workdir", wd]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["step"] == 4 and {"eval/loss", "eval/accuracy", "eval/exact_match"} <= set(record)
  assert cli.main(["generate", "--workdir", wd, "--prompt", "def <extra_id_0>(x):",
                   "--beam-size", "3", "--max-new-tokens", "8"]) == 0
  assert capsys.readouterr().out   # a line, possibly of blanks after 4 steps
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "hello"}\n')
  assert cli.main(["train", "--config", "configs/t5.py:seq2seq", "--workdir",
                   str(tmp_path / "mt"), *TINY, "--config.train.batch_size=8",
                   f"--config.data.source=file:{bad}"]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "'input'/'target'" in err


@pytest.mark.slow
def test_seq2seq_trains_in_process_on_the_device_mesh(tmp_path, monkeypatch):
  # The generic loop, sharded over the 8 test devices (data x fsdp x tensor = 2 x 2 x 2).
  from tx_jax.train import config as config_lib
  from tx_jax.train import metrics as metrics_lib
  from tx_jax.train.loop import train
  # The MFU probe (a matmul on device 0) cannot run under a multi-device
  # jax.set_mesh in one process; it only scales the reported mfu.
  monkeypatch.setattr(metrics_lib, "measure_peak_flops", lambda *a, **k: 1e11)
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"input": f"copy {w}", "target": w}) + "\n"
                          for w in ["alpha", "beta", "gamma", "delta"] * 10))
  config = config_lib.load_config_file(os.path.join(ROOT, "configs/t5.py:seq2seq"))
  config = config_lib.apply_overrides(config, [o[len("--config."):] for o in TINY] + [
      f"data.source=file:{data}", "data.targets_len=8",
      "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.batch_size=8",
      "data.eval_batches=1",
      "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.async_checkpoints=false"])
  metrics = train(config, str(tmp_path / "mt"))
  assert set(metrics) == {"loss", "accuracy", "exact_match"} and np.isfinite(metrics["loss"])
