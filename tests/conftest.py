"""Shared fixtures. Tests run offline: a stray Hub request fails at once instead of retrying.

One OpenMP thread per process (subprocesses inherit it): the test models are tiny, and on a 2-core machine
busy with other work, several spinning OpenMP threads per process slow training steps down ~100x.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The presets' toy tokenizer (shared: tests must not modify it)."""
    from utils.modeling import toy_tokenizer

    return toy_tokenizer()


def write_rows(path, rows: list[dict]) -> str:
    """Write rows to `path` in the format its extension names (.jsonl, .json, .csv, .parquet); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    else:
        raise ValueError(f"write_rows: unsupported extension {path.suffix!r}")
    return str(path)


@pytest.fixture
def rows_file(tmp_path):
    """`rows_file(name, rows)` writes rows to tmp_path/name and returns its path."""
    return lambda name, rows: write_rows(tmp_path / name, rows)
