"""User text is text (#24 item 4): a shared spec whose name, description, segment names and bad
values hold `<img src=...>`, a Markdown image and `<script>` shows them as literal characters in
every place the page writes them (design card, picture note, error lines, density and segment
tables, the Positions query line, the snapshot line, the export message), and the browser fetches
nothing from the attacker's address: a local HTTP server counts hits and Playwright watches every
request the page makes. A control image proves the watch sees a real fetch."""
import http.server
import json
import threading
import time

import pytest

from conftest import ROOT, free_port
from conftest import app_page
from test_browser import src, wait_src_change

pytestmark = pytest.mark.browser


class Hits(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 -- http.server's name
        Hits.seen.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def trap():
    """(port, hits): a server on 127.0.0.1 that records every path asked of it."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port, Hits.seen
    server.shutdown()


def hostile(port: int, where: str) -> str:
    return (f"<img src=http://127.0.0.1:{port}/{where}> ![{where}](http://127.0.0.1:{port}/{where}-md) "
            f"<script>window.__pwned = '{where}'</script>")


@pytest.fixture(scope="module")
def page(app_url, trap):
    def watch(pg):  # every request to the trap's port, from before the app loads
        pg.requests_to_trap = []
        pg.on("request", lambda r: pg.requests_to_trap.append(r.url) if f":{trap[0]}/" in r.url else None)

    with app_page(app_url, height=1100, prepare=watch) as pg:
        yield pg


def test_the_watch_sees_a_real_fetch(trap, page):
    """The detector is not blind: a plain <img> on a blank page reaches the server and the listener."""
    port, hits = trap
    other = page.context.new_page()
    seen = []
    other.on("request", lambda r: seen.append(r.url))
    other.set_content(f'<img src="http://127.0.0.1:{port}/control">')
    other.wait_for_timeout(500)
    other.close()
    assert "/control" in hits and any(u.endswith("/control") for u in seen)
    hits.remove("/control")


def test_injection_strings_render_as_literal_text_and_load_nothing(trap, page, tmp_path):
    port, hits = trap
    seg = f"<img src=http://127.0.0.1:{port}/seg>![s](http://127.0.0.1:{port}/seg-md)"
    spec = {"name": hostile(port, "name"), "description": hostile(port, "desc"),
            "segments": [{"name": seg, "text": "a few words of text to size"}, {"name": "b", "length": 4}],
            "mask": {"base": {"pattern": "causal"}}}
    f = tmp_path / "shared.json"
    f.write_text(json.dumps(spec))
    before = src(page)
    page.get_by_role("tab", name="Export / Import").click()
    page.locator("#upload input[type=file]").set_input_files(str(f))
    wait_src_change(page, before)
    page.locator("#preset-card").get_by_text(f"<img src=http://127.0.0.1:{port}/name>").wait_for()
    card = page.locator("#preset-card").inner_text()
    assert f"![name](http://127.0.0.1:{port}/name-md)" in card and "<script>window.__pwned = 'desc'</script>" in card
    # the picture note names the text segment sized from its words (estimated, or by the tokenizer once
    # the app's model has loaded: an earlier test's run may have loaded it) -- as literal text either way
    note = page.locator("#note").inner_text()   # inside <small> too
    assert f"sizes of {seg} are estimated" in note or f"sizes of {seg} come from the loaded model's tokenizer" in note
    # the tables: the segment's name in the segments table and the density table's headers
    for table, tab in (("#segments", "Tables"), ("#density", "Flow")):  # a cell's text, and a column's header
        page.get_by_role("tab", name=tab).click()
        page.locator(table).get_by_text(seg, exact=False).first.wait_for(state="attached")
        assert seg in page.locator(table).inner_text()
    page.get_by_role("tab", name="Checks").click()
    assert spec["name"] in page.locator("#checks textarea").input_value()
    # a typed query segment that does not exist: its error line
    page.get_by_role("tab", name="Positions").click()
    page.locator("#query input").fill(hostile(port, "query"))
    page.locator("#query input").press("Enter")
    page.locator("#query-error").get_by_text(f"<img src=http://127.0.0.1:{port}/query>", exact=False).wait_for()
    # the snapshot line (the design's name in bold) and the export's error line (the unsized segment's name)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#snapshot").click()
    page.get_by_text(f"Snapshot kept as B: <img src=http://127.0.0.1:{port}/name>", exact=False).wait_for()
    page.get_by_role("tab", name="Export / Import").click()
    page.get_by_label("mask .npy").check()
    page.locator("#export-btn").click()
    if "come from the loaded model's tokenizer" in note:   # sized by the tokenizer: the export says so
        page.locator("#export-message").get_by_text("segment sizes come from the loaded model's tokenizer").wait_for()
    else:                                                    # else its error line names the unsized segment
        page.locator("#export-message").get_by_text(f"{seg} have text but no size", exact=False).wait_for()
    # a bad value in the JSON editor: the error line quotes it
    bad = json.dumps({"segments": [{"name": "a", "length": hostile(port, "value")}]})
    page.get_by_role("tab", name="JSON").click()
    page.locator("#json-editor .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(bad)
    page.locator("#apply-json").click()
    page.locator("#json-error").get_by_text(f"<img src=http://127.0.0.1:{port}/value>", exact=False).wait_for()
    assert f"![value](http://127.0.0.1:{port}/value-md)" in page.locator("#json-error").inner_text()
    page.screenshot(path=str(ROOT / "artifacts" / "browser-injection.png"), full_page=True)
    time.sleep(1.0)  # anything the page would load has been asked for by now
    assert page.locator(f"img[src*=':{port}/']").count() == 0 and page.locator(f"a[href*=':{port}/']").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.requests_to_trap == [] and hits == [], (page.requests_to_trap, hits)
