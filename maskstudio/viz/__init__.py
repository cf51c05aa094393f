"""Every picture in one place: views of a spec (what may attend what, where tokens sit in RoPE
space, how information flows through the layers) and views of a run (attention, segment mass,
rollout, comparisons, knockouts, attention over an image, evaluations). Pictures draw facts
computed elsewhere (flow / positions / analysis / run.measures); there is no second copy of a
mask here.

    fig = maskstudio.render(spec, view, **options)       # a matplotlib Figure (Agg, no pyplot)
    maskstudio.viz.save(fig, "out.png")                   # saves and frees the figure

  figures     shared helpers and colours: new_figure (Agg canvas), save, segment_colors, bands...
  spec_views  render / render_all and one `view_<name>(spec, fig, region, **options)` per view
  run_views   figures of a run's result (RunResult, Comparison, Knockout), of evaluations and of
              training (loss curves)

Spec views:
  mask       heatmap allowed / masked, segment bands named on both axes (coloured by modality),
             frame ticks for video, token labels when N <= knobs.TOKEN_LABEL_MAX, density legend.
             Past `block_threshold` (knobs.PICTURE_DENSE_MAX) tokens a block view: each cell a
             128 x 128 block shaded by the fraction allowed (flow.block_fraction), no N^2 memory.
  positions  position id against token index per segment (three panels t/h/w for 3-D schemes),
             and each image/video segment's ids laid out on its H x W grid.
  distance   |delta pos| between a query segment (default: the last text segment) and every key
             segment: a heatmap of the distribution and the exact mean per segment (per axis in 3-D).
  flow       flow_graph(spec) drawn left to right in sequence order: edge k -> q when q may read k,
             width = density, dashed = partial, arcs above = reading the past, below = the future.
  reach      receptive field of a token after 1..L layers (residual stream counted, per-layer rules
             honoured) and the table "layers until every token of A sees B".
  blocks     the BlockMask grid at block_size (16..1024): full / partial / empty blocks from
             tiled.block_states and kv_num_blocks per query block (what the kernel skips).
  summary    Analysis.summary() and the reach table as a monospace text block (summary_text()
             returns the same text without a picture).
  all        ONE figure holding every view above (render(spec, "all"), same as render_all(spec)).

Options (all views): layer=0, head=0, title=None, figsize=None. Per view:
  mask: token_labels (list[str], one per token), tokenizer (has .tokenize(str); labels segments
        that carry `text`), block_threshold=4096, block_size=128, block (force True/False)
  distance: query (segment name)         flow: level ("segment" | "frame" | "token")
  reach: token (index, default the last token), layers (count or list of layer ids)
  mask / reach / summary: masks (a flow.LayerMasks of the same head, shared between views)
"""
from .figures import MODALITY_COLORS, message_figure, new_figure, save, segment_colors, write_png
from .run_views import (ROLLOUT_CAPTION, attention_figure, attention_grid_figure, evaluation_figure, image_overlay,
                        kl_figure, knockout_figure, loss_curve_figure, mask_diff_figure, masks_compare_figure,
                        mass_curves_figure, mass_diff_figure, rollout_figure, run_token_labels, segment_mass_figure,
                        token_focus_figure, visual_share_figure)
from .spec_views import FIGSIZES, VIEW_FUNCTIONS, VIEWS, pool_factor, pool_fraction, render, render_all, summary_text

__all__ = ["MODALITY_COLORS", "message_figure", "VIEWS", "VIEW_FUNCTIONS", "FIGSIZES", "new_figure", "save", "write_png",
           "segment_colors", "render", "render_all", "summary_text", "pool_factor", "pool_fraction",
           "attention_figure", "segment_mass_figure", "mass_curves_figure", "rollout_figure", "mask_diff_figure",
           "kl_figure", "mass_diff_figure", "knockout_figure", "image_overlay", "visual_share_figure",
           "evaluation_figure", "loss_curve_figure", "attention_grid_figure", "token_focus_figure",
           "masks_compare_figure", "run_token_labels", "ROLLOUT_CAPTION"]
