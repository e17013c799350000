"""`python scripts/generate.py ...` = `tx-jax generate ...`, for hosts where the console script is
not on PATH (e.g. running from a checkout on every worker of a Cloud TPU VM slice)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tx_jax import cli  # noqa: E402

if __name__ == "__main__":
  sys.exit(cli.run(["generate", *sys.argv[1:]]))
