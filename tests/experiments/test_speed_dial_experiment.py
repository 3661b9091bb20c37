"""`experiments/speed_dial.py`: its report (tables, findings, the section it keeps at the top of results.md), and
its runs that continue where an interrupted one stopped."""

import json

import pytest

import experiments.speed_dial as speed_dial
from experiments.results_page import SUMMARY_BEGIN, SUMMARY_END, elastic_clause
from experiments.speed_dial import (
    MARKER_END,
    MARKER_START,
    build_parser,
    findings,
    fine_tune_config,
    fine_tune_recipe,
    noise_verdict,
    paired_difference,
    render,
    start_frozen_run,
)

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
        "contrast_weight": 0.5,
        "prediction_changes": {"0.0": 0.9, "0.5": 0.8, "1.0": 0.85},
        "load_average_before": [8.0, 8.0, 8.0],
        "load_average_after": [9.0, 9.0, 9.0],
    }
    throughput = {selector: {rate: 10.0 + int(rate) for rate in RATES} for selector in accuracy}
    # Each selector's hits on the 100 eval scenes, its first scenes right: any two share their leading hits.
    correct = {
        selector: {rate: "1" * round(100 * share) + "0" * (100 - round(100 * share)) for rate, share in row.items()}
        for selector, row in accuracy.items()
    }
    return {
        "command": "python experiments/speed_dial.py",
        "started": "now",
        "wall_seconds": 600.0,
        "environment": {"cpu_model": "cpu", "cpu_cores_available": 2, "torch_threads": 1, "load_average": [8, 8, 8]},
        "settings": {
            "image_size": 112,
            "canvas_size": 112,
            "data_seed": 0,
            "rates": [0, 1, 2],
            "num_train": 2000,
            "num_eval": 100,
            "calibration_epochs": 1.0,
            "contrast_weights": [0.0, 0.5, 1.0],
            "batch_size": 16,
            "throughput_batch_size": 16,
            "throughput_repeats": 3,
        },
        "seeds": {
            "0": {"accuracy": accuracy, "correct": correct, "calibration": calibration, "throughput": throughput}
        },
    }


def test_findings_name_the_rates_where_calibrated_cropr_is_below_a_baseline():
    lines = findings(fake_results())
    assert lines[0].endswith(
        "R=1 +10.0, R=2 -2.0 points; below it at R=2; paired on the same scenes: R=2 -2.0 [-4.8, +0.8] points, "
        "each 95% interval holding zero, within the noise of the eval scenes."
    )
    assert lines[1].endswith("at or above it at every rate.")
    assert "Calibration on 2000 images took 5.0 to 5.0 min" in lines[-1]


def test_the_report_names_the_share_of_the_contrast_read_out_each_calibration_kept():
    results = fake_results()
    assert "(shares 0, 0.5, 1) by the share of the unpruned model's predictions" in speed_dial.markdown(results)
    assert "share kept: seed 0 0.5. The same weights run" in speed_dial.markdown(results)
    results["settings"]["contrast_weights"] = [0.0]  # nothing compared: nothing to say
    assert "contrast read-out" not in speed_dial.markdown(results)


def test_paired_difference_averages_each_scene_over_the_seeds_and_its_interval_spans_the_scenes():
    results = fake_results()
    difference = paired_difference(results, "variance", "1")  # 55 hits against 50: 5 scenes differ by one hit
    assert [round(100 * difference[key], 1) for key in ("mean", "low", "high")] == [5.0, 0.7, 9.3]
    results["seeds"] = {
        "0": {"correct": {"cropr": {"1": "1100"}, "variance": {"1": "1000"}}},
        "1": {"correct": {"cropr": {"1": "1000"}, "variance": {"1": "1000"}}},
    }
    # Per scene 0, 0.5, 0, 0: mean 0.125, standard deviation 0.25 over 4 scenes.
    assert paired_difference(results, "variance", "1") == pytest.approx(
        {"mean": 0.125, "low": 0.125 - 1.96 * 0.125, "high": 0.125 + 1.96 * 0.125}
    )
    results["seeds"]["1"]["correct"]["cropr"]["1"] = "100"
    with pytest.raises(ValueError, match="the seeds' eval scenes at R=1 differ in number"):
        paired_difference(results, "variance", "1")


def test_noise_verdict_names_the_rates_whose_interval_lies_below_zero():
    results = fake_results()
    results["seeds"]["0"]["correct"]["cropr"]["1"] = "1" * 40 + "0" * 60  # 10 scenes lost against variance's 50
    assert noise_verdict(results, "variance", ["1", "2"]) == (
        "paired on the same scenes: R=1 -10.0 [-15.9, -4.1], R=2 +10.0 [+4.1, +15.9] points, "
        "the 95% interval below zero at R=1"
    )


def test_render_writes_the_report_and_replaces_its_section_of_results_md(tmp_path):
    (tmp_path / "results.md").write_text("# Results\n\nthe other runs\n")
    render(fake_results(), tmp_path)
    render(fake_results(), tmp_path)
    page = (tmp_path / "results.md").read_text()
    # The summary opens the page, the speed dial's section follows it, and the rest of the page stays as it was.
    assert page.startswith("# Results\n\n" + SUMMARY_BEGIN) and page.count(MARKER_START) == 1
    assert page.count(SUMMARY_BEGIN) == 1 and page.index(SUMMARY_END) < page.index(MARKER_START)
    summary = page.split(SUMMARY_END)[0]
    assert (
        "reach a median top-1 accuracy at or above variance's and attention's at every pruned rate (+5.0 to +20.0 "
        "points), and below random's at R=2 by at most 2.0 points (within the noise of the eval scenes)." in summary
    )
    assert page.endswith(MARKER_END + "\n\nthe other runs\n")
    report = (tmp_path / "results_speed_dial.md").read_text()
    assert "| cropr, calibrated | 60.0 [60.0, 60.0] | 55.0 [55.0, 55.0] | 50.0 [50.0, 50.0] |" in report
    assert "| random | +10.0 [+4.1, +15.9] | -2.0 [-4.8, +0.8] |" in report
    assert (tmp_path / "results_speed_dial.png").stat().st_size > 0


def fine_tuned_part(runs: list[tuple[int, str, dict[str, str]]], num_eval: int = 8) -> dict:
    args = build_parser().parse_args(["--rates", "0", "1", "2", "--num-eval", str(num_eval), "--backbone", "dinov2"])
    return {
        "recipe": fine_tune_recipe(fine_tune_config(args), args),
        "command": "python scripts/speed_dial.py --parts fine-tuned",
        "started": "now",
        "environment": fake_results()["environment"],
        "wall_seconds": 60.0,
        "runs": [
            {"seed": seed, "name": name, "train_seconds": 30.0, "correct": correct} for seed, name, correct in runs
        ],
    }


def test_fine_tuned_checkpoints_are_reported_on_the_frozen_models_scenes_and_elastic_against_fixed():
    results = fake_results()
    results["seeds"]["1"] = results["seeds"]["0"]
    results["settings"]["num_eval"] = 4  # the fine-tuned checkpoints' first 4 of 8 scenes are the frozen model's
    results["fine_tuned"] = fine_tuned_part(
        [
            (0, "elastic", {"1": "11110000", "2": "11000000"}),
            (0, "R=1", {"1": "11100000"}),
            (0, "R=2", {"2": "11100000"}),
            (1, "elastic", {"1": "10000000", "2": "10000000"}),
        ]
    )
    report = speed_dial.markdown(results)
    assert "| cropr fine-tuned, one checkpoint per rate | - | 75.0 [75.0, 75.0] | 75.0 [75.0, 75.0] |" in report
    assert "| cropr fine-tuned elastic, one checkpoint | - | 62.5 [25.0, 100.0] | 37.5 [25.0, 50.0] |" in report
    # Elastic against fixed: on all 8 scenes, paired by seed (seed 1 has no fixed-rate checkpoint yet).
    assert "| R=1 | 37.5 [37.5, 37.5] | 31.2 [12.5, 50.0] | +12.5 [+12.5, +12.5] | 1 |" in report
    assert "Not measured (the run stopped before them): the fine-tuned checkpoints R=1 seed 1, R=2 seed 1." in report
    lines = findings(results)
    assert "R=1 +12.5, R=2 -12.5 points; more than 1 point below at R=2 (target: within 1 point" in lines[4]
    assert "minus calibrated Cropr, median accuracy on the same 4 scenes: R=1 +20.0, R=2 +25.0 points." in lines[3]
    assert elastic_clause(results) == (
        "on classification, one elastic checkpoint, trained once, is more than 1 point below the one trained at R=2"
    )


def test_a_frozen_run_of_another_recipe_is_superseded_and_one_of_the_same_continued():
    results = fake_results()
    results["settings"] = speed_dial.frozen_settings(build_parser().parse_args(["--rates", "0", "1", "2"]))
    start_frozen_run(results, build_parser().parse_args(["--rates", "0", "1", "2", "--seeds", "3"]))
    assert list(results["seeds"]) == ["0"] and results["settings"]["seeds"] == [0, 1, 2, 3]
    results["retimed"] = {"date": "yesterday"}  # the stored run was timed again: a record that goes with it
    start_frozen_run(results, build_parser().parse_args(["--rates", "0", "1", "2", "--num-eval", "1000"]))
    assert results["seeds"] == {} and results["settings"]["num_eval"] == 1000
    assert [run["settings"]["num_eval"] for run in results["superseded"]] == [256]
    assert "retimed" not in results and results["superseded"][0]["retimed"] == {"date": "yesterday"}
    assert "## Appendix: superseded runs" not in speed_dial.markdown(fake_results())


def test_fine_tuned_part_stores_each_checkpoint_and_skips_the_stored_ones(tmp_path, tiny_backbone, monkeypatch):
    calls = []
    real_fine_tune = speed_dial.fine_tune

    def spy(*args, **kwargs):
        trainer, seconds = real_fine_tune(*args, **kwargs)
        callback = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "elastic_min_fraction"))
        calls.append((args[3] if len(args) > 3 else None, callback.elastic_min_fraction, callback.seed))
        return trainer, seconds

    monkeypatch.setattr(speed_dial, "fine_tune", spy)
    output = tmp_path / "speed_dial.json"
    frozen = fake_results()
    frozen["settings"].update(backbone="dinov2", image_size=32, canvas_size=56, num_train=8)
    output.write_text(json.dumps(frozen))
    argv = [
        "--backbone", str(tiny_backbone), "--image-size", "32", "--canvas-size", "56", "--num-train", "8",
        "--num-eval", "6", "--rates", "0", "1", "2", "--seeds", "4", "--parts", "fine-tuned",
        "--output", str(output), "--docs", str(tmp_path),
    ]  # fmt: skip
    assert speed_dial.main(argv) == 0
    part = json.loads(output.read_text())["fine_tuned"]
    assert [(run["seed"], run["name"], sorted(run["correct"])) for run in part["runs"]] == [
        (4, "elastic", ["1", "2"]),
        (4, "R=1", ["1"]),
        (4, "R=2", ["2"]),
    ]
    assert all(len(bits) == 6 and set(bits) <= {"0", "1"} for run in part["runs"] for bits in run["correct"].values())
    # The elastic checkpoint draws fractions from [lowest / highest pruned rate, 1], seeded by the run's seed.
    assert [(minimum, seed) for _, minimum, seed in calls] == [(0.5, 4), (None, 4), (None, 4)]
    assert part["recipe"]["elastic_min_fraction"] == 0.5 and "seeds" not in part["recipe"]
    assert (tmp_path / "results_speed_dial.md").is_file()
    calls.clear()
    assert speed_dial.main(argv) == 0  # everything stored: nothing trains again
    assert calls == [] and len(json.loads(output.read_text())["fine_tuned"]["runs"]) == 3
    with pytest.raises(SystemExit, match=r"other --canvas-size \(56\); fine-tune with its settings"):
        speed_dial.main([*argv, "--canvas-size", "112"])
    stored = output.read_text()
    with pytest.raises(SystemExit, match=r"3 fine-tuned checkpoints stored .* another recipe \(differing: budgets\)"):
        speed_dial.main([*argv, "--fine-tune-epochs", "2"])
    assert output.read_text() == stored


def test_retime_times_every_selector_and_rate_of_the_stored_run_again_and_changes_nothing_else(tmp_path, tiny_backbone):
    output = tmp_path / "speed_dial.json"
    argv = [
        "--backbone", str(tiny_backbone), "--image-size", "32", "--canvas-size", "56", "--num-train", "8",
        "--num-eval", "6", "--rates", "0", "1", "2", "--throughput-batch-size", "2", "--quiet",
        "--output", str(output), "--docs", str(tmp_path),
    ]  # fmt: skip
    stored = fake_results()
    stored["settings"] = speed_dial.frozen_settings(build_parser().parse_args([*argv, "--throughput-repeats", "3"]))
    output.write_text(json.dumps(stored))
    assert speed_dial.main([*argv, "--throughput-repeats", "2", "--retime"]) == 0
    results = json.loads(output.read_text())
    throughput = results["seeds"]["0"].pop("throughput")
    assert sorted(throughput) == sorted(speed_dial.SELECTORS)
    assert all(
        sorted(row) == ["0", "1", "2"] and all(value > 0 for value in row.values()) for row in throughput.values()
    )
    assert throughput != stored["seeds"]["0"].pop("throughput")  # measured, not the stored 10-12 images/s
    assert results["seeds"] == stored["seeds"] and results["settings"]["throughput_repeats"] == 2
    assert set(results["retimed"]) == {"date", "command", "environment", "load_average_before", "load_average_after"}
    report = (tmp_path / "results_speed_dial.md").read_text()
    assert "median of 2 interleaved timings per (selector, rate), measured on " in report
    assert "on seed 0's models" in speed_dial.markdown(fake_results())  # a run never timed again says whose
    with pytest.raises(SystemExit, match=r"pass its settings \(num_eval differ\)"):
        speed_dial.main([*argv, "--num-eval", "7", "--retime"])
    output.unlink()
    with pytest.raises(SystemExit, match="needs a stored run"):
        speed_dial.main([*argv, "--retime"])


def test_calibration_time_part_records_one_timed_calibration_at_its_size(tmp_path, tiny_backbone):
    output = tmp_path / "speed_dial.json"
    output.write_text(json.dumps(fake_results()))
    argv = [
        "--backbone", str(tiny_backbone), "--image-size", "16", "--timing-image-size", "32", "--canvas-size", "56",
        "--num-train", "8", "--batch-size", "4", "--rates", "0", "1", "--parts", "calibration-time", "--quiet",
        "--output", str(output), "--docs", str(tmp_path),
    ]  # fmt: skip
    assert speed_dial.main(argv) == 0
    timing = json.loads(output.read_text())["calibration_timing"]
    # The rate keeps the frozen part's share of patches: R=1 of 4 patches at 16 px is R=4 of 16 at 32 px.
    assert (timing["image_size"], timing["pruning_rate"], timing["images"], timing["steps"]) == (32, 4, 8, 2)
    assert (
        "- Calibration of the bare DINOv2-S/14 at 32 px on 8 images took"
        in findings(json.loads(output.read_text()))[-1]
    )
