"""``--dry_run``: the run's model on abstract shapes, a readable summary, a JSON line of
parameter counts (``encoder_params``, ``head_params``, ``dummy_params``, ``total_params``)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from dgr_jax import pta
from dgr_jax.models import count_params


def dry_run(config) -> dict:
    """Shapes and parameter counts via ``jax.eval_shape`` (no large allocation)."""
    spec, tasks = config.spec, config.task_records()
    net = config.build_network()  # with the regulariser's heads (PTA's decoders)
    images = jax.ShapeDtypeStruct((config.train.batch_size, *spec.image_size, 3), jnp.float32)
    num_dummy = config.dgr.num_dummy

    def init(key, images):
        variables = net.init(key, images, train=False)
        features, outputs = net.apply(variables, images, train=False)
        keys = jax.random.split(key, num_dummy)
        dummy = jax.vmap(
            lambda k: pta.base_heads(net.heads).init(k, features, spec.image_size, train=False)[
                "params"
            ]
        )(keys)
        return variables, features, outputs, dummy

    variables, features, outputs, dummy = jax.eval_shape(init, jax.random.PRNGKey(0), images)
    params = variables["params"]
    counts = {
        "encoder_params": count_params(params["encoder"]),
        "head_params": count_params(params["heads"]),
        "dummy_params": count_params(dummy),
    }
    counts["total_params"] = sum(counts.values())

    def shape_of(tree):
        return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)

    model = config.model
    print(
        f"{spec.name}: {model.network} network, {model.backbone}"
        f"{' (dilated, output stride 8)' if model.dilated and model.network != 'classifier' else ''}, "
        f"input {tuple(images.shape)}"
    )
    print(f"  encoder           {counts['encoder_params']:>12,} params")
    for group, size in _encoder_groups(params["encoder"], tasks).items():
        print(f"    {group:<28} {size:>12,}")
    for task in tasks:
        size = count_params(
            {
                k: v
                for k, v in params["heads"].items()
                if k == task.name or k.startswith(f"{task.name}_fc")
            }
        )
        print(
            f"  head {task.name:<12} {size:>12,} params  -> output {shape_of(outputs)[task.name]}"
        )
    print(
        f"  dummy sets        {counts['dummy_params']:>12,} params  ({num_dummy} stacked copies of the heads)"
    )
    print(
        f"  running stats     {count_params(variables.get('batch_stats', {})):>12,} (not parameters)"
    )
    print(f"  features read by heads and dummy sets: {shape_of(features)}")
    print(json.dumps(counts))
    return counts


def _encoder_groups(encoder_params, tasks) -> dict[str, int]:
    """Readable parameter groups: backbone stem and stages, MTAN attention and shared blocks."""
    backbone = encoder_params.get("backbone", encoder_params)
    groups = {"backbone stem": 0}
    for name, subtree in sorted(backbone.items()):
        group = "backbone " + ("stem" if name.startswith("stem") else name.split("_")[0])
        groups[group] = groups.get(group, 0) + count_params(subtree)
    for name, subtree in encoder_params.items():
        if name == "backbone" or backbone is encoder_params:
            continue
        task = next((t.name for t in tasks if name.startswith(f"{t.name}_att")), None)
        group = f"attention masks ({task})" if task else "shared attention blocks"
        groups[group] = groups.get(group, 0) + count_params(subtree)
    return groups
