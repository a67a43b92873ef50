"""SMoE-Dropout models at a chosen k outside training: ``generate --k``, ``eval --k 1,4,16``, ``glue``'s
``model.ffn.k``, their one-line refusals, and docs/smoe.md's "Inference at a chosen k" commands."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from _bert_run import save_mosaicbert_run

from llmfoundry_lite import registry
from llmfoundry_lite.models.ffn import active_experts, set_active_experts, smoe_layers

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOE = {"name": "smoe_dropout", "n_experts": 4, "k_min": 2, "k_max": 4}
LLAMA = dict(
    vocab_size=None, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64, max_seq_len=16
)  # vocab_size None: the tokenizer's
BERT = dict(vocab_size=None, d_model=32, n_layers=2, n_heads=4, intermediate_size=48, hidden_dropout=0.0)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    from llmfoundry_lite.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def smoe_checkpoints(tmp_path_factory, llama_tokenizer_dir):
    """Composer checkpoints of one tiny SMoE LLaMA (n_experts 4): its config's k (4 = k_max), the same weights
    saved with ``model.ffn.k: 1`` (the reference for ``--k 1``), and a dense model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    root = tmp_path_factory.mktemp("chosen-k")

    def save(name: str, ffn, weights=None):
        torch.manual_seed(0)
        model = registry.build("models", {"name": "llama", **LLAMA, "ffn": ffn}, "model", tokenizer=tok)
        with torch.no_grad():  # larger weights than the init: each k decodes other tokens
            for p in model.parameters():
                p.mul_(4.0)
        if weights is not None:
            model.load_state_dict(weights)
        torch.save({"state": {"model": model.state_dict()}}, root / name)
        return root / name, model

    ckpt, model = save("smoe.pt", SMOE)
    ckpt_k1, _ = save("smoe-k1.pt", {**SMOE, "k": 1}, model.state_dict())
    dense, _ = save("dense.pt", {"name": "dense"})
    return ckpt, ckpt_k1, dense, model.eval(), tok


def one_line_error(capsys, *args) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_generate_takes_a_chosen_k(smoe_checkpoints, capsys):
    ckpt, _, dense, model, tok = smoe_checkpoints
    prompt = "The object of"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    texts = {}
    for k in (1, 4, None):
        code, out, err = run_cli(capsys, "generate", ckpt, "--prompt", prompt, "--max-new-tokens", 6,
                                 "--temperature", 0, *(["--k", k] if k else []))  # fmt: skip
        assert code == 0, err
        texts[k] = out
    for k in (1, 4):  # the same tokens as the model itself decodes at that k
        set_active_experts(model, k)
        new = model.generate(ids, max_new_tokens=6, temperature=0)[0, ids.shape[1] :]
        text = tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")  # a split character is not printed
        assert texts[k] == prompt + text + "\n"
    assert texts[1] != texts[4] and texts[None] == texts[4]  # default: the checkpoint's k (k_max)
    err = one_line_error(capsys, "generate", ckpt, "--prompt", prompt, "--k", 5)
    assert "--k: must be between 1 and n_experts=4" in err
    err = one_line_error(capsys, "generate", dense, "--prompt", prompt, "--k", 2)
    assert "--k: " in err and "dense FFNs, not SMoE-Dropout experts" in err


def test_eval_scores_each_chosen_k(smoe_checkpoints, tmp_path, monkeypatch, capsys):
    """``eval --k 1,4`` scores each k as the checkpoint would at that ``model.ffn.k``, one table row per k."""
    from llmfoundry_lite.apps.evaluate.harness import log_name

    ckpt, ckpt_k1, dense, _, _ = smoe_checkpoints
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tests" / "fixtures" / "lm_eval", tasks)
    monkeypatch.chdir(tasks)  # the task YAMLs name their data relative to the working directory
    common = ["--tasks", "tiny_mc,tiny_lambada", "--include-path", tasks, "--device", "cpu", "--limit", 6]

    def rows(source, out: str, *extra) -> list[dict]:
        code, console, err = run_cli(capsys, "eval", source, *common, "--out", tmp_path / out, *extra)
        assert code == 0, err
        return json.loads((tmp_path / out / "eval.json").read_text())["rows"], console

    chosen, console = rows(ckpt, "chosen", "--k", "1,4")
    at_k1, _ = rows(ckpt_k1, "k1")
    default, _ = rows(ckpt, "default")
    assert [r["k"] for r in chosen] == [1] * len(at_k1) + [4] * len(default)
    strip = lambda r: {k: v for k, v in r.items() if k != "k"}  # noqa: E731
    assert [strip(r) for r in chosen] == at_k1 + default
    assert "| 1 | tiny_mc | acc |" in console and "| 4 | tiny_lambada | acc |" in console
    assert "SMoE-Dropout k: 1, 4" in console
    assert log_name(chosen[0]) == "eval/k1/tiny_mc/acc"  # as training's eval_k names its evaluators

    assert "--k: must be between 1 and n_experts=4" in one_line_error(
        capsys, "eval", ckpt, *common, "--k", "2,9"
    )
    assert "integers, e.g. 1,4,16" in one_line_error(capsys, "eval", ckpt, *common, "--k", "1,four")
    assert "dense FFNs" in one_line_error(capsys, "eval", dense, *common, "--k", "2")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    assert "Hugging Face folder" in one_line_error(capsys, "eval", hf, *common, "--k", "2")


def test_mosaicbert_checkpoint_fills_masks_at_a_chosen_k_and_is_not_exported(
    tmp_path, bert_tokenizer_dir, capsys
):
    """generate rebuilds an SMoE MosaicBERT from its checkpoint (routers included) at ``--k``; export refuses it."""
    from transformers import AutoTokenizer

    from llmfoundry_lite.apps.generate import Generator, fill_masks, load_generator

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    block = {"name": "mosaic_bert", **BERT, "ffn": SMOE}
    run = tmp_path / "run"
    model = save_mosaicbert_run(block, bert_tokenizer_dir, run)
    text = "The cat sat on the [MASK]."
    fills = {}
    for k in (1, 4):
        gen = load_generator(str(run / "ck.pt"), k=k)
        assert active_experts(gen.model) == k and len(smoe_layers(gen.model)) == 2
        set_active_experts(model, k)
        fills[k] = fill_masks(gen, text)
        assert fills[k] == fill_masks(Generator("mlm", model, tok), text)
    assert fills[1] != fills[4]
    code, out, err = run_cli(capsys, "generate", run / "ck.pt", "--prompt", text, "--k", 2)
    assert code == 0 and out.startswith(text) and "mask 1:" in out, err
    err = one_line_error(capsys, "export", run / "ck.pt", tmp_path / "hf")
    assert "model.ffn: " in err and "SMoE-Dropout" in err and "MosaicBERT" in err
    assert not (tmp_path / "hf").exists()


def test_glue_takes_k_from_the_recipe(tmp_path, bert_tokenizer_dir, capsys):
    """``glue`` builds its encoder from the recipe: ``model.ffn.k`` is its k; on a dense FFN it is refused."""
    from llmfoundry_lite.apps.glue.config import load_glue_recipe
    from llmfoundry_lite.apps.glue.model import build_encoder

    recipe = REPO / "recipes" / "glue" / "tiny.yaml"
    shape = [f"variables.tokenizer_path={bert_tokenizer_dir}", "model.d_model=32", "model.n_layers=1",
             "model.n_heads=2", "model.intermediate_size=64", f"glue.data_dir={tmp_path / 'toy'}"]  # fmt: skip
    smoe = ["model.ffn.name=smoe_dropout", "model.ffn.n_experts=4"]
    cfg, glue = load_glue_recipe(str(recipe), [*shape, *smoe, "model.ffn.k=2"])
    encoder, _ = build_encoder(cfg, glue)
    assert active_experts(encoder) == 2 and len(smoe_layers(encoder)) == 1
    err = one_line_error(capsys, "validate", recipe, *shape, *smoe, "model.ffn.k=5")
    assert "model.ffn.k: must be between 1 and n_experts=4" in err
    err = one_line_error(capsys, "validate", recipe, *shape, "model.ffn.k=2")
    assert "model.ffn.k: " in err and "model.ffn.name=smoe_dropout" in err


def test_docs_inference_commands_run(tmp_path, monkeypatch, capsys, llama_tok, bert_tokenizer_dir):
    """docs/smoe.md's "Inference at a chosen k" commands: generate and eval run for real on a 16-expert LLaMA saved
    where the page's train command saves, lm-eval's tasks replaced by the tiny local ones; glue's recipe builds
    its encoder at the k given (its finetuning runs in tests/test_glue.py)."""
    import re
    import shlex

    section = (REPO / "docs" / "smoe.md").read_text().split("## Inference at a chosen k")[1].split("\n## ")[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [shlex.split(line)[1:] for line in block.strip().splitlines()]
    assert [c[0] for c in commands] == ["generate", "eval", "glue"]
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tests" / "fixtures" / "lm_eval", tasks)
    monkeypatch.chdir(tasks)  # the run folder and the tasks' data are relative to the working directory
    ffn = {"name": "smoe_dropout", "n_experts": 16}
    model = registry.build("models", {"name": "llama", **LLAMA, "ffn": ffn}, "model", tokenizer=llama_tok)
    (tasks / commands[0][1]).mkdir(parents=True)
    torch.save({"state": {"model": model.state_dict()}}, tasks / commands[0][1] / "latest-rank0.pt")

    code, out, err = run_cli(capsys, *commands[0])
    assert code == 0 and out.startswith("Once upon a time"), err
    argv = commands[1]
    at = argv.index("--tasks") + 1
    argv[at : at + 1] = ["tiny_mc,tiny_lambada", "--include-path", str(tasks)]
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--out", tmp_path / "scores")
    assert code == 0, err
    rows = json.loads((tmp_path / "scores" / "eval.json").read_text())["rows"]
    # tiny_mc's acc and acc_norm, tiny_lambada's acc, at each k
    assert [r["k"] for r in rows] == [1] * 3 + [4] * 3 + [16] * 3

    from llmfoundry_lite.apps.glue.config import load_glue_recipe
    from llmfoundry_lite.apps.glue.model import build_encoder

    _, recipe, *overrides = commands[2]
    cfg, glue = load_glue_recipe(
        str(REPO / recipe), [*overrides, f"variables.tokenizer_path={bert_tokenizer_dir}"]
    )
    assert active_experts(build_encoder(cfg, glue)[0]) == 8
