"""The ``text`` dataloader: MDS shards (raw text or concatenated tokens) through streaming's StreamingDataset.

Recipe block::

    train_loader:
      name: text
      local: ./data/embedded          # a local MDS folder (a cache folder when `remote` is set)
      remote: null                    # s3://, gs://, oci://, ... anything streaming supports
      split: train
      max_seq_len: 128
      shuffle: true
      collator: {name: mlm, mlm_probability: 0.3}

A mixture names ``streams:`` instead of local/remote/split (``llmfoundry_lite.data.mixture``)::

      streams:
        web:   {local: data/web,   split: train, proportion: 3}
        books: {local: data/books, split: train, proportion: 1}

Per-rank partitioning, shuffling and mid-epoch resumption are streaming's: Composer saves
``dataset.state_dict()`` in checkpoints and restores it, so a resumed run sees exactly the samples an
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, Optional

from llmfoundry_lite import compat, registry
from llmfoundry_lite.errors import RecipeError

_cleaned_shm = False


def clean_stale_shared_memory_once() -> None:
    """Remove shared memory leaked by earlier (crashed) streaming runs; once per process.

    Stale entries only conflict with datasets that have a ``remote`` ("Reused local directory"), and the
    cleanup unlinks every streaming segment on the machine, so it runs once, before the first remote dataset.
    """
    global _cleaned_shm
    if _cleaned_shm:
        return
    _cleaned_shm = True
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()


@contextlib.contextmanager
def _single_process_init_lock() -> Iterator[None]:
    """Serialise StreamingDataset construction among single-process runs on this machine.

    Two runs that start together (a parallel sweep) can pick the same shared-memory name and fail with
    FileExistsError. Multi-process runs are left alone: their ranks must construct together (a barrier inside).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "llmfoundry_lite_streaming.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SplitTooSmall(RecipeError):
    """A rank's share of the split is smaller than one batch under drop_last: the loader would yield nothing.

    Raised before the DataLoader (and its worker processes) exists; ``train`` rewrites it naming the recipe
    section and the batch-size setting to change.
    """

    def __init__(self, per_rank: int, batch: int, total: int):
        super().__init__(
            f"{total} samples ({per_rank} per rank), fewer than one batch of {batch} with drop_last: the loader "
            "would yield no batch; use a smaller batch, drop_last: false or more data"
        )
        self.per_rank, self.batch, self.total = per_rank, batch, total


def _has_scheme(path: str) -> bool:
    return "://" in path


def split_dir(root: str, split: Optional[str], key: str = "local") -> str:
    """The folder of ``split`` under ``root`` (checked: exists and has index.json), else RecipeError."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise RecipeError(
            f"dataset folder {root!r} does not exist; build one with `llmfoundry-lite data convert "
            f"--source embedded --out {root}`",
            key=key,
        )
    path = os.path.join(root, split) if split else root
    if split and not os.path.isdir(path):
        found = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "index.json")))
        raise RecipeError(
            f"split {split!r} not found in {root!r}; available splits: {', '.join(found) or '(none)'}",
            key="split",
        )
    if not os.path.isfile(os.path.join(path, "index.json")):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "index.json")))
        hint = (
            f"; it has splits {', '.join(subs)}: set `split:`"
            if subs
            else (
                "; it is not an MDS dataset (an unfinished conversion leaves none) - rerun `llmfoundry-lite data convert`"
            )
        )
        raise RecipeError(f"no index.json in {path!r}{hint}", key=key)
    return path


def read_index(path: str) -> dict[str, Any]:
    """Parse ``path/index.json`` and check that every shard file is there with its recorded size."""
    index_file = os.path.join(path, "index.json")
    try:
        with open(index_file) as f:
            index = json.load(f)
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(
            f"corrupt MDS index {index_file!r} ({e}); rerun `llmfoundry-lite data convert`"
        ) from None
    for shard in shards:
        # A shard is usable if its raw file is complete, or (compressed datasets) its zip file is.
        candidates = [shard.get("raw_data"), shard.get("zip_data")]
        ok, problem = False, None
        for info in candidates:
            if not info:
                continue
            file = os.path.join(path, info["basename"])
            if os.path.isfile(file):
                size = os.path.getsize(file)
                if size == info["bytes"]:
                    ok = True
                    break
                problem = (
                    f"shard {file!r} has {size} bytes, index.json says {info['bytes']} (truncated or corrupt)"
                )
            elif problem is None:
                problem = f"shard file {file!r} listed in index.json is missing"
        if not ok:
            raise RecipeError(f"{problem}; rerun `llmfoundry-lite data convert` to rebuild the dataset")
    return index


def columns(index: dict[str, Any]) -> dict[str, str]:
    """Column name -> MDS encoding of the first shard."""
    if not index.get("shards"):
        return {}
    s = index["shards"][0]
    return dict(zip(s.get("column_names", []), s.get("column_encodings", [])))


def concat_length(index: dict[str, Any]) -> Optional[int]:
    """Fixed length N of the ``tokens`` column (``ndarray:int32:N``), or None for raw text / dynamic shapes."""
    enc = columns(index).get("tokens")
    if not enc:
        return None
    parts = enc.split(":")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None


def check_row_length(index: dict[str, Any], max_seq_len: Any, src: str, key: str) -> Optional[int]:
    """The split's row length (None for raw text); RecipeError at ``key`` when ``max_seq_len`` exceeds it."""
    n = concat_length(index)
    if n is not None and isinstance(max_seq_len, int) and max_seq_len > n:
        raise RecipeError(
            f"max_seq_len {max_seq_len} is larger than the {n}-token rows of {src!r}; lower max_seq_len or "
            f"reconvert with `--concat-tokens {max_seq_len}`",
            key=key,
        )
    return n


def _get_num_tokens_in_batch(batch: Any) -> int:
    # Real tokens only: padding does not count toward Composer's throughput or `tok` durations.
    from llmfoundry_lite.batch import batch_tokens

    return batch_tokens(batch).tokens


@registry.dataloaders.register("text")
def build_text_dataloader(
    tokenizer: Any,
    device_batch_size: int,
    *,
    max_seq_len: int,
    local: Optional[str] = None,
    remote: Optional[str] = None,
    split: Optional[str] = None,
    streams: Optional[dict] = None,
    collator: Optional[dict] = None,
    shuffle: bool = False,
    shuffle_seed: int = 9176,
    shuffle_algo: str = "py1e",
    shuffle_block_size: Optional[int] = None,
    num_canonical_nodes: Optional[int] = None,
    predownload: Optional[int] = None,
    cache_limit: Optional[str] = None,
    download_retry: int = 2,
    download_timeout: float = 60.0,
    epoch_size: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    prefetch_factor: Optional[int] = None,
    persistent_workers: bool = False,
    timeout: float = 0.0,
) -> Any:
    """MDS shards (raw text or token rows) -> batches via StreamingDataset; collator mlm/causal_lm (auto).

    ``streams`` (name -> local/remote/split/proportion|repeat|choose) mixes several folders with streaming's
    ``Stream``; every batch's per-stream counts are then in ``dataloader.stream_tally`` (see data/mixture.py).
    """
    import torch
    from composer.core import DataSpec
    from streaming import StreamingDataset

    if max_seq_len <= 0:
        raise RecipeError(f"max_seq_len must be positive, got {max_seq_len}", key="max_seq_len")
    blocks = None
    if streams is not None:
        from llmfoundry_lite.data.mixture import refuse_folder_keys, stream_blocks

        refuse_folder_keys({"local": local, "remote": remote, "split": split})
        blocks = stream_blocks(streams)
    elif local is None and remote is None:
        raise RecipeError("set `local:` (an MDS folder) or `remote:` (s3://..., gs://...)", key="local")
    # A remote that is a plain path is a local dataset copied into `local`: check it like one.
    index = None
    sources = {None: {"local": local, "remote": remote, "split": split}} if blocks is None else blocks
    layouts: dict[Any, Any] = {}
    for name, src_block in sources.items():
        prefix = "" if name is None else f"streams.{name}."
        s_local, s_remote, s_split = src_block.get("local"), src_block.get("remote"), src_block.get("split")
        if s_remote is not None and _has_scheme(s_remote):
            clean_stale_shared_memory_once()
            continue
        src = s_remote if s_remote is not None else s_local
        try:
            s_index = read_index(split_dir(src, s_split, key="remote" if s_remote is not None else "local"))
        except RecipeError as e:
            raise RecipeError(e.detail, key=f"{prefix}{e.key}" if e.key else None) from None
        n = check_row_length(s_index, max_seq_len, src, key="max_seq_len")
        layouts[name] = ("tokens", n) if "tokens" in columns(s_index) else ("text", None)
        index = index if index is not None else s_index
    if len(set(layouts.values())) > 1:
        described = ", ".join(
            f"{k}: {f'{n}-token rows' if kind == 'tokens' else 'raw text'}"
            for k, (kind, n) in layouts.items()
        )
        raise RecipeError(
            f"the streams differ in layout ({described}); convert every source the same way (the same "
            "--tokenizer and --concat-tokens, or all raw text)",
            key="streams",
        )

    cols = columns(index) if index is not None else {}
    if collator is None:
        # Finetuning rows -> finetune; token rows -> causal LM; raw text -> MLM when the tokenizer can mask.
        has_mask = getattr(tokenizer, "mask_token", None) is not None
        if "labels" in cols:
            collator = {"name": "finetune"}
        else:
            collator = {"name": "causal_lm" if ("tokens" in cols or not has_mask) else "mlm"}
    collate_fn = registry.build(
        "collators", collator, "collator", tokenizer=tokenizer, max_seq_len=max_seq_len
    )

    common = dict(
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        shuffle_algo=shuffle_algo,
        shuffle_block_size=shuffle_block_size,
        num_canonical_nodes=num_canonical_nodes,
        predownload=predownload,
        cache_limit=cache_limit,
        epoch_size=epoch_size,
        batch_size=device_batch_size,
    )
    tally = None
    compat.close_prefix_scan_handles()  # else each new dataset keeps handles on every live one until exit
    try:
        with _single_process_init_lock():
            if blocks is not None:
                from llmfoundry_lite.data.mixture import (
                    StreamTagCollator,
                    StreamTally,
                    make_streams,
                    open_mixture,
                )

                names = list(blocks)
                made = make_streams(blocks, download_retry=download_retry, download_timeout=download_timeout)
                dataset = open_mixture(names, made, **common)
                collate_fn = StreamTagCollator(collate_fn)
                tally = StreamTally(names)
            else:
                dataset = StreamingDataset(
                    local=os.path.expanduser(local) if local else None,
                    remote=remote,
                    split=split,
                    download_retry=download_retry,
                    download_timeout=download_timeout,
                    **common,
                )
    except (FileNotFoundError, ValueError) as e:
        where = f"local={local!r} remote={remote!r} split={split!r}" if blocks is None else "streams"
        raise RecipeError(f"cannot open dataset {where}: {e}") from None
    # len() is this rank's share (streaming partitions samples across ranks), for remote datasets too. With
    # fewer samples than one batch and drop_last, Composer would loop over empty epochs forever.
    if len(dataset) < (device_batch_size if drop_last else 1):
        raise SplitTooSmall(len(dataset), device_batch_size, int(dataset.epoch_size))

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=device_batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        timeout=timeout,
    )
    if tally is None:
        return DataSpec(loader, get_num_tokens_in_batch=_get_num_tokens_in_batch)
    # The stream ids leave the batch here (the model never sees them); the stream_counts callback reads them.
    loader.stream_tally = tally
    return DataSpec(loader, batch_transforms=tally, get_num_tokens_in_batch=_get_num_tokens_in_batch)


build_text_dataloader.__nested_components__ = {"collator": "collators"}


@registry.dataloaders.register("finetune")
def build_finetune_dataloader(
    tokenizer: Any,
    device_batch_size: int,
    *,
    max_seq_len: int,
    local: Optional[str] = None,
    remote: Optional[str] = None,
    split: Optional[str] = None,
    collator: Optional[dict] = None,
    shuffle: bool = False,
    shuffle_seed: int = 9176,
    epoch_size: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    prefetch_factor: Optional[int] = None,
    persistent_workers: bool = False,
    download_retry: int = 2,
    download_timeout: float = 60.0,
) -> Any:
    """Instruction/chat examples from `data convert --finetune` (MDS): loss on responses only, packed or padded."""
    src = remote if remote is not None and not _has_scheme(remote) else (local if remote is None else None)
    if src is not None:
        index = read_index(split_dir(src, split, key="remote" if remote is not None else "local"))
        if "labels" not in columns(index):
            raise RecipeError(
                f"{os.path.join(src, split or '')!r} holds {', '.join(columns(index)) or 'no'} columns, not "
                "finetuning examples; convert prompt/response or chat rows with `llmfoundry-lite data convert "
                "--finetune --tokenizer TOK --max-seq-len N`",
                key="local",
            )
    return build_text_dataloader(
        tokenizer,
        device_batch_size,
        max_seq_len=max_seq_len,
        local=local,
        remote=remote,
        split=split,
        collator=collator or {"name": "finetune"},
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        epoch_size=epoch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        persistent_workers=persistent_workers,
        download_retry=download_retry,
        download_timeout=download_timeout,
    )


build_finetune_dataloader.__nested_components__ = {"collator": "collators"}
