"""Orbax checkpoints that are verified before use: state + data-iterator state + metadata.

Layout: `checkpoints/<step>/{state,data,meta}` (orbax, written to a temporary
directory and renamed when complete) plus `checkpoints/<step>/manifest.json`,
the size and sha256 of every file of the step. Writing the manifest *seals* the
step; it happens right after orbax finalises it (a background thread for async
saves), and only sealed steps whose files still match are restored. A newest
step that is unsealed (the process died while saving), truncated, bit-flipped
or missing a file is named in one warning line and the newest good step before
it is used; training then moves the rejected steps to `checkpoints_rejected/`
so those steps can be written again, while eval/generate leave them alone.

Keep-N pruning keeps the newest N steps *and* the newest sealed one, so it
never deletes the last verified checkpoint. `check_compatible` refuses a
checkpoint whose objective, tokenizer, architecture or array shapes differ from
the run's, with a message instead of a shape traceback from deep in orbax.

Restoring takes an abstract state whose leaves (scalars included) carry the
*target* shardings, so a checkpoint written on one mesh restores onto any other
and nothing lands on a single device by default. The data-iterator state is
per process (grain's handler: `data/process_<i>-of-<n>.json`), since every
host reads its own shard of the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from tx_jax.errors import IOFailure, UserError, describe_io_error, is_io_error

MANIFEST = "manifest.json"
REJECTED_DIR_SUFFIX = "_rejected"
# Architecture fields that change how a model runs but not what it is; a
# checkpoint may be resumed or evaluated with them changed.
RUNTIME_MODEL_FIELDS = frozenset({"dtype", "remat", "attention_impl", "dropout_rate"})


class _QuietOrbaxIOErrors(logging.Filter):
  """Drops orbax's own log lines about a failed write: the run reports it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(s in message for s in ("os_error_code", "No space left", "Failed to run",
                                          "failed.", "Disk quota"))


logging.getLogger("absl").addFilter(_QuietOrbaxIOErrors())


def _quiet_closed_loop_hook(previous):
  """sys.excepthook that drops 'Event loop is closed' from tensorstore's callbacks.

  When one write of a save fails (a full disk), orbax closes its event loop while
  tensorstore still completes the step's other writes; each completion prints that
  traceback. The failed save itself is reported in one line (see _fail_save).
  """
  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    previous(kind, value, tb)
  hook.tx_jax_quiet = True
  return hook


if not getattr(sys.excepthook, "tx_jax_quiet", False):
  sys.excepthook = _quiet_closed_loop_hook(sys.excepthook)


@dataclasses.dataclass
class _KeepNewestSealed:
  """Orbax preservation policy: the newest `n` steps plus the newest sealed step."""
  n: int
  is_sealed: Callable[[int], bool]

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    keep = [i >= len(checkpoints) - self.n for i in range(len(checkpoints))]
    for i in reversed(range(len(checkpoints))):
      if self.is_sealed(checkpoints[i].step):
        keep[i] = True
        break
    return keep


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints` that seals and verifies steps.

  Use as a context manager (or call close()): leaving waits for the last async
  save, seals it, and removes orbax temporary directories an exception may
  have left behind.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self._sealer: threading.Thread | None = None
    self._seal_error: BaseException | None = None
    # Orbax would remove them in a background thread, which races with the removal
    # of a failed first run's workdir; here it happens before anything else.
    self._remove_tmp_dirs()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(  # (orbax's read_only mode logs warnings)
            create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,
            preservation_policy=_KeepNewestSealed(keep, self.is_sealed)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --- Steps on disk -----------------------------------------------------------

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step on disk, verified or not (see newest_good_step)."""
    return self.manager.latest_step()

  def is_sealed(self, step: int) -> bool:
    return os.path.isfile(os.path.join(self.step_dir(step), MANIFEST))

  def verify(self, step: int) -> str | None:
    """None if step's files match its manifest, else why not (a short phrase)."""
    path = self.step_dir(step)
    try:
      with open(os.path.join(path, MANIFEST)) as f:
        expected = {rel: (int(e["size"]), str(e["sha256"]))
                    for rel, e in json.load(f)["files"].items()}
    except FileNotFoundError:
      return "it has no manifest.json (the run stopped before the save completed)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return "its manifest.json is unreadable"
    present = set(_files_under(path)) - {MANIFEST}
    for rel, (size, _) in sorted(expected.items()):  # cheap checks first
      if rel not in present:
        return f"file {rel} is missing"
      if os.path.getsize(os.path.join(path, rel)) != size:
        return (f"file {rel} has {os.path.getsize(os.path.join(path, rel))} bytes, expected "
                f"{size} (truncated?)")
    extra = sorted(present - set(expected))
    if extra:
      return f"file {extra[0]} is not in its manifest"
    for rel, (_, sha256) in sorted(expected.items()):
      if _sha256(os.path.join(path, rel)) != sha256:
        return f"file {rel} does not match its sha256 (corrupted)"
    return None

  def newest_good_step(self) -> tuple[int | None, list[int]]:
    """(newest step that verifies or None, newer steps that failed).

    Warns in one stderr line when steps were passed over; raises UserError when
    steps exist but none verifies, except in a writable run where none was ever
    sealed (a kill during the first save): those are all returned as rejected,
    so training starts over. Every process gets process 0's answer.
    """
    good, reasons, unsealed_only = None, [], True
    if jax.process_index() == 0:
      for step in reversed(self.steps()):
        reason = self.verify(step)
        if reason is None:
          good = step
          break
        reasons.append(f"step {step}: {reason}")
        unsealed_only = unsealed_only and not self.is_sealed(step)
    if jax.process_count() > 1:  # -1: no steps at all; -2: none verifies; -3: none sealed
      from jax.experimental import multihost_utils
      code = good if good is not None else (
          -1 if not reasons else -3 if unsealed_only else -2)
      code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
      good = code if code >= 0 else None
      unsealed_only = code == -3
      if code in (-2, -3) and not reasons:
        reasons = ["see process 0"]
    if reasons and good is None and unsealed_only and not self.read_only:
      # Killed during the very first save: nothing was ever complete, so start over.
      sys.stderr.write(f"tx-jax: warning: skipping checkpoint {'; '.join(reasons)}; "
                       f"starting from step 0\n")
      return None, self.steps()
    if reasons and good is None:
      raise UserError(f"no intact checkpoint in {self.directory} ({'; '.join(reasons)}); "
                      f"move the directory away to start over, or use a new --workdir")
    if reasons:
      sys.stderr.write(f"tx-jax: warning: skipping checkpoint {'; '.join(reasons)}; "
                       f"using step {good}\n")
    rejected = [s for s in self.steps() if good is not None and s > good]
    return good, rejected

  def set_aside(self, steps: list[int]):
    """Moves rejected steps to `checkpoints_rejected/` so training can write them again."""
    if not steps or self.read_only:
      return
    if jax.process_index() == 0:
      rejected_root = self.directory + REJECTED_DIR_SUFFIX
      os.makedirs(rejected_root, exist_ok=True)
      for step in steps:
        target, n = os.path.join(rejected_root, str(step)), 1
        while os.path.exists(target):
          target, n = os.path.join(rejected_root, f"{step}.{n}"), n + 1
        os.replace(self.step_dir(step), target)
    _sync("tx_jax_set_aside")
    self.manager.reload()

  # --- Compatibility --------------------------------------------------------------

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def check_compatible(self, step: int, abstract_state, meta: dict) -> list[str]:
    """Raises UserError if step cannot be restored into `abstract_state` for `meta`.

    Returns the run-time-only model changes (dtype, remat, ...) it allows.
    """
    saved = self.read_meta(step)
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as stored
    problems, allowed = [], []
    if saved.get("objective") != meta.get("objective"):
      problems.append(f"objective {saved.get('objective')!r} -> {meta.get('objective')!r}")
    for key in sorted(set(saved.get("model", {})) | set(meta.get("model", {}))):
      old, new = saved.get("model", {}).get(key), meta.get("model", {}).get(key)
      if old != new:
        (allowed if key in RUNTIME_MODEL_FIELDS else problems).append(
            f"model.{key} {old!r} -> {new!r}")
    if saved.get("tokenizer") != meta.get("tokenizer"):
      problems.append(f"tokenizer fingerprint {saved.get('tokenizer')} -> "
                      f"{meta.get('tokenizer')} (the tokenizer differs from the trained one)")
    problems += _shape_problems(self._saved_shapes(step), _shapes(abstract_state))[:3]
    if problems:
      raise UserError(f"checkpoint step {step} in {self.directory} does not fit this run: "
                      f"{'; '.join(problems)}; restore those settings or use a new --workdir")
    return allowed

  def _saved_shapes(self, step: int) -> dict[str, tuple]:
    tree = self.manager.item_metadata(step)["state"].tree
    return _shapes(tree)

  # --- Save and restore ---------------------------------------------------------

  def save(self, step: int, state, data_iterator, meta: dict, force: bool = False) -> bool:
    """Starts saving `step` (async if enabled); it is sealed once orbax finalises it.

    `data_iterator` is a grain DatasetIterator; its state is written now. None
    (an imported model's step 0) writes no data position: a run from such a
    step starts its data from the beginning.
    """
    self.wait()
    self._needs_bytes = self._size_estimate(state)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          **({} if data_iterator is None else
             {"data": grain.checkpoint.CheckpointSave(data_iterator)})), force=force)
    except Exception as e:  # pylint: disable=broad-except
      if is_io_error(e):
        self._fail_save(step, e)
      raise
    if saved:
      self._sealer = threading.Thread(target=self._finish_and_seal, args=(step,),
                                      name=f"seal_checkpoint_{step}", daemon=True)
      self._sealer.start()
    return saved

  def _finish_and_seal(self, step: int):
    try:
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        _write_manifest(self.step_dir(step))
    except BaseException as e:  # re-raised in the main thread by wait()
      self._seal_error = (step, e)

  def restore(self, step: int, abstract_state, data_iterator=None) -> tuple[Any, dict]:
    """(state, meta) of `step`, onto the shardings carried by `abstract_state`'s leaves.

    With a `data_iterator`, also sets it to this process's saved position.
    """
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      if not os.path.isfile(os.path.join(self.step_dir(step), "data", name)):
        raise UserError(f"checkpoint step {step} holds no data position for process "
                        f"{jax.process_index()} of {jax.process_count()}: it was written by a "
                        f"different number of processes; resume with that many or use a new "
                        f"--workdir")
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]

  def wait(self):
    """Blocks until the last save is on disk and sealed."""
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None
    if self._seal_error is not None:
      (step, error), self._seal_error = self._seal_error, None
      if is_io_error(error):
        self._fail_save(step, error)
      raise error

  # --- Failed saves (disk full, I/O errors) ---------------------------------------

  def _size_estimate(self, state) -> int:
    """Bytes the next step takes: the newest sealed step's files, else the state's arrays."""
    for step in reversed(self.steps()):
      try:
        with open(os.path.join(self.step_dir(step), MANIFEST)) as f:
          return sum(int(e["size"]) for e in json.load(f)["files"].values())
      except (OSError, ValueError, KeyError, TypeError):
        continue
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(state))

  def _fail_save(self, step: int, error: BaseException):
    """Removes what the failed save of `step` left and raises one IOFailure line."""
    try:
      self.manager.wait_until_finished()  # let orbax's other writes end before removing
    except Exception:  # pylint: disable=broad-except
      pass
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name == str(step) or name.startswith(f"{step}{ocp.step.TMP_DIR_SUFFIX}"):
          path = os.path.join(self.directory, name)
          if name != str(step) or not self.is_sealed(step):
            _remove_tree(path)
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    sealed = [s for s in self.steps() if s != step and self.is_sealed(s)]
    kept = ("the partial step was removed; the newest sealed checkpoint, step "
            f"{max(sealed)}, is intact" if sealed else
            "the partial step was removed; no checkpoint had been sealed yet")
    raise IOFailure(describe_io_error(error, f"saving checkpoint step {step} to",
                                      self.step_dir(step), getattr(self, "_needs_bytes", None),
                                      kept)) from None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
      self._remove_tmp_dirs()  # left by an exception inside a save

  def _remove_tmp_dirs(self):
    """Removes orbax's temporary step directories (saves that never completed)."""
    if self.read_only or jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ocp.step.TMP_DIR_SUFFIX in name:
        _remove_tree(os.path.join(self.directory, name))


def _remove_tree(path: str, tries: int = 5):
  """rmtree that tries again while a write still in flight (orbax's background save
  after a failure) puts files back into the tree being removed."""
  for _ in range(tries):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      return
    time.sleep(0.2)


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs that carry target shardings, for restore and jit init."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


# --- Manifests ------------------------------------------------------------------


def _files_under(path: str) -> list[str]:
  out = []
  for root, _, names in os.walk(path):
    out += [os.path.relpath(os.path.join(root, n), path) for n in names]
  return sorted(out)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _write_manifest(step_dir: str):
  """Atomically writes step_dir/manifest.json: size and sha256 of every other file."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _files_under(step_dir) if not rel.startswith(MANIFEST)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))
  dir_fd = os.open(step_dir, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


# --- Shapes -----------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """{"params/decoder/.../kernel": shape} for arrays, abstract arrays or orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def _shape_problems(saved: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
  out = []
  for name in sorted(set(saved) | set(wanted)):
    if name not in saved:
      out.append(f"{name} is missing from the checkpoint")
    elif name not in wanted:
      out.append(f"{name} is in the checkpoint but not in this model")
    elif saved[name] != wanted[name]:
      out.append(f"{name} has shape {saved[name]} in the checkpoint, {wanted[name]} here")
  return out


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
