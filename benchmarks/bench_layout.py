"""Before/after benchmark of a restructure, both sides in ONE run on the same machine.

    git worktree add /tmp/ms-before <old commit>
    .venv/bin/python benchmarks/bench_layout.py --before /tmp/ms-before [--rounds 5]

Measured for each checkout (each in its own processes, turns interleaved so that load on a
shared machine hits both alike):
  * edit -> pictures: the app (app.py of that checkout, served on a free local port) receives a
    never-drawn 2,080-token video design through /edit_json, then a rule edit through
    /edit_tables; seconds from the client until all pictures, checks and tables are back.
  * generation: maskstudio.run(spec, max_new_tokens=40, chat=True) on the embedded SmolLM2-135M
    (model loaded once per process, one warm-up run, then the median of --gen-repeats runs).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PY = sys.executable
OPTS = (0, 0, 4, "", None, "segment")  # layer, head, reach layers, reach token, query, flow level

GENERATE = r"""
import json, statistics, sys, time
import maskstudio
spec = maskstudio.Spec.load({"segments": [
    {"name": "prompt", "modality": "text", "text": "Write a long story about a cat who learns to sail."},
    {"name": "answer", "modality": "text", "text": "Once", "role": ["generate"]}],
    "mask": {"base": {"pattern": "causal"}}})
maskstudio.run(spec, max_new_tokens=40, chat=True)  # loads the model, warms up
times, count = [], 0
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    r = maskstudio.run(spec, max_new_tokens=40, chat=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(times), "times": times, "new": len(r.new_ids)}))
"""


def video_spec(sink: int) -> dict:
    """64 + 1920 + 64 + 32 = 2,080 tokens: system, video 8x15x16, question, answer."""
    return {"maskstudio": 1, "name": f"video-qa-{sink}",
            "segments": [{"name": "system", "modality": "text", "length": 64},
                         {"name": "video", "modality": "video", "grid": [8, 15, 16]},
                         {"name": "question", "modality": "text", "length": 64},
                         {"name": "answer", "modality": "text", "length": 32, "role": ["target"]}],
            "mask": {"base": {"pattern": "causal"},
                     "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}],
                     "overlays": [{"op": "or", "q": "*", "k": "system", "pattern": "first", "size": sink}]},
            "positions": {"scheme": "mrope"}}


def env_for(checkout: str) -> dict:
    return {**os.environ, "PYTHONPATH": checkout, "MPLBACKEND": "Agg"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkout: str):
    """Start that checkout's app.py on a free port; returns (process, url) once it answers."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([PY, "app.py"], cwd=checkout, env={**env_for(checkout), "PORT": str(port),
                            "GRADIO_SERVER_PORT": str(port), "HOST": "127.0.0.1",
                            "GRADIO_SERVER_NAME": "127.0.0.1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{checkout}/app.py exited")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{checkout}/app.py did not answer")


def pictures_back(out) -> bool:
    paths = [x for x in out if isinstance(x, str) and x.endswith(".png")]
    return len(paths) >= 5 and all(os.path.exists(p) for p in paths)


def edit_round(client, sink: int) -> tuple[float, float]:
    """(new design seconds, rule edit seconds)."""
    t0 = time.perf_counter()
    out = client.predict(json.dumps(video_spec(sink)), *OPTS, api_name="/edit_json")
    new = time.perf_counter() - t0
    assert pictures_back(out), "edit_json: pictures missing"
    segments, rules, overlays = out[1], out[2], out[3]
    row = rules["data"][1]
    col = rules["headers"].index("params")
    row[col] = "by=t, strict=false"
    t0 = time.perf_counter()
    out = client.predict(segments, rules, overlays, out[4], out[5], *OPTS, api_name="/edit_tables")
    edit = time.perf_counter() - t0
    assert pictures_back(out) and '"by": "t"' in out[0], "edit_tables: the edit did not land"
    return new, edit


def bench_app(sides: dict, rounds: int) -> dict:
    from gradio_client import Client

    servers = {name: serve(path) for name, path in sides.items()}
    try:
        clients = {name: Client(url, verbose=False) for name, (_, url) in servers.items()}
        for name, c in clients.items():  # warm-up: imports, fonts, first draw
            c.predict("multiverse", *OPTS, api_name="/load_preset")
            edit_round(c, 1000)
        res = {name: {"new": [], "edit": []} for name in sides}
        for r in range(rounds):
            for name, c in clients.items():
                new, edit = edit_round(c, 4 + 2 * r)
                res[name]["new"].append(new)
                res[name]["edit"].append(edit)
        return res
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)


def bench_generation(sides: dict, repeats: int, turns: int) -> dict:
    res = {name: [] for name in sides}
    for _ in range(turns):
        for name, path in sides.items():
            out = subprocess.run([PY, "-c", GENERATE, str(repeats)], cwd=path, env=env_for(path),
                                 capture_output=True, text=True, check=True)
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a checkout of the earlier commit")
    ap.add_argument("--after", default=ROOT)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--gen-turns", type=int, default=2)
    args = ap.parse_args()
    sides = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    app = bench_app(sides, args.rounds)
    print(f"edit -> pictures, 2,080-token video design, {args.rounds} rounds interleaved (seconds, median / max)")
    for name, r in app.items():
        print(f"  {name:6s} new design {statistics.median(r['new']):.3f} / {max(r['new']):.3f}   "
              f"rule edit {statistics.median(r['edit']):.3f} / {max(r['edit']):.3f}")
    gen = bench_generation(sides, args.gen_repeats, args.gen_turns)
    print(f"generation, 40 new tokens on the embedded SmolLM2-135M, chat (seconds, median of "
          f"{args.gen_repeats} x {args.gen_turns} processes)")
    for name, runs in gen.items():
        times = [t for r in runs for t in r["times"]]
        print(f"  {name:6s} {statistics.median(times):.3f}  (runs {', '.join(f'{t:.2f}' for t in times)}; "
              f"{runs[0]['new']} new tokens)")


if __name__ == "__main__":
    main()
