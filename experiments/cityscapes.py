"""Multi-task learning with DGR on cityscapes: `python -m experiments.cityscapes --help`."""

from experiments.cli import run


def main(argv=None):
    return run("cityscapes", argv)


if __name__ == "__main__":
    main()
