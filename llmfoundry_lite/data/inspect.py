"""Look into an MDS dataset: splits, sample counts, sizes, columns and the first few samples, decoded."""

from __future__ import annotations

import os
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError


def shard_samples(split_path: str, shard: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of one shard (an entry of index.json), decompressing in memory when only the zip
    file is there; no StreamingDataset (and none of its shared memory) involved."""
    import numpy as np
    from streaming.base.compression import decompress
    from streaming.base.format.mds.encodings import mds_decode

    raw = shard["raw_data"]
    raw_file = os.path.join(split_path, raw["basename"])
    if os.path.isfile(raw_file):
        with open(raw_file, "rb") as f:
            data = f.read()
    else:
        with open(os.path.join(split_path, shard["zip_data"]["basename"]), "rb") as f:
            data = decompress(shard["compression"], f.read())
    count = int(np.frombuffer(data[:4], np.uint32)[0])
    offsets = np.frombuffer(data[4 : 4 + 4 * (count + 1)], np.uint32)
    out = []
    for i in range(min(n, count)):
        sample_bytes = data[offsets[i] : offsets[i + 1]]
        idx = 0
        sample = {}
        sizes = []
        for size in shard["column_sizes"]:
            if size is None:
                size = int(np.frombuffer(sample_bytes[idx : idx + 4], np.uint32)[0])
                idx += 4
            sizes.append(size)
        for name, enc, size in zip(shard["column_names"], shard["column_encodings"], sizes):
            sample[name] = mds_decode(enc, sample_bytes[idx : idx + size])
            idx += size
        out.append(sample)
    return out


def labelled_text(sample: dict[str, Any], decode: Any) -> str:
    """A finetuning example (or packed row) decoded, the tokens the loss is on in [[ ]], packed examples apart by
    ' || '; without a tokenizer, its counts."""
    ids, labels = [int(t) for t in sample["input_ids"]], [int(t) for t in sample["labels"]]
    if decode is None:
        return f"{len(ids)} tokens, {sum(lab != -100 for lab in labels)} labelled (--tokenizer shows them)"
    seq = [int(t) for t in sample["sequence_id"]] if "sequence_id" in sample else [0] * len(ids)
    parts: list[str] = []
    run: list[int] = []
    on = False

    def flush() -> None:
        if run:
            text = decode(run, skip_special_tokens=False)
            parts.append(f"[[{text}]]" if on else text)
            run.clear()

    for t, (i, lab) in enumerate(zip(ids, labels)):
        boundary = t > 0 and seq[t] != seq[t - 1]
        if boundary or (lab != -100) != on:
            flush()
        if boundary:
            parts.append(" || ")
        run.append(i)
        on = lab != -100
    flush()
    return "".join(parts)


def inspect_dataset(path: str, samples: int = 3, tokenizer: Optional[str] = None, chars: int = 300) -> str:
    """Counts (samples, shards, bytes, columns) of each split under ``path`` and a few decoded samples."""
    from llmfoundry_lite.data.loaders import columns, read_index

    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise RecipeError(f"dataset folder {path!r} does not exist")
    if os.path.isfile(os.path.join(root, "index.json")):
        split_paths = [(os.path.basename(os.path.normpath(root)), root)]
    else:
        split_paths = [
            (d, os.path.join(root, d))
            for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, "index.json"))
        ]
        if not split_paths:
            raise RecipeError(f"no index.json in {path!r} or its sub-folders; it is not an MDS dataset")
    decode = None
    if tokenizer:
        from tokenizers import Tokenizer

        from llmfoundry_lite.data.tokenizers import load_fast_tokenizer

        decode = Tokenizer.from_str(load_fast_tokenizer(tokenizer).json).decode
    lines = []
    for name, sp in split_paths:
        index = read_index(sp)
        shards = index["shards"]
        n_samples = sum(s["samples"] for s in shards)
        n_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(sp) for f in files)
        cols = ", ".join(f"{k}: {v}" for k, v in columns(index).items())
        comp = shards[0].get("compression") if shards else None
        lines.append(
            f"{name}: {n_samples:,} samples, {len(shards)} shard(s), {n_bytes / 1e6:.2f} MB"
            f"{f', {comp}' if comp else ''} - columns {cols}"
        )
        if n_samples and "tokens" in columns(index):
            lines[-1] += f" - {n_samples * len(shard_samples(sp, shards[0], 1)[0]['tokens']):,} tokens"
        for i, sample in enumerate(shard_samples(sp, shards[0], samples) if shards else []):
            if "text" in sample:
                shown = str(sample["text"])
            elif "tokens" in sample:
                ids = [int(t) for t in sample["tokens"]]
                shown = decode(ids, skip_special_tokens=False) if decode else f"ids {ids[:32]}..."
            elif "labels" in sample:
                shown = labelled_text(sample, decode)
            else:
                shown = repr(sample)
            shown = shown[:chars].replace("\n", "\\n")
            lines.append(f"  [{i}] {shown}")
    return "\n".join(lines)
