"""The interactive demo page (Gradio): pick an image and a pruning rate, see what a CroprViT keeps and what it saves.

`cropr demo [CHECKPOINT]` runs `launch`. Gradio is an optional dependency (`pip install "cropr[demo]"`); this module
imports it, `cropr.tools.demo` (what the page computes) does not. Everything the app writes (uploads, rendered images)
goes into one temporary folder, removed when the app stops.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import transformers

from .demo import (
    DEFAULT_CHECKPOINT,
    DemoCheckpoint,
    DemoError,
    compare,
    example_image,
    example_names,
    latency_summary,
    load_image,
    mask_annotations,
    tokens_table,
)

TIMED_CALLS = 5
"""Timed calls of each model per interaction (their median is shown)."""
MAX_UPLOAD = "50mb"
CHECKPOINT_CACHE_SIZE = 2
MASK_HEIGHT = 360

INTRO = """# Token Cropr: see the pruning
A Cropr module after each block scores the tokens and sets the lowest-scoring ones aside; later blocks see fewer
tokens. Upload an image or pick an example, then move the pruning rate: the heat-map shows after which block each patch
was cropped (patches kept to the end are outlined), next to the predictions and the latency with pruning off and on."""


def launch(checkpoint: str, port: int | None = None) -> None:
    """Serve the demo for `checkpoint` (folder or Hub id) on 127.0.0.1 until interrupted.

    Raises:
        DemoError: `checkpoint` does not load (checked before Gradio is imported or anything is written).
    """
    first = DemoCheckpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="cropr-demo-") as workdir:
        # Gradio reads its upload folder from the environment, some of it at import time; it also loads matplotlib,
        # which would otherwise write a font cache into the home folder.
        os.environ["GRADIO_TEMP_DIR"] = workdir
        os.environ.setdefault("MPLCONFIGDIR", workdir)
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        # Loading a model at another pruning rate reports the routers it leaves unused and draws progress bars; the
        # page is where this app reports, so keep its console to errors.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        app = build_app(first, workdir)
        # A `kill` ends the app as Ctrl+C does, so the temporary folder is removed either way.
        signal.signal(signal.SIGTERM, _interrupt)
        app.launch(server_name="127.0.0.1", server_port=port, max_file_size=MAX_UPLOAD, show_error=False)


def slider_settings(checkpoint: DemoCheckpoint) -> dict[str, Any]:
    """Range, value and label of the pruning-rate slider for `checkpoint` (fixed when it has no rate to change)."""
    allowed, start = checkpoint.config.pruning_rate_range(), checkpoint.config.nearest_pruning_rate()
    if allowed is None:
        return dict(minimum=0, maximum=1, value=0, interactive=False, label="Pruning rate (fixed schedule)")
    if checkpoint.trained_rate is not None:
        saved = f"trained with {checkpoint.trained_rate}"
    else:
        saved = f"saved with a per-block schedule removing about as many tokens as R={start}"
    return dict(
        minimum=allowed[0],
        maximum=allowed[1],
        value=start,
        interactive=True,
        label=f"Pruning rate R: tokens cropped after each block ({saved})",
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def build_app(first: DemoCheckpoint, workdir: str | Path) -> Any:
    """The demo as a `gradio.Blocks`, showing `first` until the page loads another checkpoint; rendered images are
    written into `workdir`."""
    import gradio as gr

    checkpoints: OrderedDict[str, DemoCheckpoint] = OrderedDict({first.source: first})

    def open_checkpoint(source: str) -> DemoCheckpoint:
        source = source.strip() or DEFAULT_CHECKPOINT
        if source not in checkpoints:
            checkpoints[source] = DemoCheckpoint(source)
            if len(checkpoints) > CHECKPOINT_CACHE_SIZE:
                checkpoints.popitem(last=False)
        checkpoints.move_to_end(source)
        return checkpoints[source]

    def on_load(source: str):
        """Outputs: current, info, rate, examples, upload, image source, then those of `on_run`."""
        try:
            loaded = open_checkpoint(source)
        except DemoError as error:  # the page goes on with the checkpoint it had
            return [gr.update()] * 12 + [f"⚠️ {error}"]
        segmentation = loaded.task == "segmentation"
        labels = gr.update(visible=not segmentation, value=None)
        masks = gr.update(visible=segmentation, value=None)
        return [
            loaded.source,
            loaded.describe(),
            gr.update(**slider_settings(loaded)),
            gr.update(choices=example_names(loaded), value=None),
            None,
            None,
            None,
            labels,
            labels,
            masks,
            masks,
            "",
            "Upload an image or pick an example.",
        ]

    # Picking an image in one place clears the other, so that picking the same example or file again counts.
    def on_upload(path: str | None):
        return ("upload", path) if path else None, None

    def on_example(name: str | None):
        return ("example", name) if name else None, None

    def on_run(source: str, image_source: tuple[str, str] | None, rate: float):
        if image_source is None:
            return [gr.update()] * 6 + ["Upload an image or pick an example."]
        try:
            loaded = open_checkpoint(source)
            kind, value = image_source
            image = load_image(value) if kind == "upload" else example_image(value, loaded)
            comparison = compare(
                loaded,
                image,
                None if loaded.config.pruning_rate_range() is None else int(rate),
                workdir,
                repeats=TIMED_CALLS,
            )
        except DemoError as error:  # no result is better than the last image's next to the message
            return [None] * 5 + ["", f"⚠️ {error}"]
        on_label = "Pruning on" + (f" (R = {comparison.rate})" if comparison.rate is not None else "")
        if loaded.task == "segmentation":
            id2label = loaded.config.id2label
            predictions = [
                gr.update(),
                gr.update(),
                gr.update(value=(comparison.image, mask_annotations(comparison.off, id2label))),
                gr.update(value=(comparison.image, mask_annotations(comparison.on, id2label)), label=on_label),
            ]
        else:
            predictions = [
                gr.update(value=comparison.off),
                gr.update(value=comparison.on, label=f"{on_label}: top {len(comparison.on)}"),
                gr.update(),
                gr.update(),
            ]
        return [
            comparison.heatmap,
            *predictions,
            latency_summary(comparison, TIMED_CALLS) + "\n\n" + tokens_table(comparison),
            "",
        ]

    with gr.Blocks(title="Token Cropr demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO)
        current = gr.State(first.source)
        image_source = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    checkpoint_box = gr.Textbox(
                        value=first.source, label="Checkpoint (folder or Hub id)", elem_id="checkpoint", scale=4
                    )
                    load_button = gr.Button("Load", elem_id="load", scale=1)
                info = gr.Markdown(first.describe(), elem_id="info")
                upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
                examples = gr.Dropdown(
                    choices=example_names(first), value=None, label="... or pick a built-in example", elem_id="example"
                )
                rate = gr.Slider(step=1, elem_id="rate", **slider_settings(first))
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                heatmap = gr.Image(
                    label="Which patches were cropped after which block",
                    type="pil",
                    interactive=False,
                    elem_id="heatmap",
                    format="png",
                )
                report = gr.Markdown(elem_id="report")
        segmentation = first.task == "segmentation"
        with gr.Row():
            off_label = gr.Label(
                num_top_classes=5, label="Pruning off: top 5", visible=not segmentation, elem_id="off-label"
            )
            on_label = gr.Label(num_top_classes=5, label="Pruning on", visible=not segmentation, elem_id="on-label")
            off_mask = gr.AnnotatedImage(
                label="Pruning off", visible=segmentation, elem_id="off-mask", height=MASK_HEIGHT
            )
            on_mask = gr.AnnotatedImage(label="Pruning on", visible=segmentation, elem_id="on-mask", height=MASK_HEIGHT)

        run_inputs = [current, image_source, rate]
        run_outputs = [heatmap, off_label, on_label, off_mask, on_mask, report, status]
        load_button.click(on_load, checkpoint_box, [current, info, rate, examples, upload, image_source, *run_outputs])
        upload.upload(on_upload, upload, [image_source, examples]).then(on_run, run_inputs, run_outputs)
        examples.input(on_example, examples, [image_source, upload]).then(on_run, run_inputs, run_outputs)
        # `change` rather than `release`: keyboard moves of the slider count too; while a run is pending, only the
        # latest value runs next.
        rate.change(on_run, run_inputs, run_outputs)
    return app


__all__ = ["TIMED_CALLS", "build_app", "launch"]
