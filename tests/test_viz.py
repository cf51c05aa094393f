"""Pictures are checked by what they contain, not by pixels."""
import io

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import maskstudio
from maskstudio import Spec, viz, flow
from maskstudio.analysis import analyze


def vlm(scheme="concentric", n_q=6):
    return Spec.load({
        "name": "vlm", "segments": [
            {"name": "sys", "length": 5}, {"name": "img", "modality": "image", "grid": [4, 4]},
            {"name": "question", "length": n_q}, {"name": "answer", "length": 4, "role": "target"}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "img", "k": "img", "pattern": "block_causal", "by": "ring"},
                           {"q": "answer", "k": "img", "pattern": "none", "layers": [0, 1]}]},
        "positions": {"scheme": scheme}})


def video(frames=3, h=4, w=4, scheme="mrope", text=8):
    return Spec.load({
        "name": "video", "segments": [
            {"name": "sys", "length": text}, {"name": "clip", "modality": "video", "grid": [frames, h, w]},
            {"name": "question", "length": text}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "clip", "k": "clip", "pattern": "block_causal", "by": "frame"}]},
        "positions": {"scheme": scheme}})


def segment_patches(fig):
    return [p for ax in fig.axes for p in ax.patches
            if isinstance(p, Rectangle) and (p.get_gid() or "").startswith("segment:")]


def all_text(fig):
    out = [t.get_text() for ax in fig.axes for t in ax.texts]
    out += [ax.get_title() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
    out += [ax.get_ylabel() for ax in fig.axes]
    out += [lbl.get_text() for ax in fig.axes for lbl in ax.get_xticklabels() + ax.get_yticklabels()]
    return "\n".join(out)


def test_mask_view_contents():
    spec = vlm()
    fig = maskstudio.render(spec, "mask")
    assert isinstance(fig, Figure)
    info = fig.maskstudio["mask"]
    assert info["mode"] == "dense" and info["n"] == spec.n
    assert info["density"] == pytest.approx(analyze(spec).density)
    names = [p.get_gid() for p in segment_patches(fig)]
    assert names.count("segment:img") == 2 and len(names) == 2 * len(spec.segments)  # both axes
    colors = {p.get_gid(): p.get_facecolor()[:3] for p in segment_patches(fig)}
    assert colors["segment:img"] == pytest.approx(tuple(torch.tensor(
        __import__("matplotlib.colors", fromlist=["to_rgb"]).to_rgb(viz.MODALITY_COLORS["image"])).tolist()))
    ax = info["axes"]
    assert "key" in ax.get_xlabel() and "query" in ax.get_ylabel()
    assert info["labels"][5] == "0,0"               # image token labels are (row, col)
    text = all_text(fig)
    assert "density" in text and "img" in text
    img = ax.images[0].get_array()
    assert img.shape[:2] == (spec.n, spec.n)


def test_mask_token_labels_option_and_tokenizer():
    spec = vlm()
    labels = [f"tok{i}" for i in range(spec.n)]
    fig = viz.render(spec, "mask", token_labels=labels)
    assert [t.get_text() for t in fig.maskstudio["mask"]["axes"].get_xticklabels()] == labels
    with pytest.raises(ValueError, match="token_labels"):
        viz.render(spec, "mask", token_labels=["a"])

    class Tok:
        def tokenize(self, text):
            return text.split()

    spec2 = Spec.load({"segments": [{"name": "q", "text": "what is here", "length": 3},
                                    {"name": "a", "length": 2}]})
    fig = viz.render(spec2, "mask", tokenizer=Tok())
    assert fig.maskstudio["mask"]["labels"][:3] == ["what", "is", "here"]


def test_block_view_past_threshold_matches_block_states():
    from maskstudio.tiled import block_states

    spec = video(frames=4, h=16, w=20, text=50)   # 1380 tokens
    fig = viz.render(spec, "mask", block_threshold=1000)
    info = fig.maskstudio["mask"]
    assert info["mode"] == "block" and info["block_size"] == 128
    assert info["density"] == pytest.approx(analyze(spec).density)
    frac = flow.block_fraction(spec, 128)
    full, partial = block_states(spec, 128)
    # fraction 1 <=> full (except the ragged last row/column, which block_states never calls full)
    inner = slice(0, frac.shape[0] - 1)
    assert torch.equal((frac == 1)[inner, inner], full[inner, inner])
    assert torch.equal(((frac > 0) & (frac < 1))[inner, inner], partial[inner, inner])
    assert fig.maskstudio["mask"]["axes"].images[0].get_array().shape == frac.shape
    small = viz.render(spec, "mask")
    assert small.maskstudio["mask"]["mode"] == "dense"


def test_frame_ticks_for_video():
    spec = video()
    fig = viz.render(spec, "mask")
    ax = fig.maskstudio["mask"]["axes"]
    minor = list(ax.get_xticks(minor=True))
    assert minor == [8 + 16, 8 + 32]


def test_positions_view_1d_and_3d():
    fig = viz.render(vlm("concentric"), "positions")
    info = fig.maskstudio["positions"]
    assert not info["three_d"] and len(info["line_axes"]) == 1 and info["grid_segments"] == ["img"]
    grid = info["grid_axes"][0].images[0].get_array()
    assert grid.shape == (4, 4) and grid[0, 0] == grid[0, 3] and grid[1, 1] == grid[0, 0] + 1   # rings
    assert info["line_axes"][-1].get_xlabel() == "token index"
    fig = viz.render(video(), "positions")
    info = fig.maskstudio["positions"]
    assert info["three_d"] and len(info["line_axes"]) == 3 and len(info["grid_axes"]) == 3
    assert [len(ax.lines) for ax in info["line_axes"]] == [3, 3, 3]


def test_distance_view_means_are_exact():
    spec = vlm("sequential")
    fig = viz.render(spec, "distance")
    info = fig.maskstudio["distance"]
    assert info["query"] == "answer"
    pos = spec.position_ids()
    q = pos[27:31].double()
    img = pos[5:21].double()
    assert info["mean"]["img"] == pytest.approx(float((q[:, None] - img[None]).abs().mean()))
    assert "img" in all_text(fig)
    fig = viz.render(video(), "distance", query="sys")
    info = fig.maskstudio["distance"]
    assert info["axes"] == ["t", "h", "w"] and len(info["mean"]["clip"]) == 3
    assert len(info["heat_axes"]) == 3


def test_flow_view_draws_the_graph_edges():
    spec = vlm()
    fig = viz.render(spec, "flow")
    g = fig.maskstudio["flow"]["graph"]
    drawn = {p.get_gid() for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("edge:")}
    assert drawn == {f"edge:{k}->{q}" for k, q in g.edges}
    a = analyze(spec)
    assert g.edges["img", "question"]["density"] == pytest.approx(float(a.segment_density[2, 1]))
    styles = {p.get_gid(): p.get_linestyle() for ax in fig.axes for p in ax.patches
              if (p.get_gid() or "").startswith("edge:")}
    assert styles["edge:sys->sys"] != "-" and styles["edge:sys->img"] == "-"   # partial dashed


def test_reach_view_and_per_layer_rules():
    spec = vlm()
    fig = viz.render(spec, "reach", layers=3)
    info = fig.maskstudio["reach"]
    assert info["token"] == spec.n - 1 and info["layers"] == [0, 1, 2]
    field = info["field"]
    img = slice(5, 21)
    assert not field[0, img].any() and field[1, img].all()
    assert torch.equal(field[1], flow.reachability(spec, 2)[spec.n - 1])
    names = info["table"].names
    assert info["table"].steps[names.index("answer")][names.index("img")] == 2


def test_summary_text_reuses_analysis():
    spec = vlm()
    text = viz.summary_text(spec)
    assert analyze(spec).summary() in text and "layers until" in text
    fig = viz.render(spec, "summary")
    assert fig.maskstudio["summary"]["text"] == text


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_render_all_and_save(tmp_path):
    spec = video()
    fig = viz.render(spec, "all")
    assert set(fig.maskstudio) == {"mask", "positions", "distance", "flow", "reach", "summary"}
    out = tmp_path / "all.png"
    viz.save(fig, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    buf = io.BytesIO()
    viz.save(viz.render(spec, "flow", level="frame"), buf)
    assert buf.getvalue()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown view"):
        viz.render(spec, "nope")


def test_colors_consistent_across_views():
    spec = vlm()
    colors = viz.segment_colors(spec)
    fig = viz.render(spec, "positions")
    line_colors = [l.get_color() for l in fig.maskstudio["positions"]["line_axes"][0].lines]
    assert [tuple(c) for c in line_colors] == [tuple(c) for c in colors]
    assert colors[2] != colors[3]   # neighbouring text segments get different shades


def test_no_pyplot_state():
    import sys
    viz.render(vlm(), "mask")
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []


@pytest.mark.slow
def test_big_video_mask_is_block_view_without_n2_memory():
    import resource
    spec = Spec.load({"segments": [{"name": "sys", "length": 1952},
                                   {"name": "video", "modality": "video", "grid": [32, 64, 63]},
                                   {"name": "q", "length": 96}],
                      "mask": {"base": {"pattern": "causal"},
                               "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}]}})
    assert spec.n == 131072
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fig = viz.render(spec, "mask")
    viz.save(fig, io.BytesIO())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert fig.maskstudio["mask"]["mode"] == "block"
    assert grown_mb < 2048


def test_distance_view_has_a_colour_bar():
    fig = viz.render(video(), "distance")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "share of (query, key) pairs" in labels


def test_attention_map_names_every_token_of_a_small_run():
    from types import SimpleNamespace

    from maskstudio import Spec

    layout = Spec.load({"segments": [{"name": "a", "length": 3}, {"name": "b", "length": 2}]})
    att = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    result = SimpleNamespace(attentions=att, layout=layout, model="m",
                             tokens={"a": ["The", " cap", "ital"], "b": [" of", "\n"]})
    fig = viz.attention_figure(result, 1, None)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", " cap", "ital", " of", "'\\n'"]


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_names_with_math_markup_are_drawn_as_typed(tmp_path):
    """Spec names go into titles, ticks, legends and tables; `$x^$` must not be parsed as math."""
    names = ["$x^$", "a_b$", "\\frac{", "x\ny", "$$", "100%"]
    segs = [{"name": n, "length": 3} for n in names] + [{"name": "img", "modality": "image", "grid": [2, 2]}]
    spec = Spec.load({"name": "$bad^name$", "segments": segs, "mask": {"base": {"pattern": "causal"}}})
    for view in ("mask", "positions", "distance", "flow", "reach", "all"):
        viz.save(viz.render(spec, view), tmp_path / f"{view}.png")
        assert (tmp_path / f"{view}.png").stat().st_size > 1000


# ---------------------------------------------------------------- issue 15: attention you can read, blocks, compare
def _fake_run(L=3, H=2):
    from types import SimpleNamespace

    from maskstudio import Spec
    from maskstudio.run.measures import rollout

    layout = Spec.load({"name": "fake", "segments": [{"name": "ctx", "length": 6}, {"name": "q", "length": 4}],
                        "mask": {"base": {"pattern": "causal"}}})
    causal = torch.triu(torch.full((10, 10), float("-inf")), 1)
    att = torch.softmax(torch.randn(L, H, 10, 10, generator=torch.Generator().manual_seed(0)) + causal, -1)
    toks = {"ctx": ["The", " cap", "ital", " of", " France", " is"], "q": [" Paris", ".", " Q", ":"]}
    return SimpleNamespace(attentions=att, layout=layout, model="m", tokens=toks, rollout=rollout(att))


def test_block_view_shows_full_partial_empty_blocks_and_kv_num_blocks():
    spec = Spec.load({"segments": [{"name": "a", "length": 64}], "mask": {"base": {"pattern": "causal"}}})
    fig = viz.render(spec, "blocks", block_size=16)
    facts = fig.maskstudio["blocks"]
    assert int(facts["full"].sum()) == 6 and int(facts["partial"].sum()) == 4   # below / on the diagonal
    assert facts["kv_num_blocks"].tolist() == [1, 2, 3, 4]
    assert abs(facts["skipped"] - 6 / 16) < 1e-9
    assert "kernel skips 37.5%" in facts["axes"].get_title()
    assert viz.render(spec, "blocks", block_size=64).maskstudio["blocks"]["partial"].tolist() == [[True]]


def test_attention_map_outlines_the_focus_token_and_bars_name_its_top_tokens():
    from matplotlib.patches import Rectangle

    r = _fake_run()
    fig = viz.attention_figure(r, 1, None, token=7)
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert {(b.get_width(), b.get_height()) for b in boxes} == {(10, 1), (1, 10)}    # row and column
    assert "token 7" in fig.axes[0].get_title()
    focus = viz.token_focus_figure(r, 1, None, 7, k=3)
    row = r.attentions[1].float().mean(0)[7]
    best = int(row.argmax())
    assert focus.axes[0].get_yticklabels()[0].get_text().startswith(f"{best}:")
    col = r.attentions[1].float().mean(0)[:, 7]
    assert focus.axes[1].get_yticklabels()[0].get_text().startswith(f"{int(col.argmax())}:")
    assert len(focus.axes[1].get_yticklabels()) == 3     # only tokens at or after 7 attend to it (causal)


def test_layers_by_heads_grid_has_one_thumbnail_per_layer_and_head():
    r = _fake_run(L=4, H=3)
    fig = viz.attention_grid_figure(r, layer=2, head=1)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert len(ax.patches) == 1                            # the map shown large, outlined
    assert viz.attention_grid_figure(type("R", (), {"attentions": None})()) is None


def test_rollout_reads_from_one_token_with_segment_shares_and_a_caption():
    r = _fake_run()
    fig = viz.rollout_figure(r)
    facts = fig.maskstudio["rollout"]
    assert facts["token"] == 9                              # the last token by default
    assert abs(sum(facts["share"].values()) - 1) < 1e-4
    assert abs(facts["share"]["ctx"] - float(r.rollout[9, :6].sum())) < 1e-5
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "Abnar & Zuidema" in texts
    assert viz.rollout_figure(r, 3).maskstudio["rollout"]["token"] == 3
    assert viz.rollout_figure(r, 99).maskstudio["rollout"]["token"] == 9   # out of range: the last


def test_many_designs_side_by_side_mark_the_cells_that_differ():
    base = {"segments": [{"name": "p", "length": 4}, {"name": "t", "length": 4}]}
    causal = Spec.load({**base, "name": "causal", "mask": {"base": {"pattern": "causal"}}})
    full = Spec.load({**base, "name": "full", "mask": {"base": {"pattern": "full"}}})
    prefix = Spec.load({**base, "name": "prefix", "mask": {"base": {"pattern": "causal"},
                                                           "rules": [{"q": "p", "k": "p", "pattern": "full"}]}})
    other = Spec.load({"name": "other", "segments": [{"name": "x", "length": 5}]})
    fig = viz.masks_compare_figure([causal, full, prefix, other], ["causal", "full", "prefix", "other"])
    facts = fig.maskstudio["compare"]
    assert facts["differ"] == [0, 28, 6, None]
    titles = [ax.get_title() for ax in fig.axes]
    assert any("28 pairs differ from A" in t for t in titles)
    assert any("disagree (orange: 28 pairs)" in t for t in titles)
    assert any("not compared" in t for t in titles)


def test_mask_legend_sits_outside_the_cells_and_segment_flow_text_is_large():
    spec = Spec.load({"segments": [{"name": "t", "length": 8}, {"name": "img", "modality": "image", "grid": [2, 2]}],
                      "mask": {"base": {"pattern": "full"}}})
    fig = viz.render(spec, "mask")
    ax = fig.maskstudio["mask"]["axes"]
    fig.canvas.draw()
    legend, cells = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x1 <= cells.x0 + 1 or legend.y0 >= cells.y1 - 1    # never over the cells
    flow = viz.render(spec, "flow")
    node_labels = [t for t in flow.axes[0].texts if "tok" in t.get_text()]
    assert node_labels and min(t.get_fontsize() for t in node_labels) >= 9


def test_write_png_replaces_the_file_whole_so_a_reader_never_meets_half_a_picture(tmp_path):
    """The app names pictures by their content, and two requests may draw one at once while the
    server sends it: the old file stays whole for a reader that opened it, the new one arrives whole."""
    from PIL import Image

    def figure(color):
        fig = viz.new_figure((2, 2))
        fig.add_axes([0, 0, 1, 1]).add_patch(Rectangle((0, 0), 1, 1, color=color))
        return fig

    path = str(tmp_path / "mask-abc.png")
    viz.write_png(figure("red"), path, 40)
    old = open(path, "rb").read()
    with open(path, "rb", buffering=0) as reader:  # the server has opened the picture and sent its first bytes
        head = reader.read(64)
        viz.write_png(figure("blue"), path, 40)  # drawn again meanwhile
        assert head + reader.read() == old  # written in place, this read the new file's tail (or less)
    new = open(path, "rb").read()
    assert new != old and Image.open(io.BytesIO(new)).getpixel((40, 40))[:3] == (0, 0, 255)
    assert [p.name for p in tmp_path.iterdir()] == ["mask-abc.png"]  # no part file left behind
