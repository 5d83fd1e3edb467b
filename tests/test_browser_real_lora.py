"""A real browser (Debian's chromium, driven by Playwright) on the app running the tiny SD 1.x-layout pipeline:
a visitor uploads a kohya LoRA in the Attack tab, checks its metadata (the leaks and the cleaned copy
appear), attacks it (the attacks that need no training run; the trained attacker is said to exist only
for the embedded base) and looks at its layers in the Layers tab. Screenshots go to
``test-artifacts/browser/`` (git-ignored). Skipped, with the reason, where no browser is installed."""

import pytest
import torch

from tests import sd1x
from tests.conftest import launched_app
from tests.sd1x import LOCON, TEXT, UNET_ATTN, reference_lora
from tests.test_browser import ARTIFACTS, browser  # noqa: F401  (the browser fixture)


@pytest.fixture(scope="module")
def app_url(sd1_pipeline_dir, tmp_path_factory, monkeypatch_module):
    from core.engine import Engine

    monkeypatch_module.setenv("LEAKLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    for demo in launched_app(Engine(str(sd1_pipeline_dir), "cpu")):
        yield demo.local_url


def upload(page, label: str, path) -> None:
    page.locator("div.block", has_text=label).locator("input[type=file]").first.set_input_files(str(path))


def test_a_visitor_checks_attacks_and_inspects_a_kohya_lora(browser, app_url, sd1_pipe, tmp_path):  # noqa: F811
    ref = reference_lora(
        sd1_pipe, unet=UNET_ATTN + LOCON, text=TEXT, ranks=(4, 2), alphas=(3.0, 1.5), dtype=torch.float16
    )
    path = sd1x.write(tmp_path / "anna_lora_v2.safetensors", sd1x.kohya_tensors(ref), sd1x.kohya_metadata())
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.get_by_role("tab", name="Attack").click()
    upload(page, "A LoRA file (.safetensors; diffusers", path)
    page.get_by_role("button", name="Check its metadata").click()
    page.get_by_text("of them give something away").wait_for(timeout=60_000)
    assert page.get_by_text("The trigger word is written in the file").count() == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "real-lora-1-metadata.png"), full_page=True)
    page.locator("div.block", has_text="Cleaned copy").get_by_text("anna_lora_v2-clean").wait_for(timeout=30_000)

    page.get_by_role("button", name="Attack this LoRA file").click()
    page.get_by_text("Attacked the uploaded LoRA").wait_for(timeout=180_000)
    assert page.get_by_text("exists only for the embedded base model", exact=False).count() >= 1
    page.screenshot(path=str(ARTIFACTS / "real-lora-2-attack.png"), full_page=True)

    page.get_by_role("tab", name="Layers").click()
    upload(page, "A LoRA file (.safetensors) for this app's base model", path)
    page.get_by_role("button", name="Show this file's layers").click()
    page.get_by_text("The uploaded LoRA", exact=True).wait_for(timeout=60_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "real-lora-3-layers.png"), full_page=True)
    page.close()
