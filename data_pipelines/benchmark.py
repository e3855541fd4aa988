"""Input throughput of the NYUv2-format pipeline: examples per second.

    python -m data_pipelines.benchmark                      # 288x384, batch 4, augmented train split
    python -m data_pipelines.benchmark --data_dir ~/nyuv2   # your own NYUv2 folder

Without ``--data_dir`` it generates procedural scenes in the NYUv2 format once (cached,
``data_pipelines.synthetic``) and reads them through the same TFDS builder and tf.data
pipeline as real NYUv2. The first epoch after preparing is reported apart from the
steady state (later epochs), as the median over epochs of examples per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from data_pipelines import nyuv2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="NYUv2 folder (train/val of image,label,depth,normal .npy); "
        "default: generated scenes in that format",
    )
    parser.add_argument(
        "--height", type=int, default=288, help="generated scene height (default 288, NYUv2's)"
    )
    parser.add_argument(
        "--width", type=int, default=384, help="generated scene width (default 384, NYUv2's)"
    )
    parser.add_argument(
        "--num_examples", type=int, default=96, help="generated training scenes (default 96)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=4, help="batch size (default 4, the paper's)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs timed after the first (default 3)"
    )
    parser.add_argument("--no_augment", action="store_true", help="time without augmentation")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    for name in ("height", "width", "num_examples", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def time_epoch(dataset) -> tuple[float, int]:
    start, count = time.perf_counter(), 0
    for batch in dataset:
        count += len(batch["index"])
    return time.perf_counter() - start, count


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None:
        from data_pipelines import synthetic

        data_dir = synthetic.synthetic_root(
            "nyuv2", num_train=args.num_examples, num_val=4, height=args.height, width=args.width
        )
    augment = not args.no_augment

    def epoch(k):
        return nyuv2.make_dataset(
            data_dir, "train", args.batch_size, augment=augment, seed=0, epoch=k
        )

    first = epoch(0)
    print(
        f"NYUv2 format from {data_dir}: {args.num_examples} train examples at "
        f"{first.height}x{first.width}, batch {args.batch_size}, augment={augment}",
        flush=True,
    )
    seconds, count = time_epoch(first)
    print(f"  epoch 0 (first read): {count / seconds:8.1f} examples/s", flush=True)
    rates = []
    for k in range(1, args.epochs + 1):
        seconds, count = time_epoch(epoch(k))
        rates.append(count / seconds)
        print(f"  epoch {k}:              {rates[-1]:8.1f} examples/s", flush=True)
    median = statistics.median(rates)
    print(
        f"median over epochs 1..{args.epochs}: {median:.1f} examples/s "
        f"({args.batch_size / median * 1000:.1f} ms per batch of {args.batch_size})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "examples_per_s": median,
                    "epochs": rates,
                    "height": first.height,
                    "width": first.width,
                    "batch_size": args.batch_size,
                    "augment": augment,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
