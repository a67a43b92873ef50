"""``llmfoundry-lite eval CHECKPOINT|HF_DIR --tasks ...``: the verb; imports torch and lm-eval only when it runs."""

from __future__ import annotations

from typing import Any, Optional


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite eval CHECKPOINT|HF_DIR --tasks a,b [--num-fewshot K] [--limit N] [--k 1,4] ...``."""
    import typer

    @app.command("eval")
    def eval_command(
        model: str = typer.Argument(
            ...,
            help="Composer checkpoint (.pt) of a llama run or its folder, or a Hugging Face model folder.",
        ),
        tasks: str = typer.Option(
            ..., "--tasks", help="Comma-separated lm-eval tasks, e.g. hellaswag,arc_easy,piqa,lambada_openai."
        ),
        num_fewshot: Optional[int] = typer.Option(
            None, "--num-fewshot", help="Examples in each prompt (default: each task's)."
        ),
        limit: Optional[int] = typer.Option(None, "--limit", help="Score at most N examples per task."),
        batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
        device: Optional[str] = typer.Option(
            None, "--device", help="cpu or cuda (default: cuda when present)."
        ),
        tokenizer: Optional[str] = typer.Option(
            None, "--tokenizer", help="Tokenizer folder or hub name (default: the run's / the folder's)."
        ),
        include_path: Optional[str] = typer.Option(
            None, "--include-path", help="Folder of task YAMLs of your own (lm-eval's format)."
        ),
        out: Optional[str] = typer.Option(
            None,
            "--out",
            help="Folder for eval.json and eval.md (default: the checkpoint's folder, or ./eval).",
        ),
        k: Optional[str] = typer.Option(
            None,
            "--k",
            help="SMoE-Dropout checkpoints: experts per token, one or comma-separated (1,4,16: scored at each); "
            "default: the checkpoint's model.ffn.k.",
        ),
    ) -> None:
        """Score a checkpoint or HF folder on lm-evaluation-harness tasks (zero/few-shot accuracy)."""
        from llmfoundry_lite.apps.evaluate.harness import RESULTS_JSON, RESULTS_MD, evaluate, results_markdown

        summary = evaluate(
            model,
            tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            tokenizer=tokenizer,
            include_path=include_path,
            out=out,
            k=k,
        )
        table = results_markdown(summary).split("\n", 2)[2]  # the table and its settings line, no title
        typer.echo(table.rstrip())
        typer.echo(f"\nwrote {RESULTS_JSON} and {RESULTS_MD} to {summary['output_dir']}")
