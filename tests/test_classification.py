"""Classification: metrics against scikit-learn, the stratified split, fine-tuning from a
pretrained workdir (what is loaded, new and dropped; frozen bodies stay put), the linear
probe against LogisticRegression on the same frozen features, resuming bit-exactly,
prediction, and bad input (exit 2, one line)."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax import cli
from tx_jax.data import labelled, sources
from tx_jax.evaluation.confusion import confusion_metrics
from tx_jax.objectives.classification import classification_sums
from tx_jax.objectives.transfer import layer_of
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import loop
from tx_jax.train.trained import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFY = os.path.join(ROOT, "configs", "classify.py")
BERT = os.path.join(ROOT, "configs", "bert.py")
TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
        "model.max_len=32", "data.seq_len=32", "train.batch_size=8", "train.log_every=1",
        "train.async_checkpoints=false", "optim.warmup_steps=1"]
RUN = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=2"]


def run_main(argv):
  try:
    return cli.main(argv)
  except SystemExit as e:
    return e.code


def write_csv(path, rows, header=("text", "label")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def toy_rows(n=96, seed=0):
  """Documents whose label is the topic word they repeat (3 classes)."""
  rng = np.random.default_rng(seed)
  words = {"red": "apple cherry ruby", "green": "leaf grass lime", "blue": "sky sea ocean"}
  rows = []
  for i in range(n):
    label = list(words)[i % 3]
    picks = rng.choice(words[label].split(), 4)
    rows.append((" ".join(picks) + f" item {i}", label))
  return rows


def classify_config(overrides, kind="text"):
  base = config_lib.load_config_file(f"{CLASSIFY}:{kind}")
  return config_lib.apply_overrides(base, overrides)


# --- Metrics against scikit-learn ------------------------------------------------------

def test_metrics_match_scikit_learn():
  from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
  rng = np.random.default_rng(0)
  k, n = 5, 300
  logits = rng.normal(size=(n, k)).astype(np.float32)
  labels = rng.integers(0, k - 1, n).astype(np.int32)   # class 4 never a label
  logits[labels == 0, 0] += 2.0                          # some signal
  valid = (rng.random(n) > 0.1).astype(np.float32)       # padded rows never count
  loss, sums = classification_sums(jnp.asarray(logits), jnp.asarray(labels),
                                   jnp.asarray(valid))
  keep = valid > 0
  y, p = labels[keep], logits[keep].argmax(-1)
  np.testing.assert_array_equal(np.asarray(sums["confusion"]),
                                confusion_matrix(y, p, labels=range(k)))
  m = confusion_metrics(np.asarray(sums["confusion"]), [f"c{i}" for i in range(k)])
  assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
  prec, rec, _, support = precision_recall_fscore_support(y, p, labels=range(k),
                                                          zero_division=0)
  for i in range(k):
    assert m[f"precision/c{i}"] == pytest.approx(prec[i])
    assert m[f"recall/c{i}"] == pytest.approx(rec[i])
    assert m[f"support/c{i}"] == support[i]
  assert m["accuracy"] == pytest.approx(np.mean(y == p))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = -log_softmax[keep, labels[keep]].mean()
  assert float(loss) == pytest.approx(ref, rel=1e-5)
  assert float(sums["nll"]) / float(sums["count"]) == pytest.approx(ref, rel=1e-5)


def test_class_weights_and_smoothing_change_only_the_training_loss():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  labels = jnp.asarray([0, 1, 1])
  valid = jnp.ones(3)
  plain, s0 = classification_sums(logits, labels, valid)
  weighted, s1 = classification_sums(logits, labels, valid, jnp.asarray([1.0, 3.0]))
  nll = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), np.asarray(labels)] * -1
  assert float(weighted) == pytest.approx((nll[0] + 3 * nll[1] + 3 * nll[2]) / 7, rel=1e-5)
  assert float(s1["weight"]) == 7.0 and float(s1["nll"]) == pytest.approx(float(s0["nll"]))
  smoothed, _ = classification_sums(logits, labels, valid, smoothing=0.2)
  lp = np.asarray(jax.nn.log_softmax(logits))
  target = np.eye(2)[np.asarray(labels)] * 0.8 + 0.1
  assert float(smoothed) == pytest.approx(-(target * lp).sum(-1).mean(), rel=1e-5)


def test_stratified_split_holds_out_every_class():
  src = sources.open_source("embedded:stdlib-docstrings")
  train, held = labelled.stratified_split(src, 0.2, seed=0)
  again, _ = labelled.stratified_split(src, 0.2, seed=0)
  assert list(train.indices) == list(again.indices)
  assert not set(train.indices) & set(held.indices)
  assert len(train) + len(held) == len(src)
  names = np.asarray(labelled.all_labels(src))
  for name in set(names):
    total = int((names == name).sum())
    in_eval = int((names[held.indices] == name).sum())
    assert in_eval == max(1, round(0.2 * total)), name


def test_layer_of_orders_embeddings_blocks_and_head():
  assert layer_of(("body", "embedder", "tokens", "embedding"), 2) == 0
  assert layer_of(("body", "encoder", "block_00", "mlp", "wi", "kernel"), 2) == 1
  assert layer_of(("body", "encoder", "block_01", "attn", "query", "kernel"), 2) == 2
  assert layer_of(("body", "final_norm", "scale"), 2) == 3
  assert layer_of(("head", "kernel"), 2) == 3


# --- Fine-tuning from a pretrained workdir -------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-step tiny BERT (MLM head) on the toy texts."""
  root = tmp_path_factory.mktemp("pre")
  data = write_csv(root / "toy.csv", toy_rows())
  workdir = str(root / "bert")
  config = config_lib.apply_overrides(config_lib.load_config_file(BERT), [
      *TINY, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
      "data.seq_len=32", f"data.source=file:{data}", f"data.eval_source=file:{data}",
      "data.eval_batches=1"])
  loop.train(config, workdir)
  return workdir, data


def test_linear_probe_from_pretrained_loads_body_and_keeps_it_frozen(pretrained, tmp_path):
  bert, data = pretrained
  workdir = str(tmp_path / "probe")
  config = classify_config([*TINY, *RUN, f"init_from={bert}", f"data.source=file:{data}",
                            "finetune.mode=linear_probe", "optim.lr=1e-2"])
  loop.train(config, workdir)
  report = json.load(open(os.path.join(workdir, "init_from.json")))
  assert report["step"] == 2 and report["objective"] == "masked_lm"
  assert sorted(report["new"]) == ["head/bias", "head/kernel"]
  assert any(k.startswith("mlm_") for k in report["dropped"])  # the MLM head is not used
  assert "embedder/tokens/embedding" in report["loaded"]
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  assert json.load(open(os.path.join(workdir, "labels.json")))["labels"] == [
      "blue", "green", "red"]
  assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "confusion")))
  pre, tuned = load_trained(bert), load_trained(workdir)
  flat_pre = dict(jax.tree_util.tree_leaves_with_path(pre.params))
  moved = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tuned.params):
    if path[0].key == "head":
      moved += 1
      continue
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_pre[path[1:]]))
  assert moved == 2
  assert not np.allclose(np.asarray(tuned.params["head"]["kernel"]), 0.0)


def test_freeze_below_keeps_lower_layers_and_trains_upper(pretrained, tmp_path):
  bert, data = pretrained
  workdir = str(tmp_path / "freeze")
  config = classify_config([*TINY, "train.steps=2", "train.eval_every=2",
                            "train.checkpoint_every=2", f"init_from={bert}",
                            f"data.source=file:{data}", "finetune.mode=freeze_below:1",
                            "optim.layer_decay=0.5", "optim.head_lr=1e-2"])
  loop.train(config, workdir)
  pre, tuned = load_trained(bert), load_trained(workdir)
  body = tuned.params["body"]
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  assert same(body["embedder"]["tokens"]["embedding"], pre.params["embedder"]["tokens"]["embedding"])
  assert all(same(a, b) for a, b in zip(jax.tree_util.tree_leaves(body["encoder"]["block_00"]),
                                        jax.tree_util.tree_leaves(
                                            pre.params["encoder"]["block_00"])))
  assert not all(same(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(body["encoder"]["block_01"]),
      jax.tree_util.tree_leaves(pre.params["encoder"]["block_01"])))


def final_state(workdir):
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    step, _ = c.newest_good_step()
    state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"]
  return step, jax.tree_util.tree_leaves(state)


def sealed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(
      os.path.join(d, n, ckpt_lib.MANIFEST))) if os.path.isdir(d) else []


@pytest.mark.slow
def test_fine_tuned_run_killed_and_resumed_is_bit_identical(pretrained, tmp_path):
  """SIGKILL right after the first checkpoint of a fine-tuning run (dropout on, so the
  rng stream matters too); the rerun resumes from it and ends bit-identical to a run
  that was never interrupted."""
  import signal
  import subprocess
  import sys
  import time
  bert, data = pretrained
  steps = 10
  overrides = [*TINY, f"train.steps={steps}", f"train.eval_every={steps}",
               "train.checkpoint_every=2", f"init_from={bert}", f"data.source=file:{data}",
               "finetune.dropout_rate=0.1"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  loop.train(classify_config(overrides), straight)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the same 8 devices as this process
  proc = subprocess.Popen([sys.executable, "-m", "tx_jax", "train", "--config", CLASSIFY,
                           "--workdir", killed, *[f"--config.{o}" for o in overrides]],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not sealed_steps(killed):
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    assert time.time() < deadline
    time.sleep(0.002)
  assert proc.poll() is None  # still training when killed
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(sealed_steps(killed)) < steps
  loop.train(classify_config(overrides), killed)
  (sa, a), (sb, b) = final_state(straight), final_state(killed)
  assert sa == sb == steps and len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_linear_probe_matches_logistic_regression_on_the_same_features(pretrained, tmp_path):
  """The probe head (AdamW, no decay) against scikit-learn's LogisticRegression (weak L2)
  on the frozen body's pooled features of the same train / eval split."""
  from sklearn.linear_model import LogisticRegression
  bert, _ = pretrained
  rows = toy_rows(900, seed=1)
  rng = np.random.default_rng(3)
  noisy = [(t, l if rng.random() > 0.25 else rng.choice(["red", "green", "blue"]))
           for t, l in rows]  # label noise: neither side scores 100%
  data = write_csv(tmp_path / "noisy.csv", noisy)
  workdir = str(tmp_path / "probe")
  config = classify_config([*TINY, f"init_from={bert}", f"data.source=file:{data}",
                            "finetune.mode=linear_probe", "optim.lr=3e-2",
                            "data.eval_fraction=0.3",
                            "optim.weight_decay=0.0", "optim.warmup_steps=10",
                            "train.batch_size=32", "train.steps=300", "train.eval_every=300",
                            "train.checkpoint_every=300", "train.log_every=100"])
  metrics = loop.train(config, workdir)
  tuned = load_trained(workdir)
  obj = tuned.objective
  src = sources.open_source(f"file:{data}")
  train, held = labelled.stratified_split(src, 0.3, 0)
  feats = jax.jit(lambda p, b: obj.logits(p, b)[1])

  def features(split):
    records = [split[i] for i in range(len(split))]
    x = np.asarray(feats(tuned.params, obj.predict_collate(records)))
    y = [obj.labels.index(src.label_names[r["label"]]) for r in records]
    return x, np.asarray(y)
  (xt, yt), (xe, ye) = features(train), features(held)
  ref = LogisticRegression(C=100.0, max_iter=5000).fit(xt, yt).score(xe, ye)
  assert 0.5 < ref < 1.0
  assert abs(metrics["accuracy"] - ref) <= 0.01 + 1e-9, (metrics["accuracy"], ref)


def test_predict_writes_one_row_per_document(pretrained, tmp_path, capsys):
  bert, data = pretrained
  workdir = str(tmp_path / "cls")
  loop.train(classify_config([*TINY, "train.steps=2", "train.eval_every=2",
                              "train.checkpoint_every=2", f"init_from={bert}",
                              f"data.source=file:{data}"]), workdir)
  out = str(tmp_path / "preds.csv")
  capsys.readouterr()
  assert run_main(["predict", "--workdir", workdir, "--data", f"file:{data}", "--out", out,
                   "--batch-size", "16"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = list(csv.DictReader(open(out)))
  assert summary["documents"] == len(rows) == 96
  assert list(rows[0])[:3] == ["id", "label", "predicted"]
  probs = np.asarray([[float(r[f"p_{c}"]) for c in ("blue", "green", "red")] for r in rows])
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
  assert [r["predicted"] for r in rows] == [("blue", "green", "red")[i]
                                             for i in probs.argmax(1)]
  assert rows[5]["id"] == "5" and rows[5]["label"] == toy_rows()[5][1]


# --- Bad input: exit 2 with one line -------------------------------------------------

def fake_workdir(path, config_file, arg=""):
  """A directory with a config.json of `config_file` (enough for init_from's first checks)."""
  os.makedirs(path, exist_ok=True)
  config = config_lib.load_config_file(config_file + (f":{arg}" if arg else ""))
  config_lib.save_json(config, os.path.join(path, "config.json"))
  return str(path)


@pytest.mark.parametrize("case, message", [
    ("no_label_column", "has no labels"),
    ("single_class", "has a single class"),
    ("unseen_eval_label", "never occurs in the training data"),
    ("init_from_missing", "does not exist"),
    ("init_from_not_a_workdir", "holds no config.json"),
    ("image_model_on_text", "holds an image model"),
    ("text_model_on_images", "holds a text model"),
    ("freeze_beyond_layers", "has only 2 layers"),
])
def test_bad_input_exits_2_with_one_line(case, message, tmp_path, capsys):
  rows = toy_rows(30)
  args = [f"--config.{o}" for o in TINY + RUN if not (case == "text_model_on_images"
                                                      and o.startswith("data.seq_len"))]
  data = write_csv(tmp_path / "ok.csv", rows)
  kind = "text"
  if case == "no_label_column":
    data = write_csv(tmp_path / "nolabel.csv", [(t, l) for t, l in rows], ("text", "topic"))
  elif case == "single_class":
    data = write_csv(tmp_path / "one.csv", [(t, "red") for t, _ in rows])
  elif case == "unseen_eval_label":
    ev = write_csv(tmp_path / "ev.csv", [("a purple plum", "purple"), *rows[:3]])
    args.append(f"--config.data.eval_source=file:{ev}")
  elif case == "init_from_missing":
    args.append(f"--config.init_from={tmp_path / 'nowhere'}")
  elif case == "init_from_not_a_workdir":
    os.makedirs(tmp_path / "empty")
    args.append(f"--config.init_from={tmp_path / 'empty'}")
  elif case == "image_model_on_text":
    mae = fake_workdir(tmp_path / "mae", os.path.join(ROOT, "configs", "mae.py"))
    args.append(f"--config.init_from={mae}")
  elif case == "text_model_on_images":
    bert = fake_workdir(tmp_path / "bert", BERT)
    os.makedirs(tmp_path / "bert" / "tokenizer")
    args.append(f"--config.init_from={bert}")
    data, kind = None, "image"
  elif case == "freeze_beyond_layers":
    args.append("--config.finetune.mode=freeze_below:3")
  if data is not None:
    args.append(f"--config.data.source=file:{data}")
  else:
    args.append("--config.data.source=embedded:digits")
  workdir = tmp_path / "run"
  capsys.readouterr()
  code = run_main(["train", "--config", f"{CLASSIFY}:{kind}", "--workdir", str(workdir), *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert message in err[0], err
  assert not workdir.exists()


# --- Every family's body grafts into a classifier ------------------------------------

def _pretrained(objective_name, params, body=None):
  import ml_collections
  from tx_jax.train.trained import Trained
  config = ml_collections.ConfigDict({"objective": objective_name,
                                      "finetune": {"body": body or ""}})
  return Trained(config, None, None, params, 7)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder_decoder", "vit"])
def test_transfer_grafts_every_family_and_refuses_misfits(family):
  import flax.linen as nn
  from tx_jax.errors import UserError
  from tx_jax.models import TransformerConfig
  from tx_jax.models.vit import vit_configs
  from tx_jax.objectives.causal_lm import CausalLM
  from tx_jax.objectives.classification import Classification
  from tx_jax.objectives.mae import MAEObjective
  from tx_jax.objectives.masked_lm import MaskedLM
  from tx_jax.objectives.span_corruption import SpanCorruption
  v, t = 64, 16
  tiny = dict(vocab_size=v, num_layers=1, d_model=32, num_heads=2, mlp_dim=64, max_len=t)
  labels = ["a", "b", "c"]
  if family == "vit":
    enc, vit, dec = vit_configs(dict(image_size=8, patch_size=2, channels=1, num_layers=1,
                                     d_model=32, num_heads=2, mlp_dim=64))
    pre = MAEObjective(enc, vit=vit, decoder=dec)
    name, make = "mae", lambda: Classification("vit", enc, labels, vit=vit)
  else:
    cfg = TransformerConfig(**tiny, **({"num_encoder_layers": 1} if family == "encoder_decoder"
                                       else {}))
    pre, name = {"encoder": (MaskedLM(cfg, np.ones(v, np.float32)), "masked_lm"),
                 "decoder": (CausalLM(cfg, np.ones(v, np.float32)), "causal_lm"),
                 "encoder_decoder": (SpanCorruption(cfg, np.ones(v, np.float32)),
                                     "span_corruption")}[family]
    make = lambda: Classification(family, cfg, labels, seq_len=t)
  clf = make()
  pre_params = jax.device_get(nn.unbox(pre.init_params(jax.random.key(1), t)))
  fresh = jax.device_get(nn.unbox(clf.init_params(jax.random.key(0))))
  params, report = clf.transfer(fresh, _pretrained(name, pre_params))
  assert sorted(report["new"]) == ["head/bias", "head/kernel"]
  if family in ("encoder", "vit"):  # the MLM head / the MAE's pixel decoder is left behind
    assert report["dropped"] if family == "encoder" else report["loaded_params"] > 0
  source = pre_params["encoder"] if family == "vit" else pre_params
  flat_src = {"/".join(getattr(k, "key", str(k)) for k in p): x
              for p, x in jax.tree_util.tree_leaves_with_path(source)}
  for p, x in jax.tree_util.tree_leaves_with_path(params["body"]):
    np.testing.assert_array_equal(x, flat_src["/".join(k.key for k in p)])
  batch = clf.synthetic_batch(4, t, v)
  loss, sums = clf.loss_fn(params, batch, jax.random.key(0), False)
  assert np.isfinite(float(loss)) and float(sums["count"]) == 4
  if family == "decoder":  # a decoder body never fits an encoder classifier
    with pytest.raises(UserError, match="does not fit"):
      Classification("encoder", cfg, labels, seq_len=t).transfer(
          fresh, _pretrained(name, pre_params))
  if family == "encoder":  # other widths: refused, naming the tensor
    wide = TransformerConfig(**{**tiny, "d_model": 64})
    wide_params = jax.device_get(nn.unbox(MaskedLM(wide, np.ones(v, np.float32)).init_params(
        jax.random.key(1), t)))
    with pytest.raises(UserError, match="does not fit this model"):
      clf.transfer(fresh, _pretrained(name, wide_params))


@pytest.mark.parametrize("name", ["imdb_reviews", "ag_news_subset", "sentiment140"])
def test_tfds_text_sets_make_labelled_batches(name, monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from tx_jax.data import tokenizers
  from tx_jax.objectives.classification import Classification
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=40):
    config = classify_config([*TINY, f"data.source=tfds:{name}:train"])
    data = Classification.open_data(config)
    config = Classification.complete_config(config, data)
    tok = tokenizers.make_tokenizer("byte", tuple(config.data.specials))
    obj = Classification.from_config(config, tok)
    assert len(data.train) + len(data.eval) == 40
    truth = [labelled.label_name(data.eval, data.eval[i]["label"]) for i in range(len(data.eval))]
    batch = next(iter(obj.eval_batches(config, data)()))
    assert batch["tokens"].shape == (8, 32) and batch["label"].dtype == np.int32
    rows = int(batch["valid"].sum())
    assert [obj.labels[i] for i in batch["label"][:rows]] == truth[:rows]
    if name == "imdb_reviews":
      assert obj.labels == ["neg", "pos"]


def test_image_sets_make_labelled_batches(monkeypatch, tmp_path):
  """tfds:cifar10 (mock data) and a folder of class subfolders, through the image path."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image
  from tx_jax.objectives.classification import Classification
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    os.makedirs(tmp_path / "pets" / name)
    for i in range(5):
      Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
          tmp_path / "pets" / name / f"{i}.png")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  rgb = ["model.image_size=32", "model.patch_size=8", "model.channels=3",
         "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"]
  for spec, extra, names in [(f"file:{tmp_path / 'pets'}", [], ["cat", "dog"]),
                             ("tfds:cifar10:train", rgb, None)]:
    with tfds.testing.mock_data(num_examples=20):
      config = classify_config(["train.batch_size=4", f"data.source={spec}", *extra], "image")
      data = Classification.open_data(config)
      config = Classification.complete_config(config, data)
      obj = Classification.from_config(config, None)
      if names:
        assert obj.labels == names
      batch = next(obj.train_iterator(config, data))
      size = obj.vit.image_size
      assert batch["image"].shape == (4, size, size, obj.vit.channels)
      assert set(batch["label"].tolist()) <= set(range(len(obj.labels)))
      ev = next(iter(obj.eval_batches(config, data)()))
      truth = [labelled.label_name(data.eval, data.eval[i]["label"]) for i in range(len(data.eval))]
      rows = int(ev["valid"].sum())
      assert [obj.labels[i] for i in ev["label"][:rows]] == truth[:rows]
      loss, sums = obj.loss_fn(jax.device_get(obj.init_params(jax.random.key(0))), ev,
                               jax.random.key(0), False)
      assert np.isfinite(float(loss)) and float(sums["count"]) == rows
