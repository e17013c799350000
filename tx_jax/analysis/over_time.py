"""Topics over time: post timestamps -> counts of each topic per day, week or month.

Time values are ISO 8601 strings ("2024-03-01", "2024-03-01T12:30:00Z",
"2024-03-01 12:30:00+02:00") or epoch seconds (numbers or numeric strings);
all are converted to UTC. Weeks start on Monday (ISO weeks).
"""

import csv
import datetime as dt
import re

import numpy as np

from tx_jax.errors import UserError

TIME_BINS = ("day", "week", "month")
_EPOCH = re.compile(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?")


def _parse_one(value):
  """One value -> UTC datetime64[s], or None if it is neither ISO 8601 nor epoch seconds."""
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    seconds = float(value)
  else:
    text = value.decode() if isinstance(value, bytes) else str(value).strip()
    if _EPOCH.fullmatch(text):
      seconds = float(text)
    else:
      try:
        when = dt.datetime.fromisoformat(text)
      except ValueError:
        return None
      if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
      return np.datetime64(when, "s")
  if not np.isfinite(seconds):
    return None
  return np.datetime64(int(round(seconds)), "s")


def parse_times(values, ids=None, column="created_at", rows=None):
  """Time values [N] -> datetime64[s] [N] (UTC); UserError naming the first bad row.

  Rows count from 1 in the order given, or are rows[i] + 1 (positions in the
  data file) when given; ids, when given, name the post too.
  """
  if isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.datetime64):
    return values.astype("datetime64[s]")
  out = np.empty(len(values), "datetime64[s]")
  for i, value in enumerate(values):
    parsed = None if value is None else _parse_one(value)
    if parsed is None:
      who = f" (id {ids[i]})" if ids is not None else ""
      row = i + 1 if rows is None else int(rows[i]) + 1
      raise UserError(
          f"{column} value {value!r} in row {row}{who} is neither ISO 8601 (e.g. "
          "2024-03-01T12:30:00Z) nor epoch seconds; fix or drop that row")
    out[i] = parsed
  return out


def bin_times(times, time_bin="week"):
  """datetime64 [N] -> the start of each one's period, datetime64[D] [N]."""
  if time_bin not in TIME_BINS:
    raise UserError(f"unknown time bin {time_bin!r}; use one of {', '.join(TIME_BINS)}")
  days = np.asarray(times).astype("datetime64[D]")
  if time_bin == "day":
    return days
  if time_bin == "week":  # 1970-01-01 was a Thursday: (day + 3) % 7 is 0 on Mondays.
    n = days.astype(np.int64)
    return (n - (n + 3) % 7).astype("datetime64[D]")
  return days.astype("datetime64[M]").astype("datetime64[D]")


def _next(period, time_bin):
  if time_bin == "month":
    return (period.astype("datetime64[M]") + 1).astype("datetime64[D]")
  return period + (1 if time_bin == "day" else 7)


def topics_over_time(topics, times, time_bin="week"):
  """Counts of each topic per period -> (periods [P] datetime64[D], topic ids [T], counts [P, T]).

  Periods run without gaps from the first post's to the last post's, so a
  quiet period shows as zeros rather than vanishing from the chart.
  """
  topics = np.asarray(topics)
  starts = bin_times(times, time_bin)
  periods = [starts.min()]
  while periods[-1] < starts.max():
    periods.append(_next(periods[-1], time_bin))
  periods = np.asarray(periods, "datetime64[D]")
  ids = np.unique(topics)
  counts = np.zeros((len(periods), len(ids)), np.int64)
  np.add.at(counts, (np.searchsorted(periods, starts), np.searchsorted(ids, topics)), 1)
  return periods, ids, counts


def write_csv(path, periods, ids, counts):
  """One row per period: `period`, then one count column per topic (`topic_<id>`)."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["period"] + [f"topic_{int(t)}" for t in ids])
    for p, row in zip(periods, counts):
      w.writerow([str(p)] + row.tolist())


def plot(path, periods, ids, counts, names, max_topics=10):
  """Line chart of the max_topics largest topics' counts per period -> PNG (1200x500 px)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  order = [j for j in np.argsort(-counts.sum(axis=0), kind="stable") if ids[j] != -1]
  fig, ax = plt.subplots(figsize=(12, 5), dpi=100, layout="constrained")
  try:
    x = periods.astype("datetime64[s]").astype(dt.datetime)
    for j in order[:max_topics]:
      ax.plot(x, counts[:, j], marker="o", ms=3, label=names.get(int(ids[j]), str(ids[j]))[:40])
    ax.set_ylabel("posts")
    ax.set_title(f"posts per topic over time ({len(order)} topics, top {min(len(order), max_topics)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.autofmt_xdate()
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
