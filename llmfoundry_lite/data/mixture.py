"""Dataset mixtures: ``streams:`` of a ``text`` loader mapped onto mosaicml-streaming's own ``Stream`` objects.

Recipe block::

    train_loader:
      name: text
      streams:
        web:   {local: data/web,   split: train, proportion: 0.75}
        books: {local: data/books, split: train, proportion: 0.25}

Streaming decides the mixing (relative ``proportion`` or absolute ``repeat``/``choose``, never both), the shuffle
across streams and mid-epoch resumption. This module only turns the recipe block into ``Stream`` objects, turns
streaming's ``ValueError`` into a RecipeError naming ``streams.<name>.<key>``, and tags every sample with the id of
the stream it came from, so that per-stream samples and tokens can be counted (``stream_counts`` callback).
The tag travels in the batch as ``stream_id`` from the collator (a worker process) to the main process, where
the loader's batch transform takes it out again before the model sees the batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from streaming import Stream, StreamingDataset

from llmfoundry_lite.errors import RecipeError, first_line

STREAM_KEY = "stream_id"
WEIGHT_KEYS = ("proportion", "repeat", "choose")
STREAM_KEYS = ("local", "remote", "split", *WEIGHT_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def refuse_folder_keys(block: Mapping[str, Any], prefix: str = "") -> None:
    """With ``streams:`` each stream names its folder: the loader's own local/remote/split must be unset (null)."""
    given = [k for k in ("local", "remote", "split") if block.get(k) is not None]
    if given:
        raise RecipeError(
            f"`streams:` names every folder; remove {', '.join(given)} here (or set them to null), or put them "
            "in each stream",
            key=f"{prefix}{given[0]}",
        )


def stream_blocks(streams: Any, key: str = "streams", weights: bool = True) -> dict[str, dict[str, Any]]:
    """The ``streams:`` mapping checked for shape (names, known keys, a folder each); name -> block."""
    if not isinstance(streams, Mapping) or not streams:
        raise RecipeError(
            "must be a mapping of stream name -> {local, remote, split, proportion | repeat | choose}",
            key=key,
        )
    out: dict[str, dict[str, Any]] = {}
    for name, block in streams.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise RecipeError(
                "stream names are used in metric names: use letters, digits, '_', '-' or '.'", key=where
            )
        if not isinstance(block, Mapping):
            raise RecipeError(
                "must be a mapping {local, remote, split, proportion | repeat | choose}", key=where
            )
        allowed = STREAM_KEYS if weights else STREAM_KEYS[:3]
        for k in block:
            if k not in allowed:
                hint = (
                    "; an eval stream is its own evaluator and is read whole (eval_subset_num_batches limits it)"
                    if k in WEIGHT_KEYS
                    else f"; allowed keys: {', '.join(allowed)}"
                )
                raise RecipeError(f"unknown key {k!r}{hint}", key=f"{where}.{k}")
        for k, v in block.items():
            if v is None:
                continue
            if k in WEIGHT_KEYS and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RecipeError(f"must be a number, got {v!r}", key=f"{where}.{k}")
            if k == "choose" and not float(v).is_integer():
                raise RecipeError(f"is a number of samples: a whole number, got {v!r}", key=f"{where}.{k}")
            if k in ("local", "remote", "split") and not isinstance(v, str):
                raise RecipeError(f"must be a string, got {v!r}", key=f"{where}.{k}")
        if block.get("local") is None and block.get("remote") is None:
            raise RecipeError(
                "set `local:` (an MDS folder) or `remote:` (s3://..., gs://...)", key=f"{where}.local"
            )
        out[name] = dict(block)
    return out


def _weight_key(stream: Stream) -> str:
    for k in WEIGHT_KEYS:
        if getattr(stream, f"_{k}", None) is not None:
            return k
    return "proportion"


def _translate(e: ValueError, names: list[str], streams: list[Stream], default_key: str) -> RecipeError:
    """streaming's ValueError -> one RecipeError naming the stream and key it is about."""
    msg = first_line(e)
    m = re.search(r"error in stream (\d+)", msg)
    if m and int(m.group(1)) < len(names):
        i = int(m.group(1))
        fix = "; give every stream a proportion (relative), or every stream repeat/choose/nothing (absolute)"
        return RecipeError(msg + fix, key=f"streams.{names[i]}.{_weight_key(streams[i])}")
    if "Only provide `choose` when weighting streams relatively" in msg:
        return RecipeError(
            "epoch_size works with relative weights only (every stream a proportion); remove epoch_size or "
            "use proportions",
            key="epoch_size",
        )
    return RecipeError(msg, key=default_key)


def make_streams(blocks: Mapping[str, Mapping[str, Any]], **defaults: Any) -> list[Stream]:
    """One streaming ``Stream`` per recipe stream (``defaults``: download_retry, download_timeout)."""
    names, streams = list(blocks), []
    for name, block in blocks.items():
        kwargs = {k: v for k, v in block.items() if v is not None}
        if "choose" in kwargs:
            kwargs["choose"] = int(kwargs["choose"])
        if kwargs.get("local"):
            kwargs["local"] = os.path.expanduser(kwargs["local"])
        try:
            streams.append(Stream(**kwargs, **defaults))
        except ValueError as e:
            msg = first_line(e)
            m = re.search(r"`(\w+)`", msg)
            key = m.group(1) if m and m.group(1) in STREAM_KEYS else "proportion"
            raise RecipeError(msg, key=f"streams.{name}.{key}") from None
    try:
        Stream.validate_weights(streams)  # streaming's own rule, checked before any index is read
    except ValueError as e:
        raise _translate(e, names, streams, "streams") from None
    return streams


class MixtureDataset(StreamingDataset):
    """A StreamingDataset over several streams whose samples carry the index of their stream (``stream_id``)."""

    def __init__(self, *, stream_names: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.stream_names = list(stream_names)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The sample, tagged with its stream (the spanner maps sample -> shard, shards know their stream)."""
        sample = super().get_item(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        sample = dict(sample)
        sample[STREAM_KEY] = int(self.stream_per_shard[shard_id])
        return sample


def open_mixture(names: list[str], streams: list[Stream], **kwargs: Any) -> MixtureDataset:
    """``MixtureDataset(streams=...)``; streaming's weight errors (raised once sizes are known) name the stream."""
    try:
        return MixtureDataset(stream_names=names, streams=streams, **kwargs)
    except ValueError as e:
        raise _translate(e, names, streams, "streams") from None


class StreamTagCollator:
    """Wraps a collator: takes ``stream_id`` out of each sample, collates the rest, adds the ids as a tensor."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``samples``; ``batch['stream_id']`` holds their stream ids (a LongTensor)."""
        import torch

        ids = [s.pop(STREAM_KEY) for s in samples]
        batch = self.collate(samples)
        batch[STREAM_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch


class StreamTally:
    """A batch transform (main process): removes ``stream_id`` from a batch and keeps this batch's counts.

    ``last`` is (samples, tokens) per stream of the most recent batch; real tokens as the loader counts them
    (attention mask, else every position). The ``stream_counts`` callback adds them up and logs them.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.last: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __call__(self, batch: Any) -> Any:
        """``batch`` without ``stream_id``; its per-stream counts stored in ``last``."""
        if not isinstance(batch, dict) or STREAM_KEY not in batch:
            return batch
        ids = batch.pop(STREAM_KEY).cpu().numpy()
        mask = batch.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(dim=1).cpu().numpy()
        else:
            lengths = np.full(len(ids), batch["input_ids"].shape[-1])
        n = len(self.names)
        samples = np.bincount(ids, minlength=n).astype(np.int64)
        tokens = np.bincount(ids, weights=lengths, minlength=n).astype(np.int64)
        self.last = (samples, tokens)
        return batch
