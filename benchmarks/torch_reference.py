"""PyTorch reference: training throughput of the same GPT-2 style model, eager or
under `torch.compile` (inductor; `--compile`).

Used to sanity-check tx_jax numbers on CPU; shapes mirror the JAX model exactly.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  """Pre-LN transformer block: causal self-attention then GELU MLP."""

  def __init__(self, d_model, num_heads, mlp_dim):
    super().__init__()
    self.num_heads = num_heads
    # eps=1e-6 matches Flax's LayerNorm default (torch's is 1e-5).
    self.ln1 = nn.LayerNorm(d_model, eps=1e-6)
    self.qkv = nn.Linear(d_model, 3 * d_model)
    self.proj = nn.Linear(d_model, d_model)
    self.ln2 = nn.LayerNorm(d_model, eps=1e-6)
    self.fc1 = nn.Linear(d_model, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, d_model)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
    # [B, T, d] -> [B, H, T, d/H], the layout SDPA expects.
    q, k, v = (z.view(b, t, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
    # tanh approximation to match jax.nn.gelu's default (approximate=True).
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  """Token + learned position embedding, blocks, final LN, tied output head."""

  def __init__(self, num_layers, d_model, num_heads, mlp_dim, seq_len, vocab_size):
    super().__init__()
    self.wte = nn.Embedding(vocab_size, d_model)
    self.wpe = nn.Embedding(seq_len, d_model)
    self.blocks = nn.ModuleList(
        Block(d_model, num_heads, mlp_dim) for _ in range(num_layers))
    self.ln_f = nn.LayerNorm(d_model, eps=1e-6)

  def forward(self, tokens):
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    x = self.wte(tokens) + self.wpe(pos)
    for blk in self.blocks:
      x = blk(x)
    # Tied head: reuse the embedding matrix, no bias, so no extra params.
    return self.ln_f(x) @ self.wte.weight.T


def expected_params(num_layers, d_model, mlp_dim, seq_len, vocab_size):
  """Closed-form parameter count, used to check the model is built right."""
  d, m = d_model, mlp_dim
  # attn 4d^2+4d (qkv + proj), mlp 2dm+m+d, two LNs 4d; plus final LN 2d.
  per_layer = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d
  return vocab_size * d + seq_len * d + num_layers * per_layer + 2 * d


def torch_train_tokens_per_s(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024,
                             seq_len=256, batch_size=8, vocab_size=256, steps=20,
                             warmup=3, seed=0, threads=None, compile=False):
  """Times full AdamW training steps; returns median step time and tokens/s.

  compile=True runs the forward, loss and backward through `torch.compile`
  (inductor, default mode); clipping and the AdamW update stay eager, as in the
  usual compiled training loop. Its compile time is reported apart.
  """
  threads = threads or os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = GPT(num_layers, d_model, num_heads, mlp_dim, seq_len, vocab_size)
  params = sum(p.numel() for p in model.parameters())
  want = expected_params(num_layers, d_model, mlp_dim, seq_len, vocab_size)
  assert params == want, (params, want)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
  # Fixed random batch, made once: we measure compute, not data loading.
  inputs = torch.randint(0, vocab_size, (batch_size, seq_len))
  targets = torch.randint(0, vocab_size, (batch_size, seq_len))

  def loss_fn(inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1))

  forward = torch.compile(loss_fn) if compile else loss_fn

  def step():
    opt.zero_grad(set_to_none=True)
    loss = forward(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  t0 = time.perf_counter()
  for _ in range(warmup):
    step()
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()  # eager CPU ops are synchronous, so no explicit sync is needed.
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {"tokens_per_s": batch_size * seq_len / med, "step_ms": med * 1e3,
          "params": params, "torch_version": torch.__version__,
          "threads": threads, "compiled": compile, "warmup_s": warmup_s}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  defaults = dict(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024,
                  seq_len=256, batch_size=8, vocab_size=256, steps=20,
                  warmup=3, seed=0)
  for name, val in defaults.items():
    p.add_argument("--" + name.replace("_", "-"), type=int, default=val)
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--compile", action="store_true", help="torch.compile (inductor)")
  print(json.dumps(torch_train_tokens_per_s(**vars(p.parse_args()))))


if __name__ == "__main__":
  main()
