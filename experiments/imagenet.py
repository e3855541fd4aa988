"""Single-task ImageNet classification with DGR: `python -m experiments.imagenet --help`."""

from experiments.cli import run


def main(argv=None):
    return run("imagenet", argv)


if __name__ == "__main__":
    main()
