"""Corpora as users really download them: the byte-level quirks of real shards (BOMs, CRLF, pzstd and
`--long` zstd frames, FineWeb Parquet, Git LFS pointers, half-named split layouts, links), each converted
with the real reader and writer and read back document by document, or refused in one line naming the file."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys

import pytest

from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.data.sources import plan_source
from llmfoundry_lite.errors import RecipeError

DOCS = [f"Document {i}.\nTwo lines, ünïcødé and 😀 ({'x' * (i * 37 % 200)})." for i in range(60)]


def _texts(split_dir) -> list[str]:
    from llmfoundry_lite.data.inspect import shard_samples
    from llmfoundry_lite.data.loaders import read_index

    shards = read_index(str(split_dir))["shards"]
    return [s["text"] for sh in shards for s in shard_samples(str(split_dir), sh, sh["samples"])]


def _jsonl(docs, **extra) -> bytes:
    return "".join(json.dumps({"text": d, **extra}) + "\n" for d in docs).encode()


def _converts_to(src, out, docs, **kw) -> None:
    kw.setdefault("splits", "train")
    convert(str(src), out, num_workers=0, **kw)
    assert _texts(out / "train") == docs


def _refused(src, out, pattern: str, **kw) -> str:
    """The one-line error of converting ``src``; nothing is left in ``out``."""
    with pytest.raises(RecipeError, match=pattern) as e:
        convert(str(src), out, splits="train", num_workers=0, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() or os.listdir(out) == []
    return str(e.value)


def test_bom_crlf_blank_lines_and_no_final_newline(tmp_path):
    a, b = DOCS[:30], DOCS[30:]
    body = (
        "\ufeff"
        + "\r\n".join(json.dumps({"text": d}) for d in a)
        + "\r\n\r\n\n"
        + "\n".join(json.dumps({"text": d}) for d in b)  # no newline after the last row
    ).encode()
    (tmp_path / "win.jsonl").write_bytes(body)
    _converts_to(tmp_path / "win.jsonl", tmp_path / "o1", DOCS)
    (tmp_path / "win.jsonl.gz").write_bytes(gzip.compress(body))
    _converts_to(tmp_path / "win.jsonl.gz", tmp_path / "o2", DOCS)
    # A JSON array export with a BOM, and a text file with one: the BOM is not part of the first document.
    (tmp_path / "arr.json").write_bytes(
        ("\ufeff" + json.dumps([{"text": d} for d in DOCS], indent=1)).encode()
    )
    _converts_to(tmp_path / "arr.json", tmp_path / "o3", DOCS)
    # Windows line ends in a text file are "\n" in its documents, as Python's text mode reads them.
    (tmp_path / "notes.txt").write_bytes(("\ufeff" + "\n\n".join(DOCS)).replace("\n", "\r\n").encode())
    convert(str(tmp_path / "notes.txt"), tmp_path / "o4", splits="train", num_workers=0)
    assert _texts(tmp_path / "o4" / "train") == DOCS
    # CRLF rows of a big file cut into byte ranges (some cut between "\r" and "\n"): each row once.
    (tmp_path / "big.jsonl").write_bytes(body)
    for rb in (97, 1000):
        s = convert(
            str(tmp_path / "big.jsonl"), tmp_path / f"r{rb}", splits="train", num_workers=0, range_bytes=rb
        )
        assert s.units > 10 and _texts(tmp_path / f"r{rb}" / "train") == DOCS
    # A big file cut into byte ranges: the BOM does not turn it from an array into lines, nor lines into garbage.
    (tmp_path / "big.json").write_bytes(("\ufeff" + json.dumps([{"text": d} for d in DOCS])).encode())
    s = convert(str(tmp_path / "big.json"), tmp_path / "o5", splits="train", num_workers=0, range_bytes=1000)
    assert s.units == 1 and _texts(tmp_path / "o5" / "train") == DOCS


def test_half_of_a_surrogate_pair_is_written_as_a_replacement_character(tmp_path, llama_tokenizer_dir):
    # `"\ud83d"` alone (an emoji cut in two by a crawler) is valid JSON but cannot be written as UTF-8.
    src = tmp_path / "web.jsonl"
    src.write_bytes(_jsonl(DOCS[:3]) + b'{"text": "cut \\ud83d here, whole \\ud83d\\ude00"}\n')
    _converts_to(src, tmp_path / "o", [*DOCS[:3], "cut \ufffd here, whole 😀"])
    # Finetuning rows too (the tokenizer refuses such a string as well).
    rows = tmp_path / "chat.jsonl"
    rows.write_bytes(b'{"prompt": "Say \\udc00 it", "response": "cut \\ud83d"}\n' * 4)
    s = convert(str(rows), tmp_path / "ft", splits="train", num_workers=0, finetune=True,
                tokenizer=llama_tokenizer_dir, max_seq_len=64)  # fmt: skip
    assert s.splits["train"].documents == 4


def _skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def test_zstd_with_a_large_window_and_skippable_frames(tmp_path):
    import zstandard

    # `zstd --long=30` on a stream (no content size in the header): a 1 GiB window, over the library default.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30, write_content_size=False)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(_jsonl(DOCS[:30]))
    assert zstandard.get_frame_parameters(buf.getvalue()).window_size == 1 << 30
    # pzstd writes a skippable frame before each frame, so the file does not begin with the zstd magic.
    plain = zstandard.ZstdCompressor().compress(_jsonl(DOCS[30:]))
    (tmp_path / "p.jsonl.zst").write_bytes(_skippable(b"\0" * 4) + buf.getvalue() + _skippable(b"ab") + plain)
    _converts_to(tmp_path / "p.jsonl.zst", tmp_path / "o", DOCS)


def _fineweb_table(docs, pa):
    n = len(docs)
    return pa.table(
        {
            "text": pa.array(docs, pa.large_string()),
            "id": [f"<urn:uuid:{i:08x}>" for i in range(n)],
            "dump": pa.array(["CC-MAIN-2024-10"] * n).dictionary_encode(),
            "url": [f"https://example.org/{i}" for i in range(n)],
            "date": ["2024-02-21T08:00:00Z"] * n,
            "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.93] * n,
            "token_count": pa.array([len(d or "") // 4 for d in docs], pa.int64()),
        }
    )


def test_parquet_as_fineweb_ships(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "fineweb-edu" / "data" / "CC-MAIN-2024-10"
    folder.mkdir(parents=True)
    docs = [*DOCS[:10], None, *DOCS[10:]]  # a null text is no document
    pq.write_table(_fineweb_table(docs, pa), folder / "000_00000.parquet", row_group_size=7)
    (tmp_path / "fineweb-edu" / "README.md").write_text("# FineWeb-Edu\n")
    _converts_to(tmp_path / "fineweb-edu", tmp_path / "o", DOCS)
    # Only the text column is read; a missing one is named with the columns the file has.
    msg = _refused(
        folder / "000_00000.parquet", tmp_path / "o2", "has no column 'content'", text_field="content"
    )
    assert "000_00000.parquet' has no column 'content' (columns: text, id, dump, url," in msg
    # A damaged page inside the file (the footer intact): one line with the file and a byte offset.
    data = bytearray((folder / "000_00000.parquet").read_bytes())
    data[200:1200] = bytes(x ^ 0x5A for x in data[200:1200])
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    _refused(tmp_path / "bad.parquet", tmp_path / "o3", r"bad.parquet' at byte \d+ \(row group 0.*corrupt")


def test_files_that_are_not_the_compressed_data_their_names_promise(tmp_path):
    good = gzip.compress(_jsonl(DOCS))
    lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 319488512\n"
    cases = {  # file name -> (content, the error)
        "c4-train.00001-of-00002.json.gz": (lfs.encode(), "is a Git LFS pointer, not the data itself"),
        "000_00000.parquet": (lfs.encode(), "is a Git LFS pointer"),
        "part-1.json.gz": (b"", r"part-1.json.gz' is empty \(0 bytes\), not gzip data"),
        "part-2.jsonl.gz": (
            _jsonl(DOCS[:2]),
            r"part-2.jsonl.gz' at byte 0: not gzip data \(it begins b'\{\"text",
        ),
    }
    for k, (name, (content, error)) in enumerate(cases.items()):
        src = tmp_path / f"src{k}"
        src.mkdir()
        (src / "c4-train.00000-of-00002.json.gz").write_bytes(good)
        (src / name).write_bytes(content)
        _refused(src, tmp_path / f"o{k}", error)


def test_split_names_of_real_corpus_layouts(tmp_path):
    def splits(layout: dict[str, bytes], source=None) -> dict[str, str]:
        root = tmp_path / f"l{len(list(tmp_path.iterdir()))}"
        for name, content in layout.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        plan = plan_source(str(source(root)) if source else str(root))
        return {os.path.relpath(u.path, root): u.split for u in plan.units}

    row = _jsonl(DOCS[:2])
    gz = gzip.compress(row)
    # Dolma v1.7 names some sources' shards `*-train-*` and the rest nothing: all of it is training data.
    dolma = ["algebraic-stack-train-0000.json.gz", "arxiv-0000.json.gz", "open-web-math-train-0000.json.gz"]
    assert set(splits({n: gz for n in dolma}).values()) == {"train"}
    # RedPajama-1T: c4/c4-train.*.jsonl beside arxiv/arxiv_<uuid>.jsonl.
    rp = splits({"c4/c4-train.00000-of-01024.jsonl": row, "arxiv/arxiv_024de5df-1b7f.jsonl": row})
    assert set(rp.values()) == {"train"}
    # mC4 names only its validation shards.
    mc4 = splits(
        {"c4-af.tfrecord-00000-of-00064.json.gz": gz, "c4-af-validation.tfrecord-00000-of-00001.json.gz": gz}
    )
    assert sorted(mc4.values()) == ["train", "val"]
    # Digits separate words as in `datasets`; a word merely containing val/dev/test is no split.
    assert splits({"train0.jsonl": row, "valid1.jsonl": row}) == {
        "train0.jsonl": "train",
        "valid1.jsonl": "val",
    }
    lookalikes = splits({n: row for n in ("interval.jsonl", "devices.jsonl", "contest.jsonl")})
    assert set(lookalikes.values()) == {None}
    # The metadata `datasets` writes next to its shards is not a document.
    meta = {"dataset_info.json": b'{\n "a": 1\n}\n', "state.json": b"{}"}
    hf = splits({"train-00000-of-00002.jsonl": row, "train-00001-of-00002.jsonl": row, **meta})
    assert sorted(hf) == ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
    # Still ambiguous (train and val named, a third file neither): refused.
    with pytest.raises(RecipeError, match="extra.jsonl' has no split in its name"):
        splits({"train.jsonl": row, "validation.jsonl": row, "extra.jsonl": row})


def test_mc4_layout_converts_its_validation_shards_to_val(tmp_path):
    src = tmp_path / "mc4"
    src.mkdir()
    (src / "c4-af.tfrecord-00000-of-00001.json.gz").write_bytes(gzip.compress(_jsonl(DOCS[:40])))
    (src / "c4-af-validation.tfrecord-00000-of-00001.json.gz").write_bytes(gzip.compress(_jsonl(DOCS[40:])))
    convert(str(src), tmp_path / "o", num_workers=0)
    assert _texts(tmp_path / "o" / "train") == DOCS[:40] and _texts(tmp_path / "o" / "val") == DOCS[40:]


def test_links_and_odd_names_in_a_source_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jsonl").write_bytes(_jsonl(DOCS[30:]))
    src = tmp_path / "src [v2]"  # a real name holding glob characters
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl(DOCS[:30]))
    os.symlink(elsewhere, src / "more")  # a linked folder (a dataset kept on another disk) is read
    os.symlink(src, elsewhere / "up")  # a link back up: each real folder is read once
    _converts_to(src, tmp_path / "o1", DOCS)
    _converts_to(src / "a.jsonl", tmp_path / "o2", DOCS[:30])
    os.symlink(tmp_path / "gone.jsonl", src / "c.jsonl")
    _refused(src, tmp_path / "o3", r"c.jsonl' is a broken symbolic link \(to '.*gone.jsonl'\)")


def test_nested_text_field_and_non_utf8_line(tmp_path):
    src = tmp_path / "nested.jsonl.gz"
    src.write_bytes(gzip.compress(b"".join(json.dumps({"doc": {"body": d}}).encode() + b"\n" for d in DOCS)))
    _converts_to(src, tmp_path / "o1", DOCS, text_field="doc.body")
    _refused(
        src,
        tmp_path / "o2",
        r"line 1 has no field 'title' \(under 'doc'\) \(fields: body\)",
        text_field="doc.title",
    )
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(_jsonl(DOCS[:5]) + '{"text": "café"}\n'.encode("latin-1"))
    _refused(bad, tmp_path / "o3", r"latin1.jsonl' at byte \d+: not UTF-8 text \(line 6, ")


def test_a_rewritten_shard_with_the_same_size_and_date_is_not_resumed(tmp_path):
    from llmfoundry_lite.data import convert as C
    from llmfoundry_lite.data.readers import Unit

    src = tmp_path / "a.jsonl"
    src.write_bytes(_jsonl(["one"]))
    before = os.stat(src)
    none = dict.fromkeys(("compression", "tokenizer", "concat_tokens", "bos", "eos", "max_chars", "max_docs"))
    none.update(dict.fromkeys(("max_tokens", "bos_text", "eos_text", "max_seq_len", "chat_template")))
    job, _ = C._job(
        ["train"], 0.05, 17, text_field="text", size_limit="64mb", finetune=False, pack=False, **none
    )
    units = [Unit("json", str(src), None, size=before.st_size)]
    first = C._fingerprint(job, units)
    src.write_bytes(_jsonl(["two"]))  # what `cp -p` / `rsync -t` of a corrected shard leaves
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(src).st_size == before.st_size and os.stat(src).st_mtime_ns == before.st_mtime_ns
    assert C._fingerprint(job, units) != first


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_one_line(tmp_path):
    src = tmp_path / "a.jsonl.gz"
    src.write_bytes(gzip.compress(_jsonl(DOCS)))
    src.chmod(0)
    _refused(src, tmp_path / "o", r"cannot read '.*a.jsonl.gz': Permission denied")


def test_cli_corrupt_shard_in_a_worker_is_one_line_and_exit_2(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "data"
    src.mkdir()
    for k in range(2):
        pq.write_table(_fineweb_table(DOCS, pa), src / f"train-0000{k}-of-00002.parquet", row_group_size=7)
    data = bytearray((src / "train-00001-of-00002.parquet").read_bytes())
    data[200:1200] = bytes(x ^ 0x5A for x in data[200:1200])
    (src / "train-00001-of-00002.parquet").write_bytes(bytes(data))
    r = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.data.cli", "convert", "--source", str(src), "--out",
         str(tmp_path / "o"), "--num-workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "train-00001-of-00002.parquet' at byte " in r.stderr and "corrupt" in r.stderr
    assert os.listdir(tmp_path / "o") == []


def test_many_small_text_files_are_a_few_units_and_shards(tmp_path):
    src = tmp_path / "pages"
    src.mkdir()
    names = [f"page{i:04d}.txt" for i in range(300)]
    for i, name in enumerate(names):
        (src / name).write_text(DOCS[i % len(DOCS)] + f" (page {i})")
    (src / "README.md").write_text("# Scraped pages\nNot a page.\n")  # the folder's card, not a document
    s = convert(str(src), tmp_path / "o", splits="train", num_workers=2)
    assert s.units == 1 and s.splits["train"].shards == 1
    assert _texts(tmp_path / "o" / "train") == [(src / n).read_text() for n in names]


def test_output_kept_inside_the_source_folder_is_not_read_as_source(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "part-0.jsonl").write_bytes(_jsonl(DOCS[:30]))
    (src / "part-1.jsonl").write_bytes(_jsonl(DOCS[30:]))
    for _ in range(2):  # the same command twice: the second run must not take data/mds for documents
        convert(str(src), src / "mds", splits="train", num_workers=0)
        assert _texts(src / "mds" / "train") == DOCS
    (src / "one.json").write_text(json.dumps({"rows": [{"text": "a"}]}, indent=2))
    _refused(
        src / "one.json", tmp_path / "o", r"line 1: invalid JSON .*expected JSON Lines .* or one JSON array"
    )


def test_tinystories_text_files_split_at_endoftext_and_its_archive_is_skipped(tmp_path):
    import tarfile

    stories = [f"Once upon a time, story {i}.\n\nThe end of story {i}." for i in range(30)]
    src = tmp_path / "TinyStories"
    src.mkdir()
    for name, part in (("train", stories[:25]), ("valid", stories[25:])):  # blank lines inside each story
        (src / f"TinyStories-{name}.txt").write_text("".join(st + "\n<|endoftext|>\n" for st in part))
    with tarfile.open(src / "TinyStories_all_data.tar.gz", "w:gz") as tar:
        tar.add(src / "TinyStories-valid.txt", "data00.txt")
    s = convert(str(src), tmp_path / "o", num_workers=0)
    assert _texts(tmp_path / "o" / "train") == stories[:25] and _texts(tmp_path / "o" / "val") == stories[25:]
    assert "TinyStories_all_data.tar.gz" in s.format()  # named as not converted
    convert(str(src / "TinyStories-train.txt"), tmp_path / "o2", splits="train", num_workers=0)
    assert _texts(tmp_path / "o2" / "train") == stories[:25]
    _refused(
        src / "TinyStories_all_data.tar.gz", tmp_path / "o3", r"a tar archive \(of files\) is not read here"
    )


def test_a_corrupt_gzip_is_named_corrupt_not_invalid_json(tmp_path):
    # A damaged byte in the middle of a gzip member decodes to garbage before the CRC at its end says so.
    data = bytearray(gzip.compress(_jsonl(DOCS * 20)))
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c4-train.00000-of-00001.json.gz").write_bytes(bytes(data))
    _refused(
        tmp_path / "c4-train.00000-of-00001.json.gz", tmp_path / "o", r"gzip stream is truncated or corrupt"
    )
    # A well-formed gzip of bad JSON still names the line.
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS[:3]) + b'{"text": nope}\n'))
    _refused(tmp_path / "bad.jsonl.gz", tmp_path / "o2", r"bad.jsonl.gz' line 4: invalid JSON")


@pytest.mark.parametrize("eot", [False, True], ids=["blank-lines", "endoftext"])
def test_one_big_text_file_converts_as_byte_ranges(tmp_path, eot):
    import random

    r = random.Random(3)

    def lines(i: int) -> str:
        return "\n".join(f"Doc {i}, line {k}: " + "w" * r.randint(1, 400) for k in range(r.randint(1, 4)))

    docs = [lines(i) + ("\n\n" + lines(i + 1000) if eot else "") for i in range(120)]
    if eot:  # TinyStories: blank lines inside the stories, an <|endoftext|> line after each
        body = "".join(d + "\n<|endoftext|>\n" + "\n" * (i % 2) for i, d in enumerate(docs))
    else:  # one or more blank (or blank-looking) lines between paragraphs, CRLF line ends
        body = "".join(
            d + "\n\n" + "\n" * (i % 3) + (" \t\n" if i % 4 == 0 else "") for i, d in enumerate(docs)
        )
        body = body.replace("\n", "\r\n")
    src = tmp_path / "stories.txt"
    src.write_bytes(("\ufeff" + body).encode())
    # Ranges cut anywhere: inside lines, documents and separators, and between "\r" and "\n".
    for rb in (1000, 4099):
        s = convert(str(src), tmp_path / f"r{rb}", splits="train", num_workers=0, range_bytes=rb)
        assert s.units == -(-src.stat().st_size // rb) and _texts(tmp_path / f"r{rb}" / "train") == docs


def test_hub_cache_folder_with_two_snapshots_sharing_blobs(tmp_path):
    # ~/.cache/huggingface/hub/datasets--allenai--c4: blobs/<sha256> and snapshots/<rev>/... links to them.
    cache = tmp_path / "datasets--allenai--c4"
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("rev2")
    shards = {"train.00000": DOCS[:40], "validation.00000": DOCS[40:]}
    for name, docs in shards.items():
        (cache / "blobs" / hashlib.sha256(name.encode()).hexdigest()).write_bytes(gzip.compress(_jsonl(docs)))
    for rev in ("rev1", "rev2"):
        (cache / "snapshots" / rev / "en").mkdir(parents=True)
        for name in shards:
            link = cache / "snapshots" / rev / "en" / f"c4-{name}-of-00001.json.gz"
            link.symlink_to(cache / "blobs" / hashlib.sha256(name.encode()).hexdigest())
    convert(str(cache), tmp_path / "o", num_workers=0)
    assert _texts(tmp_path / "o" / "train") == DOCS[:40] and _texts(tmp_path / "o" / "val") == DOCS[40:]


def test_datasets_save_to_disk_folder_of_arrow_files(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"text": DOCS[:40], "url": [f"u{i}" for i in range(40)]})
    dd = datasets.DatasetDict({"train": train, "validation": datasets.Dataset.from_dict({"text": DOCS[40:]})})
    dd.save_to_disk(str(tmp_path / "saved"), num_shards={"train": 3, "validation": 1})
    convert(
        str(tmp_path / "saved"), tmp_path / "o", num_workers=0
    )  # dataset_dict.json, state.json: no documents
    assert _texts(tmp_path / "o" / "train") == DOCS[:40] and _texts(tmp_path / "o" / "val") == DOCS[40:]
    arrow = sorted((tmp_path / "saved" / "train").glob("*.arrow"))[0]
    _refused(arrow, tmp_path / "o2", r"has no column 'content' \(columns: text, url\)", text_field="content")
