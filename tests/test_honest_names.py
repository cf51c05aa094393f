"""Labels that do not lie (#23 item 4): an edited task template or preset is renamed once it is
edited, whatever the editor; names are shown whole in tables and figures."""
import json

from maskstudio import studio
from maskstudio.evaluate import report, summarize


def _template_state(task="kv_retrieval"):
    state, error = studio.load_task_template(studio.new_state(), task)
    assert not error and studio.current(state).name == f"{task} (causal)"
    return state


def test_an_edited_task_template_is_renamed_in_tables_and_json():
    state = _template_state()
    t = studio.spec_to_tables(studio.current(state))
    rules = [list(r) for r in t["rules"]] + [["rule", "*", "doc0", "full", "", "", ""]]
    edited, error = studio.apply_tables(state, t["segments"], rules, t["overlays"], t["scheme"], t["position_params"])
    assert not error and studio.current(edited).name == "kv_retrieval (edited)"
    assert studio.current(edited).mask != studio.current(state).mask
    # the JSON editor: the same name with another mask is renamed; a name the user typed is theirs
    data = json.loads(studio.current(state).to_json())
    data["mask"] = {"base": {"pattern": "full"}}
    renamed, error = studio.apply_json_edit(state, json.dumps(data))
    assert not error and studio.current(renamed).name == "kv_retrieval (edited)"
    data["name"] = "my bidirectional kv"
    own, _ = studio.apply_json_edit(state, json.dumps(data))
    assert studio.current(own).name == "my bidirectional kv"
    same, _ = studio.apply_json_edit(state, studio.current(state).to_json())  # nothing changed: the name stays
    assert studio.current(same).name == "kv_retrieval (causal)"
    again, _ = studio.apply_json_edit(renamed, studio.current(renamed).to_json().replace('"full"', '"causal"'))
    assert studio.current(again).name == "kv_retrieval (edited)"  # edited once more: still 'edited', not stacked


def test_an_edited_preset_is_renamed_from_the_json_editor_too():
    state, _ = studio.load_preset_into_state(studio.new_state(), "prefix_lm")
    data = json.loads(studio.current(state).to_json())
    data["segments"][0]["length"] = data["segments"][0].get("length", 4) + 1
    edited, error = studio.apply_json_edit(state, json.dumps(data))
    assert not error and studio.current(edited).name == "prefix_lm-edited"
    assert studio.design_card(studio.current(edited)).startswith("*Edited from the preset below.*")


def _rows(n, correct):
    return [{"id": i, "nll": 1.0 + 0.1 * i, "correct": i < correct, "meta": {}} for i in range(n)]


def test_long_names_are_whole_in_tables_and_figures():
    from maskstudio.viz import evaluation_figure, loss_curve_figure

    names = ["baseline: kv_retrieval (causal)", "design: kv_retrieval (edited) with a much longer name"]
    summary = summarize(names, {names[0]: _rows(6, 2), names[1]: _rows(6, 4)}, None)
    text = report(summary)
    assert all(n in text for n in names)
    fig = evaluation_figure(summary)
    ticks = [t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.get_yticklabels()]
    assert all(n in ticks for n in names), ticks
    fig = loss_curve_figure({f"design: {names[1]}": [2.0, 1.5, 1.0]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(names[1] in label for label in labels), labels
