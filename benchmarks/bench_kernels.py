"""FlexAttention kernels from specs against hand-written FlexAttention, all in one run (issue 14).

    python benchmarks/bench_kernels.py --check                  # CPU: hand-written mask_mods == spec masks
    python benchmarks/bench_kernels.py --tiny                   # CPU smoke run at toy sizes
    python benchmarks/bench_kernels.py --sizes 16k,64k          # GPU (H200): attention + BlockMask builds
    python benchmarks/bench_kernels.py --sizes 128k --parts attention,batch,recompiles --out-dir DIR

Designs (each a maskstudio spec dict AND a hand-written, attention-gym style mask_mod: pure
arithmetic on q_idx / kv_idx with Python int constants; `--check` asserts that both give the same
mask, and every run checks it at toy sizes first):

  causal              one text segment
  video_block_causal  text prompt + video with frames of 32 x 32 = 1024 tokens, block-causal by frame
  window_sinks        causal sliding window + attention sinks: window 1024 + 4 sinks up to 16k,
                      window 4096 + 256 sinks above
  multiverse          prompt, 4 parallel paths that cannot see each other, a merge that sees all
  cca                 concentric causal attention over a G x G image grid between two texts

Per design and N (bf16, 9 heads x 64, batch 1, one static-shape torch.compile(flex_attention)):
  attention  (a) hand-written mask_mod + compiled create_block_mask, (b) spec.mask_mod inside
             spec.block_mask (today's path), (c) maskstudio.lower.lower(spec).block_mask(...) (with
             the lowered mask_mod; "n/a" while maskstudio.lower does not exist), (d) flash SDPA causal
             and full (no mask) as anchors; outputs compared with (a)
  blockmask  build times: compiled create_block_mask, plain create_block_mask, spec.block_mask,
             lowered block_mask; blocks checked identical to create_block_mask's
  batch      a batch of 8 layouts at 32k (per-sample sizes): compiled create_block_mask with a
             batched hand-written mask_mod vs lower(spec).batch(sizes).block_mask(...) vs 8 x spec.block_mask
  recompiles unique dynamo graphs added when the same structure comes back with other segment sizes
             at the same N, and at another N (hand-written / spec / lowered)

Timings: warm-up (the compile and the first call after it are never timed), then the median of
>= 20 calls with p10 / p90, each between torch.cuda.synchronize() and read from CUDA events
(bench_core.measure). Results: <out-dir>/kernels-<host>-<date>.json; benchmarks/readme_table.py
turns the newest ones into the README table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import re
import socket
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

ROOT = __file__.rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
from benchmarks.bench_core import REPS, WARMUP, block_sets, measure, public, same_blocks  # noqa: E402
from maskstudio import Spec  # noqa: E402

DESIGNS = ("causal", "video_block_causal", "window_sinks", "multiverse", "cca")
SIZES = {"16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
TINY_SIZES = (1024,)
H, D = 9, 64
BLOCK = 128
BATCH = 8


# ---------------------------------------------------------------- designs
def params(name: str, n: int, tiny: bool = False, variant: bool = False) -> dict | None:
    """Sizes and constants of one design at n tokens. variant: the same structure with other segment
    sizes at the same n (None where a design has no segment sizes to change)."""
    if name == "causal":
        return None if variant else {"n": n}
    if name == "video_block_causal":
        side = 8 if tiny else 32
        frame = side * side
        frames = max(1, (n - frame) // frame)
        if variant:
            if frames < 2:
                return None
            frames -= 1
        return {"n": n, "prompt": n - frames * frame, "frames": frames, "side": side, "frame": frame}
    if name == "window_sinks":
        if variant:
            return None
        window, sinks = (128, 4) if tiny else (1024, 4) if n <= 16384 else (4096, 256)
        return {"n": n, "window": window, "sinks": sinks}
    if name == "multiverse":
        prompt, path = n // 4, n // 8
        paths = [path] * 4
        if variant:
            s = max(1, path // 8)
            paths = [path + 3 * s, path - s, path - s, path - s]
            prompt += 40
        return {"n": n, "prompt": prompt, "paths": paths, "merge": n - prompt - sum(paths)}
    if name == "cca":
        prefix = n // 16
        side = int(math.isqrt(int(0.8 * n))) // 2 * 2
        if variant:
            side -= 2
        return {"n": n, "prefix": prefix, "side": side, "suffix": n - prefix - side * side}
    raise ValueError(name)


def spec_of(name: str, p: dict) -> Spec:
    """The design as a maskstudio spec (the same JSON a user would write)."""
    causal = {"pattern": "causal"}
    if name == "causal":
        data = {"segments": [{"name": "text", "length": p["n"]}], "mask": {"base": causal}}
    elif name == "video_block_causal":
        data = {"segments": [{"name": "prompt", "length": p["prompt"]},
                             {"name": "video", "modality": "video", "grid": [p["frames"], p["side"], p["side"]]}],
                "mask": {"base": causal,
                         "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}]}}
    elif name == "window_sinks":
        data = {"segments": [{"name": "text", "length": p["n"]}],
                "mask": {"base": {"pattern": "window", "size": p["window"]},
                         "overlays": [{"op": "or", "pattern": "first", "size": p["sinks"]},
                                      {"op": "and", "pattern": "causal"}]}}
    elif name == "multiverse":
        data = {"segments": [{"name": "prompt", "length": p["prompt"]}]
                + [{"name": f"path{i + 1}", "length": ln, "branch": str(i + 1)} for i, ln in enumerate(p["paths"])]
                + [{"name": "merge", "length": p["merge"]}],
                "mask": {"base": causal, "overlays": [{"op": "and", "pattern": "branch_isolated"}]}}
    elif name == "cca":
        data = {"segments": [{"name": "prefix", "length": p["prefix"]},
                             {"name": "image", "modality": "image", "grid": [p["side"], p["side"]]},
                             {"name": "suffix", "length": p["suffix"]}],
                "mask": {"base": causal,
                         "rules": [{"q": "image", "k": "image", "pattern": "block_causal", "by": "ring"}]}}
    else:
        raise ValueError(name)
    data["name"] = f"{name} {p['n']}"
    spec = Spec.load(data)
    assert spec.n == p["n"], (name, spec.n, p)
    return spec


def hand_mask_mod(name: str, p: dict):
    """The mask_mod someone writes by hand for this design: arithmetic on q_idx / kv_idx, sizes as
    Python int constants (attention-gym style; no tables)."""
    if name == "causal":
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
        return causal
    if name == "video_block_causal":
        P, FR = p["prompt"], p["frame"]

        def video_block_causal(b, h, q_idx, kv_idx):
            same_frame = (q_idx >= P) & (kv_idx >= P) & ((q_idx - P) // FR == (kv_idx - P) // FR)
            return (kv_idx <= q_idx) | same_frame
        return video_block_causal
    if name == "window_sinks":
        W, S = p["window"], p["sinks"]

        def window_sinks(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx < W) | (kv_idx < S))
        return window_sinks
    if name == "multiverse":
        s0 = p["prompt"]
        s1, s2, s3 = (s0 + sum(p["paths"][:i]) for i in (1, 2, 3))
        s4 = s0 + sum(p["paths"])

        def multiverse(b, h, q_idx, kv_idx):
            on_q = (q_idx >= s0) & (q_idx < s4)
            on_k = (kv_idx >= s0) & (kv_idx < s4)
            # causal, so kv <= q: two path tokens differ in path iff a path start lies in (kv, q]
            other = ((kv_idx < s1) & (q_idx >= s1)) | ((kv_idx < s2) & (q_idx >= s2)) | ((kv_idx < s3) & (q_idx >= s3))
            return (kv_idx <= q_idx) & ~(on_q & on_k & other)
        return multiverse
    if name == "cca":
        P, G = p["prefix"], p["side"]
        E = P + G * G

        def ring(i):
            local = i - P
            row, col = local // G, local % G
            return torch.minimum(torch.minimum(row, col), torch.minimum(G - 1 - row, G - 1 - col))

        def cca(b, h, q_idx, kv_idx):
            both = (q_idx >= P) & (q_idx < E) & (kv_idx >= P) & (kv_idx < E)
            return (both & (ring(kv_idx) <= ring(q_idx))) | (~both & (kv_idx <= q_idx))
        return cca
    raise ValueError(name)


# ---------------------------------------------------------------- the lowered path (being written)
def load_lower():
    """maskstudio.lower.lower, or None and the reason."""
    try:
        from maskstudio.lower import lower
    except ImportError as err:
        return None, f"n/a (maskstudio.lower: {err})"
    return lower, None


def lowered_mask_mod(low, device):
    """`lower(spec).mask_mod`: an attribute that is a mask_mod, or a method that returns one."""
    mm = low.mask_mod
    try:
        n_params = len(inspect.signature(mm).parameters)
    except (TypeError, ValueError):
        n_params = 4
    if n_params == 4:
        return mm
    try:
        return mm(device=device)
    except TypeError:
        return mm()


def lowered_block_mask(low, device):
    return low.block_mask(block_size=BLOCK, device=device)


def exported_block_mask(spec, device):
    """The `export --format flex` file of the spec, run as a module: its block_mask_for(None)."""
    import importlib.util
    import tempfile

    from maskstudio.export import flex_code

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "exported_mask.py")
    with open(path, "w") as fh:
        fh.write(flex_code(spec))
    # imported as a real module, as a user would (torch.compile re-imports the mask_mod's module)
    mod_spec = importlib.util.spec_from_file_location(f"exported_mask_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    return module.block_mask_for(None, device=device, block_size=BLOCK)


def division_variants(spec, lower, device) -> dict:
    """The lowered mask with exact integer division by sizes ('lowered_exact_div', the kernel before
    float-quotient division), with grid sides compiled in ('lowered_const_grids') and with every
    size a constant ('lowered_const_all': the same expression as hand-written code would hold it,
    which separates the cost of reading P from the cost of the expression's shape; every design
    that reads a size), the division variants for designs that divide by a size (their BlockMasks;
    attention timed beside the others), and the two table forms: grid coordinates read from per-token
    tables ('lowered_grid_tables': no division per score) and every attribute a lookup
    ('lowered_tables')."""
    from dataclasses import replace

    from maskstudio import expr

    low = lower(spec)
    if not expr.leaves(low.root, "p"):
        return {}
    values = dict(zip(low.keys, low.params.tolist()))
    constants = replace(low, root=expr.substitute(low.root, values))  # every size a constant, as by hand
    out = {"lowered_const_all": lowered_block_mask(constants, device)}
    if any(expr.divides_by_size(nd) for nd in expr.nodes(low.root)):
        exact = replace(low, root=expr.with_fast_divisions(low.root, set()))
        out = {"lowered_exact_div": lowered_block_mask(exact, device),
               "lowered_const_grids": lowered_block_mask(low.with_constant_grids(), device),
               "lowered_grid_tables": lowered_block_mask(lower(spec, form="grid tables"), device),
               "lowered_tables": lowered_block_mask(lower(spec, form="tables"), device), **out}
    return out


def with_compiled_build(fn):
    """fn() with knobs.COMPILE_BUILD on (the device builder's whole static build compiled)."""
    from maskstudio import knobs

    before, knobs.COMPILE_BUILD = knobs.COMPILE_BUILD, True
    try:
        return fn()
    finally:
        knobs.COMPILE_BUILD = before


def err_text(err: BaseException) -> str:
    return f"error: {type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"


# ---------------------------------------------------------------- checks
def check_design(name: str, n: int, tiny: bool, variant: bool, lower, p: dict | None = None) -> dict:
    """Hand-written mask_mod == spec.dense_mask (and lowered, when it exists) at n tokens; blocks of
    spec.block_mask / lowered block_mask == create_block_mask's on the hand-written mask_mod."""
    p = p or params(name, n, tiny, variant)
    if p is None:
        return {}
    spec, hand = spec_of(name, p), hand_mask_mod(name, p)
    ref = create_mask(hand, None, None, n, n, device="cpu")[0, 0]
    dense = spec.dense_mask()
    row = {"design": name, "n": n, "tiny_params": tiny, "variant": variant, "params": p,
           "hand_eq_spec_dense": bool(torch.equal(ref, dense))}
    ref_bm = create_block_mask(hand, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK)
    row["spec_blocks_eq"] = same_blocks(spec.block_mask(block_size=BLOCK), ref_bm)
    if lower is not None:
        try:
            low = lower(spec)
            mm = lowered_mask_mod(low, "cpu")
            row["lowered_eq_spec_dense"] = bool(torch.equal(create_mask(mm, None, None, n, n, device="cpu")[0, 0], dense))
            row["lowered_blocks_eq"] = same_blocks(lowered_block_mask(low, "cpu"), ref_bm)
        except Exception as err:  # noqa: BLE001 - the lowering is being written: record, go on
            row["lowered"] = err_text(err)
    return row


def run_checks(cases: list, lower, designs) -> list:
    """cases: (n, toy params?) pairs; asserts every check."""
    rows = []
    for n, tiny in cases:
        for name in designs:
            for variant in (False, True):
                row = check_design(name, n, tiny, variant, lower)
                if row:
                    rows.append(report_check(row))
    return rows


def report_check(row: dict) -> dict:
    name, n = row["design"], row["n"]
    low = row.get("lowered", f"lowered dense {row.get('lowered_eq_spec_dense', 'n/a')}, "
                             f"blocks {row.get('lowered_blocks_eq', 'n/a')}")
    print(f"check {name:19s} N={n:5d} {'toy' if row['tiny_params'] else 'real'} params"
          f"{' variant' if row['variant'] else ''}: hand == spec dense {row['hand_eq_spec_dense']}, "
          f"blocks {row['spec_blocks_eq']}; {low}", flush=True)
    assert row["hand_eq_spec_dense"] and row["spec_blocks_eq"], f"hand-written {name} differs from the spec: {row}"
    assert row.get("lowered_eq_spec_dense", True) and row.get("lowered_blocks_eq", True), \
        f"lowered {name} differs from the spec: {row}"
    return row


# ---------------------------------------------------------------- helpers
def setup_dynamo():
    """One compiled flex_attention serves every mask_mod: raise dynamo's per-function cache limit so
    that it recompiles instead of silently falling back to eager after 8 variants."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, 4096)
    for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, 8192)


def graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_once(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def env_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "hostname": socket.gethostname(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def host_tag(device) -> str:
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name().replace("NVIDIA", "")
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return "cpu"


def sdpa_ctx(device):
    """Flash SDPA on a GPU (the anchor); whatever SDPA picks on the CPU."""
    if str(device).startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "flash"
    import contextlib
    return contextlib.nullcontext(), "default (cpu)"


def try_measure(fn, device, reps, warmup=WARMUP, budget_s=None, min_warmup=2):
    """measure(), or the error text (an OOM, a kernel that does not fit, a missing API)."""
    try:
        return measure(fn, reps=reps, warmup=warmup, device=device, budget_s=budget_s, min_warmup=min_warmup)
    except Exception as err:  # noqa: BLE001
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        return err_text(err)


def density(mask_mod, n: int, device) -> float:
    """Exact fraction of allowed (q, kv) pairs, counted on the device in row chunks (the hand-written
    mask_mod, equal to the spec's by the checks; analyze() takes minutes for CCA at 128k on a CPU)."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    kv = torch.arange(n, device=device)[None, :]
    rows = max(1, (1 << 26) // n)
    total = 0
    for r in range(0, n, rows):
        q = torch.arange(r, min(n, r + rows), device=device)[:, None]
        total += int(mask_mod(zero, zero, q, kv).sum())
    return total / (n * n)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------- parts
def part_attention(args, device, n, designs, lower, flex_c, cbm_c, dtype, log, save) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, H, n, D, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, n, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    gqa = args.kv_heads != H
    kr, vr = (k.repeat_interleave(H // args.kv_heads, 1), v.repeat_interleave(H // args.kv_heads, 1)) if gqa else (k, v)
    ctx, backend = sdpa_ctx(device)
    with ctx:
        anchors = {"sdpa_causal": public(measure(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                                                 reps=args.reps, device=device)),
                   "sdpa_full": public(measure(lambda: F.scaled_dot_product_attention(q, kr, vr),
                                               reps=args.reps, device=device)),
                   "sdpa_backend": backend}
    log(f"N={n}: sdpa causal {anchors['sdpa_causal']['median_ms']:.3f} ms, full {anchors['sdpa_full']['median_ms']:.3f} ms")
    rows = []
    part = save({"n": n, "anchors": anchors, "rows": rows})  # saved again after every design
    for name in designs:
        p = params(name, n, args.tiny)
        spec, hand = spec_of(name, p), hand_mask_mod(name, p)
        row = {"design": name, "n": n, "params": p, "anchors": anchors}
        row["density"] = density(hand, n, device)
        builds, attention, first_call, diffs, same = {}, {}, {}, {}, {}

        # BlockMasks (build timings)
        m = measure(lambda: cbm_c(hand, None, None, n, n, device=device, BLOCK_SIZE=BLOCK), reps=args.reps,
                    warmup=WARMUP, device=device, budget_s=args.budget_s, min_warmup=2)
        bm_hand = m.pop("out")
        builds["create_block_mask_compiled"] = m
        if n <= args.plain_max:
            m = try_measure(lambda: create_block_mask(hand, None, None, n, n, device=device, BLOCK_SIZE=BLOCK),
                            device, args.ref_reps, warmup=1, budget_s=args.budget_s)
            if isinstance(m, dict):
                same["create_block_mask"] = same_blocks(m.pop("out"), bm_hand)
            builds["create_block_mask"] = m
        else:
            builds["create_block_mask"] = f"skipped (N > --plain-max {args.plain_max})"
        sync(device)
        m = "skipped (--skip-spec)" if args.skip_spec else try_measure(
            lambda: spec.block_mask(block_size=BLOCK, device=device), device, args.reps, budget_s=args.budget_s)
        bm_spec = m.pop("out") if isinstance(m, dict) else None
        builds["spec_block_mask"] = m
        if bm_spec is not None:
            same["spec"] = same_blocks(bm_spec, bm_hand)
        bm_low = None
        if lower is None:
            builds["lowered_block_mask"] = args.lower_missing
        else:
            try:
                t, low = timed_once(lambda: lower(spec), device)
                if args.constant_grids:
                    low = low.with_constant_grids()
                row["lower_s"] = t
                m = try_measure(lambda: lowered_block_mask(low, device), device, args.reps, budget_s=args.budget_s)
                bm_low = m.pop("out") if isinstance(m, dict) else None
                builds["lowered_block_mask"] = m
                if device.type == "cuda" and not args.skip_compiled_build:  # the whole build compiled, then captured
                    m = with_compiled_build(lambda: try_measure(lambda: lowered_block_mask(low, device), device,
                                                                 args.reps, budget_s=args.budget_s))
                    if isinstance(m, dict):
                        same["lowered_compiled_build"] = same_blocks(m.pop("out"), bm_hand)
                    builds["lowered_compiled_build_block_mask"] = m
                if bm_low is not None:
                    same["lowered"] = same_blocks(bm_low, bm_hand)
                    row["lowered_mask_mod"] = getattr(bm_low.mask_mod, "__qualname__", repr(bm_low.mask_mod))
            except Exception as err:  # noqa: BLE001
                builds["lowered_block_mask"] = err_text(err)
        row["block_mask"], row["identical_blocks"] = builds, same

        # attention forward: one static-shape compiled flex_attention for all three
        ref_out = None
        bm_export = None
        if args.export:
            try:
                bm_export = exported_block_mask(spec, device)
                same["export"] = same_blocks(bm_export, bm_hand)
            except Exception as err:  # noqa: BLE001
                attention["export"] = err_text(err)
        variants = division_variants(spec, lower, device) if args.variants and lower is not None else {}
        for path, bm in (("hand", bm_hand), ("spec", bm_spec), ("lowered", bm_low), ("export", bm_export),
                         *variants.items()):
            if path == "export" and bm is None:
                attention.setdefault("export", "not run (--export)")
                continue
            if bm is None:
                attention[path] = builds["lowered_block_mask"] if path == "lowered" else builds["spec_block_mask"]
                continue
            fn = lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=gqa)  # noqa: E731
            try:
                g0 = graphs()
                first_call[path], out = timed_once(fn, device)
                row.setdefault("graphs_compiled", {})[path] = graphs() - g0
                if ref_out is None:
                    ref_out = out
                else:
                    diffs[path] = max_diff(out, ref_out)
                del out
            except Exception as err:  # noqa: BLE001
                attention[path] = err_text(err)
                traceback.print_exc()
                continue
            attention[path] = try_measure(fn, device, args.reps)
            if isinstance(attention[path], dict):
                attention[path].pop("out")
        row["attention"], row["first_call_s"], row["max_abs_diff_vs_hand"] = attention, first_call, diffs
        rows.append(row)
        save(part)
        med = lambda x: f"{x['median_ms']:.3f}" if isinstance(x, dict) else str(x)[:60]  # noqa: E731
        log(f"N={n} {name:19s} density {row['density']:.3f} | attention ms: hand {med(attention['hand'])} "
            f"spec {med(attention['spec'])} lowered {med(attention['lowered'])} export "
            f"{med(attention.get('export', '-'))} {' '.join(f'{k} {med(attention[k])}' for k in variants)} | BlockMask ms: compiled cbm "
            f"{med(builds['create_block_mask_compiled'])} plain {med(builds['create_block_mask'])} spec "
            f"{med(builds['spec_block_mask'])} lowered {med(builds['lowered_block_mask'])} compiled build "
            f"{med(builds.get('lowered_compiled_build_block_mask', '-'))} | same blocks {same} "
            f"| max|diff| {diffs}")
        del bm_hand, bm_spec, bm_low, bm_export
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return part


def batch_sizes(n: int, tiny: bool) -> list:
    """8 layouts of [system text | video of side x side frames | question] at n tokens each."""
    side = 8 if tiny else 32
    frame = side * side
    out = []
    for i in range(BATCH):
        sys_len = frame // 4 + 37 * i * (1 if tiny else 13)
        frames = (n - sys_len) // frame - 1 - i // 2
        out.append({"sys": sys_len, "video": [frames, side, side], "question": n - sys_len - frames * frame})
    return out


def batch_spec(sizes: dict) -> Spec:
    return Spec.load({
        "name": "video qa",
        "segments": [{"name": "sys", "length": sizes["sys"]},
                     {"name": "video", "modality": "video", "grid": sizes["video"]},
                     {"name": "question", "length": sizes["question"]}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}]}})


def part_batch(args, device, n, lower, cbm_c, log) -> dict:
    sizes = batch_sizes(n, args.tiny)
    specs = [batch_spec(s) for s in sizes]
    frame = sizes[0]["video"][1] * sizes[0]["video"][2]
    starts = torch.tensor([s["sys"] for s in sizes], device=device)
    ends = torch.tensor([s["sys"] + s["video"][0] * frame for s in sizes], device=device)

    def batched(b, h, q_idx, kv_idx):  # what a FlexAttention user writes for per-sample layouts
        P, E = starts[b], ends[b]
        in_q = (q_idx >= P) & (q_idx < E)
        in_k = (kv_idx >= P) & (kv_idx < E)
        return (kv_idx <= q_idx) | (in_q & in_k & ((q_idx - P) // frame == (kv_idx - P) // frame))

    res = {"n": n, "batch": BATCH, "sizes": sizes, "design": "video_qa (system text | video, frames of "
           f"{frame} tokens, block-causal | question)"}
    m = measure(lambda: cbm_c(batched, BATCH, None, n, n, device=device, BLOCK_SIZE=BLOCK), reps=args.reps,
                device=device, budget_s=args.budget_s, min_warmup=2)
    ref = m.pop("out")
    res["create_block_mask_compiled"] = m
    if BATCH * n <= args.plain_max:
        m = try_measure(lambda: create_block_mask(batched, BATCH, None, n, n, device=device, BLOCK_SIZE=BLOCK),
                        device, args.ref_reps, warmup=1, budget_s=args.budget_s)
        if isinstance(m, dict):
            m.pop("out")
        res["create_block_mask"] = m
    else:
        res["create_block_mask"] = f"skipped (batch x N > --plain-max {args.plain_max})"
    ref_sets = block_sets(ref)
    m = try_measure(lambda: [s.block_mask(block_size=BLOCK, device=device) for s in specs], device, args.reps,
                    budget_s=args.budget_s)
    if isinstance(m, dict):
        bms = m.pop("out")
        res["spec_block_mask_x8_identical"] = all(
            torch.equal(block_sets(bm)[0][0].cpu(), ref_sets[0][i].cpu())
            and torch.equal(block_sets(bm)[1][0].cpu(), ref_sets[1][i].cpu()) for i, bm in enumerate(bms))
    res["spec_block_mask_x8"] = m
    if lower is None:
        res["lowered_batch_block_mask"] = args.lower_missing
    else:
        try:
            low = lower(specs[0])
            # the layouts' sizes as P rows (host work, like the hand-written version's starts / ends
            # tensors, which are made once outside its timing), then the build from them
            m = try_measure(lambda: low.batch(specs), "cpu", args.reps, budget_s=args.budget_s)
            low_batch = m.pop("out").on(device) if isinstance(m, dict) else low.batch(specs).on(device)
            res["lowered_batch_prepare"] = m
            m = try_measure(lambda: low_batch.block_mask(block_size=BLOCK, device=device), device, args.reps,
                            budget_s=args.budget_s)
            if isinstance(m, dict):
                res["lowered_identical"] = same_blocks(m.pop("out"), ref)
            res["lowered_batch_block_mask"] = m
            if device.type == "cuda" and not args.skip_compiled_build:
                m = with_compiled_build(lambda: try_measure(lambda: low_batch.block_mask(block_size=BLOCK, device=device),
                                                             device, args.reps, budget_s=args.budget_s))
                if isinstance(m, dict):
                    res["lowered_compiled_build_identical"] = same_blocks(m.pop("out"), ref)
                res["lowered_compiled_build_batch_block_mask"] = m
        except Exception as err:  # noqa: BLE001
            res["lowered_batch_block_mask"] = err_text(err)
    med = lambda x: f"{x['median_ms']:.3f}" if isinstance(x, dict) else str(x)[:80]  # noqa: E731
    log(f"batch {BATCH} x N={n}: compiled cbm {med(res['create_block_mask_compiled'])} ms, plain "
        f"{med(res['create_block_mask'])}, 8 x spec.block_mask {med(res['spec_block_mask_x8'])} ms "
        f"(identical {res.get('spec_block_mask_x8_identical')}), lowered batch {med(res['lowered_batch_block_mask'])} "
        f"(+ {med(res.get('lowered_batch_prepare', '-'))} ms to make P from 8 specs) "
        f"(identical {res.get('lowered_identical')})")
    return res


def part_recompiles(args, device, n, lower, flex_c, cbm_c, dtype, log) -> list:
    """Graphs dynamo adds to the compiled flex_attention when a design comes back. Per path, after
    torch._dynamo.reset(): 'base' (compiles), 'again' = the same design rebuilt from scratch after
    every earlier object was dropped, 'same_n' = other segment sizes at the same N, 'new_n' = the
    same design at N/2 (static shapes: a new N is expected to compile). Paths: hand-written (sizes
    are Python constants), spec.block_mask, 'lowered' = lower(base).for_spec(new spec) (the reuse
    API), 'lowered_relower' = lower(new spec) from scratch."""
    rows = []
    gqa = args.kv_heads != H
    inputs = {}
    bm = None

    def qkv(m):
        if m not in inputs:
            inputs[m] = (torch.randn(1, H, m, D, device=device, dtype=dtype),
                         torch.randn(1, args.kv_heads, m, D, device=device, dtype=dtype),
                         torch.randn(1, args.kv_heads, m, D, device=device, dtype=dtype))
        return inputs[m]

    def block_mask_for(path, name, p, base):
        spec = spec_of(name, p)
        m = p["n"]
        if path == "hand":
            return cbm_c(hand_mask_mod(name, p), None, None, m, m, device=device, BLOCK_SIZE=BLOCK)
        if path == "spec":
            return spec.block_mask(block_size=BLOCK, device=device)
        if path == "lowered" and base is not None:  # the reuse API: the base lowering at new sizes
            return lowered_block_mask(base.for_spec(spec) if hasattr(base, "for_spec") else lower(spec), device)
        return lowered_block_mask(lower(spec), device)

    for name in args.recompile_designs:
        p0 = params(name, n, args.tiny)
        cases = [("base", p0), ("again", p0), ("same_n", params(name, n, args.tiny, variant=True)),
                 ("new_n", params(name, n // 2, args.tiny))]
        paths = ("hand", "lowered", "lowered_relower") if args.skip_spec else ("hand", "spec", "lowered", "lowered_relower")
        for path in paths:
            if path.startswith("lowered") and lower is None:
                rows.append({"design": name, "n": n, "path": path, "result": args.lower_missing})
                continue
            row = {"design": name, "n": n, "path": path}
            torch._dynamo.reset()  # every path starts from nothing compiled: its 'base' compiles
            base = lower(spec_of(name, p0)) if path == "lowered" else None
            for case, p in cases:
                if p is None:
                    row[case] = "no segment sizes to change"
                    continue
                try:
                    if case == "again":  # the same design built from scratch, every earlier object dropped
                        del bm
                        gc.collect()
                    bm = block_mask_for(path, name, p, None if case in ("base", "again") else base)
                    q, k, v = qkv(p["n"])
                    g0 = graphs()
                    t, _ = timed_once(lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=gqa), device)
                    row[case] = {"new_graphs": graphs() - g0, "first_call_s": t}
                except Exception as err:  # noqa: BLE001
                    row[case] = err_text(err)
            bm = None
            rows.append(row)
            log(f"recompiles {name:19s} {path:8s} " + "  ".join(
                f"{c}: {row[c]['new_graphs']} graphs {row[c]['first_call_s']:.2f} s" if isinstance(row.get(c), dict)
                else f"{c}: {row.get(c, row.get('result'))}" for c, _ in cases))
    return rows


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16k,64k,128k", help="comma list of 16k, 32k, 64k, 128k or token counts")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--skip-spec", action="store_true", help="leave out the table-driven spec.mask_mod path (saves compiles)")
    ap.add_argument("--export", action="store_true", help="also time the `export --format flex` file's mask")
    ap.add_argument("--constant-grids", action="store_true", help="lowered path with grid sides compiled in (CCA)")
    ap.add_argument("--variants", action="store_true",
                    help="also time the lowered mask with exact division and with constant grid sides")
    ap.add_argument("--parts", default="attention,batch,recompiles")
    ap.add_argument("--skip-compiled-build", action="store_true",
                    help="no knobs.COMPILE_BUILD build figures (~50 s of compile per design and size on an H200)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes (N=1024, batch at 2048)")
    ap.add_argument("--check", action="store_true", help="only check hand-written == spec (and lowered) masks, on the CPU")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--kv-heads", type=int, default=H, help="KV heads (9 = plain MHA; 3 = SmolLM2's GQA)")
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--ref-reps", type=int, default=REPS, help="timed calls of plain create_block_mask")
    ap.add_argument("--budget-s", type=float, default=15.0,
                    help="BlockMask builds slower than budget/reps per call are timed fewer times (>= 3; n says how many)")
    ap.add_argument("--plain-max", type=int, default=65536, help="largest N (batch x N for the batch) for plain create_block_mask")
    ap.add_argument("--batch-n", type=int, default=None, help="tokens per layout in the batch part (default 32768; tiny 2048)")
    ap.add_argument("--recompile-n", type=int, default=None, help="N of the recompile part (default the smallest size)")
    ap.add_argument("--recompile-designs", default="causal,video_block_causal,multiverse,cca")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--watchdog", type=float, default=0,
                    help="print every thread's stack every S seconds (finds a stall; 0 = off)")
    ap.add_argument("--out", default=None, help="exact output path (default <out-dir>/kernels-<host>-<date>.json)")
    args = ap.parse_args(argv)
    args.designs = [d for d in args.designs.split(",") if d]
    args.recompile_designs = [d for d in args.recompile_designs.split(",") if d]
    for d in args.designs + args.recompile_designs:
        if d not in DESIGNS:
            ap.error(f"unknown design {d}; choose from {', '.join(DESIGNS)}")
    lower, missing = load_lower()
    args.lower_missing = missing
    if args.watchdog:
        import faulthandler
        faulthandler.dump_traceback_later(args.watchdog, repeat=True, file=sys.stderr)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f} s] {s}", flush=True)  # noqa: E731

    if args.check:
        # toy params at odd sizes (partial blocks everywhere), the real ones (frames of 1024, window
        # 1024 + 4 sinks / 4096 + 256 sinks) at 4k and 8k
        rows = run_checks([(1000, True), (1531, True), (4096, False), (8192, False)], lower, args.designs)
        big = params("window_sinks", 65536)
        rows.append(report_check(check_design("window_sinks", 8192, False, False, lower, p={**big, "n": 8192})))
        log(f"all {len(rows)} checks passed{'' if lower else ' (lowered: ' + missing + ')'}")
        return rows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    sizes = list(TINY_SIZES) if args.tiny else [SIZES.get(s) or int(s) for s in args.sizes.split(",") if s]
    parts = args.parts.split(",")
    setup_dynamo()
    log(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
        f"sizes {sizes}; parts {parts}; lowered: {'maskstudio.lower' if lower else missing}")
    result = {"env": env_info(device),
              "config": {"heads": H, "kv_heads": args.kv_heads, "head_dim": D, "batch": 1, "dtype": str(dtype),
                         "block": BLOCK, "reps": args.reps, "ref_reps": args.ref_reps, "warmup": WARMUP,
                         "budget_s": args.budget_s,
                         "compile": "torch.compile(flex_attention, dynamic=False)", "tiny": args.tiny,
                         "timing": "median of reps single calls after warm-up; CUDA events between synchronize()"},
              "lowered_available": lower is not None}
    # toy-size equality first, so every results file certifies hand-written == spec
    result["checks"] = run_checks([(1000, True)], lower, args.designs)

    path = args.out or os.path.join(
        args.out_dir, f"kernels-{host_tag(device)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write():  # after every design and part: a run cut short by a time limit keeps what it measured
        result["wall_s"] = time.perf_counter() - t_start
        with open(path + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(path + ".tmp", path)

    def save_attention(part):
        if not any(p is part for p in result.setdefault("attention", [])):
            result["attention"].append(part)
        write()
        return part

    flex_c = torch.compile(flex_attention, dynamic=False)
    cbm_c = torch.compile(create_block_mask)
    if "attention" in parts:
        for n in sizes:
            part_attention(args, device, n, args.designs, lower, flex_c, cbm_c, dtype, log, save_attention)
    if "batch" in parts:
        result["batch"] = part_batch(args, device, args.batch_n or (2048 if args.tiny else 32768), lower, cbm_c, log)
        write()
    if "recompiles" in parts:
        result["recompiles"] = part_recompiles(args, device, args.recompile_n or min(sizes), lower, flex_c, cbm_c,
                                               dtype, log)
    result["complete"] = True
    write()
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
