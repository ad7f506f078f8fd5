import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_frontier_writes_plot_csv_and_table(tmp_path):
    """The whole study end to end at --quick sizes: every method trains, is evaluated and is reported."""
    subprocess.run([sys.executable, os.path.join(REPO, "experiments", "frontier.py"), "--quick",
                    "--output_dir", str(tmp_path)], check=True, cwd=REPO, capture_output=True)
    with open(tmp_path / "frontier.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"SFT", "DPO beta=0.1", "DPO beta=1.0", "Preferred-FT", "PPO kl=0.1", "PPO-GT", "Best-of-4"}
    for method, row in rows.items():
        assert -1.0 <= float(row["mean_reward"]) <= 1.0, method  # VADER compound range
        assert float(row["wall_s"]) > 0, method
    assert float(rows["DPO beta=0.1"]["pairs_or_reward_queries"]) > 0
    table = (tmp_path / "frontier.md").read_text().splitlines()
    assert table[0].startswith("| method |") and len(table) == 2 + len(rows)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
