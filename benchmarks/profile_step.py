"""Where a train step's time goes on this machine: a jax.profiler trace, op by op.

  python benchmarks/profile_step.py [--config configs/gpt.py:bench] [--steps 3]

Times the objective's forward (loss), forward + backward (value_and_grad) and the
loop's whole jitted step apart, then traces `--steps` steps with jax.profiler,
joins each traced XLA op to its fusion in the compiled HLO, and sums the time by
kind: matmuls (dot fusions), the attention-score elementwise work (softmax,
masks on B x N x T x S arrays), transposes and copies, reductions, other
elementwise. Times are summed over the runtime's worker threads and include the
tracer's own overhead, so they add up to more than a step's wall time; the
shares are what to read. Writes benchmarks/results/NAME_profile.{json,md}, NAME
from `--name` or else the config.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax

from tx_jax.train import config as config_lib
from tx_jax.train.benchmark import synthetic_setup

HERE = os.path.dirname(os.path.abspath(__file__))


def median_ms(fn, n=10) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (its shape, the opcodes of what it computes, joined)."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)}
  ops = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?(\S+) = (\S+) ([\w-]+)\((.*)$", hlo, re.M):
    name, shape, opcode, rest = m.groups()
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    inner = bodies.get(calls.group(1), "") if calls else ""
    inner_ops = set(re.findall(r"= \S+ ([\w-]+)\(", inner)) | {opcode}
    operand_shapes = re.findall(r"= (\S+) parameter", inner)
    ops[name] = (" ".join([shape, *operand_shapes]), " ".join(sorted(inner_ops)))
  return ops


def kind(shapes: str, opcodes: str, score_shape: str) -> str:
  words = set(opcodes.split())
  if {"dot", "convolution"} & words:
    return "matmuls"
  if score_shape in shapes:
    return "attention scores (softmax, masks)"
  if {"transpose", "copy"} & words:
    return "transposes and copies"
  if {"reduce", "reduce-window"} & words:
    return "reductions"
  return "other elementwise"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/gpt.py:bench")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--name", default="",
                 help="results/NAME_profile.{json,md}; default from the config")
  args = p.parse_args()
  config, objective, mesh, rules, state, batch, step = synthetic_setup(
      config_lib.load_config_file(args.config))
  b, t = config.train.batch_size, config.data.get("seq_len", 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    rng = jax.random.PRNGKey(0)
    loss = lambda params: objective.loss_fn(params, batch, rng, True)[0]
    fwd, grad = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(state, batch).compile()
    holder = {"state": state}

    def run_step():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics

    wall = {"forward_ms": median_ms(lambda: fwd(state.params)),
            "forward_backward_ms": median_ms(lambda: grad(state.params)),
            "train_step_ms": median_ms(run_step)}
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp, create_perfetto_trace=True)
      for _ in range(args.steps):
        jax.block_until_ready(run_step())
      jax.profiler.stop_trace()
      trace = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))[0]
      with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
  ops = hlo_ops(compiled.as_text())
  heads = config.model.get("num_heads", 1)
  score_shape = f"{b},{heads},{t},{t}]"
  by_kind, by_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      by_op[e["name"]] += e["dur"] / 1e3 / args.steps
      by_kind[kind(*ops[e["name"]], score_shape)] += e["dur"] / 1e3 / args.steps
  total = sum(by_kind.values())
  name = args.name or args.config.split("/")[-1].replace(".py", "").replace(":", "_")
  result = {"config": args.config, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "jax": jax.__version__, **wall, "traced_ms_by_kind": dict(by_kind.most_common()),
            "top_ops_ms": {k: [round(v, 2), *ops[k]] for k, v in by_op.most_common(25)}}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", f"{name}_profile.json"), "w") as f:
    json.dump(result, f, indent=2)
  rows = "".join(f"| {k} | {v:.1f} | {v / total:.0%} |\n" for k, v in by_kind.most_common())
  md = (f"# Train step profile: `{args.config}` ({result['machine']}, jax {jax.__version__})"
        f"\n\nforward {wall['forward_ms']:.0f} ms, forward + backward "
        f"{wall['forward_backward_ms']:.0f} ms, whole step {wall['train_step_ms']:.0f} ms "
        f"(medians of 10, untraced).\n\n| traced ops | ms per step (summed over threads) "
        f"| share |\n|---|---|---|\n{rows}")
  with open(os.path.join(HERE, "results", f"{name}_profile.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
