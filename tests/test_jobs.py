"""Fair model jobs (studio.jobs), cooperative Stop (progress), safe model names and the bounded
model cache (run.models): fast, no model loaded except tiny random ones."""
import os
import threading
import time

import pytest

from maskstudio import knobs, progress
from maskstudio.run import models
from maskstudio.studio import jobs


def test_tick_outside_a_job_never_stops_and_reports_nothing():
    assert progress.tick("token 1/2") is False and progress.stopped() == ""
    progress.check("anything")  # no job: no Stopped


def test_a_job_reports_and_stops_at_its_next_tick_keeping_its_loop_result():
    lines, done = [], []
    job = progress.Job(report=lines.append)
    with progress.running(job):
        for i in range(100):
            if progress.tick(f"step {i + 1}/100"):
                break
            done.append(i)
            if i == 6:
                job.stop("stopped by you")
        assert progress.stopped() == "stopped by you"
        with pytest.raises(progress.Stopped, match="stopped by you"):
            progress.check()
    assert done == list(range(7)) and lines[-1] == "step 8/100"
    assert progress.current() is None


def test_deadline_and_departure_stop_a_job():
    job = progress.Job(deadline=time.monotonic() - 1, budget_s=5)
    assert job.should_stop() and "time budget (5 s)" in job.reason
    here = [True]
    job = progress.Job(alive=lambda: here[0])
    assert not job.should_stop()
    here[0] = False
    assert job.should_stop() and job.reason == "the visitor left"


def test_jobs_do_not_leak_between_threads():
    job = progress.Job()
    seen = []
    with progress.running(job):
        t = threading.Thread(target=lambda: seen.append(progress.current()))
        t.start()
        t.join()
    assert seen == [None]


def _start(queue, session, what, release, out, say=None):
    """A job that runs until `release` is set, in a thread; its answer / exception lands in `out`."""
    def work(_say):
        while not release.wait(0.02):
            if progress.tick("working 1/2"):
                return "stopped early"
        return "done"

    def target():
        try:
            out[session] = jobs.run_job(session, what, work, progress=say, queue=queue)
        except Exception as err:  # noqa: BLE001
            out[session] = err
    t = threading.Thread(target=target)
    t.start()
    return t


def _wait(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_one_job_at_a_time_first_come_first_served_and_one_per_session():
    q, out, release = jobs.Queue(), {}, threading.Event()
    said = []
    a = _start(q, "a", "run", release, out)
    _wait(lambda: q.busy() == 1 and "working" in q.line("a"))
    b = _start(q, "b", "train", release, out, say=lambda frac, desc=None: said.append(desc))
    _wait(lambda: q.busy() == 2)
    t0 = time.perf_counter()
    with pytest.raises(jobs.Refused, match="already have a model job"):  # the same visitor again: at once
        jobs.run_job("a", "knockout", lambda say: None, queue=q)
    assert time.perf_counter() - t0 < 0.1
    _wait(lambda: any("1 job(s) ahead" in (s or "") for s in said))
    assert "b" not in out  # b waits while a runs
    release.set()
    a.join(5), b.join(5)
    assert out == {"a": "done", "b": "done"} and q.busy() == 0
    assert q.line("a").startswith("run done in") and q.line("b").startswith("train done in")


def test_stop_ends_a_running_job_and_frees_the_worker_and_a_waiting_one_leaves_the_line():
    q, out, never = jobs.Queue(), {}, threading.Event()
    a = _start(q, "a", "run", never, out)
    _wait(lambda: "working" in q.line("a"))
    b = _start(q, "b", "run", never, out)
    _wait(lambda: q.busy() == 2)
    assert q.stop("b").startswith("stopping")       # b leaves the line before its turn
    b.join(3)
    assert isinstance(out["b"], progress.Stopped) and "waiting" in str(out["b"])
    t0 = time.perf_counter()
    q.stop("a")
    a.join(3)
    assert out["a"] == "stopped early" and time.perf_counter() - t0 < 1.0
    assert "stopped" in q.line("a") and "what was computed is shown" in q.line("a") and q.busy() == 0
    assert q.stop("a") == "nothing to stop"


def test_queue_full_and_visitor_budget_refuse_in_one_line(monkeypatch):
    q, out, release = jobs.Queue(), {}, threading.Event()
    monkeypatch.setattr(knobs, "MODEL_QUEUE_MAX", 1)
    a = _start(q, "a", "run", release, out)
    _wait(lambda: q.busy() == 1)
    with pytest.raises(jobs.Refused, match="queue is full"):
        jobs.run_job("b", "run", lambda say: None, queue=q)
    release.set()
    a.join(5)
    monkeypatch.setattr(knobs, "VISITOR_SECONDS", 0)
    with pytest.raises(jobs.Refused, match=r"model time in the last 60 min \(the limit here is 0 s\)"):
        jobs.run_job("a", "run", lambda say: None, queue=q)


def test_the_job_time_budget_stops_it_like_stop(monkeypatch):
    monkeypatch.setattr(knobs, "JOB_SECONDS", 0)
    q, out = jobs.Queue(), {}
    t = _start(q, "a", "run", threading.Event(), out)
    t.join(3)
    assert out["a"] == "stopped early" and "time budget (0 s)" in q.line("a")


def test_departed_visitor_stops_the_job():
    q, here = jobs.Queue(), [True]

    def work(say):
        while not progress.tick("x"):
            time.sleep(0.01)
        return progress.stopped()
    threading.Timer(0.2, lambda: here.__setitem__(0, False)).start()
    assert jobs.run_job("a", "run", work, alive=lambda: here[0], queue=q) == "the visitor left"


class _Event:
    def __init__(self, _id, alive):
        self._id, self.alive = _id, alive


class _GradioQueue:
    active_jobs = [None, [_Event("e1", True), _Event("e2", False)]]


def test_event_alive_reads_gradios_marks():
    q = _GradioQueue()
    assert jobs.event_alive(q, "e1")() and not jobs.event_alive(q, "e2")()
    assert jobs.event_alive(q, "never queued")()
    probe = jobs.event_alive(q, "e1")
    assert probe()
    q.active_jobs = [None]          # cancelled: Gradio dropped the event while our thread runs
    assert not probe()


# ---------------------------------------------------------------- model names and the cache
@pytest.mark.parametrize("name", ["/etc", "./models/x", "../x", "tests", "a/b/c", "~/m", "C:\\m"])
def test_a_space_never_loads_a_server_path(name):
    why = models.model_refusal(name, space=True, allowed="*")
    assert why and "never a path on the server" in why


def test_space_lists_and_local_folders(tmp_path):
    assert models.model_refusal("", space=True) is None and models.model_refusal("tiny-llama", space=True) is None
    assert models.model_refusal(models.DEFAULT_HUB_ID, space=True) is None
    assert "only these models" in models.model_refusal("Qwen/Qwen2-VL-2B-Instruct", space=True)
    assert models.model_refusal("Qwen/Qwen2-VL-2B-Instruct", space=True, allowed="*") is None
    assert models.model_refusal(str(tmp_path), space=False) is None  # locally a folder is fine
    assert "only these models" in models.model_refusal(str(tmp_path), space=False, allowed="tiny-llama")


def test_every_spelling_of_a_folder_is_one_key(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    keys = {models.model_key(n) for n in ("m", "m/", "./m", str(tmp_path / "m"), "/" + str(tmp_path / "m"),
                                          str(tmp_path) + "//m/.")}
    assert keys == {str(tmp_path / "m")}
    assert models.model_key("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.model_key("") is None


def _tiny_folder(path):
    """A tiny random Llama saved as a local model folder (config, weights, byte tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = models.byte_tokenizer(("<|endoftext|>",))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_one_folder_loads_once_whatever_its_spelling(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_MODELS", {})
    _tiny_folder(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    first = models.load_model("m", device="cpu")
    for name in ("m/", "./m", "//" + str(tmp_path / "m").lstrip("/"), str(tmp_path) + "/./m"):
        assert models.load_model(name, device="cpu") is first
    assert len(models.loaded_models()) == 1


def test_the_model_cache_is_bounded_by_bytes_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_MODELS", {})
    for n in "abc":
        _tiny_folder(tmp_path / n)
    a = models.load_model(str(tmp_path / "a"), device="cpu")
    size = models.model_bytes(a)
    monkeypatch.setattr(knobs, "MODEL_CACHE_BYTES", 2 * size)   # room for two
    b = models.load_model(str(tmp_path / "b"), device="cpu")
    assert models.load_model(str(tmp_path / "a"), device="cpu") is a  # a used again: b is the oldest now
    models.load_model(str(tmp_path / "c"), device="cpu")
    names = {os.path.basename(m.name) for m in models.loaded_models()}
    assert names == {"a", "c"} and b not in models.loaded_models()
    monkeypatch.setattr(knobs, "MODEL_CACHE_BYTES", 1)          # the newest stays whatever its size
    models.load_model(str(tmp_path / "b"), device="cpu")
    assert [os.path.basename(m.name) for m in models.loaded_models()] == ["b"]


def test_app_refuses_a_server_path_on_a_space_before_loading(monkeypatch, tmp_path):
    from maskstudio import studio

    monkeypatch.setattr(knobs, "ON_SPACE", True)
    monkeypatch.setattr(models, "_MODELS", {})
    state = studio.new_state()
    _, out = studio.run_model(state, str(tmp_path))
    assert "never a path on the server" in out["error"] and models.loaded_models() == []
    out = studio.knockout_sweep(state, "*", "x", 3, "/etc")
    assert "never a path on the server" in out["error"]
    out = studio.evaluate_for_state(state, "kv_retrieval", 4, "template", "./x")
    assert "never a path on the server" in out["error"]
    out = studio.train_design(state, "kv_retrieval", 2, 1e-3, model_id="../m")
    assert "never a path on the server" in out["error"]


# ---------------------------------------------------------------- Stop during a model load (#25 item 1)
def _slow_load(release, calls, name_seen=None):
    """A model load that says a line, then blocks until `release` (a GGUF load cannot be interrupted)."""
    def load(name, progress=None):
        calls.append(name)
        progress(0.4, f"loading {os.path.basename(name)} weights")
        assert release.wait(10), "never released"
        return models.load_model(name, device="cpu", progress=progress)
    return load


def test_stop_during_a_model_load_answers_at_once_and_the_load_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_MODELS", {})
    _tiny_folder(tmp_path / "m")
    folder, q, out, release, calls, said = str(tmp_path / "m"), jobs.Queue(), {}, threading.Event(), [], []

    def target():
        try:
            out["a"] = jobs.run_job("a", "run", lambda say: jobs.load_model(folder, say, _slow_load(release, calls)),
                                    progress=lambda frac, desc=None: said.append(desc), queue=q)
        except Exception as err:  # noqa: BLE001
            out["a"] = err
    t = threading.Thread(target=target)
    try:
        t.start()
        _wait(lambda: "loading m weights" in q.line("a"))      # the status line says the load's own line
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert q.stop("a").startswith("stopping")
        t.join(3)
        took = time.perf_counter() - t0
        assert not t.is_alive() and took < 1.0, took              # the load takes as long as it likes
        assert isinstance(out["a"], progress.Stopped) and "while the model was loading" in str(out["a"])
        line = q.line("a")
        assert line.startswith("run stopped at once (stopped by you) while the model was loading") and \
            "goes on in the background" in line and q.busy() == 0
        assert models.cached_model(folder) is None                # still loading, nobody waits
    finally:
        release.set()
    _wait(lambda: models.cached_model(folder) is not None)        # ... and lands in the cache
    again = []
    lm = jobs.run_job("b", "run", lambda say: jobs.load_model(folder, say, _slow_load(threading.Event(), again)), queue=q)
    assert lm is models.cached_model(folder) and again == [] and calls == [folder]


def test_jobs_share_one_load_and_a_queued_load_nobody_waits_for_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_MODELS", {})
    for n in "xy":
        _tiny_folder(tmp_path / n)
    x, y = str(tmp_path / "x"), str(tmp_path / "y")
    release, calls, out = threading.Event(), [], {}

    def job(session, name):  # separate queues: two jobs at once, as two processes' worth of visitors would be
        def target():
            try:
                out[session] = jobs.run_job(session, "run", lambda say: jobs.load_model(name, say, _slow_load(release, calls)),
                                            queue=queues[session])
            except Exception as err:  # noqa: BLE001
                out[session] = err
        t = threading.Thread(target=target)
        t.start()
        return t
    queues = {s: jobs.Queue() for s in ("a", "b", "c")}
    try:
        a = job("a", x)
        _wait(lambda: calls == [x])
        b = job("b", x)                                            # the same model: waits on a's load
        c = job("c", y)                                            # another model: queued behind x's load
        _wait(lambda: "waiting for another model's load" in queues["c"].line("c"))
        queues["c"].stop("c")
        c.join(2)
        assert isinstance(out["c"], progress.Stopped) and "not begun yet, is dropped" in str(out["c"])
        queues["a"].stop("a")
        a.join(2)
        assert isinstance(out["a"], progress.Stopped) and "goes on in the background" in str(out["a"])
        assert b.is_alive()
    finally:
        release.set()
    b.join(10)
    assert out["b"] is models.cached_model(x) and calls == [x]     # one load of x; y's never began
    time.sleep(0.3)
    assert models.cached_model(y) is None and calls == [x]


def test_outside_a_job_the_load_is_a_plain_call(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_MODELS", {})
    _tiny_folder(tmp_path / "m")
    threads = []

    def load(name, progress=None):
        threads.append(threading.current_thread())
        return models.load_model(name, device="cpu", progress=progress)
    lm = jobs.load_model(str(tmp_path / "m"), lambda f, m: None, load)
    assert threads == [threading.current_thread()] and lm is models.cached_model(str(tmp_path / "m"))
