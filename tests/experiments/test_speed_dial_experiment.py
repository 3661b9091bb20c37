"""The report of `experiments/speed_dial.py`: tables, findings and the section it keeps at the top of results.md."""

from experiments.results_page import SUMMARY_BEGIN, SUMMARY_END
from experiments.speed_dial import MARKER_END, MARKER_START, findings, render

RATES = ("0", "1", "2")


def fake_results() -> dict:
    accuracy = {
        "cropr": {"0": 0.6, "1": 0.55, "2": 0.5},
        "random": {"0": 0.6, "1": 0.45, "2": 0.52},
        "variance": {"0": 0.6, "1": 0.5, "2": 0.4},
        "attention": {"0": 0.6, "1": 0.4, "2": 0.3},
    }
    calibration = {
        "seconds": 300.0,
        "steps": 125,
        "images": 2000,
        "first_loss": 25.0,
        "last_loss": 16.0,
        "load_average_before": [8.0, 8.0, 8.0],
        "load_average_after": [9.0, 9.0, 9.0],
    }
    throughput = {selector: {rate: 10.0 + int(rate) for rate in RATES} for selector in accuracy}
    return {
        "command": "python experiments/speed_dial.py",
        "started": "now",
        "wall_seconds": 600.0,
        "environment": {"cpu_model": "cpu", "cpu_cores_available": 2, "torch_threads": 1, "load_average": [8, 8, 8]},
        "settings": {
            "image_size": 112,
            "num_train": 2000,
            "num_eval": 256,
            "calibration_epochs": 1.0,
            "batch_size": 16,
            "throughput_batch_size": 16,
        },
        "seeds": {"0": {"accuracy": accuracy, "calibration": calibration, "throughput": throughput}},
    }


def test_findings_name_the_rates_where_calibrated_cropr_is_below_a_baseline():
    lines = findings(fake_results())
    assert "R=1 +10.0, R=2 -2.0 points; below it at R=2." in lines[0]
    assert lines[1].endswith("at or above it at every rate.")
    assert "Calibration on 2000 images took 5.0 to 5.0 min" in lines[-1]


def test_render_writes_the_report_and_replaces_its_section_of_results_md(tmp_path):
    (tmp_path / "results.md").write_text("# Results\n\nthe other runs\n")
    render(fake_results(), tmp_path)
    render(fake_results(), tmp_path)
    page = (tmp_path / "results.md").read_text()
    # The summary opens the page, the speed dial's section follows it, and the rest of the page stays as it was.
    assert page.startswith("# Results\n\n" + SUMMARY_BEGIN) and page.count(MARKER_START) == 1
    assert page.count(SUMMARY_BEGIN) == 1 and page.index(SUMMARY_END) < page.index(MARKER_START)
    summary = page.split(SUMMARY_END)[0]
    assert "at or above variance's (+5.0 to +10.0 points) and attention's (+15.0 to +20.0 points)" in summary
    assert "at every pruned rate R=1-2, and below random's at R=2 (by at most 2.0 points)." in summary
    assert page.endswith(MARKER_END + "\n\nthe other runs\n")
    report = (tmp_path / "results_speed_dial.md").read_text()
    assert "| cropr | 60.0 [60.0, 60.0] | 55.0 [55.0, 55.0] | 50.0 [50.0, 50.0] |" in report
    assert (tmp_path / "results_speed_dial.png").stat().st_size > 0
