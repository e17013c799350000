import sys

from tx_jax.cli import run

sys.exit(run())
