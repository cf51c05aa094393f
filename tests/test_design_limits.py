"""Bounded design work (#24 item 2): what grows with segment pairs is either made cheap or refused in
milliseconds with one line naming the limit and its MASKSTUDIO_* setting. The measured case: a 31 KB
spec of 1,024 segments kept the flow view busy for over 900 s (here: flow 67 s at 256 segments, reach
81 s, analysis 22 s at 1,024). benchmarks/bench_design_limits.py prints the worst accepted cases."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from maskstudio import flow, knobs, viz
from maskstudio.errors import SpecError
from maskstudio.export_flex import export_work, flex_code
from maskstudio.spec import Spec
from maskstudio.studio import pictures


def many_json(n: int, length: int = 8, rules: int = 0) -> dict:
    return {"name": f"many{n}", "segments": [{"name": f"s{i}", "length": length} for i in range(n)],
            "mask": {"base": {"pattern": "causal"},
                     "rules": [{"q": [f"s{i % n}"], "k": "*", "pattern": "window", "size": 2 + i % 5, "causal": True}
                               for i in range(rules)]}}


def many(n: int, length: int = 8, rules: int = 0) -> Spec:
    return Spec.load(many_json(n, length, rules))


def test_the_issue_spec_is_31_kb_and_its_pictures_are_refused_or_fast(tmp_path):
    spec = many(1024)
    assert 30_000 < len(json.dumps(many_json(1024))) < 40_000
    t0 = time.perf_counter()
    o = pictures.view_options(spec, {"flow_level": "segment"})
    said = time.perf_counter() - t0
    line = o["warnings"]["flow_level"]
    assert said < 0.5 and "\n" not in line and "256 nodes" in line and "MASKSTUDIO_FLOW_MAX_NODES" in line
    assert "1,024 segments" in line
    t0 = time.perf_counter()
    path = pictures._draw(spec, "flow", o, str(tmp_path / "flow.png"))
    assert os.path.getsize(path) > 0 and time.perf_counter() - t0 < 2.0    # a message, not 524k edges
    # the segment x segment texts: one line each instead of megabytes
    density = pictures.density_rows(spec)
    assert density["data"] == [[density["data"][0][0]]] and "SEGMENT_TABLE_MAX" in density["data"][0][0]
    checks = pictures.check_text(spec)
    assert len(checks) < 5_000 and "listed up to 64" in checks
    assert flow.layers_until_reach(spec, 2).text().count("\n") == 0


def test_reach_view_past_the_node_limit_skips_only_the_table():
    spec = many(300, length=2)
    t0 = time.perf_counter()
    fig = viz.render(spec, "reach", layers=2)
    took = time.perf_counter() - t0
    info = fig.maskstudio["reach"]
    assert info["table"] is None and info["field"].shape == (2, spec.n) and took < 10
    assert any("MASKSTUDIO_FLOW_MAX_NODES" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_many_edges_are_one_collection_with_every_edge():
    spec = many(40, length=2)   # causal: 820 edges, past the per-edge patches
    fig = viz.render(spec, "flow")
    g = fig.maskstudio["flow"]["graph"]
    lines = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "edges"]
    assert g.number_of_edges() == 40 * 41 // 2 and len(lines) == 1
    assert len(lines[0].get_segments()) == g.number_of_edges()
    assert not [p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("edge:")]


def naive_steps(reach: torch.Tensor) -> list:
    s = reach.shape[1]
    out = []
    for a in range(s):
        row = []
        for b in range(s):
            hit = torch.nonzero(reach[:, a, b]).flatten()
            row.append(0 if a == b else (int(hit[0]) + 1 if len(hit) else None))
        out.append(row)
    return out


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_layers_until_reach_matches_the_pair_by_pair_reading(layers):
    spec = Spec.load({"segments": [{"name": "a", "length": 3}, {"name": "b", "length": 2}, {"name": "c", "length": 4},
                                   {"name": "d", "length": 1}],
                      "mask": {"base": {"pattern": "window", "size": 2, "causal": True, "by": "index"},
                               "rules": [{"q": ["c"], "k": ["a"], "pattern": "full", "layers": [1]}]}})
    table = flow.layers_until_reach(spec, layers)
    reach = flow.segment_reachability(spec, layers)
    assert table.steps == naive_steps(reach)
    seen = flow.sees_segments(spec, layers)
    seg = spec.table["segment"]
    for a in range(4):  # every token of A (the per-segment loop this replaced)
        assert torch.equal(reach[:, a, :], seen[:, seg == a, :].all(1))
    assert torch.equal(flow.segment_reachability(spec, layers, every=False)[:, 2, :], seen[:, seg == 2, :].any(1))


def test_flex_export_work_is_refused_before_lowering():
    spec = many(256, rules=128)
    assert export_work(spec) > knobs.EXPORT_MAX_WORK
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as err:
        flex_code(spec)
    assert time.perf_counter() - t0 < 0.2
    said = str(err.value)
    assert "\n" not in said and "EXPORT_MAX_WORK" in said and "MASKSTUDIO_EXPORT_MAX_WORK" in said
    small = many(16, rules=4)   # accepted: pairs x steps x variants far under the limit
    assert export_work(small) == 16 * 16 * 5 and "def mask_mod_for" in flex_code(small)


def test_limits_read_their_environment_overrides():
    names = ["FLOW_MAX_NODES", "SEGMENT_TABLE_MAX", "EXPORT_MAX_WORK", "MAX_STEPS", "DESIGN_MAX_TOKENS",
             "DESIGN_MAX_WORK", "DESIGN_LIGHT_WORK"]
    code = ("import importlib.util as u; s = u.spec_from_file_location('k', %r); k = u.module_from_spec(s); "
            "s.loader.exec_module(k); print(*[getattr(k, n) for n in %r])" % (knobs.__file__, names))
    env = {**os.environ, **{f"MASKSTUDIO_{n}": str(i + 7) for i, n in enumerate(names)}}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(i + 7) for i in range(len(names))]


def test_steps_past_the_loader_limit_are_refused_before_any_is_read():
    text = json.dumps({"segments": [{"name": "a", "length": 4}],
                       "mask": {"rules": [{"pattern": "causal"}] * (knobs.MAX_STEPS + 1)}})
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as err:
        Spec.from_json(text)
    assert time.perf_counter() - t0 < 1.0
    assert f"{knobs.MAX_STEPS + 1} rules and overlays" in str(err.value) and "MASKSTUDIO_MAX_STEPS" in str(err.value)
    Spec.from_json(json.dumps({"segments": [{"name": "a", "length": 4}],
                               "mask": {"overlays": [{"pattern": "causal", "op": "and"}] * knobs.MAX_STEPS}}))


def test_a_design_past_the_servers_token_limit_gets_one_line_not_pictures(monkeypatch):
    monkeypatch.setattr(knobs, "DESIGN_MAX_TOKENS", 1000)
    spec = many(4, length=300)
    t0 = time.perf_counter()
    out = pictures.design_views(spec, {})
    assert time.perf_counter() - t0 < 2.0
    line = out["checks"]
    assert "1,200 tokens" in line and "MASKSTUDIO_DESIGN_MAX_TOKENS" in line and "\n" not in line
    assert len({out[v] for v in pictures.VIEWS}) == 1 and os.path.getsize(out["mask"]) > 0
    assert pictures.block_view(spec, 128) == (None, line)
    small = pictures.design_views(many(4, length=200), {})   # under it: drawn as ever
    assert "density" in small["checks"] and len({small[v] for v in pictures.VIEWS}) == 5


def test_tokens_times_steps_past_the_work_limit_get_one_line(monkeypatch):
    monkeypatch.setattr(knobs, "DESIGN_MAX_WORK", 10_000)
    spec = many(4, length=256, rules=9)   # 1,024 tokens x 10 steps
    line = pictures.design_refusal(spec)
    assert line.startswith("1,024 tokens x 10 steps") and "MASKSTUDIO_DESIGN_MAX_WORK" in line
    assert pictures.design_views(spec, {})["checks"] == line
    assert pictures.design_refusal(many(4, length=256, rules=8)) == ""   # 9,216: drawn


def test_a_long_tape_is_evaluated_in_the_memory_of_its_live_values():
    """Values are let go after their last reader: a design of many distinct rules evaluates its
    rows without holding one [rows, N] tensor per step (the checks of 1,024 steps grew to 7-14 GB;
    this tape on [512, 4096] rows grew the process by 640 MB before, 37 MB now)."""
    import resource

    from maskstudio import expr
    from maskstudio.lower import lowered

    spec = many(64, length=64, rules=300)
    low = lowered(spec)
    steps = expr.tape(low.guarded)   # the whole tape, not specialised to the rows
    assert len(steps) > 300
    q, kv = torch.arange(512), torch.arange(spec.n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = expr.run_tape(steps, {"q": q[:, None], "kv": kv[None, :], "h": torch.tensor(0)}, low.params, low.slots,
                         dict(low.tables))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb
    assert torch.equal(torch.broadcast_to(rows, (512, spec.n)), low.evaluate(q, kv))
