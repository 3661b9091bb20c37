"""One frozen model, many speeds: label-free calibrated Cropr routers against training-free selectors.

On a frozen pretrained backbone (DINOv2-S/14 by default) with a linear head trained on its unpruned features (the
built-in cluttered classification task), the Cropr modules are calibrated without labels (`cropr.calibration`) on
the training images, once; the same frozen model then runs at every pruning rate of the dial (`set_pruning_rate`)
with the calibrated routers, and with the random, variance and attention selectors. Each (selector, rate) is
evaluated per seed, and timed (seed 0) interleaved with all others on one eval batch.

The second part fine-tunes Cropr end to end with the fine-tuning recipe of `experiments/reproduce.py`, on the same
scenes: one checkpoint per pruned rate, and one elastic checkpoint per seed (the pruning fraction drawn at each step
after the curriculum) evaluated at every rate. Both parts store each finished seed or checkpoint in a JSON file and
skip what it already holds, so an interrupted run continues where it stopped. From that file the markdown report
and the metric-vs-throughput plot are written; a summary section replaces the one between markers at the top of
`docs/results.md`.

Research code (not installed), run through `python scripts/speed_dial.py --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, set_seed

from cropr.calibration import CONTRAST_WEIGHTS, SELECTION_IMAGES, CalibrationResult, calibrate, unpruned
from cropr.conversion import cropr_config_from_backbone, from_backbone
from cropr.data import id2label as builtin_id2label
from cropr.data import load_builtin_task
from cropr.models.cropr_vit.modeling_cropr_vit import CroprViTPreTrainedModel
from cropr.tools.argtypes import parse_shares
from cropr.tools.timing import interleaved_timings, machine_environment
from cropr.training.arguments import DataArguments
from cropr.training.tasks import TASKS, load_task_data
from experiments.reproduce import (
    DEFAULT_BACKBONE,
    Budget,
    ReproduceConfig,
    fine_tune,
    portable_command,
    portable_path,
    seed_spread,
)

TASK = "cluttered-classification"
FINE_TUNE_TASK = "image-classification"
"""The training scripts' task whose built-in data is `TASK`."""
SELECTORS = ("cropr", "random", "variance", "attention")
FROZEN_RECIPE = (
    "backbone",
    "image_size",
    "canvas_size",
    "num_train",
    "num_eval",
    "data_seed",
    "rates",
    "batch_size",
    "head_steps",
    "head_lr",
    "calibration_epochs",
    "calibration_lr",
    "contrast_weights",
    "throughput_batch_size",
    "throughput_repeats",
)
"""Settings that define the frozen part: a stored run with other values is superseded, not continued."""
SHARED_SETTINGS = ("backbone", "image_size", "canvas_size", "num_train", "data_seed")
"""Settings that the fine-tuned part must share with the frozen run it is compared with."""
RUN_KEYS = ("command", "started", "environment", "settings", "seeds", "wall_seconds")
"""What a stored run of a frozen part holds; a superseded run keeps all of it."""
RETIMED = "retimed"
"""The record of the last `--retime` of a stored run (when, where, by which command)."""
ELASTIC = "elastic"
RETIME_HELP = (
    "time every (selector, rate) of the stored frozen run again (--throughput-repeats interleaved timings each) and "
    "rewrite the docs; trains and evaluates nothing (pass the stored run's settings)"
)
FINE_TUNED_CURVES = {
    "fixed": "cropr fine-tuned, one checkpoint per rate",
    ELASTIC: "cropr fine-tuned elastic, one checkpoint",
}
FINE_TUNED_STYLES = {
    "fixed": {"color": "darkred", "marker": "P", "markersize": 8, "linestyle": ":"},
    ELASTIC: {"color": "tab:orange", "marker": "X", "markersize": 8, "linestyle": "-."},
}
METRIC_NAMES = {"accuracy": "Top-1 accuracy", "mean_iou": "Mean IoU"}
"""How the reports name each per-seed metric of a frozen run."""
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
    return float(loss.detach())


@torch.no_grad()
def correct_predictions(model, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int) -> str:
    """Per eval scene, "1" where the top-1 prediction is right, else "0": the accuracy on any first scenes, and
    paired comparisons of two models on the same scenes, follow from it."""
    correct = []
    for start in range(0, len(pixel_values), batch_size):
        logits = model(pixel_values[start : start + batch_size]).logits
        correct += (logits.argmax(-1) == labels[start : start + batch_size]).tolist()
    return "".join("1" if hit else "0" for hit in correct)


def share(correct: str, num_scenes: int | None = None) -> float:
    """Accuracy on the first `num_scenes` eval scenes (all by default) of a `correct_predictions` string."""
    scenes = correct[:num_scenes]
    return scenes.count("1") / len(scenes)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Store the results, and write the docs from them once the frozen part, which they are drawn around, is in."""
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    if results.get("seeds"):
        render(results, Path(args.docs))


def recorded_command() -> str:
    return portable_command(shlex.join(["python", "scripts/speed_dial.py", *sys.argv[1:]]))


def frozen_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: portable_path(value) if key == "backbone" else value
        for key, value in vars(args).items()
        if key in FROZEN_RECIPE or key == "seeds"
    }


def start_run(results: dict[str, Any], settings: dict[str, Any], recipe: Sequence[str], command: str) -> bool:
    """Continue the stored run when its `recipe` settings equal `settings` (returns True); otherwise move a run that
    has seeds to `superseded`, with the record of its last `--retime` when it has one, and start anew (returns
    False)."""
    stored = results.get("settings", {})
    if "seeds" in results and all(stored.get(key) == settings[key] for key in recipe):
        return True
    retimed = results.pop(RETIMED, None)  # it timed the stored run, never the new one
    if results.get("seeds"):
        run = {key: results.pop(key) for key in RUN_KEYS}
        results.setdefault("superseded", []).append(run if retimed is None else {**run, RETIMED: retimed})
    results.update(
        command=command,
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        environment=machine_environment(),
        settings=settings,
        seeds={},
        wall_seconds=0.0,
    )
    return False


def start_frozen_run(results: dict[str, Any], args: argparse.Namespace) -> None:
    """`start_run` of the frozen part; a continued run's settings list the seeds of both runs."""
    if start_run(results, frozen_settings(args), FROZEN_RECIPE, recorded_command()):
        results["settings"]["seeds"] = sorted(set(results["settings"]["seeds"]) | set(args.seeds))


def frozen_model(args: argparse.Namespace, task: str, builtin_task: str, **options: Any):
    """The backbone converted as a `task` model for a frozen run, labelled with the built-in task's classes and pruning
    at the run's highest rate (eval mode), with its image processor; head and Cropr modules as initialised."""
    model, processor = from_backbone(
        args.backbone,
        task,
        image_size=args.image_size,
        id2label=builtin_id2label(builtin_task),
        pruning_rate=max(args.rates),
        **options,
    )
    return model.eval(), processor


def frozen_classifier(args: argparse.Namespace) -> tuple[CroprViTPreTrainedModel, Any]:
    """The frozen part's classifier ([`frozen_model`]), reading the CLS token."""
    return frozen_model(args, "image-classification", TASK, pooling="cls")


def stored_run_to_retime(output: Path, settings: dict[str, Any], recipe: Sequence[str]) -> dict[str, Any]:
    """The stored run in `output`; exit with a message unless there is one with these settings (the timing repeats
    aside)."""
    results = load(output)
    if not results.get("seeds"):
        sys.exit("error: --retime needs a stored run in --output; there is none")
    differing = [key for key in recipe if key != "throughput_repeats" and results["settings"].get(key) != settings[key]]
    if differing:
        sys.exit(f"error: --retime times the stored run; pass its settings ({', '.join(differing)} differ)")
    return results


def run_retime(args: argparse.Namespace) -> dict[str, Any]:
    """Time every (selector, rate) of the stored frozen run again ([`retime`]) and rewrite the docs."""
    results = stored_run_to_retime(Path(args.output), frozen_settings(args), FROZEN_RECIPE)
    retime(results, *frozen_classifier(args), TASK, args, recorded_command())
    save(results, args)
    return results


def run_frozen(args: argparse.Namespace) -> dict[str, Any]:
    """The frozen part: per seed, a head on the unpruned features, calibration, then every (selector, rate)."""
    results = load(Path(args.output))
    start_frozen_run(results, args)
    todo = [seed for seed in args.seeds if str(seed) not in results["seeds"]]
    if not todo:
        log("frozen part: every seed is stored already")
        return results
    dataset = load_builtin_task(
        TASK, num_train=args.num_train, num_eval=args.num_eval, image_size=args.canvas_size, seed=args.data_seed
    )
    features = None
    for seed in todo:
        started = time.time()
        set_seed(seed)
        model, processor = frozen_classifier(args)
        if features is None:
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
            contrast_weights=args.contrast_weights,
        )
        load_after = os.getloadavg()
        calibrated = calibration.model.eval()
        log(
            f"seed {seed}: calibrated in {calibration.seconds:.0f} s, aux loss {calibration.first_loss:.4f} -> "
            f"{calibration.last_loss:.4f}"
        )
        variants = selector_variants(calibrated, seed)
        correct: dict[str, dict[str, str]] = {selector: {} for selector in variants}
        for rate in args.rates:
            for selector, variant in variants.items():
                variant.set_pruning_rate(rate)
                if rate == 0 and selector != "cropr":  # nothing pruned: the same network as the calibrated one
                    correct[selector]["0"] = correct["cropr"]["0"]
                    continue
                correct[selector][str(rate)] = correct_predictions(variant, eval_pixels, eval_labels, args.batch_size)
            log(f"seed {seed} R={rate}: " + ", ".join(f"{s} {share(c[str(rate)]):.3f}" for s, c in correct.items()))
        seed_result = {
            "head_loss": head_loss,
            "calibration": {
                "seconds": calibration.seconds,
                "steps": calibration.steps,
                "images": calibration.num_images,
                "first_loss": calibration.first_loss,
                "last_loss": calibration.last_loss,
                **calibration_choice(calibration),
                "load_average_before": list(load_before),
                "load_average_after": list(load_after),
            },
            "accuracy": {
                selector: {rate: share(bits) for rate, bits in rows.items()} for selector, rows in correct.items()
            },
            "correct": correct,
        }
        if not any("throughput" in stored for stored in results["seeds"].values()):
            seed_result["throughput"] = measure(variants, eval_pixels[: args.throughput_batch_size], args)
        results["seeds"][str(seed)] = seed_result
        results["wall_seconds"] += time.time() - started
        save(results, args)
        log(f"seed {seed} done; results in {args.output}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuned end to end: one checkpoint per rate, and one elastic checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def pruned_rates(rates: Sequence[int | str]) -> list[int]:
    return sorted(int(rate) for rate in rates if int(rate) > 0)


def elastic_min_fraction(args: argparse.Namespace) -> float:
    """The lowest pruning fraction an elastic checkpoint trains at: `--elastic-min-fraction`, by default the lowest
    pruned rate over the highest, so that its draws span the dial's range."""
    if args.elastic_min_fraction is not None:
        return args.elastic_min_fraction
    rates = pruned_rates(args.rates)
    return rates[0] / rates[-1]


def fine_tune_config(args: argparse.Namespace) -> ReproduceConfig:
    """The fine-tuning recipe of `experiments/reproduce.py` (its defaults) on this experiment's data and model."""
    budget = Budget(num_train=args.num_train, num_eval=args.num_eval, epochs=args.fine_tune_epochs)
    return ReproduceConfig(
        tasks=[FINE_TUNE_TASK],
        seeds=list(args.seeds),
        budgets={FINE_TUNE_TASK: budget},
        backbone=args.backbone,
        image_size=args.image_size,
        canvas_size=args.canvas_size,
        pooling="cls",
        data_seed=args.data_seed,
    )


def fine_tune_recipe(config: ReproduceConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What defines the fine-tuned checkpoints: stored ones of another recipe are neither mixed in nor overwritten."""
    recipe = {key: value for key, value in asdict(config).items() if key not in ("tasks", "seeds", "only_selectors")}
    recipe["backbone"] = portable_path(args.backbone)
    return {**recipe, "elastic_rate": pruned_rates(args.rates)[-1], "elastic_min_fraction": elastic_min_fraction(args)}


def rate_schedule(backbone: str, image_size: int, rate: int) -> list[int]:
    """Tokens removed after each block at rate R: the schedule `set_pruning_rate(rate)` gives the frozen model."""
    config = cropr_config_from_backbone(
        AutoConfig.from_pretrained(backbone), "feature-extraction", image_size=image_size, pruning_rate=rate
    )
    return config.effective_pruning_schedule


def run_fine_tuned(args: argparse.Namespace) -> dict[str, Any]:
    """The fine-tuned part: per seed, one elastic checkpoint (evaluated at every pruned rate) and one checkpoint per
    pruned rate (evaluated at it), on the same scenes as the frozen part; each is stored once evaluated."""
    results = load(Path(args.output))
    if "settings" in results:  # the fine-tuned curves are drawn beside the frozen model's: the same data and model
        frozen = frozen_settings(args)
        differing = [key for key in SHARED_SETTINGS if results["settings"].get(key) != frozen[key]]
        if differing:
            sys.exit(
                "speed_dial.py: error: the stored frozen run has other "
                + ", ".join(f"--{key.replace('_', '-')} ({results['settings'].get(key)})" for key in differing)
                + "; fine-tune with its settings, or rerun the frozen part with these"
            )
    config = fine_tune_config(args)
    recipe = fine_tune_recipe(config, args)
    part = results.get("fine_tuned")
    if part is not None and part["recipe"] != recipe and part["runs"]:
        differing = sorted(key for key in {*recipe, *part["recipe"]} if recipe.get(key) != part["recipe"].get(key))
        sys.exit(
            f"speed_dial.py: error: the {len(part['runs'])} fine-tuned checkpoints stored in {args.output} were "
            f"trained with another recipe (differing: {', '.join(differing)}); write elsewhere (--output)"
        )
    if part is None or part["recipe"] != recipe:
        part = {"recipe": recipe, "wall_seconds": 0.0, "runs": []}
    part.update(
        command=recorded_command(),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        environment=machine_environment(),
    )
    results["fine_tuned"] = part
    rates = pruned_rates(args.rates)
    done = {(run["seed"], run["name"]) for run in part["runs"]}
    todo = [
        (seed, name)
        for seed in args.seeds
        for name in (ELASTIC, *(f"R={rate}" for rate in rates))
        if (seed, name) not in done
    ]
    if not todo:
        log("fine-tuned part: every checkpoint is stored already")
        return results
    task = TASKS[FINE_TUNE_TASK]
    data_args = DataArguments(
        num_train_samples=args.num_train, num_eval_samples=args.num_eval, canvas_size=args.canvas_size
    )
    dataset, labels, _ = load_task_data(task, data_args, args.data_seed)
    eval_labels = torch.tensor(dataset["validation"]["label"])
    eval_pixels = None
    with tempfile.TemporaryDirectory() as work_dir:
        for seed, name in todo:
            started = time.time()
            rate = rates[-1] if name == ELASTIC else int(name.removeprefix("R="))
            minimum = recipe["elastic_min_fraction"] if name == ELASTIC else None
            schedule = rate_schedule(args.backbone, args.image_size, rate)
            log(f"seed {seed}: fine-tuning {name} (schedule {schedule}, elastic from {minimum})")
            load_before = os.getloadavg()
            trainer, train_seconds = fine_tune(
                task, "cropr", seed, config, args.backbone, schedule, args.image_size, dataset, labels, work_dir,
                elastic_min_fraction=minimum,
            )  # fmt: skip
            model = trainer.model.eval().strip_training_modules()
            if eval_pixels is None:  # every checkpoint of the recipe has the same image processor
                eval_pixels = preprocess(trainer.processing_class, dataset["validation"]["image"])
            eval_started = time.time()
            correct = {}
            for eval_rate in rates if name == ELASTIC else [rate]:
                model.set_pruning_rate(eval_rate)
                correct[str(eval_rate)] = correct_predictions(model, eval_pixels, eval_labels, args.batch_size)
            log(f"seed {seed} {name}: " + ", ".join(f"R={r} {share(bits):.3f}" for r, bits in correct.items()))
            part["runs"].append(
                {
                    "seed": seed,
                    "name": name,
                    "pruning_schedule": schedule,
                    "elastic_min_fraction": minimum,
                    "train_seconds": train_seconds,
                    "eval_seconds": time.time() - eval_started,
                    "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg()),
                    "correct": correct,
                }
            )
            part["wall_seconds"] += time.time() - started
            save(results, args)
    return results


def run_calibration_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Time one label-free calibration of the bare backbone (its pooled embedding as the target) at
    `--timing-image-size` on the `--num-train` training scenes; the rate keeps the frozen part's share of patches."""
    results = load(Path(args.output))
    dataset = load_builtin_task(
        TASK, num_train=args.num_train, num_eval=1, image_size=args.canvas_size, seed=args.data_seed
    )
    rate = round(max(args.rates) * (args.timing_image_size / args.image_size) ** 2)
    log(f"timing a calibration at {args.timing_image_size} px, R={rate}, on {args.num_train} images")
    environment = machine_environment()
    calibration = calibrate(
        args.backbone,
        dataset["train"],
        epochs=args.calibration_epochs,
        batch_size=args.batch_size,
        learning_rate=args.calibration_lr,
        progress=not args.quiet,
        image_size=args.timing_image_size,
        pruning_rate=rate,
    )
    results["calibration_timing"] = {
        "command": recorded_command(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "environment": environment,
        "image_size": args.timing_image_size,
        "pruning_rate": rate,
        "epochs": args.calibration_epochs,
        "batch_size": args.batch_size,
        "images": calibration.num_images,
        "steps": calibration.steps,
        "seconds": calibration.seconds,
        "first_loss": calibration.first_loss,
        "last_loss": calibration.last_loss,
        "load_average_after": list(os.getloadavg()),
    }
    log(f"calibrated in {calibration.seconds:.0f} s")
    save(results, args)
    return results


def calibration_choice(calibration: CalibrationResult) -> dict[str, Any]:
    """The contrast share of the scorers a calibration kept, and each compared share's change of predictions, for a
    results file."""
    changes = {str(weight): value for weight, value in calibration.prediction_changes.items()}
    return {"contrast_weight": calibration.contrast_weight, "prediction_changes": changes}


def scorer_choice_sentence(results: dict[str, Any]) -> str:
    """What the calibrations kept of the contrast read-out, seed by seed, followed by a space (empty for a run that
    did not compare)."""
    weights = results["settings"].get("contrast_weights")
    if not weights or len(weights) < 2:
        return ""
    kept = ", ".join(
        f"seed {seed} {stored['calibration']['contrast_weight']:g}" for seed, stored in results["seeds"].items()
    )
    shares = ", ".join(f"{weight:g}" for weight in weights)
    return (
        "After training, each calibration compared mixes of its learned queries and the contrast read-out (shares "
        f"{shares}) by the share of the unpruned model's predictions on {SELECTION_IMAGES} training images that "
        f"their pruning changes, and kept the mix that changes fewest; share kept: {kept}. "
    )


def selector_variants(calibrated: CroprViTPreTrainedModel, seed: int) -> dict[str, CroprViTPreTrainedModel]:
    """The frozen model with each of `SELECTORS`, on the same weights, in eval mode; the random one draws from
    `seed`."""
    variants = {"cropr": calibrated}
    for selector in SELECTORS[1:]:
        variants[selector] = calibrated.with_token_selector(selector).eval()
    variants["random"].base_model.token_selector.generator = torch.Generator().manual_seed(seed)
    return variants


def retime(results: dict[str, Any], model: CroprViTPreTrainedModel, processor, task: str, args, command: str) -> None:
    """Time every (selector, rate) of a stored run again (`args.throughput_repeats` interleaved timings each, on the
    first eval scenes of the built-in `task`) and replace its images/s with them; trains and evaluates nothing.

    `model` is the run's frozen model built anew with Cropr modules left as initialised: the work of a forward pass
    does not depend on the routers' weights (one product with the aggregated query and a sort, whatever it holds),
    so it runs what the calibrated model runs, without calibrating again.
    """
    # The eval scenes do not depend on the number of training scenes: render only the timed batch.
    dataset = load_builtin_task(
        task, num_train=1, num_eval=args.throughput_batch_size, image_size=args.canvas_size, seed=args.data_seed
    )
    pixel_values = preprocess(processor, dataset["validation"]["image"])
    load_before = os.getloadavg()
    throughput = measure(selector_variants(model.strip_training_modules().eval(), 0), pixel_values, args)
    results["seeds"][timed_seed(results)]["throughput"] = throughput
    results["settings"]["throughput_repeats"] = args.throughput_repeats
    results[RETIMED] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "environment": machine_environment(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def timing_sentence(results: dict[str, Any]) -> str:
    """How the images/s of a frozen run were measured."""
    settings = results["settings"]
    timed = (
        f"batch {settings['throughput_batch_size']}, median of {settings['throughput_repeats']} interleaved timings "
        "per (selector, rate)"
    )
    retimed = results.get(RETIMED)
    if retimed is None:
        return f"Images/s: {timed}, on seed {timed_seed(results)}'s models."
    env = retimed["environment"]
    return (
        f"Images/s: {timed}, measured on {retimed['date']} on {env['cpu_model']} ({env['cpu_cores_available']} "
        f"cores, torch threads {env['torch_threads']}; load average {retimed['load_average_before'][0]:.1f} before, "
        f"{retimed['load_average_after'][0]:.1f} after) by `{retimed['command']}`, on the same frozen model built "
        "anew, its Cropr modules as initialised: the routers' weights do not change the work of a forward pass."
    )


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
def summary(results: dict[str, Any], metric: str = "accuracy") -> dict[str, dict[str, dict[str, float]]]:
    """Per selector and rate of a frozen run: median, min and max of `metric` (each seed's `metric` entry) over the
    seeds that ran."""
    seeds = list(results["seeds"].values())
    return {
        selector: {rate: seed_spread([seed[metric][selector][rate] for seed in seeds]) for rate in rows}
        for selector, rows in seeds[0][metric].items()
    }


def paired_difference(results: dict[str, Any], baseline: str, rate: str) -> dict[str, float]:
    """Calibrated Cropr's accuracy minus `baseline`'s at `rate`, paired on the same eval scenes.

    Per scene, the difference of the two models' hits, averaged over the seeds; `mean` is its mean over the scenes,
    `low` and `high` a 95% interval (1.96 standard errors over the scenes: every seed sees the same scenes, so the
    scenes are the unit of sampling).
    """
    hits = [(seed["correct"]["cropr"][rate], seed["correct"][baseline][rate]) for seed in results["seeds"].values()]
    num_scenes = len(hits[0][0])
    if any(len(bits) != num_scenes for pair in hits for bits in pair):
        raise ValueError(f"the seeds' eval scenes at R={rate} differ in number: cannot pair them")
    per_scene = [statistics.fmean(int(cropr[i]) - int(other[i]) for cropr, other in hits) for i in range(num_scenes)]
    mean = statistics.fmean(per_scene)
    half_width = 1.96 * statistics.stdev(per_scene) / len(per_scene) ** 0.5
    return {"mean": mean, "low": mean - half_width, "high": mean + half_width}


def paired_cell(difference: dict[str, float]) -> str:
    return f"{100 * difference['mean']:+.1f} [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"


def below_noise(differences: dict[str, dict[str, float]]) -> list[str]:
    """The rates of `paired_difference`s whose 95% interval lies wholly below zero."""
    return [rate for rate, difference in differences.items() if difference["high"] < 0]


def noise_verdict(results: dict[str, Any], baseline: str, rates: Sequence[str]) -> str:
    """Whether Cropr's paired differences from `baseline` at `rates` are beyond the noise of the eval scenes."""
    differences = {rate: paired_difference(results, baseline, rate) for rate in rates}
    beyond = below_noise(differences)
    cells = ", ".join(f"R={rate} {paired_cell(difference)}" for rate, difference in differences.items())
    verdict = (
        f"the 95% interval below zero at R={', '.join(beyond)}"
        if beyond
        else "each 95% interval holding zero, within the noise of the eval scenes"
    )
    return f"paired on the same scenes: {cells} points, {verdict}"


def timed_seed(results: dict[str, Any]) -> str:
    """The one seed of a frozen run whose entry holds the images/s."""
    return next(seed for seed, result in results["seeds"].items() if "throughput" in result)


def frozen_throughput(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Images/s per selector and rate, from the one seed of the frozen run that was timed."""
    return results["seeds"][timed_seed(results)]["throughput"]


def shared_scenes(results: dict[str, Any]) -> int:
    """How many eval scenes the fine-tuned checkpoints share with the frozen run: scene i depends only on the data
    seed, the canvas and i, so the first ones of the larger set are the other set."""
    recipe = results["fine_tuned"]["recipe"]
    settings = results["settings"]
    if (recipe["data_seed"], recipe["canvas_size"]) != (settings["data_seed"], settings["canvas_size"]):
        raise ValueError("the fine-tuned checkpoints were evaluated on other scenes than the frozen model")
    return min(settings["num_eval"], recipe["budgets"][FINE_TUNE_TASK]["num_eval"])


def fine_tuned_table(results: dict[str, Any], num_scenes: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per fine-tuned curve ("fixed", "elastic") and rate: median, min and max accuracy over the seeds that ran, on
    the first `num_scenes` eval scenes (all by default), and each seed's (`per_seed`)."""
    values: dict[str, dict[str, dict[str, float]]] = {"fixed": {}, ELASTIC: {}}
    for run in sorted(results.get("fine_tuned", {}).get("runs", []), key=lambda run: run["seed"]):
        curve = ELASTIC if run["name"] == ELASTIC else "fixed"
        for rate, bits in run["correct"].items():
            values[curve].setdefault(rate, {})[str(run["seed"])] = share(bits, num_scenes)
    return {
        curve: {
            rate: {**seed_spread(list(per_seed.values())), "per_seed": per_seed}
            for rate, per_seed in sorted(rows.items(), key=lambda item: int(item[0]))
        }
        for curve, rows in values.items()
    }


def elastic_gaps(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per rate: the elastic checkpoint's accuracy minus the fixed-rate checkpoint's, on all their eval scenes,
    paired by seed; median, min and max over the seeds that have both."""
    table = fine_tuned_table(results)
    gaps = {}
    for rate, fixed in table["fixed"].items():
        elastic = table[ELASTIC].get(rate, {}).get("per_seed", {})
        deltas = [elastic[seed] - value for seed, value in fixed["per_seed"].items() if seed in elastic]
        if deltas:
            gaps[rate] = {**seed_spread(deltas), "seeds": len(deltas)}
    return gaps


def missing_fine_tuned(results: dict[str, Any]) -> list[str]:
    """The fine-tuned checkpoints not stored (yet) for the frozen run's seeds and pruned rates, as "name seed s"."""
    runs = results.get("fine_tuned", {}).get("runs", [])
    done = {(str(run["seed"]), run["name"]) for run in runs}
    seeds = sorted({*results["seeds"], *(str(run["seed"]) for run in runs)}, key=int)
    names = [ELASTIC, *(f"R={rate}" for rate in pruned_rates(results["settings"]["rates"]))]
    return [f"{name} seed {seed}" for seed in seeds for name in names if (seed, name) not in done]


def spread(row: dict[str, float]) -> str:
    return f"{100 * row['median']:.1f} [{100 * row['min']:.1f}, {100 * row['max']:.1f}]"


def signed_spread(row: dict[str, float]) -> str:
    return f"{100 * row['median']:+.1f} [{100 * row['min']:+.1f}, {100 * row['max']:+.1f}]"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against measured images/s (left) and against the rate R (right, free of timing noise)."""
    throughput = frozen_throughput(results)
    curves = selector_curves(summary(results), throughput)
    if results.get("fine_tuned", {}).get("runs"):
        # A fine-tuned checkpoint at rate R runs the calibrated model's network at R: the same images/s.
        for curve, rows in fine_tuned_table(results, shared_scenes(results)).items():
            if rows:
                style = dict(FINE_TUNED_STYLES[curve])
                curves.append((FINE_TUNED_CURVES[curve], rows, throughput["cropr"], style, style.pop("linestyle")))
    draw_dial(
        curves,
        path,
        speed_label=f"eval images/s (batch {results['settings']['throughput_batch_size']}, shared CPU)",
        metric_label="top-1 accuracy (%)",
        title="DINOv2-S/14 at every pruning rate (median, bars: min-max over seeds)",
    )


Curve = tuple[str, dict[str, dict[str, float]], dict[str, float], dict[str, Any], str]
"""(label, median/min/max per rate, images/s per rate, matplotlib style, line style) of one curve of a dial plot."""


def selector_curves(
    table: dict[str, dict[str, dict[str, float]]], throughput: dict[str, dict[str, float]]
) -> list[Curve]:
    """One curve per selector of a frozen run's `summary`, in the results page's selector styles."""
    from experiments.reproduce import SELECTOR_STYLES

    curves: list[Curve] = []
    for selector, rows in table.items():
        style = dict(SELECTOR_STYLES.get(selector, {}))
        label = "cropr, calibrated without labels" if selector == "cropr" else selector
        curves.append((label, rows, throughput[selector], style, "-" if selector == "cropr" else "--"))
    return curves


def draw_dial(curves: list[Curve], path: Path, speed_label: str, metric_label: str, title: str) -> None:
    """The metric of each curve against measured images/s (left) and against the rate R (right, free of timing
    noise); the calibrated Cropr curve's points are labelled with their rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.reproduce import selector_legend

    figure, (by_speed, by_rate) = plt.subplots(1, 2, figsize=(11.0, 5.2))
    for label, rows, speeds, style, linestyle in curves:
        style = dict(style)
        rates = list(rows)
        y = [100 * rows[rate]["median"] for rate in rates]
        errors = [
            [100 * (rows[r]["median"] - rows[r]["min"]) for r in rates],
            [100 * (rows[r]["max"] - rows[r]["median"]) for r in rates],
        ]
        fmt = style.pop("marker", "o") + linestyle
        x = [speeds[rate] for rate in rates]
        by_speed.errorbar(x, y, yerr=errors, fmt=fmt, capsize=3, label=label, **style)
        by_rate.errorbar([int(r) for r in rates], y, yerr=errors, fmt=fmt, capsize=3, label=label, **style)
        if label.startswith("cropr, calibrated"):
            for rate, xi, yi in zip(rates, x, y, strict=True):
                by_speed.annotate(f"R={rate}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
    by_speed.set_xlabel(speed_label)
    by_rate.set_xlabel("pruning rate R (tokens removed after each of the 10 modules)")
    for axis in (by_speed, by_rate):
        axis.set_ylabel(metric_label)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=11)
    selector_legend(figure, by_speed, columns=3)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def rate_table(corner: str, rates: Sequence[str], rows: dict[str, Sequence[str]]) -> list[str]:
    """Markdown rows of a table with one column per pruning rate: the header (`corner` above the row names), then
    each row's name and cells."""
    return [
        f"| {corner} | " + " | ".join(f"R={rate}" for rate in rates) + " |",
        "|---|" + "---|" * len(rates),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()),
    ]


def frozen_pruned_rates(results: dict[str, Any], metric: str = "accuracy") -> list[str]:
    """The rates of a frozen run but R=0, as its seeds' `metric` entries key them."""
    return [rate for rate in next(iter(results["seeds"].values()))[metric]["cropr"] if rate != "0"]


def selector_table(
    run: dict[str, Any], metric: str = "accuracy", fine_tuned: dict[str, dict[str, dict[str, Any]]] | None = None
) -> list[str]:
    """Markdown rows: a frozen run's `metric` per selector and rate, then the fine-tuned curves' when given."""
    table = summary(run, metric)
    rates = list(table["cropr"])
    rows = {
        ("cropr, calibrated" if selector == "cropr" else selector): [spread(row[r]) for r in rates]
        for selector, row in table.items()
    }
    for curve, row in (fine_tuned or {}).items():
        if row:
            rows[FINE_TUNED_CURVES[curve]] = [spread(row[r]) if r in row else "-" for r in rates]
    return rate_table("model", rates, rows)


def paired_table(results: dict[str, Any]) -> list[str]:
    """The report's section: calibrated Cropr minus each training-free selector, paired on the same scenes."""
    rates = frozen_pruned_rates(results)
    num_scenes = len(next(iter(results["seeds"].values()))["correct"]["cropr"][rates[0]])
    rows = {
        baseline: [paired_cell(paired_difference(results, baseline, rate)) for rate in rates]
        for baseline in SELECTORS[1:]
    }
    return [
        "## Calibrated Cropr minus each selector, paired on the same scenes",
        "",
        f"Per eval scene, Cropr's hit minus the selector's, averaged over the seeds; the mean over the {num_scenes} "
        "scenes in points, and its 95% interval (1.96 standard errors over the scenes). An interval that holds zero "
        "is a difference these scenes cannot tell from noise.",
        "",
        *rate_table("calibrated cropr minus", rates, rows),
        "",
    ]


def fine_tuned_section(results: dict[str, Any]) -> list[str]:
    """The report's section on the checkpoints fine-tuned end to end, when any is stored."""
    part = results.get("fine_tuned")
    if not part or not part["runs"]:
        return []
    recipe = part["recipe"]
    budget = recipe["budgets"][FINE_TUNE_TASK]
    frozen_blocks = (
        "all but the last two" if recipe["frozen_blocks"] is None else f"the first {recipe['frozen_blocks']}"
    )
    table = fine_tuned_table(results)
    gaps = elastic_gaps(results)
    env = part["environment"]
    lines = [
        "## Fine-tuned end to end: one checkpoint per rate, and one elastic checkpoint",
        "",
        f"Cropr fine-tuned with the recipe of `scripts/reproduce.py` on the same {budget['num_train']} training "
        f"scenes ({budget['epochs']:g} epoch(s), batch {recipe['batch_size']}, AdamW lr {recipe['learning_rate']:g} "
        f"with layer decay {recipe['layer_decay']:g}, Cropr modules at {recipe['router_lr_scale']:g}x, cosine "
        f"schedule; the patch embedding and {frozen_blocks} blocks frozen, the Cropr modules after them and the head "
        f"trained; the pruning ramps up over the first {recipe['curriculum']:g} of the steps). One checkpoint per "
        f"rate R trains at R; the elastic checkpoint trains at R={recipe['elastic_rate']} and, after the ramp, "
        f"draws each step's pruning fraction from [{recipe['elastic_min_fraction']:g}, 1] (`--elastic_pruning "
        f"{recipe['elastic_min_fraction']:g}` in the training scripts), and is evaluated at every rate. Top-1 "
        f"accuracy on all {budget['num_eval']} eval scenes, median [min, max] over the seeds that ran; fine-tuned "
        "models see the whole scene (the recipe's image processor, no center crop). The plot and the table above "
        f"use their first {shared_scenes(results)} scenes, those of the frozen model, and place them at the "
        "calibrated model's images/s at the same rate (the same network, other weights).",
        "",
        "```",
        f"OMP_NUM_THREADS=1 nice -n 10 {part['command']}",
        "```",
        "",
        f"CPU: {env['cpu_model']} ({env['cpu_cores_available']} cores, torch threads {env['torch_threads']}), "
        f"shared with other jobs: load average {', '.join(f'{v:.2f}' for v in env['load_average'])} at the start of "
        f"the last invocation. Wall time {part['wall_seconds'] / 60:.1f} min for {len(part['runs'])} checkpoints "
        f"(training {statistics.median(run['train_seconds'] for run in part['runs']) / 60:.1f} min each, median).",
        "",
        "| rate | one checkpoint per rate | elastic checkpoint | elastic minus per-rate, paired by seed | seeds |",
        "|---|---|---|---|---|",
    ]
    for rate in sorted({*table["fixed"], *table[ELASTIC]}, key=int):
        fixed, elastic = table["fixed"].get(rate), table[ELASTIC].get(rate)
        gap = gaps.get(rate)
        lines.append(
            f"| R={rate} | {spread(fixed) if fixed else '-'} | {spread(elastic) if elastic else '-'} | "
            f"{signed_spread(gap) if gap else '-'} | {gap['seeds'] if gap else 0} |"
        )
    return [*lines, ""]


def superseded_section(
    results: dict[str, Any], recipe: Sequence[str] = FROZEN_RECIPE, metric: str = "accuracy"
) -> list[str]:
    """The report's appendix: each superseded run's `metric` per selector and rate (`METRIC_NAMES`), with the
    `recipe` settings it differed in."""
    runs = results.get("superseded", [])
    if not runs:
        return []
    lines = ["## Appendix: superseded runs", ""]
    for run in runs:
        changed = [
            f"{key} {run['settings'].get(key)}"
            for key in recipe
            if run["settings"].get(key) != results["settings"].get(key)
        ]
        lines += [
            f"Started {run['started']} (`{run['command']}`), differing in: {', '.join(changed)}. "
            f"{METRIC_NAMES[metric]} (%), median [min, max] over seeds {', '.join(run['seeds'])}:",
            "",
            *selector_table(run, metric),
            "",
        ]
    return lines


def throughput_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: images/s per selector and rate, from the seed of a frozen run that was timed."""
    throughput = frozen_throughput(results)
    rates = list(throughput["cropr"])
    return rate_table(
        "selector", rates, {selector: [f"{row[r]:.1f}" for r in rates] for selector, row in throughput.items()}
    )


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    settings = results["settings"]
    env = results["environment"]
    has_fine_tuned = bool(results.get("fine_tuned", {}).get("runs"))
    fine_tuned = fine_tuned_table(results, shared_scenes(results)) if has_fine_tuned else None
    missing = missing_fine_tuned(results)
    if not has_fine_tuned:
        not_measured = (
            "Not measured here: Cropr fine-tuned end to end at each rate, and one elastic checkpoint "
            "(`--elastic_pruning`) against fixed-rate checkpoints."
        )
    elif missing:
        not_measured = f"Not measured (the run stopped before them): the fine-tuned checkpoints {', '.join(missing)}."
    else:
        not_measured = ""
    lines = [
        "# One model, many speeds: calibrated Cropr vs training-free selectors and fine-tuned Cropr",
        "",
        "Generated by `scripts/speed_dial.py` from `results_speed_dial.json`; every number below comes from that file.",
        "",
        "![Accuracy vs throughput per selector and rate](results_speed_dial.png)",
        "",
        f"A frozen DINOv2-S/14 at {settings['image_size']} px with a linear head trained on its unpruned features "
        f"({settings['num_train']} built-in cluttered scenes), then its Cropr modules calibrated without labels on "
        f"the same {settings['num_train']} images ({settings['calibration_epochs']} epoch(s), batch "
        f"{settings['batch_size']}). {scorer_choice_sentence(results)}The same weights run at every rate R (tokens "
        "removed after each of the 10 "
        "per-block modules, Last Layer Fusion) with the calibrated routers and with the training-free selectors; "
        f"top-1 accuracy on {settings['num_eval']} eval scenes, median [min, max] over seeds "
        f"{', '.join(seeds)}. {timing_sentence(results)}"
        + (" Cropr fine-tuned end to end, below, is evaluated on the same scenes." if has_fine_tuned else ""),
        "",
        *([not_measured, ""] if not_measured else []),
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
        *selector_table(results, fine_tuned=fine_tuned),
        "",
        *paired_table(results),
        "## Images/s at each rate",
        "",
        *throughput_table(results),
        "",
        "## Calibration",
        "",
        "| seed | images | steps | seconds | aux loss first -> last tenth | load average before / after |",
        "|---|---|---|---|---|---|",
    ]
    for seed, result in seeds.items():
        calib = result["calibration"]
        lines.append(
            f"| {seed} | {calib['images']} | {calib['steps']} | {calib['seconds']:.0f} | "
            f"{calib['first_loss']:.4f} -> {calib['last_loss']:.4f} | "
            f"{calib['load_average_before'][0]:.1f} / {calib['load_average_after'][0]:.1f} |"
        )
    if timing := results.get("calibration_timing"):
        lines += [
            "",
            f"Timed separately: the bare backbone (its pooled embedding as the target) at {timing['image_size']} px, "
            f"R={timing['pruning_rate']}, {timing['images']} images, {timing['epochs']:g} epoch(s) of batch "
            f"{timing['batch_size']}: {timing['steps']} steps in {timing['seconds']:.0f} s, aux loss "
            f"{timing['first_loss']:.4f} -> {timing['last_loss']:.4f} (`{timing['command']}`).",
        ]
    lines += ["", *fine_tuned_section(results), "## Findings", "", *findings(results), ""]
    lines += superseded_section(results)
    return "\n".join(lines).rstrip("\n") + "\n"


def findings(results: dict[str, Any]) -> list[str]:
    table = summary(results)
    rates = [rate for rate in table["cropr"] if rate != "0"]
    lines = []
    for baseline in ("random", "variance", "attention"):
        deltas = [100 * (table["cropr"][r]["median"] - table[baseline][r]["median"]) for r in rates]
        below = [r for r, delta in zip(rates, deltas, strict=True) if delta < 0]
        verdict = (
            " points; at or above it at every rate."
            if not below
            else f" points; below it at R={', '.join(below)}; {noise_verdict(results, baseline, below)}."
        )
        lines.append(
            f"- Calibrated Cropr minus {baseline}, median accuracy per pruned rate: "
            + ", ".join(f"R={r} {d:+.1f}" for r, d in zip(rates, deltas, strict=True))
            + verdict
        )
    if results.get("fine_tuned", {}).get("runs"):
        fixed = fine_tuned_table(results, shared_scenes(results))["fixed"]
        if fixed:
            lines.append(
                "- Cropr fine-tuned end to end (one checkpoint per rate) minus calibrated Cropr, median accuracy on "
                f"the same {shared_scenes(results)} scenes: "
                + ", ".join(
                    f"R={r} {100 * (row['median'] - table['cropr'][r]['median']):+.1f}" for r, row in fixed.items()
                )
                + " points."
            )
        if line := elastic_finding(results):
            lines.append(f"- {line}")
    seconds = [seed["calibration"]["seconds"] for seed in results["seeds"].values()]
    images = next(iter(results["seeds"].values()))["calibration"]["images"]
    lines.append(
        f"- Calibration on {images} images took {min(seconds) / 60:.1f} to {max(seconds) / 60:.1f} min at "
        f"{results['settings']['image_size']} px (target: at most 10 min on the 2-core CPU)."
    )
    if timing := results.get("calibration_timing"):
        verdict = "within" if timing["seconds"] <= 600 else "over"
        lines.append(
            f"- Calibration of the bare DINOv2-S/14 at {timing['image_size']} px on {timing['images']} images took "
            f"{timing['seconds'] / 60:.1f} min, {verdict} the 10-minute target (load average "
            f"{timing['environment']['load_average'][0]:.1f} at the start, {timing['load_average_after'][0]:.1f} at "
            "the end)."
        )
    return lines


def elastic_finding(results: dict[str, Any]) -> str | None:
    """One sentence: the elastic checkpoint against the fixed-rate ones, per rate, and whether it is within a point."""
    gaps = elastic_gaps(results)
    if not gaps:
        return None
    far = [rate for rate, gap in gaps.items() if gap["median"] < -0.01]
    num_eval = results["fine_tuned"]["recipe"]["budgets"][FINE_TUNE_TASK]["num_eval"]
    verdict = (
        "within 1 point or above at every rate"
        if not far
        else f"more than 1 point below at R={', '.join(far)} (target: within 1 point at every rate)"
    )
    return (
        f"One elastic checkpoint minus the checkpoint trained at each rate, median over seeds ({num_eval} eval "
        "scenes): "
        + ", ".join(f"R={rate} {100 * gap['median']:+.1f}" for rate, gap in gaps.items())
        + f" points; {verdict}."
    )


def main_page_section(results: dict[str, Any]) -> str:
    """This experiment's section of `docs/results.md`, between `MARKER_START` and `MARKER_END`."""
    return "\n".join(
        [
            MARKER_START,
            "## One model, many speeds (label-free calibration, elastic fine-tuning)",
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
    also reads the other experiments' results files there, when present)."""
    from experiments.results_page import SUMMARY_END, refresh_summary, replace_section

    plot(results, docs / "results_speed_dial.png")
    (docs / "results_speed_dial.md").write_text(markdown(results))
    main_page = docs / "results.md"
    text = main_page.read_text() if main_page.is_file() else ""
    main_page.write_text(replace_section(text, MARKER_START, MARKER_END, main_page_section(results), after=SUMMARY_END))
    refresh_summary(main_page, speed_dial=results)


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
    parser.add_argument(
        "--contrast-weights",
        type=parse_shares,
        default=list(CONTRAST_WEIGHTS),
        help="comma-separated shares of the contrast read-out that calibration compares (default: 0,0.5,1)",
    )
    parser.add_argument("--throughput-batch-size", type=int, default=16)
    parser.add_argument("--throughput-repeats", type=int, default=21)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=tuple(PARTS),
        default=list(PARTS),
        help="what to run, in this order: the frozen model (calibrated Cropr and the training-free selectors), "
        "Cropr fine-tuned end to end (one checkpoint per pruned rate and one elastic checkpoint, per seed), and the "
        "time of one calibration of the bare backbone at --timing-image-size",
    )
    parser.add_argument(
        "--timing-image-size",
        type=int,
        default=224,
        help="input size of the calibration that the calibration-time part times (on the bare backbone)",
    )
    parser.add_argument("--fine-tune-epochs", type=float, default=1.0)
    parser.add_argument(
        "--elastic-min-fraction",
        type=float,
        default=None,
        help="lowest pruning fraction of the elastic checkpoint's draws (default: lowest pruned rate / highest)",
    )
    parser.add_argument("--output", default="docs/results_speed_dial.json")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="write the docs from --output, run nothing")
    parser.add_argument("--retime", action="store_true", help=RETIME_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        render(json.loads(Path(args.output).read_text()), Path(args.docs))
        return 0
    if not Path(args.backbone).exists():
        sys.exit(f"speed_dial.py: error: backbone {args.backbone} not found; pass --backbone")
    if args.retime:
        run_retime(args)
        return 0
    if not pruned_rates(args.rates):
        sys.exit("speed_dial.py: error: --rates needs at least one rate above 0")
    if "fine-tuned" in args.parts and not 0.0 <= elastic_min_fraction(args) < 1.0:
        sys.exit(
            f"speed_dial.py: error: the elastic checkpoint's lowest pruning fraction is {elastic_min_fraction(args):g}"
            "; it must be in [0, 1): give two pruned --rates or --elastic-min-fraction"
        )
    for part in args.parts:
        PARTS[part](args)
    return 0


PARTS = {"frozen": run_frozen, "fine-tuned": run_fine_tuned, "calibration-time": run_calibration_timing}
