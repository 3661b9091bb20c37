"""One frozen model, many speeds: label-free calibrated Cropr routers against training-free selectors.

On a frozen pretrained backbone (DINOv2-S/14 by default) with a linear head trained on its unpruned features (the
built-in cluttered classification task), the Cropr modules are calibrated without labels (`cropr.calibration`) on
the training images, once; the same frozen model then runs at every pruning rate of the dial (`set_pruning_rate`)
with the calibrated routers, and with the random, variance and attention selectors. Each (selector, rate) is
evaluated per seed, and timed (seed 0) interleaved with all others on one eval batch. The results go to a JSON file,
from which the markdown report and the metric-vs-throughput plot are written; a summary section replaces the one
between markers at the top of `docs/results.md`.

Research code (not installed), run through `python scripts/speed_dial.py --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from cropr.calibration import calibrate, unpruned
from cropr.conversion import from_backbone
from cropr.data import id2label as builtin_id2label
from cropr.data import load_builtin_task
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel
from cropr.tools.timing import interleaved_timings, machine_environment
from experiments.reproduce import DEFAULT_BACKBONE, portable_command, portable_path

TASK = "cluttered-classification"
SELECTORS = ("cropr", "random", "variance", "attention")
MARKER_START = "<!-- speed-dial:start -->"
MARKER_END = "<!-- speed-dial:end -->"


def log(message: str) -> None:
    print(f"[speed-dial {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def preprocess(processor, images: Sequence, batch_size: int = 128) -> torch.Tensor:
    return torch.cat(
        [
            processor(list(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
            for start in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def pooled_features(model: CroprViTPreTrainedModel, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The unpruned backbone's pooled output of every image (what the head reads)."""
    with unpruned(model):
        return torch.cat(
            [
                model.base_model(pixel_values[start : start + batch_size]).pooler_output
                for start in range(0, len(pixel_values), batch_size)
            ]
        )


def train_head(model, features: torch.Tensor, labels: torch.Tensor, seed: int, steps: int, learning_rate: float):
    """Fit the classification head (LayerNorm + Linear) on frozen pooled features, full batch."""
    torch.manual_seed(seed)
    head = model.classifier
    head.linear.reset_parameters()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss)


@torch.no_grad()
def accuracy(model, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(pixel_values), batch_size):
        logits = model(pixel_values[start : start + batch_size]).logits
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(pixel_values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    environment = machine_environment()
    labels_map = builtin_id2label(TASK)
    dataset = load_builtin_task(
        TASK, num_train=args.num_train, num_eval=args.num_eval, image_size=args.canvas_size, seed=args.data_seed
    )
    results: dict[str, Any] = {
        "command": portable_command(shlex.join(["python", "scripts/speed_dial.py", *sys.argv[1:]])),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "environment": environment,
        "settings": {
            key: portable_path(value) if key == "backbone" else value
            for key, value in vars(args).items()
            if key not in ("output", "docs")
        },
        "seeds": {},
    }
    for seed in args.seeds:
        set_seed(seed)
        model, processor = from_backbone(
            args.backbone,
            "image-classification",
            image_size=args.image_size,
            id2label=labels_map,
            pooling="cls",
            pruning_rate=max(args.rates),
        )
        model.eval()
        if seed == args.seeds[0]:
            log(f"preprocessing {len(dataset['train'])} training and {len(dataset['validation'])} eval scenes")
            train_pixels = preprocess(processor, dataset["train"]["image"])
            train_labels = torch.tensor(dataset["train"]["label"])
            eval_pixels = preprocess(processor, dataset["validation"]["image"])
            eval_labels = torch.tensor(dataset["validation"]["label"])
            log("pooled features of the training scenes (frozen, unpruned)")
            features = pooled_features(model, train_pixels, args.batch_size)
        head_loss = train_head(model, features, train_labels, seed, args.head_steps, args.head_lr)
        log(f"seed {seed}: head trained (loss {head_loss:.3f}); calibrating the Cropr modules without labels")
        load_before = os.getloadavg()
        calibration = calibrate(
            model,
            dataset["train"],
            image_processor=processor,
            epochs=args.calibration_epochs,
            batch_size=args.batch_size,
            learning_rate=args.calibration_lr,
            seed=seed,
            progress=not args.quiet,
        )
        load_after = os.getloadavg()
        calibrated = calibration.model.eval()
        log(
            f"seed {seed}: calibrated in {calibration.seconds:.0f} s, aux loss {calibration.first_loss:.4f} -> "
            f"{calibration.last_loss:.4f}"
        )
        variants = {"cropr": calibrated}
        for selector in SELECTORS[1:]:
            variants[selector] = calibrated.with_token_selector(selector).eval()
        variants["random"].base_model.token_selector.generator = torch.Generator().manual_seed(seed)
        metrics: dict[str, dict[str, float]] = {selector: {} for selector in variants}
        for rate in args.rates:
            for selector, variant in variants.items():
                variant.set_pruning_rate(rate)
                if rate == 0 and selector != "cropr":  # nothing pruned: the same network as the calibrated one
                    metrics[selector]["0"] = metrics["cropr"]["0"]
                    continue
                metrics[selector][str(rate)] = accuracy(variant, eval_pixels, eval_labels, args.batch_size)
            log(f"seed {seed} R={rate}: " + ", ".join(f"{s} {m[str(rate)]:.3f}" for s, m in metrics.items()))
        seed_result = {
            "head_loss": head_loss,
            "calibration": {
                "seconds": calibration.seconds,
                "steps": calibration.steps,
                "images": calibration.num_images,
                "first_loss": calibration.first_loss,
                "last_loss": calibration.last_loss,
                "load_average_before": list(load_before),
                "load_average_after": list(load_after),
            },
            "accuracy": metrics,
        }
        if seed == args.seeds[0]:
            seed_result["throughput"] = measure(variants, eval_pixels[: args.throughput_batch_size], args)
        results["seeds"][str(seed)] = seed_result
        results["wall_seconds"] = time.time() - started
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        render(results, Path(args.docs))
        log(f"seed {seed} done; results in {args.output}")
    return results


def measure(variants: dict[str, CroprViTPreTrainedModel], pixel_values: torch.Tensor, args) -> dict[str, dict]:
    """Images/s of every (selector, rate), all timed interleaved on one batch (the rate is set before each call,
    which costs microseconds against a forward pass of milliseconds)."""
    log(f"timing {len(variants)} selectors x {len(args.rates)} rates at batch {len(pixel_values)}")

    def step(model, rate):
        def call():
            model.set_pruning_rate(rate)
            with torch.inference_mode():
                model(pixel_values)

        return call

    steps = {f"{selector}@{rate}": step(model, rate) for selector, model in variants.items() for rate in args.rates}
    samples = interleaved_timings(steps, pixel_values.device, warmup=1, repeats=args.throughput_repeats)
    throughput: dict[str, dict[str, float]] = {selector: {} for selector in variants}
    for name, values in samples.items():
        selector, rate = name.split("@")
        throughput[selector][rate] = len(pixel_values) / statistics.median(values)
    return throughput


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def summary(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per selector and rate: median, min and max accuracy over the seeds that ran."""
    seeds = list(results["seeds"].values())
    table: dict[str, dict[str, dict[str, float]]] = {}
    for selector in seeds[0]["accuracy"]:
        table[selector] = {}
        for rate in seeds[0]["accuracy"][selector]:
            values = [seed["accuracy"][selector][rate] for seed in seeds]
            table[selector][rate] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return table


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against measured images/s (left) and against the rate R (right, free of timing noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.reproduce import SELECTOR_STYLES, selector_legend

    table = summary(results)
    throughput = next(iter(results["seeds"].values()))["throughput"]
    figure, (by_speed, by_rate) = plt.subplots(1, 2, figsize=(11.0, 4.8))
    for selector, rows in table.items():
        rates = list(rows)
        y = [100 * rows[rate]["median"] for rate in rates]
        errors = [
            [100 * (rows[r]["median"] - rows[r]["min"]) for r in rates],
            [100 * (rows[r]["max"] - rows[r]["median"]) for r in rates],
        ]
        style = dict(SELECTOR_STYLES.get(selector, {}))
        fmt = style.pop("marker", "o") + ("-" if selector == "cropr" else "--")
        label = "cropr, calibrated without labels" if selector == "cropr" else selector
        x = [throughput[selector][rate] for rate in rates]
        by_speed.errorbar(x, y, yerr=errors, fmt=fmt, capsize=3, label=label, **style)
        by_rate.errorbar([int(r) for r in rates], y, yerr=errors, fmt=fmt, capsize=3, label=label, **style)
        if selector == "cropr":
            for rate, xi, yi in zip(rates, x, y, strict=True):
                by_speed.annotate(f"R={rate}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
    by_speed.set_xlabel(f"eval images/s (batch {results['settings']['throughput_batch_size']}, shared CPU, seed 0)")
    by_rate.set_xlabel("pruning rate R (tokens removed after each of the 10 modules)")
    for axis in (by_speed, by_rate):
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(alpha=0.3)
    figure.suptitle("One frozen DINOv2-S/14 at every pruning rate (median, bars: min-max over seeds)", fontsize=11)
    selector_legend(figure, by_speed)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict[str, Any]) -> str:
    table = summary(results)
    seeds = results["seeds"]
    first = next(iter(seeds.values()))
    throughput = first["throughput"]
    settings = results["settings"]
    rates = list(table["cropr"])
    env = results["environment"]
    calibrations = [seed["calibration"] for seed in seeds.values()]
    lines = [
        "# One frozen model, many speeds: calibrated Cropr vs training-free selectors",
        "",
        "Generated by `scripts/speed_dial.py` from `results_speed_dial.json`; every number below comes from that file.",
        "",
        "![Accuracy vs throughput per selector and rate](results_speed_dial.png)",
        "",
        f"A frozen DINOv2-S/14 at {settings['image_size']} px with a linear head trained on its unpruned features "
        f"({settings['num_train']} built-in cluttered scenes), then its Cropr modules calibrated without labels on "
        f"the same {settings['num_train']} images ({settings['calibration_epochs']} epoch(s), batch "
        f"{settings['batch_size']}). The same weights run at every rate R (tokens removed after each of the 10 "
        "per-block modules, Last Layer Fusion) with the calibrated routers and with the training-free selectors; "
        f"top-1 accuracy on {settings['num_eval']} eval scenes, median [min, max] over seeds "
        f"{', '.join(seeds)}; images/s from seed {next(iter(seeds))}, every (selector, rate) timed interleaved at "
        f"batch {settings['throughput_batch_size']}.",
        "",
        "Not measured here: Cropr fine-tuned end to end at each rate, and one elastic checkpoint "
        "(`--elastic_pruning`) against fixed-rate checkpoints.",
        "",
        "## Command",
        "",
        "```",
        f"OMP_NUM_THREADS=1 nice -n 10 {results['command']}",
        "```",
        "",
        f"CPU: {env['cpu_model']} ({env['cpu_cores_available']} cores, torch threads {env['torch_threads']}), "
        f"shared with other jobs: load average {', '.join(f'{v:.2f}' for v in env['load_average'])} at the start. "
        f"Wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
        "## Accuracy (%) at each rate",
        "",
        "| selector | " + " | ".join(f"R={rate}" for rate in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for selector, rows in table.items():
        cells = [
            f"{100 * rows[r]['median']:.1f} [{100 * rows[r]['min']:.1f}, {100 * rows[r]['max']:.1f}]" for r in rates
        ]
        lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Images/s at each rate",
        "",
        "| selector | " + " | ".join(f"R={r}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for selector in table:
        lines.append(f"| {selector} | " + " | ".join(f"{throughput[selector][r]:.1f}" for r in rates) + " |")
    lines += [
        "",
        "## Calibration",
        "",
        "| seed | images | steps | seconds | aux loss first -> last tenth | load average before / after |",
        "|---|---|---|---|---|---|",
    ]
    for seed, calib in zip(seeds, calibrations, strict=True):
        lines.append(
            f"| {seed} | {calib['images']} | {calib['steps']} | {calib['seconds']:.0f} | "
            f"{calib['first_loss']:.4f} -> {calib['last_loss']:.4f} | "
            f"{calib['load_average_before'][0]:.1f} / {calib['load_average_after'][0]:.1f} |"
        )
    lines += ["", "## Findings", "", *findings(results), ""]
    return "\n".join(lines)


def findings(results: dict[str, Any]) -> list[str]:
    table = summary(results)
    rates = [rate for rate in table["cropr"] if rate != "0"]
    lines = []
    for baseline in ("random", "variance", "attention"):
        deltas = [100 * (table["cropr"][r]["median"] - table[baseline][r]["median"]) for r in rates]
        below = [r for r, delta in zip(rates, deltas, strict=True) if delta < 0]
        lines.append(
            f"- Calibrated Cropr minus {baseline}, median accuracy per pruned rate: "
            + ", ".join(f"R={r} {d:+.1f}" for r, d in zip(rates, deltas, strict=True))
            + (" points; at or above it at every rate." if not below else f" points; below it at R={', '.join(below)}.")
        )
    seconds = [seed["calibration"]["seconds"] for seed in results["seeds"].values()]
    images = next(iter(results["seeds"].values()))["calibration"]["images"]
    lines.append(
        f"- Calibration on {images} images took {min(seconds) / 60:.1f} to {max(seconds) / 60:.1f} min "
        "(target: at most 10 min on the 2-core CPU)."
    )
    return lines


def main_page_section(results: dict[str, Any]) -> str:
    """This experiment's section of `docs/results.md`, between `MARKER_START` and `MARKER_END`."""
    return "\n".join(
        [
            MARKER_START,
            "## One frozen model, many speeds (label-free calibration)",
            "",
            "![Accuracy vs throughput per selector and rate](results_speed_dial.png)",
            "",
            *findings(results),
            "",
            "Details, tables and the command: [results_speed_dial.md](results_speed_dial.md).",
            MARKER_END,
        ]
    )


def render(results: dict[str, Any], docs: Path) -> None:
    """Write the report, the plot, and this experiment's section and the summary of `docs/results.md` (the summary
    also reads the fine-tuned comparison's `results.json` there, when present)."""
    from experiments.results_page import SUMMARY_END, refresh_summary, replace_section

    plot(results, docs / "results_speed_dial.png")
    (docs / "results_speed_dial.md").write_text(markdown(results))
    main_page = docs / "results.md"
    text = main_page.read_text() if main_page.is_file() else ""
    main_page.write_text(replace_section(text, MARKER_START, MARKER_END, main_page_section(results), after=SUMMARY_END))
    reproduction = docs / "results.json"
    refresh_summary(main_page, json.loads(reproduction.read_text()) if reproduction.is_file() else None, results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE))
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--canvas-size", type=int, default=112)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=256)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rates", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--calibration-epochs", type=float, default=1.0)
    parser.add_argument("--calibration-lr", type=float, default=5e-3)
    parser.add_argument("--throughput-batch-size", type=int, default=16)
    parser.add_argument("--throughput-repeats", type=int, default=3)
    parser.add_argument("--output", default="docs/results_speed_dial.json")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="write the docs from --output, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        render(json.loads(Path(args.output).read_text()), Path(args.docs))
        return 0
    if not Path(args.backbone).exists():
        sys.exit(f"speed_dial.py: error: backbone {args.backbone} not found; pass --backbone")
    run(args)
    return 0
