"""The ``fastdpo`` command line: ``fastdpo bench``, ``fastdpo profile`` and ``fastdpo tune`` (also ``python -m
fastdpo``)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]


def _parse_number(cast, accept, expected):
    """An argparse ``type`` that casts with ``cast`` and keeps values ``accept`` says yes to."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _parse_number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _parse_number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _parse_number(float, lambda v: 0 < v < float("inf"), "a positive number")


def _impl_list(text: str) -> tuple:
    from .competitors import get_implementations

    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError("expected a comma-separated list of implementations")
    try:
        get_implementations(keys)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return keys


def build_parser() -> argparse.ArgumentParser:
    # Only light imports here: `fastdpo --help` should not wait for torch's first CUDA query.
    from .competitors import IMPLEMENTATIONS
    from .profiling import DEFAULT_LAYERS, MODELS, USABLE_FRACTION
    from .run import DTYPES, SHAPES

    parser = argparse.ArgumentParser(prog="fastdpo", description="fastdpo: the DPO loss without the logits. "
                                     "Measure it on your machine with `fastdpo bench` and `fastdpo profile`.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,profile,tune}", help="what to run")

    b = sub.add_parser("bench", help="time, peak memory and error of the DPO loss step against the naive "
                       "reference, TRL, Liger and CCE", description="The DPO loss step (policy forward+backward, "
                       "reference forward) of fastdpo against the naive reference and the competitors installed "
                       "here. Prints a table; writes results.csv, results.json and bench.png into --out. A run "
                       "whose estimated memory exceeds what the device has available is refused before it starts.")
    b.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="named lm-head shape (default: llama3-8b on GPU, cpu-small on CPU); on CPU a named "
                   "model shape keeps H and V but runs a small batch")
    b.add_argument("--hidden", type=_positive_int, help="hidden size H (overrides the shape's)")
    b.add_argument("--vocab", type=_positive_int, help="vocabulary size V (overrides the shape's)")
    b.add_argument("--pairs", type=_positive_int, help="preference pairs B (2B sequences)")
    b.add_argument("--seq-len", type=_positive_int, help="tokens per sequence T (the first 25%% are prompt)")
    b.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on GPU, fp32 on CPU by default")
    b.add_argument("--no-ref", action="store_true", help="reference-free: no reference head")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: CUDA when torch sees a GPU, else CPU)")
    b.add_argument("--impl", type=_impl_list, default=None,
                   help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} (or fastdpo[torch|triton])")
    b.add_argument("--repeats", type=_positive_int, help="timed runs (default 10 on GPU, 3 on CPU)")
    b.add_argument("--warmup", type=_nonneg_int, help="warm-up runs (default 3 on GPU, 1 on CPU)")
    _out_options(b, "bench")

    p = sub.add_parser("profile", help="peak memory of a whole DPO training step of a transformers model, naive "
                       "head against fastdpo's", description="One DPO training step (policy forward+backward, "
                       "reference forward, optimizer step) of a causal LM built from a config (no download), with "
                       "the naive head and with fastdpo's: peak memory by part, the largest batch that fits "
                       "--budget, and a memory timeline chart. A model whose estimated step needs more than "
                       f"{USABLE_FRACTION * 100:.0f}% of the memory the device has available is refused before it is "
                       "built.")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} or a path to a config.json "
                   "(default: llama3)")
    p.add_argument("--layers", type=_positive_int, default=None,
                   help=f"decoder layers, for a named model and a config.json alike (default {DEFAULT_LAYERS})")
    p.add_argument("--budget", type=_positive_float, default=None,
                   help="memory budget in GiB for the largest-batch search (default: the GPU's memory, or 2 on CPU, "
                   "less where the machine has less available)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence (default 512 GPU, 256 CPU)")
    p.add_argument("--pairs", type=_positive_int, default=None,
                   help="pairs in the profiled step (default 1; 8 with --padding-free)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: CUDA when torch sees a GPU, else CPU)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    p.add_argument("--padding-free", action="store_true",
                   help="instead: fastdpo's step on a ragged batch (long-tailed lengths up to --seq-len, shown), "
                   "padded against packed (padding removed, one backbone row, cu_seqlens): backbone tokens, step "
                   "time, peak memory side by side")
    _out_options(p, "profile")

    t = sub.add_parser("tune", help="tune the fused kernels for your GPU ahead of training (cached on disk)",
                       description="Time the fused Triton kernels' candidate configs on this GPU for the head "
                       "shapes given and cache the fastest, as the first training call at each shape would "
                       "(FASTDPO_AUTOTUNE_BUDGET_S bounds each, FASTDPO_CACHE_DIR says where).")
    t.add_argument("--shape", action="append", choices=list(SHAPES), default=None,
                   help="named head and batch (repeatable; default llama3-8b)")
    t.add_argument("--hidden", type=_positive_int, help="hidden size H (with --vocab and --tokens: a custom head)")
    t.add_argument("--vocab", type=_positive_int, help="vocabulary size V")
    t.add_argument("--tokens", type=_positive_int, help="tokens a call sees (rows of the batch times their length)")
    t.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the inputs' dtype (default bf16)")
    t.add_argument("--extras", action="store_true", help="also for the extra metrics (what TRL's trainer logs)")
    t.add_argument("--bias", action="store_true", help="a head with a bias")
    t.add_argument("--softcap", type=_positive_float, default=None, help="a head with this logit softcap")
    t.add_argument("--force", action="store_true", help="tune again where a choice is cached")
    return parser


def _out_options(parser, command):
    parser.add_argument("--out", help=f"output folder, put in place whole once the run has succeeded (default: a "
                        f"fresh fastdpo-out-{command}-<time> folder); an existing non-empty folder needs --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in an "
                        "existing non-empty --out folder (other files are kept); the old results stay until the new "
                        "ones are complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (bench) or progress lines "
                        "(profile) on stderr")


def _out_dir(args, parser, command):
    """The ``--out`` folder to write into (checked, not created yet); a usage error where it cannot be used."""
    from . import run

    try:
        return run.check_out_dir(args.out, command, overwrite=args.overwrite)
    except run.OutputDirError as err:
        parser.error(f"argument --out: {err}")


def _fail(command, message) -> int:
    print(f"fastdpo {command}: error: {message}", file=sys.stderr)
    return 2


def _write(command, out, write) -> tuple[dict | None, str | None]:
    """Write the run's files into ``out`` through ``write(folder)``, all or nothing (see
    :func:`~fastdpo.bench.run.write_out_dir`): ``(paths, None)``, or ``(None, why)`` for a failed write.

    The files are written before anything is printed, so that a reader that stops early (``| head``) costs
    no results; the caller prints ``why`` after the report, where it is seen.
    """
    from .run import write_out_dir

    try:
        return write_out_dir(out, write), None
    except OSError as err:
        return None, f"fastdpo {command}: error: cannot write the results to {out!r}: {err.strerror or err}"


def _bench(args, parser) -> int:
    from . import run
    from .memory import TooBigError

    try:
        config = run.resolve_config(args.shape, hidden=args.hidden, vocab=args.vocab, pairs=args.pairs,
                                    seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                                    with_ref=not args.no_ref, repeats=args.repeats, warmup=args.warmup,
                                    impls=args.impl)
    except ValueError as err:
        parser.error(str(err))
    out = _out_dir(args, parser, "bench")
    try:
        run.check_memory(config)
    except TooBigError as err:
        return _fail("bench", err)
    report = run.run_bench(config, progress=not args.no_progress)
    paths, error = _write("bench", out, lambda folder: run.write_outputs(report, folder))
    print(run.describe(report))
    print()
    print(run.format_table(report))
    print()
    if paths is None:
        print(run.summary(report))
        print(error, file=sys.stderr)
        return 1
    print(run.summary(report, out))
    return 0 if any(r.key == "fastdpo" and r.status == "ok" for r in report.rows) else 1


def _profile(args, parser) -> int:
    from . import profiling
    from .memory import TooBigError

    try:
        pairs = args.pairs or (8 if args.padding_free else None)
        config = profiling.resolve_config(args.model, layers=args.layers, budget_gib=args.budget,
                                          seq_len=args.seq_len, pairs=pairs, device=args.device,
                                          search=not (args.no_search or args.padding_free))
    except ValueError as err:
        parser.error(str(err))
    out = _out_dir(args, parser, "profile")
    try:
        config = profiling.check_memory(config)
    except (TooBigError, profiling.BudgetError) as err:
        return _fail("profile", err)
    except ValueError as err:  # a config.json that transformers cannot build
        parser.error(str(err))
    if args.padding_free:
        return _profile_padding_free(config, out, progress=not args.no_progress)
    try:
        report = profiling.run_profile(config, progress=not args.no_progress)
    except profiling.BudgetError as err:
        return _fail("profile", err)
    paths, error = _write("profile", out, lambda folder: profiling.write_outputs(report, folder))
    print(profiling.format_report(report, paths))
    if error:
        print(error, file=sys.stderr)
    return 0 if paths is not None else 1


def _profile_padding_free(config, out, progress=True) -> int:
    from . import padding_free

    try:
        report = padding_free.run_padding_free(config, progress=progress)
    except padding_free.NotPackableError as err:
        return _fail("profile", err)
    paths, error = _write("profile", out, lambda folder: padding_free.write_outputs(report, folder))
    print(padding_free.format_padding_free(report))
    if paths is not None:
        print(f"results: {paths['json']}")
    else:
        print(error, file=sys.stderr)
    return 0 if paths is not None else 1


def _tune(args, parser) -> int:
    import torch

    from .. import _triton_backend
    from .run import DTYPES, SHAPES

    custom = (args.hidden, args.vocab, args.tokens)
    if any(v is not None for v in custom) and (None in custom or args.shape):
        parser.error("--hidden, --vocab and --tokens go together, instead of --shape")
    if not torch.cuda.is_available():
        return _fail("tune", "no CUDA GPU visible to torch: tuning times the fused kernels on the GPU they run on")
    heads = ([("custom", *custom)] if args.hidden else
             [(n, SHAPES[n].hidden, SHAPES[n].vocab, 2 * SHAPES[n].pairs * SHAPES[n].seq_len)
              for n in args.shape or ["llama3-8b"]])
    for name, hidden, vocab, tokens in heads:
        config, path = _triton_backend.tune_ahead(tokens, hidden, vocab, DTYPES[args.dtype], bias=args.bias,
                                               softcap=args.softcap, extras=args.extras, force=args.force)
        print(f"{name}: H={hidden} V={vocab} {tokens} tokens {args.dtype}: {config}")
    print(f"cache: {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``fastdpo`` console script; returns the exit status.

    Exit status 2: the arguments, the output folder or the run's size were refused before anything ran or was
    written; 1: the run ran but fastdpo failed in it or its results could not be written; 130: interrupted
    (Ctrl-C), with the output folder left as it was; 141: stdout was closed early (the results are written).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]
    try:
        if args.command == "tune":
            return _tune(args, sub)
        return _bench(args, sub) if args.command == "bench" else _profile(args, sub)
    except KeyboardInterrupt:
        print(f"fastdpo {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout stopped (`fastdpo bench | head`); the results are written by now. Point stdout at
        # the null device so that the interpreter's last flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141

if __name__ == "__main__":
    sys.exit(main())
