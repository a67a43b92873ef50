"""docs/data.md: every command of its bash blocks runs as written, on small files of the documented shapes."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.data.finetune import CHAT_TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "data.md").read_text()


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC, re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


def _layout(tmp: Path, tok_dir: str) -> None:
    """c4/en (.json.gz, train + validation), redpajama (.jsonl.zst), fineweb (.parquet), a tokenizer, rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = embedded_documents()
    (tmp / "c4" / "en").mkdir(parents=True)
    for name, part in (("train.00000-of-00002", docs[:250]), ("train.00001-of-00002", docs[250:500]),
                       ("validation.00000-of-00001", docs[500:])):  # fmt: skip
        with gzip.open(tmp / "c4" / "en" / f"c4-{name}.json.gz", "wt") as f:
            f.writelines(json.dumps({"text": d, "timestamp": "2019", "url": "u"}) + "\n" for d in part)
    (tmp / "redpajama").mkdir()
    for k in range(2):
        data = "".join(json.dumps({"text": d, "meta": {}}) + "\n" for d in docs[k * 300 : (k + 1) * 300])
        (tmp / "redpajama" / f"book_{k}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(data.encode())
        )
    fw = tmp / "fineweb" / "data" / "CC-MAIN-2024-10"
    fw.mkdir(parents=True)
    pq.write_table(pa.table({"text": docs, "url": ["u"] * len(docs)}), fw / "000_00000.parquet")
    (tmp / "tok").symlink_to(tok_dir)


@pytest.mark.timeout(900)  # nine CLI runs, one of them a (2-batch) training run
def test_docs_data_commands_run_as_written(tmp_path, llama_tokenizer_dir, llama_tok):
    from test_finetune import _hf_llama, _pairs  # tests/ is on sys.path (rootdir-relative imports)
    from typer.testing import CliRunner

    from llmfoundry_lite.data.cli import data_app

    commands = doc_commands()
    assert [c.split()[1] for c in commands] == ["data"] * 6 + ["train", "export", "generate"]
    _layout(tmp_path, llama_tokenizer_dir)
    _hf_llama(llama_tok, tmp_path / "hf-llama", positions=512)  # the docs' --max-seq-len
    (tmp_path / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    os.chdir(tmp_path)
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[1] == "data":
            r = CliRunner().invoke(data_app, argv[2:])
            assert r.exit_code == 0, f"{cmd}\n{r.output}\n{r.exception!r}"
            continue
        if argv[1] == "train":  # shortened: 2 batches of 2 on CPU
            argv += ["global_train_batch_size=2", "device_train_microbatch_size=2", "device_eval_batch_size=2",
                     "max_duration=2ba", "eval_interval=2ba", "eval_subset_num_batches=1", "save_interval=2ba",
                     "precision=fp32", "train_loader.num_workers=0", "eval_loader.num_workers=0", "callbacks={}"]  # fmt: skip
        if argv[1] == "generate":  # the docs' chat-finetuned model: its tokenizer carries a chat template
            config = tmp_path / "hf-llama-instruct" / "tokenizer_config.json"
            config.write_text(
                json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATES["zephyr"]})
            )
        out = subprocess.run([sys.executable, "-m", "llmfoundry_lite.cli", *argv[1:]], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        if argv[1] == "generate":
            assert out.stdout.startswith("Bread in French?\n"), out.stdout
    for d in ("c4", "c4-train", "rp", "fw", "c4-hf", "instruct"):
        assert (tmp_path / "data" / d / "train" / "index.json").is_file(), d
    assert (tmp_path / "data" / "c4" / "val" / "index.json").is_file()
    # The finetuned, exported model loads with transformers and generates.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf-llama-instruct")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-llama-instruct")
    ids = tok("Summarise: the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
