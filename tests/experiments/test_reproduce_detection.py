"""The object detection comparison's report: rendered from its JSON, spliced into results.md, kept on regeneration."""

from experiments.reproduce_detection import (
    BEGIN,
    END,
    build_parser,
    load_results,
    recipe,
    render_section,
    splice_section,
    train_argv,
)

ENVIRONMENT = {
    "cpu_model": "test CPU",
    "cpu_cores_available": 2,
    "load_average": [1.0, 1.0, 1.0],
    "torch": "2",
    "transformers": "5",
}
RECIPE = {
    "backbone": "dinov2",
    "canvas_size": 112,
    "num_train": 8,
    "num_eval": 4,
    "max_steps": 2,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "backbone_learning_rate": 1e-5,
    "frozen_backbone_blocks": 10,
    "num_object_queries": 10,
    "decoder_layers": 3,
    "auxiliary_decoding_losses": False,
    "throughput_batch_size": 4,
}


def run(selector: str, seed: int, box_map: float, speed: float) -> dict:
    return {
        "selector": selector,
        "seed": seed,
        "map": box_map,
        "map_50": 2 * box_map,
        "map_75": box_map,
        "mar_100": box_map,
        "map_pruning_off": box_map,
        "model_images_per_second": 10.0 * speed,
        "model_images_per_second_pruning_off": 10.0,
        "encoder_images_per_second": 20.0 * speed,
        "encoder_images_per_second_pruning_off": 20.0,
        "flop_ceiling": 1.58,
        "seconds": 3.0,
    }


def results() -> dict:
    runs = [
        run("none", 0, 0.30, 1.0),
        run("cropr", 0, 0.25, 1.5),
        run("cropr", 1, 0.21, 1.6),
        run("random", 0, 0.1, 1.5),
    ]
    return {
        "recipe": RECIPE,
        "runs": runs,
        "seeds": [0, 1],
        "command": "python x --backbone /data/models/dinov2-small",
        "environment": ENVIRONMENT,
        "notes": ["Too few steps."],
    }


def test_section_reports_medians_speedups_and_missing_seeds():
    section = render_section(results())
    assert "| cropr | 2 | 23.0 [21.0, 25.0] | 46.0 | 25.0, 21.0 | 15.5 | 1.55x | 31.0 | 1.55x | 3 |" in section
    assert "| none | 1 | 30.0 [30.0, 30.0] |" in section
    assert "Not run within the budget: none: seeds [1]; random: seeds [1]." in section
    assert "FLOP ceiling of the pruned schedule: 1.58x" in section
    assert "`python x --backbone dinov2-small`" in section and "/data/models" not in section
    assert "- Too few steps.\n" in section
    assert "- Too few steps.\n" in section


def test_section_replaces_its_earlier_version_and_keeps_the_rest(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\nclassification tables\n")
    splice_section(path, results())
    splice_section(path, results())
    text = path.read_text()
    assert text.startswith("# Results\n\nclassification tables\n\n" + BEGIN)
    assert text.count(BEGIN) == 1 and text.rstrip().endswith(END)


def test_recipe_options_reach_the_training_run_and_the_report(tmp_path):
    args = build_parser().parse_args(
        [
            "--backbone-learning-rate",
            "1e-5",
            "--num-queries",
            "6",
            "--decoder-layers",
            "2",
            "--auxiliary-decoding-losses",
        ]
    )
    argv = " ".join(train_argv(args, "cropr", 0, tmp_path))
    for option in (
        "--backbone_learning_rate 1e-05",
        "--num_object_queries 6",
        "--decoder_layers 2",
        "--auxiliary_decoding_losses true",
    ):
        assert option in argv
    section = render_section({**results(), "recipe": recipe(args)})
    assert (
        "6 object queries, width 128, 1 encoder and 2 decoder layers, a detection loss on every decoder layer"
        in section
    )
    assert "(1e-05 for the backbone's pretrained weights)" in section


def test_stored_command_names_the_backbone_by_its_folder(tmp_path):
    argv = ["--backbone", "/data/models/dinov2-small", "--seeds", "0"]
    stored = load_results(tmp_path / "results.json", build_parser().parse_args(argv), argv)
    assert stored["command"] == "python scripts/reproduce_detection.py --backbone dinov2-small --seeds 0"
