"""CLI and export: exit codes, every export format reproduces the mask, bad input is one line."""
import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch

from torch.nn.attention.flex_attention import create_block_mask, create_mask

from maskstudio import Spec, SpecError, knobs
from maskstudio.cli import main
from reference import mask_mod as comp_mask_mod
from maskstudio.export import flex_code
from maskstudio.schema import SCHEMA_PATH, build_schema

SPEC = {
    "maskstudio": 1, "name": "TC-LLaVA-style video",
    "segments": [{"name": "sys", "modality": "text", "length": 4},
                 {"name": "img", "modality": "image", "grid": [3, 3]},
                 {"name": "video", "modality": "video", "grid": [4, 2, 2]},
                 {"name": "pathA", "modality": "text", "length": 3, "branch": "a"},
                 {"name": "q", "modality": "text", "length": 5, "text": "optional content for live runs"}],
    "mask": {"base": {"pattern": "causal"},
             "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}],
             "overlays": [{"op": "or", "q": "*", "k": "sys", "pattern": "full"},
                          {"op": "and_not", "q": "q", "k": "img", "pattern": "full", "layers": [1], "heads": [0, 2]}]},
    "positions": {"scheme": "mrope"},
}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


def test_check_reports_and_exits_zero(spec_file, capsys):
    assert main(["check", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "segment density" in out and "no problems found" in out


def test_check_exits_one_on_empty_rows(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"segments": [{"name": "a", "length": 3}],
                                "mask": {"base": {"pattern": "first", "size": 0}}}))
    assert main(["check", str(path)]) == 1
    assert "attend no key" in capsys.readouterr().out


@pytest.mark.parametrize("mutation, expected", [
    ("{not json", "invalid JSON at line 1"),
    (json.dumps({**SPEC, "mask": {"rules": [{"q": "vidoe", "k": "*", "pattern": "full"}]}}),
     "mask.rules[0].q: no segment named 'vidoe' (did you mean 'video'?)"),
    (json.dumps({**SPEC, "positions": {"scheme": "explicit", "ids": [0, 1]}}), "positions.ids: has 2 ids"),
    (json.dumps({"segments": [{"name": "q", "text": "hello"}]}), "segments[0].length"),
    (json.dumps({"segments": [{"name": "x", "length": 10 ** 9}]}), "over the limit"),
    (json.dumps({"segments": [{"name": "x", "length": 2}], "mask": {"base": {"pattern": "__import__('os')"}}}),
     "mask.base.pattern: unknown pattern"),
])
def test_bad_input_exit_two_one_line(tmp_path, capsys, mutation, expected):
    path = tmp_path / "bad.json"
    path.write_text(mutation)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_token_limit_is_configurable(spec_file, capsys):
    assert main(["check", str(spec_file), "--max-tokens", "10"]) == 2
    assert "over the limit of 10" in capsys.readouterr().err
    assert main(["check", str(spec_file), "--max-tokens", "100"]) == 0


def test_export_npy_positions_json(spec_file, tmp_path):
    spec = Spec.load(spec_file)
    for fmt, check in [("npy", lambda a: np.array_equal(a, spec.dense_mask().numpy())),
                       ("positions", lambda a: np.array_equal(a, spec.position_ids().numpy()))]:
        out = tmp_path / f"{fmt}.npy"
        assert main(["export", str(spec_file), "--format", fmt, "-o", str(out)]) == 0
        arr = np.load(out)
        assert check(arr), fmt
    assert np.load(tmp_path / "npy.npy").dtype == np.bool_
    assert np.load(tmp_path / "positions.npy").shape == (3, spec.n)
    out = tmp_path / "norm.json"
    assert main(["export", str(spec_file), "--format", "json", "-o", str(out)]) == 0
    assert out.read_text() == spec.to_json()
    assert Spec.load(out).to_json() == out.read_text()


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_flex_export_reproduces_every_layer_and_head(spec_file, tmp_path):
    spec = Spec.load(spec_file)
    path = tmp_path / "my_mask.py"
    assert main(["export", str(spec_file), "--format", "flex", "-o", str(path)]) == 0
    code = path.read_text()
    imports = [l for l in code.splitlines() if l.startswith(("import", "from"))]
    assert imports == ["import difflib", "import functools", "import itertools", "import re",
                       "from dataclasses import dataclass, field",
                       "import torch"]
    check = f"""
import functools, json, sys, torch
sys.path.insert(0, {str(tmp_path)!r})
import my_mask
from torch.nn.attention.flex_attention import create_mask
out = {{}}
for layer in (0, 1):
    m = create_mask(functools.partial(my_mask.mask_mod, layer=layer), None, 3, my_mask.N, my_mask.N)[0]
    out[layer] = m.int().tolist()
print(json.dumps({{"masks": out, "pos": my_mask.position_ids().tolist()}}))
"""
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for layer in (0, 1):
        for head in range(3):
            assert torch.equal(torch.tensor(got["masks"][str(layer)][head]).bool(),
                               spec.dense_mask(layer=layer, head=head))
    assert got["pos"] == spec.position_ids().tolist()
    assert not torch.equal(spec.dense_mask(layer=1, head=0), spec.dense_mask(layer=0, head=0))


def test_preset_flag_and_missing_spec(capsys):
    assert main(["check"]) == 2
    assert "give a spec file" in capsys.readouterr().err


def test_shipped_schema_is_current_and_validates_specs():
    assert json.loads(SCHEMA_PATH.read_text()) == build_schema(), "run: python -m maskstudio.schema"
    jsonschema.validate(SPEC, build_schema())
    jsonschema.validate(json.loads(Spec.load(SPEC).to_json()), build_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**SPEC, "mask": {"base": {"pattern": "window"}}}, build_schema())


def test_spec_api_surface():
    spec = Spec.load(SPEC)
    assert spec.to_dict()["segments"][0] == SPEC["segments"][0]
    assert spec.token_table().n == spec.n == 4 + 9 + 16 + 3 + 5
    bm = spec.block_mask(block_size=16, num_heads=3)
    assert bm.shape[-2:] == (spec.n, spec.n)
    with pytest.raises(ValueError, match="num_heads"):
        spec.block_mask()
    with pytest.raises(SpecError, match="sizes.vid: no segment named 'vid'"):
        spec.with_sizes({"vid": [2, 2, 2]})
    bigger = spec.with_sizes({"video": [8, 2, 2], "q": 7})
    assert bigger.n == spec.n + 16 + 2


def test_presets_and_patterns_commands_list_everything(capsys):
    from maskstudio.patterns import PATTERNS
    from maskstudio.presets import list_presets

    assert main(["patterns"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} {{" in "\n" + out for name in PATTERNS)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == len(list_presets())
    assert main(["check", "--preset", "cca"]) == 0
    assert "segment density" in capsys.readouterr().out
    assert main(["check", "--preset", "ccaa"]) == 2
    assert "cca" in capsys.readouterr().err


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_run_with_an_image_on_a_tiny_vlm(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    spec = tmp_path / "v.json"
    spec.write_text(json.dumps({"segments": [{"name": "img", "modality": "image", "grid": [2, 2]},
                                             {"name": "q", "text": " colour?"}]}))
    out = tmp_path / "run.json"
    assert main(["run", str(spec), "--model", "tiny-qwen2-vl", "--image", f"img={tmp_path / 'red.png'}",
                 "--json", str(out)]) == 0
    layout = json.loads(out.read_text())["layout"]
    grid = next(s for s in layout["segments"] if s["name"] == "img")["grid"]
    assert grid != [2, 2] and grid[0] * grid[1] > 4          # the processor's real merged patch grid
    assert main(["run", str(spec), "--model", "tiny-qwen2-vl", "--image", "img"]) == 2
    assert "SEGMENT=PATH" in capsys.readouterr().err


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_flex_export_of_every_preset_reproduces_it(tmp_path):
    """The generated file (run here, it is our own output) equals the spec on every layer/head it varies by."""
    import functools
    import runpy

    from torch.nn.attention.flex_attention import create_mask

    from maskstudio.presets import list_presets, load_preset

    for p in list_presets():
        spec = load_preset(p["name"])
        path = tmp_path / f"{p['name']}.py"
        path.write_text(flex_code(spec))
        ns = runpy.run_path(str(path))
        for layer in sorted({0} | {x for ls in spec.layer_sets() for x in ls})[:3]:
            mod = functools.partial(ns["mask_mod"], layer=layer) if spec.varies_by_layer else ns["mask_mod"]
            dense = create_mask(mod, None, 2, ns["N"], ns["N"])[0]
            for head in range(2):
                assert torch.equal(dense[head], spec.dense_mask(layer=layer, head=head)), (p["name"], layer, head)
        assert torch.equal(ns["position_ids"](), spec.position_ids()), p["name"]


def _scaled_sizes(spec, factor):
    """Every segment that can be resized, `factor` times longer (grids: every side)."""
    return {s["name"]: ([g * factor for g in s["grid"]] if "grid" in s else s["length"] * factor)
            for s in spec.segments if "attrs" not in s and "frames" not in s}


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_flex_export_takes_any_sizes_of_every_preset(tmp_path):
    """mask_mod_for / position_ids_for / block_mask_for at sizes the preset does not ship with
    equal the resized spec (explicit position ids cannot be resized: those presets keep theirs)."""
    import runpy

    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from maskstudio.presets import list_presets, load_preset

    for p in list_presets():
        spec = load_preset(p["name"])
        ns = runpy.run_path(str(_write(tmp_path, p["name"], flex_code(spec))))
        sizes = _scaled_sizes(spec, 2)
        if spec.positions["scheme"] == "explicit":
            sizes = {}
        big = spec.with_sizes(sizes) if sizes else spec
        n = big.n
        heads = 2 if spec.varies_by_head else 1
        dense = create_mask(ns["mask_mod_for"](sizes), None, heads, n, n)[0]
        for head in range(heads):
            assert torch.equal(dense[head], big.dense_mask(0, head)), p["name"]
        assert torch.equal(ns["position_ids_for"](sizes), big.position_ids()), p["name"]
        ours = ns["block_mask_for"](sizes, num_heads=heads, block_size=16)
        ref = create_block_mask(comp_mask_mod(big), None, ours.kv_num_blocks.shape[1], n, n, device="cpu", BLOCK_SIZE=16)
        assert torch.equal(ours.to_dense(), ref.to_dense()), p["name"]


def test_flex_export_mask_mods_capture_tensors_on_their_device(tmp_path):
    """A compiled kernel cannot read a CPU tensor: mask_mod_for(device=...) keeps P and the lookup
    tables where attention runs (block_mask_for passes its device); with the sizes compiled in,
    P is Python ints and only the lookup tables are tensors."""
    import runpy

    for name in ("presets/cca.json", "presets/ancat.json"):
        spec = Spec.load(name)
        ns = runpy.run_path(str(_write(tmp_path, "dev", flex_code(spec))))
        for fixed in (False, True):
            mm = ns["mask_mod_for"](None, device="meta", sizes_in_kernel=fixed)
            cells = {name: c.cell_contents for name, c in zip(mm.__code__.co_freevars, mm.__closure__)}
            tensors = [t for t in ([cells["P"]] + list(cells["T"].values())) if isinstance(t, torch.Tensor)]
            assert all(t.device.type == "meta" for t in tensors), name
            assert mm.sizes_in_kernel == fixed and isinstance(cells["P"], list) == fixed, name
            assert fixed or tensors, name


def test_flex_export_compiles_the_first_layouts_sizes_in_then_reads_them_from_p(tmp_path):
    """block_mask_for's BlockMask runs a mask_mod with the sizes as Python constants for the first
    SIZES_IN_KERNEL layouts of a layer program (and those again), then the one reading P; its
    blocks are the spec's either way, and a batch reads P."""
    import runpy

    spec = Spec.load("presets/cca.json")
    ns = runpy.run_path(str(_write(tmp_path, "cca_fixed", flex_code(spec))))
    assert ns["SIZES_IN_KERNEL"] == knobs.SIZES_IN_KERNEL
    ns["block_mask_for"].__globals__["SIZES_IN_KERNEL"] = 2
    got = []
    for side in (4, 5, 6, 4):
        sizes = {"image": [side, side]}
        bm = ns["block_mask_for"](sizes, block_size=16)
        got.append(bm.mask_mod.sizes_in_kernel)
        big = spec.with_sizes(sizes)
        assert torch.equal(create_mask(bm.mask_mod, None, None, big.n, big.n)[0, 0], big.dense_mask())
        ref = create_block_mask(comp_mask_mod(big), None, None, big.n, big.n, device="cpu", BLOCK_SIZE=16)
        assert torch.equal(bm.to_dense(), ref.to_dense())
    assert got == [True, True, False, True]
    assert not ns["mask_mod_for"]({"image": [7, 7]}).sizes_in_kernel
    assert ns["mask_mod_for"]({"image": [7, 7]}, sizes_in_kernel=True).sizes_in_kernel
    assert not getattr(ns["block_mask_for"]([None, {"image": [5, 5]}]).mask_mod, "sizes_in_kernel", False)


def test_flex_export_helpers_take_sizes_compiled_in_as_python_ints(tmp_path):
    """With the sizes compiled in, a test of sizes alone is a Python bool and a size a Python int:
    the file's min / max, where and not take those beside tensors (torch's own refuse them)."""
    import runpy

    ns = runpy.run_path(str(_write(tmp_path, "helpers", flex_code(Spec.load("presets/cca.json")))))
    t = torch.tensor([1, 5])
    assert ns["_tensor_min"](3, 4, torch.minimum) == 3 and ns["_tensor_min"](3, 4, torch.maximum) == 4
    assert torch.equal(ns["_tensor_min"](3, t, torch.minimum), torch.tensor([1, 3]))
    assert torch.equal(ns["_tensor_min"](t, 3, torch.maximum), torch.tensor([3, 5]))
    assert torch.equal(ns["_tensor_min"](t, t + 1, torch.minimum), t)
    assert ns["_where"](True, t, 0) is t and ns["_where"](False, t, 0) == 0
    assert torch.equal(ns["_where"](t > 2, t, 0), torch.tensor([0, 5]))
    assert ns["_not"](True) is False and torch.equal(ns["_not"](t > 2), torch.tensor([True, False]))


def test_flex_export_divides_by_float_quotient_only_where_exact(tmp_path):
    """Divisions by sizes take the float quotient (fast on GPUs) when the file's own bound on
    their dividends allows it, exact `//` otherwise, and the mask is the spec's either way."""
    import runpy

    from torch.nn.attention.flex_attention import create_mask

    spec = Spec.load("presets/cca.json")
    ns = runpy.run_path(str(_write(tmp_path, "cca_div", flex_code(spec))))
    closure = lambda mm: {c.cell_contents for c in mm.__closure__ if callable(c.cell_contents)}  # noqa: E731
    assert ns["floordiv_by_size"] in closure(ns["mask_mod_for"](None, sizes_in_kernel=False))
    fixed = ns["mask_mod_for"](None, sizes_in_kernel=True)  # by a constant: `//` is a multiply and a shift
    assert ns["_exact_div"] in closure(fixed) and ns["floordiv_by_size"] not in closure(fixed)
    ns["mask_mod_for"].__globals__["FAST_DIVIDEND"] = 40  # as if these sizes were past 2**21
    mm = ns["mask_mod_for"](None, sizes_in_kernel=False)
    assert ns["_exact_div"] in closure(mm) and ns["floordiv_by_size"] not in closure(mm)
    for m in (mm, fixed):
        assert torch.equal(create_mask(m, None, None, spec.n, spec.n)[0, 0], spec.dense_mask())


def _write(folder, name, code):
    path = folder / f"{name}.py"
    path.write_text(code)
    return path


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_flex_export_batches_layouts_of_one_design(tmp_path):
    import runpy

    from torch.nn.attention.flex_attention import create_mask

    spec = Spec.load("presets/tc_llava.json")
    ns = runpy.run_path(str(_write(tmp_path, "tc", flex_code(spec))))
    layouts = [None, _scaled_sizes(spec, 2)]
    bm = ns["block_mask_for"](layouts, block_size=16)
    specs = [spec, spec.with_sizes(layouts[1])]
    n = max(s.n for s in specs)
    assert bm.shape[0] == 2 and bm.seq_lengths == (n, n)
    dense = create_mask(bm.mask_mod, 2, 1, n, n)
    for b, sp in enumerate(specs):
        assert torch.equal(dense[b, 0, :sp.n, :sp.n], sp.dense_mask())
        assert not dense[b, 0, sp.n:].any() and not dense[b, 0, :, sp.n:].any()
    with pytest.raises(ValueError, match="sizes.nope: no segment named 'nope'"):  # Spec.with_sizes' SpecError
        ns["mask_mod_for"]({"nope": 3})


@pytest.mark.slow
def test_flex_export_drives_a_transformers_model(tmp_path):
    """The export's own usage note: attn_implementation="flex_attention" with the exported BlockMask
    as attention_mask gives the logits of the eager model under the spec's additive mask."""
    import runpy

    import transformers as tf

    spec = Spec.load("presets/prefix_lm.json")
    ns = runpy.run_path(str(_write(tmp_path, "plm", flex_code(spec))))
    sizes = {spec.segments[0]["name"]: 40, spec.segments[1]["name"]: 30}
    big = spec.with_sizes(sizes)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, big.n))
    pos = ns["position_ids_for"](sizes)[None]
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        flex = model(ids, attention_mask=ns["block_mask_for"](sizes, block_size=16), position_ids=pos).logits
    additive = torch.zeros(1, 1, big.n, big.n).masked_fill(~big.dense_mask(), torch.finfo(torch.float32).min)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids, attention_mask=additive, position_ids=pos).logits
    assert (flex - eager).abs().max() < 1e-4
    assert not torch.equal(big.dense_mask(), torch.ones(big.n, big.n, dtype=torch.bool).tril())  # not just causal


def test_cli_lower_prints_the_kernels_arithmetic(capsys):
    assert main(["lower", "--preset", "nfd"]) == 0
    out = capsys.readouterr().out
    assert "hw_0=9" in out and "return (_div(kv_idx, hw_0) <= _div(q_idx, hw_0))" in out
    assert main(["lower", "presets/ancat.json"]) == 0
    assert "per-token tables read: lookahead" in capsys.readouterr().out


def test_flex_export_of_many_segments_is_quick_or_refused():
    """Pairs no restricted rule touches share one expression, so 600 segments lower in moments;
    past knobs.EXPORT_MAX_SEGMENTS the export says what to use instead."""
    import time

    from maskstudio import SpecError, knobs

    def spec_of(count):
        return Spec.load({"segments": [{"name": f"s{i}", "length": 2} for i in range(count)],
                          "mask": {"base": {"pattern": "causal"}, "rules": [{"q": "s1", "k": "s0", "pattern": "full"}]}})
    t0 = time.perf_counter()
    code = flex_code(spec_of(600))
    assert time.perf_counter() - t0 < 30 and len(code) < 200_000
    with pytest.raises(SpecError, match="stops at"):
        flex_code(spec_of(knobs.EXPORT_MAX_SEGMENTS + 1))


TEXT_SPEC = {"segments": [{"name": "question", "modality": "text", "text": "What is the capital of France?",
                           "length": 8},
                          {"name": "answer", "modality": "text", "text": "Paris", "length": 8}],
             "mask": {"base": {"pattern": "causal"}}}


def test_check_and_export_say_declared_sizes_differ_and_adopt_the_runs(tmp_path, capsys):
    """#23 item 1: a text longer than its declared length. Without the flag, one line says the run
    sizes texts by its tokenizer; --size-by-tokenizer checks and exports the run's layout and names
    each segment whose declared size differs (tiny-llama's tokenizer: one token a byte)."""
    from maskstudio.cli import main

    path = tmp_path / "text.json"
    path.write_text(json.dumps(TEXT_SPEC))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr()
    assert "tokens            16" in out.out and "--size-by-tokenizer" in out.err and len(out.err.splitlines()) == 1
    out_file = tmp_path / "sized.json"
    assert main(["export", str(path), "--size-by-tokenizer", "tiny-llama", "-o", str(out_file)]) == 0
    err = capsys.readouterr().err
    assert "segment 'question': declared 8 tokens, text has 30" in err
    assert "segment 'answer': declared 8 tokens, text has 5" in err
    assert [s["length"] for s in json.loads(out_file.read_text())["segments"]] == [30, 5]


@pytest.mark.model
def test_size_by_tokenizer_equals_the_layout_a_run_uses(smollm, capsys):
    import maskstudio.run as R
    from maskstudio import Spec
    from maskstudio.cli import _sized

    spec = Spec.load(TEXT_SPEC)
    run = R.run(spec, smollm, attentions=False)
    args = type("Args", (), {"size_by_tokenizer": "embedded", "command": "check"})()
    sized = _sized(args, spec)
    assert [s["length"] for s in sized.segments] == [s["length"] for s in run.layout.segments]
    assert "declared 8 tokens" in capsys.readouterr().err
