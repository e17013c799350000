"""How much of the GPT bench step PyTorch leaves to beat: its eager step by kind of op,
and the step's projection matmuls timed alone under XLA and PyTorch.

  python benchmarks/ceiling_cpu.py [--rounds 3] [--name ceiling_cpu]

The shape is `configs/gpt.py:bench` as `torch_reference.py` builds it (4 layers, d
256, MLP 1024, batch 8 x 256 tokens, fp32, tied 256-token head). Each round runs one
fresh process per framework (XLA, then PyTorch, alternating): every projection
matmul of a train step in its three forms (forward x W, input gradient dY W^T,
weight gradient X^T dY) is timed alone (median of 30), and the PyTorch process also
profiles 5 eager train steps (`torch.profiler`, self time by op). From those, the
step time that 1.2x PyTorch eager asks for, and what it leaves once the matmuls run
at PyTorch's speed. Writes benchmarks/results/NAME.{json,md}.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS, D, MLP, LAYERS, VOCAB = 8 * 256, 256, 1024, 4, 256
# (d_in, d_out) of each projection matmul and how many a step has: per layer query, key,
# value, out (D -> D), MLP in and out; the tied head (D -> vocab) once.
MATMULS = {(D, D): 4 * LAYERS + 1, (D, MLP): LAYERS, (MLP, D): LAYERS}
FORMS = ("forward x W", "input grad dY W^T", "weight grad X^T dY")
ATTENTION_FLOPS = 3 * 4 * LAYERS * ROWS * 256 * D   # 12 L d T per token, forward+backward


def timed(fn, n=30) -> float:
  """Median ms of fn() (fn blocks until its result is ready)."""
  fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def jax_worker() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from tx_jax import parallel  # pylint: disable=g-import-not-at-top
  from tx_jax.train.metrics import measure_peak_flops  # pylint: disable=g-import-not-at-top
  opts = parallel.compiler_options("cpu")
  dims = {FORMS[0]: (((1,), (0,)), ((), ())), FORMS[1]: (((1,), (1,)), ((), ())),
          FORMS[2]: (((0,), (0,)), ((), ()))}
  out = {}
  for (din, dout) in MATMULS:
    k = jax.random.split(jax.random.key(0), 3)
    x, dy = jax.random.normal(k[0], (ROWS, din)), jax.random.normal(k[1], (ROWS, dout))
    w = jax.random.normal(k[2], (din, dout))
    args = {FORMS[0]: (x, w), FORMS[1]: (dy, w), FORMS[2]: (x, dy)}
    for form, dn in dims.items():
      f = jax.jit(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn), compiler_options=opts)
      out[f"{din}x{dout} {form}"] = timed(lambda f=f, a=args[form]: f(*a).block_until_ready())
  return {"matmul_ms": out, "peak_flops": measure_peak_flops("float32"),
          "version": jax.__version__}


def torch_worker() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch.profiler import profile, ProfilerActivity  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  out = {}
  for (din, dout) in MATMULS:
    x, dy, w = torch.randn(ROWS, din), torch.randn(ROWS, dout), torch.randn(din, dout)
    fns = {FORMS[0]: lambda: x @ w, FORMS[1]: lambda: dy @ w.t(), FORMS[2]: lambda: x.t() @ dy}
    for form, fn in fns.items():
      out[f"{din}x{dout} {form}"] = timed(fn)
  torch.manual_seed(0)
  model = torch_reference.GPT(LAYERS, D, 4, MLP, 256, VOCAB)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
  tokens = torch.randint(0, VOCAB, (8, 256))
  targets = torch.randint(0, VOCAB, (8, 256))

  def step():  # as torch_reference.py times it
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tokens).view(-1, VOCAB), targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step_ms = timed(step, n=10)
  n = 5
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(n):
      step()
  kinds = collections.Counter()
  for e in prof.key_averages():
    if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
      kind = "matmuls (mm, addmm)"
    elif "scaled_dot_product" in e.key:
      kind = "fused attention (forward and backward)"
    else:
      kind = "everything else (GELU, LayerNorm, loss, AdamW, copies)"
    kinds[kind] += e.self_cpu_time_total / 1e3 / n
  return {"matmul_ms": out, "step_ms": step_ms, "profile_ms": dict(kinds),
          "version": torch.__version__}


def per_step(matmul_ms: dict) -> float:
  """ms of one step's projection matmuls, each form timed alone."""
  return sum(count * matmul_ms[f"{din}x{dout} {form}"]
             for (din, dout), count in MATMULS.items() for form in FORMS)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--name", default="ceiling_cpu")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(jax_worker() if args.worker == "jax" else torch_worker()))
    return
  load0 = os.getloadavg()[0]
  runs = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    for name in runs:
      out = subprocess.run([sys.executable, __file__, "--worker", name], check=True,
                           capture_output=True, text=True, cwd=os.path.dirname(HERE))
      runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
  med = lambda rs, *keys: statistics.median(_get(r, keys) for r in rs)
  mm = {name: {k: med(rs, "matmul_ms", k) for k in rs[0]["matmul_ms"]}
        for name, rs in runs.items()}
  torch_step = med(runs["torch"], "step_ms")
  profile_ms = {k: med(runs["torch"], "profile_ms", k) for k in runs["torch"][0]["profile_ms"]}
  peak = med(runs["jax"], "peak_flops")
  target = torch_step / 1.2
  result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "rounds": args.rounds,
            "jax": runs["jax"][0]["version"], "torch": runs["torch"][0]["version"],
            "matmul_ms": mm, "matmuls_per_step_ms": {k: per_step(v) for k, v in mm.items()},
            "torch_step_ms": torch_step, "torch_profile_ms": profile_ms,
            "peak_flops": peak, "step_ms_for_1_2x_torch_eager": target,
            "attention_ms_at_peak": ATTENTION_FLOPS / peak * 1e3,
            "load_average_1m": [load0, os.getloadavg()[0]], "runs": runs}
  left = target - result["matmuls_per_step_ms"]["torch"]
  result["ms_left_after_torch_speed_matmuls"] = left
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", args.name + ".json"), "w") as f:
    json.dump(result, f, indent=2)
  flops = lambda key: 2 * ROWS * int(key.split("x")[0]) * int(key.split()[0].split("x")[1])
  rows = "".join(
      f"| {k.split()[0]} | {' '.join(k.split()[1:])} | {mm['jax'][k]:.2f} "
      f"({flops(k) / mm['jax'][k] / 1e6:.0f}) | {mm['torch'][k]:.2f} "
      f"({flops(k) / mm['torch'][k] / 1e6:.0f}) |\n" for k in mm["jax"])
  prof_rows = "".join(f"| {k} | {v:.0f} |\n" for k, v in
                      sorted(profile_ms.items(), key=lambda kv: -kv[1]))
  per = result["matmuls_per_step_ms"]
  md = (f"# What 1.2x PyTorch eager asks of the GPT bench step ({result['machine']}, jax "
        f"{result['jax']}, torch {result['torch']})\n\n"
        f"PyTorch eager step: {torch_step:.0f} ms (median of 10); profiled, self time by "
        f"kind of op (ms per step, median of {args.rounds} processes):\n\n"
        f"| kind | ms |\n|---|---|\n{prof_rows}\n"
        f"Projection matmuls of one step ({ROWS} rows), each timed alone, ms (GFLOP/s):\n\n"
        f"| d_in x d_out | form | XLA (tx_jax's options) | PyTorch |\n|---|---|---|---|\n"
        f"{rows}\nPer step ({', '.join(f'{c} x {a}x{b}' for (a, b), c in MATMULS.items())}, "
        f"three forms each): XLA {per['jax']:.0f} ms, PyTorch {per['torch']:.0f} ms.\n\n"
        f"1.2x PyTorch eager is a {target:.0f}-ms step. With every projection matmul as fast "
        f"as PyTorch's, {left:.0f} ms would be left for the attention (its "
        f"{ATTENTION_FLOPS / 1e9:.1f} GFLOP alone take {result['attention_ms_at_peak']:.0f} ms "
        f"at the {peak / 1e9:.0f}-GFLOP/s matmul peak measured here) and for everything else. "
        f"Load average {load0:.1f} before, {result['load_average_1m'][1]:.1f} after.\n")
  with open(os.path.join(HERE, "results", args.name + ".md"), "w") as f:
    f.write(md)
  print(md)


def _get(record: dict, keys: tuple):
  for k in keys:
    record = record[k]
  return record


if __name__ == "__main__":
  main()
