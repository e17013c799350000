"""Hostile input, table-driven: every row exits 2 with one stderr line naming the problem.

Rows run `tx_jax.cli.main` in this process (argparse errors arrive as
SystemExit). Each asserts: exit status 2, exactly one stderr line
`tx-jax: error: ...` matching the row's pattern, no traceback anywhere, and
the workdir untouched: byte-identical if it existed, absent if it did not.
"""

import hashlib
import json
import os
import re
import shutil

import pytest

from tx_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt.py")
# Tiny model for the 8 fake CPU devices (batch 8 = one row each).
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.data.seq_len=32",
        "--config.train.batch_size=8", "--config.train.steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
        "--config.data.eval_batches=1", "--config.model.vocab_size=260",
        "--config.data.tokenizer=byte"]
NEW = ["train", "--config", GPT, "--workdir", "{new}", *TINY]        # a fresh workdir
RESUME = ["train", "--config", GPT, "--workdir", "{trained}", *TINY]  # the trained one


def run_main(argv):
  try:
    return cli.main(argv)
  except SystemExit as e:  # argparse reports bad flags this way
    return e.code


def tree_digest(path):
  """sha256 over every file's relative path and bytes, and every directory's name."""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    digest.update(os.path.relpath(root, path).encode())
    for name in sorted(files):
      digest.update(name.encode())
      with open(os.path.join(root, name), "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run (vocab 260, so a tokenizer with specials still fits)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  assert run_main([a.format(trained=workdir) for a in RESUME]) == 0
  return workdir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  (d / "empty.txt").write_text("  \n\n")
  (d / "latin1.txt").write_bytes("caf\u00e9 au lait\nsecond line\n".encode("latin-1"))
  (d / "all_bad.txt").write_bytes(b"\xff\xfe one\n\xc3 two\n")
  (d / "bad_line.jsonl").write_text('{"text": "fine"}\n{"text": "oops"\n')
  (d / "no_text.jsonl").write_text('{"body": "a document"}\n')
  (d / "surrogate.jsonl").write_text('{"text": "a lone \\udc80 escape"}\n')
  (d / "no_text.csv").write_text("id,body\n1,hello\n")
  (d / "docs.parquet").write_bytes(b"PAR1")
  (d / "subdir.txt").mkdir()
  (d / "config_syntax.py").write_text("def get_config(:\n")
  (d / "config_nothing.py").write_text("x = 1\n")
  (d / "a_file").write_text("not a directory\n")
  (d / "tfds_empty").mkdir()
  return d


# --- Setups that make a damaged copy of the trained workdir ------------------------------

def copy_of(ctx):
  dst = os.path.join(ctx["tmp"], "copy")
  shutil.copytree(ctx["trained"], dst)
  ctx["copy"] = dst
  return dst


def only_checkpoint_corrupt(ctx):
  step_dir = os.path.join(copy_of(ctx), "checkpoints", "2", "state")
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(10)
    byte = f.read(1)
    f.seek(10)
    f.write(bytes([byte[0] ^ 0xFF]))


def other_tokenizer(ctx):
  with open(os.path.join(copy_of(ctx), "tokenizer", "tokenizer.json"), "w") as f:
    json.dump({"type": "byte", "specials": ["<sep>"]}, f)


def no_checkpoints(ctx):
  shutil.rmtree(os.path.join(copy_of(ctx), "checkpoints"))


def broken_config_json(ctx):
  with open(os.path.join(copy_of(ctx), "config.json"), "w") as f:
    f.write('{"objective": "causal_lm", ')


def empty_dir(ctx):
  os.makedirs(os.path.join(ctx["tmp"], "copy"))
  ctx["copy"] = os.path.join(ctx["tmp"], "copy")


def unprepared_tfds(ctx):
  ctx["monkeypatch"].setenv("TFDS_DATA_DIR", os.path.join(ctx["data"], "tfds_empty"))


# --- The table: (id, argv, pattern the one stderr line must match, setup) ------------------

ROWS = [
    # Configs.
    ("unknown_key", [*NEW, "--config.train.stepz=5"], r"unknown config key 'train\.stepz'", None),
    ("unknown_section", [*NEW, "--config.trian.steps=5"], r"unknown config key 'trian'", None),
    ("wrong_type", [*NEW, "--config.train.steps=ten"], r"train\.steps: expected int, got 'ten'",
     None),
    ("float_for_int", [*NEW, "--config.train.steps=1.5"], r"train\.steps: expected int", None),
    ("bad_bool", [*NEW, "--config.train.async_checkpoints=maybe"], r"expected true/false", None),
    ("negative_steps", [*NEW, "--config.train.steps=-3"], r"train\.steps must be positive", None),
    ("zero_batch", [*NEW, "--config.train.batch_size=0"], r"train\.batch_size must be positive",
     None),
    ("seq_len_over_max_len", [*NEW, "--config.data.seq_len=64"],
     r"data\.seq_len=64 exceeds model\.max_len=32", None),
    ("batch_vs_accumulation", [*NEW, "--config.optim.accumulate_steps=3"],
     r"multiple of optim\.accumulate_steps=3", None),
    ("batch_not_divisible_over_shards", [*NEW, "--config.train.batch_size=4"],
     r"batch_size=4 must divide evenly over 8 data-parallel shards", None),
    ("mesh_does_not_fit", [*NEW, "--config.mesh.fsdp=3"], r"does not fit 8 devices", None),
    ("mesh_wrong_device_count", [*NEW, "--config.mesh.data=3"],
     r"needs 3 devices but 8 are available", None),
    ("mesh_zero", [*NEW, "--config.mesh.tensor=0"], r"mesh sizes .* are invalid", None),
    ("mesh_rules_unknown", [*NEW, "--config.mesh.rules=zigzag"],
     r"mesh\.rules='zigzag' is not a preset", None),
    ("lr_infinite", [*NEW, "--config.optim.lr=1e999"], r"optim\.lr must be a positive finite",
     None),
    ("lr_negative", [*NEW, "--config.optim.lr=-0.1"], r"optim\.lr must be a positive", None),
    ("nonfinite_policy", [*NEW, "--config.train.nonfinite=ignore"],
     r"train\.nonfinite='ignore' is not one of", None),
    ("max_consecutive_skips_zero", [*NEW, "--config.train.max_consecutive_skips=0"],
     r"train\.max_consecutive_skips must be >= 1", None),
    ("objective_unknown", [*NEW, "--config.objective=diffusion"],
     r"objective 'diffusion' is unknown", None),
    ("vocab_too_small", [*NEW, "--config.model.vocab_size=100"],
     r"model\.vocab_size=100 is smaller than the tokenizer's 256", None),
    ("heads_do_not_divide", [*NEW, "--config.model.num_heads=3"],
     r"d_model=32 must be divisible by model\.num_heads=3", None),
    ("config_file_missing", ["train", "--config", "configs/nope.py", "--workdir", "{new}"],
     r"config file 'configs/nope\.py' not found", None),
    ("config_file_syntax", ["train", "--config", "{data}/config_syntax.py", "--workdir", "{new}"],
     r"config_syntax\.py' failed to load: SyntaxError", None),
    ("config_without_get_config",
     ["train", "--config", "{data}/config_nothing.py", "--workdir", "{new}"],
     r"has no get_config", None),
    ("config_file_json", ["train", "--config", "{trained}/config.json", "--workdir", "{new}"],
     r"config\.json' is not a Python file with get_config", None),
    ("config_size_unknown", ["train", "--config", GPT + ":huge", "--workdir", "{new}"],
     r"unknown size 'huge'", None),
    ("override_without_value", [*NEW, "--config.train.steps"], r"needs a value", None),
    ("invalid_utf8_policy", [*NEW, "--config.data.invalid_utf8=maybe"],
     r"data\.invalid_utf8='maybe' is not one of", None),
    ("over_length_policy", [*NEW, "--config.data.over_length=split"],
     r"data\.over_length='split' is not one of", None),
    ("max_doc_len_negative", [*NEW, "--config.data.max_doc_len=-1"],
     r"data\.max_doc_len must be >= 0", None),
    ("tokenizer_unknown", [*NEW, "--config.data.tokenizer=wordpiece"],
     r"unknown tokenizer 'wordpiece'", None),
    ("spm_model_missing", [*NEW, "--config.data.tokenizer=spm:/nowhere/x.model"],
     r"SentencePiece model '/nowhere/x\.model' not found", None),
    ("seed_negative", [*NEW, "--config.train.seed=-1"], r"train\.seed must be in \[0, 2\*\*32\)",
     None),
    # CLI flags.
    ("train_without_workdir", ["train", "--config", GPT], r"required: --workdir", None),
    ("train_unknown_flag", [*NEW, "--frobnicate"], r"unrecognized argument '--frobnicate'", None),
    ("eval_unknown_flag", ["eval", "--workdir", "{trained}", "--frob"],
     r"unrecognized arguments: --frob", None),
    ("no_subcommand", [], r"required: command", None),
    ("unknown_subcommand", ["fly"], r"invalid choice: 'fly'", None),
    ("top_p_out_of_range", ["generate", "--workdir", "{trained}", "--prompt", "x", "--top-p", "1.5"],
     r"0 < --top-p <= 1", None),
    ("top_k_not_int", ["generate", "--workdir", "{trained}", "--prompt", "x", "--top-k", "abc"],
     r"invalid int value: 'abc'", None),
    ("max_new_tokens_zero",
     ["generate", "--workdir", "{trained}", "--prompt", "x", "--max-new-tokens", "0"],
     r"--max-new-tokens and --num-samples must be positive", None),
    ("temperature_negative",
     ["generate", "--workdir", "{trained}", "--prompt", "x", "--temperature", "-1"],
     r"--temperature >= 0", None),
    ("multihost_incomplete", [*NEW, "--num-processes", "2"], r"multi-host needs all of", None),
    ("workdir_is_a_file", ["train", "--config", GPT, "--workdir", "{data}/a_file", *TINY],
     r"cannot create --workdir .*a_file", None),
    # Data files and specs.
    ("data_missing", [*NEW, "--config.data.source=file:{data}/nope.txt"],
     r"nope\.txt' does not exist", None),
    ("data_empty", [*NEW, "--config.data.source=file:{data}/empty.txt"], r"empty\.txt' is empty",
     None),
    ("data_directory", [*NEW, "--config.data.source=file:{data}/subdir.txt"],
     r"subdir\.txt' is a directory", None),
    ("data_not_utf8", [*NEW, "--config.data.source=file:{data}/latin1.txt"],
     r"latin1\.txt' is not UTF-8 \(byte 0xe9 at offset 3, line 1\)", None),
    ("data_not_utf8_all_skipped",
     [*NEW, "--config.data.source=file:{data}/all_bad.txt", "--config.data.invalid_utf8=skip"],
     r"no documents left after skipping 2 with invalid UTF-8", None),
    ("jsonl_bad_line", [*NEW, "--config.data.source=file:{data}/bad_line.jsonl"],
     r"bad_line\.jsonl' line 2 is not valid JSON", None),
    ("jsonl_without_text", [*NEW, "--config.data.source=file:{data}/no_text.jsonl"],
     r"line 1 has no 'text' key", None),
    ("jsonl_lone_surrogate", [*NEW, "--config.data.source=file:{data}/surrogate.jsonl"],
     r"document 1 holds invalid Unicode", None),
    ("csv_without_text_column", [*NEW, "--config.data.source=file:{data}/no_text.csv"],
     r"has no 'text' column \(columns: id, body\)", None),
    ("data_unsupported_extension", [*NEW, "--config.data.source=file:{data}/docs.parquet"],
     r"unsupported data file", None),
    ("data_spec_unknown", [*NEW, "--config.data.source=s3://bucket/docs"],
     r"unknown data spec 's3://bucket/docs'", None),
    ("tfds_spec_incomplete", [*NEW, "--config.data.source=tfds:lm1b"], r"bad TFDS spec 'tfds:lm1b'",
     None),
    ("tfds_unknown_name", [*NEW, "--config.data.source=tfds:no_such_dataset_xyz:train"],
     r"unknown TFDS dataset 'no_such_dataset_xyz'", None),
    ("tfds_not_prepared", [*NEW, "--config.data.source=tfds:imdb_reviews:train"],
     r"'imdb_reviews' split 'train' is not prepared", unprepared_tfds),
    ("eval_source_missing", [*NEW, "--config.data.eval_source=file:{data}/gone.jsonl"],
     r"gone\.jsonl' does not exist", None),
    ("eval_data_flag_bad", ["eval", "--workdir", "{trained}", "--data", "file:{data}/empty.txt"],
     r"empty\.txt' is empty", None),
    ("tokenizer_data_missing",
     ["tokenizer", "--data", "file:{data}/nope.txt", "--vocab-size", "300", "--out", "{new}/spm"],
     r"nope\.txt' does not exist", None),
    # Checkpoints and workdirs.
    ("only_checkpoint_corrupt", ["eval", "--workdir", "{copy}"],
     r"no intact checkpoint .*step 2: file state/.* (sha256|bytes)", only_checkpoint_corrupt),
    ("resume_other_width", [*RESUME, "--config.model.d_model=64"],
     r"checkpoint step 2 .* does not fit this run: model\.d_model 32 -> 64.*has shape", None),
    ("resume_other_vocab", [*RESUME, "--config.model.vocab_size=300"],
     r"does not fit this run: model\.vocab_size 260 -> 300", None),
    ("resume_other_tokenizer", [*RESUME[:3], "--workdir", "{copy}", *TINY],
     r"does not fit this run: tokenizer fingerprint", other_tokenizer),
    ("eval_other_tokenizer", ["eval", "--workdir", "{copy}"], r"tokenizer fingerprint",
     other_tokenizer),
    ("resume_other_tokenizer_spec", [*RESUME, "--config.data.tokenizer=spm-train:300"],
     r"data\.tokenizer='spm-train:300', but the checkpoints .* were trained with 'byte'", None),
    ("resume_other_seq_len", [*RESUME, "--config.data.seq_len=16"],
     r"data settings changed since the checkpoint \(seq_len: 32 -> 16\)", None),
    ("eval_without_checkpoint", ["eval", "--workdir", "{copy}"], r"has no checkpoint yet",
     no_checkpoints),
    ("eval_missing_workdir", ["eval", "--workdir", "{new}"], r"workdir .* does not exist", None),
    ("generate_on_empty_dir", ["generate", "--workdir", "{copy}", "--prompt", "hi"],
     r"holds no config\.json", empty_dir),
    ("eval_broken_config_json", ["eval", "--workdir", "{copy}"], r"config\.json' is not a valid config",
     broken_config_json),
    # Prompts.
    ("prompt_too_long", ["generate", "--workdir", "{trained}", "--prompt", "x" * 40,
                         "--max-new-tokens", "5"],
     r"prompt \(40 tokens\) \+ --max-new-tokens 5 exceeds the model context of 32", None),
    ("prompt_empty", ["generate", "--workdir", "{trained}", "--prompt", ""],
     r"the prompt is empty", None),
    ("prompt_not_utf8", ["generate", "--workdir", "{trained}", "--prompt", "caf\udce9"],
     r"--prompt is not valid UTF-8", None),
]


def test_the_table_is_large_and_ids_are_unique():
  assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("argv, pattern, setup", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line(argv, pattern, setup, trained, data, tmp_path, capsys,
                                         monkeypatch):
  ctx = {"new": str(tmp_path / "new_workdir"), "trained": trained, "data": str(data),
         "tmp": str(tmp_path), "monkeypatch": monkeypatch, "copy": None}
  if setup is not None:
    setup(ctx)
  args = [a.format(**ctx) if isinstance(a, str) else a for a in argv]
  workdir = args[args.index("--workdir") + 1] if "--workdir" in args else None
  before = tree_digest(workdir) if workdir and os.path.isdir(workdir) else None
  existed = workdir is not None and os.path.exists(workdir)
  capsys.readouterr()

  code = run_main(args)

  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert code == 2, (out[-1000:], err[-2000:])
  assert len(lines) == 1 and lines[0].startswith("tx-jax: error: "), err[-2000:]
  assert re.search(pattern, lines[0]), lines[0]
  assert "Traceback" not in out + err
  if before is not None:
    assert tree_digest(workdir) == before, "the workdir changed"
  elif workdir is not None:
    assert os.path.exists(workdir) == existed, "a partial workdir was left behind"
