"""50,000 short posts through the analyst's path on CPU: time, peak memory, flat RSS.

  python benchmarks/posts_50k.py                 # writes benchmarks/results/posts_50k.json

Generates 50,000 deterministic synthetic posts (templated sentences over 8
topics, with shared filler words, @mentions, numbers and 15% off-topic words so
the topics overlap), then runs the real commands as subprocesses:

1. `tx-jax topics --data file:posts.csv --out DIR --k 8`: tokenizer, a tiny
   span-contrastive encoder (the topics default: 2 layers, d 128) pretrained on
   the posts, embed, cluster, report.
   Every phase is timed from the command's own progress lines.
2. `tx-jax embed` alone on the same model for all 50k posts and for a 10k
   sample, and `tx-jax analyze` alone: wall time and peak RSS of each (from
   /proc, sampled every 0.2 s), plus the RSS timeline while embedding, which
   must stay flat (tokens are made one batch at a time).

With `--encoder WORKDIR` (e.g. an imported all-MiniLM-L6-v2) only the whole path
runs, embedding with that model instead of pretraining one; the RSS timeline of its
embedding phase is recorded the same way:

  python benchmarks/posts_50k.py --posts 200000 --encoder runs/minilm \
      --out benchmarks/results/posts_200k_minilm.json

The machine is shared: the 1-minute load average is recorded next to every
timing.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = {
    "football": "match goal striker referee stadium league coach penalty keeper derby fans "
                "transfer season",
    "cooking": "pasta sauce recipe oven garlic bread cheese soup dough butter onion salad "
               "dinner",
    "tech": "laptop update battery phone app bug release keyboard screen cloud server "
            "software",
    "travel": "flight airport hotel beach passport luggage train island museum trip map "
              "holiday",
    "music": "album concert guitar song band tour vinyl drummer chorus lyrics playlist gig",
    "pets": "puppy cat dog vet leash kitten walk treats fur adopted tail shelter",
    "weather": "rain storm sunny forecast snow wind cloudy heatwave umbrella thunder frost "
               "humid",
    "finance": "stocks market budget savings rent inflation loan bank salary crypto tax "
               "invoice",
}
TEMPLATES = (
    "just {v} the {a} {w1} and the {w2}, {r}",
    "{r} the {w1} today was {a} #{w2}",
    "can't believe the {w1} {v} again... {w2} {w3} {r}",
    "@{u} did you see the {a} {w1}? {w2} and {w3} everywhere",
    "{n} {w1}s later and still thinking about the {w2} {r}",
    "anyone else {v} by the {w1}? the {w2} was {a}",
    "new {w1}, old {w2}, same {a} {w3}. {r}",
)
VERBS = ("loved", "hated", "missed", "watched", "tried", "fixed", "shared", "found")
ADJS = ("amazing", "terrible", "weird", "great", "awful", "perfect", "boring", "wild")
REACTIONS = ("lol", "so good", "never again", "10/10", "ugh", "what a day", "honestly",
             "cannot wait")
USERS = ("sam", "alex_k", "jo", "mika99", "the_real_dan", "priya")


def make_posts(n, seed=0):
  """n (text, topic) pairs, deterministic for a seed."""
  rng = np.random.default_rng(seed)
  names = sorted(TOPICS)
  words = {t: TOPICS[t].split() for t in names}
  every = [w for t in names for w in words[t]]
  posts = []
  for i in range(n):
    topic = names[rng.integers(len(names))]

    def word():  # 15% of topic words come from anywhere.
      pool = every if rng.random() < 0.15 else words[topic]
      return pool[rng.integers(len(pool))]
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(
        v=VERBS[rng.integers(len(VERBS))], a=ADJS[rng.integers(len(ADJS))],
        r=REACTIONS[rng.integers(len(REACTIONS))], u=USERS[rng.integers(len(USERS))],
        n=int(rng.integers(2, 40)), w1=word(), w2=word(), w3=word())
    posts.append((text, topic))
  return posts


def write_csv(path, posts):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    w.writerows(posts)


def _rss_mb(pid):
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def run(args, log_path):
  """Runs `python -m tx_jax ARGS`; returns wall s, peak RSS MB, RSS timeline, stdout lines
  with their times, and the load average before/after."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  with open(log_path, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "tx_jax", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    timeline, lines = [], []

    def sample():
      while proc.poll() is None:
        rss = _rss_mb(proc.pid)
        if rss is not None:
          timeline.append((round(time.perf_counter() - t0, 2), round(rss, 1)))
        time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
      lines.append((round(time.perf_counter() - t0, 2), line.rstrip("\n")))
      print(line, end="", flush=True)
    proc.wait()
    sampler.join()
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"tx-jax {args[0]} failed ({proc.returncode}); see {log_path}")
  return {"wall_s": round(wall, 1), "peak_rss_mb": max(r for _, r in timeline),
          "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
          "timeline": timeline, "lines": lines}


def _phases(lines, total):
  """Seconds per `topics: NAME: running` phase, from the times the lines were printed."""
  marks = [(t, l.split(":")[1].strip()) for t, l in lines if l.startswith("topics: ")
           and ": running" in l]
  ends = [t for t, _ in marks[1:]] + [total]
  return {name: round(end - t, 1) for (t, name), end in zip(marks, ends)}


def _embed_json(lines):
  return next(json.loads(l) for _, l in lines if l.startswith('{"out"') and '"dim"' in l)


def _flatness(timeline, start, end):
  """RSS (MB) at 10%, 30%, ..., 90% of [start, end] and its spread over the middle 80%."""
  pts = [(t, r) for t, r in timeline if start <= t <= end]
  at = {}
  for q in (0.1, 0.3, 0.5, 0.7, 0.9):
    target = start + q * (end - start)
    at[f"{int(q * 100)}%"] = min(pts, key=lambda p: abs(p[0] - target))[1]
  mid = [r for t, r in pts if start + 0.1 * (end - start) <= t <= start + 0.9 * (end - start)]
  return {"rss_mb_at": at, "rss_mb_range_middle_80pct": [min(mid), max(mid)]}


def markdown(result) -> str:
  """Times and memory as a short markdown page."""
  n = result["posts"]
  t, e, a = result["topics"], result[f"embed_{n}"], result["analyze"]
  rows = [("`tx-jax topics` (whole path)", t["wall_s"], t["peak_rss_mb"], t["load_avg_1m"]),
          ("`tx-jax embed`, 10k sample", result["embed_10000"]["wall_s"],
           result["embed_10000"]["peak_rss_mb"], result["embed_10000"]["load_avg_1m"]),
          (f"`tx-jax embed`, all {n:,}", e["wall_s"], e["peak_rss_mb"], e["load_avg_1m"]),
          (f"`tx-jax analyze --k 8`, {n:,} points", a["wall_s"], a["peak_rss_mb"],
           a["load_avg_1m"])]
  lines = [f"# {n:,} short posts on CPU: embed and cluster", "",
           f"{result['machine']} ({result['cpus']} cores, other jobs running: the 1-minute "
           "load average before/after each command is given). Synthetic posts over 8 topics "
           f"(seed 0); tiny span-contrastive encoder (2 layers, d 128) pretrained "
           f"{result['steps']} steps by `tx-jax topics`.", "",
           f"Command: `{result['command']}`", "",
           "| command | wall s | peak RSS MB | load avg |", "|---|---|---|---|"]
  lines += [f"| {name} | {w} | {r} | {l} |" for name, w, r, l in rows]
  lines += ["", f"embed + analyze of all {n:,} posts: **{result['embed_plus_analyze_s']} s** "
            f"({e['docs_per_s']} posts/s in the embedding loop). Topics phases (s): "
            f"{t['phase_s']}.",
            f"RSS while embedding all {n:,} (MB at 10..90% of the loop): {e['rss_mb_at']}; "
            f"range over the middle 80%: {e['rss_mb_range_middle_80pct']}.",
            f"Clusters vs the 8 true topics (analyze, seed 0): NMI "
            f"{round(a['metrics'].get('nmi', float('nan')), 3)}, ARI "
            f"{round(a['metrics'].get('ari', float('nan')), 3)}.", ""]
  return "\n".join(lines)


def markdown_encoder(result) -> str:
  """The whole path with a given encoder: time, phases, memory, flatness."""
  n, t = result["posts"], result["topics"]
  e = t["embed"]
  return "\n".join([
      f"# {n:,} short posts through `tx-jax topics --encoder` on CPU", "",
      f"{result['machine']} ({result['cpus']} cores; 1-minute load average before/after: "
      f"{t['load_avg_1m']}). Synthetic posts over 8 topics (seed 0), embedded by "
      f"`{result['encoder']}` ({e.get('layer')}, {e.get('pooling')} pooling, "
      f"{e['dim']} dimensions), then UMAP -> k-means k=8 and the TF-IDF baseline.", "",
      f"Command: `{result['command']}`", "",
      "| | value |", "|---|---|",
      f"| whole path, wall | {t['wall_s']} s |",
      f"| phases (s) | {t['phase_s']} |",
      f"| embedding loop | {e['seconds']} s, {e['docs_per_s']} posts/s |",
      f"| peak RSS (whole path) | {t['peak_rss_mb']} MB |",
      f"| RSS while embedding, MB at 10..90% | {t['rss_mb_at']} |",
      f"| RSS range, middle 80% of embedding | {t['rss_mb_range_middle_80pct']} |",
      f"| NMI vs the 8 topics (model; TF-IDF baseline) | {t['metrics'].get('nmi')}; "
      f"{t.get('baseline_nmi')} |", ""])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--posts", type=int, default=50_000)
  parser.add_argument("--dir", default="/tmp/tx_jax_posts_50k")
  parser.add_argument("--steps", type=int, default=600, help="pretraining steps")
  parser.add_argument("--vocab-size", type=int, default=512)
  parser.add_argument("--encoder", help="a text workdir (e.g. an imported MiniLM): topics "
                      "embeds with it instead of pretraining; only the whole path is timed")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "posts_50k.json"))
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  data = os.path.join(args.dir, "posts.csv")
  write_csv(data, make_posts(args.posts))
  topics_dir = os.path.join(args.dir, "topics")
  result = {"posts": args.posts, "cpus": os.cpu_count(), "machine": "shared 2-core CPU",
            "data": data, "steps": args.steps, "vocab_size": args.vocab_size,
            "command": " ".join(["python", "benchmarks/posts_50k.py", *sys.argv[1:]])}

  # 1. The whole path, as a user runs it.
  # The templated posts hold few distinct words: SentencePiece allows at most ~576 pieces.
  model_flags = (["--encoder", args.encoder] if args.encoder else
                 ["--steps", str(args.steps), "--vocab-size", str(args.vocab_size)])
  result["encoder"] = args.encoder
  topics = run(["topics", "--data", f"file:{data}", "--out", topics_dir, "--k", "8",
                *model_flags], os.path.join(args.dir, "topics.log"))
  phases = _phases(topics["lines"], topics["wall_s"])
  report = json.load(open(os.path.join(topics_dir, "report", "report.json")))
  result["topics"] = {"wall_s": topics["wall_s"], "phase_s": phases,
                      "peak_rss_mb": topics["peak_rss_mb"], "load_avg_1m": topics["load_avg_1m"],
                      "embed": _embed_json(topics["lines"]), "k": report["k"],
                      "metrics": report["metrics"],
                      "baseline_nmi": report.get("baseline", {}).get("metrics", {}).get("nmi"),
                      "embed_plus_cluster_s": round(phases.get("embeddings", 0) +
                                                    phases.get("report", 0), 1)}
  if args.encoder:  # RSS over the embedding phase, from the whole path's own timeline.
    marks = {l.split(":")[1].strip(): t for t, l in topics["lines"]
             if l.startswith("topics: ") and ": running" in l}
    result["topics"].update(_flatness(topics["timeline"], marks["embeddings"],
                                      marks.get("report", topics["wall_s"])))
    _write(result, args.out, markdown_encoder(result))
    return

  # 2. embed and analyze alone: time, peak RSS, and RSS over the embedding.
  model = os.path.join(topics_dir, "model")
  for n in (10_000, args.posts):
    out = os.path.join(args.dir, f"emb_{n}.npz")
    r = run(["embed", "--workdir", model, "--data", f"file:{data}", "--out", out,
             "--sample", str(n)], os.path.join(args.dir, f"embed_{n}.log"))
    summary = _embed_json(r["lines"])
    # The embedding loop runs between the restore and the file write; its own
    # seconds end just before the summary line is printed.
    end = r["lines"][-1][0]
    start = end - summary["seconds"]
    result[f"embed_{n}"] = {"wall_s": r["wall_s"], "loop_s": summary["seconds"],
                            "docs_per_s": summary["docs_per_s"],
                            "peak_rss_mb": r["peak_rss_mb"], "load_avg_1m": r["load_avg_1m"],
                            **_flatness(r["timeline"], start, end)}
  r = run(["analyze", "--embeddings", os.path.join(args.dir, f"emb_{args.posts}.npz"),
           "--out", os.path.join(args.dir, "report"), "--k", "8"],
          os.path.join(args.dir, "analyze.log"))
  result["analyze"] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                       "load_avg_1m": r["load_avg_1m"],
                       "metrics": json.loads(r["lines"][-1][1])["metrics"]}
  result["embed_plus_analyze_s"] = round(result[f"embed_{args.posts}"]["wall_s"] +
                                         result["analyze"]["wall_s"], 1)
  _write(result, args.out, markdown(result))
  print(json.dumps({k: result[k] for k in ("embed_plus_analyze_s",)}))


def _write(result, out, md):
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(md)


if __name__ == "__main__":
  main()
