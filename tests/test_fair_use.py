"""The running app against attacker clients and a victim (gradio_client, `python app.py` as a Space:
SPACE_ID set). Model work is tiny-llama training (random weights, CPU) so the jobs are real but short.

Checks #24's "done when": the victim's design edit answers in < 2 s while attackers hold the model;
a visitor's second model job is refused in one line; Stop and a dropped client free the worker
(the next job starts within seconds); typed server paths are refused in Space mode.
"""
import time

import pytest

pytestmark = pytest.mark.slow
OPTS = (0, 0, 4, "", None, "segment")
TRAIN = ("kv_retrieval", 200, 1e-3, False, "next_token", True, "tiny-llama")  # 2 x 200 steps + scoring


@pytest.fixture(scope="module")
def space_app():
    from conftest import running_app

    with running_app(SPACE_ID="maskstudio/test", MASKSTUDIO_TRAIN_MAX_STEPS="200", MASKSTUDIO_RENDER_PROCESSES="0") as url:
        yield url


def client(url):
    from gradio_client import Client

    c = Client(url, verbose=False, download_files=False)
    c.predict("kv_retrieval", *OPTS, api_name="/train_template")
    return c


def started(job, timeout=60.0):
    """Wait until the job's status says it runs (not waiting in the model queue)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = job.status()
        desc = (st.progress_data[-1].desc or "") if st.progress_data else ""
        if st.code.name in ("PROCESSING", "PROGRESS") and desc and "waiting" not in desc and "starting" not in desc:
            return time.time()
        if job.done():
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"job did not start in {timeout} s: {job.status()}")


def test_attackers_cannot_stall_a_victim(space_app):
    attackers = [client(space_app) for _ in range(3)]
    victim = client(space_app)
    jobs = [a.submit(*TRAIN, api_name="/train") for a in attackers]
    started(jobs[0])
    # a visitor's second model job: refused at once, in one line
    t0 = time.perf_counter()
    error, text, _ = attackers[0].predict(*TRAIN, api_name="/train")
    took = time.perf_counter() - t0
    assert "already have a model job" in error and "\n" not in error and not isinstance(text, str) and took < 2, (error, took)
    # the victim's design edits answer while the model is busy
    for preset in ("prefix_lm", "streaming_llm", "multiverse"):
        t0 = time.perf_counter()
        out = victim.predict(preset, *OPTS, api_name="/load_preset")
        edit = time.perf_counter() - t0
        print(f"victim edit ({preset}) with 3 model jobs queued: {edit:.2f} s")
        assert out[6] == "" and edit < 2.0
    # Stop ends the running job within ~2 s and the next one starts
    t0 = time.perf_counter()
    assert attackers[0].predict(api_name="/stop").startswith("stopping")
    error, text, _ = jobs[0].result(timeout=60)
    stop_s = time.perf_counter() - t0
    print(f"Stop -> job ended in {stop_s:.2f} s: {error or text[:80]!r}")
    assert stop_s < 3.0 and ("stopped" in text or "stopped" in error)
    started(jobs[1], timeout=10)
    # a client that goes away (its event cancelled) frees the worker too
    t0 = time.perf_counter()
    jobs[1].cancel()
    started(jobs[2], timeout=10)
    print(f"cancelled client -> next job running after {time.perf_counter() - t0:.2f} s")
    # the victim's own job is admitted and runs once its turn comes (fair share: after the one ahead)
    vjob = victim.submit(*TRAIN, api_name="/train")
    attackers[2].predict(api_name="/stop")
    t0 = time.time()
    started(vjob, timeout=20)
    print(f"victim's job started {time.time() - t0:.2f} s after the last attacker stopped")
    victim.predict(api_name="/stop")
    vjob.result(timeout=60)


@pytest.mark.parametrize("path", ["/etc", "./maskstudio", "../", "tests/data", "~/.cache"])
def test_space_refuses_server_paths_in_one_line(space_app, path):
    from gradio_client import Client

    c = Client(space_app, verbose=False, download_files=False)
    t0 = time.perf_counter()
    out = c.predict(path, 0, None, api_name="/run_model")
    assert "never a path on the server" in out[0] and "\n" not in out[0] and time.perf_counter() - t0 < 3
