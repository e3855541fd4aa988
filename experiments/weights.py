"""Reading pretrained weights from the files users download: ``.safetensors`` (through the
``safetensors`` package, no torch needed), ``.npz``, and ``.pth`` / ``.pt`` (through
torch when it is installed). Each gives ``{torch key: numpy array}`` for
``dgr_jax.models.pretrained.encoder_from_torch``. Bad files raise ``WeightsError``, one
line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")
# Checkpoints that wrap the state dict (timm's, training scripts') under one of these keys.
WRAPPERS = ("state_dict", "model", "model_state")


class WeightsError(ValueError):
    """A weights file that cannot be read; the message names it."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"--pretrained {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(
            f"--pretrained {path}: unknown format {suffix or '(no suffix)'}; use "
            f"{', '.join(SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                tensors = {k: archive[k] for k in archive.files}
        else:
            tensors = _read_torch(path)
    except WeightsError:
        raise
    except Exception as error:  # a truncated or foreign file: say which, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"--pretrained {path}: cannot read it ({first})") from None
    if not tensors:
        raise WeightsError(f"--pretrained {path}: holds no tensors")
    # DataParallel's "module." prefix off
    return {k.removeprefix("module."): np.asarray(v) for k, v in tensors.items()}


def _read_torch(path: Path) -> Mapping:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"--pretrained {path}: reading .pth/.pt needs torch; install it (pip install torch) "
            f"or convert the file once where torch is: python -m experiments.convert_weights "
            f"{path.name} {path.stem}.safetensors"
        ) from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    loaded = _unwrap(loaded)
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"--pretrained {path}: holds a {type(loaded).__name__}, not a state dict"
        )
    return {
        k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in loaded.items()
        if hasattr(v, "detach")
    }


def _unwrap(tensors):
    if isinstance(tensors, Mapping):
        for key in WRAPPERS:
            if key in tensors and isinstance(tensors[key], Mapping):
                return tensors[key]
    return tensors
