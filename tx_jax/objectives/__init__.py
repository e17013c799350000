"""Self-supervised objectives, one per file.

An objective builds its model from the architecture config, says which input
pipeline feeds it (`data_kind`), and computes `loss_fn(params, batch, rng,
train) -> (loss, sums)`: the mean loss and a dict of sums (always with
`weight`, the loss denominator) from which `summarize` derives metrics. Sums
add up across micro-batches, devices and eval batches exactly.
"""

from __future__ import annotations

import importlib

OBJECTIVES = {
    "causal_lm": "tx_jax.objectives.causal_lm:CausalLM",
    "mae": "tx_jax.objectives.mae:MAEObjective",
    "masked_lm": "tx_jax.objectives.masked_lm:MaskedLM",
    "span_corruption": "tx_jax.objectives.span_corruption:SpanCorruption",
    "seq2seq": "tx_jax.objectives.span_corruption:Seq2Seq",
    "contrastive": "tx_jax.objectives.contrastive:SpanContrastive",
}


def get_objective(name: str):
  """The objective class registered under `name`."""
  if name not in OBJECTIVES:
    raise KeyError(name)
  module, cls = OBJECTIVES[name].split(":")
  return getattr(importlib.import_module(module), cls)
