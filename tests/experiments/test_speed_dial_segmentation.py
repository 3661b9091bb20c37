"""`experiments/speed_dial_segmentation.py`: its per-scene mean IoU and paired bootstrap, and a whole run on a tiny
backbone that continues where it stopped and writes its report and its section of results.md."""

import json

import numpy as np
import pytest
import torch

import experiments.speed_dial_segmentation as speed_dial_segmentation
from cropr.training.metrics import SegmentationMetrics
from experiments.speed_dial import MARKER_END as SPEED_DIAL_END
from experiments.speed_dial import MARKER_START as SPEED_DIAL_START
from experiments.speed_dial_segmentation import (
    MARKER_END,
    MARKER_START,
    bootstrap_difference,
    kind_counts,
    mean_iou,
    patch_kinds,
    patch_labels,
    scene_counts,
)


def fake_results() -> dict:
    """Two seeds at R=0-2: calibrated Cropr above random at R=1 and below it and variance at R=2, beyond the noise in
    both seeds (intervals of +-2 points)."""
    scores = {
        "cropr": [0.5, 0.45, 0.3],
        "random": [0.5, 0.4, 0.33],
        "variance": [0.5, 0.45, 0.4],
        "attention": [0.5, 0.3, 0.2],
    }

    def seed(shift: float) -> dict:
        mean_iou = {selector: {str(r): v + shift for r, v in enumerate(values)} for selector, values in scores.items()}
        cropr_minus = {
            selector: {
                rate: {"mean": d, "low": d - 0.02, "high": d + 0.02}
                for rate in ("1", "2")
                for d in [mean_iou["cropr"][rate] - mean_iou[selector][rate]]
            }
            for selector in ("random", "variance", "attention")
        }
        calibration = {
            "seconds": 90.0,
            "steps": 125,
            "images": 2000,
            "first_loss": 2.0,
            "last_loss": 1.5,
            "contrast_weight": 1.0,
            "prediction_changes": {"0.0": 0.9, "0.5": 0.8, "1.0": 0.7},
        }
        # The last module's kept patches per kind (background, edge, inside) of 10 eval patches: 3, 5, 2.
        kept = {"cropr": [0, 2, 2], "random": [1, 2, 1], "variance": [0, 4, 0], "attention": [2, 1, 1]}
        last_module_kept = {selector: {"1": counts, "2": counts} for selector, counts in kept.items()}
        return {
            "head_loss": 0.3,
            "calibration": calibration,
            "mean_iou": mean_iou,
            "cropr_minus": cropr_minus,
            "patch_kinds": [3, 5, 2],
            "last_module_kept": last_module_kept,
        }

    throughput = {selector: {rate: 10.0 + int(rate) for rate in ("0", "1", "2")} for selector in scores}
    return {
        "command": "python scripts/speed_dial_segmentation.py",
        "started": "now",
        "wall_seconds": 600.0,
        "environment": {"cpu_model": "cpu", "cpu_cores_available": 2, "torch_threads": 2, "load_average": [1, 1, 1]},
        "settings": {
            "image_size": 112,
            "num_train": 2000,
            "num_eval": 1000,
            "head_steps": 300,
            "calibration_epochs": 1.0,
            "calibration_lr": 5e-3,
            "contrast_weights": [0.0, 0.5, 1.0],
            "batch_size": 16,
            "throughput_batch_size": 16,
            "throughput_repeats": 3,
            "bootstrap_resamples": 1000,
            "aux_ignored_labels": [0],
        },
        "seeds": {"0": {**seed(0.0), "throughput": throughput}, "1": seed(0.01)},
    }


def test_findings_say_where_the_gap_is_beyond_the_scenes_noise():
    lines = speed_dial_segmentation.findings(fake_results())
    assert lines[0] == (
        "- Calibrated Cropr minus random, median mean IoU per pruned rate: R=1 +5.0, R=2 -3.0 points; below it at "
        "R=2 and above it at R=1 beyond the noise of the eval scenes (the bootstrap interval in most seeds)."
    )
    assert lines[1].endswith(
        "R=1 +0.0, R=2 -10.0 points; below it at R=2 beyond the noise of the eval scenes (the "
        "bootstrap interval in most seeds)."
    )
    assert lines[3] == (
        "- At R=2, the patches that the last pruning module keeps are 50% garment edges and 50% garment insides with "
        "calibrated Cropr, 100% and 0% with variance (background: 0% and 0%)."
    )
    assert lines[4] == "- Calibration on 2000 images took 1.5 to 1.5 min per seed."
    report = speed_dial_segmentation.markdown(fake_results())
    assert "| cropr, calibrated | 50.5 [50.0, 51.0] | 45.5 [45.0, 46.0] | 30.5 [30.0, 31.0] |" in report
    assert "| variance | +0.0 (0 below, 0 above) | -10.0 (2 below, 0 above) |" in report
    assert "30 / 50 / 20 % of the 10 patches" in report
    assert "| attention | 50 / 25 / 25 | 50 / 25 / 25 |" in report
    assert "(shares 0, 0.5, 1) by the share of the unpruned model's predictions on 256 training images that" in report
    assert "share kept: seed 0 1, seed 1 1. The same frozen model" in report


def test_a_run_stored_before_the_kept_patches_were_recorded_renders_without_them():
    heading = "## What the last pruning module keeps"
    results = fake_results()
    assert heading in speed_dial_segmentation.markdown(results)
    for run in results["seeds"].values():
        del run["last_module_kept"]
    assert not any("garment edges" in line for line in speed_dial_segmentation.findings(results))
    assert len(speed_dial_segmentation.findings(results)) == 4
    assert heading not in speed_dial_segmentation.markdown(results)


def test_patch_kinds_tell_background_edges_and_insides_apart():
    label_map = torch.zeros(1, 4, 6, dtype=torch.long)
    label_map[0, :, 2:4] = 3  # a garment on all of the middle patch's pixels
    label_map[0, 0, 4] = 5  # and on a quarter of the right one's
    label_map[0, 1, 0] = 255  # an ignored pixel is no garment
    kinds = patch_kinds(label_map, (1, 3), background=[0])
    assert kinds.tolist() == [[0, 2, 1]]
    assert kind_counts(kinds) == [1, 1, 1]
    # A share of exactly 3/4 is inside; the background class is whichever the caller names.
    label_map[0, :3, 0:2] = 7
    assert patch_kinds(label_map, (1, 3), background=[0]).tolist() == [[2, 2, 1]]
    assert patch_kinds(label_map, (1, 3), background=[0, 3]).tolist() == [[2, 0, 1]]


def test_scene_counts_give_the_mean_iou_of_the_training_metrics():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (6, 16, 16), generator=generator)  # class 3 never labelled, only predicted
    labels[0, :4] = 255
    metrics = SegmentationMetrics(4)
    metrics.update(logits.numpy(), labels.numpy())
    intersections, unions = scene_counts(logits, labels, 4)
    assert intersections.shape == unions.shape == (6, 4)
    assert float(mean_iou(intersections, unions)) == pytest.approx(metrics.compute()["mean_iou"])
    # A class absent from predictions and labels alike is left out of the mean, not counted as 0.
    assert float(mean_iou(np.array([[2, 0]]), np.array([[4, 0]]))) == 0.5


def test_patch_labels_take_each_patchs_nearest_pixel():
    label_map = torch.arange(16).reshape(1, 4, 4)
    assert patch_labels(label_map, (2, 2)).tolist() == [[0, 2, 8, 10]]


def test_bootstrap_difference_is_paired_on_the_scenes():
    unions = np.full((50, 2), 10)
    ours = np.arange(50)[:, None] % 7 + np.array([[2, 3]]), unions  # scenes of varying IoU
    assert bootstrap_difference(ours, ours, 200, seed=0) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    # One pixel better than the other model on every scene: whichever scenes a resample draws, both models are read
    # on those same scenes, so the difference is exactly 0.1 every time (unpaired resamples would spread it).
    theirs = ours[0] - 1, unions
    assert bootstrap_difference(ours, theirs, 200, seed=0) == pytest.approx({"mean": 0.1, "low": 0.1, "high": 0.1})
    # Better on half the scenes only: the interval widens around the mean and is reproducible from its seed.
    mixed = ours[0] - np.arange(50)[:, None] % 2, unions
    difference = bootstrap_difference(mixed, theirs, 500, seed=1)
    assert difference["mean"] == pytest.approx(0.05) and difference["low"] < 0.05 < difference["high"]
    assert difference == bootstrap_difference(mixed, theirs, 500, seed=1)


def test_run_stores_each_seed_continues_and_writes_its_section_after_the_speed_dials(tmp_path, tiny_backbone):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(f"# Results\n\n{SPEED_DIAL_START}\nspeed dial\n{SPEED_DIAL_END}\n\nthe rest\n")
    output = docs / "speed_dial_segmentation.json"
    argv = [
        "--backbone", str(tiny_backbone), "--image-size", "32", "--canvas-size", "56", "--num-train", "8",
        "--num-eval", "6", "--rates", "0", "1", "--seeds", "0", "--batch-size", "4", "--head-steps", "5",
        "--throughput-batch-size", "2", "--throughput-repeats", "1", "--bootstrap-resamples", "20", "--quiet",
        "--output", str(output), "--docs", str(docs),
    ]  # fmt: skip
    assert speed_dial_segmentation.main(argv) == 0
    assert speed_dial_segmentation.main([*argv[:-4], "--seeds", "0", "1", *argv[-4:]]) == 0
    results = json.loads(output.read_text())
    assert list(results["seeds"]) == ["0", "1"] and "throughput" not in results["seeds"]["1"]
    seed = results["seeds"]["0"]
    assert set(seed["mean_iou"]) == {"cropr", "random", "variance", "attention"}
    assert all(
        set(rows) == {"0", "1"} and all(0 <= v <= 1 for v in rows.values()) for rows in seed["mean_iou"].values()
    )
    assert len({rows["0"] for rows in seed["mean_iou"].values()}) == 1  # R=0 is one network, whatever the selector
    assert seed["calibration"]["contrast_weight"] in (0.0, 0.5, 1.0)
    assert set(seed["calibration"]["prediction_changes"]) == {"0.0", "0.5", "1.0"}
    difference = seed["cropr_minus"]["variance"]["1"]
    assert difference["mean"] == pytest.approx(seed["mean_iou"]["cropr"]["1"] - seed["mean_iou"]["variance"]["1"])
    assert difference["low"] <= difference["high"]
    # 6 eval scenes of 4x4 patches; at R=1 the last of the 3 modules (4 blocks) keeps 16 - 3 of each scene's.
    assert sum(seed["patch_kinds"]) == 6 * 16
    assert all(set(rows) == {"1"} and sum(rows["1"]) == 6 * 13 for rows in seed["last_module_kept"].values())
    page = (docs / "results.md").read_text()
    assert page.index(SPEED_DIAL_END) < page.index(MARKER_START) < page.index(MARKER_END) < page.index("the rest")
    report = (docs / "results_speed_dial_segmentation.md").read_text()
    assert "| cropr, calibrated |" in report and "median [min, max] over seeds 0, 1" in report
    assert (docs / "results_speed_dial_segmentation.png").stat().st_size > 0
    assert results["settings"]["aux_ignored_labels"] == [0]  # "background", as the training script skips it
    assert 'the per-patch auxiliary loss skipping "background"' in report
    # Another recipe starts a new run; the stored one moves to the appendix, seeds and all.
    assert speed_dial_segmentation.main([*argv, "--aux-ignored-labels", "none"]) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["aux_ignored_labels"] == [] and list(results["seeds"]) == ["0"]
    assert [list(run["seeds"]) for run in results["superseded"]] == [["0", "1"]]
    report = (docs / "results_speed_dial_segmentation.md").read_text()
    assert "## Appendix: superseded runs" in report and "differing in: aux_ignored_labels [0]." in report
    # --retime measures the images/s of the stored run again, and keeps its scores.
    before = json.loads(output.read_text())
    retimed = [*argv, "--aux-ignored-labels", "none", "--throughput-repeats", "2", "--retime"]
    assert speed_dial_segmentation.main(retimed) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["throughput_repeats"] == 2 and results["retimed"]["command"]
    assert results["seeds"]["0"]["mean_iou"] == before["seeds"]["0"]["mean_iou"]
    assert sorted(results["seeds"]["0"]["throughput"]) == sorted(before["seeds"]["0"]["throughput"])
    report = (docs / "results_speed_dial_segmentation.md").read_text()
    assert "median of 2 interleaved timings per (selector, rate), measured on " in report
