"""The ``spdecay`` command line. ``spdecay compare`` runs the robust fine-tuning comparison.

Heavy libraries (transformers, matplotlib, pandas) load only when a command runs. Every problem
with the input is one line on stderr (exit code 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Selective Projection Decay: robust fine-tuning experiments.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Selective Projection Decay (SPD): robust fine-tuning optimizers for PyTorch."""


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"spdecay: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def compare(
    task: Annotated[str | None, typer.Option(help="sentiment (default; MiniLM on Rotten Tomatoes -> tweets), digits (EfficientNet-Lite0 on MNIST -> sklearn digits + corruptions) or custom (needs --model/--train; implied by --model).")] = None,
    optimizers: Annotated[str, typer.Option(help="Comma-separated: adamw, l2sp, adamspd, sgdspd (SGD + the SPD add-on).")] = "adamw,l2sp,adamspd",
    lr: Annotated[str | None, typer.Option(help="Learning rate for all optimizers (1e-4) or per optimizer (adamw=1e-4,sgdspd=0.02). Default: the task's.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per run (instead of --epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs per run (default: the task's, 1).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size (default 32; 16 with --quick).")] = None,
    seeds: Annotated[int, typer.Option(help="Number of seeds (0..N-1) per optimizer and sweep point.")] = 1,
    sweep: Annotated[list[str] | None, typer.Option(help="Hyper-parameter grid, repeatable: weight_decay=0.5,1,2 (all optimizers), adamspd.weight_decay=0.5,1 (one), lr=..., or 'default' (2 strengths per method). Per method the best ID validation accuracy wins; all methods need grids of the same size.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<task>-<timestamp>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its results and last checkpoint (uses its stored config).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny smoke run: small subsets, short sequences, 6 steps (under 2 minutes on 2 CPU cores).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    model: Annotated[str | None, typer.Option(help="Local Hugging Face sequence- or image-classification model folder (bring your own).")] = None,
    train: Annotated[str | None, typer.Option(help="Training data: .csv/.tsv/.jsonl with text and label columns, or a class-per-folder image directory.")] = None,
    val: Annotated[str | None, typer.Option(help="Validation data (default: 10% of --train).")] = None,
    test: Annotated[str | None, typer.Option(help="ID test data (default: another 10% of --train).")] = None,
    ood: Annotated[list[str] | None, typer.Option(help="OOD set NAME=PATH, repeatable.")] = None,
    text_column: Annotated[str, typer.Option(help="Text column of --train/--val/--test/--ood files.")] = "text",
    label_column: Annotated[str, typer.Option(help="Label column of those files.")] = "label",
    lora_rank: Annotated[int, typer.Option(help="Fine-tune LoRA adapters of this rank (HF PEFT) instead of all weights; SPD then pulls them towards zero.")] = 0,
    max_length: Annotated[int | None, typer.Option(help="Token limit per text (default 64; 32 with --quick).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels (digits default 64).")] = None,
    train_size: Annotated[int | None, typer.Option(help="Use at most this many training rows (default: the task's, 2,000 snippets / 3,500 digits).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a resumable checkpoint every N steps (default 50; 3 with --quick).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """Fine-tune with each optimizer and seed, evaluate ID and OOD, write results, report and plots.

    With no options: the `sentiment` task, AdamW vs Adam L2-SP vs AdamSPD, one seed, one
    regularisation strength per method (about 5-10 minutes on 2 CPU cores). `--sweep default`
    tunes each method's strength over 2 values by ID validation accuracy (twice the time).
    """
    try:
        from spdecay.experiments.cli_config import config_from_options

        config = config_from_options(
            task=task, optimizers=optimizers, lr=lr, steps=steps, epochs=epochs, batch_size=batch_size,
            seeds=seeds, sweep=sweep or [], quick=quick, device=device, model=model, train=train, val=val,
            test=test, ood=ood or [], text_column=text_column, label_column=label_column,
            lora_rank=lora_rank, max_length=max_length, image_size=image_size, train_size=train_size,
            checkpoint_every=checkpoint_every,
        )
        from spdecay.experiments.runner import run_compare

        run_compare(config, out, resume=resume, progress=progress)
    except KeyboardInterrupt:
        _fail(f"interrupted; finished runs are saved, continue with: spdecay compare --resume --out {out or 'DIR'}", 130)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line unless --debug
        if debug:
            raise
        from spdecay.experiments.errors import RunnerError

        if isinstance(exc, RunnerError):
            _fail(str(exc))
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``spdecay`` console script."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="spdecay")


if __name__ == "__main__":
    main()
