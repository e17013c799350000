"""Self-supervised and supervised objectives, one per file.

`objectives/NAME.py` holds everything objective-specific of `objective: NAME`
(the contract is `tx_jax.objectives.base.Objective`); `get_objective(NAME)`
imports it on first use, so adding an objective edits no table anywhere.
"""

from tx_jax.objectives.base import available
from tx_jax.objectives.base import Data
from tx_jax.objectives.base import get_objective
from tx_jax.objectives.base import Objective
from tx_jax.objectives.base import register
