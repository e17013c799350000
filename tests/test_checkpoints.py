"""Checkpoint integrity in process: damaged steps, keep-N, compatibility, the golden checkpoint."""

import hashlib
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax.errors import UserError
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train.trained import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def largest_file(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != ckpt_lib.MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


# --- Checkpoint integrity, in process ----------------------------------------------------

def tiny_state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "count": jnp.int32(value)}


def data_at(position):
  """A grain iterator over 0, 1, 2, ... that has yielded `position` elements."""
  iterator = iter(grain.MapDataset.range(1000).to_iter_dataset())
  for _ in range(position):
    next(iterator)
  return iterator


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  d = tmp_path_factory.mktemp("two_steps") / "checkpoints"
  with ckpt_lib.Checkpointer(str(d), async_save=True) as c:
    for step in (1, 2):
      c.save(step, tiny_state(step), data_at(10 * step), {"objective": "x"})
  return d


def corrupt(step_dir, how):
  victim = largest_file(step_dir)
  if how == "flip":
    flip_byte(victim)
  elif how == "truncate":
    victim.write_bytes(victim.read_bytes()[:-7])
  elif how == "delete":
    victim.unlink()
  elif how == "unsealed":
    (step_dir / ckpt_lib.MANIFEST).unlink()


@pytest.mark.parametrize("how, reason", [
    ("flip", "does not match its sha256"), ("truncate", "bytes, expected"),
    ("delete", "is missing"), ("unsealed", "no manifest.json")])
def test_damaged_newest_step_is_named_and_the_previous_restored(two_steps, tmp_path, capsys, how,
                                                                 reason):
  d = tmp_path / "checkpoints"
  shutil.copytree(two_steps, d)
  corrupt(d / "2", how)
  with ckpt_lib.Checkpointer(str(d)) as c:
    assert c.verify(1) is None
    good, rejected = c.newest_good_step()
    assert (good, rejected) == (1, [2])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 2" in err[0] and reason in err[0] and "using step 1" in err[0]
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      tiny_state(0))
    data = data_at(0)
    state, _ = c.restore(good, abstract, data)
    np.testing.assert_array_equal(state["w"], np.ones((4, 3), np.float32))
    assert next(data) == 10  # step 1 saved the iterator after 10 elements
    c.set_aside(rejected)
    assert c.steps() == [1] and (tmp_path / "checkpoints_rejected" / "2").is_dir()
    c.save(2, tiny_state(5), data_at(0), {})  # the step can be written again
  with ckpt_lib.Checkpointer(str(d)) as c:
    assert c.newest_good_step() == (2, [])


def test_no_intact_checkpoint_is_a_user_error(two_steps, tmp_path):
  d = tmp_path / "checkpoints"
  shutil.copytree(two_steps, d)
  corrupt(d / "1", "flip")
  corrupt(d / "2", "delete")
  with ckpt_lib.Checkpointer(str(d)) as c, pytest.raises(UserError, match="no intact checkpoint"):
    c.newest_good_step()


def test_keep_n_never_prunes_the_newest_sealed_step(tmp_path):
  d = tmp_path / "checkpoints"
  with ckpt_lib.Checkpointer(str(d), keep=1, async_save=True) as c:
    c.save(1, tiny_state(1), data_at(1), {})
    c.save(2, tiny_state(2), data_at(2), {})
    c.wait()
    assert c.steps() == [1, 2]  # 2 was unsealed while saving: 1 stayed
    (d / "2" / ckpt_lib.MANIFEST).unlink()  # as if the run died before sealing 2
    c.save(3, tiny_state(3), data_at(3), {})
    c.wait()
    assert 1 in c.steps() and 3 in c.steps() and 2 not in c.steps()
    c.save(4, tiny_state(4), data_at(4), {})
    c.wait()
    assert c.steps() == [3, 4]
  assert not [n for n in os.listdir(d) if not n.isdigit()]


def test_incompatible_checkpoint_is_refused_by_name(two_steps, tmp_path):
  d = tmp_path / "checkpoints"
  shutil.copytree(two_steps, d)
  wrong = {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32),
           "count": jax.ShapeDtypeStruct((), jnp.int32)}
  with ckpt_lib.Checkpointer(str(d)) as c:
    with pytest.raises(UserError, match=r"w has shape \(4, 3\) in the checkpoint, \(4, 5\) here"):
      c.check_compatible(2, wrong, {"objective": "x"})
    with pytest.raises(UserError, match="objective 'x' -> 'y'"):
      c.check_compatible(2, jax.eval_shape(lambda: tiny_state(0)), {"objective": "y"})


# --- Golden checkpoint: every version must read it -----------------------------------------

GOLDEN_STEP = 2
GOLDEN_PARAM_SHA256 = {
    "['decoder']['block_00']['mlp']['wi']['bias']": '760836d5913cbd93bb36441fa2e170a4826b349e3d5b236cfc4998f26f49c86f',
    "['decoder']['block_00']['mlp']['wi']['kernel']": '62048cf9eba761a92686d1c0a263160c400428e5ea9d08dda854959a585dee87',
    "['decoder']['block_00']['mlp']['wo']['bias']": 'e11c7e3005a5fc1a35341cdca3a96b0a417ecbeb00bc3cf8f0d33a7a04e67298',
    "['decoder']['block_00']['mlp']['wo']['kernel']": '7d78b1716ceef376e6cfb26126f2a5068d2b08ef1245f6860bfa99769ba07203',
    "['decoder']['block_00']['mlp_norm']['bias']": '783be7bf3600816a80895869620b37254e51734a1c6ee91c0589c79c0c92fd7f',
    "['decoder']['block_00']['mlp_norm']['scale']": 'ca2e4ee2fa2cdde849e868b7b631a032dab7bcac7d40d3a695486ececea02f07',
    "['decoder']['block_00']['self_attn']['key']['bias']": '9549ae8e12afeb8b760ba5709bb6e98fa22f9c31485df9aa273d6d35e8771032',
    "['decoder']['block_00']['self_attn']['key']['kernel']": '57efeded986cd869086fc875332191dd7171c4909ffd21c85c4239876e1977f4',
    "['decoder']['block_00']['self_attn']['out']['bias']": 'fca792cc1dca86f586460fa900d6b4791801d96dba091666f8e4bad07dee0201',
    "['decoder']['block_00']['self_attn']['out']['kernel']": '2b7aa34f5de370e1758bf94905e4689e913f2d4f9f9b887a2444ab607d4c026d',
    "['decoder']['block_00']['self_attn']['query']['bias']": '62cfde0720a8d1a5ca089e95b54cfc11f374865a24b61c80176f9b5e235606b5',
    "['decoder']['block_00']['self_attn']['query']['kernel']": 'cdad6821b493033251072c90a62dcadc29ce3eb99316df959e66b8a66597821a',
    "['decoder']['block_00']['self_attn']['value']['bias']": 'f032df3849fa5d08dd5654c494f4aef1ca270bcbf16db7606e17f158b60cff1a',
    "['decoder']['block_00']['self_attn']['value']['kernel']": 'e05589f54fbc7f245b96a6354834fb556a86c9d9433b54ec2faa7b4bbe0ca3e4',
    "['decoder']['block_00']['self_attn_norm']['bias']": '42b57a16a98a462ba2ce3ea8ef7604fb06f6cff0fd93fa947e34b807859cc8df',
    "['decoder']['block_00']['self_attn_norm']['scale']": 'a0b02da18562077065eb6c9e96d90b8ed7006ab60ec0491b1fb71f5f770c57ba',
    "['embedder']['pos']['embedding']": 'c5fac80f62edea0aadbee7ea09d5a5dfdf9a80c07752d04237d6364b03376ca0',
    "['embedder']['tokens']['embedding']": '04d3b4d6fdbaf77ad87e117b76d88473d0c24c0b8389044233ce7f63c81cefd6',
    "['final_norm']['bias']": '8713cf35998d0108e607da87ef1858194748a5d5d54334d1df3d9b886cf49ddf',
    "['final_norm']['scale']": 'e7959a90726f52827e9ba0e0234e1812717a769aa130dca9178ddd029e61cb94',
}


def test_golden_checkpoint_restores_exactly(tmp_path):
  golden = os.path.join(ROOT, "tests", "golden", "gpt_tiny")
  workdir = tmp_path / "golden"
  shutil.copytree(golden, workdir)  # read from a copy: a reader must not need write access
  trained = load_trained(str(workdir))
  assert trained.step == GOLDEN_STEP
  leaves = jax.tree_util.tree_flatten_with_path(trained.params)[0]
  got = {jax.tree_util.keystr(p): hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
         for p, x in leaves}
  assert got == GOLDEN_PARAM_SHA256
  assert np.asarray(trained.params["embedder"]["tokens"]["embedding"]).shape == (256, 8)
  # The manifest still verifies, and reading changed nothing.
  with ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True) as c:
    assert c.verify(GOLDEN_STEP) is None
