"""Multi-task learning with DGR on nyuv2: `python -m experiments.nyuv2 --help`."""

from experiments.cli import run


def main(argv=None):
    return run("nyuv2", argv)


if __name__ == "__main__":
    main()
