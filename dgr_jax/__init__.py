"""dgr_jax: Dummy Gradient norm Regularization for multi-task learning, in JAX.

The public core is :func:`dgr_penalty`; see ``dgr_jax/penalty.py`` for the math.
"""

from dgr_jax.penalty import (
    PENALTY_ESTIMATORS,
    dgr_penalty,
    heads_penalty,
    init_dummy_sets,
    multitask_dummy_loss,
)

__all__ = [
    "PENALTY_ESTIMATORS",
    "dgr_penalty",
    "heads_penalty",
    "init_dummy_sets",
    "multitask_dummy_loss",
]
__version__ = "0.1.0"
