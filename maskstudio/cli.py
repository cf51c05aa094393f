"""`maskstudio check|export|lower|render|run|audit|presets|eval|train` over the same library functions.

Exit codes: 0 ok, 1 the check found errors (e.g. empty rows, leaks), 2 bad input (invalid spec,
unknown preset, missing model) with a one-line message naming the field and the fix.
"""
from __future__ import annotations

import argparse
import json
import sys

from .spec import DEFAULT_MAX_TOKENS, Spec, SpecError


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


def _load(args) -> Spec:
    if getattr(args, "preset", None):
        from .presets import load_preset

        spec = load_preset(args.preset)
    elif not args.spec:
        raise UsageError("give a spec file, or --preset NAME (see `maskstudio presets`)")
    else:
        spec = Spec.load(args.spec, max_tokens=args.max_tokens)
    return _sized(args, spec)


def _sized(args, spec: Spec) -> Spec:
    """The spec as a run lays it out when --size-by-tokenizer is given (declared sizes that differ
    are said on stderr, one line each); else as declared, with one line when texts may differ."""
    texts = [s["name"] for s in spec.segments if "text" in s and s["modality"] in ("text", "special")]
    choice = getattr(args, "size_by_tokenizer", None)
    if choice is None:
        if texts and args.command in ("check", "export") and not spec.unsized_segments():
            print(f"note: segment(s) {', '.join(texts[:5])} have text: shown at their declared sizes; a run sizes "
                  "them by its tokenizer (--size-by-tokenizer [MODEL] shows the run's layout)", file=sys.stderr)
        return spec
    from .run.inputs import sized_by_tokenizer
    from .run.models import load_tokenizer

    sized, notes = sized_by_tokenizer(spec, load_tokenizer(None if choice == "embedded" else choice))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return sized


def _write(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def cmd_check(args) -> int:
    from .analysis import analyze

    spec = _load(args)
    result = analyze(spec, layer=args.layer, head=args.head)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


def cmd_export(args) -> int:
    from .export import export_bytes

    spec = _load(args)
    _write(args.output, export_bytes(spec, args.format, layer=args.layer, head=args.head))
    return 0


def cmd_lower(args) -> int:
    """Print what the FlexAttention kernel computes for one layer: the lowered expression."""
    from .export_flex import lowered_source

    print(lowered_source(_load(args), args.layer))
    return 0


def cmd_render(args) -> int:
    import io
    import warnings

    from .viz import render, save

    spec = _load(args)
    warnings.filterwarnings("ignore", "Glyph .* missing from", UserWarning)  # a name in a script the font lacks: boxes
    options = {"layer": args.layer, "head": args.head} if args.view == "mask" else {}
    figure = render(spec, args.view, **options)
    if args.output == "-":  # PNG bytes on stdout, e.g. `maskstudio render spec.json -o - | display`
        buffer = io.BytesIO()
        save(figure, buffer)
        _write(None, buffer.getvalue())
        return 0
    save(figure, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_run(args) -> int:
    from .run import run

    spec = _load(args)
    images: dict = {}
    for item in args.image or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--image takes SEGMENT=PATH (a picture, or several for a video: repeat it), got {item!r}")
        images.setdefault(name, []).append(path)
    images = {k: v[0] if len(v) == 1 else v for k, v in images.items()}
    result = run(spec, model=args.model, max_new_tokens=args.max_new_tokens,
                 attentions=bool(args.json), images=images or None)
    print(result.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(result.to_json())
    return 0


def cmd_audit(args) -> int:
    """What a transformers model really does on the layout, layer by layer, against the design in
    it; exit 0 when they agree everywhere, 1 when they differ (like `check`)."""
    from .audit import audit

    report = audit(args.model, Spec.load(args.layout))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    if args.out:
        _audit_files(report, args.out, args.layer)
    return 0 if report.matches else 1


def _audit_files(report, folder: str, layer: int | None) -> None:
    """The model's spec and the pictures (every layer, one layer, positions) in `folder`."""
    import os

    from .viz import save
    from .viz.audit_views import audit_layer_figure, audit_layers_figure, audit_positions_figure

    os.makedirs(folder, exist_ok=True)
    if layer is None:  # the first layer that differs, else 0
        layer = next((d.layer for d in report.layers if not d.same), 0)
    files = {"model_spec.json": None, "layers.png": audit_layers_figure(report),
             f"layer_{layer}.png": audit_layer_figure(report, layer), "positions.png": audit_positions_figure(report)}
    for name, figure in files.items():
        path = os.path.join(folder, name)
        if name.endswith(".json") and report.model_spec is not None:
            _write(path, report.model_spec.to_json().encode())
        elif figure is not None:
            save(figure, path)
        else:
            continue
        print(f"wrote {path}", file=sys.stderr)


def cmd_presets(args) -> int:
    from .presets import list_presets

    for p in list_presets():
        print(f"{p['name']:32} {p.get('group', ''):26} {p['source']:9} {p.get('citation', '')[:60]}")
        if args.verbose:
            print(f"    from: {p['origin']}\n    {p['description']}\n")
    return 0


def cmd_patterns(args) -> int:
    from .patterns import PATTERNS, REQUIRED
    from .positions import SCHEMES

    for p in PATTERNS.values():
        params = ", ".join(n if v.default is REQUIRED else f"{n}={v.default!r}" for n, v in p.params.items())
        print(f"{p.name} {{{params}}}\n    {p.doc}")
    print("\nposition schemes: " + ", ".join(f"{k} {{{', '.join(f'{n}={d!r}' for n, d in v.items())}}}"
                                          for k, v in SCHEMES.items()))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import main as eval_main

    return eval_main(args)


# `train` flags and their defaults: a resumed run takes every flag not given from its config.json
TRAIN_DEFAULTS = {"model": None, "task": "kv_retrieval", "data": None, "steps": 100, "lr": 1e-4, "seed": 0,
                  "batch": 8, "n_train": 256, "lora": False, "objective": "next_token", "loss_on": None,
                  "eval_every": 0, "eval_n": 64, "warmup": 0, "save_every": 0, "backend": None, "pack_tokens": 0,
                  "eval_data": None, "keep": 2, "resumable": False, "save_dtype": "bfloat16"}


def cmd_train(args) -> int:
    import torch

    from .train import train

    if args.lora_config:  # LoRA with these settings (checked: one line naming a bad key)
        from .train.model import lora_options

        args.lora = lora_options(args.lora_config)
    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None and getattr(args, k) is not False}
    if args.resume:  # the run's own settings and spec, the flags given checked against them
        from .train import resumed_settings

        settings = resumed_settings(args.resume, {k: v for k, v in given.items() if k != "steps"}, args.override)
        spec = _load(args) if (args.spec or args.preset) else None
        fitted = train(spec, resume=args.resume, override=args.override, out_dir=args.out,
                       steps=args.steps or TRAIN_DEFAULTS["steps"], eval_spec=args.eval_spec,
                       progress=not args.quiet, **settings)
        _report_fit(fitted, fitted.out_dir)
    else:
        _train_new(args, given)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank tears down together
        torch.distributed.destroy_process_group()
    return 0


def _train_new(args, given: dict) -> None:
    from .train import compare, train

    opts = {**TRAIN_DEFAULTS, **given}
    spec = _load(args)
    if opts["data"]:
        opts["task"] = None
    common = dict(model=opts["model"], task=opts["task"], data=opts["data"], steps=opts["steps"], lr=opts["lr"],
                  seed=opts["seed"], batch=opts["batch"], lora=opts["lora"], objective=opts["objective"],
                  out_dir=args.out, loss_on=opts["loss_on"], n_train=opts["n_train"], backend=opts["backend"],
                  warmup=opts["warmup"], save_every=opts["save_every"], progress=not args.quiet,
                  pack_tokens=opts["pack_tokens"], eval_data=opts["eval_data"], keep=opts["keep"],
                  resumable=opts["resumable"], save_dtype=opts["save_dtype"])
    if args.no_baseline:
        fitted = train(spec, eval_every=opts["eval_every"], eval_n=opts["eval_n"], eval_spec=args.eval_spec, **common)
        _report_fit(fitted, args.out)
    else:
        result = compare(spec, eval_n=opts["eval_n"], eval_spec=args.eval_spec, **common)
        if result is not None:
            print(result["text"])
            if args.out:
                print(f"run folder {args.out} (baseline/, design/, comparison.json)")


def _report_fit(fitted, out) -> int:
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        last = fitted.steps[-1] if fitted.steps else {}
        print(f"trained {fitted.spec.name}: {len(fitted.steps)} steps, last loss {last.get('loss', float('nan')):.4f}"
              + (f"; run folder {out}" if out else ""))
        for e in fitted.evals:
            print(f"  step {e['step']:>6}: eval NLL {e['nll']:.4f}, accuracy {e['accuracy']:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskstudio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text, spec=True):
        p = sub.add_parser(name, help=help_text)
        if spec:
            p.add_argument("spec", nargs="?", help="spec JSON file")
            p.add_argument("--preset", help="use a built-in preset instead of a file")
            p.add_argument("--layer", type=int, default=0, help="layer for per-layer rules (default 0)")
            p.add_argument("--head", type=int, default=0, help="head for per-head rules (default 0)")
            p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                           help=f"refuse layouts longer than this (default {DEFAULT_MAX_TOKENS})")
        p.set_defaults(fn=fn)
        return p

    p = add("check", cmd_check, "summary and problems; exit 0 ok, 1 problems, 2 invalid")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    tokenizer_help = ("size text segments as a run does, by MODEL's tokenizer (default: the embedded SmolLM2), "
                      "and say where the declared sizes differ")
    p.add_argument("--size-by-tokenizer", nargs="?", const="embedded", metavar="MODEL", help=tokenizer_help)
    p = add("export", cmd_export, "write json | npy (dense mask) | positions | flex (Python) | transformers "
                                  "(Python: the design in any transformers trainer)")
    p.add_argument("--size-by-tokenizer", nargs="?", const="embedded", metavar="MODEL", help=tokenizer_help)
    p.add_argument("--format", choices=("json", "npy", "positions", "flex", "transformers"), default="json")
    p.add_argument("-o", "--output", help="output file (default stdout)")
    add("lower", cmd_lower, "print the layer's lowered mask_mod (closed-form arithmetic, sizes in P)")
    p = add("render", cmd_render, "draw a view to PNG")
    p.add_argument("-o", "--output", required=True, help="PNG file, or - for stdout")
    p.add_argument("--view", default="mask", choices=("mask", "positions", "distance", "flow", "reach", "all"))
    p = add("run", cmd_run, "run the spec on a model (default: embedded SmolLM2-135M)")
    p.add_argument("--model", default=None, help="Hugging Face model id (default: embedded SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--json", help="also write the full result as JSON here")
    p.add_argument("--image", action="append", metavar="SEGMENT=PATH",
                   help="a picture for an image segment (repeat for a video's frames); needs a VLM --model")
    p = add("audit", cmd_audit, "what a transformers model really does on a layout, per layer, against the design",
            spec=False)
    p.add_argument("model", help="a tiny local config (tiny-llama, tiny-mistral, tiny-gemma2, tiny-gemma3, "
                                 "tiny-gemma3-vision, tiny-qwen2-vl, tiny-llama4), a hub id, a config.json or a model folder")
    p.add_argument("--layout", required=True, help="the design: a spec JSON file (its segments feed the model)")
    p.add_argument("--out", help="folder for the model's spec (model_spec.json) and pictures")
    p.add_argument("--layer", type=int, help="the layer drawn alone in --out (default: the first that differs)")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    p = add("presets", cmd_presets, "list the built-in presets (name, group, provenance, citation)", spec=False)
    p.add_argument("-v", "--verbose", action="store_true", help="also where each design comes from, and its description")
    add("patterns", cmd_patterns, "list the mask patterns and position schemes", spec=False)
    p = add("eval", cmd_eval, "evaluate specs on a built-in task with statistics", spec=False)
    p.add_argument("--specs", nargs="+", required=True)
    p.add_argument("--task", default="kv_retrieval")
    p.add_argument("-n", "--n", type=int, default=100, help="examples (use -n under torchrun: its parser claims --n)")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="your own examples, JSONL")
    p.add_argument("--out", help="write results JSON here")
    p = add("train", cmd_train, "fine-tune a model under the spec's mask, against a causal baseline")
    d = TRAIN_DEFAULTS  # flags default to None: `--resume` tells a flag given from one left out
    p.add_argument("--model", help="hub id, tiny-llama (random, for tests), default embedded SmolLM2")
    p.add_argument("--task", help=f"generated task to train and evaluate on (default {d['task']})")
    p.add_argument("--data", help="your own training examples, JSONL (as for eval); without --eval-data a "
                                  "seeded fifth is held out for evaluation and never trained on")
    p.add_argument("--eval-data", help="held-out evaluation examples, JSONL (then all of --data trains)")
    p.add_argument("--steps", type=int, help=f"optimizer steps in all (default {d['steps']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']})")
    p.add_argument("--seed", type=int, help="seed of data order, corruption and init (default 0)")
    p.add_argument("--batch", type=int, help=f"examples per optimizer step, the global batch (default {d['batch']})")
    p.add_argument("--n-train", type=int, help=f"generated training examples (default {d['n_train']})")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-config", help='LoRA settings as JSON, implies --lora (BICO\'s: {"r": 32, "lora_alpha": 16, '
                                         '"lora_dropout": 0.01, "target_modules": "all-linear"})')
    p.add_argument("--objective", choices=("next_token", "bico"), help="default next_token")
    p.add_argument("--loss-on", nargs="+", help="segments carrying the loss (default: role target)")
    p.add_argument("--eval-every", type=int, help="evaluate every K steps (with --no-baseline)")
    p.add_argument("--eval-n", type=int, help=f"held-out examples for evaluation (default {d['eval_n']})")
    p.add_argument("--eval-spec", help="evaluate the design under this spec (default: the training spec)")
    p.add_argument("--warmup", type=int, help="linear learning-rate warmup steps (default 0)")
    p.add_argument("--save-every", type=int, help="checkpoint every K steps (and at the end; default 0)")
    p.add_argument("--backend", choices=("eager", "flex"), help="default: flex on CUDA, eager on CPU")
    p.add_argument("--pack-tokens", type=int,
                   help="pack each step's examples into rows of at most N tokens (isolated; 0 = one forward each)")
    p.add_argument("--out", help="run folder: config, metrics, scores, checkpoints (save_pretrained form)")
    p.add_argument("--keep", type=int, help=f"keep the K newest checkpoints (0: all; default {d['keep']})")
    p.add_argument("--save-dtype", choices=("bfloat16", "float32"), help="dtype of the saved model (default bfloat16)")
    p.add_argument("--resumable", action="store_true",
                   help="also save the optimizer state and exact fp32 weights, so --resume can continue the run")
    p.add_argument("--resume", help="a run folder or checkpoint folder to continue, with its own settings and spec "
                                    "(flags given must agree; implies --no-baseline; writes into that folder)")
    p.add_argument("--override", action="store_true", help="with --resume: let the flags given change the run")
    p.add_argument("--no-baseline", action="store_true", help="train the spec only, no causal baseline or table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # RunError, PresetError and other input errors are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `maskstudio presets | head`
        return 0
    except OSError as err:
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 2


def _os_error(err: OSError) -> str:
    """A failed read or write as one line: the system's reason and the file, a long name shortened
    (e.g. `-o` past the file system's 255 bytes)."""
    name = err.filename
    if not err.strerror or not isinstance(name, str):
        return str(err)
    if len(name) <= 80:
        return f"{err.strerror}: '{name}'"
    return f"{err.strerror}: '{name[:40]}…{name[-30:]}' ({len(name)} characters)"


if __name__ == "__main__":
    sys.exit(main())
