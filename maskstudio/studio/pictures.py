"""The design's pictures as PNG files, and the checks beside them.

Pictures are content-addressed and cached: a view is redrawn only when the part of the spec it
depends on changes (positions and RoPE distance ignore the mask, so a rule edit redraws the mask,
flow and reach views only). Views not drawn before are drawn in parallel by render workers
(processes when MASKSTUDIO_RENDER_PROCESSES > 0, as app.py asks; else threads) while the calling
thread computes the checks.

`Cache` is the one bounded, thread-safe LRU map of the app: drawn pictures, analyses and sized
picture specs here, model runs in actions.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from ..errors import RunError, SpecError
from ..knobs import (ANALYSIS_DENSE_MAX, PICKER_HEADS, PICTURE_DENSE_MAX, PICKER_LAYERS, PICTURE_CACHE, REACH_LIVE_MAX, TOKEN_GRAPH_MAX,
                     TOKEN_LABEL_MAX, WORKDIR_MAX_AGE_S)
from .. import knobs
from ..segments import all_steps, expand_int_list, segment_size
from ..spec import Spec
from .budget import WORKDIR, deep_bytes, picture_path
from .sizing import size_line
from .state import markdown_text
from .tables import resolve_token

VIEWS = ("mask", "positions", "distance", "flow", "reach")
DRAW_ORDER = ("mask", "reach", "distance", "flow", "positions")  # slowest first, for the workers
DPI = 80
_MISSING = object()
TOKEN_FLOW_READABLE = 32  # tokens: past this the token-level flow graph is a tangle; frames / segments instead
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # the block view's choices
BLOCK_GRID_MAX = 512  # query blocks a side in the block view: a larger block size is used past it


def remove_if_ours(value) -> None:
    """Delete `value` when it is a file in WORKDIR (a picture the cache let go)."""
    if isinstance(value, str) and value.startswith(WORKDIR + os.sep) and os.path.isfile(value):
        try:
            os.remove(value)
        except OSError:  # already gone, or in use on a platform that forbids it: swept later
            pass


def sweep_workdir(max_age_s: float = WORKDIR_MAX_AGE_S, now: float | None = None) -> int:
    """Delete run pictures, exports and downloads older than `max_age_s` (the browser has fetched
    them by then; cached design pictures are kept), and empty folders as old. Returns how many files went."""
    now = time.time() if now is None else now
    keep = {v for v in _CACHE.values() if isinstance(v, str)}
    gone = 0
    for root, dirs, files in os.walk(WORKDIR, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            try:
                if path not in keep and now - os.path.getmtime(path) > max_age_s:
                    os.remove(path)
                    gone += 1
            except OSError:
                continue
        try:
            if root != WORKDIR and not os.listdir(root) and now - os.path.getmtime(root) > max_age_s:
                os.rmdir(root)  # empty and old: a slot being filled right now is young
        except OSError:
            continue
    return gone


class Cache:
    """A least-recently-used map bounded by entries (`size`) and, given `sizeof`, by bytes
    (`max_bytes`; the newest entry stays whatever its size), safe to share between threads."""

    def __init__(self, size: int, on_evict: Callable[[Any], None] | None = None, max_bytes: int | None = None,
                 sizeof: Callable[[Any], int] | None = None):
        self.size, self.max_bytes, self._sizeof = size, max_bytes, sizeof
        self._items: OrderedDict = OrderedDict()
        self._bytes: dict = {}
        self.nbytes = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value):
        cost = self._sizeof(value) if self._sizeof is not None else 0  # measured outside the lock
        evicted = []
        with self._lock:
            self.nbytes += cost - self._bytes.get(key, 0)
            self._items[key], self._bytes[key] = value, cost
            self._items.move_to_end(key)
            while len(self._items) > self.size or (self.max_bytes is not None and self.nbytes > self.max_bytes
                                                   and len(self._items) > 1):
                old, value_out = self._items.popitem(last=False)
                self.nbytes -= self._bytes.pop(old)
                evicted.append(value_out)
        if self._on_evict is not None:
            for old in evicted:
                self._on_evict(old)
        return value

    def pop(self, key) -> None:
        """Forget `key` (what a session replaced), without the eviction callback."""
        with self._lock:
            if key in self._items:
                del self._items[key]
                self.nbytes -= self._bytes.pop(key)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())

    def get_or_make(self, key, make: Callable[[], Any]):
        """The cached value, or make() stored (made outside the lock: two threads may both make it)."""
        hit = self.get(key, _MISSING)
        return hit if hit is not _MISSING else self.put(key, make())

    def __len__(self) -> int:
        return len(self._items)


def held_bytes(value) -> int:
    """What a picture-cache entry costs: a PNG path its file's bytes, anything else its memory."""
    if isinstance(value, str):
        try:
            return os.path.getsize(value)
        except OSError:
            return len(value)
    return deep_bytes(value)


_CACHE = Cache(PICTURE_CACHE, on_evict=remove_if_ours, max_bytes=knobs.PICTURE_CACHE_BYTES,
               sizeof=held_bytes)  # "png:" paths, "an:" analyses, "sized:" picture specs


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def figure_png(fig, path: str | None = None, dpi: int = DPI) -> str:
    """Draw a matplotlib Figure to a PNG file (fast zlib level) and free it; returns the path."""
    from ..viz import write_png

    if path is None:  # a one-off picture (a run's): old ones are swept, a session keeps its newest few
        sweep_workdir()
        path = picture_path()
    return write_png(fig, path, dpi)


# ---------------------------------------------------------------- sizes and options
def tokenizer_at_hand():
    """The tokenizer of a text model this process has already loaded (never loads one)."""
    if "maskstudio.run" not in sys.modules:  # no model can be loaded before the run package is
        return None
    from ..run import loaded_tokenizer

    return loaded_tokenizer()


def _sized(spec: Spec, missing: list[str], tok) -> tuple[Spec, str]:
    data = spec.to_dict()
    if tok is not None:
        from ..run import size_by_tokenizer

        try:
            for seg in data["segments"]:
                if segment_size(seg) is None:
                    size_by_tokenizer(seg, tok, [], spec)
            return Spec.load(data), f"sizes of {', '.join(missing)} come from the loaded model's tokenizer"
        except (RunError, SpecError):
            data = spec.to_dict()
    for seg in data["segments"]:
        if segment_size(seg) is None:
            text = seg["text"] if isinstance(seg["text"], str) else " ".join(seg["text"])
            seg["length"] = max(1, round(len(text.split()) * 1.3))
    return Spec.load(data), (f"sizes of {', '.join(missing)} are estimated from their text for the "
                             f"pictures; a run sizes them with the model's tokenizer")


def picture_spec(spec: Spec) -> tuple[Spec, str]:
    """A sized spec for pictures: text-only segments are sized by the loaded model's tokenizer when
    one is at hand (exactly what a run will do), else estimated from their word count. Sized specs
    are returned as they are; a sizing is made (and validated) once per design and tokenizer."""
    missing = spec.unsized_segments()
    if not missing:
        return spec, ""
    tok = tokenizer_at_hand()
    key = "sized:" + digest(spec.to_dict(), id(tok) if tok is not None else None)
    return _CACHE.get_or_make(key, lambda: _sized(spec, missing, tok))


def _int(value, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return default


def view_options(spec: Spec, options: dict | None = None) -> dict:
    """Fill and clamp the picture options: layer, head, reach_layers, reach_token, query, flow_level,
    token_labels (the real tokens, for small layouts with text once a model is loaded).

    Total: any value (a stale slider past this design's layers, a token box naming a segment of the
    previous design, a typo) is clamped or replaced by its default, and `warnings` says so per
    control ({"reach_token": "...", "layer": "..."}) for the message next to it. `fresh` (the design
    just changed): a query segment of the previous design quietly becomes this design's default."""
    from ..flow import default_layers
    from ..positions import default_query
    from ..tokens import token_labels

    o = dict(options or {})
    warnings: dict[str, str] = {}
    ctl = controls(spec)
    o["layer"] = min(max(0, _int(o.get("layer"), 0)), ctl["layer_max"]) if ctl["varies_by_layer"] else 0
    o["head"] = min(max(0, _int(o.get("head"), 0)), ctl["head_max"]) if ctl["varies_by_head"] else 0
    o["reach_layers"] = max(1, min(64, _int(o.get("reach_layers"), 0) or default_layers(spec)))
    try:
        o["reach_token"], note = resolve_token(spec, o.get("reach_token"), "reach token")
        if note:
            warnings["reach_token"] = note
    except (SpecError, ValueError) as err:
        o["reach_token"] = spec.n - 1
        warnings["reach_token"] = f"{err}; showing the last token"
    names = [s["name"] for s in spec.segments]
    query = o.get("query")
    if query not in names:
        if query and not o.get("fresh"):  # fresh: a new design, whose own default the picker now shows
            warnings["query"] = f"no segment named '{query}' in this design; showing '{names[default_query(spec)]}'"
        query = names[default_query(spec)]
    o["query"] = query
    o["flow_level"] = o.get("flow_level") if o.get("flow_level") in ("segment", "frame", "token") else "segment"
    if o["flow_level"] == "token" and spec.n > min(TOKEN_GRAPH_MAX, TOKEN_FLOW_READABLE):
        o["flow_level"] = "frame" if any(s["modality"] == "video" for s in spec.segments) else "segment"
        warnings["flow_level"] = (f"a token graph is readable up to {TOKEN_FLOW_READABLE} tokens and this design "
                                  f"has {spec.n:,}: showing {o['flow_level']}s (the Mask tab shows every token pair)")
    nodes = flow_nodes(spec, o["flow_level"])
    if nodes > knobs.FLOW_MAX_NODES:  # said in milliseconds; drawing nodes^2 edges took minutes
        warnings["flow_level"] = o["flow_refused"] = (
            f"the flow graph is drawn up to {knobs.FLOW_MAX_NODES} nodes (MASKSTUDIO_FLOW_MAX_NODES) and this design has "
            f"{nodes:,} {o['flow_level']}s: merge segments, or read the Mask and Blocks tabs")
    small_text = spec.n <= TOKEN_LABEL_MAX and any("text" in seg for seg in spec.segments)
    tok = tokenizer_at_hand() if small_text else None
    o["token_labels"] = token_labels(spec, tok) if tok is not None else None
    o["reach_live"] = spec.n <= REACH_LIVE_MAX or bool(o.get("reach_now"))
    o["warnings"] = warnings
    return o


def flow_nodes(spec: Spec, level: str) -> int:
    """Nodes of the flow graph at `level`: tokens, segments, or frames (videos', framed segments') and other segments."""
    if level in ("token", "segment"):
        return spec.n if level == "token" else len(spec.segments)
    t = spec.table
    return sum(int(t["frames"][start]) if seg["modality"] == "video" or "frames" in seg else 1
               for seg, start in zip(spec.segments, t.starts))


def controls(spec: Spec) -> dict:
    """What the pickers should offer for this design: whether the mask varies by layer/head, the
    layer/head ranges, the segment names (distance query, knockout, reach token)."""
    from ..flow import default_layers

    heads = [h for _, s in all_steps(spec.mask) if "heads" in s for h in expand_int_list(s["heads"])]
    layers, n_heads = default_layers(spec), max(heads, default=0) + 2
    return {"varies_by_layer": spec.varies_by_layer, "varies_by_head": spec.varies_by_head,
            "layers": layers, "heads": n_heads, "segments": [s["name"] for s in spec.segments],
            # the pickers reach at least a small model's depth / heads, so a value left from the
            # previous design is still in range while its event is on the way (never Gradio's error)
            "layer_max": max(layers - 1, PICKER_LAYERS - 1), "head_max": max(n_heads - 1, PICKER_HEADS - 1)}


# ---------------------------------------------------------------- checks
def analysis_for(spec: Spec, layer: int = 0, head: int = 0):
    from ..analysis import analyze

    return _CACHE.get_or_make("an:" + digest(spec.to_dict(), layer, head),
                              lambda: analyze(spec, layer=layer, head=head, dense_limit=ANALYSIS_DENSE_MAX))


CHECKS_LEGEND = ("\n\nblock sparsity at 128: the share of 128 x 128 tiles a FlexAttention kernel skips (all masked)."
                 "\nKV-cache safe: no query reads a later key in the generation region, so generation can"
                 " reuse cached keys/values."
                 "\nleaks: a token predicting a target token can see that target (the answer leaks in).")


def check_text(spec: Spec, layer: int = 0, head: int = 0) -> str:
    """The checks report: density, empty rows, leaks, KV-cache compatibility, block sparsity, FLOPs."""
    spec, note = picture_spec(spec)
    text = f"{spec.name}\n\n{analysis_for(spec, layer, head).summary()}"
    return text + (f"\n\nnote: {note}" if note else "") + CHECKS_LEGEND


def density_rows(spec: Spec, layer: int = 0, head: int = 0) -> dict:
    """The segment density table (rows = query segment, columns = key segment) for a Dataframe."""
    spec, _ = picture_spec(spec)
    a = analysis_for(spec, layer, head)
    if len(a.names) > knobs.SEGMENT_TABLE_MAX:  # S^2 cells to the page: 16 M at 4,096 segments
        return {"headers": ["segment density"], "data": [[f"{len(a.names):,} segments: the table lists up to "
                                                          f"{knobs.SEGMENT_TABLE_MAX} (MASKSTUDIO_SEGMENT_TABLE_MAX)"]]}
    rows = [[name] + [round(v, 3) for v in row] for name, row in zip(a.names, a.segment_density.tolist())]
    return {"headers": ["q \\ k"] + list(a.names), "data": rows}


# ---------------------------------------------------------------- drawing one view
def _view_key(data: dict, view: str, o: dict) -> str:
    """What the view depends on: positions and distance only on the layout, the rest on everything."""
    layout = {"segments": data["segments"], "positions": data["positions"], "name": data.get("name")}
    if view == "positions":
        return digest(view, layout)
    if view == "distance":
        return digest(view, layout, o["query"])
    if view == "mask":
        return digest(view, data, o["layer"], o["head"], o.get("token_labels"))
    if view == "flow":
        return digest(view, data, o["layer"], o["head"], o["flow_level"], o.get("flow_refused"))
    return digest(view, data, o["head"], o["reach_layers"], o["reach_token"], o.get("reach_live", True))


def _draw(spec: Spec, view: str, o: dict, path: str) -> str:
    """Draw one view to `path` (runs in a render worker process or a thread)."""
    from ..viz import render

    kw: dict = {}
    if view == "reach" and not o.get("reach_live", True):
        from ..viz import message_figure

        return figure_png(message_figure(f"{spec.n:,} tokens: reachability takes seconds at this size.\n"
                                         f"Press Enter in the token box (or move the layers slider) to draw it."),
                          path)
    if view == "mask":
        kw = dict(layer=o["layer"], head=o["head"], token_labels=o.get("token_labels"))
    elif view == "distance":
        kw = dict(query=o["query"])
    elif view == "flow" and o.get("flow_refused"):
        from ..viz import message_figure

        return figure_png(message_figure(o["flow_refused"].replace(" and this", "\nand this")), path)
    elif view == "flow":
        kw = dict(layer=o["layer"], head=o["head"], level=o["flow_level"])
        if o["flow_level"] == "segment":
            kw["analysis"] = analysis_for(spec, o["layer"], o["head"])
    elif view == "reach":
        kw = dict(head=o["head"], layers=o["reach_layers"], token=o["reach_token"])
    return figure_png(render(spec, view, **kw), path)


def _blocks_job(data: dict, size: int, layer: int, head: int, path: str) -> str:
    from ..viz import render
    return figure_png(render(Spec.from_valid(data), "blocks", block_size=size, layer=layer, head=head), path)


def _draw_job(data: dict, view: str, o: dict, path: str) -> str:
    return _draw(Spec.from_valid(data), view, o, path)


def _warm_job() -> int:
    """Imports, fonts and the first Agg draw, so the first real picture is not slow."""
    from .state import BLANK

    blank = Spec.load(BLANK)
    _draw(blank, "mask", view_options(blank), os.path.join(WORKDIR, "warm.png"))
    return os.getpid()


# ---------------------------------------------------------------- render workers
_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maskstudio-render")
_PROCS = None
_PROCS_LOCK = threading.Lock()


def _watch_parent(parent: int, nice: int = 0) -> None:
    """Render worker initializer: exit when the app process is gone (even after SIGKILL), so no
    worker outlives the app; `nice`: a lower priority (the heavy lane's, behind light edits)."""
    os.nice(nice)
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)
    threading.Thread(target=watch, daemon=True, name="maskstudio-parent-watch").start()
    import torch

    torch.set_num_threads(1)  # workers draw side by side with the app's own thread (2 cores: no oversubscription)


def render_processes() -> int:
    """Worker processes for pictures (matplotlib holds the GIL, so threads do not draw in
    parallel). 0 (the library default) draws in threads of this process; app.py asks for
    min(2, cores). Processes are spawned, so the main script needs `if __name__ == "__main__"`."""
    return int(os.environ.get("MASKSTUDIO_RENDER_PROCESSES", "0"))


def _process_pool():
    global _PROCS
    if render_processes() <= 0:
        return None
    with _PROCS_LOCK:
        if _PROCS is None:
            import atexit
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            _PROCS = ProcessPoolExecutor(max_workers=render_processes(), mp_context=mp.get_context("spawn"),
                                         initializer=_watch_parent, initargs=(os.getpid(),))
            atexit.register(_PROCS.shutdown, wait=False, cancel_futures=True)
        return _PROCS


def _reset_pool() -> None:
    global _PROCS
    with _PROCS_LOCK:
        if _PROCS is not None:
            _PROCS.shutdown(wait=False, cancel_futures=True)
        _PROCS = None


_HEAVY = None  # the heavy lane: one low-priority worker, one heavy design at a time


def heavy(spec: Spec) -> bool:
    """Past DESIGN_LIGHT_WORK tokens x steps or SEGMENT_TABLE_MAX segments: queued in the heavy lane, not before light edits."""
    steps = 1 + len(spec.mask["rules"]) + len(spec.mask["overlays"])
    return spec.n * steps > knobs.DESIGN_LIGHT_WORK or len(spec.segments) > knobs.SEGMENT_TABLE_MAX


def in_heavy_lane(fn: Callable, *args):
    """fn(*args) in the heavy lane's one worker (a process, or a thread when pictures draw in threads)."""
    global _HEAVY
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with _PROCS_LOCK:
        _HEAVY = _HEAVY or (ProcessPoolExecutor(1, mp.get_context("spawn"), _watch_parent, (os.getpid(), 19))
                            if render_processes() > 0 else ThreadPoolExecutor(1, "maskstudio-heavy"))
        pool = _HEAVY
    try:
        out, err = pool.submit(_parts, fn, *args).result()
    except BrokenProcessPool:  # the worker died (killed, out of memory): a fresh lane next time, this call here
        _HEAVY = None
        return fn(*args)
    if err:
        raise SpecError(*err)
    return out


def _parts(fn, *args) -> tuple:  # a SpecError does not pickle (two arguments): it travels as its parts
    try:
        return fn(*args), None
    except SpecError as err:
        return None, (err.path, err.message)


def _heavy_views(data: dict, o: dict, todo: dict) -> dict:
    spec = Spec.from_valid(data)  # a heavy design's missing pictures ({view: path}) and checks, in the heavy lane
    return {**{v: _draw(spec, v, o, path) for v, path in todo.items()},
            "checks": check_text(spec, o["layer"], o["head"]), "density": density_rows(spec, o["layer"], o["head"])}


def warm_up() -> list[int]:
    """Start the render workers and draw once in each (call at app start)."""
    pool = _process_pool()
    if pool is None:
        _warm_job()
        return [os.getpid()]
    return [f.result() for f in [pool.submit(_warm_job) for _ in range(render_processes())]]


def _submit(spec: Spec, data: dict, view: str, o: dict, path: str):
    pool = _process_pool()
    if pool is not None:
        return pool.submit(_draw_job, data, view, o, path)
    return _THREADS.submit(_draw, spec, view, o, path)


# ---------------------------------------------------------------- every picture
def render_views(spec: Spec, options: dict | None = None, views=VIEWS, parallel: bool = True) -> dict:
    """Every picture of a design plus the checks: {"mask": png path, ..., "checks": text,
    "density": {"headers", "data"}, "note": text, "options": the clamped options}."""
    spec, note = picture_spec(spec)
    o = view_options(spec, options)
    out: dict = {"note": note, "options": o}
    refused = design_refusal(spec)
    if refused:  # one message picture for every view, said in milliseconds
        from ..viz import message_figure

        key = "png:" + digest("refused", refused)
        path = hit if (hit := _CACHE.get(key)) is not None and os.path.exists(hit) else _CACHE.put(key, figure_png(
            message_figure(refused.replace(": ", ":\n", 1)), os.path.join(WORKDIR, f"refused-{key[4:]}.png")))
        return {**out, **{v: path for v in views}, "checks": refused,
                "density": {"headers": ["segment density"], "data": [[refused]]}}
    data = spec.to_dict()
    todo = {}
    for v in sorted(views, key=lambda v: DRAW_ORDER.index(v) if v in DRAW_ORDER else 99):
        key = "png:" + _view_key(data, v, o)
        hit = _CACHE.get(key)
        if hit is not None and os.path.exists(hit):
            out[v] = hit
        else:
            todo[v] = (key, os.path.join(WORKDIR, f"{v}-{key[4:]}.png"))
    if heavy(spec):  # the lane draws what is missing and the checks, at a low priority, one design at a time
        key = "chk:" + digest(data, o["layer"], o["head"])
        facts = _CACHE.get(key)
        if todo or facts is None:
            got = in_heavy_lane(_heavy_views, data, o, {v: path for v, (_, path) in todo.items()})
            out.update({v: _CACHE.put(k, got[v]) for v, (k, _) in todo.items()})
            facts = _CACHE.put(key, {"checks": got["checks"], "density": got["density"]})
        return {**out, **facts}
    # past the dense limit the segment flow graph reads the analysis the checks compute: drawn here
    # after them, not by a worker that would compute the same analysis again
    here = {"flow"} if spec.n > REACH_LIVE_MAX and o["flow_level"] == "segment" else set()
    futures = {v: _submit(spec, data, v, o, path) for v, (key, path) in todo.items()
               if v not in here} if parallel else {}
    out["checks"] = check_text(spec, o["layer"], o["head"])
    out["density"] = density_rows(spec, o["layer"], o["head"])
    for v, (key, path) in todo.items():
        try:
            drawn = futures[v].result() if v in futures else _draw(spec, v, o, path)
        except BrokenProcessPool:  # a worker died (killed, out of memory): draw here, start afresh
            _reset_pool()
            drawn = _draw(spec, v, o, path)
        out[v] = _CACHE.put(key, drawn)
    return out


def design_refusal(spec: Spec) -> str:  # the one line refusing a design too large for this server's pictures
    steps = 1 + len(spec.mask["rules"]) + len(spec.mask["overlays"])  # each is work at every token
    if spec.n > knobs.DESIGN_MAX_TOKENS:
        return (f"{spec.n:,} tokens: this server draws and checks designs up to {knobs.DESIGN_MAX_TOKENS:,} tokens "
                f"(MASKSTUDIO_DESIGN_MAX_TOKENS): shrink the sizes to see it (exports take any size)")
    if spec.n * steps > knobs.DESIGN_MAX_WORK:
        return (f"{spec.n:,} tokens x {steps:,} steps (base, rules, overlays) = {spec.n * steps:,}: this server draws and "
                f"checks designs up to {knobs.DESIGN_MAX_WORK:,} (MASKSTUDIO_DESIGN_MAX_WORK): fewer tokens or rules")
    return ""


def size_warning(spec: Spec) -> str:
    """A line for designs past the dense picture limit: pictures are drawn at block level."""
    from ..knobs import BLOCK, PICTURE_DENSE_MAX

    if spec.n <= PICTURE_DENSE_MAX:
        return ""
    return (f"{spec.n:,} tokens: pictures, flow and reachability are drawn at block level "
            f"({BLOCK}-token blocks), not token by token")


def design_views(spec: Spec, options: dict | None = None) -> dict:
    """Everything the app's picture column shows for a design: `render_views` plus the pickers'
    ranges ("segments", "varies_by_layer", "layer_max", ...) and one note (sizes, scale). When text
    segments' declared sizes differ from a run's (options["sizes_by"]: the model whose tokenizer
    sizes them, None the embedded one), the note and the checks start with that line and
    "sizes_differ" is True (the app then shows the button that adopts the run's sizes)."""
    out = render_views(spec, options)
    line = size_line(spec, (options or {}).get("sizes_by"))
    spec, _ = picture_spec(spec)
    ctl = controls(spec)
    notes = [n for n in (out["note"], size_warning(spec)) if n]
    out.update(segments=ctl["segments"], varies_by_layer=ctl["varies_by_layer"],
               varies_by_head=ctl["varies_by_head"], layer_max=ctl["layer_max"], head_max=ctl["head_max"],
               note="  \n".join([f"⚠ **{markdown_text(line)}**"] * bool(line) + [f"<small>{markdown_text(n)}</small>" for n in notes]),
               sizes_differ=bool(line), checks=f"{line}\n\n{out['checks']}" if line else out["checks"])
    return out


def block_view(spec: Spec, block_size=128, layer=0, head=0, live: bool = True) -> tuple[str | None, str]:
    """The BlockMask grid picture at `block_size` (viz view "blocks"), cached: (PNG path, message).
    Total: a block size outside 16..1024 or a grid past BLOCK_GRID_MAX blocks a side is replaced by
    the nearest size that works, and the message says so (for the line next to the control).
    live=False (after an edit): past PICTURE_DENSE_MAX tokens nothing is drawn until asked."""
    spec, _ = picture_spec(spec)
    if design_refusal(spec):
        return None, design_refusal(spec)
    if not live and spec.n > PICTURE_DENSE_MAX:
        return None, f"{spec.n:,} tokens: pick a block size to draw the block grid (seconds at this size)"
    asked = _int(block_size, 128)
    size = min(BLOCK_SIZES, key=lambda b: abs(b - asked))
    message = "" if size == asked else f"block sizes are {', '.join(map(str, BLOCK_SIZES))}; showing {size}"
    while -(-spec.n // size) > BLOCK_GRID_MAX and size < BLOCK_SIZES[-1]:
        size *= 2
        message = (f"{spec.n:,} tokens at {asked}-token blocks is more than {BLOCK_GRID_MAX} blocks a side; "
                   f"showing {size}-token blocks")
    ctl = controls(spec)
    lay = min(max(0, _int(layer, 0)), ctl["layer_max"]) if ctl["varies_by_layer"] else 0
    hd = min(max(0, _int(head, 0)), ctl["head_max"]) if ctl["varies_by_head"] else 0
    key = "png:" + digest("blocks", spec.to_dict(), size, lay, hd)
    hit, args = _CACHE.get(key), (spec.to_dict(), size, lay, hd, os.path.join(WORKDIR, f"blocks-{key[4:]}.png"))
    if hit is None or not os.path.exists(hit):
        hit = _CACHE.put(key, in_heavy_lane(_blocks_job, *args) if heavy(spec) else _blocks_job(*args))
    return hit, message
