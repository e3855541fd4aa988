"""Multi-task learning with DGR on pascal: `python -m experiments.pascal --help`."""

from experiments.cli import run


def main(argv=None):
    return run("pascal", argv)


if __name__ == "__main__":
    main()
