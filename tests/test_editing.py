"""Honest messages and editing that does not fight you (#25 items 4-6), without a browser:
token references that never move silently and name their own field, a design switch that leaves no
stale error, results labelled with their design, Undo that drops only an invalid edit, Redo, the
design kept in the browser's storage, the multi-line text editor, escaped preset cards, distinct
segment colours, unambiguous token ticks and a visible colour-bar label."""
import json

import pytest

from maskstudio import Spec, studio
from maskstudio.presets import list_presets, load_preset

SPEC = {"name": "qa", "segments": [{"name": "context", "length": 6}, {"name": "answer", "length": 8}],
        "mask": {"base": {"pattern": "causal"}}}


# ---------------------------------------------------------------- item 4: tokens and messages
def test_a_token_past_its_segment_is_said_never_moved_silently():
    spec = Spec.load(SPEC)
    assert studio.resolve_token(spec, "answer[7]", "reach token") == (13, "")
    shrunk = Spec.load({**SPEC, "segments": [SPEC["segments"][0], {"name": "answer", "length": 4}]})
    index, note = studio.resolve_token(shrunk, "answer[7]", "reach token")
    assert index == 6 + 3
    assert note.startswith("reach token: answer has 4 tokens (answer[0] to answer[3])") and "answer[3]" in note
    index, note = studio.resolve_token(spec, "99", "focus token")
    assert index == 13 and note.startswith("focus token: token 99 is outside this design's 14 tokens")
    assert studio.resolve_token(spec, "-1", "focus token") == (13, "")       # counted from the end: not moved
    assert studio.resolve_token(spec, "answer[-1]", "focus token") == (13, "")


def test_an_unknown_segment_is_reported_under_the_field_it_was_typed_in():
    spec = Spec.load(SPEC)
    for field in ("focus token", "reach token", "overlay query token"):
        with pytest.raises(studio.SpecError) as err:
            studio.resolve_token(spec, "answr[2]", field)
        assert str(err.value).startswith(f"{field}: no segment named 'answr'") and "'answer'" in str(err.value)
        assert "reach.token" not in str(err.value)


def test_the_reach_token_note_and_no_stale_query_error_after_a_design_switch():
    spec = Spec.load(SPEC)
    o = studio.view_options(spec, {"reach_token": "answer[30]", "query": "conclusion"})
    assert o["reach_token"] == 13 and "answer has 8 tokens" in o["warnings"]["reach_token"]
    assert "no segment named 'conclusion'" in o["warnings"]["query"]           # typed by the user: said
    fresh = studio.view_options(spec, {"query": "conclusion", "fresh": True})  # the design changed: the picker follows
    assert "query" not in fresh["warnings"] and fresh["query"] in ("context", "answer")
    assert "reach.token" not in studio.view_options(spec, {"reach_token": "x"})["warnings"]["reach_token"]


def test_results_are_labelled_and_the_note_names_both_designs():
    a, b = load_preset("streaming_llm"), load_preset("prefix_lm")
    text = studio.labelled("run", a, "model  x\ntokens 3")
    assert text.splitlines()[0] == f"Run of streaming_llm  [design {studio.version(a)}]"
    assert studio.read_label(text) == {"what": "Run", "name": "streaming_llm", "version": studio.version(a)}
    assert studio.results_note(a, text) == ""                                   # current: nothing to say
    note = studio.results_note(b, text, "", None, "unlabelled text")
    assert note == "⚠ This run is of **streaming\\_llm**; the design is now **prefix\\_lm**."
    edited = Spec.load({**a.to_dict(), "positions": {"scheme": "per_segment"}})  # same name, another design
    assert "earlier version of **streaming\\_llm**" in studio.results_note(edited, text)
    state = studio.new_state(b)
    both = studio.results_note(state, text, studio.labelled("knockout", a, "k"))
    assert both.count("⚠") == 2 and "This knockout is of" in both


def test_compare_and_training_texts_carry_their_design():
    state = studio.set_snapshot(studio.new_state(SPEC))
    out = studio.compare_static(state, "prefix_lm")
    assert studio.read_label(out["summary"])["name"] == "qa"
    assert studio.read_label(out["summary"])["version"] == studio.version(studio.current(state))


# ---------------------------------------------------------------- item 5: undo, redo, storage, texts
def test_undo_drops_only_the_invalid_edit_then_the_valid_one_and_redo_comes_back():
    s0 = studio.new_state(SPEC)
    data = json.loads(studio.current(s0).to_json())
    data["mask"]["base"]["pattern"] = "full"
    s1, error = studio.apply_json_edit(s0, json.dumps(data))                 # valid
    assert error == "" and studio.current(s1).mask["base"]["pattern"] == "full"
    s2, error = studio.apply_json_edit(s1, '{"segments": []}')                # invalid: the design stays
    assert error and studio.current(s2) is studio.current(s1) and s2["unapplied"]
    s3, error = studio.undo(s2)                                               # drops the invalid edit only
    assert error == "" and studio.current(s3) is studio.current(s1) and "unapplied" not in s3
    s4, _ = studio.undo(s3)                                                   # then the valid one
    assert studio.current(s4).mask["base"]["pattern"] == "causal"
    s5, error = studio.redo(s4)
    assert error == "" and studio.current(s5).mask["base"]["pattern"] == "full"
    assert studio.redo(s5)[1] == "nothing to redo"
    s6, _ = studio.undo(s5)
    s7, _ = studio.load_blank(s6)                                             # a new edit: no redo any more
    assert studio.redo(s7)[1] == "nothing to redo" and studio.undo(s7)[0]["spec"] == studio.current(s6)


def test_redo_is_bounded_like_undo(monkeypatch):
    from maskstudio import knobs

    monkeypatch.setattr(knobs, "HISTORY", 3)
    state = studio.new_state(SPEC)
    for n in range(2, 8):
        state, _ = studio.apply_json_edit(state, json.dumps({**SPEC, "segments": [{"name": "a", "length": n}]}))
    for _ in range(6):
        state, _ = studio.undo(state)
    assert len(state["future"]) == 3 and len(state["history"]) == 0 and len(state["future_bytes"]) == 3


def test_the_design_kept_in_the_browser_comes_back_and_undo_starts_fresh():
    edited = studio.set_segment_text(studio.new_state(SPEC), "context", "Line one\n  line two")[0]
    stored = studio.stored_design(edited)
    assert json.loads(stored)["segments"][0]["text"] == "Line one\n  line two"
    fresh = studio.new_state()
    back, error = studio.restore_design(fresh, stored)
    assert error == "" and studio.current(back) == studio.current(edited)
    assert studio.state_card(back).startswith("*Restored the design this browser kept")
    start, _ = studio.undo(back)                                              # fresh again
    assert studio.current(start) == studio.current(fresh) and "Restored" not in studio.state_card(start)
    for junk in (None, "", "{not json", '{"segments": []}', "/etc/passwd", 12):  # nothing kept, or not a spec
        same, error = studio.restore_design(fresh, junk)
        assert error == "" and studio.current(same) is studio.current(fresh) and "unapplied" not in same
    assert studio.restore_design(fresh, studio.current(fresh).to_json())[0]["history"] == []  # the same design: no step


def test_the_multi_line_text_editor_keeps_newlines_and_names_the_segment():
    state = studio.new_state(SPEC)
    assert studio.segment_pick(state, ["answer", "text", "8", "", "", ""]) == ("answer", "")
    new, error = studio.set_segment_text(state, "answer", " Paris\nis the capital.")
    assert error == "" and studio.current(new).segments[1]["text"] == " Paris\nis the capital."
    assert studio.segment_pick(new, ["answer"]) == ("answer", " Paris\nis the capital.")
    assert studio.current(new).name == "qa"
    assert studio.set_segment_text(state, "", "") == (state, "")              # an untouched empty editor
    assert "click a segment's row first" in studio.set_segment_text(state, "", "x")[1]
    assert "no segment named 'answr'" in studio.set_segment_text(state, "answr", "x")[1]


def test_the_page_script_is_in_the_head():
    assert studio.PAGE_HEAD.startswith("<script>") and 'aria-label="Edit cell"' in studio.PAGE_HEAD
    assert "Escape" in studio.PAGE_HEAD


# ---------------------------------------------------------------- item 6: cosmetics
def test_preset_cards_show_code_names_as_written():
    md = pytest.importorskip("markdown_it").MarkdownIt()
    called = [p for p in list_presets() if "__" in p["description"] + p["origin"] + p["citation"]]
    assert len(called) >= 6
    for p in called:                                  # the name in bold and the group in italics, nothing else
        html = md.render(studio.preset_card(p["name"]))
        assert html.count("<strong>") == 1 and html.count("<em>") == 1 and f"<em>{p['group']}</em>" in html
        assert "__init__" in html or "__call__" in html
    assert md.render(studio.card_text("a *b* _c_ `d` ~e~")).strip() == "<p>a *b* _c_ `d` ~e~</p>"


def test_segments_of_one_modality_get_distinct_colours_and_ticks_are_unambiguous():
    from maskstudio.tokens import token_labels
    from maskstudio.viz.figures import MODALITY_COLORS, segment_colors
    from matplotlib.colors import to_rgb

    spec = load_preset("multiverse")                  # six text segments
    colors = [tuple(round(c, 3) for c in rgb) for rgb in segment_colors(spec)]
    assert len(set(colors)) == len(spec.segments) == 6
    solo = Spec.load({"segments": [{"name": "t", "length": 2}, {"name": "v", "modality": "video", "grid": [2, 2, 2]}]})
    assert [tuple(c) for c in segment_colors(solo)] == [to_rgb(MODALITY_COLORS["text"]), to_rgb(MODALITY_COLORS["video"])]
    labels = token_labels(spec)
    assert "path1[0]" in labels and "path10" not in labels and len(set(labels)) == len(labels)
    long = token_labels(Spec.load({"segments": [{"name": "conclusion", "length": 2}]}))
    assert long == ["conclu…[0]", "conclu…[1]"]


def test_the_distance_colour_bar_label_is_not_covered():
    from maskstudio.viz import render

    fig = render(load_preset("multiverse"), "distance")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars = fig.maskstudio["distance"]["bar_axes"][0].get_window_extent(renderer)
    cbar = [ax for ax in fig.axes if ax.get_ylabel() == "share of (query, key) pairs"][0]
    label = cbar.yaxis.label.get_window_extent(renderer)
    assert label.x1 < bars.x0, (label, bars)          # the label ends before the bars begin


def test_a_design_too_large_for_the_browser_is_not_kept():
    from maskstudio.studio import browser

    big = Spec.load({**SPEC, "description": "x" * (browser.STORE_MAX_CHARS + 1)})
    assert studio.stored_design(studio.new_state(big)) == ""
    assert studio.restore_design(studio.new_state(), big.to_json())[0]["history"] == []


def test_the_pages_second_copy_of_an_edit_waits_for_the_first_and_moves_nothing():
    """Gradio's page sends a dropdown pick and a table edit twice (same inputs, ~20 ms apart): the
    copy is a repeat that waits for the first to finish; other inputs, another session, an edit
    without inputs (Undo: twice means twice) or the same edit after REPEAT_S are edits of their own."""
    import threading
    import time

    from maskstudio.studio import browser

    order, started = [], threading.Event()

    def first():
        with studio.edit_once("s1", "load_preset_into_state", ("prefix_lm", 0)) as repeat:
            order.append(("first", repeat))
            started.set()
            time.sleep(0.3)  # drawing the pictures
            order.append(("first done", repeat))

    t = threading.Thread(target=first)
    t.start()
    started.wait()
    with studio.edit_once("s1", "load_preset_into_state", ("prefix_lm", 0)) as repeat:
        order.append(("copy", repeat))
    t.join()
    assert order == [("first", False), ("first done", False), ("copy", True)]  # after the first's outputs
    for session, name, inputs in [("s1", "load_preset_into_state", ("cca", 0)), ("s2", "load_preset_into_state", ("cca", 0)),
                                  ("s2", "undo", ()), ("s2", "undo", ()), (None, "apply_tables", ("x",)),
                                  (None, "apply_tables", ("x",))]:
        with studio.edit_once(session, name, inputs) as repeat:
            assert not repeat, (session, name, inputs)
    with studio.edit_once("s2", "load_preset_into_state", ("cca", 0)) as repeat:
        assert repeat  # s2's last edit was this one (Undo has no inputs, so it was not recorded)
    browser._EDITS["s2"].ended = time.monotonic() - browser.REPEAT_S
    with studio.edit_once("s2", "load_preset_into_state", ("cca", 0)) as repeat:
        assert not repeat  # the same pick a second later: the visitor's own


def test_a_slow_edits_queued_copy_is_still_a_repeat(monkeypatch):
    """Gradio runs one session's copy after the first (one worker per handler): a first edit slower than
    REPEAT_S (multiverse's pictures under load) must not make its copy an edit of its own, which redrew
    everything with the inputs of the moment of the pick, over anything typed since."""
    import time

    from maskstudio.studio import browser

    monkeypatch.setattr(browser, "REPEAT_S", 0.2)
    with studio.edit_once("s3", "load_preset_into_state", ("multiverse", 0)) as repeat:
        assert not repeat
        time.sleep(0.5)  # longer than REPEAT_S
    with studio.edit_once("s3", "load_preset_into_state", ("multiverse", 0)) as repeat:
        assert repeat  # right after the first ended
    time.sleep(0.3)
    with studio.edit_once("s3", "load_preset_into_state", ("multiverse", 0)) as repeat:
        assert not repeat  # the visitor picked it again, later
