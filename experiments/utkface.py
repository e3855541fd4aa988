"""Multi-task learning with DGR on utkface: `python -m experiments.utkface --help`."""

from experiments.cli import run


def main(argv=None):
    return run("utkface", argv)


if __name__ == "__main__":
    main()
