"""The README's first command: the dgr_penalty demo."""

import re

import pytest

from experiments import penalty_demo


def test_demo_runs_and_dgr_lowers_the_dummy_gradient_norm(capsys):
    penalty_demo.main(["--steps", "60", "--batch_size", "32", "--width", "16"])
    out = capsys.readouterr().out
    errors = dict(re.findall(r"^(exact|finite_difference)\s+\S+\s+\S+\s+(\S+)$", out, flags=re.M))
    assert float(errors["exact"]) < 1e-5
    norms = [
        float(v) for v in re.findall(r"^(?:vanilla|DGR λ=\S+)\s+\S+\s+\S+\s+(\S+)", out, flags=re.M)
    ]
    assert len(norms) == 2 and norms[1] < norms[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--fd_eps", "-1"], "--fd_eps must be > 0, got -1.0"),
        (["--dgr_method", "newton"], "invalid choice: 'newton'"),
    ],
)
def test_demo_rejects_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        penalty_demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
