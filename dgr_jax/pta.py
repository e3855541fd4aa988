"""Pseudo-task augmentation (Meyerson & Miikkulainen, ICML 2018): D decoders per task.

Every task gets D decoders, each a full copy of the task's head with its own
initialisation, all trained, all reading the shared encoder's features. A (task, decoder)
pair is a *pseudo-task*; the joint objective gives each pseudo-task of a task the same
weight, so task t's loss is the mean of its decoders' losses::

    l_t = (1/D) sum_d loss_t(decoder_{t,d}(f(x)), y_t)

and the MTL method still sees one loss per task (the mean), its per-task gradient being
that of the mean with respect to the encoder and to all of task t's decoders.

This is PTA with independent initialisation and no decoder control: the paper's
``DecUpdate`` variants (freezing, perturbing or re-seeding decoders between
meta-iterations) are not implemented.

**Which decoder predicts.** The paper predicts with the decoder of best validation
performance. Here each task's decoders carry a running mean of their own training loss,
each batch's loss measured *before* the step that trains on it (out of sample at that
moment); in inference mode each task predicts with its decoder of lowest running loss.
The selection is an ``argmin`` inside the jitted forward pass, needs no host round trip and
no validation pass, and is part of the checkpointed state (a resumed run selects as an
uninterrupted one). It is a training-loss proxy for the paper's validation choice: on
data where the decoders overfit differently the two may pick differently.

Layout: ``DecoderHeads(heads, D)`` is ``heads`` lifted by ``nn.vmap`` (parameters and
BatchNorm statistics stacked on a leading decoder axis, independent initialisation keys)
under the same scope, so its parameters keep the heads' layout, one subtree per task
(task t's D decoders stacked). In training mode it returns every decoder's output,
``{task: (D, batch, ...)}``; in inference mode the selected decoder's, ``{task: (batch,
...)}``, as any heads module. ``pseudo_tasks`` gives the task records whose loss takes the
stacked outputs and returns the D decoder losses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgr_jax.tasks import Task

PyTree = Any

DEFAULT_DECODERS = 4
# Momentum of each decoder's running training loss (its selection statistic): about the
# last 100 steps.
SELECTION_MOMENTUM = 0.99
_LOSS_VARIABLE = "pta_decoder_loss"  # in the heads' batch_stats: {task: (D,)}


class DecoderHeads(nn.Module):
    """``num_decoders`` independently initialised copies of the heads module ``heads``
    (any heads module: its ``tasks`` are ``(name, channels)`` pairs and it keeps task t's
    parameters under ``t``)."""

    heads: nn.Module
    num_decoders: int = DEFAULT_DECODERS

    def setup(self):
        lifted = nn.vmap(
            type(self.heads),
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(None, None, None),
            axis_size=self.num_decoders,
            methods=["__call__"],
        )
        fields = {
            f.name: getattr(self.heads, f.name)
            for f in dataclasses.fields(self.heads)
            if f.init and f.name not in ("parent", "name")
        }
        self.decoders = lifted(**fields)
        nn.share_scope(self, self.decoders)  # parameters stay {task: ...}, not {decoders: ...}
        names = [name for name, _ in self.heads.tasks]
        self.decoder_loss = self.variable(
            "batch_stats",
            _LOSS_VARIABLE,
            lambda: {name: jnp.zeros((self.num_decoders,), jnp.float32) for name in names},
        )

    def __call__(self, features, output_size=None, train: bool = True) -> Mapping[str, jax.Array]:
        outputs = self.decoders(features, output_size, train)
        if train:
            return outputs
        chosen = self.selected()
        return {task: out[chosen[task]] for task, out in outputs.items()}

    def selected(self) -> dict[str, jax.Array]:
        """Each task's predicting decoder: the lowest running training loss."""
        return {task: jnp.argmin(loss) for task, loss in self.decoder_loss.value.items()}

    def record(self, decoder_losses: Mapping[str, jax.Array], momentum: float):
        """Fold one step's decoder losses ``{task: (D,)}`` into the running means."""
        self.decoder_loss.value = {
            task: momentum * old + (1 - momentum) * decoder_losses[task].astype(old.dtype)
            for task, old in self.decoder_loss.value.items()
        }


@dataclasses.dataclass(frozen=True)
class PseudoTask(Task):
    """Task ``t`` seen through its D decoders: the loss maps the stacked predictions
    ``(D, batch, ...)`` and the target to the D decoder losses (their mean is task t's
    loss; ``train.make_train_step`` takes it)."""

    num_decoders: int = DEFAULT_DECODERS

    @property
    def loss(self):
        one = super().loss
        return lambda predictions, target: jax.vmap(one, in_axes=(0, None))(predictions, target)


def num_decoders(net: nn.Module) -> int:
    """D for a network with ``DecoderHeads``, else 0."""
    heads = getattr(net, "heads", None)
    return heads.num_decoders if isinstance(heads, DecoderHeads) else 0


def base_heads(heads: nn.Module) -> nn.Module:
    """The heads module one decoder copies (``heads`` itself without PTA): what DGR's
    dummy sets are made of."""
    return heads.heads if isinstance(heads, DecoderHeads) else heads


def pseudo_tasks(tasks: Sequence[Task], num: int) -> tuple[PseudoTask, ...]:
    fields = [f.name for f in dataclasses.fields(Task)]
    return tuple(
        PseudoTask(**{name: getattr(t, name) for name in fields}, num_decoders=num) for t in tasks
    )


def record_decoder_losses(
    net: nn.Module,
    batch_stats: PyTree,
    decoder_losses: jax.Array,
    tasks: Sequence[Task],
    momentum: float = SELECTION_MOMENTUM,
) -> PyTree:
    """``batch_stats`` (the network's) with the step's ``decoder_losses`` (T, D), in task
    order, folded into the heads' running decoder losses."""
    losses = {t.name: jax.lax.stop_gradient(decoder_losses[i]) for i, t in enumerate(tasks)}
    _, updates = net.heads.apply(
        {"batch_stats": batch_stats["heads"]},
        losses,
        momentum,
        method=DecoderHeads.record,
        mutable=["batch_stats"],
    )
    return {**batch_stats, "heads": updates["batch_stats"]}


def selected_decoders(net: nn.Module, batch_stats: PyTree) -> dict[str, jax.Array]:
    """``{task: index}`` of each task's predicting decoder in the state's statistics."""
    return net.heads.apply({"batch_stats": batch_stats["heads"]}, method=DecoderHeads.selected)
