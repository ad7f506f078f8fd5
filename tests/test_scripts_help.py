"""Every script a user runs answers --help, each in its own process as a user starts it: an import that no longer
resolves (a renamed constant, a moved function) or a parser that cannot describe itself fails here, not in a
user's hands."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import subprocess_env

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(str(path.relative_to(REPO)) for pattern in ("train_*.py", "eval_policy.py", "make_toy_pairs.py",
                                                              "experiments/*.py", "bench/*.py")
                 for path in REPO.glob(pattern) if '__name__ == "__main__"' in path.read_text())  # not a module


def test_every_kind_of_script_is_found():
    assert {"train_dpo.py", "eval_policy.py", "make_toy_pairs.py", "experiments/token_count.py",
            "bench/real_checkpoint.py"} <= set(SCRIPTS)


def run_help(script: str) -> subprocess.CompletedProcess:
    # a script that ignores --help and starts working instead runs past the timeout
    return subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def help_runs():
    """Every script's run, two at a time (most of each is importing torch and transformers)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {script: pool.submit(run_help, script) for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script, help_runs):
    result = help_runs[script].result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
