"""The README's code must run as written."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    result = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert re.match(r"penalty \d+\.\d{4}, gradient norm \d+\.\d{4}$", result.stdout.strip())


def test_readme_starts_with_install_lines_that_ci_runs():
    text = README.read_text()
    commands = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert len(commands) == 2
    assert "pip install -e ." in commands[0] and "python -m experiments." in commands[0]
    assert 'pip install -e ".[test]"' in commands[1] and "pytest" in commands[1]
