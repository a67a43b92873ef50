"""``llmfoundry-lite data ...``: convert corpora to MDS, train tokenizers, inspect datasets."""

from __future__ import annotations

import os
from typing import Optional

import typer

from llmfoundry_lite.errors import RecipeError

data_app = typer.Typer(
    name="data",
    help="Convert corpora to MDS shards, train tokenizers, inspect datasets.",
    no_args_is_help=True,
    add_completion=False,
)


@data_app.command("convert")
def convert_cmd(
    source: str = typer.Option(
        ...,
        "--source",
        help="'embedded'; a file (.jsonl, .json.gz, .jsonl.zst, .parquet, .txt), a folder or a quoted glob of "
        "shards (splits from their names: *-train.*, *-validation.*); or hf:NAME[:CONFIG]",
    ),
    out: str = typer.Option(..., "--out", help="Output folder; one MDS folder per split is written inside"),
    splits: str = typer.Option("train,val", "--splits", help="Comma-separated splits to write (train, val)"),
    val_fraction: float = typer.Option(
        0.05, "--val-fraction", help="Held-out fraction when the source has no val split"
    ),
    seed: int = typer.Option(17, "--seed", help="Seed of the held-out selection"),
    compression: Optional[str] = typer.Option(None, "--compression", help="Shard compression, e.g. zstd"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="Tokenizer folder or hub name (needed by --concat-tokens)"
    ),
    concat_tokens: Optional[int] = typer.Option(
        None, "--concat-tokens", help="Write tokenized rows of exactly N ids (causal LM) instead of raw text"
    ),
    bos: Optional[bool] = typer.Option(
        None, "--bos/--no-bos", help="Prepend BOS to each document (default: if the tokenizer has one)"
    ),
    eos: Optional[bool] = typer.Option(
        None, "--eos/--no-eos", help="Append EOS to each document (default: if the tokenizer has one)"
    ),
    bos_text: Optional[str] = typer.Option(
        None, "--bos-text", help="Text put before each packed document instead of BOS, e.g. '[CLS]'"
    ),
    eos_text: Optional[str] = typer.Option(
        None,
        "--eos-text",
        help="Text put after each packed document instead of EOS, e.g. '[SEP]' (tokenizers without EOS)",
    ),
    text_field: str = typer.Option(
        "text", "--text-field", help="Text field of JSONL/Parquet/HF rows (C4, Dolma, FineWeb: text)"
    ),
    num_workers: Optional[int] = typer.Option(
        None,
        "--num-workers",
        help="Processes converting shards side by side (default: CPU cores; 0 = this one)",
    ),
    max_chars: Optional[int] = typer.Option(
        None, "--max-chars", help="Cut documents longer than this at paragraph/line/space boundaries"
    ),
    size_limit: str = typer.Option("64mb", "--shard-size", help="Maximum shard size, e.g. 64mb"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar"),
    max_docs: Optional[int] = typer.Option(
        None,
        "--max-docs",
        help="Convert a subset: N documents in all, split between train and val by --val-fraction",
    ),
    max_tokens: Optional[int] = typer.Option(
        None,
        "--max-tokens",
        help="Convert a subset: N tokens in all (counted with --tokenizer), split like --max-docs",
    ),
    finetune: bool = typer.Option(
        False, "--finetune", help="Rows of {prompt, response} or {messages: [...]}: loss on responses only"
    ),
    max_seq_len: Optional[int] = typer.Option(
        None, "--max-seq-len", help="Finetuning: tokens per example/row (prompt left-truncated to fit)"
    ),
    pack: bool = typer.Option(
        False, "--pack", help="Finetuning: pack examples into rows of --max-seq-len, with sequence_id"
    ),
    chat_template: Optional[str] = typer.Option(
        None,
        "--chat-template",
        help="Finetuning: chatml, llama3, llama2 or zephyr when the tokenizer has no template",
    ),
) -> None:
    """Convert a corpus to MDS shards: raw text, token rows (--concat-tokens) or finetuning examples (--finetune).

    Interrupted, the same command continues from the shards it finished.
    """
    from llmfoundry_lite.data.convert import convert

    try:
        summary = convert(
            source,
            out,
            splits=splits,
            val_fraction=val_fraction,
            seed=seed,
            compression=compression,
            tokenizer=tokenizer,
            concat_tokens=concat_tokens,
            bos=bos,
            eos=eos,
            text_field=text_field,
            num_workers=num_workers,
            max_chars=max_chars,
            size_limit=size_limit,
            progress=progress,
            max_docs=max_docs,
            max_tokens=max_tokens,
            bos_text=bos_text,
            eos_text=eos_text,
            finetune=finetune,
            max_seq_len=max_seq_len,
            pack=pack,
            chat_template=chat_template,
        )
    except KeyboardInterrupt:  # typer would exit 130 silently: say what is kept and how to go on
        typer.echo("interrupted: run the same command again to continue from the units it finished", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary.format())


@data_app.command("tokenizer")
def tokenizer_cmd(
    train: bool = typer.Option(False, "--train", help="Train a new tokenizer (the only action for now)"),
    kind: str = typer.Option("wordpiece", "--kind", help="wordpiece (BERT) or bpe (LLaMA-style byte-level)"),
    source: str = typer.Option("embedded", "--source", help="Corpus: same sources as `data convert`"),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Vocabulary size"),
    out: str = typer.Option(..., "--out", help="Folder to save the Hugging Face tokenizer in"),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSONL/Parquet/HF rows"),
) -> None:
    """Train a WordPiece or BPE tokenizer on a corpus and save it in Hugging Face format."""
    from llmfoundry_lite.data.sources import open_source
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    if not train:
        raise RecipeError("nothing to do: pass --train to train a tokenizer", key="--train")
    if kind not in ("wordpiece", "bpe"):
        raise RecipeError(f"unknown --kind {kind!r}; choose wordpiece or bpe", key="--kind")

    def docs():
        for split_docs in open_source(source, text_field).values():
            yield from split_docs

    path = train_tokenizer(kind, docs(), vocab_size=vocab_size, out_dir=out)  # type: ignore[arg-type]
    typer.echo(
        f"saved {kind} tokenizer (vocab {vocab_size}) to {path}; use it with `tokenizer: {{name: hf, "
        f"path: {path}}}`"
    )


@data_app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="An MDS folder (a split) or a folder of splits"),
    samples: int = typer.Option(3, "--samples", "-n", help="Decoded samples to show per split"),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="Decode token rows with this tokenizer"
    ),
    chars: int = typer.Option(300, "--chars", help="Characters to show per sample"),
) -> None:
    """Print sample/shard counts and a few decoded samples of an MDS dataset."""
    from llmfoundry_lite.data.inspect import inspect_dataset

    typer.echo(inspect_dataset(path, samples=samples, tokenizer=tokenizer, chars=chars))


def register_cli(app: typer.Typer) -> None:
    """Add the ``data`` sub-command group to the main CLI."""
    app.add_typer(data_app, name="data")


def main() -> None:
    """Standalone entry (``python -m llmfoundry_lite.data.cli``); errors exit 2 with one line."""
    import sys

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        rv = data_app(standalone_mode=False)  # typer returns an Exit's code (130 after Ctrl-C) here
    except RecipeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
