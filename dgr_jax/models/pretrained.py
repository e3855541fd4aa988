"""ImageNet-pretrained trunks from PyTorch state dicts (torchvision's key names).

``encoder_from_torch(state_dict, config)`` maps a state dict, ``{torch key: numpy
array}``, of a torchvision classifier onto the encoder of ``build_model(config, tasks)``:
every parameter and BatchNorm running statistic of the trunk is taken from it, converted
to Flax's layout (conv kernels OIHW -> HWIO, linear weights transposed), and checked
against the shape this configuration needs. The classifier (``fc.*``, ``head.*``) and
``num_batches_tracked`` (and Swin's ``relative_position_index``) are ignored; any other key left over, a key missing or a shape
that does not match is a one-line ``ValueError`` naming the key and both shapes. Files
are read elsewhere (``experiments``): this module only maps arrays.

Each backbone registers its layout (``backbones.register_torch_layout``): a function from
a Flax path ``(collection, *names)`` to ``(torch key, convert)``. Dilation does not
change a ResNet's weights, so dilated and plain trunks load the same state dict.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dgr_jax.models.backbones import BACKBONES, TORCH_LAYOUTS
from dgr_jax.models.batch_norm import BatchNorm

IGNORED_PREFIXES = ("fc.", "head.", "heads.", "classifier.")
# Buffers the model recomputes: BatchNorm's step count, Swin's relative position index.
IGNORED_SUFFIXES = ("num_batches_tracked", "relative_position_index")


def _trunk_shapes(config) -> dict:
    backbone = BACKBONES[config.backbone](config, BatchNorm)
    size = 32 * 7  # a multiple of every stride and window; weights do not depend on it
    return jax.eval_shape(
        lambda: backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    )


def _flat(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def encoder_from_torch(state_dict: Mapping[str, Any], config) -> dict:
    """``{"params": ..., "batch_stats": ...}`` for ``variables[...]["encoder"]`` of the
    network ``config`` describes (a ``ModelConfig``): the trunk's subtree for Split, under
    ``"backbone"`` for MTAN and the classifier, whose other encoder parts (MTAN's attention)
    keep their initialisation (:func:`with_pretrained_encoder` merges)."""
    if config.backbone not in TORCH_LAYOUTS:
        raise ValueError(f"pretrained weights: backbone {config.backbone!r} has no torch layout")
    layout = TORCH_LAYOUTS[config.backbone]
    shapes = _trunk_shapes(config)
    used = set()
    result = {}
    for collection in ("params", "batch_stats"):
        flat = {}
        for path, leaf in _flat(shapes.get(collection, {})):
            key, convert = layout((collection,) + path)
            where = "/".join(path)
            if key not in state_dict:
                raise ValueError(
                    f"pretrained weights: missing key {key!r} (for encoder {collection} {where}, "
                    f"shape {tuple(leaf.shape)})"
                )
            value = np.asarray(convert(np.asarray(state_dict[key])), dtype=np.float32)
            if value.shape != tuple(leaf.shape):
                torch_shape = tuple(np.shape(state_dict[key]))
                raise ValueError(
                    f"pretrained weights: key {key!r} has shape {torch_shape}; this "
                    f"{config.backbone} (base_width {config.base_width}) needs "
                    f"{tuple(leaf.shape)} in Flax's layout for {where}"
                )
            used.add(key)
            flat[path] = jnp.asarray(value)
        result[collection] = _nest(flat)
    unexpected = sorted(k for k in state_dict if k not in used and not _ignored(k))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(
            f"pretrained weights: unexpected key {unexpected[0]!r} (shape "
            f"{tuple(np.shape(state_dict[unexpected[0]]))}){more}, which this "
            f"{config.backbone} (stage sizes {config.stage_sizes or 'standard'}) does not have"
        )
    if config.network != "split":
        result = {collection: {"backbone": tree} for collection, tree in result.items()}
    return result


def with_pretrained_encoder(variables: Mapping[str, Any], pretrained: Mapping[str, Any]) -> dict:
    """``variables`` (a model's, ``{"params": {"encoder": ...}, "batch_stats": ...}``) with
    the encoder's entries that ``pretrained`` holds replaced (shapes checked)."""

    def merge(base, new, where):
        out = dict(base)
        for key, value in new.items():
            if key not in base:
                raise ValueError(f"pretrained weights: the model has no {where}/{key}")
            if isinstance(value, Mapping):
                out[key] = merge(base[key], value, f"{where}/{key}")
            else:
                if jnp.shape(base[key]) != jnp.shape(value):
                    raise ValueError(
                        f"pretrained weights: {where}/{key} has shape {jnp.shape(value)}, "
                        f"the model needs {jnp.shape(base[key])}"
                    )
                out[key] = jnp.asarray(value, jnp.result_type(base[key]))
        return out

    out = dict(variables)
    for collection, tree in pretrained.items():
        merged = merge(variables[collection]["encoder"], tree, f"{collection}/encoder")
        out[collection] = {**variables[collection], "encoder": merged}
    return out
