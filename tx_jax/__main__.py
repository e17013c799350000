import sys

from tx_jax.cli import main

sys.exit(main())
