"""Sources as the big corpora ship them: C4-shaped .json.gz shards, .jsonl.zst, Parquet, byte ranges, splits from
shard names; parallel conversion identical for any worker count; kill -9 and rerun gives the same bytes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmfoundry_lite.data.convert import convert, progress_line
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.errors import RecipeError

TRAIN_SHARDS, VAL_SHARDS = 4, 1


def _digest(folder) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


def _texts(split_dir) -> list[str]:
    """Every document of an MDS split, in order, decoded straight from its shards (index.json order)."""
    from llmfoundry_lite.data.inspect import shard_samples
    from llmfoundry_lite.data.loaders import read_index

    shards = read_index(str(split_dir))["shards"]
    return [s["text"] for sh in shards for s in shard_samples(str(split_dir), sh, sh["samples"])]


def _c4_row(i: int, text: str) -> str:
    return json.dumps(
        {"text": text, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z", "url": f"https://x.org/{i}"}
    )


def _shards(docs: list[str], n: int) -> list[list[str]]:
    per = -(-len(docs) // n)
    return [docs[k * per : (k + 1) * per] for k in range(n)]


@pytest.fixture(scope="module")
def c4(tmp_path_factory):
    """A C4-shaped folder (en/c4-train.0000k-of-00004.json.gz, en/c4-validation...) built from the embedded corpus."""
    docs = embedded_documents()
    val_docs, train_docs = docs[:60], docs[60:]
    root = tmp_path_factory.mktemp("c4")
    en = root / "en"
    en.mkdir()
    for name, split_docs, n in (("train", train_docs, TRAIN_SHARDS), ("validation", val_docs, VAL_SHARDS)):
        for k, shard in enumerate(_shards(split_docs, n)):
            with gzip.open(en / f"c4-{name}.{k:05d}-of-{n:05d}.json.gz", "wt", encoding="utf-8") as f:
                f.writelines(_c4_row(i, d) + "\n" for i, d in enumerate(shard))
    (root / "README.md").write_text("# C4\nA dataset card, not a document.\n")
    return root, train_docs, val_docs


def test_c4_json_gz_shards_convert_to_exactly_their_documents(c4, tmp_path):
    root, train_docs, val_docs = c4
    s = convert(str(root / "en"), tmp_path / "out", num_workers=2)
    assert (s.units, s.workers) == (TRAIN_SHARDS + VAL_SHARDS, 2)
    # The validation shard is the val split (not a held-out sample of train), documents in shard order.
    assert _texts(tmp_path / "out" / "train") == train_docs
    assert _texts(tmp_path / "out" / "val") == val_docs
    assert (s.splits["train"].documents, s.splits["val"].documents) == (len(train_docs), len(val_docs))
    index = json.load(open(tmp_path / "out" / "train" / "index.json"))  # one index over the shards' folders
    assert [sh["raw_data"]["basename"].split("/")[0] for sh in index["shards"]] == [
        "00000",
        "00001",
        "00002",
        "00003",
    ]
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no work folder left
    # A glob of train shards (quoted, as a user types it); the README of the folder above is never a document.
    s = convert(str(root / "en" / "c4-train.*.json.gz"), tmp_path / "glob", splits="train", num_workers=0)
    assert _texts(tmp_path / "glob" / "train") == train_docs
    convert(str(root), tmp_path / "root", splits="val", num_workers=0)
    assert _texts(tmp_path / "root" / "val") == val_docs


def test_output_is_identical_for_any_number_of_workers(c4, tmp_path, llama_tokenizer_dir):
    root, _, _ = c4
    kw = dict(tokenizer=llama_tokenizer_dir, concat_tokens=64, compression="zstd")
    s0 = convert(str(root / "en"), tmp_path / "w0", num_workers=0, **kw)
    s2 = convert(str(root / "en"), tmp_path / "w2", num_workers=2, **kw)
    for split in ("train", "val"):
        assert _digest(tmp_path / "w0" / split) == _digest(tmp_path / "w2" / split)
    # The units' leftover tokens are packed at the end: no token is lost between shards but the last partial row.
    train = s2.splits["train"]
    assert train.samples == train.tokens // 64 and s0.splits["train"].tokens == train.tokens


def test_jsonl_zst_and_parquet_convert_to_exactly_their_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = embedded_documents()[:300]
    # RedPajama-style .jsonl.zst, written as several zstd frames (streamed compressors do that).
    zst = tmp_path / "rp" / "arxiv_0.jsonl.zst"
    zst.parent.mkdir()
    with open(zst, "wb") as f:
        for part in _shards(docs, 3):
            f.write(
                zstandard.ZstdCompressor().compress(
                    "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
                )
            )
    convert(str(zst), tmp_path / "zst", splits="train")
    assert _texts(tmp_path / "zst" / "train") == docs
    # FineWeb-style Parquet shards with extra columns, in a folder with their split in the folder name.
    fw = tmp_path / "fineweb" / "train"
    fw.mkdir(parents=True)
    for k, part in enumerate(_shards(docs, 2)):
        pq.write_table(
            pa.table({"text": part, "id": [f"<urn:{k}:{i}>" for i in range(len(part))]}),
            fw / f"{k:03d}.parquet",
        )
    s = convert(str(tmp_path / "fineweb"), tmp_path / "pq", splits="train", num_workers=2)
    assert _texts(tmp_path / "pq" / "train") == docs and s.units == 2
    # --text-field for another name (a Dolma-style .json.gz with the document under `content`).
    dolma = tmp_path / "dolma.json.gz"
    with gzip.open(dolma, "wt") as f:
        f.writelines(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs))
    convert(str(dolma), tmp_path / "dolma", splits="train", text_field="content")
    assert _texts(tmp_path / "dolma" / "train") == docs
    with pytest.raises(RecipeError, match="line 1 has no field 'text'.*set --text-field"):
        convert(str(dolma), tmp_path / "dolma2", splits="train")


def test_one_big_jsonl_converts_as_byte_ranges(tmp_path):
    docs = embedded_documents()
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    s = convert(str(src), tmp_path / "r", splits="train", range_bytes=40_000, num_workers=2)
    assert s.units == -(-src.stat().st_size // 40_000) > 5
    assert _texts(tmp_path / "r" / "train") == docs  # every line once, in order, none cut at a range edge


def _truncated_gzip(path, docs) -> int:
    data = gzip.compress("".join(_c4_row(i, d) + "\n" for i, d in enumerate(docs)).encode())
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def test_truncated_or_unknown_compression_is_one_line_and_leaves_no_split(c4, tmp_path):
    root, _, _ = c4
    src = tmp_path / "src"
    src.mkdir()
    for f in (root / "en").glob("c4-train.*"):
        (src / f.name).write_bytes(f.read_bytes())
    cut = _truncated_gzip(src / "c4-train.00004-of-00005.json.gz", embedded_documents()[:200])
    with pytest.raises(RecipeError) as e:
        convert(str(src), tmp_path / "out", splits="train", num_workers=2)
    msg = str(e.value)
    assert "c4-train.00004-of-00005.json.gz' at byte " in msg and "truncated" in msg and "\n" not in msg
    assert 0 < int(msg.split(" at byte ")[1].split(":")[0]) <= cut
    assert os.listdir(tmp_path / "out") == []  # no split, no work folder
    (src / "c4-train.00004-of-00005.json.gz").unlink()
    (src / "c4-train.00005-of-00005.json.lz4").write_bytes(b"\x04\x22\x4d\x18" + b"\0" * 64)
    with pytest.raises(RecipeError, match=r"json.lz4' at byte 0: lz4 compression is not read here"):
        convert(str(src), tmp_path / "out", splits="train")
    zst = tmp_path / "cut.jsonl.zst"
    import zstandard

    whole = zstandard.ZstdCompressor().compress(b'{"text": "a document"}\n' * 5000)
    zst.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RecipeError, match=r"cut.jsonl.zst' at byte \d+: zstd stream is truncated"):
        convert(str(zst), tmp_path / "out", splits="train")


def test_split_names_and_skipped_files(tmp_path):
    src = tmp_path / "ds"
    src.mkdir()
    for name in ("data-train-00.jsonl", "data-val-00.jsonl", "data-test-00.jsonl"):
        (src / name).write_text(json.dumps({"text": f"from {name}"}) + "\n")
    s = convert(str(src), tmp_path / "out", num_workers=0)
    assert _texts(tmp_path / "out" / "val") == ["from data-val-00.jsonl"]
    assert "data-test-00.jsonl" in s.format()  # named as not converted
    (src / "extra.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(RecipeError, match="extra.jsonl' has no split in its name"):
        convert(str(src), tmp_path / "out2")


def test_hf_local_folder_with_config(c4, tmp_path):
    root, train_docs, val_docs = c4
    s = convert(f"hf:{root}:en", tmp_path / "out", num_workers=0)
    assert (s.splits["train"].documents, s.splits["val"].documents) == (len(train_docs), len(val_docs))
    with pytest.raises(RecipeError, match="has no sub-folder 'de'.*sub-folders: en"):
        convert(f"hf:{root}:de", tmp_path / "out2")


def test_progress_redraws_on_a_terminal_and_logs_lines_in_a_file(monkeypatch):
    import io

    from llmfoundry_lite.data import convert as C

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = [100.0]
    monkeypatch.setattr(C.time, "perf_counter", lambda: clock[0])
    for stream in (Tty(), io.StringIO()):
        bar = C._Bar(True, 1000, stream)
        for k in range(1, 121):  # a minute of updates, every half second
            clock[0] += 0.5
            bar.show(k, 0, k)
        bar.show(120, 0, 1000, final=True)
        bar.close()
        text = stream.getvalue()
        if isinstance(stream, Tty):  # 120 redraws of one line, then the final one and a newline
            assert text.count("\r") == 121 and text.count("\n") == 1
        else:  # a line after 30 s and 60 s, and the final one; no carriage returns
            assert "\r" not in text and len(text.splitlines()) == 3
        assert text.rstrip().splitlines()[-1].lstrip("\r").startswith("120 docs") and "100% of" in text


def test_progress_line_has_rates_and_eta():
    line = progress_line(docs=5000, tokens=0, done=50_000_000, total=200_000_000, elapsed=10.0)
    assert line == "5,000 docs, 500 docs/s, 5.0 MB/s, 25% of 200.0 MB, ETA 0:30"


KILL_CMD = [
    sys.executable,
    "-m",
    "llmfoundry_lite.data.cli",
    "convert",
    "--num-workers",
    "2",
    "--no-progress",
]


@pytest.mark.timeout(600)  # three conversions of 12 shards in fresh processes
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_conversion_resumes_to_identical_bytes(tmp_path, llama_tokenizer_dir, sig):
    docs = embedded_documents()
    src = tmp_path / "src"
    src.mkdir()
    n_shards = 12
    for k in range(n_shards):  # shard k: the corpus rotated by k, so every shard differs
        rot = docs[k * 7 :] + docs[: k * 7]
        with gzip.open(src / f"web-train.{k:05d}.json.gz", "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in rot)
    args = ["--source", str(src), "--tokenizer", llama_tokenizer_dir, "--concat-tokens", "128"]
    ref = subprocess.run([*KILL_CMD, *args, "--out", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*KILL_CMD, *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(out.glob(".convert-*/units/0*"))
        if done:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be killed"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:  # stopped, said so, and not reported a success
        assert proc.returncode == 130, err[-2000:]
        assert err.decode().replace("\r", "\n").strip().splitlines()[-1] == (
            "interrupted: run the same command again to continue from the units it finished"
        )
    time.sleep(1.0)  # the workers get SIGTERM when their parent dies
    finished = {p.name for p in out.glob(".convert-*/units/0*")}
    assert 0 < len(finished) < n_shards and not (out / "train").exists()

    again = subprocess.run([*KILL_CMD, *args, "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    kept = int(again.stdout.split(" unit(s) kept from an interrupted run")[0].rsplit(" ", 1)[1])
    assert kept >= len(finished)
    for split in ("train", "val"):
        assert _digest(out / split) == _digest(tmp_path / "ref" / split)


@pytest.mark.parametrize("workers", [2, 0])
def test_cli_progress_shows_rates_and_eta(c4, tmp_path, workers):
    root, _, _ = c4
    r = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.data.cli", "convert", "--source", str(root / "en"), "--out",
         str(tmp_path / "o"), "--num-workers", str(workers), "--progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr  # stderr is a pipe here: plain lines, not a redrawn bar
    last = r.stderr.strip().splitlines()[-1]
    assert "docs/s" in last and "MB/s" in last and "100% of" in last and "ETA 0:00" in last
    assert f"5 unit(s), {workers or 'no'} worker process(es)" in r.stdout


def test_compressed_reader_names_line_of_bad_json(tmp_path):
    src = tmp_path / "bad.jsonl.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(b'{"text": "ok"}\n{"text": broken\n')
    src.write_bytes(buf.getvalue())
    with pytest.raises(RecipeError, match=r"bad.jsonl.gz' line 2: invalid JSON"):
        convert(str(src), tmp_path / "o", splits="train")
