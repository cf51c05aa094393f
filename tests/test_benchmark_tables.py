"""The README's builds table is generated from result files: per N and design the newest dated run
wins, whatever order the files are found in (a fresh clone gives every file the same mtime)."""
import json

from benchmarks.readme_table import builds_table


def _run(path, date, lowered_ms, **extra):
    row = {"design": "cca", "n": 16384, "create_block_mask_compiled_ms": 1.0, "lowered_ms": lowered_ms,
           "identical": True, **extra}
    data = {"rows": [row]} if date is None else {"date": date, "rows": [row]}
    path.write_text(json.dumps(data))
    return str(path)


def test_newest_dated_run_wins_and_undated_runs_count_as_oldest(tmp_path):
    old = _run(tmp_path / "z_undated.json", None, 4.0)
    new = _run(tmp_path / "a_new.json", "2026-11-29T02:56", 0.5, compiled_build_ms=0.25,
               compiled_build_identical=False)
    for paths in ([old, new], [new, old]):
        lines = builds_table(paths)
        (row,) = [line for line in lines if line.startswith("| 16k")]
        assert "| 0.5 | **2.0x** |" in row and "**4.0x**" in row and row.endswith("yes / **NO** |")
    assert builds_table([]) == []
