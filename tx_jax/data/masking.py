"""Corruptions for self-supervised text objectives: BERT masking, T5 span corruption.

Pure numpy over token arrays with an explicit `np.random.Generator`: the
pipelines seed one generator per document occurrence (grain's `random_map`,
from the run seed and the element's index in the epoch-repeated stream), so a
batch depends only on (seed, step) and resumes bit-identically; the
statistics tests run the same functions over many rows at once.
"""

import numpy as np


def bert_mask(tokens: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *,
              mask_id: int, num_regular: int, mask_rate: float = 0.15,
              mask_token_rate: float = 0.8, random_token_rate: float = 0.1,
              regular_ids: np.ndarray | None = None):
  """BERT's masking of `tokens` (any shape) at the `maskable` positions.

  Each maskable token is selected with probability `mask_rate`. A selected
  token becomes `mask_id` with probability `mask_token_rate`, a uniformly
  random regular token (id < num_regular, possibly itself) with probability
  `random_token_rate`, and stays unchanged otherwise (Devlin et al. 2019:
  0.15, 0.8, 0.1). Returns (inputs, selected); the loss uses `selected` only.
  `regular_ids` (when the specials are not the vocabulary's last ids, as in
  Hugging Face's BERT) lists the regular tokens; num_regular is then its length.
  """
  selected = (rng.random(tokens.shape) < mask_rate) & maskable
  how = rng.random(tokens.shape)
  random_ids = rng.integers(0, num_regular, tokens.shape)
  if regular_ids is not None:
    random_ids = regular_ids[random_ids]
  inputs = np.where(selected & (how < mask_token_rate), mask_id, tokens)
  use_random = selected & (how >= mask_token_rate) & (how < mask_token_rate + random_token_rate)
  inputs = np.where(use_random, random_ids, inputs)
  return inputs.astype(tokens.dtype), selected


def noise_counts(length: int, noise_density: float, mean_span_length: float):
  """(noise tokens, noise spans) T5 uses for a piece of `length` >= 2 tokens."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, num_spans


def span_corruption_lengths(inputs_len: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
  """(raw tokens per piece, targets length) so corrupted inputs fill `inputs_len`.

  A piece of n raw tokens becomes n - noise + spans + 1 inputs (kept tokens,
  one sentinel per span, EOS) and noise + spans + 1 targets; both grow
  monotonically with n, so the largest n whose inputs fit makes full pieces
  fill an encoder row exactly (T5's `random_spans_helper`: 512 -> 568, 114).
  """
  def lengths(n):
    noise = int(round(n * noise_density))
    spans = int(round(noise / mean_span_length))
    return n - noise + spans + 1, noise + spans + 1

  n = inputs_len - 1
  while lengths(n + 1)[0] <= inputs_len:
    n += 1
  return n, lengths(n)[1]


def _random_segment_lengths(num_rows: int, num_items: int, num_segments: int,
                            rng: np.random.Generator) -> np.ndarray:
  """(R, num_segments) lengths of a uniformly random split of num_items into
  num_segments non-empty runs: segment starts are a random (num_segments - 1)
  subset of the num_items - 1 gaps."""
  keys = rng.random((num_rows, num_items - 1))
  order = np.argsort(keys, axis=1)
  starts = np.zeros((num_rows, num_items), np.int64)
  np.put_along_axis(starts[:, 1:], order[:, :num_segments - 1], 1, axis=1)
  segment = np.cumsum(starts, axis=1)                                   # (R, items)
  flat = segment + num_segments * np.arange(num_rows)[:, None]
  return np.bincount(flat.ravel(), minlength=num_rows * num_segments).reshape(
      num_rows, num_segments)


def random_spans_noise_mask(num_rows: int, length: int, rng: np.random.Generator,
                            noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> np.ndarray:
  """T5's noise mask, bool (R, length): round(density * length) noise tokens in
  round(noise / mean_span_length) spans; span and gap lengths are uniformly
  random compositions, the row starts with kept tokens and ends with noise."""
  if length < 2:
    raise ValueError(f"span corruption needs pieces of >= 2 tokens, got {length}")
  num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
  noise_lengths = _random_segment_lengths(num_rows, num_noise, num_spans, rng)
  kept_lengths = _random_segment_lengths(num_rows, length - num_noise, num_spans, rng)
  interleaved = np.stack([kept_lengths, noise_lengths], axis=2).reshape(num_rows, -1)
  span_starts = np.cumsum(interleaved, axis=1)[:, :-1]                  # (R, 2S - 1)
  start_marks = np.zeros((num_rows, length), np.int64)
  np.put_along_axis(start_marks, span_starts, 1, axis=1)
  return np.cumsum(start_marks, axis=1) % 2 == 1


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, sentinel_ids: np.ndarray,
                  eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One row of T5 span corruption: (inputs, targets), each ending in EOS.

  Noise span k becomes sentinel k in the inputs; the targets list, for each
  span k in order, sentinel k followed by the span's tokens:
    tokens  a b c d e f g, noise at c d and g
    inputs  a b <s0> e f <s1> EOS      targets  <s0> c d <s1> g EOS
  """
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  num_spans = int(starts.sum())
  if num_spans > len(sentinel_ids):
    raise ValueError(f"{num_spans} noise spans but only {len(sentinel_ids)} sentinels")
  span_index = np.cumsum(starts) - 1
  kept = np.where(starts, sentinel_ids[np.maximum(span_index, 0)], tokens)
  inputs = kept[~noise | starts]
  # Where each span starts within the noise tokens, to put its sentinel first.
  at = (np.cumsum(noise) - 1)[starts]
  targets = np.insert(tokens[noise], at, sentinel_ids[:num_spans])
  eos = np.array([eos_id], tokens.dtype)
  return (np.concatenate([inputs, eos]).astype(tokens.dtype),
          np.concatenate([targets, eos]).astype(tokens.dtype))
