#!/usr/bin/env python3
"""Train the tiny demo checkpoint bundled with neo-serve.

The checkpoint in ``neo_serve/demo_model/`` is a *toy*: a randomly initialised,
~5M-parameter GPT-NeoX model trained for a few CPU-minutes on the Python source
files of the CPython standard library of the interpreter running this script.
It exists so the service, its tests and its demos have a real Hugging Face
style GPT-NeoX checkpoint (config.json + model.safetensors + tokenizer.json)
to load that is small enough to commit, and whose output at least looks like
Python. It is not a useful language model.

Pipeline
--------
1. Corpus: every ``*.py`` file below ``sysconfig.get_paths()["stdlib"]``, in
   sorted path order, skipping test suites (``test``, ``tests``), ``idlelib``,
   ``site-packages``, ``__pycache__``, the data tables in ``encodings`` and
   ``pydoc_data`` and the build-specific ``_sysconfigdata_*`` module; files
   that are not UTF-8 are skipped; the corpus is capped at ``--max-corpus-mb``
   (20 MB) of text.
2. Tokenizer: byte-level BPE (``tokenizers``), vocabulary ``--vocab`` (4096)
   with ``<|endoftext|>`` as id 0, ByteLevel pre-tokenizer
   (add_prefix_space=False), ByteLevel decoder, no post-processor (encoding
   never adds special tokens). Saved as ``tokenizer.json`` together with
   ``tokenizer_config.json`` and ``special_tokens_map.json`` so that
   ``transformers.AutoTokenizer.from_pretrained(out)`` works with
   bos = eos = unk = ``<|endoftext|>``.
3. Model: ``transformers.GPTNeoXForCausalLM`` from scratch (hidden 256,
   4 layers, 4 heads, MLP 1024, 512 positions, rotary_pct 0.25, parallel
   residual, untied embeddings, vocab = tokenizer size rounded up to a
   multiple of 64, bos = eos = 0), trained on the documents joined with
   ``<|endoftext|>`` using random 256-token windows, AdamW, linear warmup and
   cosine decay to 10 % of the peak learning rate.
4. Output: ``save_pretrained(out, safe_serialization=True)`` in float16
   (config.json records the dtype), the tokenizer files and a README.md model
   card with the exact recipe and final loss. Nothing else is written to
   ``out`` (no optimizer state, no checkpoints).

Determinism
-----------
Everything is seeded (``--seed``) and sorted. With ``--steps N`` the run is
reproducible for a given interpreter/stdlib, torch version and thread count.
Without ``--steps`` the number of optimisation steps is derived from
``--minutes``: the first steps are timed and the step count (which fixes the
cosine schedule) is chosen so that training ends after about ``--minutes``
minutes; the chosen count is printed and recorded in the model card so the
exact run can be repeated with ``--steps``.

Usage::

    python scripts/train_demo_model.py                      # ~12 min, 1 thread
    python scripts/train_demo_model.py --minutes 20 --threads 2
    python scripts/train_demo_model.py --steps 400 --out /tmp/demo

Requires torch, transformers, tokenizers and safetensors (development-only
dependencies of neo-serve; the service itself does not need this script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

EOS = "<|endoftext|>"

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",  # mostly generated charmap tables
    "pydoc_data",  # one 750 KB string literal of documentation text
}
SKIP_FILE_PREFIXES = ("_sysconfigdata_",)  # build-machine specific

# Files save_pretrained may legitimately produce, plus the ones we add.
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
}


# The bundled checkpoint, wherever the script is run from.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "neo_serve" / "demo_model"
# Arguments that do not change what is trained (the step count replaces --minutes).
NOT_RECIPE = ("out", "minutes", "steps", "log_every")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (replaced; refused if it holds "
                   "files this script does not write)")
    p.add_argument("--minutes", type=float, default=12.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=None,
                   help="exact number of optimisation steps (overrides --minutes; reproducible)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch / tokenizers CPU threads")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size incl. special token")
    p.add_argument("--context", type=int, default=256, help="training sequence length")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimisation step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="dtype of the saved weights")
    p.add_argument("--max-corpus-mb", type=float, default=20.0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def check_output_dir(out: Path) -> None:
    """The output directory is replaced whole: refuse one that holds anything else (a mistyped
    --out such as the repository or a home directory would be deleted)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"--out {out}: exists and is not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPECTED_FILES)
    if foreign:
        raise SystemExit(f"--out {out}: refusing to replace a directory holding files this script does not "
                         f"write: {', '.join(foreign[:5])}" + (" ..." if len(foreign) > 5 else ""))


def reproduce_command(args: argparse.Namespace, steps: int) -> str:
    """The command that repeats this run: the step count and every recipe argument not at its default."""
    defaults = vars(parse_args([]))
    parts = ["python scripts/train_demo_model.py", f"--steps {steps}"]
    for name, value in vars(args).items():
        # The seed and thread count always: the weights depend on both.
        if name not in NOT_RECIPE and (value != defaults[name] or name in ("seed", "threads")):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


# --------------------------------------------------------------------------- corpus


def collect_corpus(max_bytes: int) -> tuple[list[str], Path, int]:
    """Return (documents, stdlib_dir, n_bytes) from the running interpreter's stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in names:
            if name.endswith(".py") and not name.startswith(SKIP_FILE_PREFIXES):
                files.append(Path(root) / name)
    files.sort(key=lambda f: f.relative_to(stdlib).as_posix())

    docs: list[str] = []
    total = 0
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n").strip("\n")
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append(text + "\n")
        total += size
    return docs, stdlib, total


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert tok.token_to_id(EOS) == 0, "<|endoftext|> must be id 0"
    return tok


def save_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        # The generic fast tokenizer loads tokenizer.json verbatim. (transformers
        # v5's GPTNeoXTokenizer would rebuild it from vocab/merges, add an NFC
        # normalizer and a "<|padding|>" token outside the model's vocabulary.)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            "0": {
                "content": EOS,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    special_tokens_map = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")


# --------------------------------------------------------------------------- model


def build_config(vocab_size: int, dtype: str):
    from transformers import GPTNeoXConfig

    padded_vocab = int(math.ceil(vocab_size / 64) * 64)
    return GPTNeoXConfig(
        vocab_size=padded_vocab,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        hidden_act="gelu",
        max_position_embeddings=512,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_bias=True,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=True,
        dtype=dtype,
    )


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    check_output_dir(out)  # before minutes of training, not after
    threads = max(1, args.threads)
    # Must be set before tokenizers / torch spin up their thread pools.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["OMP_NUM_THREADS"] = str(threads)

    import numpy as np
    import torch
    import transformers
    import tokenizers
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    t_start = time.time()

    # 1. corpus --------------------------------------------------------------
    docs, stdlib, n_bytes = collect_corpus(int(args.max_corpus_mb * 1024 * 1024))
    print(f"corpus: {len(docs)} files, {n_bytes / 1e6:.2f} MB from {stdlib}", flush=True)

    # 2. tokenizer -----------------------------------------------------------
    t0 = time.time()
    tok = train_tokenizer(docs, args.vocab)
    vocab_size = tok.get_vocab_size()
    print(f"tokenizer: vocab {vocab_size}, trained in {time.time() - t0:.1f}s", flush=True)

    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(0)  # <|endoftext|> between (and after) documents
    data = torch.tensor(ids, dtype=torch.long)
    print(f"tokens: {len(data):,} ({n_bytes / len(data):.2f} bytes/token)", flush=True)

    # 3. model ---------------------------------------------------------------
    config = build_config(vocab_size, args.dtype)
    model = GPTNeoXForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {config.vocab_size}", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    gen = torch.Generator().manual_seed(args.seed)
    ctx, bsz = args.context, args.batch
    n_windows = len(data) - ctx - 1

    def batch():
        starts = torch.randint(0, n_windows, (bsz,), generator=gen)
        x = torch.stack([data[s : s + ctx + 1] for s in starts.tolist()])
        return x

    budget_s = args.minutes * 60.0
    total_steps = args.steps if args.steps is not None else None
    calib_steps = 8
    model.train()
    step, t_train = 0, time.time()
    losses: list[float] = []
    window_loss, window_n = 0.0, 0
    while True:
        if total_steps is not None and step >= total_steps:
            break
        lr = lr_at(step, total_steps or 10**9, args.lr, args.warmup)
        for g in optim.param_groups:
            g["lr"] = lr
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        lv = loss.item()
        losses.append(lv)
        window_loss += lv
        window_n += 1

        if total_steps is None and step == calib_steps:
            per_step = (time.time() - t_train) / calib_steps
            total_steps = max(args.warmup + 10, int(budget_s / per_step))
            print(f"calibration: {per_step:.2f}s/step -> {total_steps} steps "
                  f"for {args.minutes:g} min (re-run with --steps {total_steps} to reproduce)",
                  flush=True)
        if step % args.log_every == 0 or step == total_steps:
            el = time.time() - t_train
            print(f"step {step:5d}/{total_steps}  loss {window_loss / window_n:.4f}  "
                  f"lr {lr:.2e}  {el / 60:.1f} min", flush=True)
            window_loss, window_n = 0.0, 0
    train_minutes = (time.time() - t_train) / 60.0
    tail = losses[-50:]
    final_loss = sum(tail) / len(tail)
    print(f"training done: {step} steps in {train_minutes:.1f} min, "
          f"final loss (mean of last {len(tail)} steps) {final_loss:.4f}", flush=True)

    # Evaluate the converted (half precision) weights on fixed windows.
    model.eval()
    half = getattr(torch, args.dtype)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_starts = torch.randint(0, n_windows, (32,), generator=eval_gen).tolist()
    with torch.no_grad():
        ex = torch.stack([data[s : s + ctx + 1] for s in eval_starts])
        eval_fp32 = model(input_ids=ex, labels=ex).loss.item()
        model = model.to(half)
        eval_half = model(input_ids=ex, labels=ex).loss.item()
    print(f"eval loss on 32 fixed windows: fp32 {eval_fp32:.4f}, {args.dtype} {eval_half:.4f}",
          flush=True)

    # 4. save ----------------------------------------------------------------
    # Write into a fresh temp dir next to `out`, then swap, so `out` only ever
    # contains the expected files.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo_model_tmp_", dir=out.parent))
    try:
        model.config.dtype = args.dtype
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer_files(tok, tmp, model_max_length=config.max_position_embeddings)

        # Make config.json self-describing for loaders that predate transformers
        # v5 (which folds rotary_pct/rotary_emb_base into rope_parameters and
        # renamed torch_dtype to dtype): record both spellings.
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = args.dtype
        cfg["torch_dtype"] = args.dtype
        rope = cfg.get("rope_parameters") or {}
        cfg["rotary_pct"] = rope.get("partial_rotary_factor", 0.25)
        cfg["rotary_emb_base"] = rope.get("rope_theta", 10000)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

        write_model_card(
            tmp / "README.md",
            args=args,
            config=cfg,
            n_params=n_params,
            n_docs=len(docs),
            n_bytes=n_bytes,
            n_tokens=len(data),
            tok_vocab=vocab_size,
            steps=step,
            train_minutes=train_minutes,
            final_loss=final_loss,
            eval_half=eval_half,
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
        )

        stray = {p.name for p in tmp.iterdir()} - EXPECTED_FILES
        if stray:
            raise RuntimeError(f"unexpected files in output: {sorted(stray)}")
        tmp.chmod(0o755)  # mkdtemp creates 0700; make the result look like a normal dir
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            check_output_dir(out)  # nothing foreign appeared meanwhile
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    total_size = 0
    for f in sorted(out.iterdir()):
        size = f.stat().st_size
        total_size += size
        print(f"  {f.name:28s} {size:>12,d} B")
    print(f"  {'total':28s} {total_size:>12,d} B ({total_size / 2**20:.2f} MiB)")
    if total_size > 12 * 2**20:
        print("WARNING: output exceeds 12 MiB", file=sys.stderr)
    print(f"wrote {out} in {(time.time() - t_start) / 60:.1f} min total")
    return 0


def write_model_card(path: Path, *, args, config, n_params, n_docs, n_bytes, n_tokens,
                     tok_vocab, steps, train_minutes, final_loss, eval_half, versions) -> None:
    c = config
    text = f"""# neo-serve demo model (tiny GPT-NeoX, toy)

A **randomly initialised, ~{n_params / 1e6:.1f}M-parameter GPT-NeoX model** trained for
**{train_minutes:.1f} minutes on {args.threads} CPU thread{"s" if args.threads > 1 else ""}** on the Python source code of the CPython
{versions['python']} standard library. It is bundled with neo-serve so the service, its
tests and its demos have a small real GPT-NeoX checkpoint to load.

**For demos and tests only. This is not a useful model:** it produces text that
looks roughly like Python but is mostly nonsense. Do not use it for anything else.

## Model

| | |
|---|---|
| architecture | `GPTNeoXForCausalLM` |
| parameters | {n_params:,} |
| hidden size / layers / heads | {c['hidden_size']} / {c['num_hidden_layers']} / {c['num_attention_heads']} |
| intermediate size | {c['intermediate_size']} |
| max positions | {c['max_position_embeddings']} (trained on {args.context}-token windows) |
| rotary | rotary_pct {c['rotary_pct']}, base {c['rotary_emb_base']} |
| parallel residual | {c['use_parallel_residual']} |
| tied embeddings | {c['tie_word_embeddings']} |
| vocab | {c['vocab_size']} (tokenizer has {tok_vocab}; padded to a multiple of 64) |
| bos / eos | id 0, `<|endoftext|>` |
| weights dtype | {args.dtype} (`model.safetensors`) |

## Tokenizer

Byte-level BPE trained with `tokenizers` on the same corpus: {tok_vocab} tokens,
`<|endoftext|>` = id 0, ByteLevel pre-tokenizer (`add_prefix_space=false`), ByteLevel
decoder, no post-processor (no tokens are added when encoding).

## Training

- data: {n_docs} `.py` files ({n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens) from the
  interpreter's stdlib, excluding test suites, `idlelib`, `site-packages`, `encodings`,
  `pydoc_data` and `_sysconfigdata_*`; documents joined with `<|endoftext|>`
- {steps} steps of AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak lr {args.lr},
  {args.warmup} warmup steps then cosine decay to 10 %, batch {args.batch} x {args.context} tokens,
  grad-norm clip 1.0, seed {args.seed}
- **final training loss: {final_loss:.3f}** (mean cross-entropy over the last 50 steps, nats/token);
  {args.dtype} weights on 32 fixed training windows: {eval_half:.3f}
- software: Python {versions['python']}, torch {versions['torch']},
  transformers {versions['transformers']}, tokenizers {versions['tokenizers']}

Reproduce with:

```
{reproduce_command(args, steps)}
```

## License

The training data is the CPython standard library source, Copyright (c) Python Software
Foundation, distributed under the **Python Software Foundation License Version 2**
(PSF-2.0). The license text is in the `LICENSE.txt` file of the Python installation the
data came from and at https://docs.python.org/3/license.html.
"""
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
