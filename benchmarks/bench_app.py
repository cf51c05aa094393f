"""App benchmark (issue #7): from a gradio_client, how long until every picture of a ~2k-token
layout is updated after a preset switch or an edit.

    .venv/bin/python benchmarks/bench_app.py [--rounds 5]

Launches app.py's demo in this process on a free port and drives it through its public API
(the same endpoints the browser uses). Each timed call returns all five pictures (mask,
positions, RoPE distance, flow, reach) plus the checks and the density table. Reported:
  * new design   a design the server has never drawn (every view drawn from scratch)
  * rule edit    one rule of that design changed (mask, flow, reach redrawn; positions cached)
  * switch back  returning to a design drawn before (undo, or re-picking a preset)
  * 262k design  a 64x64x64 video + text (262,304 tokens): a new design and a rule edit; the
                 pictures are block-level with a size note, reachability is drawn when asked (/reach)
Target: < 1 s for edits and switches on 2 CPU cores; a 262k design < 5 s per edit, with the note.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def video_spec(frames: int = 8, h: int = 15, w: int = 16, by: str = "frame", sink: int = 4) -> dict:
    """64 + 1920 + 64 + 32 = 2080 tokens: system, video, question, answer."""
    return {"maskstudio": 1, "name": f"video-qa-{by}-{sink}",
            "segments": [{"name": "system", "modality": "text", "length": 64},
                         {"name": "video", "modality": "video", "grid": [frames, h, w]},
                         {"name": "question", "modality": "text", "length": 64},
                         {"name": "answer", "modality": "text", "length": 32, "role": ["target"]}],
            "mask": {"base": {"pattern": "causal"},
                     "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": by}],
                     "overlays": [{"op": "or", "q": "*", "k": "system", "pattern": "first", "size": sink}]},
            "positions": {"scheme": "mrope"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTS = (0, 0, 4, "", None, "segment")  # layer, head, reach layers, reach token, query, flow level


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--url", default=None, help="an already running app (default: launch one here)")
    args = ap.parse_args()
    from gradio_client import Client

    if args.url:
        url = args.url
    else:
        import app
        from maskstudio import studio

        studio.warm_up()
        port = free_port()
        app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        url = f"http://127.0.0.1:{port}/"
    fetch = Client(url, verbose=False)                        # downloads the 5 PNGs, one after another
    urls = Client(url, verbose=False, download_files=False)   # the response, with picture URLs
    clients = {"download": fetch, "response": urls}

    def timed(*a, api_name, mode="download"):
        t0 = time.perf_counter()
        out = clients[mode].predict(*a, api_name=api_name)
        dt = time.perf_counter() - t0
        pics = out[7:12]
        ok = all(os.path.exists(p) for p in pics) if mode == "download" else all(p.get("url") for p in pics)
        assert ok, f"{api_name}: pictures missing"
        return out, dt

    for mode in clients:
        print(f"[{mode}] " + run_rounds(timed, args.rounds, mode, url))
    print(big_rounds(timed))


NOTE = 7 + 12  # the note among a design response's outputs (pictures start at 7)


def big_rounds(timed, rounds: int = 2) -> str:
    """A 262k-token design: every edit answers with block-level pictures and the size note."""
    new, edit = [], []
    for r in range(rounds):
        spec = video_spec(frames=64, h=64, w=64, sink=40 + r)
        out, dt = timed(json.dumps(spec), *OPTS, api_name="/edit_json")
        new.append(dt)
        assert "block level" in out[NOTE], out[NOTE]
        spec["mask"]["rules"][0]["by"] = "t"
        out, dt = timed(json.dumps(spec), *OPTS, api_name="/edit_json")
        edit.append(dt)
    return (f"262,304-token design, {rounds} rounds (block-level pictures, size note shown, reach on demand)\n"
            f"  {'new 262k design':32s} median {statistics.median(new):.3f}  max {max(new):.3f}\n"
            f"  {'rule edit, 262k tokens':32s} median {statistics.median(edit):.3f}  max {max(edit):.3f}")


def run_rounds(timed, rounds, mode, url) -> str:
    timed("multiverse", *OPTS, api_name="/load_preset", mode=mode)  # warm-up: imports, fonts, first draw
    new, edit, back, preset = [], [], [], []
    offset = 0 if mode == "download" else 100  # never-drawn designs in both modes
    for r in range(rounds):
        spec = video_spec(sink=4 + r * 2 + offset)
        out, dt = timed(json.dumps(spec), *OPTS, api_name="/edit_json", mode=mode)
        new.append(dt)
        n = json.loads(out[0])
        tables = out[1], out[2], out[3]
        rules = tables[1]["data"]
        rules[1][4] = "by=t, strict=false" if "frame" in rules[1][4] else "by=frame, strict=false"
        out, dt = timed(tables[0], {"headers": tables[1]["headers"], "data": rules}, tables[2], out[4], out[5],
                        *OPTS, api_name="/edit_tables", mode=mode)
        edit.append(dt)
        assert '"by": "t"' in out[0] or '"by": "frame"' in out[0]
        _, dt = timed(*OPTS, api_name="/undo", mode=mode)
        back.append(dt)
        _, dt = timed(["prefix_lm", "multiverse"][r % 2], *OPTS, api_name="/load_preset", mode=mode)
        preset.append(dt)
    lines = [f"app at {url}, video {n['segments'][1]['grid']} + text = 2080 tokens, {rounds} rounds, "
             f"seconds from the client until all 5 pictures + checks are back"
             + (" (PNG files downloaded)" if mode == "download" else " (response with picture URLs)")]
    for name, xs in (("new 2k design (never drawn)", new), ("rule edit, 2k tokens", edit),
                     ("undo / switch back, 2k tokens", back), ("preset switch (small presets)", preset)):
        lines.append(f"  {name:32s} median {statistics.median(xs):.3f}  max {max(xs):.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
