"""`data convert` / `data inspect` / `data tokenizer`: every source kind, both modes, determinism, errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from llmfoundry_lite.data.cli import data_app
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.data.inspect import inspect_dataset
from llmfoundry_lite.data.sources import split_long
from llmfoundry_lite.errors import RecipeError


def _digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


def _texts(split_dir) -> list[str]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)
    return [ds[i]["text"] for i in range(len(ds))]


@pytest.fixture(scope="module")
def docs():
    return [f"Document number {i}. " + " ".join(f"word{j}" for j in range(20 + i % 7)) for i in range(40)]


def test_embedded_raw_mode_has_text_column_and_holdout(tmp_path):
    s = convert("embedded", tmp_path, splits="train,val", val_fraction=0.1, seed=3)
    n = len(embedded_documents())
    assert s.splits["train"].documents + s.splits["val"].documents == n
    assert abs(s.splits["val"].documents - round(0.1 * n)) <= 1  # stratified sampling: exact fraction
    index = json.load(open(tmp_path / "val" / "index.json"))
    assert index["shards"][0]["column_names"] == ["text"]
    val, train = _texts(tmp_path / "val"), _texts(tmp_path / "train")
    assert sorted(val + train) == sorted(embedded_documents())  # every document once, in one split


def test_text_file_one_document_per_paragraph(tmp_path, docs):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    convert(str(src), tmp_path / "out", splits="train")
    assert _texts(tmp_path / "out" / "train") == docs


def test_folder_of_text_files_one_document_per_file(tmp_path, docs):
    folder = tmp_path / "src"
    folder.mkdir()
    for i, d in enumerate(docs[:5]):
        (folder / f"{i:02d}.txt").write_text(d + "\n\nsecond paragraph")
    convert(str(folder), tmp_path / "out", splits="train")
    assert _texts(tmp_path / "out" / "train") == [d + "\n\nsecond paragraph" for d in docs[:5]]


def test_jsonl_with_custom_field(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    convert(str(src), tmp_path / "out", splits="train", text_field="body")
    assert _texts(tmp_path / "out" / "train") == docs


def test_parquet(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    convert(str(tmp_path / "c.parquet"), tmp_path / "out", splits="train")
    assert _texts(tmp_path / "out" / "train") == docs


def test_hf_source_through_datasets_uses_source_splits(tmp_path, docs):
    # `hf:NAME` with NAME a local folder exercises the same datasets streaming path as a hub dataset.
    src = tmp_path / "ds"
    src.mkdir()
    (src / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    (src / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    s = convert(f"hf:{src}", tmp_path / "out")
    assert (s.splits["train"].documents, s.splits["val"].documents) == (30, 10)
    assert _texts(tmp_path / "out" / "val") == docs[30:]


def test_hf_unreachable_dataset_is_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="hf:no-such-org-xyz/ds"):
        convert("hf:no-such-org-xyz/ds", tmp_path / "out")


def test_concat_mode_rows_bos_eos_and_worker_independence(tmp_path, llama_tokenizer_dir):
    from streaming import StreamingDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    s0 = convert(
        "embedded",
        tmp_path / "w0",
        tokenizer=llama_tokenizer_dir,
        concat_tokens=64,
        num_workers=0,
        compression="zstd",
    )
    s2 = convert(
        "embedded",
        tmp_path / "w2",
        tokenizer=llama_tokenizer_dir,
        concat_tokens=64,
        num_workers=2,
        compression="zstd",
    )
    for split in ("train", "val"):
        assert _digest(tmp_path / "w0" / split) == _digest(tmp_path / "w2" / split)
    assert any(f.endswith(".zstd") for f in _digest(tmp_path / "w0" / "train"))
    train = s0.splits["train"]
    assert train.samples == train.tokens // 64 and s2.splits["train"].tokens == train.tokens
    ds = StreamingDataset(local=str(tmp_path / "w0" / "val"), shuffle=False, batch_size=1)
    flat = np.concatenate([ds[i]["tokens"] for i in range(len(ds))])
    assert ds[0]["tokens"].dtype == np.int32 and ds[0]["tokens"].shape == (64,)
    # Documents are wrapped as <s> ... </s> and concatenated.
    assert flat[0] == tok.bos_token_id
    ends = np.flatnonzero(flat == tok.eos_token_id)
    assert len(ends) > 3 and all(flat[e + 1] == tok.bos_token_id for e in ends if e + 1 < len(flat))
    first_doc = tok.decode(flat[1 : ends[0]].tolist())
    assert first_doc.startswith(embedded_documents()[_first_val_index()][:40])


def _first_val_index() -> int:
    from llmfoundry_lite.data.holdout import HoldOut

    hold = HoldOut(0.05, 17)
    return next(i for i in range(10_000) if hold.is_val())


def test_no_bos_no_eos(tmp_path, llama_tokenizer_dir):
    from streaming import StreamingDataset

    convert(
        "embedded",
        tmp_path,
        splits="train",
        tokenizer=llama_tokenizer_dir,
        concat_tokens=32,
        bos=False,
        eos=False,
        num_workers=0,
    )
    ds = StreamingDataset(local=str(tmp_path / "train"), shuffle=False, batch_size=1)
    flat = np.concatenate([ds[i]["tokens"] for i in range(20)])
    assert not np.isin(flat, [1, 2]).any()


def test_eos_requested_but_missing(tmp_path, bert_tokenizer_dir):
    with pytest.raises(RecipeError, match="no eos token"):
        convert("embedded", tmp_path, tokenizer=bert_tokenizer_dir, concat_tokens=32, eos=True)
    # Packing needs a document separator: a tokenizer without eos/bos is refused unless asked explicitly.
    with pytest.raises(RecipeError, match="no eos .*--no-eos"):
        convert("embedded", tmp_path, tokenizer=bert_tokenizer_dir, concat_tokens=32)
    s = convert(
        "embedded",
        tmp_path,
        splits="train",
        tokenizer=bert_tokenizer_dir,
        concat_tokens=32,
        eos=False,
        num_workers=0,
    )
    assert s.splits["train"].samples > 0


def test_wordpiece_packs_with_separator_texts(tmp_path, bert_tokenizer_dir, bert_tok):
    """A tokenizer without BOS/EOS packs with texts between documents, as llm-foundry's --bos_text/--eos_text."""
    from streaming import StreamingDataset

    assert bert_tok.eos_token is None and bert_tok.bos_token is None  # refused without them (test above)
    s = convert(
        "embedded",
        tmp_path / "wp",
        splits="train",
        tokenizer=bert_tokenizer_dir,
        concat_tokens=32,
        bos_text="[CLS]",
        eos_text="[SEP]",
        num_workers=2,  # the separators travel to the worker processes
    )
    ds = StreamingDataset(local=str(tmp_path / "wp" / "train"), shuffle=False, batch_size=1)
    flat = np.concatenate([ds[i]["tokens"] for i in range(len(ds))])
    assert len(flat) == s.splits["train"].samples * 32
    # [CLS] doc [SEP] [CLS] doc [SEP] ...: every document wrapped, no other special token in between.
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    starts, ends = np.flatnonzero(flat == cls), np.flatnonzero(flat == sep)
    assert flat[0] == cls and len(starts) > 100 and len(ends) >= len(starts) - 1
    assert all(flat[e + 1] == cls for e in ends if e + 1 < len(flat))
    first = bert_tok(embedded_documents()[0], add_special_tokens=False)["input_ids"]
    assert flat[1 : 1 + len(first)].tolist() == first and flat[1 + len(first)] == sep
    # A separator text of several tokens is inserted whole (tokenized without special tokens).
    convert(
        "embedded", tmp_path / "multi", splits="train", tokenizer=bert_tokenizer_dir, concat_tokens=32,
        eos_text="the end", num_workers=0,
    )  # fmt: skip
    ds = StreamingDataset(local=str(tmp_path / "multi" / "train"), shuffle=False, batch_size=1)
    flat = np.concatenate([ds[i]["tokens"] for i in range(len(first) // 32 + 2)]).tolist()
    end = bert_tok("the end", add_special_tokens=False)["input_ids"]
    assert len(end) == 2 and flat[len(first) : len(first) + 2] == end and flat[: len(first)] == first


@pytest.mark.parametrize(
    "kwargs, key, match",
    [
        ({"eos_text": "[SEP]"}, "--eos-text", "needs --concat-tokens"),
        ({"concat_tokens": 32, "eos_text": ""}, "--eos-text", "is empty"),
        ({"concat_tokens": 32, "eos_text": "[SEP]", "eos": False}, "--eos-text", "contradict"),
        ({"concat_tokens": 32, "bos_text": "   "}, "--bos-text", "gives no tokens"),
    ],
)
def test_separator_text_mistakes(tmp_path, bert_tokenizer_dir, kwargs, key, match):
    with pytest.raises(RecipeError, match=match) as e:
        convert("embedded", tmp_path, tokenizer=bert_tokenizer_dir, num_workers=0, **kwargs)
    assert e.value.key == key


def test_cli_separator_texts(tmp_path, bert_tokenizer_dir, bert_tok):
    args = ["convert", "--source", "embedded", "--out", str(tmp_path / "d"), "--splits", "train"]
    args += [
        "--tokenizer",
        bert_tokenizer_dir,
        "--concat-tokens",
        "16",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    r = CliRunner().invoke(data_app, [*args, "--bos-text", "[CLS]", "--eos-text", "[SEP]"])
    assert r.exit_code == 0, r.output
    report = inspect_dataset(str(tmp_path / "d"), samples=1, tokenizer=bert_tokenizer_dir)
    assert "[CLS]" in report and "ndarray:int32:16" in report


def test_deterministic_for_seed(tmp_path):
    convert("embedded", tmp_path / "a", seed=5)
    convert("embedded", tmp_path / "b", seed=5)
    convert("embedded", tmp_path / "c", seed=6)
    assert _digest(tmp_path / "a" / "val") == _digest(tmp_path / "b" / "val")
    assert _digest(tmp_path / "a" / "train") == _digest(tmp_path / "b" / "train")
    assert _texts(tmp_path / "a" / "val") != _texts(tmp_path / "c" / "val")


def test_max_chars_splits_long_documents():
    doc = "para one is here.\n\n" + "x" * 50 + " " + "y" * 50 + "\n\nlast"
    pieces = split_long(doc, 60)
    assert all(len(p) <= 60 for p in pieces) and "".join(pieces).replace("\n", "").replace(" ", "") == (
        doc.replace("\n", "").replace(" ", "")
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "/definitely/missing.txt"}, "does not exist"),
        ({"source": "EMPTY"}, "is empty"),
        ({"source": "embedded", "concat_tokens": 64}, "needs --tokenizer"),
        (
            {"source": "embedded", "tokenizer": "./no/such/tokenizer", "concat_tokens": 64},
            "no/such/tokenizer",
        ),
        ({"source": "embedded", "splits": "train,test"}, "unknown split"),
        ({"source": "embedded", "compression": "lzma9"}, "unknown compression"),
    ],
)
def test_bad_input(tmp_path, kwargs, match):
    if kwargs["source"] == "EMPTY":
        (tmp_path / "empty.txt").write_text("")
        kwargs = {**kwargs, "source": str(tmp_path / "empty.txt")}
    with pytest.raises(RecipeError, match=match):
        convert(out=tmp_path / "out", **kwargs)


def _folder(path, docs, bad: bool):
    path.mkdir()
    for i, d in enumerate(docs):
        (path / f"{i:03d}.txt").write_text(d)
    if bad:  # read last, after the other files were written to shards
        (path / "zzz.txt").write_bytes(b"valid start \xff\xfe\xfa not utf-8")
    return str(path)


def test_failed_conversion_leaves_no_half_written_split(tmp_path, docs):
    out = tmp_path / "out"
    convert(_folder(tmp_path / "good", docs, bad=False), out, splits="train")
    before = _digest(out / "train")
    bad = _folder(tmp_path / "bad", docs * 5, bad=True)
    with pytest.raises(RecipeError, match="cannot read .*zzz.txt' at byte 12: not UTF-8"):
        convert(bad, out, splits="train")
    assert _digest(out / "train") == before  # the old complete split is untouched
    assert sorted(os.listdir(out)) == ["train"]  # and no temporary folder is left behind
    with pytest.raises(RecipeError):
        convert(bad, tmp_path / "fresh", splits="train")
    assert not (tmp_path / "fresh" / "train").exists()


# A SIGTERM handler that only records (what a training process or a test runner may have installed). Workers
# forked from such a process inherited it and ignored Pool.terminate(), whose join() then waited forever.
POOL_SHUTDOWN = """
import signal, sys
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.errors import RecipeError

signal.signal(signal.SIGTERM, lambda signum, frame: None)
tok, out, bad = sys.argv[1:4]
for i in range(5):
    convert("embedded", f"{out}/{i}", splits="train,val", tokenizer=tok, concat_tokens=128, num_workers=2)
try:
    convert(bad, f"{out}/bad", splits="train", tokenizer=tok, concat_tokens=16, num_workers=2)
except RecipeError as e:
    print("failed as expected:", e)
else:
    sys.exit("the bad source converted")
"""


def test_worker_pool_shuts_down_in_a_process_with_a_sigterm_handler(tmp_path, llama_tokenizer_dir, docs):
    bad = _folder(tmp_path / "bad", docs * 5, bad=True)
    cmd = [sys.executable, "-c", POOL_SHUTDOWN, llama_tokenizer_dir, str(tmp_path / "out"), bad]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed as expected: --source: cannot read" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "out" / "bad" / "train").exists()


def test_jsonl_missing_field_names_field(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(RecipeError, match="no field 'text'.*--text-field"):
        convert(str(src), tmp_path / "out", splits="train")


def test_cli_convert_inspect_tokenizer(tmp_path, llama_tokenizer_dir):
    runner = CliRunner()
    r = runner.invoke(
        data_app,
        [
            "convert",
            "--source",
            "embedded",
            "--out",
            str(tmp_path / "d"),
            "--tokenizer",
            llama_tokenizer_dir,
            "--concat-tokens",
            "64",
            "--num-workers",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "train:" in r.output and "tokens" in r.output and "shard" in r.output and "MB" in r.output
    report = inspect_dataset(str(tmp_path / "d"), samples=2, tokenizer=llama_tokenizer_dir)
    assert "train:" in report and "val:" in report and "ndarray:int32:64" in report and "<s>" in report
    r = runner.invoke(
        data_app,
        [
            "tokenizer",
            "--train",
            "--kind",
            "wordpiece",
            "--vocab-size",
            "300",
            "--source",
            "embedded",
            "--out",
            str(tmp_path / "tok"),
        ],
    )
    assert r.exit_code == 0, r.output
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).mask_token == "[MASK]"
    r = runner.invoke(data_app, ["inspect", str(tmp_path / "d" / "val")])
    assert r.exit_code == 0 and "ids [" in r.output


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmfoundry_lite.data.cli",
            "convert",
            "--source",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_lazy_streaming_import_keeps_streaming_usable(tmp_path):
    # `data convert` imports MDSWriter without streaming's package __init__; the rest of streaming must still
    # work afterwards in the same process (fresh interpreter: in pytest streaming may already be imported).
    # Two shards, converted in this process: every unit's writer, not only the first, skips the package __init__.
    from llmfoundry_lite.data.corpus import embedded_documents

    docs, src = embedded_documents(), tmp_path / "src"
    src.mkdir()
    for k in range(2):
        (src / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::2]))
    code = (
        "import sys\n"
        "from llmfoundry_lite.compat import import_mds_writer\nfrom llmfoundry_lite.data.convert import convert\n"
        f"s = convert({str(src)!r}, {str(tmp_path)!r}, splits='train', num_workers=0)\n"
        "assert s.units == 2, s.units\n"
        "assert 'transformers' not in sys.modules, 'a unit after the first imported all of streaming'\n"
        "import streaming\n"
        "from streaming import MDSWriter, StreamingDataset\n"
        "assert import_mds_writer() is MDSWriter is streaming.base.format.mds.writer.MDSWriter\n"
        f"ds = StreamingDataset(local={str(tmp_path / 'train')!r}, batch_size=1)\n"
        "assert len(ds) > 100 and isinstance(ds[0]['text'], str)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_split_routing():
    from llmfoundry_lite.data.holdout import Router

    def route(unit_split, wanted, hold_out):
        r = Router(unit_split, wanted, hold_out, 0.1, 1)
        return [r.route() for _ in range(40)]

    held = [i for i, s in enumerate(route(None, ["train", "val"], True)) if s == "val"]
    assert len(held) == 4
    only_val = route(None, ["val"], True)  # --splits val: only the held-out part
    assert [i for i, s in enumerate(only_val) if s == "val"] == held and set(only_val) == {"val", None}
    assert set(route(None, ["train"], False)) == {"train"}
    hub_train = route("train", ["train", "val"], True)  # hub dataset without a val split
    assert [i for i, s in enumerate(hub_train) if s == "val"] == held
    assert set(route("val", ["train", "val"], False)) == {"val"}  # the source's own val split
    assert set(route("val", ["train"], False)) == {None}
