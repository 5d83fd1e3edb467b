"""A real browser (Debian's chromium, driven by Playwright) uses the app like a visitor: opens it,
uploads the example photos, runs a short fine-tune on the embedded model, sees the attacker's
reconstruction appear, attacks the LoRA in the Attack tab and asks whether a photo was used to train it
(membership), cloaks the photos in the Defenses tab, checks the LoRA for both watermarks in the
Watermark tab and opens every tab. Screenshots of each tab
(and of the Fine-tune tab at phone width) go to ``test-artifacts/browser/`` (git-ignored).

Skipped, with the reason, only where no browser is installed (``.ci/run`` installs chromium and
playwright)."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from core import ASSETS
from tests.conftest import launched_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
EXAMPLE_PHOTOS = sorted((ASSETS / "examples" / "person_1000").glob("*.png"))
TABS = ("Fine-tune", "Attack", "Layers", "Defenses", "Watermark", "About")


def chromium_path():
    for name in (os.environ.get("LEAKLAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -r requirements-dev.txt)")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium found: install Debian's (apt-get install chromium) or set LEAKLAB_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(base_engine):
    for demo in launched_app(base_engine):
        yield demo.local_url


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_visitor_fine_tunes_and_sees_the_reconstruction(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.get_by_text("Upload photos, then press").wait_for(timeout=60_000)

    page.locator("input[type=file]").first.set_input_files([str(p) for p in EXAMPLE_PHOTOS])
    page.get_by_text(f"{len(EXAMPLE_PHOTOS)} usable photos").wait_for(timeout=60_000)
    steps = page.get_by_label("Training steps").and_(page.locator("input[type=number]"))
    steps.fill("30")  # checkpoints at steps 25 and 30: two live attacks
    steps.press("Enter")
    page.get_by_role("button", name="Train", exact=True).click()
    page.get_by_text("Done: 30 steps").wait_for(timeout=300_000)
    shot(page, "1-fine-tune")
    recon = page.locator("div.block", has_text="The attacker's reconstructions, newest first").last
    assert page.get_by_text(re.compile(r"What an attacker rebuilds from the LoRA weights alone, step \d+")).count() == 1
    assert recon.locator("img").count() >= 2  # the attacker's pictures, from the weights alone
    assert page.get_by_text(re.compile(r"Identity score at step \d+")).count() == 1

    page.get_by_role("tab", name="Attack").click()
    page.get_by_role("button", name="Attack my LoRA from the Fine-tune tab").click()
    page.get_by_text("Attacked your LoRA from the Fine-tune tab").wait_for(timeout=120_000)
    shot(page, "2-attack")
    page.get_by_text("Was my photo used? (membership inference)").click()  # one of the photos it trained on
    page.locator("div.block", has_text="Your photo(s) (1-").last.locator("input[type=file]").set_input_files(
        [str(EXAMPLE_PHOTOS[0])]
    )
    page.get_by_role("button", name="Was my photo used?", exact=True).click()
    page.get_by_text("Membership check of 1 photo against your LoRA from the Fine-tune tab").wait_for(timeout=120_000)
    assert page.locator("td", has_text=re.compile(r"^[+-]\d")).count() >= 1  # the photo's score in the verdict table
    shot(page, "2b-membership-verdict")
    for i, tab in enumerate(TABS[2:], 3):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        if tab == "Defenses":  # the visitor's photos beside their cloaked versions
            page.get_by_role("button", name="Cloak my photos").click()
            page.get_by_text(re.compile(r"Cloaked \d+ photos")).wait_for(timeout=180_000)
            assert page.locator("div.block", has_text="beside their cloaked versions").last.locator("img").count() >= 2
            shot(page, f"{i}-defenses-cloaked")
        if tab == "Watermark":  # the owner checks the visitor's LoRA for both shipped watermarks
            page.get_by_role("button", name="Check my LoRA for both watermarks").click()
            page.get_by_text(re.compile(r"AIAO \(lazy layers\): (yes|no)")).wait_for(timeout=180_000)
            page.get_by_text(re.compile(r"Baseline backdoor \(trigger prompt\): (yes|no)")).wait_for(timeout=180_000)
        shot(page, f"{i}-{tab.lower()}")
    page.get_by_role("tab", name="Layers").click()
    page.get_by_text("You have not fine-tuned a LoRA in this session yet").wait_for(state="detached", timeout=5_000)

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(app_url)
    phone.get_by_text("Upload photos, then press").wait_for(timeout=60_000)
    shot(phone, "7-phone-width")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # no sideways scrolling
    phone.close()
    page.close()


# a finished visit leaves nothing: not in the browser, not on the server ---------------------------


@pytest.fixture(scope="module")
def tiny_url(tiny_engine):
    for demo in launched_app(tiny_engine):
        yield demo.local_url


def storage_of(page) -> dict:
    """Everything the page's origin keeps in the browser: localStorage, sessionStorage, IndexedDB."""
    return page.evaluate("""async () => ({
        local: Object.fromEntries(Object.entries(localStorage)),
        session: Object.fromEntries(Object.entries(sessionStorage)),
        indexeddb: (await indexedDB.databases()).map(d => d.name),
    })""")


def visit_files(since: set) -> set:
    """Files with content, added since ``since``, wherever a visit could leave one on the server."""
    from gradio.utils import get_upload_folder

    from ui import session as sess

    found = set()
    for folder in (sess.SESSION_ROOT, Path(get_upload_folder())):
        found |= {p for p in Path(folder).rglob("*") if p.is_file() and p.stat().st_size}
    return found - since


def open_app(browser, url):
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    page.get_by_text("Upload photos, then press").wait_for(timeout=60_000)
    return context, page


def test_a_finished_visit_leaves_nothing_in_the_browser(browser, tiny_url):
    """On a shared classroom computer: a visitor uploads photos and fine-tunes, then closes the tab.
    The next person finds nothing of the visit in the browser's storage or at /gradio_api/runs."""
    context, page = open_app(browser, tiny_url)
    page.locator("input[type=file]").first.set_input_files([str(p) for p in EXAMPLE_PHOTOS])
    page.get_by_text(f"{len(EXAMPLE_PHOTOS)} usable photos").wait_for(timeout=60_000)
    steps = page.get_by_label("Training steps").and_(page.locator("input[type=number]"))
    steps.fill("20")
    steps.press("Enter")
    page.get_by_role("button", name="Train", exact=True).click()
    page.get_by_text("Done: 20 steps").wait_for(timeout=300_000)
    trigger = re.search(r"Trigger word: (\w+)", page.locator("body").inner_text()).group(1)
    private = [trigger, "leaklab-session", "leaklab-uploads", *(p.name for p in EXAMPLE_PHOTOS)]
    page.close()  # the visit ends

    after = context.new_page()
    after.goto(tiny_url)
    after.get_by_text("Upload photos, then press").wait_for(timeout=60_000)
    kept = storage_of(after)
    assert not any(k.startswith("gradio:run-history") for k in kept["local"]), list(kept["local"])
    assert not [w for w in private if w in str(kept)], kept
    assert kept["indexeddb"] == [], kept
    assert after.request.get(f"{tiny_url.rstrip('/')}/gradio_api/runs").status == 404
    context.close()


def test_a_closed_tab_leaves_no_file_within_a_minute(browser, tiny_url, tiny_engine, tmp_path):
    """A visitor uploads photos, then a LoRA file and reference photos in the Attack tab without ever
    pressing Attack, and closes the tab: within 60 s no file of the visit is left on the server."""
    from core.finetune.lora import save_lora
    from tests.bad_inputs import random_lora

    since = visit_files(set())
    context, page = open_app(browser, tiny_url)
    page.locator("input[type=file]").first.set_input_files([str(p) for p in EXAMPLE_PHOTOS])
    page.get_by_text(f"{len(EXAMPLE_PHOTOS)} usable photos").wait_for(timeout=60_000)
    lora = save_lora(tmp_path / "shared-lora.safetensors", random_lora(tiny_engine.pipe, text_encoder=False))
    page.get_by_role("tab", name="Attack").click()

    def file_input(label):
        return page.locator("div.block", has_text=label).last.locator("input[type=file]")

    file_input("A LoRA file (.safetensors; diffusers").set_input_files(str(lora))  # the tab's own, not a panel's
    page.wait_for_timeout(3000)
    file_input("photos of the person, to score").set_input_files([str(p) for p in EXAMPLE_PHOTOS[:2]])
    page.wait_for_timeout(3000)
    assert visit_files(since)  # the visit's files are on the server
    page.close()  # the visit ends
    context.close()
    deadline = time.monotonic() + 60
    while visit_files(since) and time.monotonic() < deadline:
        time.sleep(1)
    assert visit_files(since) == set(), sorted(str(p) for p in visit_files(since))
