"""`scripts/reproduce.py --quick` end to end on the tiny preset: the structure of the JSON, report and figures."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, build_tiny
from PIL import Image
from test_reproduce_detection import results as detection_results

from experiments.reproduce import (
    SELECTORS,
    attach_run,
    command_settings,
    main,
    object_patches,
    object_share_of_kept_patches,
    portable_path,
    recipe_differences,
    resolve_backbone,
)
from experiments.reproduce_detection import END as DETECTION_END
from experiments.results_page import APPENDIX_HEADING

QUICK = ["--quick", "--from-scratch", "--preset", "tiny", "--canvas-size", "56"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "reproduce.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The output folder of one `--quick` run of every task."""
    output_dir = tmp_path_factory.mktemp("quick")
    result = run_script(*QUICK, "--output-dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_quick_run_writes_results_report_and_figures(quick_run, tmp_path):
    for path in quick_run.iterdir():
        shutil.copy(path, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"].startswith("python scripts/reproduce.py --quick")
    assert {"cpu_model", "torch", "transformers", "torch_threads"} <= set(results["environment"])
    assert list(results["tasks"]) == list(SELECTORS)
    for task_name, task in results["tasks"].items():
        assert list(task["selectors"]) == list(SELECTORS[task_name])
        assert task["selectors"]["none"]["speedup"] == pytest.approx(1.0)
        for row in task["selectors"].values():
            assert len(row["per_seed"]) == 1
            assert row["min"] <= row["median"] <= row["max"]
            assert 0.0 <= row["median"] <= 1.0 and row["images_per_second"] > 0
        assert sum(task["pruning_schedule"]) == round(0.85 * task["num_patches"])
        for name in task["heatmaps"]:
            with Image.open(tmp_path / name) as image:
                assert image.format == "PNG" and min(image.size) > 100

    shares = results["tasks"]["semantic-segmentation"]["object_share_of_kept_patches"]
    assert set(shares) == {"all patches", "cropr", "random", "variance"}
    assert all(0.0 <= share <= 1.0 for share in shares.values())

    report = (tmp_path / "results.md").read_text()
    assert "python scripts/reproduce.py --quick" in report
    assert "Object patches among the patch tokens the last pruning module keeps" in report
    assert "![metric vs throughput](results_tradeoff.png)" in report
    for task_name in SELECTORS:
        assert f"### {task_name}" in report
    assert report.count("| speedup vs none | training s/run |") == len(SELECTORS)
    with Image.open(tmp_path / "results_tradeoff.png") as plot:
        assert plot.format == "PNG"

    notes = tmp_path / "notes.md"
    notes.write_text("What was tried.")
    assert "Segmentation's Cropr auxiliary loss ignores the background class" in report
    other = tmp_path / "other.json"
    older_run = json.loads((tmp_path / "results.json").read_text())
    del older_run["config"]["aux_ignore_background"]  # a run from before the option: background was trained
    other.write_text(json.dumps(older_run))
    # The object detection section, from its own JSON beside, survives the rewrite.
    (tmp_path / "results_detection.json").write_text(json.dumps(detection_results()))
    argv = ["--render-only", "--output-dir", str(tmp_path), "--notes", str(notes), "--attach", str(other)]
    assert main(argv) == 0
    report = (tmp_path / "results.md").read_text()
    assert report.count("## Object detection: Conditional DETR") == 1
    assert "## Discussion of the fine-tuned runs\n\nWhat was tried." in report
    assert f"### Further run 1: `{results['command']}`" in report
    # The attached run repeats the main budget with the first segmentation recipe: its segmentation is superseded.
    body, appendix = report.split(APPENDIX_HEADING)
    assert body.rstrip().endswith(DETECTION_END) and "#### Further run 1, semantic-segmentation" in appendix
    assert "except for the options of this command, and `aux_ignore_background` = False (main run: True)" in report
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["notes"] == "What was tried."
    assert [run["command"] for run in stored["further_runs"]] == [results["command"]]
    assert "](results_tradeoff_further1.png)" in report and (tmp_path / "results_tradeoff_further1.png").is_file()


def test_a_second_quick_run_gives_identical_metrics(quick_run, tmp_path):
    # One task again, alone and in this process: its metrics depend on its own seeds only, not on what ran before.
    task = "semantic-segmentation"
    assert main([*QUICK, "--tasks", task, "--output-dir", str(tmp_path)]) == 0
    first = json.loads((quick_run / "results.json").read_text())["tasks"][task]
    second = json.loads((tmp_path / "results.json").read_text())["tasks"][task]
    assert {name: row["per_seed"] for name, row in second["selectors"].items()} == {
        name: row["per_seed"] for name, row in first["selectors"].items()
    }
    assert second["object_share_of_kept_patches"] == first["object_share_of_kept_patches"]


def test_recipe_differences_name_only_what_the_further_command_does_not_set():
    main_run = {"command": "python scripts/reproduce.py", "config": {"seeds": [0], "aux_ignore_background": True}}
    older_run = {
        "command": "python scripts/reproduce.py --router-lr-scale=1 --from-scratch",
        "config": {"router_lr_scale": 1.0, "backbone": None},
    }
    assert command_settings(older_run["command"]) == {"router_lr_scale", "backbone"}
    # a default that changed since the older run is reported; what its own command set is not
    assert recipe_differences(main_run, older_run) == ", and `aux_ignore_background` = False (main run: True)"
    flagged_run = {
        "command": "python scripts/reproduce.py --seeds 0 1 --no-aux-ignore-background",
        "config": {"seeds": [0, 1], "aux_ignore_background": False},
    }
    assert recipe_differences(main_run, flagged_run) == ""


def test_a_missing_backbone_folder_falls_back_to_the_preset_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="from-scratch preset"):
        assert resolve_backbone(str(tmp_path / "absent")) is None
    assert resolve_backbone(str(tmp_path)) == str(tmp_path)


def test_render_only_refuses_a_file_that_is_not_a_results_json(tmp_path):
    (tmp_path / "results.json").write_text('{"command": "x"}')
    with pytest.raises(ValueError, match=r"results.json of scripts/reproduce.py: it lacks \['started'"):
        main(["--render-only", "--output-dir", str(tmp_path)])
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the results file .*results.json"):
        main(["--render-only", "--output-dir", str(tmp_path)])


def test_object_patches_are_those_mostly_covered_by_objects():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 3  # all object
    labels[0, :2, 2:] = torch.tensor([[0, 5], [255, 255]])  # half of the labelled pixels: not more than half
    labels[0, 2:, :2] = torch.tensor([[1, 1], [1, 0]])  # three quarters
    assert object_patches(labels, (2, 2), background=0, ignore_index=255).tolist() == [[True, False, True, False]]


def test_object_share_counts_what_the_last_module_keeps():
    torch.manual_seed(0)
    model = build_tiny("segmentation", token_selector="variance")
    # Patch p (raster order on the 4x4 grid) gets noise of amplitude 16 - p: the variance selector keeps the first.
    amplitude = (16 - torch.arange(16.0)).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * amplitude
    kept = model.eval()(pixel_values, output_kept_indices=True).kept_indices[-1].shape[1] - 1
    assert 2 < kept < 14
    first, last = torch.zeros(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.bool)
    first[:, :2] = True
    last[:, 14:] = True
    assert object_share_of_kept_patches(model, pixel_values, first) == pytest.approx(2 / kept)
    assert object_share_of_kept_patches(model, pixel_values, last) == 0.0


def test_portable_paths_are_relative_to_the_repository_or_just_a_name(tmp_path):
    assert portable_path(REPO_ROOT / "docs" / "results.json") == "docs/results.json"
    assert portable_path(tmp_path / "long") == "long"
    assert portable_path(str(REPO_ROOT.parent / "shared" / "data" / "dinov2-small")) == "dinov2-small"
    assert portable_path("../elsewhere/vit") == "vit"
    assert portable_path("facebook/dinov2-small") == "facebook/dinov2-small"  # a Hub id stays as it is


def test_attached_runs_record_no_machine_path(tmp_path):
    results = {"command": "python scripts/reproduce.py", "model": "dinov2-small", "config": {}, "tasks": {}}
    other = {
        "command": f"python scripts/reproduce.py --output-dir {tmp_path / 'long'} --backbone ../elsewhere/vit",
        "started": "now",
        "wall_seconds": 1.0,
        "environment": {},
        "config": {"backbone": str(tmp_path / "vit")},
        "model": str(tmp_path / "vit"),
        "tasks": {},
    }
    attach_run(results, other)
    run = results["further_runs"][0]
    assert run["command"] == "python scripts/reproduce.py --output-dir long --backbone vit"
    assert run["model"] == run["config"]["backbone"] == "vit"
