"""On a CUDA machine only (skipped elsewhere; run on the device machine): the device BlockMask
builder's CUDA-graph path equals the exact CPU build and torch's create_block_mask, across replays
at new sizes (more undecided tiles than a capture had room for included), and masks built one
after another never share buffers."""
import glob
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lower import assert_blocks_equal, grown, scaled
from test_properties import specs
from torch.nn.attention.flex_attention import create_block_mask

from maskstudio import Spec
from reference import mask_mod as table_mask_mod
from maskstudio.lower import lower

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PRESETS = sorted(glob.glob("presets/*.json"))


COMPILED = ("multiverse", "cca", "ancat")  # the rest take the eager token stage (a compile per design)


def graph_vs_cpu(low, block, heads, compiled=False):
    """The CUDA builds (eager, then the graph path) equal the CPU build of the same lowering."""
    ref = low.block_mask(block_size=block, device="cpu", num_heads=heads)
    eager = low.block_mask(block_size=block, device="cuda", num_heads=heads, compiled=compiled, graph=False)
    assert_blocks_equal(eager.to("cpu"), ref)
    ours = low.block_mask(block_size=block, device="cuda", num_heads=heads, compiled=compiled, graph=True)
    assert_blocks_equal(ours.to("cpu"), ref)
    return ours


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.split("/")[-1][:-5])
def test_graph_build_equals_cpu_build_and_create_block_mask(path):
    spec = Spec.load(path)
    missing = spec.unsized_segments()
    spec = spec.with_sizes({m: 5 for m in missing}) if missing else spec
    heads = 3 if spec.varies_by_head else None
    for sp in (spec, scaled(spec, 3)):
        for block in (16, 128):
            ours = graph_vs_cpu(lower(sp), block, heads, compiled=any(c in path for c in COMPILED))
            ref = create_block_mask(table_mask_mod(sp), None, ours.kv_num_blocks.shape[1], sp.n, sp.n,
                                    device="cpu", BLOCK_SIZE=block)
            assert_blocks_equal(ours.to("cpu"), ref)


@settings(max_examples=int(os.environ.get("GPU_EXAMPLES", "25")), deadline=None, print_blob=True)  # prints a repro
@given(specs(), st.integers(0, 9))
def test_graph_replays_at_new_sizes_stay_exact(raw, extra):
    spec = Spec.load(raw)
    other = spec.with_sizes(grown(raw, extra))
    low = lower(spec)
    heads = 3 if low.uses_head else None
    graph_vs_cpu(low, 4, heads)  # captures
    graph_vs_cpu(low.for_spec(other), 4, heads)  # same structure and length: replays (or recaptures)
    graph_vs_cpu(low.batch([spec, other]), 4, heads)


def test_replays_never_overwrite_an_earlier_mask():
    spec = Spec.load("presets/multiverse.json")
    low = lower(spec).padded_to()
    first = low.block_mask(4, "cuda", length=128, compiled=False, graph=True)
    kept = first.to("cpu")
    for extra in (1, 7, 13):  # other sizes at the same padded length: the same graph replays
        sizes = {s["name"]: s["length"] + extra for s in spec.segments}
        again = low.for_sizes(sizes).block_mask(4, "cuda", length=128, compiled=False, graph=True)
        assert_blocks_equal(again.to("cpu"), low.for_sizes(sizes).block_mask(4, "cpu", length=128))
    assert_blocks_equal(first.to("cpu"), kept)


def test_exported_file_runs_compiled_flex_attention_on_cuda(tmp_path):
    """The `export --format flex` file on CUDA: its BlockMask and mask_mod drive compiled
    FlexAttention and give the lowered mask's output (its tensors live on the GPU). Imported as a
    real module, as a user would: torch.compile re-imports a mask_mod's module."""
    import importlib.util
    import sys

    from torch.nn.attention.flex_attention import flex_attention

    from maskstudio.export import flex_code

    flex = torch.compile(flex_attention, dynamic=False)
    for name in ("cca", "multiverse"):
        spec = Spec.load(f"presets/{name}.json")
        path = tmp_path / f"exported_{name}.py"
        path.write_text(flex_code(spec))
        mod_spec = importlib.util.spec_from_file_location(f"exported_{name}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        bm = module.block_mask_for(None, device="cuda")  # 128-token blocks: the compiled kernel's tiles
        q, k, v = (torch.randn(1, 2, spec.n, 16, device="cuda") for _ in range(3))
        ours = flex(q, k, v, block_mask=bm)
        ref = flex(q, k, v, block_mask=lower(spec).block_mask(128, "cuda"))
        assert (ours - ref).abs().max() < 1e-5, name
