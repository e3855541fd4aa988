"""dgr_jax: Dummy Gradient norm Regularization for multi-task learning, in JAX.

The public core is :func:`dgr_penalty`; see ``dgr_jax/penalty.py`` for the math. The
comparison regularisers of the paper's Fig. 2: :func:`sam_gradient` (SAM) and
:class:`DecoderHeads` (PTA), as :class:`Regularizer` records for the train step.
"""

from dgr_jax.penalty import (
    PENALTY_ESTIMATORS,
    dgr_penalty,
    heads_penalty,
    init_dummy_sets,
    multitask_dummy_loss,
)
from dgr_jax.pta import DecoderHeads
from dgr_jax.regularizers import Regularizer, sam_gradient

__all__ = [
    "DecoderHeads",
    "PENALTY_ESTIMATORS",
    "Regularizer",
    "dgr_penalty",
    "heads_penalty",
    "init_dummy_sets",
    "multitask_dummy_loss",
    "sam_gradient",
]
__version__ = "0.1.0"
