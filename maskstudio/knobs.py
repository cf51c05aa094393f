"""Every tuning constant in one table. None of them changes a result, only speed and memory
(except the limits at the bottom, which refuse or simplify past a size).

Three knobs decide how a mask is evaluated:
  * direct vs tiled: below DENSE_DIRECT_MAX tokens the whole N x N grid is evaluated in one go;
    above it the tiled evaluator (tiled.TiledMask) decides whole tiles by interval bounds.
  * tile / block edge: TILE for dense masks, BLOCK for block sparsity, analysis, flow and FlexAttention.
  * dense vs block pictures: past PICTURE_DENSE_MAX tokens pictures and reachability work at block level.
"""
import os


def _env_int(name: str, default: int) -> int:
    """An operator's override from the environment (a Space's settings), else the default."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:  # a malformed setting: the default, never a crash at import
        return default


DENSE_DIRECT_MAX = 1024   # tokens: evaluate the whole grid at once below this
TILE = 256                # tile edge of dense masks past DENSE_DIRECT_MAX
BLOCK = 128               # block edge: block sparsity, tiled analysis and flow, FlexAttention
ANALYSIS_DENSE_MAX = 1024  # analyze(): dense below, tiled above (exact either way; tiled is faster past ~1k)
PICTURE_DENSE_MAX = 4096  # pictures, flow and reachability: dense [N, N] below, block level above
AUDIT_MAX_TOKENS = 4096   # `maskstudio audit`: the model's masks are dense [N, N] per distinct layer kind

# limits on a spec (validation refuses past them, with a one-line error naming the field)
MAX_TOKENS = 1 << 19      # tokens in a layout (Spec.load(max_tokens=...) raises or lowers it)
TOKENS_CEILING = 1 << 25   # max_tokens may be raised up to this (the token table costs ~128 bytes a token)
MAX_SEGMENTS = 4096       # segments in a layout
MAX_STEPS = _env_int("MASKSTUDIO_MAX_STEPS", 1024)  # rules + overlays of a spec (20k took 14 s to load, then GBs)
MAX_LAYERS = 1024         # layer indices in `layers` (rules apply to layers 0 .. MAX_LAYERS-1)
MAX_HEADS = 1024          # head indices in `heads`
MAX_NESTING = 32          # JSON nesting depth
MAX_SPEC_BYTES = 16 << 20  # bytes of spec JSON read from a file or a text box
DENSE_EXPORT_MAX = 1 << 15  # tokens: N x N exports (.npy mask) refuse past this (1 GiB of bools)

# limits on work
SIZE_CHECK_MAX_CHARS = _env_int("MASKSTUDIO_SIZE_CHECK_MAX_CHARS", 200_000)  # text the app tokenizes per edit to compare sizes
TOKEN_GRAPH_MAX = 256     # flow_graph(level="token") refuses larger layouts
FLOW_MAX_NODES = _env_int("MASKSTUDIO_FLOW_MAX_NODES", 256)  # the flow picture's nodes (segments or frames): up to
                           # nodes^2 edges to draw (256: 33k edges, ~5 s); past it the app says so instead
SEGMENT_TABLE_MAX = _env_int("MASKSTUDIO_SEGMENT_TABLE_MAX", 64)  # segment x segment tables in text (checks,
                           # density table, reach table as text): past it a line says where to look instead
REACH_MATRIX_MAX = 4096   # reachability() returns an N x N matrix only up to this
TOKEN_LABEL_MAX = 64      # mask pictures label single tokens up to this many
DISPLAY_PIXELS = 800      # dense mask pictures are pooled to <= this many cells a side

# runs
MAX_CAPTURE = 2048          # past this many tokens attention maps are not recorded
FLEX_BLOCK = BLOCK          # FlexAttention block size
FLEX_MIN_TOKENS = 1024      # on CUDA: eager (dense) below this many tokens, flex above
LOWER_MAX_SEGMENTS = 32    # segments: more -> the table form of the lowering (lookups, size free of segments)
EXPORT_MAX_SEGMENTS = 1024  # the flex export lowers every segment pair (quadratic): refused past this
EXPORT_MAX_WORK = _env_int("MASKSTUDIO_EXPORT_MAX_WORK", 2_000_000)  # the flex export's segment pairs x steps x
                           # layer programs (export_flex.export_work, ~3.5 us each: 2 M is ~7 s); refused past this
LOWER_MAX_NODES = 512      # closed-form tape steps: more -> the table form (a few lookups per score)
COMPILE_BUILD = False      # CUDA graph builds: the whole static build through torch.compile before capture
                           # (~30 fused kernels per replay instead of ~100-200; one compile per structure,
                           # length and capacities: ~50 s on an H200, 10-25 s on CPU)
SIZES_IN_KERNEL = 4        # layouts per design whose FlexAttention kernel holds their sizes as constants (as
                           # hand-written code does: 6-11% faster for CCA on an H100 / H200, one compile each); later
                           # layouts share one kernel that reads sizes at run time (Spec.block_mask, the export)

# the app
HISTORY = 30              # undo steps kept per session
RUNS_KEPT = 16            # model runs kept per process for the run views
PICTURE_CACHE = 600       # rendered pictures kept per process (evicted PNG files are deleted)
REACH_LIVE_MAX = 1 << 15  # tokens: past this the reach view (~10 s at 262k) is drawn when asked, not per edit
PICKER_LAYERS, PICKER_HEADS = 32, 16  # the layer / head sliders reach at least this far (stale values stay valid)
WORKDIR_MAX_AGE_S = 900   # run pictures and exports older than this are deleted from the app's temp folder
VIEWER_MAX_BYTES = 16 << 20  # the browser viewer's float16 attention: every layer when it fits, else a layer
                             # per request; past one layer's heads the viewer is off (pictures only)
VIEWER_LINES_MAX = 256    # tokens: the viewer draws lines between tokens up to this many

# the app's budgets: past them a request is refused with one line naming the limit (MASKSTUDIO_<NAME> overrides)
SESSION_DISK_BYTES = _env_int("MASKSTUDIO_SESSION_DISK_BYTES", 512 << 20)  # one session's files: run download,
                           # export, run pictures (each kind reuses one slot, so repeated clicks add nothing)
PROCESS_DISK_BYTES = _env_int("MASKSTUDIO_PROCESS_DISK_BYTES", 8 << 30)  # every file the app keeps (all sessions
                           # and the picture cache); the app's folder sits in Gradio's cache, so Gradio copies nothing
SESSION_PICTURES = _env_int("MASKSTUDIO_SESSION_PICTURES", 64)  # one-off run pictures kept per session (newest)
IMAGE_MAX_PIXELS = _env_int("MASKSTUDIO_IMAGE_MAX_PIXELS", 4096 * 4096)  # one uploaded image, read from its header
                           # before decoding (48 MiB as RGB; PIL's own bomb check is set to this too)
RUN_IMAGE_MAX_PIXELS = _env_int("MASKSTUDIO_RUN_IMAGE_MAX_PIXELS", 4 * 4096 * 4096)  # all images / frames of a run
RUN_FRAME_SIDE = 1024      # pixels: a kept run holds its pictures downscaled to this longest side (for the overlay)
HISTORY_BYTES = _env_int("MASKSTUDIO_HISTORY_BYTES", 32 << 20)  # undo memory per session (with HISTORY steps at most)
RUNS_MAX_BYTES = _env_int("MASKSTUDIO_RUNS_MAX_BYTES", 2 << 30)  # model runs kept per process (a session keeps
                           # only its last); the newest run is kept whatever its size
PICTURE_CACHE_BYTES = _env_int("MASKSTUDIO_PICTURE_CACHE_BYTES", 512 << 20)  # picture cache: analyses and sized
                           # specs in memory plus its PNG files on disk
STEM_MAX = 64              # characters of a download's file name taken from a design's name (ASCII only)

# model jobs in the app: generous locally, tight on a Hugging Face Space (SPACE_ID set); MASKSTUDIO_<NAME> overrides
ON_SPACE = bool(os.environ.get("SPACE_ID"))
MODEL_QUEUE_MAX = _env_int("MASKSTUDIO_MODEL_QUEUE_MAX", 16 if ON_SPACE else 64)  # model jobs waiting or running
                           # (one per session); past it a new one is refused in one line
JOB_SECONDS = _env_int("MASKSTUDIO_JOB_SECONDS", 180 if ON_SPACE else 6 * 3600)  # one job's time budget: past it
                           # the job stops as Stop would (what it computed is kept)
VISITOR_SECONDS = _env_int("MASKSTUDIO_VISITOR_SECONDS", 600 if ON_SPACE else 24 * 3600)  # model time one session
VISITOR_WINDOW_S = _env_int("MASKSTUDIO_VISITOR_WINDOW_S", 3600)  # may use within this window, then it is refused
TRAIN_MAX_STEPS = _env_int("MASKSTUDIO_TRAIN_MAX_STEPS", 50 if ON_SPACE else 1000)  # the Train tab's steps
EVAL_MAX_EXAMPLES = _env_int("MASKSTUDIO_EVAL_MAX_EXAMPLES", 16 if ON_SPACE else 64)  # the Evaluate tab's examples
MODEL_CACHE_BYTES = _env_int("MASKSTUDIO_MODEL_CACHE_BYTES", (2 if ON_SPACE else 8) << 30)  # loaded models'
                           # weights; the least recently used model goes first (the newest is kept whatever its size)
DESIGN_MAX_TOKENS = _env_int("MASKSTUDIO_DESIGN_MAX_TOKENS", (1 << 16) if ON_SPACE else MAX_TOKENS)  # the app
                           # draws and checks designs up to this many tokens (65k: ~20 s of checks at worst here)
DESIGN_LIGHT_WORK = _env_int("MASKSTUDIO_DESIGN_LIGHT_WORK", 1 << 16)  # tokens x steps: past it (or past
                           # SEGMENT_TABLE_MAX segments) pictures, checks and exports queue in one low-priority worker
DESIGN_MAX_WORK = _env_int("MASKSTUDIO_DESIGN_MAX_WORK", (1 << 20) if ON_SPACE else (1 << 22))  # tokens x steps
                           # (base + rules + overlays) the app draws and checks (1,024 steps on 4k tokens: ~50 s)
MODELS_ALLOWED = os.environ.get("MASKSTUDIO_MODELS", "")  # comma-separated names the app's model box accepts;
                           # empty: on a Space the small ones (run.models.SPACE_MODELS), locally any id or folder;
                           # "*": any hub id (never a server path on a Space)
