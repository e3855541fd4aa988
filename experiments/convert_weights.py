"""Convert a pretrained checkpoint to ``.safetensors`` once, so that runs read it without
torch:

    python -m experiments.convert_weights resnet50-11ad3fa6.pth resnet50.safetensors

IN may be ``.pth`` / ``.pt`` (needs torch), ``.npz`` or ``.safetensors``; OUT must end in
``.safetensors``. The tensors keep their torch names and layout; nothing else is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.convert_weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="the downloaded checkpoint (.pth, .pt, .npz, .safetensors)")
    parser.add_argument("output", help="where to write the .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    from experiments.weights import WeightsError, read_state_dict

    output = Path(args.output).expanduser()
    if output.suffix != ".safetensors":
        parser.error(f"OUTPUT {output} must end in .safetensors")
    if output.exists() and not args.overwrite:
        parser.error(f"OUTPUT {output} exists; pass --overwrite to replace it")
    try:
        tensors = read_state_dict(args.input)
    except WeightsError as error:
        print(
            f"convert_weights: {str(error).replace('--pretrained ', 'INPUT ', 1)}", file=sys.stderr
        )
        return 1
    from safetensors.numpy import save_file

    partial = output.with_name(output.name + ".partial")
    save_file({k: v for k, v in tensors.items()}, str(partial))
    partial.replace(output)  # never a half-written OUTPUT
    total = sum(v.size for v in tensors.values())
    print(f"wrote {output}: {len(tensors)} tensors, {total:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
