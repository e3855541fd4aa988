"""Evaluation of a train state over the evaluation set, both metric conventions, Δm.

Each process evaluates its shard of the evaluation set on its own devices (any batch
size: the last may be short) and the statistics of every process are summed
(``parallel.sum_over_processes``), so the metrics are those of the whole set on any
number of hosts.
"""

from __future__ import annotations

import jax

from dgr_jax import metrics as metric_lib
from dgr_jax import parallel
from dgr_jax.train import make_eval_step


class Evaluator:
    def __init__(self, net, tasks, reference=None):
        self.tasks, self.reference = tasks, reference
        self.mesh = parallel.local_mesh()
        self._step = jax.jit(make_eval_step(net, tasks))
        self._names = {"image"} | {t.name for t in tasks}

    def __call__(self, state, batches) -> tuple[dict, dict]:
        """``(metrics, paper_metrics)``: whole-set statistics (ours) and the paper's
        per-batch running means, each with its ``delta_m`` when there is a reference."""
        local_state = parallel.local_copy(state, self.mesh)
        stats = metric_lib.init_metric_state(self.tasks)
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k in self._names}
            stats = self._step(local_state, parallel.replicate(batch, self.mesh), stats)
        stats = parallel.sum_over_processes(stats)
        results = (
            metric_lib.compute_metrics(self.tasks, stats),
            metric_lib.compute_paper_metrics(self.tasks, stats),
        )
        if self.reference:
            for values in results:
                values["delta_m"] = metric_lib.delta_m(values, self.reference, self.tasks)
        return results
