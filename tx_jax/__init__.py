"""tx_jax: Transformers trained without labels, in JAX/Flax."""

__version__ = "0.1.0"

from tx_jax.errors import UserError  # noqa: F401
