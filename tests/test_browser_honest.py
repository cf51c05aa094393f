"""#23 items 1 and 4 in the browser: text longer than its declared length is said on the picture
and the checks, and one click makes the Mask view the run's layout; an edited task template is
renamed, and the Train tab's table shows the whole new name. Headless Chromium (see test_browser)."""
import json
import re

import pytest

from conftest import app_page
from test_browser import ART, edit_cell, editor_text, error_badges, src, wait_src_change

pytestmark = pytest.mark.browser
LONG = "The quick brown fox jumps over the lazy dog, twice over, and then once more."
QUESTION = " Who jumps?"


@pytest.fixture(scope="module")
def page(app_url):
    with app_page(app_url, height=1100) as pg:
        yield pg


def apply_json(page, spec: dict) -> None:
    before = src(page)
    page.get_by_role("tab", name="JSON").click()
    page.locator("#json-editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(json.dumps(spec))
    page.locator("#apply-json").click()
    wait_src_change(page, before)
    page.get_by_role("tab", name="Tables").click()


def checks_text(page) -> str:
    page.get_by_role("tab", name="Checks").click()
    text = page.locator("#checks textarea").input_value()
    page.get_by_role("tab", name="Mask").click()
    return text


def test_text_longer_than_declared_is_said_and_one_click_sizes_it_as_the_run(page):
    from maskstudio import Spec
    from maskstudio.run.inputs import sized_by_tokenizer
    from maskstudio.run.models import load_tokenizer

    spec = {"name": "declared sizes", "segments": [
        {"name": "doc", "modality": "text", "length": 8, "text": LONG},
        {"name": "question", "modality": "text", "length": 8, "text": QUESTION},
        {"name": "answer", "modality": "text", "length": 4, "role": ["generate"]}]}
    run, _ = sized_by_tokenizer(Spec.load(spec), load_tokenizer(None))  # what a run on the default model lays out
    doc = run.segments[0]["length"]
    assert doc > 8 and run.n != 20
    apply_json(page, spec)
    note = page.locator("#note")
    note.get_by_text("Declared sizes differ").wait_for()
    assert f"doc 8 → {doc}" in note.inner_text() and note.inner_text().count("Declared sizes differ") == 1
    assert page.locator("#adopt-sizes").is_visible()
    page.screenshot(path=str(ART / "browser-declared-sizes.png"))
    checks = checks_text(page)
    assert checks.startswith("Declared sizes differ") and re.search(r"^tokens\s+20$", checks, re.M)
    before = src(page)
    page.locator("#adopt-sizes").click()
    wait_src_change(page, before)
    page.wait_for_function("() => !document.querySelector('#note').innerText.includes('Declared sizes differ')")
    assert not page.locator("#adopt-sizes").is_visible()
    checks = checks_text(page)
    assert re.search(rf"^tokens\s+{run.n}$", checks, re.M) and "Declared sizes differ" not in checks
    assert json.loads(editor_text(page))["segments"] == run.to_dict()["segments"]
    page.screenshot(path=str(ART / "browser-adopt-sizes.png"))
    assert error_badges(page) == 0


def test_an_edited_template_is_renamed_and_trained_under_its_whole_name(page):
    page.get_by_role("tab", name="Run").click()
    page.locator("#model-id input, #model-id textarea").first.fill("tiny-llama")
    page.get_by_role("tab", name="Train").click()
    before = src(page)
    page.get_by_role("button", name="Load the task's template into the design").locator("visible=true").click()
    wait_src_change(page, before)
    assert json.loads(editor_text(page))["name"] == "kv_retrieval (causal)"
    before = src(page)
    edit_cell(page, "#rules [data-testid='cell-0-3']", "full")  # the base pattern: an edit of the template
    wait_src_change(page, before)
    assert json.loads(editor_text(page))["name"] == "kv_retrieval (edited)"
    assert "kv_retrieval (edited)" in page.locator("#preset-card").inner_text()
    steps = page.locator("#train-steps input[type=number]")
    steps.fill("1")
    steps.press("Enter")
    page.locator("#train-btn").click()
    page.wait_for_function("() => (document.querySelector('#train-text textarea')?.value || '').includes('after 1 steps')",
                           timeout=240_000)
    text = page.locator("#train-text textarea").input_value()
    assert "design: kv_retrieval (edited)" in text and "(causal)" not in text.replace("causal baseline", "")
    page.screenshot(path=str(ART / "browser-edited-template.png"))
    assert error_badges(page) == 0
