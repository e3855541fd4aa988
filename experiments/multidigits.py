"""Multi-task learning with DGR on multidigits: `python -m experiments.multidigits --help`."""

from experiments.cli import run


def main(argv=None):
    return run("multidigits", argv)


if __name__ == "__main__":
    main()
