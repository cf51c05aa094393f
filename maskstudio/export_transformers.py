"""`export --format transformers`: the flex export's standalone file plus a section that plugs the
design into any transformers model through transformers' own extension points, so a researcher
trains it in `Trainer`, TRL's `SFTTrainer`, accelerate, FSDP or DeepSpeed with no Mask Studio
import at training time.

The file is `export_flex.flex_code(spec)` with its docstring replaced and the section below
inserted before its `__main__` block: the mask per layer (`_variant`), the sizes (`layout_for`,
`_params`), the division choice (`_division`) and the positions (`_positions`) keep their one
definition there. The section adds what a trainer needs:

* `register(backend)`: an attention function registered in `AttentionInterface` (and a "no
  mask" entry in `AttentionMaskInterface`, so transformers builds none) for "eager", "sdpa" or
  "flex_attention"; it reads `module.layer_idx` (per-layer rules), the query heads (per-head
  rules) and the batch's `DesignBatch` from the forward kwarg `design`, builds that layer's mask
  once per batch and calls transformers' own attention function with it (eager / sdpa: an
  additive float mask, since a bool mask is added to the scores on the eager path and masks
  nothing; flex: a BlockMask).
* `Collator(pad_token_id, pack_tokens)`: examples {"input_ids", "labels", "sizes"} → padded rows
  (one example each) or packed rows (several, in order): `labels` -100 on padding and on each
  example's first token, `position_ids` restarting per example, `design` = the rows' documents.
  A packed row's mask is the document mask: each example attends only inside itself, under the
  design at its own sizes, with places counted from its own start (as `lower_packed` builds it).
"""
from __future__ import annotations

import inspect

from . import lower_blocks
from .export_flex import flex_code

_MAIN = '\nif __name__ == "__main__":'


def transformers_code(spec) -> str:
    """The generated module's text: the flex file, its docstring replaced, the transformers
    section inserted before its self-check."""
    flex = flex_code(spec)
    end = flex.index('\n"""\n') + len('\n"""\n')  # the flex file's docstring (no spec data in it)
    main = flex.rindex(_MAIN)
    helpers = [lower_blocks.kv_blocks, lower_blocks.block_indices, lower_blocks.to_block_mask,
               lower_blocks.block_mask_from_rows]  # the library's one definition of each, copied
    return DOC + flex[end:main] + SECTION + "".join("\n\n" + inspect.getsource(f) for f in helpers) + flex[main:]


DOC = '''"""A Mask Studio design for transformers' own trainers (generated from a JSON spec; its name:
SPEC_NAME). Needs torch and transformers only; no Mask Studio import.

    import design_module as design                      # this file
    name = design.register("sdpa")                      # or "eager", "flex_attention" (CUDA)
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    # or: model.set_attn_implementation(name)
    collator = design.Collator(pad_token_id=tokenizer.pad_token_id, pack_tokens=0)  # 4096: packing
    Trainer(model, args=TrainingArguments(..., remove_unused_columns=False),
            train_dataset=rows, data_collator=collator).train()

Each example is {"input_ids": [...], "labels": [...] (optional; -100 = no loss), "sizes": ...}:
`sizes` says how many tokens each segment of the design has in this example ({"name": length |
[h, w] | [t, h, w] | {"frames": [...]}}, a list in SEGMENTS order, or None for the shipped sizes);
they must add up to len(input_ids). `example({"question": ids, "answer": ids}, loss_on=["answer"])`
builds one from token ids per segment. The collator returns input_ids, labels, position_ids (the
design's positions, restarting per example) and `design` (a DesignBatch the attention function
reads in every layer: per-layer and per-head rules, the model's own sliding window folded in).
With pack_tokens=N it lays the batch's examples, in order, into rows of at most N tokens: each
example attends only inside itself under the design at its own sizes (the document mask). TRL's
own packing keeps only input_ids and labels, so pack with this collator (SFTConfig(packing=False,
remove_unused_columns=False), data_collator=Collator(..., pack_tokens=N)).

The FlexAttention functions of the flex export are here too: mask_mod_for, block_mask_for,
position_ids_for (see VARIANTS, layout_for).
"""
'''

SECTION = '''
# ---- transformers: the design in any transformers model (AttentionInterface, attn_implementation)
BATCH_KEY = "design"  # the collator's key and the forward kwarg that carries a DesignBatch
BACKENDS = {"eager": "eager", "sdpa": "sdpa", "flex_attention": "flex"}  # backend -> its name's suffix
NAME = "design_" + SLUG.replace("flash", "fa")  # transformers reads any name holding "flash" as FlashAttention
DENSE_CHUNK = 1 << 22  # (q, k) pairs evaluated per step of a dense mask


class _Columns:
    """Size parameter `slot` of each token's document: params[b, doc, slot], indexed in one step
    (compiled FlexAttention on CPU miscomputes params[b, doc][..., slot])."""

    def __init__(self, params, b, doc):
        self.params, self.b, self.doc = params, b, doc

    def __getitem__(self, slot):
        return self.params[self.b, self.doc, slot]


class _Along:
    """A per-token table laid along row b of a batch, read at a document's local index (+ its start)."""

    def __init__(self, table, b, offset):
        self.table, self.b, self.offset = table, b, offset

    def __getitem__(self, local):
        return self.table[self.b, (local + self.offset).clamp(0, self.table.shape[-1] - 1)]


def _lookups():
    return sorted({a for variant in VARIANTS.values() for a in variant[3]})


class DesignBatch:
    """The documents of a batch's rows (each document: a layout of this design, laid one after
    another from the row's start; the rest of the row is padding). What the attention function
    reads: per row the sizes P of each document (`params` [B, C + 1, K], the last slot the
    padding's), where each starts (`offsets` [B, C + 1]), the document of every token (`doc`
    [B, L], C = padding) and per-token tables. Masks are built once per layer program and kept."""

    def __init__(self, rows, length):
        self.layouts = [layout for row in rows for layout in row]
        if not self.layouts:
            raise ValueError("rows: give at least one document")
        self.length, slots = length, max(len(row) for row in rows)
        built = [[_params(layout) for layout in row] for row in rows]
        self.sizes = [(P.tolist(), table.n) for row in built for P, table in row]
        params, offsets, doc, tables = [], [], [], {a: [] for a in _lookups()}
        for row in built:
            ends = torch.tensor([0] + [table.n for _, table in row]).cumsum(0).tolist()
            if ends[-1] > length:
                raise ValueError(f"length: a row of {ends[-1]} tokens does not fit in {length}")
            P = torch.stack([P for P, _ in row])
            params.append(torch.cat([P, P[-1:].expand(slots + 1 - len(row), -1)]))
            offsets.append(torch.tensor(ends + [ends[-1]] * (slots - len(row)), dtype=DTYPE))
            counts = [table.n for _, table in row] + [length - ends[-1]]
            doc.append(torch.repeat_interleave(torch.tensor(list(range(len(row))) + [slots], dtype=DTYPE),
                                               torch.tensor(counts)))
            for a in tables:
                tables[a].append(torch.cat([table.attrs.get(a, torch.zeros(table.n, dtype=torch.int64)) for _, table
                                            in row] + [torch.zeros(length - ends[-1], dtype=torch.int64)]))
        self.params, self.offsets, self.doc = torch.stack(params), torch.stack(offsets), torch.stack(doc)
        self.tables = {a: torch.stack(cols) for a, cols in tables.items()}
        self.slots = slots
        self._masks = {}

    def to(self, device, non_blocking=False):
        """The same batch on `device` (accelerate and Trainer move batch entries with .to)."""
        out = object.__new__(DesignBatch)
        out.__dict__.update(self.__dict__)
        out.params, out.offsets, out.doc = (t.to(device) for t in (self.params, self.offsets, self.doc))
        out.tables = {a: t.to(device) for a, t in self.tables.items()}
        out._masks = {}
        return out

    def _parts(self, layer):
        fn, per_head, dividends, lookups = _variant(layer, self.layouts)
        return fn, per_head, _division(dividends, self.sizes), lookups

    def _allow(self, fn, div, lookups, b, h, q, kv, window):
        dq, dk = self.doc[b, q], self.doc[b, kv]
        off = self.offsets[b, dq]
        T = {a: _Along(self.tables[a], b, off) for a in lookups}
        allow = fn(_Columns(self.params, b, dq), T, h, q - off, kv - off, div) & (dq == dk) & (dq < self.slots)
        return allow & (q - kv < window) if window else allow

    def _rows(self, layer, heads, window):
        """rows(b, q): bool [heads, len(q), L], the layer's mask of row b at query indices q."""
        fn, _, div, lookups = self._parts(layer)
        h = torch.arange(heads, device=self.doc.device)[:, None, None]
        kv = torch.arange(self.length, device=self.doc.device)[None, None, :]
        return lambda b, q: self._allow(fn, div, lookups, b, h, q[None, :, None], kv, window)

    def dense(self, layer, num_heads=1, window=None):
        """bool [B, H or 1, L, L] (True = may attend): the layer's mask for every row."""
        fn, per_head, _, _ = self._parts(layer)
        key = ("dense", fn, per_head and num_heads, window)
        if key not in self._masks:
            device, L = self.doc.device, self.length
            heads = num_heads if per_head else 1
            rows = self._rows(layer, heads, window)
            out = torch.zeros(len(self.doc), heads, L, L, dtype=torch.bool, device=device)
            step = max(1, DENSE_CHUNK // max(L * heads, 1))
            for b in range(len(self.doc)):
                for r in range(0, L, step):
                    out[b, :, r:r + step] = rows(b, torch.arange(r, min(L, r + step), device=device))
            self._masks[key] = out
        return self._masks[key]

    def block_mask(self, layer, num_heads=None, window=None, block_size=128):
        """A BlockMask [B, H or 1, L, L] of the layer's mask for FlexAttention, built a band of query
        blocks at a time from the rows (never L x L at once)."""
        fn, per_head, div, lookups = self._parts(layer)
        if per_head and num_heads is None:
            raise ValueError("this layer has per-head rules: pass num_heads")
        key = ("block", fn, per_head and num_heads, window, block_size)
        if key not in self._masks:
            def mask_mod(b, h, q_idx, kv_idx):
                return self._allow(fn, div, lookups, b, h, q_idx, kv_idx, window)
            mask_mod.__name__ = mask_mod.__qualname__ = f"mask_{SLUG}_L{layer}_packed"
            heads = num_heads if per_head else 1
            self._masks[key] = block_mask_from_rows(self._rows(layer, heads, window), len(self.doc), heads,
                                                    self.length, mask_mod, self.doc.device, block_size, DENSE_CHUNK)
        return self._masks[key]


def _sizes_of(sizes):
    """An example's sizes as layout_for takes them: a dict, a list in SEGMENTS order, or None."""
    if isinstance(sizes, (list, tuple)):
        if len(sizes) != len(SEGMENTS):
            raise ValueError(f"sizes: {len(sizes)} values for {len(SEGMENTS)} segments {SEGMENTS}; give one per "
                             "segment, or a dict by segment name")
        return dict(zip(SEGMENTS, sizes))
    return sizes


def _tensor(values, name, i):
    out = torch.as_tensor(values)
    if out.dim() != 1 or out.dtype.is_floating_point:
        raise ValueError(f"example {i}: {name} must be a flat list of token ids")
    return out.long()


def example(segments, loss_on=None):
    """{"input_ids", "labels", "sizes"} from token ids per segment ({name: [ids]}, every 1-D segment
    of SEGMENTS, in any order); loss_on: the segment names whose tokens carry the loss (None: all)."""
    missing = [s for s in SEGMENTS if s not in segments]
    unknown = [s for s in segments if s not in SEGMENTS]
    if missing or unknown:
        raise ValueError(f"segments: give token ids for exactly {SEGMENTS} (missing {missing}, unknown {unknown})")
    ids, labels = [], []
    for name in SEGMENTS:
        part = [int(t) for t in segments[name]]
        ids += part
        labels += part if loss_on is None or name in loss_on else [-100] * len(part)
    return {"input_ids": ids, "labels": labels, "sizes": {name: len(segments[name]) for name in SEGMENTS}}


def _document(feature, i, sizes_key):
    if sizes_key not in feature:
        raise ValueError(f"example {i} has no {sizes_key!r}: the trainer dropped the column; set "
                         "remove_unused_columns=False in TrainingArguments / SFTConfig")
    try:
        layout = layout_for(_sizes_of(feature[sizes_key]))
    except ValueError as err:  # SpecError included: the one line, naming the example
        raise ValueError(f"example {i}: {err}") from None
    ids = _tensor(feature["input_ids"], "input_ids", i)
    labels = _tensor(feature["labels"], "labels", i) if feature.get("labels") is not None else ids.clone()
    n = sum(segment_size(s) for s in layout)
    if n != len(ids) or len(labels) != len(ids):
        raise ValueError(f"example {i}: sizes make {n} tokens, input_ids has {len(ids)} and labels {len(labels)}; "
                         "give sizes that add up to the example's tokens")
    labels = labels.clone()
    labels[0] = -100  # nothing in this example predicts its first token (in a packed row: the previous example)
    return ids, labels, layout


def pack_in_order(lengths, pack_tokens):
    """Row of each example: in order, greedily, at most pack_tokens tokens a row (a longer example is
    a row of its own); pack_tokens 0: a row each. Maskstudio.train packs a step's examples so."""
    rows, size = [], 0
    for i, n in enumerate(lengths):
        if not rows or not pack_tokens or size + n > pack_tokens:
            rows.append([])
            size = 0
        rows[-1].append(i)
        size += n
    return rows


class Collator:
    """examples -> {"input_ids", "labels", "position_ids", "design"}: rows of one example each, or
    with pack_tokens=N of several (in order, at most N tokens a row), right-padded to the longest row.
    mrope=True gives position_ids [3, B, L] (Qwen2-VL-style models) for 1-D designs too."""

    def __init__(self, pad_token_id=0, pack_tokens=0, mrope=False, sizes_key="sizes", pad_to_multiple_of=1):
        if not isinstance(pack_tokens, int) or pack_tokens < 0:
            raise ValueError(f"pack_tokens must be 0 (no packing) or a number of tokens, got {pack_tokens!r}")
        self.pad_token_id, self.pack_tokens, self.mrope = pad_token_id, pack_tokens, mrope
        self.sizes_key, self.multiple = sizes_key, pad_to_multiple_of

    def __call__(self, features):
        docs = [_document(f, i, self.sizes_key) for i, f in enumerate(features)]
        rows = pack_in_order([len(ids) for ids, _, _ in docs], self.pack_tokens)
        longest = max(sum(len(docs[i][0]) for i in row) for row in rows)
        L = -(-longest // self.multiple) * self.multiple
        places = [_positions(layout) for _, _, layout in docs]
        three = self.mrope or places[0].dim() == 2
        ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        pos = torch.zeros((3, len(rows), L) if three else (len(rows), L), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                x, y, _ = docs[i]
                ids[r, at:at + len(x)], labels[r, at:at + len(x)] = x, y
                pos[..., r, at:at + len(x)] = places[i]  # [n] (to every axis with mrope) or [3, n]
                at += len(x)
        batch = DesignBatch([[docs[i][2] for i in row] for row in rows], L)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, BATCH_KEY: batch}


def _no_mask(*args, **kwargs):
    """AttentionMaskInterface entry: transformers builds no mask; the attention function builds the design's."""
    return None


def _eager_of(module):
    """The model's own eager attention (its modeling file's eager_attention_forward), else a plain one."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", _plain_eager)


def _plain_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5) + attention_mask
    probs = torch.nn.functional.dropout(torch.softmax(scores.float(), dim=-1).to(query.dtype), p=dropout,
                                        training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_function(backend):
    """The transformers attention function of this design on `backend` ("eager", "sdpa", "flex_attention")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: use one of {tuple(BACKENDS)}, got {backend!r}")

    def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        from transformers import AttentionInterface

        batch = kwargs.pop(BATCH_KEY, None)
        if batch is None:
            raise ValueError(f"no {BATCH_KEY!r} in the forward's inputs: feed the model this module's Collator output "
                             f"(model(**collator(examples))), or set attn_implementation back to {backend!r}")
        n_q, n_k = query.shape[-2], key.shape[-2]
        if n_q != n_k or n_k != batch.length:
            raise ValueError(f"the design's batch has rows of {batch.length} tokens but attention sees {n_q} queries "
                             f"and {n_k} keys; this function serves training forwards (no KV cache)")
        layer, window = module.layer_idx, kwargs.get("sliding_window")
        if backend == "flex_attention":
            mask = batch.block_mask(layer, query.shape[1], window)
            return AttentionInterface()["flex_attention"](module, query, key, value, mask, scaling=scaling,
                                                          dropout=dropout, **kwargs)
        allow = batch.dense(layer, query.shape[1], window)
        cache = ("additive", id(allow), query.dtype)
        if cache not in batch._masks:  # additive float: a bool mask is added to the scores on the eager path
            batch._masks[cache] = torch.zeros(allow.shape, dtype=query.dtype, device=allow.device).masked_fill(
                ~allow, torch.finfo(query.dtype).min)
        fn = _eager_of(module) if backend == "eager" else AttentionInterface()["sdpa"]
        out, weights = fn(module, query, key, value, batch._masks[cache], scaling=scaling, dropout=dropout, **kwargs)
        seen = allow.any(-1).transpose(1, 2)[..., None]  # [B, L, H or 1, 1]: rows that see no key give zeros
        return out * seen.to(out.dtype), weights
    attention.__name__ = attention.__qualname__ = f"{NAME}_{BACKENDS[backend]}"
    return attention


def register(backend="sdpa"):
    """Register the design for `backend` with transformers; returns the attn_implementation name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    fn = attention_function(backend)
    name = fn.__name__
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    return name


def use(model, backend="sdpa"):
    """Switch a loaded model to the design (registered for `backend`); returns the model."""
    model.set_attn_implementation(register(backend))
    return model

'''
