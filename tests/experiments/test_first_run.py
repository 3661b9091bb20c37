"""`make main` (`scripts/first_run.py`): the table, the picture and the checkpoint it promises, on a clean console."""

import json
import logging
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from experiments.first_run import VARIANTS, console_to_log

ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<accuracy>\d+\.\d%)\s+\d+\.\d\s+\d+\.\d\dx\s+\d+\.\d\dx$")


def test_quick_run_prints_the_table_the_picture_and_a_runnable_checkpoint(tmp_path, capsys):
    output_dir = tmp_path / "first-run"
    command = [sys.executable, "scripts/first_run.py", "--quick", "--output-dir", str(output_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    header = next(index for index, line in enumerate(lines) if "FLOP ceiling" in line and "top-1" in line)
    assert re.search(r"top-1\s+images/s \(eval, batch \d+\)\s+speedup\s+FLOP ceiling$", lines[header])
    rows = [ROW.match(line) for line in lines[header + 1 : header + 4]]
    assert all(rows), lines[header : header + 4]
    assert [row["name"] for row in rows] == [name for name, _ in VARIANTS] + ["pruned weights, pruning off"]
    assert any(re.match(r"Speedup \d+\.\d\dx = \d\.\d\d of the FLOP ceiling", line) for line in lines)

    # The picture and the log are where the console says.
    heatmaps = next(line.split(": ", 1)[1] for line in lines if line.startswith("Patches each Cropr module"))
    assert open(heatmaps, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "run.log").is_file() and str(output_dir / "run.log") in result.stdout
    # Trainer's log dicts and the library logs go to the file, not to the console.
    assert "'train_runtime'" in (output_dir / "run.log").read_text()
    for stream in (result.stdout, result.stderr):
        assert "'train_runtime'" not in stream and "{'loss'" not in stream and " INFO " not in stream

    # The three printed lines run the stripped checkpoint with `pipeline()`.
    snippet = lines[lines.index("Run it:") + 1 :][:3]
    assert snippet[0].strip().startswith("import cropr") and "pipeline(" in snippet[2]
    exec("\n".join(line.strip() for line in snippet), {})
    assert re.search(r"'label': '[^']+', 'score'", capsys.readouterr().out)

    results = json.loads((output_dir / "results.json").read_text())
    assert str(tmp_path) not in json.dumps(results)
    assert set(results["accuracy"]) == {name for name, _ in VARIANTS} | {"pruned weights, pruning off"}
    # One torch thread (the default): timed on this process's CPU time, which other jobs on the cores do not skew.
    assert results["torch_threads"] == 1 and results["clock"] == "cpu" and "per CPU-second" in result.stdout


def test_console_to_log_sends_prints_and_logs_to_the_file_and_lets_errors_through(tmp_path, capsys):
    log_path = tmp_path / "run.log"
    with pytest.raises(RuntimeError, match="boom"):
        with console_to_log(log_path) as terminal:
            print("printed")
            logging.getLogger("cropr.test").info("logged")
            terminal.write("bar\n")
            raise RuntimeError("boom")
    captured = capsys.readouterr()
    text = log_path.read_text()
    assert "printed" in text and "logged" in text
    assert "printed" not in captured.out and "bar" in captured.err
