"""The `cropr` command line: inspect schedules, draw pruning heat-maps, write model cards, benchmark, convert.

```bash
cropr info vit-b16                      # schedule, token counts, GMACs, FLOP ceiling, parameters of a preset
cropr info path/to/checkpoint --json    # ... of a saved checkpoint (or a config JSON file), as JSON
cropr visualize path/to/checkpoint cat.jpg dog.jpg --output-dir heatmaps
cropr card path/to/checkpoint measurements.json
cropr benchmark --help                  # delegates to cropr.tools.benchmark
cropr calibrate path/to/checkpoint --images photos/ --output-dir calibrated   # label-free router training
cropr convert facebook/dinov2-small --task image-classification --num-labels 10 --output-dir dinov2-cropr
cropr demo path/to/checkpoint           # interactive page on http://127.0.0.1:7860 (needs `pip install "cropr[demo]"`)
```

Expected failures (missing file, bad JSON, wrong model type, unknown preset, invalid schedule) print one line,
`cropr: error: ...`, on stderr and exit with status 1; usage errors, which include option values refused before
anything loads (a negative count, an output path that is a file, a device this machine lacks), exit with status 2 as
argparse does.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from .conversion import CONVERSION_TASKS, from_backbone
from .models.cropr_vit import modeling_cropr_vit
from .models.cropr_vit.configuration_cropr_vit import (
    LEARNED_SELECTORS,
    POOLING_MODES,
    TOKEN_SELECTORS,
    CroprViTConfig,
)
from .models.cropr_vit.modeling_cropr_vit import CroprViTModel, CroprViTPreTrainedModel
from .presets import PRESETS, preset_config
from .tools.argtypes import (
    DefaultsHelpFormatter,
    bounded_int,
    load_id2label,
    output_dir,
    output_file,
    parse_image_size,
    parse_schedule,
)
from .tools.demo import DEFAULT_CHECKPOINT

PROG = "cropr"
MODEL_TYPE = CroprViTConfig.model_type
# Subcommands whose arguments belong to another module's own parser.
DELEGATED = {
    "benchmark": (
        "cropr.tools.benchmark",
        "main",
        "throughput of pruned vs unpruned models (see `cropr benchmark --help`)",
    ),
    "calibrate": (
        "cropr.calibration",
        "main",
        "train only the Cropr modules of a frozen model on its own predictions, without labels",
    ),
}


class CliError(Exception):
    """An expected failure, reported as one `cropr: error: ...` line."""


# ----------------------------------------------------------------------------------------------------------------------
# Loading configs and checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CliError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_model_type(config_dict: dict[str, Any], path: Path) -> None:
    model_type = config_dict.get("model_type")
    if model_type != MODEL_TYPE:
        raise CliError(f"{path} describes a {model_type!r} model, not a CroprViT ({MODEL_TYPE!r}) one")


def _model_class(config: CroprViTConfig) -> type[CroprViTPreTrainedModel]:
    """The task class named by `config.architectures` (the bare backbone when none is named)."""
    architectures = config.architectures or [CroprViTModel.__name__]
    model_class = getattr(modeling_cropr_vit, architectures[0], None)
    if not (isinstance(model_class, type) and issubclass(model_class, CroprViTPreTrainedModel)):
        raise CliError(f"unknown CroprViT architecture {architectures[0]!r} in the config")
    return model_class


def _checkpoint_config_path(checkpoint: Path) -> Path:
    if not checkpoint.exists():
        raise CliError(f"checkpoint folder {checkpoint} does not exist")
    if not checkpoint.is_dir():
        raise CliError(f"{checkpoint} is not a folder: pass the folder written by `save_pretrained`")
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise CliError(f"{checkpoint} has no config.json: pass the folder written by `save_pretrained`")
    return config_path


def load_checkpoint_config(checkpoint: str | Path) -> CroprViTConfig:
    """The config of a saved CroprViT checkpoint folder (checked to be one before transformers reads it)."""
    config_path = _checkpoint_config_path(Path(checkpoint))
    _check_model_type(_read_json(config_path), config_path)
    return CroprViTConfig.from_pretrained(checkpoint)


def load_checkpoint(checkpoint: str | Path) -> CroprViTPreTrainedModel:
    """Load a saved CroprViT checkpoint folder with the task class its config names, in eval mode."""
    config = load_checkpoint_config(checkpoint)
    return _model_class(config).from_pretrained(checkpoint, config=config).eval()


def resolve_config(source: str) -> tuple[CroprViTConfig, str]:
    """A config from a checkpoint folder, a config JSON file or a preset name, with a description of the source."""
    path = Path(source)
    if path.is_dir():
        return load_checkpoint_config(path), f"checkpoint {path}"
    if path.is_file():
        config_dict = _read_json(path)
        _check_model_type(config_dict, path)
        return CroprViTConfig.from_dict(config_dict), f"config {path}"
    if source in PRESETS:
        return preset_config(source), f"preset {source}"
    raise CliError(
        f"{source!r} is neither a checkpoint folder, a config JSON file nor a preset; presets: {', '.join(PRESETS)}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------------------------
def _apply_overrides(config: CroprViTConfig, args: argparse.Namespace) -> CroprViTConfig:
    overrides = {
        name: value
        for name in ("image_size", "pruning_rate", "token_selector", "last_layer_fusion")
        if (value := getattr(args, name)) is not None
    }
    if not overrides:
        return config
    # Rebuilding (rather than setting attributes) validates the new schedule against the new image size; a rate
    # replaces an explicit schedule, as it does in `from_pretrained`.
    updated = CroprViTConfig.from_dict(config.to_dict(), **overrides)
    if "pruning_rate" in overrides and updated.token_selector == "none":
        raise CliError("--pruning-rate has no effect with the token selector 'none' (nothing is pruned)")
    return updated


def config_summary(config: CroprViTConfig, source: str) -> dict[str, Any]:
    """Everything `cropr info` reports, as plain JSON-serialisable values."""
    from .tools.model_card import parameter_counts

    model_class = _model_class(config)
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    full, stripped = parameter_counts(model)
    rate_range = config.pruning_rate_range()
    return {
        "source": source,
        "architecture": model_class.__name__,
        "image_size": list(config.image_size_hw),
        "patch_size": list(config.patch_size_hw),
        "num_patches": config.num_patches,
        "use_cls_token": config.use_cls_token,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "token_selector": config.token_selector,
        "num_queries": config.num_queries,
        "last_layer_fusion": config.last_layer_fusion,
        "pruning_blocks": config.pruning_blocks,
        "effective_pruning_schedule": config.effective_pruning_schedule,
        "token_counts": config.token_counts(),
        "gmacs_unpruned": config.flops(pruned=False) / 1e9,
        "gmacs_pruned": config.flops(pruned=True) / 1e9,
        "flop_ceiling": config.flop_ceiling(),
        "pruning_rate": None if config.pruning_schedule is not None else config.pruning_rate,
        "pruning_rate_range": None if rate_range is None else list(rate_range),
        "nearest_pruning_rate": config.nearest_pruning_rate(),
        "blocks_lacking_rate_modules": config.blocks_lacking_rate_modules(),
        "parameters_full": full,
        "parameters_stripped": stripped,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable `cropr info` report."""
    height, width = summary["image_size"]
    patch_h, patch_w = summary["patch_size"]
    cls = " + CLS" if summary["use_cls_token"] else ""
    blocks = ", ".join(map(str, summary["pruning_blocks"])) or "none"
    rows = [
        ("source", summary["source"]),
        ("architecture", summary["architecture"]),
        (
            "backbone",
            f"{summary['num_hidden_layers']} blocks, width {summary['hidden_size']}, "
            f"{summary['num_attention_heads']} heads, patch {patch_h}x{patch_w}, input {height}x{width} "
            f"({summary['num_patches']} patches{cls})",
        ),
        ("token selector", f"{summary['token_selector']} (queries per module: {summary['num_queries']})"),
        ("last layer fusion", "yes" if summary["last_layer_fusion"] else "no"),
        ("pruning after blocks", f"{blocks} (0-based)"),
        ("tokens per block", " ".join(map(str, summary["token_counts"]))),
        ("dropped after block", " ".join(map(str, summary["effective_pruning_schedule"]))),
        ("GMACs (backbone)", f"unpruned {summary['gmacs_unpruned']:.4g}, pruned {summary['gmacs_pruned']:.4g}"),
        ("FLOP ceiling", f"{summary['flop_ceiling']:.2f}x"),
        ("pruning rates", _rates_text(summary)),
        (
            "parameters",
            f"full {summary['parameters_full']:,}, stripped {summary['parameters_stripped']:,} "
            "(without queries, aggregators, auxiliary heads)",
        ),
    ]
    width_ = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width_}}  {value}" for name, value in rows)


def _rates_text(summary: dict[str, Any]) -> str:
    """Which per-block rates the model runs (the speed dial), for `format_summary`."""
    if summary["pruning_rate_range"] is None:
        lacking = summary["blocks_lacking_rate_modules"]
        return "none: it runs this schedule only" + (f" (no Cropr module after blocks {lacking})" if lacking else "")
    low, high = summary["pruning_rate_range"]
    text = f"{low}..{high} (from_pretrained(path, pruning_rate=R))"
    if summary["pruning_rate"] is None:  # an explicit schedule
        text += f"; this schedule removes about as many tokens as R={summary['nearest_pruning_rate']}"
    return text


def run_info(args: argparse.Namespace) -> int:
    config, source = resolve_config(args.source)
    summary = config_summary(_apply_overrides(config, args), source)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# visualize
# ----------------------------------------------------------------------------------------------------------------------
def run_visualize(args: argparse.Namespace) -> int:
    from PIL import Image
    from transformers import AutoImageProcessor

    from .tools.visualization import MAX_PANEL_SIDE, panel_size, visualize_pruning

    if args.panel_height > MAX_PANEL_SIDE:
        raise CliError(f"--panel-height {args.panel_height} is above the limit of {MAX_PANEL_SIDE} pixels")
    images = [Path(image) for image in args.images]
    notes = []
    for image in images:  # every image readable before the slower model loading
        if not image.is_file():
            raise CliError(f"image {image} does not exist")
        try:
            with Image.open(image) as opened:  # reads only the header; raises for non-images
                size = opened.size
        except Image.DecompressionBombError as error:
            raise CliError(f"image {image} is too large: {error}") from None
        shown = panel_size(size, args.panel_height)
        if shown[1] < args.panel_height:
            notes.append(
                f"{PROG}: note: {image} ({size[0]}x{size[1]}) is drawn {shown[0]}x{shown[1]}: panels are at most "
                f"{MAX_PANEL_SIDE} pixels wide"
            )
    outputs = [args.output_dir / f"{image.stem}.pruning.png" for image in images]
    if len(set(outputs)) != len(outputs):
        raise CliError("two images share a file name; visualize them in separate calls or rename them")
    load_checkpoint_config(args.checkpoint)  # a CroprViT checkpoint? (before the slower weight loading)
    if not (args.checkpoint / "preprocessor_config.json").is_file():
        raise CliError(
            f"{args.checkpoint} has no preprocessor_config.json: save the image processor next to the model "
            "(`image_processor.save_pretrained(folder)`)"
        )
    model = load_checkpoint(args.checkpoint)
    image_processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    for note in notes:
        print(note, file=sys.stderr)
    for image, output in zip(images, outputs, strict=True):
        print(visualize_pruning(model, image_processor, image, output, panel_height=args.panel_height))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# card
# ----------------------------------------------------------------------------------------------------------------------
def run_card(args: argparse.Namespace) -> int:
    from .tools.model_card import load_measurements, write_model_card

    if not args.measurements.is_file():
        problem = "is a folder" if args.measurements.is_dir() else "does not exist"
        raise CliError(f"measurements file {args.measurements} {problem}")
    measurements = load_measurements(args.measurements)
    output = args.output or args.checkpoint / "README.md"
    if output.exists() and not args.overwrite:
        raise CliError(f"{output} exists; pass --overwrite to replace it")
    model = load_checkpoint(args.checkpoint)
    print(write_model_card(model, measurements, output, default_name=args.checkpoint.resolve().name))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# benchmark / convert
# ----------------------------------------------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    """`cropr convert`: `from_backbone` with the options given, saved with its image processor."""
    overrides = {
        name: getattr(args, name)
        for name in (
            "token_selector",
            "pruning_rate",
            "pruning_schedule",
            "last_layer_fusion",
            "pooling",
            "aux_loss_weight",
            "drop_path_rate",
            "interpolate_pos_encoding",
        )
        if getattr(args, name) is not None
    }
    model, image_processor = from_backbone(
        args.source,
        args.task,
        image_size=args.image_size,
        num_labels=args.num_labels,
        id2label=args.id2label,
        from_pretrained_kwargs={"revision": args.revision} if args.revision else None,
        keep_head=args.keep_head,
        **overrides,
    )
    model.save_pretrained(args.output_dir)
    image_processor.save_pretrained(args.output_dir)

    config = model.config
    print(f"Saved {type(model).__name__} and {type(image_processor).__name__} to {args.output_dir}")
    print(
        f"  image size {config.image_size_hw}, patch {config.patch_size_hw}, token selector {config.token_selector!r}"
    )
    if config.pruning_blocks:
        print(f"  tokens per block {config.token_counts()}, FLOP ceiling {config.flop_ceiling():.2f}x")
    if not config.classifier_norm:
        print(f"  the source's classifier is kept: {config.num_labels} labels, pooling {config.pooling!r}")
    if config.pruning_blocks and config.token_selector in LEARNED_SELECTORS:
        # Runnable as saved (a kept classifier even predicts), but its routers would keep arbitrary tokens.
        print(
            "  its Cropr modules are untrained: calibrate them (`cropr calibrate "
            f"{args.output_dir} --images DIR --output-dir ...`, no labels needed) or fine-tune before use"
        )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    """`cropr demo`: serve the interactive page for a checkpoint (default: the one `make main` saves)."""
    from .tools.demo import DemoError

    if importlib.util.find_spec("gradio") is None:
        raise CliError('`cropr demo` needs Gradio, an optional dependency: pip install "cropr[demo]"')
    if args.checkpoint is None and not Path(DEFAULT_CHECKPOINT).is_dir():
        raise CliError(
            f"there is no model in {DEFAULT_CHECKPOINT} yet: `make main` trains one and saves it there; or pass a "
            "checkpoint folder or Hub id: cropr demo CHECKPOINT"
        )
    from .tools.demo_app import launch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        launch(args.checkpoint or DEFAULT_CHECKPOINT, port=args.port)
    except DemoError as error:
        raise CliError(str(error)) from None
    return 0


def run_delegated(command: str, argv: list[str]) -> int:
    """Hand `argv` to the `main(argv)` of the module that owns the subcommand, imported only now."""
    module_name, function_name, _ = DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise CliError(f"`cropr {command}` is unavailable: this installation has no {module_name} module") from None
    entry_point = getattr(module, function_name, None)
    if not callable(entry_point):
        raise CliError(f"`cropr {command}` is unavailable: {module_name} has no {function_name}(argv) entry point")
    try:
        return entry_point(argv)
    except SystemExit as exit_:  # the delegate's argparse (`--help`, usage errors)
        return exit_.code if isinstance(exit_.code, int) else 1
    except (ValueError, OSError) as error:  # expected failures: bad source, unsupported architecture, missing file
        raise CliError(str(error).splitlines()[0]) from None


# ----------------------------------------------------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Token Cropr Vision Transformers: tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="schedule, token counts, GMACs, FLOP ceiling, pruning rates and parameters of a model",
        description="Report the pruning schedule, the tokens each block sees, analytic GMACs (unpruned and pruned), "
        "the FLOP ceiling, the pruning rates its Cropr modules run and the parameter counts (full and stripped) of a "
        "checkpoint, a config or a preset.",
    )
    info.add_argument("source", help=f"checkpoint folder, config JSON file, or preset name ({', '.join(PRESETS)})")
    info.add_argument("--image-size", type=parse_image_size, help="override the input size: 224 or 224x320")
    info.add_argument("--pruning-rate", type=int, help="override the tokens removed after every block")
    info.add_argument("--token-selector", choices=TOKEN_SELECTORS, help="override the token selector")
    info.add_argument(
        "--last-layer-fusion", action=argparse.BooleanOptionalAction, default=None, help="override Last Layer Fusion"
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(handler=run_info)

    visualize = commands.add_parser(
        "visualize",
        help="draw which block dropped each patch over the image (PNG)",
        description="For each image, write OUTPUT_DIR/<image name>.pruning.png: the image tinted by the block after "
        "which each patch was dropped (kept-to-the-end patches outlined); segmentation models add the predicted mask.",
    )
    visualize.add_argument("checkpoint", type=Path, help="checkpoint folder with its preprocessor_config.json")
    visualize.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    visualize.add_argument("--output-dir", type=output_dir, default=Path("."), help="folder for the PNGs (default: .)")
    visualize.add_argument(
        "--panel-height",
        type=bounded_int(1),
        default=384,
        help="height of each panel in pixels, at most 4096; an image too wide for it is drawn 4096 pixels wide",
    )
    visualize.set_defaults(handler=run_visualize)

    card = commands.add_parser(
        "card",
        help="write a checkpoint's README.md model card from measurements",
        description="Write a Hub model card for a checkpoint. Architecture numbers are computed from the checkpoint; "
        "measured numbers come only from MEASUREMENTS (JSON, schema in `cropr.tools.model_card`); "
        "absent measurements are written as 'not measured'.",
    )
    card.add_argument("checkpoint", type=Path, help="checkpoint folder (classification or segmentation model)")
    card.add_argument("measurements", type=Path, help="measurements JSON file")
    card.add_argument("--output", type=output_file, help="where to write the card (default: CHECKPOINT/README.md)")
    card.add_argument("--overwrite", action="store_true", help="replace an existing card")
    card.set_defaults(handler=run_card)

    convert = commands.add_parser(
        "convert",
        help="build a CroprViT checkpoint from a pretrained backbone (ViT, DeiT, DINOv2, DINOv3, CLIP, SigLIP)",
        description="Build a CroprViT model from a pretrained ViT, DeiT, DINOv2 (with registers), DINOv3, CLIP or "
        "SigLIP checkpoint (Hub id or local folder) and save it with its image processor.",
        formatter_class=DefaultsHelpFormatter,
    )
    convert.add_argument("source", help="Hub id (e.g. facebook/dinov2-small) or local checkpoint folder.")
    convert.add_argument(
        "--task", choices=list(CONVERSION_TASKS), default="image-classification", help="Head of the converted model."
    )
    convert.add_argument(
        "--output-dir", type=output_dir, required=True, help="Folder for the model and image processor."
    )
    convert.add_argument(
        "--image-size", type=parse_image_size, help="Resolution of the converted model (default: the source's)."
    )
    labels = convert.add_argument_group(
        "labels (one is required for a new classification or segmentation head; a source's classifier is kept "
        "without them, or with the source's labels)"
    )
    labels.add_argument("--num-labels", type=bounded_int(1))
    labels.add_argument("--id2label", type=load_id2label, help="JSON object or JSON file mapping ids to names.")
    labels.add_argument(
        "--keep-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Keep the source's image classifier (default: when it has one and the labels fit; --keep-head fails "
        "otherwise, --no-keep-head always builds a new head).",
    )

    pruning = convert.add_argument_group("pruning (CroprViTConfig fields; defaults are the config's)")
    pruning.add_argument("--token-selector", choices=TOKEN_SELECTORS)
    pruning.add_argument(
        "--pruning-rate", type=bounded_int(0), help="Tokens removed after every block (per-block schedule)."
    )
    pruning.add_argument("--pruning-schedule", type=parse_schedule, help="Tokens removed after each block: 0,16,...")
    pruning.add_argument("--last-layer-fusion", action=argparse.BooleanOptionalAction, default=None)
    pruning.add_argument("--pooling", choices=POOLING_MODES)
    pruning.add_argument("--aux-loss-weight", type=float)
    pruning.add_argument("--drop-path-rate", type=float)
    pruning.add_argument(
        "--interpolate-pos-encoding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Default of the forward argument (default: on for DINOv2 and DINOv3, off for ViT and DeiT).",
    )
    convert.add_argument("--revision", help="Revision of a Hub source.")
    convert.set_defaults(handler=run_convert)

    demo = commands.add_parser(
        "demo",
        help="interactive web page: pruning heat-map, predictions and latency at any pruning rate",
        description="Start a local web page (Gradio, on 127.0.0.1) to upload images or pick examples and compare a "
        "CroprViT with pruning off and on at a pruning rate you choose: predictions, the heat-map of cropped "
        'patches, tokens per block and latency measured on this machine. Needs `pip install "cropr[demo]"`.',
    )
    demo.add_argument(
        "checkpoint",
        nargs="?",
        help=f"checkpoint folder or Hub id of a CroprViT task model (default: {DEFAULT_CHECKPOINT}, where `make main` "
        "saves its model)",
    )
    demo.add_argument("--port", type=bounded_int(1, 65535), help="port on 127.0.0.1 (default: 7860 or the next free)")
    demo.add_argument(
        "--threads",
        type=bounded_int(1),
        help="CPU threads for the models (default: torch's, one per core); 1 keeps latency steady on a busy machine",
    )
    demo.set_defaults(handler=run_demo)

    for command, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(command, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `cropr` command line; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return run_delegated(argv[0], argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 2
        return args.handler(args)
    except (CliError, OSError, ValueError, StrictDataclassError) as error:  # the last: a config field's type
        message = " ".join(str(error).split())  # one line, even for multi-line library messages
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
