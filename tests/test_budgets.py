"""Per-session budgets (issue #28): disk (downloads, exports, run pictures), memory (undo, caches,
decoded images) and the error paths that reached the filesystem (lone surrogates, long names).

Three tiers: handler-level tests (no gradio), the CLI in a subprocess (no traceback, one line),
and client-driven tests (`slow`) against `python app.py` started here with small budgets and its
own Gradio temp folder, so every byte the app writes can be counted.
"""
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from maskstudio import Spec, knobs, studio
from maskstudio.studio import budget

ROOT = Path(__file__).resolve().parents[1]
OPTS = (0, 0, 4, "", None, "segment")  # layer, head, reach layers, reach token, distance query, flow level
VLM_DESIGN = {"name": "vqa", "segments": [{"name": "p", "text": "look"}, {"name": "img", "modality": "image",
              "grid": [2, 2]}, {"name": "q", "text": " what is this?"}], "mask": {"base": {"pattern": "causal"}}}


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("MASKSTUDIO_RENDER_PROCESSES", "0")


def bomb_png(path, width: int, height: int) -> str:
    """A valid RGB PNG of zeros: ~1000x smaller on disk than decoded (9400 x 9400: 258 KB -> 265 MB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(9), bytes(1 + 3 * width)
    rows = max(1, (8 << 20) // len(row))
    idat = b"".join(comp.compress(row * min(rows, height - y)) for y in range(0, height, rows)) + comp.flush()
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def one_clean_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text and "/tmp" not in text


def session_bytes(session_id) -> int:
    with budget.session(session_id):
        return budget.folder_bytes(budget.session_folder())


# ---------------------------------------------------------------- names that reach the filesystem
@pytest.mark.parametrize("name, expected", [
    ("a\ud800b", "a_b"), ("déjà vu", "deja_vu"), ("../../etc/passwd", "etc_passwd"), ("\ud800", "spec"),
    ("𝐀" * 300, "A" * knobs.STEM_MAX), ("名前" * 200, "spec"), (".hidden", "hidden")])
def test_file_names_from_user_strings_are_ascii_and_bounded(name, expected):
    stem = budget.safe_stem(name, "spec")
    assert stem == expected and stem.isascii() and len(stem) <= knobs.STEM_MAX


def test_long_and_odd_names_export_and_download_under_short_ascii_names(tmp_path):
    for i, name in enumerate(("𝐀" * 300, "é" * 300, "x" * 5000)):
        spec = {"name": name, "segments": [{"name": "b" * 300, "length": 4}], "mask": {"base": {"pattern": "causal"}}}
        state = studio.new_state(spec)
        for fmt in ("json", "flex", "npy") + (("png",) if i == 0 else ()):
            path, note = studio.export_for_state(state, fmt)
            assert path is not None, note
            assert os.path.basename(path).isascii() and len(os.path.basename(path).encode()) < 100


def test_lone_surrogates_are_one_line_json_safe_errors_in_the_app():
    state = studio.new_state()
    for bad in ({"name": "x\ud800"}, {"segments": [{"name": "\ud800", "length": 3}]},
                {"segments": [{"name": "a", "length": 3, "text": "\udfff"}]}):
        spec = {"segments": [{"name": "a", "length": 3}], "mask": {"base": {"pattern": "causal"}}, **bad}
        new, error = studio.apply_json_edit(state, json.dumps(spec))
        assert new["spec"] is state["spec"] and one_clean_line(error) and "lone surrogate" in error  # the design kept
        error.encode("utf-8")  # what Gradio sends as JSON: no surrogate left in the line


def test_api_inputs_that_are_not_text_are_made_text():
    """app.py passes every handler input through plain_text: a lone surrogate sent as a JSON escape
    through the API becomes U+FFFD, so it reaches no tokenizer (a TypeError before) or error line."""
    assert budget.plain_text(["a\ud800", ("b", "\udfff"), [["c\udc00"]], 3]) == ["a\ufffd", ("b", "\ufffd"), [["c\ufffd"]], 3]
    assert budget.plain_text(None) is None


def test_compare_with_an_unknown_design_names_no_server_folder():
    error = studio.compare_static(studio.new_state(), "nope")["error"]
    assert one_clean_line(error) and "no preset named 'nope'" in error and str(ROOT) not in error


def test_os_errors_are_said_without_server_paths():
    err = OSError(36, "File name too long", "/tmp/maskstudio-app-x/export/abc/" + "n" * 300 + ".json")
    line = budget.disk_error_line(err)
    assert one_clean_line(line) and "File name too long" in line and "maskstudio-app" not in line


# ---------------------------------------------------------------- disk
def test_export_clicks_reuse_one_file_per_session():
    """200 export clicks over four formats and two designs: the session holds one export at a time,
    and a repeated click hands back the same file (written once)."""
    states = [studio.new_state({"name": f"d{i}", "segments": [{"name": "a", "length": 40 + i}],
                                "mask": {"base": {"pattern": "causal"}}}) for i in range(2)]
    formats = ("json", "flex", "npy", "positions")
    largest = 0
    with budget.session("export-clicks"):
        first, _ = studio.export_for_state(states[0], "json")
        assert studio.export_for_state(states[0], "json")[0] == first
        mtime = os.path.getmtime(first)
        for click in range(200):
            path, note = studio.export_for_state(states[click % 2], formats[click % 4])
            assert path is not None, note
            largest = max(largest, os.path.getsize(path))
            files = [f for _, _, fs in os.walk(budget.session_folder()) for f in fs if not f.startswith(".")]
            assert files == [os.path.basename(path)]  # one export kept per session
        again, _ = studio.export_for_state(states[1], formats[199 % 4])
        assert again == path and os.path.getmtime(again) >= mtime
    assert session_bytes("export-clicks") <= largest + 4096 < knobs.SESSION_DISK_BYTES


def test_exports_past_the_session_budget_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(knobs, "SESSION_DISK_BYTES", 64 << 10)
    state = studio.new_state({"segments": [{"name": "a", "length": 1000}], "mask": {"base": {"pattern": "causal"}}})
    with budget.session("small-budget"):
        path, error = studio.export_for_state(state, "npy")  # 1000 x 1000 booleans: 1 MB
        assert path is None and one_clean_line(error)
        assert "64 KiB" in error and "disk budget" in error
        assert budget.folder_bytes(budget.session_folder()) == 0  # refused before anything was written
        assert studio.export_for_state(state, "json")[0] is not None  # small exports still work


def test_process_budget_refuses_when_the_app_folder_is_full(monkeypatch):
    monkeypatch.setattr(knobs, "PROCESS_DISK_BYTES", budget.folder_bytes(budget.WORKDIR) + 10)
    state = studio.new_state({"segments": [{"name": "a", "length": 64}], "mask": {"base": {"pattern": "causal"}}})
    with budget.session("full-server"):
        path, error = studio.export_for_state(state, "npy")
    assert path is None and one_clean_line(error) and "server's disk budget" in error


@pytest.mark.slow  # subprocesses / a tiny VLM run: seconds; the fast tier keeps a 50 s budget
def test_run_downloads_200_clicks_write_one_set_of_files(tmp_path):
    """The issue's attack: every 'Download the run' click wrote a new file. Now 200 clicks hand back
    the same two files, written once, and the session's bytes stay those of one run."""
    state = studio.new_state(VLM_DESIGN)
    with budget.session("downloader"):
        state, out = studio.run_model(state, "tiny-qwen2-vl", 0)
        assert out["error"] == ""
        files, _ = studio.run_download(state)
        one_run = sum(os.path.getsize(f) for f in files)
        written = {f: os.stat(f).st_ino for f in files}
        for _ in range(200):
            again, note = studio.run_download(state)
            assert again == files, note
        assert {f: os.stat(f).st_ino for f in files} == written  # the same files, never rewritten
        folder = budget.session_folder()
    run_bytes = budget.folder_bytes(os.path.join(folder, "run"))
    assert one_run <= run_bytes <= one_run + 1024 and session_bytes("downloader") <= knobs.SESSION_DISK_BYTES


def test_run_download_past_the_session_budget_is_refused(monkeypatch):
    state = studio.new_state(VLM_DESIGN)
    with budget.session("tight"):
        state, out = studio.run_model(state, "tiny-qwen2-vl", 0)
        monkeypatch.setattr(knobs, "SESSION_DISK_BYTES", 1024)
        files, error = studio.run_download(state)
    assert files is None and one_clean_line(error) and "1 KiB" in error


def test_run_pictures_keep_the_newest_per_session(monkeypatch):
    from maskstudio.viz import new_figure

    monkeypatch.setattr(knobs, "SESSION_PICTURES", 8)
    with budget.session("pictures"):
        paths = [studio.figure_png(new_figure((1, 1))) for _ in range(40)]
        folder = os.path.join(budget.session_folder(), "pictures")
    assert len(os.listdir(folder)) == 8 and all(os.path.exists(p) for p in paths[-8:])


def test_files_outside_a_session_still_work():
    state = studio.new_state({"segments": [{"name": "a", "length": 8}], "mask": {"base": {"pattern": "causal"}}})
    a, b = studio.export_for_state(state, "json")[0], studio.export_for_state(state, "json")[0]
    assert a != b and os.path.exists(a) and os.path.exists(b)  # scripts and tests: a fresh folder each


# ---------------------------------------------------------------- memory
def test_oversized_images_are_refused_before_decoding(tmp_path):
    """A 9400 x 9400 PNG of 258 KB decodes to 265 MB: refused from its header, with the limit said,
    before any model loads (the model named here does not exist), allocating almost nothing."""
    big = bomb_png(tmp_path / "img.png", 9400, 9400)
    assert os.path.getsize(big) < 300_000
    tracemalloc.start()
    try:
        state, out = studio.run_model(studio.new_state(VLM_DESIGN), "no-such-model", 0, images=[big])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert one_clean_line(out["error"]) and f"{knobs.IMAGE_MAX_PIXELS:,} pixels" in out["error"]
    assert "img.png" in out["error"] and "no-such-model" not in out["error"]
    assert peak < 16 << 20  # decoding would have taken 265 MB
    wide = bomb_png(tmp_path / "wide.png", 5000, 4000)  # 20 M pixels: past the limit, under PIL's bomb check
    assert "5000 x 4000" in budget.image_problem([wide])
    assert "not an image" in budget.image_problem([__file__])


def test_images_together_are_bounded_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr(knobs, "RUN_IMAGE_MAX_PIXELS", 3 * 64 * 64)
    frames = [bomb_png(tmp_path / f"clip_{i}.png", 64, 64) for i in range(4)]
    assert "together" in budget.image_problem(frames) and budget.image_problem(frames[:3]) == ""


def test_undo_is_bounded_by_bytes_after_100_edits(monkeypatch):
    """100 edits of a design with 300 KB of text: undo keeps what fits in knobs.HISTORY_BYTES (here
    2 MiB), measured by the accountant and by tracemalloc, and says so when it runs out."""
    monkeypatch.setattr(knobs, "HISTORY_BYTES", 2 << 20)

    def design(i):
        return json.dumps({"name": f"v{i}", "segments": [{"name": "doc", "length": 4, "text": f"{i} " + "x" * 300_000}],
                           "mask": {"base": {"pattern": "causal"}}})
    state = studio.new_state()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            state, error = studio.apply_json_edit(state, design(i))
            assert error == ""
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert sum(state["history_bytes"]) <= knobs.HISTORY_BYTES
    assert budget.deep_bytes(state["history"]) <= knobs.HISTORY_BYTES
    assert held < knobs.HISTORY_BYTES + (2 << 20)  # the history plus the current design; 30 kept would be 9 MB
    steps = 0
    while True:
        state, error = studio.undo(state)
        if error:
            break
        steps += 1
    assert 1 <= steps < knobs.HISTORY and one_clean_line(error) and "2 MiB" in error


def test_undo_keeps_its_count_limit_for_small_designs():
    state = studio.new_state()
    for i in range(knobs.HISTORY + 5):
        state, _ = studio.apply_json_edit(state, json.dumps({"segments": [{"name": "a", "length": 2 + i}]}))
    assert len(state["history"]) == knobs.HISTORY and studio.undo(studio.new_state())[1] == "nothing to undo"


def test_caches_are_bounded_by_bytes():
    import numpy as np

    cache = studio.Cache(100, max_bytes=10 << 20, sizeof=budget.deep_bytes)
    for i in range(10):
        cache.put(i, np.zeros(3 << 20, dtype=np.uint8))
    assert len(cache) == 3 and cache.nbytes <= 10 << 20 and cache.get(9) is not None
    cache.put("huge", np.zeros(20 << 20, dtype=np.uint8))  # larger than the budget: kept alone
    assert len(cache) == 1 and cache.get("huge") is not None


def test_deep_bytes_counts_tensors_pictures_and_specs():
    import torch
    from PIL import Image

    assert budget.deep_bytes(torch.zeros(1000, dtype=torch.float32)) == 4000
    assert budget.deep_bytes({"a": Image.new("RGB", (100, 50))}) >= 15000
    spec = Spec.load({"segments": [{"name": "a", "length": 4, "text": "y" * 100_000}]})
    assert 100_000 < budget.deep_bytes(spec) < 200_000


def test_a_session_keeps_one_run_and_its_pictures_small(tmp_path):
    from maskstudio.studio import actions

    photo = bomb_png(tmp_path / "photo.png", 3000, 2000)
    state = studio.new_state(VLM_DESIGN)
    state, out = studio.run_model(state, "tiny-qwen2-vl", 0, images=[photo])
    assert out["error"] == ""
    first = state["run_id"]
    frame = studio.get_run(state).visuals["img"]["frames"][0]
    assert max(frame.size) == knobs.RUN_FRAME_SIDE  # kept downscaled for the overlay, not 18 MB of pixels
    state, out = studio.run_model(state, "tiny-qwen2-vl", 0)
    assert actions._RUNS.get(first) is None and studio.get_run(state) is not None


# ---------------------------------------------------------------- the CLI's error paths
def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskstudio", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd or ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # subprocesses / a tiny VLM run: seconds; the fast tier keeps a 50 s budget
def test_cli_render_refuses_lone_surrogates_in_one_line(tmp_path):
    for where in ({"name": "x\ud800"}, {"segments": [{"name": "a\ud800", "length": 4}]}):
        spec = {"segments": [{"name": "a", "length": 4}], "mask": {"base": {"pattern": "causal"}}, **where}
        path = tmp_path / "s.json"
        path.write_text(json.dumps(spec))  # ASCII JSON with the escape "\ud800", as an attacker sends it
        for args in (["render", str(path), "-o", str(tmp_path / "o.png")], ["export", str(path), "--format", "flex"]):
            res = cli(*args)
            err = res.stderr.strip()
            assert res.returncode == 2 and "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
            assert "lone surrogate" in err and not (tmp_path / "o.png").exists()


@pytest.mark.slow  # subprocesses / a tiny VLM run: seconds; the fast tier keeps a 50 s budget
def test_cli_long_names(tmp_path):
    """A 300-character design and segment name render and export; an output name past the file
    system's limit is one short line (exit 2), never a traceback."""
    spec = {"name": "𝐀" * 300, "segments": [{"name": "n" * 300, "length": 4}], "mask": {"base": {"pattern": "causal"}}}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(spec))
    ok = cli("render", str(path), "-o", str(tmp_path / "o.png"))
    assert ok.returncode == 0 and (tmp_path / "o.png").exists(), ok.stderr
    for args in (["render", str(path), "-o", "n" * 300 + ".png"], ["export", str(path), "-o", "n" * 300 + ".json"]):
        res = cli(*args, cwd=tmp_path)
        err = res.stderr.strip()
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
        assert "File name too long" in err and len(err) < 160


# ---------------------------------------------------------------- the running app (client-driven)
@pytest.fixture(scope="module")
def small_app(tmp_path_factory):
    """`python app.py` with its own Gradio temp folder and small budgets: (url, process, temp folder)."""
    from conftest import launch_app

    temp = tmp_path_factory.mktemp("gradio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(temp))
        mp.setenv("MASKSTUDIO_SESSION_DISK_BYTES", str(1 << 20))
        mp.setenv("MASKSTUDIO_HISTORY_BYTES", str(4 << 20))
        mp.setenv("MASKSTUDIO_RENDER_PROCESSES", "0")
        mp.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))  # megabyte strings freed go back to the OS: RSS = live
        (ROOT / "artifacts").mkdir(exist_ok=True)
        proc, url = launch_app()
    yield url, proc, temp
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def _path(f):
    return f["path"] if isinstance(f, dict) else f


def _memory(proc, field: str) -> int:
    """VmRSS / VmHWM of the app's process, bytes."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _server_folder(temp, client) -> Path:
    with budget.session(client.session_hash):
        sid = os.path.basename(budget.session_folder())
    found = list(Path(temp).glob(f"maskstudio-app-*/sessions/{sid}"))
    assert len(found) == 1, found
    return found[0]


def _bytes(path) -> int:
    return budget.folder_bytes(str(path))


@pytest.mark.slow
def test_app_refuses_an_oversized_image_before_decoding(small_app, tmp_path):
    url, proc, _ = small_app
    c = _client(url)
    c.predict(json.dumps(VLM_DESIGN), *OPTS, api_name="/edit_json")
    from gradio_client import handle_file

    big = bomb_png(tmp_path / "img.png", 9400, 9400)
    rss, peak = _memory(proc, "VmRSS"), _memory(proc, "VmHWM")
    t0 = time.time()
    out = c.predict("tiny-qwen2-vl", 0, [handle_file(big)], api_name="/run_model")
    error = out[0]
    assert error.startswith("⚠ ") and one_clean_line(error) and f"{knobs.IMAGE_MAX_PIXELS:,} pixels" in error
    assert time.time() - t0 < 30
    assert _memory(proc, "VmHWM") - peak < 64 << 20 and _memory(proc, "VmRSS") - rss < 64 << 20  # not 265 MB


@pytest.mark.slow
def test_app_200_download_clicks_stay_within_the_session_budget(small_app):
    """One run on the tiny VLM, then 200 'Download the run' clicks and 100 export clicks (four
    formats): the session's folder stays under its 1 MiB budget and the whole Gradio temp folder
    does not grow per click (Gradio serves our files, it copies none)."""
    url, _, temp = small_app
    c = _client(url)
    c.predict(json.dumps(VLM_DESIGN), *OPTS, api_name="/edit_json")
    out = c.predict("tiny-qwen2-vl", 0, None, api_name="/run_model")
    assert out[0] == ""
    files, _ = c.predict(api_name="/download_run")
    folder = _server_folder(temp, c)
    after_first = _bytes(temp)
    sizes = []
    for _ in range(200):
        again, msg = c.predict(api_name="/download_run")
        assert [_path(f) for f in again] == [_path(f) for f in files], msg
        sizes.append(_bytes(folder))
    assert max(sizes) <= 1 << 20 and _bytes(temp) == after_first
    for click in range(100):
        path, msg = c.predict(("json", "flex", "npy", "positions")[click % 4], 0, 0, api_name="/export")
        assert path is not None, msg
        sizes.append(_bytes(folder))
    assert max(sizes) <= 1 << 20 and _bytes(temp) - after_first < 64 << 10


@pytest.mark.slow
def test_app_refuses_an_export_past_the_session_budget(small_app):
    url, _, temp = small_app
    c = _client(url)
    spec = {"name": "wide", "segments": [{"name": "a", "length": 2048}], "mask": {"base": {"pattern": "causal"}}}
    c.predict(json.dumps(spec), *OPTS, api_name="/edit_json")
    before = _bytes(temp)
    path, msg = c.predict("npy", 0, 0, api_name="/export")  # 2048 x 2048 booleans: 4 MiB
    assert path is None and msg.startswith("⚠ ") and one_clean_line(msg) and "1 MiB" in msg
    assert _bytes(temp) - before < 64 << 10  # refused before it was built or written


@pytest.mark.slow
def test_app_undo_memory_stays_under_its_budget_after_100_edits(small_app):
    """100 JSON edits of a design holding 2 MB of text: undo goes back only as far as 4 MiB allows
    (then says so), and the server's resident memory grows less than 32 MiB over the last 97 edits
    (undo unbounded by bytes keeps 30 designs: ~70 MiB more)."""
    url, proc, _ = small_app
    c = _client(url)

    def design(i):
        return json.dumps({"name": f"v{i}", "segments": [{"name": "doc", "length": 8, "text": f"{i} " + "x" * 2_000_000},
                                                         {"name": "q", "length": 4}],
                           "mask": {"base": {"pattern": "causal"}}})
    for i in range(3):
        c.predict(design(i), *OPTS, api_name="/edit_json")
    rss = _memory(proc, "VmRSS")
    for i in range(3, 100):
        out = c.predict(design(i), *OPTS, api_name="/edit_json")
        assert out[6] == ""
    grown = _memory(proc, "VmRSS") - rss
    steps, error = 0, ""
    while steps < 40:
        out = c.predict(*OPTS, api_name="/undo")
        error = out[6]
        if error:
            break
        steps += 1
    assert 1 <= steps <= 2 and one_clean_line(error) and "4 MiB" in error
    assert grown < 32 << 20, f"the server grew {grown >> 20} MiB over 97 edits"
