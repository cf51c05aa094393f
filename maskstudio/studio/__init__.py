"""Everything the web app does, as plain functions over a session state (app.py only lays out
widgets and wires events; tests/test_studio.py drives these without a browser).

  budget    per-session and per-process budgets: disk (one slot per kind of download), undo and
            cache memory by bytes, uploaded images by pixels before decoding; safe file names
  state     the session state (validated Spec objects), undo / redo; edits return (state, error)
  provenance  every result labelled with the design it was computed for; the line saying the design changed since
  tables    the table codec: spec <-> segments / rules / overlays rows, cell parsers, table edits
  browser   the page script (table cells typed over, Escape cancels) and the design kept in the browser's storage
  sizing    text segments' declared sizes against a run's tokenizer: the line, the button adopting them
  pictures  the design's pictures as cached PNG files, the checks, the render workers, `Cache`
  examples  example inputs for designs without text; what a model can take, said before loading it
  jobs      fair use of the model: one job at a time, one per visitor, its place and steps on a status
            line, Stop / a closed page / its time budget end it keeping what it computed; model names
  actions   run / compare (A, B, C...) / knockout / overlay / evaluate / export handlers; a run's
            attention read token by token (focus_for_state) and downloaded as data (run_download)
  heads     the Run tab's in-browser attention viewer (payload per run), head knockout / patching with
            noise bands, Compare on the model for A, B, C, ... with per-head differences
  training  the Train tab: fine-tune the design (and its causal baseline), loss curves
  audit     the Audit tab: a transformers model's own masks on the layout against the design

Every name below is importable as `maskstudio.studio.<name>`.
"""
from ..errors import SpecError
from .actions import (EXPORT_FORMATS, HELP, assign_images, attention_for_state, attention_picture, compare_runs,
                      app_message, compare_static, evaluate_for_state, export_file, export_for_state, export_spec, get_run, knockout_sweep,
                      focus_for_state, focus_pictures, model_name, overlay_for_state, overlay_pictures, run_download,
                      run_files, run_model, run_outputs, spec_b, token_choices)
from .budget import (BudgetError, deep_bytes, end_session, folder_bytes, image_problem, plain_text, safe_stem,
                     session, session_folder)
from .examples import example_text, examples_note, needs_examples, run_blocker, with_examples
from .jobs import QUEUE, Queue, Refused, call_as_job, capped, event_alive, job_line, leave, require_model, run_job, stop_job
from ..progress import Stopped
from .sizing import ADOPT_LABEL, adopt_run_sizes, model_key, run_tokenizer, size_differences, size_line
from .pictures import (BLOCK_SIZES, DPI, TOKEN_FLOW_READABLE, VIEWS, Cache, block_view, analysis_for, check_text, controls, density_rows, design_views, figure_png,
                       size_warning,
                       picture_spec, render_processes, render_views, tokenizer_at_hand, view_options, warm_up)
from .state import (BLANK, DEFAULT_PRESET, apply_json_edit, attempt, current, design_card, edited_name,
                    GALLERY_COLUMNS, gallery_markdown, gallery_pick, gallery_rows, import_file, preset_names, preset_of,
                    card_text, load_blank, load_preset_into_state, load_task_template, markdown_text, new_state, one_line, preset_card,
                    preset_choices, redo, set_snapshot, snapshot, undo)
from .provenance import label, label_result, labelled, read_label, results_note, version
from .browser import PAGE_HEAD, SECRET, STORAGE_KEY, edit_once, restore_design, state_card, stored_design
from .tables import (OVERLAY_COLUMNS, RULE_COLUMNS, SEGMENT_COLUMNS, TABLES_HELP, TEXT_EDITOR_HELP, apply_table_edit, apply_tables, format_ints,
                     format_params, format_selector, format_size, format_text, parse_ints, parse_params,
                     parse_selector, parse_size, parse_text, parse_token, resolve_token, rows_of, segment_pick, segment_text, set_segment_text, spec_to_tables, tables_need_refresh,
                     where_in_tables,
                     tables_to_spec_dict)
from .heads import KNOCKOUT_HELP, VIEWER, VIEWER_HELP, compare_on_model, knockout_experiment, viewer_for_state
from .training import TRAIN_BATCH, TRAIN_HELP, TRAIN_MAX_STEPS, TRAIN_TASKS, train_design
from .audit import AUDIT_HELP, AUDIT_MODELS, AUDIT_PICTURES, AUDIT_SPEC, AUDIT_TEXT, audit_for_state
