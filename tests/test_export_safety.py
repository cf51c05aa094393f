"""The FlexAttention export: safe for hostile names, and equal to dense_mask for every layer and
head of random specs, checked in a fresh interpreter that never imports maskstudio."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch

from maskstudio import Spec
from maskstudio.export import flex_code
from test_properties import specs

HOSTILE = [
    'x"""\nopen("marker_docstring", "w").write("1")\n"""',
    "a\n    open('marker_comment', 'w')\n    #",
    "\\x", "\\N{", "nul\x00byte", "tab\tand\rcr", "'''", "\x1b[31mred", "{}{{}}", "$x^$", "é ü 中文",
]

CHECK = textwrap.dedent('''
    import importlib.util, json, os, sys
    import numpy as np, torch
    from torch.nn.attention.flex_attention import create_mask
    assert "maskstudio" not in sys.modules
    folder = sys.argv[1]
    cases = json.load(open(os.path.join(folder, "cases.json")))
    for case in cases:
        spec_file = importlib.util.spec_from_file_location(case["module"], os.path.join(folder, case["module"] + ".py"))
        mod = importlib.util.module_from_spec(spec_file)
        spec_file.loader.exec_module(mod)
        expected = np.load(os.path.join(folder, case["module"] + ".npy"))  # [layers, heads, N, N]
        for layer in range(expected.shape[0]):
            fn = mod.mask_mod
            if case["per_layer"]:
                fn = lambda b, h, q, k, layer=layer: mod.mask_mod(b, h, q, k, layer=layer)
            got = create_mask(fn, None, expected.shape[1], mod.N, mod.N)[0].numpy()
            if not (got == expected[layer]).all():
                print("MISMATCH", case["module"], layer); sys.exit(1)
    assert "maskstudio" not in sys.modules
    print("ok", len(cases))
''')


def run_fresh(folder) -> str:
    out = subprocess.run([sys.executable, "-I", "-c", CHECK, str(folder)], cwd=folder,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def write_case(folder, module: str, spec: Spec, layers: int, heads: int, cases: list) -> None:
    (folder / f"{module}.py").write_text(flex_code(spec), encoding="utf-8")
    dense = np.stack([np.stack([spec.dense_mask(layer=l, head=h).numpy() for h in range(heads)])
                      for l in range(layers)])
    np.save(folder / f"{module}.npy", dense)
    cases.append({"module": module, "per_layer": spec.varies_by_layer})


ATTRS = ["frame", "t", "row", "col", "cell", "ring", "branch", "local", "modality", "length"]


def adversarial(raw: dict, draw) -> dict:
    """Sometimes give the first segment a user attribute `idx` (a name the old export's Tok
    shadowed) and point attribute parameters at it; sometimes add a step restricted to one head
    or layer on every segment that reads an attribute nothing else may read."""
    raw = json.loads(json.dumps(raw))
    if draw(st.booleans()):
        seg = raw["segments"][0]
        n = seg.get("length") or int(np.prod(seg["grid"]))
        seg["attrs"] = {"idx": draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n))}
        for step in [raw["mask"]["base"], *raw["mask"]["rules"], *raw["mask"]["overlays"]]:
            if "by" in step and step["by"] != "chunk" and draw(st.booleans()):
                step["by"] = "idx"
    if draw(st.booleans()):
        attrs = ATTRS + (["idx"] if "attrs" in raw["segments"][0] else [])
        step = {"q": "*", "k": "*", "pattern": draw(st.sampled_from(["same", "block_causal"])),
                "by": draw(st.sampled_from(attrs)),
                draw(st.sampled_from(["heads", "layers"])): [draw(st.integers(1, 2))]}
        if draw(st.booleans()):
            step["op"] = draw(st.sampled_from(["and", "or", "and_not"]))
            raw["mask"]["overlays"].append(step)
        else:
            raw["mask"]["rules"].append(step)
    return raw


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_hostile_names_give_a_file_that_compiles_runs_nothing_and_keeps_the_strings(tmp_path):
    cases = []
    for i, name in enumerate(HOSTILE):
        raw = {"name": name, "segments": [{"name": name, "length": 3}, {"name": f"{name}2", "length": 2}],
               "mask": {"base": {"pattern": "causal"},
                        "rules": [{"q": name, "k": f"{name}2", "pattern": "full"}],
                        "overlays": [{"op": "and_not", "q": [f"{name}2"], "k": name, "pattern": "first",
                                      "size": 1}]}}
        spec = Spec.load(raw)
        code = flex_code(spec)
        compile(code, f"case{i}.py", "exec")
        namespace: dict = {}
        exec(compile(code, f"case{i}.py", "exec"), namespace)  # our own generated file, not user code
        assert namespace["SPEC_NAME"] == name and namespace["SEGMENTS"] == [name, f"{name}2"]
        write_case(tmp_path, f"case{i}", spec, 1, 1, cases)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_fresh(tmp_path)
    assert not list(tmp_path.glob("marker*"))


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_export_equals_dense_for_every_layer_and_head_of_random_specs(tmp_path):
    """120 random specs (hypothesis, derandomized) with per-layer and per-head steps, user attributes
    and full blocks; every file is then imported and checked in one fresh interpreter."""
    cases: list = []

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(specs(), st.data())
    def collect(raw, data):
        spec = Spec.load(adversarial(raw, data.draw))
        write_case(tmp_path, f"spec{len(cases)}", spec, 3, 3, cases)

    collect()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    assert run_fresh(tmp_path).strip() == f"ok {len(cases)}"


@pytest.mark.parametrize("count", [260, 1000])
def test_exports_of_hundreds_of_overlays_compile_and_equal_the_spec(tmp_path, count):
    """250+ overlays made the exported file invalid Python ("too many nested parentheses"): deep
    chains are now printed as flat statements, every 32 levels one named step."""
    import importlib.util
    import time

    from maskstudio.export import export_bytes

    overlays = [{"op": ("and", "or", "and_not")[i % 3], "pattern": "window", "size": 3 + i % 7} for i in range(count)]
    spec = Spec.load({"segments": [{"name": "a", "length": 40}], "mask": {"base": {"pattern": "causal"},
                                                                          "overlays": overlays}})
    t0 = time.perf_counter()
    path = tmp_path / "deep.py"
    path.write_bytes(export_bytes(spec, "flex"))
    compile(path.read_text(), str(path), "exec")
    module_spec = importlib.util.spec_from_file_location("deep", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    idx = torch.arange(spec.n)
    got = module.mask_mod_for(None)(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    assert torch.equal(got.expand(spec.n, spec.n), spec.dense_mask())
    assert time.perf_counter() - t0 < 30
