"""The backbone protocol and registry: a new trunk is one module that registers itself.

A backbone is a Flax module with

``stages(x, train=True, split_last=False) -> list``
    The outputs of its four stages (NHWC); with ``split_last``, ``(before, out)`` pairs
    where ``before`` is the input of the stage's last block (MTAN's attention reads it).
``__call__(x, train=True)``
    The last stage's output: what Split's heads and the classifier's pooling read.
``stage_channels``, ``stage_blocks``, ``output_stride``
    Channels and blocks per stage; the total stride of the last stage (8 when dilated).

``BACKBONES[name](config, norm)`` builds one from a ``ModelConfig`` and the
normalisation layer's constructor; ``register_backbone(name)`` adds a builder.
``TORCH_LAYOUTS[name]`` maps the trunk's Flax paths to the key names of the PyTorch
model its pretrained weights come from (``models.pretrained``).
"""

from __future__ import annotations

from typing import Any, Callable

BACKBONES: dict[str, Callable[[Any, Callable[..., Any]], Any]] = {}
UNDILATED: set[str] = set()  # backbones without a dilated (output stride 8) variant
# (collection, *flax names) -> (torch key, convert: torch array -> Flax array)
TORCH_LAYOUTS: dict[str, Callable[[tuple], tuple[str, Callable]]] = {}


def register_backbone(name: str, dilatable: bool = True):
    """Decorator: ``@register_backbone("resnet50") def build(config, norm): ...``;
    ``dilatable=False``: no output-stride-8 variant (``ModelConfig.dilated`` is then False
    by default, and True is refused)."""

    def register(builder):
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = builder
        if not dilatable:
            UNDILATED.add(name)
        return builder

    return register


def register_torch_layout(name: str):
    """Decorator: ``@register_torch_layout("resnet50") def layout(path): ...``."""

    def register(layout):
        TORCH_LAYOUTS[name] = layout
        return layout

    return register


def backbone_name(value: str | int) -> str:
    """A registered name; a bare ResNet depth (``50``, ``"50"``) means ``"resnet50"``."""
    name = str(value)
    if name.isdigit():
        name = f"resnet{name}"
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {value!r}; valid: {', '.join(sorted(BACKBONES))}")
    return name
