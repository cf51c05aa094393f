"""The app in headless Chromium (Debian's /usr/bin/chromium through Playwright; never
`playwright install`). One page walks through what a researcher does; screenshots land in
artifacts/ (gitignored)."""
import json
import os
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.browser
ART = ROOT / "artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SPEC = {"name": "paris-qa", "description": "uploaded in the browser test",
        "segments": [{"name": "context", "text": "Paris is the capital of France."},
                     {"name": "question", "text": " Q: What is the capital of France? A:", "role": ["generate"]}],
        "mask": {"base": {"pattern": "causal"}}, "positions": {"scheme": "sequential"}}


@pytest.fixture(scope="module")
def page(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():  # CI installs it (scripts/setup.sh --dev): never skip there
        (pytest.fail if os.environ.get("CI") else pytest.skip)("Debian's chromium is missing: bash scripts/setup.sh --dev")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        ctx = browser.new_context(viewport={"width": 1600, "height": 1100}, accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(app_url)
        pg.wait_for_selector("#mask-img img")
        yield pg
        browser.close()


def src(page, elem="#mask-img") -> str:
    return page.locator(f"{elem} img").get_attribute("src")


def wait_src_change(page, old, elem="#mask-img", timeout=30_000):
    page.wait_for_function("([sel, s]) => { const i = document.querySelector(sel + ' img'); return i && i.src !== s; }",
                           arg=[elem, old], timeout=timeout)


def editor_text(page) -> str:
    page.get_by_role("tab", name="JSON").click()
    text = page.locator("#json-editor .cm-content").inner_text()
    page.get_by_role("tab", name="Tables").click()
    return text


def test_pick_a_preset_and_the_mask_changes(page):
    before = src(page)
    page.locator("#preset input").click()
    page.locator("#preset input").fill("prefix_lm")
    t0 = time.perf_counter()
    page.locator("[role=option]", has_text="prefix_lm").first.click()
    wait_src_change(page, before)
    print(f"preset switch -> new mask picture in the browser: {time.perf_counter() - t0:.2f} s")
    assert "Raffel" in page.locator("#preset-card").inner_text()
    page.screenshot(path=str(ART / "browser-preset.png"))


def test_edit_a_rule_in_the_table_and_the_json_changes(page):
    assert '"pattern": "full", "q": "*", "k": "prefix"' in editor_text(page)
    before = src(page)
    page.locator("#rules [data-testid='cell-1-3']").dblclick()
    page.keyboard.press("Control+a")
    page.keyboard.type("none")
    page.keyboard.press("Enter")
    wait_src_change(page, before)
    assert '"pattern": "none", "q": "*", "k": "prefix"' in editor_text(page)


def test_invalid_edit_shows_the_error_and_keeps_the_pictures(page):
    before = {e: src(page, e) for e in ("#mask-img",)}
    page.get_by_role("tab", name="JSON").click()
    page.locator("#json-editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text('{"segments": [{"name": "a", "length": 4}], "mask": {"base": {"pattern": "causl"}}}')
    page.locator("#apply-json").click()
    err = page.locator("#design-error")
    err.get_by_text("mask.base.pattern").wait_for()
    assert "unknown pattern 'causl' (did you mean 'causal'?)" in err.inner_text()
    time.sleep(1.0)
    assert src(page) == before["#mask-img"]
    page.screenshot(path=str(ART / "browser-invalid-edit.png"))
    page.get_by_role("tab", name="Tables").click()


def test_upload_a_spec_then_download_the_json(page, tmp_path):
    from maskstudio import Spec
    from maskstudio.export import export_bytes

    f = tmp_path / "paris.json"
    f.write_text(json.dumps(SPEC))
    before = src(page)
    page.get_by_role("tab", name="Export / Import").click()
    page.locator("#upload input[type=file]").set_input_files(str(f))
    wait_src_change(page, before)
    assert '"name": "paris-qa"' in editor_text(page)
    page.get_by_role("tab", name="Export / Import").click()
    page.locator("#export-btn").click()
    link = page.locator("#download a").first
    link.wait_for()
    with page.expect_download() as info:
        link.click()
    got = Path(info.value.path()).read_bytes()
    assert got == export_bytes(Spec.load(SPEC), "json")


@pytest.mark.model
def test_run_the_default_model_and_see_a_continuation(page):
    page.get_by_role("tab", name="Run").click()
    page.locator("#run-btn").click()
    box = page.locator("#continuation textarea")
    page.wait_for_function("() => document.querySelector('#continuation textarea').value.length > 0",
                           timeout=240_000)
    assert box.input_value().strip()
    page.locator("#run-btn").scroll_into_view_if_needed()
    page.screenshot(path=str(ART / "browser-run.png"), full_page=True)
