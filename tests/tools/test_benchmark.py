"""The benchmark runs end to end on the tiny preset and reports every variant. No timing is asserted here: speed
claims come from `scripts/benchmark.py` on a quiet machine, not from unit tests."""

import json
import time

import pytest
import torch

from cropr import CroprViTModel
from cropr.tools.benchmark import (
    INFERENCE_VARIANTS,
    PRESETS,
    TRAINING_VARIANTS,
    BenchmarkOptions,
    build_config,
    build_inference_models,
    check_device,
    check_outputs,
    counted_macs,
    describe,
    format_report,
    main,
    parse_args,
    run_benchmark,
)
from cropr.tools.timing import ALLOCATOR_VARIABLES, interleaved_timings


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("benchmark") / "results.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtypes", "fp32,bf16", "--batch-sizes", "1,2", "--repeats", "2"]
    argv += ["--warmup", "1", "--min-time", "0", "--threads", "1", "--train-batch-size", "2", "--train-repeats", "1"]
    assert main([*argv, "--block-scaling", "--output", str(path), "--quiet"]) == 0
    return json.loads(path.read_text())


def test_report_has_every_variant_dtype_and_batch_size(report):
    cells = {(entry["dtype"], entry["batch_size"]) for entry in report["inference"]}
    assert cells == {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)}
    for entry in report["inference"]:
        assert list(entry["variants"]) == list(INFERENCE_VARIANTS)
        for result in entry["variants"].values():
            assert len(result["samples_s"]) == 2
            assert result["throughput"] > 0 and result["latency_ms"] > 0
            assert result["min_s"] <= result["median_s"] <= result["max_s"]
        metrics = entry["metrics"]
        for key in ("speedup_cropr", "speedup_random", "ceiling_fraction", "router_overhead", "none_vs_hf"):
            assert isinstance(metrics[key], float)
        for key in ("speedup_ideal", "ideal_ceiling_fraction", "routing_cost"):
            assert isinstance(metrics[key], float)
        cropr, ideal = (entry["variants"][name]["throughput"] for name in ("cropr", "ideal"))
        assert metrics["routing_cost"] == pytest.approx(ideal / cropr - 1.0)
        assert metrics["ceiling_fraction"] == pytest.approx(metrics["speedup_cropr"] / metrics["flop_ceiling"])
        assert len(metrics["targets"]) == 3


# The tiny preset by hand: 16 patches + CLS, width 32, MLP 64, 4 blocks, R=3 with LLF -> modules after blocks 0 and 1
# removing 4 (3 + 1 for CLS) and 3 tokens. A block over n tokens costs 4n*32^2 + 2n^2*32 + 2n*32*64 = 8192n + 64n^2
# multiply-adds, the patch embedding 16*3*8*8*32 = 98304, each module's routing product n*32.
TINY_TOKEN_COUNTS = [17, 13, 10, 17]
TINY_UNPRUNED_MACS = 98304 + 4 * (8192 * 17 + 64 * 17**2)  # 729344
TINY_PRUNED_MACS = 98304 + sum(8192 * n + 64 * n**2 for n in TINY_TOKEN_COUNTS) + (17 + 13) * 32  # 620416


def test_report_analytic_numbers_are_the_tiny_presets(report):
    assert report["token_counts"] == TINY_TOKEN_COUNTS
    assert report["flop_ceiling"] == pytest.approx(TINY_UNPRUNED_MACS / TINY_PRUNED_MACS)
    assert all(entry["metrics"]["flop_ceiling"] == report["flop_ceiling"] for entry in report["inference"])
    flops = report["flops"]
    assert flops["none"]["analytic_macs"] == flops["hf"]["analytic_macs"] == TINY_UNPRUNED_MACS
    assert flops["cropr"]["analytic_macs"] == flops["random"]["analytic_macs"] == TINY_PRUNED_MACS
    assert flops["ideal"]["analytic_macs"] == TINY_PRUNED_MACS
    for item in flops.values():
        # The counter misses only the router's matrix-vector products: well under 1% of the backbone.
        assert item["counted_macs"] == pytest.approx(item["analytic_macs"], rel=0.01)
    assert flops["hf"]["counted_macs"] == flops["none"]["counted_macs"]


def test_report_records_environment_sanity_and_training(report):
    env = report["environment"]
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == 1 and env["device"] == "cpu"
    assert env["batch_sizes"] == [1, 2] and env["dtypes"] == ["fp32", "bf16"]
    assert env["cpu_model"]
    assert report["sanity"]["none"]["max_abs_diff_vs_hf"] < 1e-4
    assert {entry["dtype"] for entry in report["training"]} == {"fp32", "bf16"}
    for entry in report["training"]:
        assert list(entry["variants"]) == list(TRAINING_VARIANTS)
        assert set(entry["metrics"]) == {"speedup_cropr", "speedup_random", "aux_head_overhead"}


def test_block_scaling_times_the_benchmark_block_at_every_dtype_and_batch_size(report):
    cells = {(entry["dtype"], entry["batch_size"]) for entry in report["block_scaling"]}
    assert cells == {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)}
    tiny_blocks = [8192 * n + 64 * n**2 for n in TINY_TOKEN_COUNTS]
    for entry in report["block_scaling"]:
        assert list(entry["block_ms"]) == ["17", "13", "10"]
        assert entry["blocks_flop_ceiling"] == pytest.approx(4 * tiny_blocks[0] / sum(tiny_blocks))
        assert entry["weight_mb"] == pytest.approx((4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 4 * 32) * 4 / 1e6)
    assert "the blocks allow" in format_report(report)


@pytest.mark.parametrize("use_gated_mlp", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "map"])
def test_analytic_macs_are_what_torch_counts(use_gated_mlp, pooling):
    """`flops()` (blocks by `block_macs`, the embedding, the pooling head) against FlopCounterMode, unpruned; the
    attention-pooling head's MLP is a plain one even in a gated model."""
    fields = {"pooling": pooling, "use_cls_token": pooling == "cls", "token_selector": "none"}
    if use_gated_mlp:
        fields.update(use_gated_mlp=True, hidden_act="silu")
    config = build_config("tiny", **fields)
    model = CroprViTModel(config).eval()
    assert counted_macs(model, torch.randn(1, 3, 32, 32)) == config.flops(pruned=False)


def test_dinov2_weights_copy_into_croprvit():
    overrides = dict(
        image_size=56, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, pruning_rate=3
    )
    options = BenchmarkOptions(preset="dinov2-s14", overrides=overrides)
    inference = build_inference_models(options)
    assert inference.config.layerscale_value == 1.0
    inputs = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    checks = check_outputs(inference.models, inference.config, inputs)
    assert checks["none"]["max_abs_diff_vs_hf"] < 1e-4
    assert checks["cropr"]["shape"] == [2, 17, 32]


def test_siglip_weights_copy_into_croprvit():
    """The SigLIP-shaped preset: no CLS token, the attention-pooling head copied, its cost in the analytic FLOPs."""
    overrides = dict(
        image_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, pruning_rate=3
    )
    inference = build_inference_models(BenchmarkOptions(preset="siglip-b16", overrides=overrides))
    config = inference.config
    assert not config.use_cls_token and config.pooling == "map" and config.token_counts() == [16, 13, 10, 16]
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    checks = check_outputs(inference.models, config, inputs)
    assert checks["none"]["max_abs_diff_vs_hf"] < 1e-4 and checks["cropr"]["shape"] == [2, 16, 32]
    with torch.no_grad():
        pooled = [inference.models[name](inputs).pooler_output for name in ("hf", "none")]
    assert (pooled[0] - pooled[1]).abs().max() < 1e-4
    assert counted_macs(inference.models["none"], inputs) == config.flops(pruned=False)
    with pytest.raises(ValueError, match="no CLS token"):
        build_inference_models(BenchmarkOptions(preset="siglip-b16", overrides={**overrides, "use_cls_token": True}))


def test_parse_args_defaults_and_overrides():
    options = parse_args(["--preset", "vit-b16", "--device", "cpu", "--pruning-rate", "8", "--no-llf"])
    assert options.dtypes == ["fp32", "bf16"] and options.batch_sizes == [1, 8, 32]
    assert options.overrides == {"pruning_rate": 8, "last_layer_fusion": False}
    options = parse_args(["--device", "cpu", "--set", "pruning_schedule=[0,0,0,0,0,50,0,0,0,0,0,0]"])
    assert build_config(options.preset, options.overrides).pruning_blocks == [5]


def test_invalid_requests_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="preset"):
        build_config("vit-h14")
    with pytest.raises(ValueError, match="fp16"):
        run_benchmark(BenchmarkOptions(preset="tiny", dtypes=["fp16"]))
    with pytest.raises(ValueError, match="variants"):
        run_benchmark(BenchmarkOptions(preset="tiny", variants=["fast"]))
    with pytest.raises(ValueError, match="Unsupported device 'tpu'"):
        run_benchmark(BenchmarkOptions(preset="tiny", device="tpu"))
    with pytest.raises(ValueError, match="CLS token"):
        run_benchmark(BenchmarkOptions(preset="tiny", overrides={"use_cls_token": False}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="Device 'cuda:1'"):
        check_device("cuda:1")


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--device", "cuda"], "Device 'cuda'"),
        (["--device", "tpu"], "Unsupported device 'tpu'"),
        (["--threads", "-1"], "argument --threads: expected an integer >= 1, got '-1'"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1"),
        (["--train-repeats", "0"], "argument --train-repeats: expected an integer >= 1"),
        (["--batch-sizes", "8,0"], "argument --batch-sizes: expected comma-separated integers >= 1"),
        (["--min-time", "nan"], "argument --min-time: expected a finite number >= 0"),
        (["--dtypes", "fp16", "--device", "cpu"], "fp16 autocast is for CUDA"),
        (["--pruning-rate", "99"], "The pruning schedule removes"),
        (["--clock", "cpu"], "--clock cpu counts this process's CPU seconds"),
        (["--clock", "cpu", "--threads", "2"], "with --threads 1"),
        (["--clock", "gpu"], "argument --clock: invalid choice"),
        (["--set", 'hidden_size="wide"'], "hidden_size"),
    ],
)
def test_bad_options_end_in_one_usage_error_line(arguments, fragment, capsys, monkeypatch):
    """What `scripts/benchmark.py` and `cropr benchmark` print for options that cannot run: argparse's usage and
    one error line, exit status 2, before any model is built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    quick = ["--dtypes", "fp32", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--min-time", "0"]
    quick += ["--train-batch-size", "0", "--no-flop-count"]  # an option accepted by mistake costs seconds
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "tiny", "--quiet", *quick, *arguments])
    assert exit_.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("cropr-benchmark: error: ") and fragment in last_line


def test_a_run_that_changes_the_model_describes_the_model_it_measured():
    assert describe(parse_args(["--preset", "vit-b16"]), build_config("vit-b16")) == PRESETS["vit-b16"].description
    options = parse_args(["--preset", "vit-b16", "--image-size", "384", "--pruning-rate", "47"])
    described = describe(options, build_config(options.preset, options.overrides))
    assert described == "ViT-B/16 at 384 px, R=47 after every block + LLF (577 -> ... -> 106 tokens)"
    options = parse_args(["--preset", "tiny", "--pruning-schedule", "0,3,0,0", "--set", "last_layer_fusion=false"])
    described = describe(options, build_config(options.preset, options.overrides))
    assert described == "4-block, 32-wide ViT at 32 px, schedule [0, 3, 0, 0] (17 -> ... -> 14 tokens)"


def test_pruning_schedule_accepts_blocks_without_pruning():
    options = parse_args(["--preset", "tiny", "--device", "cpu", "--pruning-schedule", "0,3,0,0"])
    assert build_config(options.preset, options.overrides).pruning_blocks == [1]


def test_ideal_routing_runs_the_blocks_on_the_pruned_token_counts():
    """`ideal` times the same blocks on the same sequence lengths as `cropr`, or its ratio explains nothing."""
    inference = build_inference_models(BenchmarkOptions(preset="tiny"))
    ideal, config = inference.models["ideal"], inference.configs["ideal"]
    assert config.token_selector == "cropr"  # the schedule it follows is the pruned one
    lengths = []
    for layer in ideal.model.layers:
        layer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.inference_mode():
        output = ideal(torch.randn(2, 3, 32, 32)).last_hidden_state
    assert lengths == config.token_counts() == TINY_TOKEN_COUNTS
    assert output.shape == (2, 17, 32)  # Last Layer Fusion: the full token map
    assert ideal.model.config.token_selector == "none"


def test_cpu_clock_counts_this_process_only():
    """A step that waits (as when other processes hold the cores) costs wall time, not CPU time."""
    step = lambda: time.sleep(0.05)  # noqa: E731
    wall = interleaved_timings({"wait": step}, torch.device("cpu"), warmup=1, repeats=1)
    cpu = interleaved_timings({"wait": step}, torch.device("cpu"), warmup=1, repeats=1, clock="cpu")
    assert wall["wait"][0] >= 0.05 and cpu["wait"][0] < 0.01
    with pytest.raises(ValueError, match="Unknown clock 'gpu'"):
        interleaved_timings({"wait": step}, torch.device("cpu"), clock="gpu")


def test_cpu_clock_run_records_its_clock(tmp_path):
    path = tmp_path / "results.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batch-sizes", "1", "--repeats", "1"]
    argv += ["--warmup", "1", "--min-time", "0", "--threads", "1", "--train-batch-size", "0", "--no-flop-count"]
    assert main([*argv, "--clock", "cpu", "--output", str(path), "--quiet"]) == 0
    assert json.loads(path.read_text())["environment"]["clock"] == "cpu"


def test_the_recorded_command_names_the_allocator_settings_it_ran_under(tmp_path, monkeypatch):
    """glibc's allocator settings change how often a forward pass page-faults, so they are part of the command."""
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    path, markdown = tmp_path / "results.json", tmp_path / "benchmarks.md"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batch-sizes", "1", "--repeats", "1"]
    argv += ["--warmup", "1", "--min-time", "0", "--threads", "1", "--train-batch-size", "0", "--no-flop-count"]
    assert main([*argv, "--output", str(path), "--markdown", str(markdown), "--quiet"]) == 0
    settings = json.loads(path.read_text())["environment"]["allocator_settings"]
    assert settings == {"MALLOC_TRIM_THRESHOLD_": "17179869184"}
    command = "Command: `MALLOC_TRIM_THRESHOLD_=17179869184 python scripts/benchmark.py --preset tiny"
    assert command in markdown.read_text()


def test_pipeline_option_reports_the_photo_latency(tmp_path):
    pytest.importorskip("skimage")
    path = tmp_path / "results.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--dtypes", "fp32", "--batch-sizes", "1", "--repeats", "1"]
    argv += ["--warmup", "1", "--min-time", "0", "--threads", "1", "--train-batch-size", "0", "--no-flop-count"]
    assert main([*argv, "--pipeline", "--output", str(path), "--quiet"]) == 0
    result = json.loads(path.read_text())["pipeline"]
    assert result["photos"] == 4 and set(result["latency_ms"]) == {"processor", "cropr", "none"}
    assert result["processor_share"] > 0


def test_ideal_routing_output_depends_on_every_block():
    """Every block's work reaches the output, so that a compiler cannot drop blocks and time less than `cropr` does."""
    ideal = build_inference_models(BenchmarkOptions(preset="tiny")).models["ideal"]
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        before = ideal(pixel_values).last_hidden_state
        for layer in ideal.model.layers[:-1]:
            layer.mlp.fc2.bias.add_(1.0)
            assert not torch.equal(ideal(pixel_values).last_hidden_state, before)
            layer.mlp.fc2.bias.sub_(1.0)


QUICK_RATES = ["--device", "cpu", "--dtypes", "fp32", "--batch-sizes", "2", "--repeats", "2", "--warmup", "1"]
QUICK_RATES += ["--min-time", "0", "--threads", "1", "--quiet"]


def test_a_checkpoint_is_timed_at_each_pruning_rate(tmp_path, capsys):
    from conftest import build_tiny

    build_tiny("classification", pruning_schedule=[3, 2, 0, 0]).save_pretrained(tmp_path / "checkpoint")
    output = tmp_path / "rates.json"
    argv = [str(tmp_path / "checkpoint"), "--pruning-rates", "5,0,2", *QUICK_RATES, "--output", str(output)]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    assert list(report["rates"]) == ["R=0", "R=2", "R=5"]
    assert report["rates"]["R=5"]["token_counts"] == [17, 11, 6, 17]
    assert report["rates"]["R=0"]["flop_ceiling"] == 1.0
    (entry,) = report["inference"]
    assert entry["variants"]["R=0"]["speedup"] == 1.0 and entry["variants"]["R=5"]["throughput"] > 0
    assert "R=5" in capsys.readouterr().out
    build_tiny("classification", pruning_rate=3).save_pretrained(tmp_path / "per-block")
    options = parse_args([str(tmp_path / "per-block"), "--device", "cpu"])
    assert (options.pruning_rates, options.saved_schedule) == ([0, 3], False)
    # Saved at an explicit schedule, a checkpoint is timed by default at that schedule, not at its unused rate.
    assert main([str(tmp_path / "checkpoint"), *QUICK_RATES, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert list(report["rates"]) == ["R=0", "saved"]
    assert report["rates"]["saved"]["pruning_schedule"] == [3, 2, 0, 0]
    assert report["rates"]["saved"]["token_counts"] == [17, 14, 12, 17]
    assert "saved" in capsys.readouterr().out


def test_a_rate_the_checkpoint_cannot_run_fails_in_one_line(tmp_path, capsys):
    from conftest import build_tiny

    build_tiny("classification", pruning_schedule=[3, 0, 0, 0]).save_pretrained(tmp_path / "checkpoint")
    assert main([str(tmp_path / "checkpoint"), "--pruning-rates", "0,2", *QUICK_RATES]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("cropr benchmark: error: --pruning-rates 2:") and "modules after blocks [0]" in error
    with pytest.raises(SystemExit):
        main(["--pruning-rates", "0,2", *QUICK_RATES])
    assert "--pruning-rates times a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), *QUICK_RATES])
    assert "does not exist" in capsys.readouterr().err
