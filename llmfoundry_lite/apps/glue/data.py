"""GLUE data: the task files (Hugging Face hub, or local GLUE-schema files), tokenization, batching, and a tiny
synthetic GLUE-schema dataset for smoke tests."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmfoundry_lite.apps.glue.config import TASK_ORDER, TASKS, GlueConfig, canonical_task
from llmfoundry_lite.errors import RecipeError, first_line

_DATA_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def _data_root(data_dir: str) -> Path:
    root = Path(os.path.expanduser(data_dir))
    if not root.is_dir():
        raise RecipeError(
            f"data_dir {data_dir!r} does not exist; point it to a folder of GLUE-schema files "
            "(DIR/<task>/train.jsonl, validation.jsonl), or set make_toy_data: true for a smoke test",
            key="glue.data_dir",
        )
    return root


def _find_task_folder(data_dir: Path, task: str) -> Path | None:
    for p in sorted(data_dir.iterdir()) if data_dir.is_dir() else []:
        try:
            if p.is_dir() and canonical_task(p.name) == task:  # 'SST-2', 'sst2', 'CoLA'... all match
                return p
        except RecipeError:
            continue
    return None


def _task_folder(data_dir: Path, task: str) -> Path:
    folder = _find_task_folder(data_dir, task)
    if folder is None:
        raise RecipeError(
            f"no folder for task {task!r} in data_dir {str(data_dir)!r} (expected {data_dir / task}/ "
            f"with {', '.join(sorted(set(TASKS[task].eval_splits.values()) | {'train'}))} files)",
            key="glue.data_dir",
        )
    return folder


def _split_file(folder: Path, split: str) -> Path:
    for ext in _DATA_EXTS:
        f = folder / f"{split}{ext}"
        if f.is_file():
            return f
    raise RecipeError(
        f"missing split file {str(folder / split)}.jsonl (or .json/.csv/.tsv)", key="glue.data_dir"
    )


def load_task_splits(task: str, data_dir: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The task's ``train`` and evaluation splits as ``datasets.Dataset``s (hub, or local GLUE-schema files)."""
    import datasets

    spec = TASKS[task]
    splits = ["train", *spec.eval_splits.values()]
    if data_dir is None:
        from llmfoundry_lite.data.checks import hub_access

        try:
            with hub_access():  # offline or unreachable: the cache only, one error at once
                dsd = datasets.load_dataset("glue", task, cache_dir=cache_dir)
        except Exception as e:  # offline, hub errors: the fix is a local data_dir
            raise RecipeError(
                f"cannot load GLUE task {task!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{first_line(e)[:200]}); set glue.data_dir to local files",
                key="glue.data_dir",
            ) from None
        return {s: dsd[s] for s in splits}
    folder = _task_folder(_data_root(data_dir), task)
    files = {s: _split_file(folder, s) for s in splits}
    out = {}
    for split, f in files.items():
        kind = _DATA_EXTS[f.suffix]
        kwargs = {"delimiter": "\t"} if f.suffix == ".tsv" else {}
        try:
            out[split] = datasets.load_dataset(
                kind, data_files={split: str(f)}, split=split, cache_dir=cache_dir, **kwargs
            )
        except Exception as e:
            raise RecipeError(f"cannot read {str(f)!r}: {first_line(e)[:200]}", key="glue.data_dir") from None
        missing = [c for c in (*spec.text_columns, "label") if c not in out[split].column_names]
        if missing:
            raise RecipeError(
                f"{str(f)!r} lacks column(s) {', '.join(missing)}; {task} needs "
                f"{', '.join((*spec.text_columns, 'label'))}",
                key="glue.data_dir",
            )
    return out


def tokenize_split(ds: Any, task: str, tokenizer: Any, max_seq_len: int, limit: int | None = None) -> Any:
    """Tokenize a split (pairs as segment A/B), keep ``input_ids``, masks and ``labels``."""
    spec = TASKS[task]
    if spec.num_labels > 1:  # GLUE marks unlabeled rows (test splits) with -1
        ds = ds.filter(lambda ex: ex["label"] is not None and ex["label"] >= 0)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    def encode(batch: dict) -> dict:
        texts = [[str(t) for t in batch[c]] for c in spec.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_len)
        enc["labels"] = batch["label"]
        return dict(enc)

    return ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)


class Collate:
    """Pads a list of tokenized examples to the longest one; labels as float (regression) or long."""

    def __init__(self, pad_token_id: int, regression: bool):
        self.pad_token_id = pad_token_id
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n, longest = len(rows), max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, longest, dtype=torch.long)
        token_type_ids = torch.zeros(n, longest, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.tensor(r["input_ids"])
            attention_mask[i, :k] = 1
            if "token_type_ids" in r:
                token_type_ids[i, :k] = torch.tensor(r["token_type_ids"])
        labels = torch.tensor(
            [r["labels"] for r in rows], dtype=torch.float32 if self.regression else torch.long
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
        }


def make_toy_glue(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = ("mnli", "rte", "stsb"),
    rows: int = 48,
    eval_rows: int = 16,
    seed: int = 0,
) -> Path:
    """Write a tiny GLUE-schema dataset (JSONL per split) from the embedded corpus, for smoke tests.

    Labels are learnable from surface features (for pairs: whether segment B is copied from segment A; for single
    sentences: whether the sentence mentions 'the'), so a working pipeline beats chance given enough steps.
    """
    from llmfoundry_lite.data.corpus import embedded_documents

    rng = random.Random(seed)
    sents = [s.strip() for d in embedded_documents() for s in d.replace("\n", " ").split(". ")]
    sents = [s for s in sents if 20 <= len(s) <= 160]
    rng.shuffle(sents)
    out = Path(out_dir)
    pool = iter(sents * 4)

    def pair_row(task: str) -> dict:
        spec = TASKS[task]
        a = next(pool)
        same = rng.random() < 0.5
        b = " ".join(a.split()[: max(3, len(a.split()) // 2)]) if same else next(pool)
        row = {spec.text_columns[0]: a, spec.text_columns[1]: b}
        if spec.num_labels == 1:
            row["label"] = round(4.0 + rng.random(), 2) if same else round(rng.random() * 2, 2)
        elif spec.num_labels == 3:
            row["label"] = 0 if same else rng.choice([1, 2])
        else:
            row["label"] = int(same)
        return row

    def single_row(task: str) -> dict:
        s = next(pool)
        return {TASKS[task].text_columns[0]: s, "label": int(" the " in f" {s.lower()} ")}

    for task in tasks:
        task = canonical_task(task)
        spec = TASKS[task]
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        make = pair_row if len(spec.text_columns) == 2 else single_row
        for split, n in [("train", rows)] + [(s, eval_rows) for s in spec.eval_splits.values()]:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(n):
                    f.write(json.dumps(make(task)) + "\n")
    return out


def prepare_task_data(glue: GlueConfig, tasks: Sequence[str]) -> None:
    """Write toy data for missing tasks (``make_toy_data``), then check every local split file exists, so a
    missing file fails the run at once and not after hours of MNLI."""
    if glue.data_dir is None:  # the hub: checked when each job loads its task
        return
    root = Path(os.path.expanduser(glue.data_dir))
    if glue.make_toy_data:
        missing = sorted({t for t in tasks if _find_task_folder(root, t) is None}, key=TASK_ORDER.index)
        if missing:
            make_toy_glue(root, missing)
    root = _data_root(glue.data_dir)
    for task in sorted(set(tasks)):
        folder = _task_folder(root, task)
        for split in ["train", *TASKS[task].eval_splits.values()]:
            _split_file(folder, split)
