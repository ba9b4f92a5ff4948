"""Command line: `grokscope dump | analyze | report | verify | inspect | train-tiny | demo`."""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _resolve_config(checkpoint_dir: Path, spec: str | None):
    from grokscope.config import load_config

    if spec is not None:
        return load_config(spec)
    own = checkpoint_dir / "config.json"
    if own.is_file():
        return load_config(str(own))
    raise ValueError(f"{checkpoint_dir}: no config.json here; pass --config PRESET|FILE.json")


def _inspect_grok2(ckpt: Path, config) -> int:
    """Lists a Grok-2 checkpoint's parameters from the safetensors headers, every file checked."""
    from grokscope.checkpoint import CheckpointError
    from grokscope.formats.grok2 import checkpoint_files, release_names, scan
    from grokscope.layout import device_bytes, param_layout

    try:
        pieces = scan(ckpt, config)
    except (CheckpointError, OSError) as e:
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 1
    sources = release_names(config)
    files: dict[str, set] = {}
    stored: dict[str, int] = {}
    for name, infos in pieces.items():
        param = sources[name].param
        files.setdefault(param, set()).update(info.file.name for info in infos)
        stored[param] = stored.get(param, 0) + sum(info.nbytes for info in infos)
    print(f"{'#':>4}  {'path':<58} {'shape':<20} {'dtype':<9} {'files':>5} {'bytes':>12}")
    for index, (path, spec) in enumerate(param_layout(config).items()):
        print(f"{index:>4}  {path:<58} {str(spec.shape):<20} {str(spec.dtype):<9} {len(files[path]):>5} "
              f"{stored[path]:>12}")
    total = sum(stored.values())
    print(f"{len(stored)} parameters from {len(pieces)} tensors in {len(checkpoint_files(ckpt))} files, "
          f"{_human(total)}; all match the config ({config.num_layers} layers, d={config.emb_size}, "
          f"{config.num_experts} experts top-{config.num_selected_experts}, dense MLP "
          f"{config.dense_ffn_size or 'none'})")
    for model in (8, 4):
        print(f"parameters per device on a 1x{model} mesh: {_human(device_bytes(config, 1, model))} as stored, "
              f"{_human(device_bytes(config, 1, model, 'int8'))} with --quantize int8")
    return 0


def cmd_inspect(args) -> int:
    from grokscope.checkpoint import CheckpointError, check_file_set, check_tensor, read_tensor, tensor_path
    from grokscope.formats import detect_format
    from grokscope.layout import param_shapes
    from grokscope.quant import QuantizedWeight8bit

    ckpt = Path(args.checkpoint_dir)
    try:
        config = _resolve_config(ckpt, args.config)
    except (ValueError, OSError) as e:
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 2
    if detect_format(ckpt) == "grok2":
        return _inspect_grok2(ckpt, config)
    shapes = param_shapes(config)
    try:
        check_file_set(ckpt, len(shapes))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'#':>4}  {'path':<58} {'shape':<20} {'dtype':<9} {'quant':<11} {'bytes':>10}")
    total = 0
    for index, (path, expected) in enumerate(shapes.items()):
        file = tensor_path(ckpt, index)
        try:
            value = read_tensor(file)
            check_tensor(value, path, expected, str(file))
        except (CheckpointError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if isinstance(value, QuantizedWeight8bit):
            dtype, quant, nbytes = "int8", f"{value.n_blocks} block{'s' if value.n_blocks > 1 else ''}", value.nbytes
        else:
            dtype, quant, nbytes = str(value.dtype), "-", value.nbytes
        total += nbytes
        print(f"{index:>4}  {path:<58} {str(tuple(value.shape)):<20} {dtype:<9} {quant:<11} {nbytes:>10}")
    print(f"{len(shapes)} tensors, {_human(total)}; all match the config "
          f"({config.num_layers} layers, d={config.emb_size}, {config.num_experts} experts top-{config.num_selected_experts})")
    return 0


def cmd_demo(args) -> int:
    import jax

    from grokscope.checkpoint import load_params, save_params
    from grokscope.config import load_config
    from grokscope.forward import init_params
    from grokscope.runner import forward
    from grokscope.sharding import make_mesh

    config = load_config(args.preset)
    out = Path(args.checkpoint_out) if args.checkpoint_out else Path(tempfile.mkdtemp(prefix="grokscope-"))
    t0 = time.perf_counter()
    save_params(init_params(config, seed=args.seed), out, config)
    print(f"wrote a random {args.preset} checkpoint (seed {args.seed}) in the release's layout to {out}/ckpt-0")
    n = jax.device_count()
    mesh = make_mesh(data=1, model=n)
    params = load_params(out, config, mesh=mesh)
    print(f"loaded it onto a (data=1, model={n}) mesh of {jax.devices()[0].platform} devices")
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, config.vocab_size, size=(args.batch, args.seq_len), dtype=np.int32)
    result = forward(params, config, tokens, mesh=mesh)
    index = np.asarray(result.record["expert_index"])  # [B, T, L, k]
    gate = np.asarray(result.record["expert_gate"])
    print(f"forward: {args.batch} x {args.seq_len} tokens in {time.perf_counter() - t0:.1f} s (incl. compile)")
    E = config.num_experts
    print("\nshare of tokens whose first choice is each expert, by layer")
    print("layer " + " ".join(f"{e:>6}" for e in range(E)) + "   top-2 gate mass")
    for layer in range(config.num_layers):
        load = np.bincount(index[:, :, layer, 0].ravel(), minlength=E) / index[:, :, layer, 0].size
        mass = gate[:, :, layer].sum(-1).mean()
        print(f"{layer:>5} " + " ".join(f"{x:>6.1%}" for x in load) + f"   {mass:.3f}")
    return 0


def _parse_mesh(text: str) -> tuple[int, int]:
    """`--mesh DATAxMODEL` (e.g. `1x8`) as (data, model); a ValueError naming the flag otherwise."""
    import re

    match = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", text)
    if match is None:
        raise ValueError(f"--mesh: expected DATAxMODEL, two positive integers such as 1x8, got {text!r}")
    data, model = int(match.group(1)), int(match.group(2))
    if data < 1 or model < 1:
        raise ValueError(f"--mesh: expected sizes >= 1, got {text!r}")
    return data, model


def _error_line(error: BaseException) -> str:
    """An exception as one line of text."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def cmd_dump(args) -> int:
    from grokscope.checkpoint import CheckpointError
    from grokscope.dump import DumpError, dump
    from grokscope.record import RecordSpec
    from grokscope.store import StoreError
    from grokscope.tokenizer import TokenizerError

    from grokscope.distributed import DistributedError

    try:
        for flag, value in (("--batch-size", args.batch_size), ("--max-len", args.max_len)):
            if value is not None and value < 1:
                raise ValueError(f"{flag}: expected >= 1, got {value}")
        shape = _parse_mesh(args.mesh) if args.mesh is not None else None
        record = RecordSpec.parse(args.record)
        if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
            from grokscope.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout)
        mesh = None
        if shape is not None:
            import jax

            from grokscope.sharding import make_mesh

            wanted, available = shape[0] * shape[1], jax.device_count()
            if wanted > available:
                raise ValueError(f"--mesh {args.mesh}: needs {wanted} devices, {available} available")
            if jax.process_count() > 1 and wanted != available:
                raise ValueError(f"--mesh {args.mesh}: a job over {jax.process_count()} processes uses all "
                                 f"{available} of its devices, the mesh has {wanted}")
            mesh = make_mesh(*shape)
        if args.model is not None and args.checkpoint is not None:
            raise ValueError("--model and --checkpoint: give one (a bundled model's name or a checkpoint directory)")
        summary = dump(args.prompts, args.out, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                       config=args.config, record=record, batch_size=args.batch_size, max_len=args.max_len,
                       truncate=args.truncate, compute_dtype=args.compute_dtype, mesh=mesh,
                       progress=not args.quiet, model=args.model, quantize=args.quantize)
    except TokenizerError as e:
        print(f"error: {'--tokenizer ' if args.tokenizer else ''}{_error_line(e)}", file=sys.stderr)
        return 1
    except (DumpError, StoreError, CheckpointError, DistributedError, ValueError, OSError) as e:
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if Path(args.out).exists():
            print(f"\ninterrupted: {args.out} is resumable; run the same command again to continue", file=sys.stderr)
        else:
            print(f"\ninterrupted before {args.out} was created", file=sys.stderr)
        return 130
    import jax

    if jax.process_index() != 0:
        return 0
    print(summary)
    from grokscope.store import describe, open_store

    print(describe(open_store(str(args.out)), str(args.out)))
    return 0


def _read_failure(store: str, error: BaseException) -> str:
    """The one-line error for a decoder's failure while reading a store's chunks."""
    return (f"error: {store}: reading failed ({type(error).__name__}: {error}); "
            f"`grokscope verify --deep {store}` names the damaged chunk")


def cmd_analyze(args) -> int:
    import json

    from grokscope.analysis.summary import format_summary, require_routing, summarize
    from grokscope.store import StoreError, open_store

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix not in (".json", ".csv"):
        print(f"error: -o {out}: expected a .json or .csv file", file=sys.stderr)
        return 1
    client = None
    try:
        if args.scheduler:
            from grokscope.analysis.cluster import connect

            client = connect(args.scheduler, timeout=args.scheduler_timeout)
        ds = open_store(args.store)
        try:
            require_routing(ds)
        except ValueError as e:
            raise ValueError(f"{args.store}: {e}") from None
        summary = summarize(ds, by=args.by, n_permutations=args.permutations)
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a decompressor's failure on a damaged chunk
        print(_read_failure(args.store, e), file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    print(f"store: {args.store}")
    print(format_summary(summary))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix == ".json":
                out.write_text(json.dumps(summary.to_dict(data="list"), indent=1, default=str))
            else:
                summary.to_dataframe().to_csv(out)
        except OSError as e:
            print(f"error: -o {out}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from grokscope.report import write_report
    from grokscope.store import StoreError

    try:
        out = write_report(args.store, args.output, by=args.by, sequences=args.sequences, layer=args.layer,
                           summary=not args.no_summary)
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a decompressor's failure on a damaged chunk
        print(_read_failure(args.store, e), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; opens offline in a browser)")
    return 0


def cmd_verify(args) -> int:
    from grokscope.store import StoreError, check_store

    try:
        check = check_store(args.store, deep=args.deep)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if check.problems:
        for problem in check.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(check.summary())
        return 1
    print(check.summary())
    return 0


def _command(group: click.Group, name: str, handler, help: str, **settings):
    """A click command of `group` that calls `handler(args)` with its options as attributes."""

    def decorate(params_fn):
        @group.command(name, help=help, context_settings=settings or None)
        @functools.wraps(params_fn)
        def command(**options):
            return handler(SimpleNamespace(**options))

        return command

    return decorate


@click.group(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    pass


@_command(cli, "dump", cmd_dump,
          "record routing (and attention, residuals) for a prompt file into a zarr store")
@click.option("--prompts", required=True, help='.txt (a prompt per line) or .jsonl ({"text": ..., "label": ...})')
@click.option("--out", required=True, help="the store, e.g. activations/NAME.zarr (an unfinished one resumes)")
@click.option("--checkpoint", help="checkpoint directory: Grok-1's (holding ckpt-0/) or Grok-2's safetensors "
                                   "(default: the bundled model)")
@click.option("--model", help="a bundled model instead of --checkpoint: grok-tiny (the default) or grok2-tiny")
@click.option("--tokenizer", help="tokenizer.model (SentencePiece) or tokenizer.tok.json "
                                  "(default: the one in the checkpoint directory)")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="quantize a bfloat16 (Grok-2) checkpoint's matmul weights to int8 as they load")
@click.option("--config", help="preset or JSON (default: CHECKPOINT/config.json)")
@click.option("--record", default="routing", show_default=True,
              help="what to record, e.g. routing,attention:layers=0-3:heads=all:format=topk:k=16,"
                   "residual:layers=0,2 (attention formats: full, head_mean, topk)")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="sequences per forward and per store chunk, >= 1; in a one-process job at most the number of "
                   "prompts (a larger value uses the prompt count, which the store records)")
@click.option("--max-len", type=int, help="positions per sequence, >= 1 (default: the model's sequence_len)")
@click.option("--truncate", type=click.Choice(["left", "right"]), help="truncate longer prompts instead of failing")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--mesh", help="DATAxMODEL device mesh, e.g. 1x8: at most the devices available, all of them in a "
                             "multi-process job (default: one device)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--coordinator", help="HOST:PORT of process 0, for a job over several processes/hosts")
@click.option("--num-processes", type=int, help="processes in the job (with --coordinator)")
@click.option("--process-id", type=int, help="this process's index, 0..N-1 (with --coordinator)")
@click.option("--distributed", is_flag=True,
              help="join a multi-process job described by the environment (SLURM, Open MPI, ...)")
@click.option("--coordinator-timeout", type=int, default=120, show_default=True,
              help="seconds to wait for every process to join")
def _dump_options():
    pass


@_command(cli, "analyze", cmd_analyze,
          "per-layer routing summary of a store, each number beside its null baseline")
@click.argument("store")
@click.option("--by", help="a per-sequence variable to compare groups by, e.g. label")
@click.option("--permutations", type=int, default=200, show_default=True, help="shuffles for the p-values")
@click.option("-o", "--output", help="also write the summary to a .json or .csv file")
@click.option("--scheduler", help="run on a dask.distributed cluster, e.g. tcp://host:8786")
@click.option("--scheduler-timeout", type=float, default=30, show_default=True,
              help="seconds to wait for the dask scheduler")
def _analyze_options():
    pass


@_command(cli, "report", cmd_report, "one standalone HTML file of a store's routing figures (opens offline)")
@click.argument("store")
@click.option("-o", "--output", default="report.html", show_default=True, help="the HTML file to write")
@click.option("--by", help="a per-sequence variable to compare groups by (default: label, if present)")
@click.option("--sequences", type=int, default=3, show_default=True,
              help="sequences whose routing is shown, one per group in turn")
@click.option("--layer", type=int, default=None,
              help="the layer whose first choice colors each shown sequence's tokens (default: the middle layer)")
@click.option("--no-summary", is_flag=True, help="leave out the analyze table (its permutation tests)")
def _report_options():
    pass


@_command(cli, "verify", cmd_verify, "check a store: metadata, schema, every chunk its finished sequences need")
@click.argument("store")
@click.option("--deep", is_flag=True, help="also read and decode every chunk (reads the whole store)")
def _verify_options():
    pass


@_command(cli, "inspect", cmd_inspect,
          "list and validate every tensor of a checkpoint (Grok-1's ckpt-0/ or Grok-2's safetensors)")
@click.argument("checkpoint_dir")
@click.option("--config", help="preset (grok-1, grok-2, tiny, small) or JSON file; default CHECKPOINT_DIR/config.json")
def _inspect_options():
    pass


@_command(cli, "demo", cmd_demo, "write a random checkpoint, load it sharded, run it, print routing")
@click.option("--preset", default="small", show_default=True, help="model preset")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--checkpoint-out", help="where to write the checkpoint (default: a temp dir)")
def _demo_options():
    pass


def cmd_train_tiny(args) -> int:
    from grokscope.train import TrainSettings, main as train_main

    if args.steps < 1 or args.batch < 2 or args.seq_len < 2:
        print(f"error: --steps, --batch, --seq-len: expected >= 1, >= 2, >= 2, got {args.steps}, {args.batch}, "
              f"{args.seq_len}", file=sys.stderr)
        return 2
    settings = TrainSettings(steps=args.steps, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                             peak_lr=args.lr, warmup_steps=args.warmup, prose_rows=args.prose_rows,
                             eval_tokens=args.eval_tokens, eval_every=args.eval_every)
    try:
        return train_main(args.arch, args.out, settings, args.stdlib, not args.no_size_check, args.card_only,
                          command="grokscope train-tiny " + " ".join(sys.argv[2:]))
    except (ValueError, OSError) as e:
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 1


def _train_default(field: str):
    """The shipped run's value of a TrainSettings field, read when the command runs (importing
    grokscope.train loads jax, which every other command's start would pay for)."""
    def default():
        from grokscope.train import TrainSettings

        return getattr(TrainSettings(), field)

    return default


@_command(cli, "train-tiny", cmd_train_tiny,
          "train a bundled small model: grok-tiny (--arch grok1, the default) or grok2-tiny (--arch grok2); "
          "every default is the shipped run's setting")
@click.option("--arch", type=click.Choice(["grok1", "grok2"]), default="grok1", show_default=True,
              help="grok1: grok-tiny; grok2: grok2-tiny")
@click.option("--out", help="output directory (default: the bundled model's asset directory)")
@click.option("--steps", type=int, default=_train_default("steps"))
@click.option("--seed", type=int, default=_train_default("seed"))
@click.option("--batch", type=int, default=_train_default("batch"))
@click.option("--seq-len", type=int, default=_train_default("seq_len"))
@click.option("--prose-rows", type=int, default=_train_default("prose_rows"), help="prose windows per batch")
@click.option("--lr", type=float, default=_train_default("peak_lr"), help="peak learning rate")
@click.option("--warmup", type=int, default=_train_default("warmup_steps"))
@click.option("--eval-tokens", type=int, default=_train_default("eval_tokens"),
              help="held-out tokens per domain")
@click.option("--eval-every", type=int, default=_train_default("eval_every"))
@click.option("--stdlib", help="standard library to read (default: this interpreter's)")
@click.option("--no-size-check", is_flag=True, help="allow an output over the 10 MB budget")
@click.option("--card-only", is_flag=True, help="only re-render OUT/README.md from OUT/metrics.json (no training)")
def _train_options():
    pass


def main(argv=None) -> int:
    """Runs the command line `argv` (default: sys.argv); returns the exit status. Usage errors
    (an unknown command or flag, a value of the wrong type) are one line naming the flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = cli.main(args=argv, prog_name="grokscope", standalone_mode=False)
    except click.UsageError as e:
        if type(e).__name__.startswith("NoArgsIsHelp"):  # no command given: the help, as a usage error
            print(e.format_message(), file=sys.stderr)
        else:
            print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Abort:
        return 130
    except click.exceptions.Exit as e:  # --help
        return e.exit_code
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
