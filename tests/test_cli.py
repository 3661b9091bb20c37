"""The `cropr` command line: help, info, visualize, card, delegation, and one-line errors with exit codes."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, build_tiny, tiny_config_kwargs
from PIL import Image

from cropr import CroprViTConfig, CroprViTForImageClassification
from cropr.cli import main
from cropr.tools.visualization import LEGEND_HEIGHT, MARGIN, MAX_PANEL_SIDE

MEASUREMENTS = {
    "schema_version": 1,
    "base_model": {"id": "google/vit-base-patch16-224", "license": "apache-2.0"},
    "dataset": {"id": "imagenet-1k"},
    "metrics": [{"type": "accuracy", "value": 77.125}],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-cropr")
    model = CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs()))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def assert_one_line_error(capsys, argv, fragment):
    """`main(argv)` fails with status 1 and one `cropr: error:` line holding `fragment` on stderr."""
    capsys.readouterr()  # drop what earlier steps printed (e.g. progress bars of save_pretrained)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("cropr: error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


def assert_usage_error(capsys, argv, fragment):
    """`main(argv)` fails with argparse's status 2, its last stderr line an `error:` line holding `fragment`."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err.splitlines()[-1] and fragment in err.splitlines()[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["visualize", "--help"], ["card", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("usage: cropr")


def test_visualize_help_names_the_panel_limit(capsys):
    assert main(["visualize", "--help"]) == 0
    assert f"at most {MAX_PANEL_SIDE}" in " ".join(capsys.readouterr().out.split())


def test_usage_error_exits_2(capsys):
    assert main(["info"]) == 2
    assert "usage: cropr info" in capsys.readouterr().err


def test_info_preset(capsys):
    assert main(["info", "vit-b16"]) == 0
    out = capsys.readouterr().out
    assert "197 180 164 148" in out
    assert "unpruned 17.56" in out
    assert "FLOP ceiling" in out and "1.61x" in out


def test_info_preset_with_override_as_json(capsys):
    assert main(["info", "vit-b16", "--pruning-rate", "8", "--no-last-layer-fusion", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["token_counts"][:3] == [197, 188, 180]
    assert summary["last_layer_fusion"] is False
    assert summary["parameters_stripped"] < summary["parameters_full"]


def test_info_checkpoint_and_config_file(checkpoint, capsys):
    model = CroprViTForImageClassification.from_pretrained(checkpoint)
    assert main(["info", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "CroprViTForImageClassification"
    assert summary["parameters_full"] == sum(p.numel() for p in model.parameters())
    assert summary["token_counts"] == model.config.token_counts()
    assert main(["info", str(checkpoint / "config.json")]) == 0
    assert "17 13 10 17" in capsys.readouterr().out


def test_info_reports_the_rates_a_checkpoint_runs(tmp_path, capsys):
    checkpoint = tmp_path / "schedule"
    build_tiny("classification", pruning_schedule=[3, 4, 0, 0]).strip_training_modules().save_pretrained(checkpoint)
    assert main(["info", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pruning_rate"], summary["pruning_rate_range"], summary["nearest_pruning_rate"]) == (
        None,
        [0, 7],
        3,
    )
    assert main(["info", str(checkpoint)]) == 0
    assert "0..7 (from_pretrained(path, pruning_rate=R)); this schedule removes about as many tokens as R=3" in (
        capsys.readouterr().out
    )
    build_tiny("classification", pruning_schedule=[3, 0, 0, 0]).save_pretrained(tmp_path / "fixed")
    assert main(["info", str(tmp_path / "fixed")]) == 0
    assert "none: it runs this schedule only (no Cropr module after blocks [1])" in capsys.readouterr().out


def test_visualize_end_to_end(checkpoint, image_path, tmp_path, capsys):
    out_dir = tmp_path / "maps"
    argv = ["visualize", str(checkpoint), str(image_path), "--output-dir", str(out_dir), "--panel-height", "80"]
    assert main(argv) == 0
    png = out_dir / "photo.pruning.png"
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as image:
        assert image.size == (120 + 2 * MARGIN, 80 + LEGEND_HEIGHT + 3 * MARGIN)


def test_visualize_refuses_a_panel_height_above_the_limit(checkpoint, image_path, tmp_path, capsys):
    argv = ["visualize", str(checkpoint), str(image_path), "--output-dir", str(tmp_path)]
    assert_one_line_error(capsys, [*argv, "--panel-height", str(MAX_PANEL_SIDE + 1)], f"limit of {MAX_PANEL_SIDE}")
    assert not list(tmp_path.iterdir())
    assert_usage_error(capsys, [*argv, "--panel-height", "0"], "--panel-height: expected an integer >= 1")


def test_visualize_draws_a_very_wide_image_at_the_width_limit_with_a_note(checkpoint, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (600, 3), (200, 10, 10)).save(wide)
    assert main(["visualize", str(checkpoint), str(wide), "--output-dir", str(tmp_path), "--panel-height", "40"]) == 0
    height = round(3 * MAX_PANEL_SIDE / 600)
    assert f"cropr: note: {wide} (600x3) is drawn {MAX_PANEL_SIDE}x{height}" in capsys.readouterr().err
    with Image.open(tmp_path / "wide.pruning.png") as png:
        assert png.size == (MAX_PANEL_SIDE + 2 * MARGIN, height + LEGEND_HEIGHT + 3 * MARGIN)


def test_visualize_refuses_images_beyond_the_pillow_size_limit(checkpoint, image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses images of more than twice this
    argv = ["visualize", str(checkpoint), str(image_path), "--output-dir", str(tmp_path)]
    assert_one_line_error(capsys, argv, f"image {image_path} is too large: ")


def test_visualize_scales_16_bit_images_instead_of_clipping(checkpoint, tmp_path, capsys):
    levels = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint16)
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(levels * 257).save(tmp_path / "sixteen.png")  # the same picture over the full 16-bit range
    with Image.open(tmp_path / "sixteen.png") as opened:
        assert opened.mode == "I;16"
    images = [str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")]
    assert main(["visualize", str(checkpoint), *images, "--output-dir", str(tmp_path / "maps")]) == 0
    with (
        Image.open(tmp_path / "maps" / "eight.pruning.png") as eight,
        Image.open(tmp_path / "maps" / "sixteen.pruning.png") as sixteen,
    ):
        np.testing.assert_array_equal(np.asarray(sixteen), np.asarray(eight))


def test_card_end_to_end(checkpoint, tmp_path, capsys):
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps(MEASUREMENTS))
    output = tmp_path / "README.md"
    assert main(["card", str(checkpoint), str(measurements), "--output", str(output)]) == 0
    card = output.read_text()
    assert "| accuracy | 77.125 | not measured |" in card and "Speed: not measured." in card
    argv = ["card", str(checkpoint), str(measurements), "--output", str(output)]
    assert_one_line_error(capsys, argv, "--overwrite")
    assert main([*argv, "--overwrite"]) == 0


def test_error_paths(checkpoint, image_path, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    vit_folder = tmp_path / "vit"
    vit_folder.mkdir()
    (vit_folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    no_license = tmp_path / "no_license.json"
    no_license.write_text(json.dumps({**MEASUREMENTS, "base_model": {"id": "google/vit-base-patch16-224"}}))
    no_processor = tmp_path / "no-processor"
    CroprViTForImageClassification(CroprViTConfig(**tiny_config_kwargs())).save_pretrained(no_processor)
    cases = [
        (["info", "vit-z99"], "neither a checkpoint folder"),
        (["info", str(bad_json)], "is not valid JSON"),
        (["info", str(vit_folder)], "'vit' model, not a CroprViT"),
        (["info", "vit-b16", "--pruning-rate", "99"], "pruning schedule removes"),
        (["visualize", str(vit_folder), str(image_path)], "'vit' model, not a CroprViT"),
        (["visualize", str(checkpoint), str(tmp_path / "missing.png")], "does not exist"),
        (["visualize", str(tmp_path / "nowhere"), str(image_path)], "does not exist"),
        (["visualize", str(no_processor), str(image_path)], "no preprocessor_config.json"),
        (["visualize", str(checkpoint), str(bad_json), "--output-dir", str(tmp_path)], "cannot identify image"),
        (["card", str(checkpoint), str(tmp_path / "missing.json")], "does not exist"),
        (["card", str(checkpoint), str(bad_json)], "is not valid JSON"),
        (["card", str(checkpoint), str(no_license), "--output", str(tmp_path / "c.md")], "`base_model.license`"),
    ]
    for argv, fragment in cases:
        assert_one_line_error(capsys, argv, fragment)


def test_bad_counts_devices_and_output_paths_fail_before_any_work(
    checkpoint, image_path, tmp_path, capsys, monkeypatch
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps(MEASUREMENTS))
    # As on a machine without a GPU, whatever this one has.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    # Quick settings, so that an option accepted by mistake costs seconds, not minutes.
    benchmark = ["benchmark", "--preset", "tiny", "--quiet", "--dtypes", "fp32", "--batch-sizes", "1", "--repeats", "1"]
    benchmark += ["--warmup", "0", "--min-time", "0", "--train-batch-size", "0", "--no-flop-count"]
    cases = [
        (["visualize", str(checkpoint), str(image_path), "--output-dir", str(a_file)], "is a file, not a folder"),
        (["visualize", str(checkpoint), str(image_path), "--output-dir", str(a_file / "sub")], "is a file"),
        (["convert", "google/vit-base-patch16-224", "--output-dir", str(a_file)], "is a file, not a folder"),
        (["convert", "google/vit-base-patch16-224", "--output-dir", "out", "--num-labels", "0"], "integer >= 1"),
        (["convert", "google/vit-base-patch16-224", "--output-dir", "out", "--image-size", "0"], "image size"),
        (["convert", "google/vit-base-patch16-224", "--output-dir", "out", "--pruning-schedule", "0,-4"], ">= 0"),
        (["card", str(checkpoint), str(measurements), "--output", str(tmp_path)], "is a folder, not a file"),
        (["card", str(checkpoint), str(measurements), "--output", str(a_file / "c.md")], "does not exist"),
        ([*benchmark, "--device", "cuda"], "Device 'cuda'"),
        ([*benchmark, "--device", "tpu"], "Unsupported device 'tpu'"),
        ([*benchmark, "--threads", "-1"], "--threads: expected an integer >= 1"),
        ([*benchmark, "--threads", "0"], "--threads: expected an integer >= 1"),
        ([*benchmark, "--repeats", "0"], "--repeats: expected an integer >= 1"),
        ([*benchmark, "--warmup", "-1"], "--warmup: expected an integer >= 0"),
        ([*benchmark, "--min-time", "-1"], "--min-time: expected a finite number >= 0"),
        ([*benchmark, "--train-batch-size", "-2"], "--train-batch-size: expected an integer >= 0"),
        ([*benchmark, "--output", str(a_file / "r.json")], "does not exist"),
        ([*benchmark, "--markdown", str(tmp_path)], "is a folder, not a file"),
        ([*benchmark, "--variants", "none,fast"], "Unknown variants ['fast']"),
    ]
    for argv, fragment in cases:
        assert_usage_error(capsys, argv, fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "measurements.json"]


def test_delegated_commands(monkeypatch, capsys):
    calls = []
    fake_benchmark = types.ModuleType("cropr.tools.benchmark")
    fake_benchmark.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cropr.tools.benchmark", fake_benchmark)
    assert main(["benchmark", "--preset", "tiny"]) == 0
    assert calls == [["--preset", "tiny"]]
    assert main(["convert", "--help"]) == 0
    assert "cropr convert" in capsys.readouterr().out
    assert_one_line_error(capsys, ["convert", "/no/such/checkpoint", "--output-dir", "out"], "/no/such/checkpoint")
    monkeypatch.setitem(sys.modules, "cropr.tools.benchmark", types.ModuleType("cropr.tools.benchmark"))
    assert_one_line_error(capsys, ["benchmark"], "cropr.tools.benchmark has no main(argv)")


def test_subprocess_error_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "cropr.cli", "info", "no-such-preset"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("cropr: error: 'no-such-preset' is neither") and result.stderr.count("\n") == 1
