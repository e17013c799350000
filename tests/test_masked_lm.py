"""BERT masked LM: masking statistics, the data pipeline, the model's size and loss, the CLI."""

import collections
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax import cli
from tx_jax.data import mlm, sources, tokenizers
from tx_jax.data.masking import bert_mask
from tx_jax.errors import UserError
from tx_jax.models import ENCODER_SIZES, Encoder, count_params, make_config, param_shapes
from tx_jax.objectives.masked_lm import MaskedLM

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizers.ByteTokenizer(mlm.MLM_SPECIALS)     # <pad> 256 <mask> 257 <cls> 258 <sep> 259
MASK, CLS, SEP = 257, 258, 259


def _within(observed, expected, n, sigmas=4.0):
  """|observed - expected| within `sigmas` binomial standard errors of n draws."""
  return abs(observed - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


def test_bert_mask_statistics_over_10k_rows():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (10_000, 128)).astype(np.int32)
  maskable = rng.random(tokens.shape) > 0.1      # 10% stand-ins for specials / padding
  inputs, selected = bert_mask(tokens, maskable, np.random.default_rng(1), mask_id=MASK,
                               num_regular=256)
  n = int(maskable.sum())
  assert not selected[~maskable].any() and (inputs[~maskable] == tokens[~maskable]).all()
  assert _within(selected.sum() / n, 0.15, n)
  s = int(selected.sum())
  sel_in, sel_tok = inputs[selected], tokens[selected]
  as_mask = sel_in == MASK
  # A random replacement equals the original with probability 1/256.
  as_random = (~as_mask) & (sel_in != sel_tok)
  unchanged = sel_in == sel_tok
  assert _within(as_mask.mean(), 0.8, s)
  assert _within(as_random.mean(), 0.1 * (1 - 1 / 256), s)
  assert _within(unchanged.mean(), 0.1 + 0.1 / 256, s)
  # Random replacements are uniform over the 256 regular ids (chi-square, 255 dof).
  counts = np.bincount(sel_in[as_random], minlength=256)
  assert counts.size == 256
  expected = counts.sum() / 256
  assert ((counts - expected) ** 2 / expected).sum() < 255 + 6 * np.sqrt(2 * 255)
  # Same seed, same masks; another seed, other masks.
  again = bert_mask(tokens, maskable, np.random.default_rng(1), mask_id=MASK, num_regular=256)
  np.testing.assert_array_equal(again[0], inputs)
  other = bert_mask(tokens, maskable, np.random.default_rng(2), mask_id=MASK, num_regular=256)
  assert (other[1] != selected).any()


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "list", "dict", "return", "yield"]
  return [" ".join(rng.choice(words, rng.integers(3, 60))) for _ in range(n)]


def _pieces(batches, sentence_order=False):
  """Unpacked pieces (in row order) of MLM batches, checking each piece's layout."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        at = seg == s
        piece = {k: b[k][r][at] for k in b}
        np.testing.assert_array_equal(piece["positions"], np.arange(at.sum()))
        tgt = piece["targets"]
        assert tgt[0] == CLS and tgt[-1] == SEP
        special = np.isin(tgt, [CLS, SEP])
        assert not piece["weights"][special].any()
        # Unselected tokens are shown as they are.
        keep = piece["weights"] == 0
        np.testing.assert_array_equal(piece["inputs"][keep], tgt[keep])
        out.append(piece)
      assert not b["weights"][r][seg == 0].any()
  return out


def test_mlm_eval_batches_cover_every_document_in_order():
  docs = _docs()
  src = sources.ListSource(docs)
  settings = mlm.MaskedLMSettings.from_tokenizer(TOK)
  batches = list(mlm.mlm_eval_batches(src, TOK, 32, 4, settings))
  # Every document, cut into 30-token pieces, each exactly once (packing may reorder).
  got = collections.Counter(bytes(p["targets"][1:-1].astype(np.uint8)) for p in _pieces(batches))
  assert got == collections.Counter(d.encode()[i:i + 30] for d in docs
                                    for i in range(0, len(d.encode()), 30))
  again = list(mlm.mlm_eval_batches(src, TOK, 32, 4, settings))
  for a, b in zip(batches, again):   # the same eval positions every time
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  sel = np.concatenate([p["weights"][1:-1] for p in _pieces(batches)])
  assert _within(sel.mean(), 0.15, sel.size)


def test_sentence_order_pieces():
  docs = _docs(seed=1)
  settings = mlm.MaskedLMSettings.from_tokenizer(TOK, sentence_order=True)
  batches = list(mlm.mlm_eval_batches(sources.ListSource(docs), TOK, 24, 4, settings))
  pieces = _pieces(batches)
  text, labels = collections.Counter(), []
  for p in pieces:
    t, types = p["targets"], p["token_types"]
    seps = np.flatnonzero(t == SEP)
    if len(seps) == 1:   # a 1-token piece gets no sentence-order label
      assert p["sentence_weights"].sum() == 0
      text[bytes(t[1:-1].astype(np.uint8))] += 1
      continue
    assert len(seps) == 2 and p["sentence_weights"][0] == 1 and p["sentence_weights"][1:].sum() == 0
    first, second = t[1:seps[0]], t[seps[0] + 1:-1]
    np.testing.assert_array_equal(types, [0] * (seps[0] + 1) + [1] * (len(t) - seps[0] - 1))
    label = int(p["sentence_labels"][0])
    labels.append(label)
    text[bytes((np.concatenate([second, first]) if label else
                np.concatenate([first, second])).astype(np.uint8))] += 1
  assert text == collections.Counter(d.encode()[i:i + 21] for d in docs
                                     for i in range(0, len(d.encode()), 21))
  assert 0.3 < np.mean(labels) < 0.7


def test_next_sentence_pieces():
  """BERT's NSP: label 0 -> B continues A in the same document; label 1 -> B, of the
  same length, is a stretch of another document. Documents use disjoint letters."""
  chars = "abcdefghijklmnopqrstuvwxyz0123456789"
  rng = np.random.default_rng(0)
  docs = ["".join(rng.choice(list(chars[3 * i:3 * i + 3]), 40 + 7 * i)) for i in range(12)]
  settings = mlm.MaskedLMSettings.from_tokenizer(TOK, next_sentence=True)
  batches = list(mlm.mlm_eval_batches(sources.ListSource(docs), TOK, 24, 4, settings))
  labels = []
  for p in _pieces(batches):
    t = p["targets"]
    seps = np.flatnonzero(t == SEP)
    if len(seps) == 1:
      assert p["sentence_weights"].sum() == 0
      continue
    assert p["sentence_weights"][0] == 1 and p["sentence_weights"][1:].sum() == 0
    first = bytes(t[1:seps[0]].astype(np.uint8)).decode()
    second = bytes(t[seps[0] + 1:-1].astype(np.uint8)).decode()
    label = int(p["sentence_labels"][0])
    labels.append(label)
    home = [d for d in docs if first in d]
    assert home, first
    if label == 0:
      assert any(first + second in d for d in home)
    else:
      assert set(second) & set(first) == set() and any(second in d for d in docs)
  assert 0.3 < np.mean(labels) < 0.7
  # The iterator records the task only when it is on (older records still match).
  assert "next_sentence" not in mlm.MaskedLMSettings.from_tokenizer(TOK).as_config()


def test_mlm_train_iterator_is_deterministic_per_seed_and_step_and_resumes():
  src = sources.ListSource(_docs(30, seed=2))
  settings = mlm.MaskedLMSettings.from_tokenizer(TOK)
  make = lambda seed: mlm.mlm_train_iterator(src, TOK, 32, 2, seed, settings)
  ref = make(5)
  ref_batches = [next(ref) for _ in range(40)]
  same = make(5)
  for b in ref_batches[:10]:
    got = next(same)
    for k in b:
      np.testing.assert_array_equal(got[k], b[k])
  assert (next(make(6))["inputs"] != ref_batches[0]["inputs"]).any()
  for k in (0, 7, 23):   # resume from the state after k batches (through JSON)
    it = make(5)
    for _ in range(k):
      next(it)
    fresh = make(5)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    for j in range(5):
      got = next(fresh)
      for key in got:
        np.testing.assert_array_equal(got[key], ref_batches[k + j][key])
  other = mlm.mlm_train_iterator(
      src, TOK, 32, 2, 5, mlm.MaskedLMSettings.from_tokenizer(TOK, mask_rate=0.2))
  with pytest.raises(UserError, match="mask_rate: 0.15 -> 0.2"):
    other.set_state(make(5).get_state())


def test_masking_is_fresh_every_epoch():
  # One document, one row per epoch: the same text, masked anew each time.
  src = sources.ListSource(["one small document about python lists"])
  settings = mlm.MaskedLMSettings.from_tokenizer(TOK)
  it = mlm.mlm_train_iterator(src, TOK, 64, 1, 0, settings)
  rows = [next(it) for _ in range(4)]
  assert all((r["targets"] == rows[0]["targets"]).all() for r in rows)
  assert len({r["weights"].tobytes() for r in rows}) > 1


def test_bad_settings_and_missing_specials():
  with pytest.raises(UserError, match="<mask>"):
    mlm.MaskedLMSettings.from_tokenizer(tokenizers.ByteTokenizer(("<pad>",)))
  with pytest.raises(UserError, match="masking rates"):
    mlm.MaskedLMSettings.from_tokenizer(TOK, mask_token_rate=0.95)


def test_unknown_objective_option_is_a_user_error():
  from tx_jax.objectives import get_objective
  from tx_jax.train import config as config_lib
  config = config_lib.load_config_file(os.path.join(ROOT, "configs/bert.py"))
  with config.unlocked():
    config.objective_options.next_sentence = True
  with pytest.raises(UserError, match=r"\['next_sentence'\] are not options of 'masked_lm'"):
    get_objective(config.objective).from_config(config, TOK)


def test_bert_base_parameter_count():
  cfg = make_config(ENCODER_SIZES, "base")
  d, f, v, p, t, layers = 768, 3072, 30522, 512, 2, 12
  # By hand: token + position + type embeddings and their LayerNorm; per layer
  # Q, K, V, O (d x d + d each), MLP (d x f + f, f x d + d), two LayerNorms.
  layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
  encoder = (v + p + t) * d + 2 * d + layers * layer
  heads = (d * d + d + 2 * d + v) + (d * d + d + 2 * d + 2)   # MLM transform + bias; pooler + SOP
  assert encoder == 108_891_648
  assert encoder + heads == 110_106_428    # HF BertForPreTraining (bert-base-uncased)
  assert count_params(param_shapes(Encoder(cfg), 8)) == encoder
  full = Encoder(cfg, mlm_head=True, sentence_head=True)
  assert count_params(param_shapes(full, 8)) == encoder + heads


SMALL = dataclasses.replace(make_config(ENCODER_SIZES, "tiny"), num_layers=2, d_model=32,
                            num_heads=2, mlp_dim=64, max_len=16)


@pytest.fixture(scope="module")
def sop_objective():
  """MaskedLM with both heads, random params (no init compile), a jitted forward."""
  obj = MaskedLM(SMALL, np.ones(SMALL.vocab_size, np.float32), sentence_order=True)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(scale=0.2, size=x.shape), x.dtype),
      nn.unbox(param_shapes(obj.model, 16)))
  forward = jax.jit(lambda p, x, pos, seg, types: obj.model.apply(
      {"params": p}, x, positions=pos, segment_ids=seg, token_types=types))
  return obj, params, forward


def test_loss_is_cross_entropy_on_selected_positions_only(sop_objective):
  obj, params, forward = sop_objective
  rng = np.random.default_rng(3)
  b = {"inputs": rng.integers(0, 260, (3, 16)).astype(np.int32),
       "targets": rng.integers(0, 256, (3, 16)).astype(np.int32),
       "segment_ids": np.array([[1] * 10 + [2] * 6, [1] * 16, [1] * 5 + [0] * 11], np.int32),
       "positions": np.array([list(range(10)) + list(range(6)), list(range(16)),
                              list(range(16))], np.int32),
       "token_types": (rng.random((3, 16)) > 0.5).astype(np.int32),
       "weights": (rng.random((3, 16)) < 0.3).astype(np.float32),
       "sentence_labels": rng.integers(0, 2, (3, 16)).astype(np.int32),
       "sentence_weights": np.zeros((3, 16), np.float32)}
  b["weights"][2, 5:] = 0
  b["sentence_weights"][[0, 0, 1, 2], [0, 10, 0, 0]] = 1
  loss, sums = jax.jit(lambda p, x: obj.loss_fn(p, x, jax.random.key(0), False))(params, b)
  logits, out = forward(params, b["inputs"], b["positions"], b["segment_ids"], b["token_types"])

  def nll(lg, tg, w):
    lg = np.asarray(lg, np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    picked = np.take_along_axis(lp, tg[..., None], -1)[..., 0]
    return -(picked * w).sum() / w.sum()

  want = (nll(logits, b["targets"], b["weights"])
          + nll(out["sentence_logits"], b["sentence_labels"], b["sentence_weights"]))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(sums["weight"]) == b["weights"].sum() and float(sums["sentence_weight"]) == 4
  metrics = obj.summarize(jax.device_get(sums))
  assert set(metrics) == {"loss", "accuracy", "sentence_order_loss", "sentence_order_accuracy"}
  np.testing.assert_allclose(metrics["loss"], nll(logits, b["targets"], b["weights"]), rtol=1e-5)


def test_padding_does_not_change_real_tokens_with_heads(sop_objective):
  obj, params, forward = sop_objective
  rng = np.random.default_rng(4)
  real = rng.integers(0, 260, 9)
  # The same 9 tokens followed by padding, other padding, or another packed piece.
  x = np.stack([np.concatenate([real, rng.integers(0, 260, 7)]) for _ in range(3)]).astype(np.int32)
  seg = np.array([[1] * 9 + [0] * 7, [1] * 9 + [0] * 7, [1] * 9 + [2] * 7], np.int32)
  pos = np.array([list(range(16)), list(range(16)), list(range(9)) + list(range(7))], np.int32)
  types = np.array([[0] * 4 + [1] * 12] * 3, np.int32)
  logits, out = forward(params, x, pos, seg, types)
  for r in (1, 2):
    np.testing.assert_allclose(np.asarray(logits[0, :9]), np.asarray(logits[r, :9]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["sentence_logits"][0, :9]),
                               np.asarray(out["sentence_logits"][r, :9]), atol=1e-5)


@pytest.mark.parametrize("config_file", ["configs/bert.py", "configs/t5.py"])
def test_configs_read_file_and_tfds_sources(config_file, tmp_path, monkeypatch):
  from tx_jax.train import config as config_lib
  from tx_jax.train.experiment import build_experiment
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  docs = tmp_path / "docs.txt"
  docs.write_text("\n".join(_docs(20, seed=5)))
  for i, spec in enumerate([f"file:{docs}", "tfds:lm1b:train"]):
    config = config_lib.apply_overrides(config_lib.load_config_file(
        os.path.join(ROOT, config_file)), [f"data.source={spec}", "data.eval_source=",
                                           "train.batch_size=2"])
    with tfds.testing.mock_data(num_examples=20):
      exp = build_experiment(config, str(tmp_path / f"wd{i}"), create_tokenizer=True)
      train = next(exp.train_iterator())
      evals = next(exp.eval_batches())
    assert train["weights"].sum() > 0 and evals["weights"].sum() > 0
    assert train["inputs"].shape == (2, config.data.seq_len)


def run_cli(args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.data.seq_len=32",
        "--config.train.batch_size=4", "--config.train.log_every=2", "--config.data.eval_batches=2"]


@pytest.mark.slow
def test_bert_train_eval_cli(tmp_path, capsys):
  wd = str(tmp_path / "bert")
  out = run_cli(["train", "--config", "configs/bert.py", "--workdir", wd, *TINY,
                 "--config.train.steps=4", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=4",
                 "--config.objective_options.sentence_order=true"])
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("eval/accuracy" in l and "eval/sentence_order_accuracy" in l for l in lines)
  assert any("tokens_per_s" in l for l in lines)
  # eval and generate through the CLI entry point, in this process.
  assert cli.main(["eval", "--workdir", wd]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["step"] == 4 and 0 <= record["eval/accuracy"] <= 1
  assert cli.main(["generate", "--workdir", wd, "--prompt", "x"]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "does not generate text" in err
