"""Shared fixtures. Tiers: default (fast), `model`, `browser`, `slow` — CI runs all of them."""
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # apt-get install chromium; never `playwright install`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
GOLDENS = ROOT / "tests" / "data" / "goldens.json"  # copy of ../shared/reference/goldens.json


@pytest.fixture(scope="session")
def goldens():
    """Golden matrices from the authors' code (../shared/reference/goldens.json)."""
    return json.loads(GOLDENS.read_text())


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per test session."""
    from maskstudio.run import load_model

    return load_model()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_maskstudio(args: list, processes: int = 1) -> subprocess.CompletedProcess:
    """`python -m maskstudio ARGS`, under torchrun with `processes` > 1 (gloo, a free port, one
    thread each); fails the test when it fails."""
    cmd = [sys.executable, "-m", "maskstudio", *args]
    if processes > 1:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        if torchrun is None:
            pytest.fail("torchrun is not installed next to this Python")
        cmd = [torchrun, f"--nproc_per_node={processes}", f"--master_port={free_port()}", "-m", "maskstudio", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def launch_app(timeout: float = 120):
    """Start `python app.py` on a free port; returns (process, url). The caller terminates it."""
    port = free_port()
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    log = open(ROOT / "artifacts" / f"app-{port}.log", "w") if (ROOT / "artifacts").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    raise RuntimeError("app.py did not come up")


def stop_app(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def running_app(**env):
    """`python app.py` with these environment variables added (SPACE_ID=... for a Space); yields its url."""
    (ROOT / "artifacts").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        proc, url = launch_app()
    try:
        yield url
    finally:
        stop_app(proc)


@contextlib.contextmanager
def app_page(url: str, height: int = 1200, width: int = 1600, prepare=None, **context):
    """A headless Chromium page (Debian's, never a downloaded one) on the app, its first picture drawn.
    `prepare(page)` runs before the page opens the app (a request watcher); `context`: new_context's options."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not pathlib.Path(CHROMIUM).exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)("Debian's chromium is missing: bash scripts/setup.sh --dev")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": width, "height": height}, **context).new_page()
            page.set_default_timeout(60_000)
            if prepare is not None:
                prepare(page)
            page.goto(url)
            page.wait_for_selector("#mask-img img")
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="session")
def app_url():
    """One `python app.py` for the client and browser tests (sessions are isolated by gradio)."""
    with running_app() as url:
        yield url
