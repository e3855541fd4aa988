"""What the dataset entry points share: flags, model building, the dry run.

Each ``experiments/<dataset>.py`` is a thin ``main`` that calls ``run(dataset, argv)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from dgr_jax import tasks as task_lib
from dgr_jax.models import ModelConfig, build_model, count_params


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    tasks: tuple
    image_size: tuple[int, int]
    networks: tuple[str, ...]
    command: str


DATASETS = {
    "nyuv2": DatasetSpec("nyuv2", task_lib.NYUV2, (288, 384), ("split", "mtan"), "experiments.nyuv2"),
    "cityscapes": DatasetSpec("cityscapes", task_lib.CITYSCAPES, (256, 512), ("split", "mtan"),
                              "experiments.cityscapes"),
    "utkface": DatasetSpec("utkface", task_lib.UTKFACE, (64, 64), ("split",), "experiments.utkface"),
}


def make_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.command}",
        description=f"DGR multi-task learning on {spec.name} "
        f"(tasks: {', '.join(t.name for t in spec.tasks)}; input {spec.image_size[0]}x{spec.image_size[1]}).",
    )
    parser.add_argument("--network", choices=spec.networks, default="split",
                        help="split: shared ResNet + one head per task; mtan: task attention on a "
                        "shared dilated ResNet (default split)")
    parser.add_argument("--backbone", type=int, choices=(18, 34, 50, 101), default=50,
                        help="ResNet depth (default 50, the paper's)")
    parser.add_argument("--num_dummy", type=int, default=3, help="K, dummy head sets for DGR (default 3)")
    parser.add_argument("--batch_size", type=int, default=4 if spec.name != "utkface" else 64,
                        help="examples per step; the dry run builds shapes for it")
    parser.add_argument("--dry_run", action="store_true",
                        help="build the full-size model on abstract shapes (no large allocation), "
                        "print a summary and a JSON line of parameter counts, and exit")
    return parser


def model_config(spec: DatasetSpec, args) -> ModelConfig:
    network = "classifier" if spec.name == "utkface" else args.network
    return ModelConfig(network=network, depth=args.backbone, dilated=network != "classifier")


def dry_run(spec: DatasetSpec, args) -> dict:
    """Shapes and parameter counts of the full model via ``jax.eval_shape``."""
    net = build_model(model_config(spec, args), spec.tasks)
    images = jax.ShapeDtypeStruct((args.batch_size, *spec.image_size, 3), jnp.float32)

    def init(key, images):
        variables = net.init(key, images, train=False)
        features, outputs = net.apply(variables, images, train=False)
        keys = jax.random.split(key, args.num_dummy)
        dummy = jax.vmap(lambda k: net.heads.init(k, features, spec.image_size, train=False)["params"])(keys)
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

    print(f"{spec.name}: {args.network} network, ResNet-{args.backbone}"
          f"{' (dilated, output stride 8)' if spec.name != 'utkface' else ''}, "
          f"input {tuple(images.shape)}")
    print(f"  encoder           {counts['encoder_params']:>12,} params")
    for group, size in _encoder_groups(params["encoder"], spec.tasks).items():
        print(f"    {group:<28} {size:>12,}")
    for task in spec.tasks:
        size = count_params({k: v for k, v in params["heads"].items()
                             if k == task.name or k.startswith(f"{task.name}_fc")})
        print(f"  head {task.name:<12} {size:>12,} params  -> output {shape_of(outputs)[task.name]}")
    print(f"  dummy sets        {counts['dummy_params']:>12,} params  ({args.num_dummy} stacked copies of the heads)")
    print(f"  running stats     {count_params(variables.get('batch_stats', {})):>12,} (not parameters)")
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


def run(dataset: str, argv=None):
    spec = DATASETS[dataset]
    args = make_parser(spec).parse_args(argv)
    if args.num_dummy < 1:
        sys.exit(f"{spec.command}: --num_dummy must be >= 1, got {args.num_dummy}")
    if args.batch_size < 1:
        sys.exit(f"{spec.command}: --batch_size must be >= 1, got {args.batch_size}")
    if not args.dry_run:
        sys.exit(f"{spec.command}: training is not available yet; use --dry_run to build the model")
    return dry_run(spec, args)
