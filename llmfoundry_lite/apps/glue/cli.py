"""``llmfoundry-lite glue RECIPE``: the verb; imports the GLUE machinery (torch, Composer) only when it runs."""

from __future__ import annotations

from typing import Any, Optional


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite glue RECIPE [overrides] [--tasks ...] [--seeds N] [--out DIR] [--checkpoint P]``."""
    import typer

    @app.command("glue")
    def glue_command(
        recipe: str = typer.Argument(
            ...,
            help="GLUE recipe YAML (model, tokenizer and a 'glue:' section; may base: a pretraining recipe).",
        ),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides: glue.tasks.rte.lr=2e-5 ..."),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated subset, e.g. mnli,rte."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per task (default: the recipe's)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: glue.output_dir)."),
        checkpoint: Optional[str] = typer.Option(
            None, "--checkpoint", help="Composer checkpoint to start from."
        ),
        parallel: Optional[bool] = typer.Option(
            None, "--parallel/--serial", help="One job per GPU (>1 GPU)."
        ),
    ) -> None:
        """Finetune a pretrained checkpoint on GLUE and report per-task scores and the GLUE average."""
        import datasets

        from llmfoundry_lite.apps.glue.orchestrate import run_glue
        from llmfoundry_lite.apps.glue.results import results_markdown

        datasets.disable_progress_bars()  # one bar per split and job drowns the results
        task_list = [t for t in (tasks or "").split(",") if t.strip()] or None
        summary = run_glue(recipe, overrides, task_list, seeds, out, checkpoint, parallel)
        md = results_markdown(summary, summary["runs"]).split("\n## Runs")[0]
        typer.echo(md.rstrip())
        typer.echo(f"\nwrote results.json and results.md to {summary['output_dir']}")
