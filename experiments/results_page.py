"""The layout of `docs/results.md`, shared by the four generators that write it.

The page reads top-down: a title, the summary (headline figures, two sentences of findings, a table of the headline
numbers), one section per experiment, then an appendix of superseded runs. `scripts/reproduce.py` writes the whole
page; `scripts/speed_dial.py`, `scripts/speed_dial_segmentation.py` and `scripts/reproduce_detection.py` each
rewrite only their section, between markers, and the summary is rewritten by whichever of them changes its numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUMMARY_BEGIN = "<!-- summary:start -->"
SUMMARY_END = "<!-- summary:end -->"
APPENDIX_HEADING = "## Appendix: superseded runs"
TRAINING_FREE = ("random", "variance", "attention")
"""Selectors that score tokens without any training (non-salient inverts Cropr's learned scores, so it is not one)."""


def replace_section(
    text: str, begin: str, end: str, section: str, before: str | None = None, after: str | None = None
) -> str:
    """`text` with the lines from `begin` to `end` replaced by `section` (which carries both markers). Without an
    earlier section, it goes before the first occurrence of `before`, or after the line holding `after`; when the page
    has neither, after the title line (`after` given or neither given) or at the end (`before` given)."""
    section = section.strip("\n")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    if not text:
        return section + "\n"
    if before is not None and before in text:
        head, rest = text.split(before, 1)
        return f"{head.rstrip()}\n\n{section}\n\n{before}{rest}"
    if before is not None and after is None:
        return f"{text.rstrip()}\n\n{section}\n"
    if after is not None and after in text:
        head, rest = text.split(after, 1)
        line_end, _, body = rest.partition("\n")
        return f"{head}{after}{line_end}\n\n{section}\n\n{body.lstrip()}"
    title, _, body = text.partition("\n")
    return f"{title}\n\n{section}\n\n{body.lstrip()}"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def dial_comparison(
    table: dict[str, dict[str, dict[str, float]]], below_noise: Callable[[str, list[str]], list[str]]
) -> str:
    """One clause: where calibrated Cropr's median stands against each training-free selector's over the pruned rates
    of a frozen run's `table`; `below_noise(baseline, rates)` names the rates at which its shortfall is beyond the
    noise of the eval scenes."""
    rates = [rate for rate in table["cropr"] if rate != "0"]
    above, spans, clauses = [], [], []
    for baseline in (name for name in TRAINING_FREE if name in table):
        deltas = {rate: table["cropr"][rate]["median"] - table[baseline][rate]["median"] for rate in rates}
        worse = [rate for rate, delta in deltas.items() if delta < 0]
        if not worse:
            above.append(f"{baseline}'s")
            spans += deltas.values()
            continue
        beyond = below_noise(baseline, worse)
        noise = (
            f"beyond the noise of the eval scenes at R={', '.join(beyond)}"
            if beyond
            else "within the noise of the eval scenes"
        )
        clauses.append(
            f"below {baseline}'s at R={', '.join(worse)} by at most {100 * -min(deltas.values()):.1f} points ({noise})"
        )
    if above:
        clauses.insert(
            0,
            f"at or above {_join(above)} at every pruned rate ({_points(min(spans))} to {_points(max(spans))} points)",
        )
    return ", and ".join(clauses)


def elastic_clause(speed_dial: dict[str, Any]) -> str | None:
    """The elastic checkpoint against the checkpoints trained at each rate, in a few words; `None` before both ran."""
    from experiments.speed_dial import elastic_gaps

    gaps = elastic_gaps(speed_dial) if speed_dial.get("fine_tuned", {}).get("runs") else {}
    if not gaps:
        return None
    medians = [gap["median"] for gap in gaps.values()]
    far = [rate for rate, gap in gaps.items() if gap["median"] < -0.01]
    if far:
        return (
            "on classification, one elastic checkpoint, trained once, is more than 1 point below the one trained at "
            f"R={', '.join(far)}"
        )
    return (
        "on classification, one elastic checkpoint, trained once, is within 1 point of the one trained at each rate "
        f"or above it ({_points(min(medians))} to {_points(max(medians))} points)"
    )


def frozen_sentence(speed_dial: dict[str, Any] | None, segmentation_dial: dict[str, Any] | None) -> str:
    """One sentence on the frozen models: calibrated Cropr against the training-free selectors on classification and
    segmentation, and the elastic checkpoint."""
    from experiments import speed_dial_segmentation
    from experiments.speed_dial import below_noise, paired_difference
    from experiments.speed_dial import summary as speed_dial_summary

    clauses, seconds, images = [], [], set()
    if speed_dial is not None:

        def classification_below_noise(baseline: str, rates: list[str]) -> list[str]:
            return below_noise({rate: paired_difference(speed_dial, baseline, rate) for rate in rates})

        table = speed_dial_summary(speed_dial)
        clauses.append(f"a median top-1 accuracy {dial_comparison(table, classification_below_noise)}")
    if segmentation_dial is not None:

        def segmentation_below_noise(baseline: str, rates: list[str]) -> list[str]:
            return speed_dial_segmentation.beyond_noise(segmentation_dial, baseline, rates)[0]

        table = speed_dial_summary(segmentation_dial, speed_dial_segmentation.METRIC)
        clauses.append(f"on segmentation a median mean IoU {dial_comparison(table, segmentation_below_noise)}")
    for run in (speed_dial, segmentation_dial):
        for seed in (run or {}).get("seeds", {}).values():
            seconds.append(seed["calibration"]["seconds"])
            images.add(seed["calibration"]["images"])
    sentence = (
        f"On one frozen DINOv2-S/14, Cropr modules calibrated without labels ({min(seconds) / 60:.1f}-"
        f"{max(seconds) / 60:.1f} min on {_join([str(n) for n in sorted(images)])} images) reach "
        + "; and ".join(clauses)
    )
    if speed_dial is not None and (elastic := elastic_clause(speed_dial)):
        sentence += f"; {elastic}"
    return sentence + "."


def reproduction_sentence(largest: dict[str, dict[str, Any]]) -> str:
    """One sentence: Cropr against the other pruned selectors and the unpruned model, per task at its largest
    budget."""
    best, apart, gaps, speedups = [], True, [], []
    for task_name, task in largest.items():
        rows = task["selectors"]
        others = {name: row for name, row in rows.items() if name not in ("none", "cropr")}
        runner_up = max(others.values(), key=lambda row: row["median"])
        if rows["cropr"]["median"] > runner_up["median"]:
            best.append(task_name)
            apart = apart and rows["cropr"]["min"] > runner_up["max"]
        gaps.append(f"{100 * (rows['none']['median'] - rows['cropr']['median']):.1f} ({task_name})")
        speedups.append(rows["cropr"]["speedup"])
    if len(best) == len(largest):
        lead = "the best median of the pruned selectors on every task"
        lead += ", with seed ranges apart from the runner-up's" if apart else ""
    elif best:
        lead = f"the best median of the pruned selectors on {_join(best)} only"
    else:
        lead = "the best median of the pruned selectors on no task"
    return (
        f"Fine-tuned end to end, each task at its largest budget, Cropr has {lead}; it stays {_join(gaps)} points "
        f"below the unpruned model at {min(speedups):.2f}x-{max(speedups):.2f}x its throughput."
    )


def dial_row(experiment: str, metric_label: str, run: dict[str, Any], metric: str) -> str:
    """The headline row of a frozen speed-dial run (its per-seed `metric`) at its largest rate."""
    from experiments.speed_dial import frozen_throughput, summary

    table = summary(run, metric)
    throughput = frozen_throughput(run)["cropr"]
    rate = list(table["cropr"])[-1]
    name = max((n for n in TRAINING_FREE if n in table), key=lambda n: table[n][rate]["median"])
    return (
        f"| {experiment}, R={rate} | {metric_label} | {100 * table['cropr']['0']['median']:.1f} | "
        f"{100 * table['cropr'][rate]['median']:.1f} | {name} {100 * table[name][rate]['median']:.1f} | "
        f"{throughput[rate] / throughput['0']:.2f}x |"
    )


def headline_rows(
    speed_dial: dict[str, Any] | None,
    largest: dict[str, dict[str, Any]],
    segmentation_dial: dict[str, Any] | None = None,
) -> list[str]:
    """Markdown table rows: unpruned, Cropr and the best training-free selector, for the speed dials at their largest
    rate and for each task at its largest budget."""
    from experiments.reproduce import METRIC_LABELS

    lines = [
        "| experiment | metric (%), median over seeds | unpruned | Cropr | best training-free | Cropr's speedup |",
        "|---|---|---|---|---|---|",
    ]
    if speed_dial is not None:
        lines.append(dial_row("speed dial, frozen backbone, calibrated", "top-1 accuracy", speed_dial, "accuracy"))
    if segmentation_dial is not None:
        lines.append(dial_row("speed dial, frozen segmenter, calibrated", "mIoU", segmentation_dial, "mean_iou"))
    for task_name, task in largest.items():
        rows = task["selectors"]
        free = [name for name in TRAINING_FREE if name in rows]
        name = max(free, key=lambda n: rows[n]["median"]) if free else None
        budget = task["budget"]
        lines.append(
            f"| {task_name}, fine-tuned, {budget['num_train']} scenes x {budget['epochs']:g} epoch(s) | "
            f"{METRIC_LABELS.get(task['metric'], task['metric'])} | {100 * rows['none']['median']:.1f} | "
            f"{100 * rows['cropr']['median']:.1f} | "
            + (f"{name} {100 * rows[name]['median']:.1f}" if name else "-")
            + f" | {rows['cropr']['speedup']:.2f}x |"
        )
    return lines


def summary_section(
    reproduction: dict[str, Any] | None,
    speed_dial: dict[str, Any] | None,
    segmentation_dial: dict[str, Any] | None = None,
) -> str:
    """The page's opening section, between `SUMMARY_BEGIN` and `SUMMARY_END`, from the experiments' JSON."""
    from experiments.reproduce import LARGEST_BUDGET_PLOT, largest_budget_tasks

    largest = largest_budget_tasks(reproduction) if reproduction is not None else {}
    lines = [SUMMARY_BEGIN, "## Summary", ""]
    if speed_dial is not None:
        models = "one frozen model"
        if speed_dial.get("fine_tuned", {}).get("runs"):
            models += ", and Cropr fine-tuned at each rate"
        lines += [f"![Accuracy vs throughput per selector and rate, {models}](results_speed_dial.png)", ""]
    if largest:
        lines += [f"![Metric vs throughput per selector, each task at its largest budget]({LARGEST_BUDGET_PLOT})", ""]
    sentences = []
    if speed_dial is not None or segmentation_dial is not None:
        sentences.append(frozen_sentence(speed_dial, segmentation_dial))
    if largest:
        sentences.append(reproduction_sentence(largest))
    lines += [" ".join(sentences), "", *headline_rows(speed_dial, largest, segmentation_dial), ""]
    lines += [
        "Speedups are measured images/s against the unpruned model on a shared CPU; the sections below give the "
        "seed ranges, the commands and every run. Superseded runs are in the appendix at the end.",
        SUMMARY_END,
    ]
    return "\n".join(lines)


RESULTS_FILES = {
    "reproduction": "results.json",
    "speed_dial": "results_speed_dial.json",
    "segmentation_dial": "results_speed_dial_segmentation.json",
}
"""The results file of each experiment the summary reads, beside the page."""


def refresh_summary(page: Path, **results: dict[str, Any]) -> None:
    """Rewrite the summary section of `page` (put it after the title when the page has none) from the experiments'
    results: those given by keyword (`RESULTS_FILES`' keys), the others from their files beside the page."""
    unknown = set(results) - set(RESULTS_FILES)
    if unknown:
        raise TypeError(f"refresh_summary: unknown experiments {sorted(unknown)}; known: {list(RESULTS_FILES)}")
    for key, name in RESULTS_FILES.items():
        if key not in results:
            path = page.parent / name
            results[key] = json.loads(path.read_text()) if path.is_file() else None
    text = page.read_text() if page.is_file() else ""
    page.write_text(replace_section(text, SUMMARY_BEGIN, SUMMARY_END, summary_section(**results)))


__all__ = ["APPENDIX_HEADING", "SUMMARY_BEGIN", "SUMMARY_END", "refresh_summary", "replace_section", "summary_section"]
