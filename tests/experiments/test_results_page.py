"""The layout of docs/results.md: summary first, then one section per experiment, superseded runs in an appendix at
the end, and every generator keeps the others' sections when it rewrites its own. Built from hand-made results
files: nothing trains."""

import json
from dataclasses import asdict

from test_reproduce_detection import results as detection_results
from test_speed_dial_experiment import fake_results as speed_dial_results
from test_speed_dial_segmentation import fake_results as segmentation_dial_results

from experiments import speed_dial_segmentation
from experiments.reproduce import Budget, ReproduceConfig, largest_budget_tasks, main, superseded_tasks
from experiments.reproduce_detection import BEGIN as DETECTION_BEGIN
from experiments.reproduce_detection import END as DETECTION_END
from experiments.reproduce_detection import splice_section
from experiments.results_page import (
    APPENDIX_HEADING,
    SUMMARY_BEGIN,
    SUMMARY_END,
    replace_section,
    reproduction_sentence,
)
from experiments.speed_dial import MARKER_END, MARKER_START, render

ENVIRONMENT = {
    "cpu_model": "cpu",
    "cpu_cores_available": 2,
    "torch_threads": 2,
    "python": "3.11",
    "torch": "2",
    "transformers": "5",
}


def task(metric: str, budget: Budget, medians: dict[str, float]) -> dict:
    selectors = {
        name: {
            "per_seed": [value - 0.01, value, value + 0.01],
            "median": value,
            "min": value - 0.01,
            "max": value + 0.01,
            "images_per_second": 60.0 if name == "none" else 96.0,
            "speedup": 1.0 if name == "none" else 1.6,
            "train_seconds_median": 10.0,
        }
        for name, value in medians.items()
    }
    return {
        "metric": metric,
        "image_size": 112,
        "num_patches": 64,
        "depth": 12,
        "frozen_blocks": 10,
        "token_counts": [65, 11, 65],
        "flop_ceiling": 1.66,
        "throughput_batch_size": 32,
        "budget": asdict(budget),
        "selectors": selectors,
        "object_share_of_kept_patches": {},
        "heatmaps": [],
    }


def run(command: str, tasks: dict, **config) -> dict:
    return {
        "command": f"python scripts/reproduce.py{command}",
        "started": "2026-01-01 00:00:00 UTC",
        "wall_seconds": 60.0,
        "environment": ENVIRONMENT,
        "config": {**asdict(ReproduceConfig(tasks=list(tasks))), **config},
        "model": "dinov2-small",
        "tasks": tasks,
    }


SMALL, LARGE = Budget(288, 96), Budget(1920, 384)
SEGMENTATION = {"none": 0.50, "cropr": 0.45, "random": 0.30, "variance": 0.40}
CLASSIFICATION = {"none": 0.60, "cropr": 0.55, "random": 0.30, "variance": 0.50, "attention": 0.40}


def reproduction() -> dict:
    """A main run and three further runs: a larger budget of both tasks (the first recipe, so its segmentation is
    superseded by the second further run, and its classification is not, since that setting is for segmentation
    only), the current recipe's larger segmentation, and the first recipe at the main budget (superseded by the main
    run)."""
    main_run = run(
        "",
        {
            "image-classification": task("accuracy", SMALL, CLASSIFICATION),
            "semantic-segmentation": task("mean_iou", SMALL, SEGMENTATION),
        },
    )
    old_large = run(
        " --tasks image-classification semantic-segmentation --num-train 1920 --num-eval 384",
        {
            "image-classification": task("accuracy", LARGE, {**CLASSIFICATION, "cropr": 0.58}),
            "semantic-segmentation": task("mean_iou", LARGE, {**SEGMENTATION, "cropr": 0.111}),
        },
        aux_ignore_background=False,
    )
    new_large = run(
        " --tasks semantic-segmentation --num-train 1920 --num-eval 384",
        {"semantic-segmentation": task("mean_iou", LARGE, {**SEGMENTATION, "cropr": 0.47})},
    )
    old_small = run(
        " --tasks semantic-segmentation --no-aux-ignore-background",
        {"semantic-segmentation": task("mean_iou", SMALL, {**SEGMENTATION, "cropr": 0.222})},
        aux_ignore_background=False,
    )
    return {**main_run, "further_runs": [old_large, new_large, old_small], "notes": "### Notes\n\nDiscussed."}


def write_results_files(docs) -> None:
    (docs / "results.json").write_text(json.dumps(reproduction()))
    (docs / "results_speed_dial.json").write_text(json.dumps(speed_dial_results()))
    (docs / "results_speed_dial_segmentation.json").write_text(json.dumps(segmentation_dial_results()))
    (docs / "results_detection.json").write_text(json.dumps(detection_results()))


def test_superseded_are_the_other_recipes_redone_at_the_same_budget():
    superseded = superseded_tasks(reproduction())
    assert set(superseded) == {(0, "semantic-segmentation"), (2, "semantic-segmentation")}
    assert "further run 2 repeats it at the same budget" in superseded[0, "semantic-segmentation"]
    assert "the main run repeats it" in superseded[2, "semantic-segmentation"]
    # A setting for segmentation only does not make a classification result of the main budget superseded.
    results = reproduction()
    classification = {"image-classification": task("accuracy", SMALL, CLASSIFICATION)}
    results["further_runs"].append(run(" --tasks image-classification", classification, aux_ignore_background=False))
    assert set(superseded_tasks(results)) == set(superseded)
    largest = largest_budget_tasks(reproduction())
    assert {name: entry["run"] for name, entry in largest.items()} == {
        "image-classification": "further run 1",
        "semantic-segmentation": "further run 2",
    }


def test_page_opens_with_the_summary_and_ends_with_the_appendix(tmp_path):
    write_results_files(tmp_path)
    assert main(["--render-only", "--output-dir", str(tmp_path)]) == 0
    page = (tmp_path / "results.md").read_text()
    order = [
        SUMMARY_BEGIN,
        "![Accuracy vs throughput per selector and rate, one frozen model](results_speed_dial.png)",
        "(results_largest_budget.png)",
        SUMMARY_END,
        MARKER_START,
        MARKER_END,
        speed_dial_segmentation.MARKER_START,
        speed_dial_segmentation.MARKER_END,
        "## Fine-tuned selectors",
        "## Discussion of the fine-tuned runs",
        DETECTION_BEGIN,
        DETECTION_END,
        APPENDIX_HEADING,
    ]
    positions = [page.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert page.startswith("# ") and page.index("\n## ") == page.index("## Summary") - 1
    assert page.count(APPENDIX_HEADING) == 1 and "\n## " not in page.split(APPENDIX_HEADING)[1]
    # The largest budgets in the headline table; the superseded results only after the appendix heading.
    assert "| image-classification, fine-tuned, 1920 scenes x 1 epoch(s) | top-1 accuracy | 60.0 | 58.0 |" in page
    assert "| semantic-segmentation, fine-tuned, 1920 scenes x 1 epoch(s) | mIoU | 50.0 | 47.0 |" in page
    # Both speed dials in the summary: one sentence on the frozen models, and their largest rate in the table.
    summary = page.split(SUMMARY_END)[0]
    assert "| speed dial, frozen segmenter, calibrated, R=2 | mIoU | 50.5 | 30.5 | variance 40.5 | 1.20x |" in summary
    assert (
        "(1.5-5.0 min on 2000 images) reach a median top-1 accuracy at or above variance's and attention's at every "
        "pruned rate (+5.0 to +20.0 points), and below random's at R=2 by at most 2.0 points (within the noise of the "
        "eval scenes); and on segmentation a median mean IoU at or above attention's at every pruned rate (+10.0 to "
        "+15.0 points), and below random's at R=2 by at most 3.0 points (beyond the noise of the eval scenes at R=2), "
        "and below variance's at R=2 by at most 10.0 points (beyond the noise of the eval scenes at R=2). Fine-tuned"
        in summary
    )
    body, appendix = page.split(APPENDIX_HEADING)
    for superseded_median in ("| cropr | 11.1 ", "| cropr | 22.2 "):
        assert superseded_median not in body and superseded_median in appendix
    assert "### Further run 1: " in body and "#### Further run 1, image-classification" in body
    assert "#### Further run 1, semantic-segmentation" in appendix and "### Further run 3: " in appendix
    assert (tmp_path / "results_largest_budget.png").stat().st_size > 0


def test_each_generator_keeps_the_page_it_did_not_write(tmp_path):
    write_results_files(tmp_path)
    main(["--render-only", "--output-dir", str(tmp_path)])
    page = (tmp_path / "results.md").read_text()
    render(speed_dial_results(), tmp_path)
    speed_dial_segmentation.render(segmentation_dial_results(), tmp_path)
    splice_section(tmp_path / "results.md", detection_results())
    assert (tmp_path / "results.md").read_text() == page
    # Without its files beside, the reproduction still writes the summary and the appendix, and the speed dial puts
    # its section (and the summary) back in their places.
    (tmp_path / "results_speed_dial.json").unlink()
    main(["--render-only", "--output-dir", str(tmp_path)])
    assert MARKER_START not in (tmp_path / "results.md").read_text()
    render(speed_dial_results(), tmp_path)
    assert (tmp_path / "results.md").read_text() == page
    write_results_files(tmp_path)
    (tmp_path / "results_speed_dial_segmentation.json").unlink()
    main(["--render-only", "--output-dir", str(tmp_path)])
    assert speed_dial_segmentation.MARKER_START not in (tmp_path / "results.md").read_text()
    speed_dial_segmentation.render(segmentation_dial_results(), tmp_path)
    assert (tmp_path / "results.md").read_text() == page


def test_sections_without_an_earlier_version_go_to_their_place():
    page = "# Title\n\nintro\n\n" + SUMMARY_BEGIN + "\nsummary\n" + SUMMARY_END + "\n\n## Body\n\n" + APPENDIX_HEADING
    with_detection = replace_section(page, "<d>", "</d>", "<d>\nnew\n</d>", before=APPENDIX_HEADING)
    assert with_detection.endswith("## Body\n\n<d>\nnew\n</d>\n\n" + APPENDIX_HEADING)
    with_dial = replace_section(page, "<s>", "</s>", "<s>\nnew\n</s>", after=SUMMARY_END)
    assert SUMMARY_END + "\n\n<s>\nnew\n</s>\n\n## Body" in with_dial
    assert replace_section("# Title\n\nbody\n", "<s>", "</s>", "<s>\n</s>").startswith("# Title\n\n<s>\n</s>\n\nbody")


def test_the_reproduction_sentence_names_the_tasks_where_cropr_is_not_best():
    largest = largest_budget_tasks(reproduction())
    assert "the best median of the pruned selectors on every task, with seed ranges apart" in reproduction_sentence(
        largest
    )
    largest["semantic-segmentation"]["selectors"]["variance"]["median"] = 0.48
    sentence = reproduction_sentence(largest)
    assert "on image-classification only;" in sentence
    assert "stays 2.0 (image-classification) and 3.0 (semantic-segmentation) points below" in sentence
