"""The demo in a real browser: `cropr demo` serves the page on 127.0.0.1 and headless Chromium uses it as a person
would (pick an example, upload an image, move the pruning-rate slider, upload a file that is no image), reading the
predictions, the heat-map and the measured latency back from the page.

The browser is the system Chromium (Debian package `chromium`, which `.ci/run` installs); without it the test is
skipped. The app starts without a checkpoint argument, so on the model where `make main` saves it: a tiny random one,
or a copy of the folder `CROPR_DEMO_CHECKPOINT` names. `CROPR_DEMO_SCREENSHOT=docs/demo.png` also saves the page
after the slider moved there (the README's screenshot).
"""

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import build_tiny
from transformers import ViTConfig

from cropr import CroprViTConfig
from cropr.data import load_builtin_task
from cropr.tools.demo import DEFAULT_CHECKPOINT
from cropr.tools.visualization import LEGEND_HEIGHT, MARGIN

CHROMIUM = os.environ.get("CROPR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STARTUP_TIMEOUT = 90  # seconds; importing torch, transformers and Gradio on a loaded 2-core machine takes most of it
STEP_TIMEOUT_MS = 30_000
NAMES = {0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "frog"}

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium browser on this machine: install the Debian package `chromium` (as .ci/run does) to "
        "drive the demo page",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("gradio") is None, reason='the demo needs Gradio: pip install "cropr[demo]"'
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_served(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`cropr demo` exited with status {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`cropr demo` did not serve {url} within {STARTUP_TIMEOUT} s:\n{log.read_text()}")


def snapshot(folder: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime for path in folder.rglob("*")}


def test_demo_page_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright (the dev extra)")
    # The app may write only into its own temporary folder: give it an empty home and TMPDIR, and a working folder
    # holding only the checkpoint where `cropr demo` looks without an argument.
    home, cwd, tmp = (tmp_path / name for name in ("home", "cwd", "tmp"))
    for folder in (home, cwd, tmp):
        folder.mkdir()
    checkpoint = cwd / DEFAULT_CHECKPOINT
    if os.environ.get("CROPR_DEMO_CHECKPOINT"):
        shutil.copytree(os.environ["CROPR_DEMO_CHECKPOINT"], checkpoint)
    else:
        from transformers import ViTImageProcessorPil

        build_tiny("classification", id2label=NAMES).strip_training_modules().save_pretrained(checkpoint)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    config = CroprViTConfig.from_pretrained(checkpoint)
    start_rate = config.nearest_pruning_rate()
    before = snapshot(cwd)

    scene = tmp_path / "scene.png"
    load_builtin_task("cluttered-classification", 1, 1, image_size=112, source="subset")["validation"][0]["image"].save(
        scene
    )
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    ViTConfig().save_pretrained(tmp_path / "vit")
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "demo.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cropr.cli", "demo", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_served(url, process, log)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.goto(url)
            check_page(page, config, start_rate, scene, not_an_image, tmp_path, sync_api)
            check_other_checkpoint(page, tmp_path / "vit")
            browser.close()
    finally:
        process.send_signal(signal.SIGTERM)  # the app ends as on Ctrl+C and removes its temporary folder
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert snapshot(cwd) == before and list(home.iterdir()) == []
    assert not list(tmp.glob("cropr-demo-*"))


def check_page(
    page, config: CroprViTConfig, start_rate: int, scene: Path, not_an_image: Path, tmp_path: Path, sync_api
) -> None:
    names = set(config.id2label.values())
    report, status = page.locator("#report"), page.locator("#status")
    heatmap = page.locator("#heatmap img")

    # A built-in example: the pruned model's prediction and its heat-map at the rate the slider starts at (the
    # trained rate, or the one nearest a saved per-block schedule).
    page.locator("#example input").click()
    page.get_by_role("option", name="astronaut").click()
    report.get_by_text(f"R = {start_rate}").wait_for()
    assert page.locator("#on-label").get_by_text(f"Pruning on (R = {start_rate}): top 5").is_visible()

    # An upload; then the slider, to half that rate.
    page.locator("#upload input[type=file]").set_input_files(scene)
    page.locator('#upload td[aria-label="scene.png"]').wait_for()
    report.get_by_text("ms").first.wait_for()
    rate = max(1, start_rate // 2)
    before = heatmap.get_attribute("src")
    page.locator("#rate input[type=range]").fill(str(rate))
    report.get_by_text(f"R = {rate}").wait_for()

    for side in ("#off-label", "#on-label"):
        text = page.locator(side).inner_text()
        assert "%" in text and any(name in text for name in names), text
    assert page.locator("#on-label").get_by_text(f"Pruning on (R = {rate}): top 5").is_visible()
    expected = CroprViTConfig.from_dict(config.to_dict(), pruning_rate=rate).token_counts()
    rows = report.locator("tbody tr")
    assert rows.count() == config.num_hidden_layers
    for block, tokens in enumerate(expected):
        cells = rows.nth(block).locator("td").all_inner_texts()
        assert cells[:3] == [str(block), str(config.num_patches + config.num_prefix_tokens), str(tokens)], cells
    assert "pruning off" in report.inner_text() and "x (FLOP ceiling" in report.inner_text()
    assert heatmap.get_attribute("src") != before
    shown = heatmap.evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert shown == [320 + 2 * MARGIN, 320 + LEGEND_HEIGHT + 3 * MARGIN]  # the 112x112 scene, one 320 px panel
    # Gradio shows its progress ("processing | 0.3s") in the status box until the last event of the change ends.
    sync_api.expect(status).to_have_text(re.compile(r"^\s*$"), timeout=15_000)
    page.screenshot(path=tmp_path / "demo.png", full_page=True)
    if os.environ.get("CROPR_DEMO_SCREENSHOT"):
        page.screenshot(path=os.environ["CROPR_DEMO_SCREENSHOT"], full_page=True)

    # A file that is no image: a message on the page, no stack trace, no stale result.
    page.locator("#upload button[aria-label=Clear]").click()
    page.locator("#upload input[type=file]").set_input_files(not_an_image)
    status.get_by_text("notes.png is not an image file").wait_for()
    assert "Traceback" not in page.content()
    assert report.inner_text().strip() == ""


def check_other_checkpoint(page, vit: Path) -> None:
    """A checkpoint typed into the page that is no CroprViT: a message, and the page keeps the model it has."""
    info = page.locator("#info").inner_text()
    page.locator("#checkpoint textarea").fill(str(vit))
    page.locator("#load").click()
    page.locator("#status").get_by_text("holds a 'vit' model, not a CroprViT one").wait_for()
    assert page.locator("#info").inner_text() == info
