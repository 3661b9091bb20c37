"""One frozen segmentation model, many speeds: label-free calibrated Cropr routers against training-free selectors.

The segmentation counterpart of the frozen part of `experiments/speed_dial.py`: a frozen pretrained backbone
(DINOv2-S/14 by default) with a linear per-patch head (the Segmenter linear head) trained on its unpruned patch
features for the built-in segmentation task; its Cropr modules (one query per patch) are calibrated without labels on
the training images, with the unpruned model's per-patch predictions as targets; the same frozen model then runs at
every pruning rate with the calibrated routers and with the random, variance and attention selectors, Last Layer
Fusion restoring every token before the last block. Each (selector, rate) is evaluated per seed on the same eval
scenes (mean IoU), compared with calibrated Cropr by a bootstrap over the scenes, and timed (seed 0) interleaved with
all others on one eval batch. What the last module keeps is recorded too: how many of its patches show background, a
garment's edge or a garment's inside.

Each finished seed is stored in a JSON file and skipped on the next run, so an interrupted run continues where it
stopped; the markdown report and the plot are written from that file, and a section of `docs/results.md` names the
findings.

Research code (not installed), run through `python scripts/speed_dial_segmentation.py --help`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import set_seed

from cropr.calibration import CONTRAST_WEIGHTS, calibrate, unpruned
from cropr.conversion import background_label_ids
from cropr.data import id2label as builtin_id2label
from cropr.data import load_builtin_task
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTForSemanticSegmentation
from cropr.tools.argtypes import parse_shares
from cropr.training.metrics import IGNORE_INDEX
from cropr.training.tasks import resolve_aux_ignored_labels
from experiments.reproduce import DEFAULT_BACKBONE, portable_command, portable_path
from experiments.results_page import refresh_summary, replace_section
from experiments.speed_dial import (
    FROZEN_RECIPE,
    RETIME_HELP,
    SELECTORS,
    calibration_choice,
    draw_dial,
    frozen_model,
    frozen_pruned_rates,
    frozen_throughput,
    load,
    log,
    measure,
    preprocess,
    rate_table,
    retime,
    scorer_choice_sentence,
    selector_curves,
    selector_table,
    selector_variants,
    start_run,
    stored_run_to_retime,
    summary,
    superseded_section,
    throughput_table,
    timing_sentence,
)
from experiments.speed_dial import MARKER_END as SPEED_DIAL_END

TASK = "segmentation"
RECIPE = (*FROZEN_RECIPE, "bootstrap_resamples", "aux_ignored_labels")
"""Settings that define a run: a stored run with other values is superseded, not continued."""
METRIC = "mean_iou"
"""Each seed's entry of mean IoU per selector and rate."""
PATCH_KINDS = ("background", "edge", "inside")
"""What a patch of an eval scene shows ([`patch_kinds`])."""
INSIDE_SHARE = 0.75
"""A patch with at least this share of garment pixels is inside a garment; with fewer (but some), on its edge."""
MARKER_START = "<!-- speed-dial-segmentation:start -->"
MARKER_END = "<!-- speed-dial-segmentation:end -->"


# ----------------------------------------------------------------------------------------------------------------------
# Head, per-scene counts, mean IoU and its bootstrap
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(model: CroprViTForSemanticSegmentation, pixel_values: torch.Tensor, batch_size: int):
    """The unpruned backbone's patch tokens of every image (what the head reads), `(N, patches, D)`."""
    prefix = model.config.num_prefix_tokens
    with unpruned(model):
        return torch.cat(
            [
                model.base_model(pixel_values[start : start + batch_size]).last_hidden_state[:, prefix:]
                for start in range(0, len(pixel_values), batch_size)
            ]
        )


def patch_labels(label_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each patch's label, the label map's nearest pixel (as the model's auxiliary loss reads it), `(N, patches)`."""
    return F.interpolate(label_maps[:, None].float(), size=grid, mode="nearest").long().flatten(1)


def train_patch_head(
    model: CroprViTForSemanticSegmentation,
    features: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    steps: int,
    learning_rate: float,
) -> float:
    """Fit the per-patch head (LayerNorm + Linear) on frozen patch features, full batch; returns the last loss."""
    torch.manual_seed(seed)
    head = model.decode_head
    head.linear.reset_parameters()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    tokens, targets = features.flatten(0, 1), labels.flatten()
    for _ in range(steps):
        loss = F.cross_entropy(head(tokens), targets, ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def scene_counts(logits: torch.Tensor, label_maps: torch.Tensor, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per scene and class, the pixels in both the prediction and the label (intersection) and in either (union),
    `(N, C)` each, after upsampling the patch logits to the label size; ignored pixels count in neither."""
    predicted = F.interpolate(logits.float(), size=label_maps.shape[-2:], mode="bilinear", align_corners=False)
    predicted = predicted.argmax(dim=1)
    valid = label_maps != IGNORE_INDEX
    classes = torch.arange(num_labels)[:, None, None, None]
    is_predicted = (predicted[None] == classes) & valid[None]
    is_label = (label_maps[None] == classes) & valid[None]
    intersections = (is_predicted & is_label).sum(dim=(2, 3)).T
    unions = (is_predicted | is_label).sum(dim=(2, 3)).T
    return intersections.numpy(), unions.numpy()


def patch_kinds(label_maps: torch.Tensor, grid: tuple[int, int], background: Sequence[int]) -> torch.Tensor:
    """What each patch shows, `(N, patches)`: `PATCH_KINDS` index 0 for background only (no garment pixel), 1 for an
    edge (a garment on part of it, under `INSIDE_SHARE` of its pixels), 2 for a garment's inside (at least that)."""
    garment = ~torch.isin(label_maps, torch.tensor([*background, IGNORE_INDEX]))
    share = F.adaptive_avg_pool2d(garment[:, None].float(), grid).flatten(1)
    return torch.where(share == 0, 0, torch.where(share < INSIDE_SHARE, 1, 2))


def kind_counts(kinds: torch.Tensor) -> list[int]:
    """How many of `kinds` are of each of `PATCH_KINDS`."""
    return torch.bincount(kinds.flatten(), minlength=len(PATCH_KINDS)).tolist()


@torch.no_grad()
def evaluate_counts(model, pixel_values: torch.Tensor, label_maps: torch.Tensor, batch_size: int):
    """`scene_counts` of every eval scene, and the patches the last pruning module keeps, `(N, K)` indices in
    raster order (`None` unpruned)."""
    counts, last_kept = [], []
    prefix = model.config.num_prefix_tokens
    for start in range(0, len(pixel_values), batch_size):
        batch = slice(start, start + batch_size)
        output = model(pixel_values[batch], output_kept_indices=True)
        counts.append(scene_counts(output.logits, label_maps[batch], model.config.num_labels))
        if output.kept_indices:
            last_kept.append(output.kept_indices[-1][:, prefix:] - prefix)
    intersections, unions = np.concatenate([c[0] for c in counts]), np.concatenate([c[1] for c in counts])
    return (intersections, unions), (torch.cat(last_kept) if last_kept else None)


def mean_iou(intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
    """Mean IoU over the classes present (union > 0) of counts summed over the last-but-one axis: `(..., N, C)`
    per-scene counts give one value per leading index."""
    total_intersection, total_union = intersections.sum(axis=-2), unions.sum(axis=-2)
    present = total_union > 0
    ious = np.where(present, total_intersection / np.maximum(total_union, 1), 0.0)
    return ious.sum(axis=-1) / present.sum(axis=-1)


def bootstrap_difference(
    ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray], resamples: int, seed: int
) -> dict[str, float]:
    """Mean IoU of `ours` minus `theirs` on the scenes, and its 95% interval: the 2.5th and 97.5th percentiles of
    the difference over `resamples` resamplings of the scenes with replacement, the same scenes for both (paired)."""
    num_scenes = len(ours[0])
    weights = np.random.default_rng(seed).multinomial(num_scenes, np.full(num_scenes, 1 / num_scenes), resamples)

    def resampled(counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        intersections, unions = counts
        # Scene weights times per-scene counts: the counts of each resampled set, (resamples, 1, C).
        return mean_iou((weights @ intersections)[:, None], (weights @ unions)[:, None])

    differences = resampled(ours) - resampled(theirs)
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"mean": float(mean_iou(*ours) - mean_iou(*theirs)), "low": float(low), "high": float(high)}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def recorded_command() -> str:
    return portable_command(shlex.join(["python", "scripts/speed_dial_segmentation.py", *sys.argv[1:]]))


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = {key: value for key, value in vars(args).items() if key in RECIPE}
    settings["backbone"] = portable_path(args.backbone)
    settings["aux_ignored_labels"] = resolve_aux_ignored_labels(args.aux_ignored_labels, builtin_id2label(TASK))
    return settings


def evaluate_selectors(
    variants: dict[str, Any], pixel_values: torch.Tensor, label_maps: torch.Tensor, kinds: torch.Tensor, args, seed: int
):
    """Mean IoU of every (selector, rate); calibrated Cropr minus each training-free selector at each pruned rate
    (`bootstrap_difference`, resamples drawn from `seed`); and at each pruned rate `kind_counts` of the patches the
    last module keeps, whose `patch_kinds` are `kinds`."""
    scores: dict[str, dict[str, float]] = {selector: {} for selector in variants}
    kept_kinds: dict[str, dict[str, list[int]]] = {selector: {} for selector in variants}
    differences: dict[str, dict[str, dict[str, float]]] = {selector: {} for selector in SELECTORS[1:]}
    for rate in args.rates:
        counts = {}
        for selector, variant in variants.items():
            if rate == 0 and selector != "cropr":  # nothing pruned: the same network as the calibrated one
                scores[selector]["0"] = scores["cropr"]["0"]
                continue
            variant.set_pruning_rate(rate)
            counts[selector], last_kept = evaluate_counts(variant, pixel_values, label_maps, args.batch_size)
            scores[selector][str(rate)] = float(mean_iou(*counts[selector]))
            if last_kept is not None:
                kept_kinds[selector][str(rate)] = kind_counts(kinds.gather(1, last_kept))
        if rate == 0:
            continue
        for selector in SELECTORS[1:]:
            differences[selector][str(rate)] = bootstrap_difference(
                counts["cropr"], counts[selector], args.bootstrap_resamples, seed
            )
        log(f"seed {seed} R={rate}: " + ", ".join(f"{s} {row[str(rate)]:.3f}" for s, row in scores.items()))
    return scores, differences, kept_kinds


def frozen_segmenter(args: argparse.Namespace) -> tuple[CroprViTForSemanticSegmentation, Any]:
    """The run's segmenter ([`frozen_model`]), its per-patch auxiliary loss skipping `--aux-ignored-labels`."""
    aux_ignored_labels = settings_of(args)["aux_ignored_labels"]
    return frozen_model(args, "semantic-segmentation", TASK, aux_ignored_labels=aux_ignored_labels)


def run_retime(args: argparse.Namespace) -> dict[str, Any]:
    """Time every (selector, rate) of the stored run again ([`retime`]) and rewrite the docs."""
    results = stored_run_to_retime(Path(args.output), settings_of(args), RECIPE)
    retime(results, *frozen_segmenter(args), TASK, args, recorded_command())
    save(results, args)
    return results


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Store the results and write the docs from them."""
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    render(results, Path(args.docs))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Per seed: a head on the unpruned patch features, calibration, then every (selector, rate)."""
    results = load(Path(args.output))
    start_run(results, settings_of(args), RECIPE, recorded_command())
    todo = [seed for seed in args.seeds if str(seed) not in results["seeds"]]
    if not todo:
        log("every seed is stored already")
        return results
    dataset = load_builtin_task(
        TASK, num_train=args.num_train, num_eval=args.num_eval, image_size=args.canvas_size, seed=args.data_seed
    )
    prepared = None
    for seed in todo:
        started = time.time()
        set_seed(seed)
        model, processor = frozen_segmenter(args)
        if prepared is None:
            log(f"preprocessing {len(dataset['train'])} training and {len(dataset['validation'])} eval scenes")
            train_pixels = preprocess(processor, dataset["train"]["image"])
            train_maps = torch.from_numpy(np.stack([np.asarray(image) for image in dataset["train"]["label"]])).long()
            eval_pixels = preprocess(processor, dataset["validation"]["image"])
            eval_maps = torch.from_numpy(np.stack([np.asarray(image) for image in dataset["validation"]["label"]]))
            log("patch features of the training scenes (frozen, unpruned)")
            with torch.no_grad():
                grid = tuple(model(train_pixels[:1]).logits.shape[-2:])
            prepared = patch_features(model, train_pixels, args.batch_size), patch_labels(train_maps, grid)
            eval_kinds = patch_kinds(eval_maps, grid, background_label_ids(builtin_id2label(TASK)))
        head_loss = train_patch_head(model, *prepared, seed, args.head_steps, args.head_lr)
        log(f"seed {seed}: head trained (loss {head_loss:.3f}); calibrating the Cropr modules without labels")
        calibration = calibrate(
            model,
            dataset["train"],
            image_processor=processor,
            epochs=args.calibration_epochs,
            batch_size=args.batch_size,
            learning_rate=args.calibration_lr,
            seed=seed,
            progress=not args.quiet,
            contrast_weights=args.contrast_weights,
        )
        calibrated = calibration.model.eval()
        variants = selector_variants(calibrated, seed)
        scores, differences, kept_kinds = evaluate_selectors(variants, eval_pixels, eval_maps, eval_kinds, args, seed)
        seed_result = {
            "head_loss": head_loss,
            "calibration": {
                "seconds": calibration.seconds,
                "steps": calibration.steps,
                "images": calibration.num_images,
                "first_loss": calibration.first_loss,
                "last_loss": calibration.last_loss,
                **calibration_choice(calibration),
            },
            "mean_iou": scores,
            "cropr_minus": differences,
            "patch_kinds": kind_counts(eval_kinds),
            "last_module_kept": kept_kinds,
        }
        if not any("throughput" in stored for stored in results["seeds"].values()):
            seed_result["throughput"] = measure(variants, eval_pixels[: args.throughput_batch_size], args)
        results["seeds"][str(seed)] = seed_result
        results["wall_seconds"] += time.time() - started
        save(results, args)
        log(f"seed {seed} done; results in {args.output}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def seeds_beyond_zero(results: dict[str, Any], baseline: str, rate: str) -> tuple[int, int]:
    """How many seeds' bootstrap intervals of calibrated Cropr minus `baseline` at `rate` lie wholly below zero, and
    how many wholly above."""
    intervals = [run["cropr_minus"][baseline][rate] for run in results["seeds"].values()]
    return sum(i["high"] < 0 for i in intervals), sum(i["low"] > 0 for i in intervals)


def difference_cell(results: dict[str, Any], baseline: str, rate: str) -> str:
    """Median difference over seeds, and in how many seeds its interval lies below and above zero."""
    median = float(np.median([run["cropr_minus"][baseline][rate]["mean"] for run in results["seeds"].values()]))
    below, above = seeds_beyond_zero(results, baseline, rate)
    return f"{100 * median:+.1f} ({below} below, {above} above)"


def beyond_noise(results: dict[str, Any], baseline: str, rates: Sequence[str]) -> tuple[list[str], list[str]]:
    """The rates at which calibrated Cropr's bootstrap interval against `baseline` lies wholly below zero in most
    seeds, and those at which it lies wholly above."""
    majority = len(results["seeds"]) / 2
    counts = {rate: seeds_beyond_zero(results, baseline, rate) for rate in rates}
    return [r for r, (low, _) in counts.items() if low > majority], [
        r for r, (_, high) in counts.items() if high > majority
    ]


def records_kept_patches(results: dict[str, Any]) -> bool:
    """Whether every seed of a run recorded what the last module keeps (a run stored before the record has not)."""
    return all("last_module_kept" in run for run in results["seeds"].values())


def kept_shares(results: dict[str, Any], selector: str, rate: str) -> list[float]:
    """The share of each of `PATCH_KINDS` among the patches the last module keeps at `rate`, in percent, pooled
    over seeds (every seed runs on the same eval scenes)."""
    counts = np.sum([run["last_module_kept"][selector][rate] for run in results["seeds"].values()], axis=0)
    return (100 * counts / counts.sum()).tolist()


def shares_text(shares: Sequence[float]) -> str:
    return " / ".join(f"{share:.0f}" for share in shares)


def kept_kinds_section(results: dict[str, Any]) -> list[str]:
    """The report's section on what the last module keeps, when the run recorded it."""
    if not records_kept_patches(results):
        return []
    totals = np.asarray(next(iter(results["seeds"].values()))["patch_kinds"])
    pruned = frozen_pruned_rates(results, METRIC)
    rows = {selector: [shares_text(kept_shares(results, selector, rate)) for rate in pruned] for selector in SELECTORS}
    return [
        "## What the last pruning module keeps",
        "",
        f"Each patch of the eval scenes shows background only (no garment pixel), a garment's edge (garment pixels on "
        f"under {INSIDE_SHARE:.0%} of it) or a garment's inside (at least that): "
        f"{shares_text(100 * totals / totals.sum())} % of the {totals.sum()} patches. Cells: the share of the patches "
        "that the last pruning module keeps that are background / edge / inside (%), pooled over seeds.",
        "",
        *rate_table("selector", pruned, rows),
        "",
    ]


def kept_kinds_finding(results: dict[str, Any], rate: str) -> list[str]:
    """One line comparing what calibrated Cropr's and variance's last pruning modules keep at `rate`."""
    if not records_kept_patches(results):
        return []
    cropr, variance = kept_shares(results, "cropr", rate), kept_shares(results, "variance", rate)
    return [
        f"- At R={rate}, the patches that the last pruning module keeps are {cropr[1]:.0f}% garment edges and "
        f"{cropr[2]:.0f}% garment insides with calibrated Cropr, {variance[1]:.0f}% and {variance[2]:.0f}% with "
        f"variance (background: {cropr[0]:.0f}% and {variance[0]:.0f}%)."
    ]


def findings(results: dict[str, Any]) -> list[str]:
    """One line per training-free selector (the median gap per rate, and where it is beyond the scenes' noise in
    most seeds), then what the last module keeps at the largest rate, then the calibration time."""
    table = summary(results, METRIC)
    rates = [rate for rate in table["cropr"] if rate != "0"]
    lines = []
    for baseline in SELECTORS[1:]:
        deltas = [100 * (table["cropr"][r]["median"] - table[baseline][r]["median"]) for r in rates]
        below, above = beyond_noise(results, baseline, rates)
        verdicts = [f"below it at R={', '.join(below)}"] if below else []
        verdicts += [f"above it at R={', '.join(above)}"] if above else []
        verdict = (
            " and ".join(verdicts) + " beyond the noise of the eval scenes (the bootstrap interval in most seeds)"
            if verdicts
            else "within the noise of the eval scenes at every rate"
        )
        lines.append(
            f"- Calibrated Cropr minus {baseline}, median mean IoU per pruned rate: "
            + ", ".join(f"R={r} {d:+.1f}" for r, d in zip(rates, deltas, strict=True))
            + f" points; {verdict}."
        )
    lines += kept_kinds_finding(results, rates[-1])
    seconds = [seed["calibration"]["seconds"] for seed in results["seeds"].values()]
    lines.append(
        f"- Calibration on {results['settings']['num_train']} images took {min(seconds) / 60:.1f} to "
        f"{max(seconds) / 60:.1f} min per seed."
    )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    draw_dial(
        selector_curves(summary(results, METRIC), frozen_throughput(results)),
        path,
        speed_label=f"eval images/s (batch {results['settings']['throughput_batch_size']}, shared CPU)",
        metric_label="mean IoU (%)",
        title="Segmentation, DINOv2-S/14 at every pruning rate (median, bars: min-max over seeds)",
    )


def ignored_classes(settings: dict[str, Any]) -> str:
    names = builtin_id2label(TASK)
    ignored = settings["aux_ignored_labels"]
    return ", ".join(f'"{names[label]}"' for label in ignored) if ignored else "no class"


def markdown(results: dict[str, Any]) -> str:
    settings, env = results["settings"], results["environment"]
    pruned = frozen_pruned_rates(results, METRIC)
    lines = [
        "# One segmentation model, many speeds: calibrated Cropr vs training-free selectors",
        "",
        "Generated by `scripts/speed_dial_segmentation.py` from `results_speed_dial_segmentation.json`; every number "
        "below comes from that file.",
        "",
        "![Mean IoU vs throughput per selector and rate](results_speed_dial_segmentation.png)",
        "",
        f"A frozen DINOv2-S/14 at {settings['image_size']} px with a linear per-patch head trained on its unpruned "
        f"patch features ({settings['num_train']} built-in segmentation scenes, {settings['head_steps']} full-batch "
        f"steps), then its Cropr modules (one query per patch) calibrated without labels on the same images, with the "
        f"unpruned model's per-patch predictions as targets, the per-patch auxiliary loss skipping "
        f"{ignored_classes(settings)} ({settings['calibration_epochs']} epoch(s), batch "
        f"{settings['batch_size']}, learning rate {settings['calibration_lr']}). {scorer_choice_sentence(results)}"
        "The same frozen model then runs at "
        "every rate R (tokens removed after each of the 10 modules, Last Layer Fusion restoring them before the last "
        "block) with the calibrated routers and with each training-free selector. Mean IoU on the same "
        f"{settings['num_eval']} eval scenes for every model; median [min, max] over seeds "
        f"{', '.join(results['seeds'])}.",
        "",
        "## Mean IoU (%)",
        "",
        *selector_table(results, METRIC),
        "",
        "## Calibrated Cropr minus each selector, paired on the same scenes",
        "",
        "Per seed, the mean IoU difference on the eval scenes and its 95% interval from "
        f"{settings['bootstrap_resamples']} bootstrap resamplings of the scenes (the same scenes for both models). "
        "Cells: the median difference over seeds in points, and in how many seeds the interval lies wholly below and "
        "wholly above zero.",
        "",
        *rate_table(
            "calibrated cropr minus",
            pruned,
            {baseline: [difference_cell(results, baseline, rate) for rate in pruned] for baseline in SELECTORS[1:]},
        ),
        "",
        *kept_kinds_section(results),
        "## Images/s at each rate",
        "",
        *throughput_table(results),
        "",
        f"{timing_sentence(results)} The run's CPU: {env['cpu_model']} ({env['cpu_cores_available']} cores, torch "
        f"threads {env['torch_threads']}), shared with other jobs (load average {env['load_average'][0]:.1f} at the "
        "start).",
        "",
        "## Findings",
        "",
        *findings(results),
        "",
        "## Command",
        "",
        f"`{results['command']}` ({results['wall_seconds'] / 60:.0f} min in all, started {results['started']}).",
        "",
        *superseded_section(results, RECIPE, METRIC),
    ]
    return "\n".join(lines)


def main_page_section(results: dict[str, Any]) -> str:
    return "\n".join(
        [
            MARKER_START,
            "## One segmentation model, many speeds (frozen DINOv2-S/14, calibrated without labels)",
            "",
            "![Mean IoU vs throughput per selector and rate](results_speed_dial_segmentation.png)",
            "",
            *findings(results),
            "",
            "Details, tables and the command: "
            "[results_speed_dial_segmentation.md](results_speed_dial_segmentation.md).",
            MARKER_END,
        ]
    )


def render(results: dict[str, Any], docs: Path) -> None:
    """Write the report, the plot, this experiment's section of `docs/results.md` (after the speed dial's) and the
    page's summary (which also reads the other experiments' results files there, when present)."""
    plot(results, docs / "results_speed_dial_segmentation.png")
    (docs / "results_speed_dial_segmentation.md").write_text(markdown(results))
    main_page = docs / "results.md"
    text = main_page.read_text() if main_page.is_file() else ""
    main_page.write_text(
        replace_section(text, MARKER_START, MARKER_END, main_page_section(results), after=SPEED_DIAL_END)
    )
    refresh_summary(main_page, segmentation_dial=results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE), help="the frozen backbone (a local folder)")
    parser.add_argument("--image-size", type=int, default=112, help="model input size in pixels")
    parser.add_argument("--canvas-size", type=int, default=112, help="size of the built-in scenes in pixels")
    parser.add_argument("--num-train", type=int, default=2000, help="scenes for the head and the calibration")
    parser.add_argument("--num-eval", type=int, default=1000, help="eval scenes, the same for every model")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the built-in scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the head and calibration")
    parser.add_argument("--rates", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="pruning rates R")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration and eval batch size")
    parser.add_argument("--head-steps", type=int, default=300, help="full-batch steps of the head")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the head")
    parser.add_argument("--calibration-epochs", type=float, default=1.0, help="passes over the training scenes")
    parser.add_argument("--calibration-lr", type=float, default=5e-3, help="learning rate of the calibration")
    parser.add_argument(
        "--contrast-weights",
        type=parse_shares,
        default=list(CONTRAST_WEIGHTS),
        help="comma-separated shares of the contrast read-out that calibration compares (default: 0,0.5,1)",
    )
    parser.add_argument("--throughput-batch-size", type=int, default=16, help="batch of the timed forward passes")
    parser.add_argument("--throughput-repeats", type=int, default=21, help="timings per (selector, rate)")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000, help="resamplings of the eval scenes")
    parser.add_argument(
        "--aux-ignored-labels",
        default="background",
        help="classes (names or ids, comma-separated, or none) the Cropr modules' per-patch loss skips, as the "
        "segmentation training script does by default",
    )
    parser.add_argument("--output", default="docs/results_speed_dial_segmentation.json", help="the results file")
    parser.add_argument("--docs", default="docs", help="where the report, the plot and results.md are written")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--render-only", action="store_true", help="write the docs from --output, run nothing")
    parser.add_argument("--retime", action="store_true", help=RETIME_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        render(json.loads(Path(args.output).read_text()), Path(args.docs))
        return 0
    if not Path(args.backbone).exists():
        sys.exit(f"speed_dial_segmentation.py: error: backbone {args.backbone} not found; pass --backbone")
    if not [rate for rate in args.rates if rate > 0]:
        sys.exit("speed_dial_segmentation.py: error: --rates needs at least one rate above 0")
    if args.retime:
        run_retime(args)
        return 0
    run(args)
    return 0
