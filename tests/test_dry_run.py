"""utils/dry_run.py: --dry_run reports what training then uses (rows kept and dropped, the reference cache's hit or
miss and its file) and writes nothing."""

import os
import re

import train_dpo
from helpers import tiny_run_args

GOOD = [{"prompt": f"i saw film {i}.", "chosen": " it was good.", "rejected": " it was bad."} for i in range(10)]
SAME = {"prompt": "one more.", "chosen": " same.", "rejected": " same."}
LONG_PROMPT = {"prompt": "word " * 80, "chosen": " good.", "rejected": " bad."}


def tree(path) -> dict:
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(path) for name in names}


def dry_run(argv, capsys) -> str:
    assert train_dpo.main([*argv, "--dry_run"]) is None
    return capsys.readouterr().out


def test_the_report_counts_what_training_uses_and_writes_nothing(tmp_path, rows_file, capsys):
    rows = GOOD[:2] + [SAME] + GOOD[2:5] + [LONG_PROMPT] + GOOD[5:]  # row 2: same texts, row 6: no room
    path = rows_file("data/pairs.jsonl", rows)
    argv = tiny_run_args(tmp_path, "--dataset_name", path, "--max_length", "32", "--max_steps", "1")
    before = tree(tmp_path)
    report = dry_run(argv, capsys)
    assert tree(tmp_path) == before  # nothing written: no output folder, no cache, no file touched
    assert f"{path} [train]: 10 of 12 pairs kept" in report
    assert re.search(r"dropped 1 whose chosen equals rejected: row 2 \(line 3\)", report)
    assert re.search(r"dropped 1 whose prompt leaves no room .*: row 6 \(line 7\)", report)
    assert "pairs truncation cut: prompt 0, chosen 0, rejected 0 (max_length 32)" in report
    miss = re.search(r"reference log-probs \(train\): cache miss \(missing\), 10 pairs would be scored: (\S+)", report)
    assert miss and not os.path.exists(miss.group(1))

    trainer = train_dpo.main(argv)
    assert sorted(trainer.train_dataset["row_index"]) == [0, 1, 3, 4, 5, 7, 8, 9, 10, 11]
    assert os.listdir(tmp_path / "cache") == [os.path.basename(miss.group(1))]  # the file the report named

    report = dry_run(argv, capsys)
    assert f"reference log-probs (train): cache hit: {miss.group(1)}" in report


def test_lengths_and_tokens_per_step_are_the_data_s(tmp_path, rows_file, capsys, tokenizer):
    """Percentiles of the untruncated lengths and the pairs truncation cut, against the tokenizer's own counts."""
    rows = [{"prompt": "a " * n, "chosen": " b" * (2 * n), "rejected": " c"} for n in range(1, 9)]
    path = rows_file("pairs.jsonl", rows)
    report = dry_run(tiny_run_args(tmp_path, "--dataset_name", path, "--max_length", "16",
                                   "--per_device_train_batch_size", "8"), capsys)
    def count(text, specials=False):
        return len(tokenizer(text, add_special_tokens=specials)["input_ids"])

    prompts = [count(row["prompt"], specials=True) for row in rows]
    chosen = [count(row["prompt"] + row["chosen"]) - count(row["prompt"]) + 1 for row in rows]  # + eos
    assert f"prompt {sorted(prompts)[len(prompts) // 2]} / " in report  # the upper median and f" / {max(prompts)}, completion" in report
    cut = sum(prompt + length > 16 for prompt, length in zip(prompts, chosen))
    assert f"pairs truncation cut: prompt 0, chosen {cut}, rejected 0 (max_length 16)" in report
    assert "tokens per optimizer step (8 pairs x 1 accumulation x 1 process(es), 1 steps per epoch" in report
