"""`llmfoundry-lite export` for the BERT family: MosaicBERT (published layout + remote code), classic BERT, GLUE.

Exported folders are loaded by transformers itself (``AutoModelForMaskedLM(..., trust_remote_code=True)``,
``AutoModelForSequenceClassification``, ``BertForMaskedLM``, ``pipeline("fill-mask")``) and compared with our models.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from test_published import HUB_CONFIG, published_state_dict, reference_encoder, reference_mlm_logits

from llmfoundry_lite import registry
from llmfoundry_lite.apps.export import export_checkpoint
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.bert import BertEncoder, load_hf_bert

# max_position_embeddings (= the exported alibi_starting_size) 16: the text batch below runs past it.
TINY = dict(d_model=32, n_layers=2, n_heads=4, intermediate_size=48, max_position_embeddings=16)
ADAPTER_LOG = "llmfoundry_lite.models.bert.hf_adapter"


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norms and biases too, so a swapped or dropped weight cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _text_batch(tok) -> dict:
    """A padded batch of real text; the first row is longer than alibi_starting_size (16)."""
    from llmfoundry_lite.data.corpus import embedded_documents

    docs = [d for d in embedded_documents() if len(d) > 400][:2]
    texts = [docs[0][:400], "The quick brown fox [MASK] over the lazy dog.", docs[1][:60]]
    return dict(tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48))


def _save_run(folder, model, block: dict, tok_dir: str, glue: dict | None = None, recipe: bool = True):
    """A Composer-format checkpoint (plus the run's recipe.yaml and metrics.jsonl, as `train` writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = {"Timestamp": {"batch": 7, "sample": 56, "token": 1792}}  # as Composer saves it
    torch.save({"state": {"model": model.state_dict(), "timestamp": stamp}}, folder / "ep0-ba7-rank0.pt")
    if recipe:
        cfg = {"run_name": "tiny-export", "max_seq_len": 64, "model": block,
               "tokenizer": {"name": "hf", "path": tok_dir},
               "train_loader": {"name": "text", "dataset": {"local": "/data/c4", "split": "train"}}}  # fmt: skip
        if glue is not None:
            cfg["glue"] = glue
        OmegaConf.save(cfg, folder / "recipe.yaml")
        rows = [{"step": 6, "loss/train/total": 7.25}, {"step": 7, "loss/train/total": 7.125}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "ep0-ba7-rank0.pt"


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, bert_tokenizer_dir):
    """(checkpoint, our model in eval mode, tokenizer) of a tiny MosaicBERT run."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    block = {"name": "mosaic_bert", **TINY}
    torch.manual_seed(0)
    model = registry.build("models", block, "model", tokenizer=tok)
    _perturb(model)
    ckpt = _save_run(tmp_path_factory.mktemp("mosaic-run"), model, block, bert_tokenizer_dir)
    return ckpt, model.eval(), tok


@pytest.fixture(scope="module")
def mosaic_hf(mosaic, tmp_path_factory):
    return export_checkpoint(mosaic[0], tmp_path_factory.mktemp("export") / "hf")


def test_mosaic_bert_mlm_logits_equal_ours(mosaic, mosaic_hf):
    from transformers import AutoModelForMaskedLM

    _, model, tok = mosaic
    hf, info = AutoModelForMaskedLM.from_pretrained(
        mosaic_hf, trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values()), info  # every weight loaded, none left over
    assert type(hf).__name__ == "MosaicBertForMaskedLM"
    batch = _text_batch(tok)
    assert batch["input_ids"].shape[1] > 16 and not batch["attention_mask"].all()  # padded, beyond 16
    with torch.no_grad():
        ref = hf.eval()(**batch).logits
        ours = model({**batch, "labels": batch["input_ids"]}).logits  # every position, for the comparison
    real = batch["attention_mask"].bool()
    assert (ours[real] - ref[real][:, : len(tok)]).abs().max().item() <= 1e-5
    assert (
        ref[..., len(tok) :] == torch.finfo(ref.dtype).min
    ).all()  # padding rows of the vocabulary never win


def test_mosaic_bert_folder_has_the_published_layout(mosaic, mosaic_hf):
    """Published weight names and config keys; the published forward (tests/test_published.py) gives our logits."""
    from safetensors.torch import load_file

    _, model, tok = mosaic
    files = {p.name for p in mosaic_hf.iterdir()}
    assert {"config.json", "model.safetensors", "mosaic_bert.py", "README.md", "tokenizer.json"} <= files
    config = json.loads((mosaic_hf / "config.json").read_text())
    assert config["alibi_starting_size"] == 16 and config["vocab_size"] % 64 == 0
    assert config["auto_map"]["AutoModelForMaskedLM"] == "mosaic_bert.MosaicBertForMaskedLM"
    sd = load_file(str(mosaic_hf / "model.safetensors"))
    hc = {**HUB_CONFIG, "hidden_size": 32, "intermediate_size": 48, "vocab_size": config["vocab_size"]}
    assert set(sd) == set(published_state_dict(hc))
    batch = _text_batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = reference_mlm_logits(sd, hc, reference_encoder(sd, hc, ids, mask, batch["token_type_ids"]))
        ours = model({**batch, "labels": ids}).logits
    assert (ours[mask.bool()] - ref[mask.bool()][:, : len(tok)]).abs().max().item() <= 1e-4
    # The remote code imports nothing but torch and transformers.
    code = (mosaic_hf / "mosaic_bert.py").read_text()
    imports = {ln.split()[1].split(".")[0] for ln in code.splitlines() if ln.startswith(("import ", "from "))}
    assert imports <= {"__future__", "math", "typing", "torch", "transformers"}, imports


def test_mosaic_bert_reimports_bit_for_bit(mosaic, mosaic_hf):
    ckpt, model, _ = mosaic
    cfg, enc, head = load_hf_bert(str(mosaic_hf))
    assert enc.keys() == model.encoder.state_dict().keys() and head.keys() == model.head.state_dict().keys()
    for ours, got in ((model.encoder.state_dict(), enc), (model.head.state_dict(), head)):
        assert all(torch.equal(ours[k], got[k]) for k in ours)
    science = ("vocab_size", "d_model", "n_layers", "n_heads", "intermediate_size", "position", "ffn",
               "layer_norm_eps", "attention_dropout", "hidden_dropout", "type_vocab_size")  # fmt: skip
    assert all(getattr(cfg, k) == getattr(model.cfg, k) for k in science)


def test_mosaic_bert_padding_does_not_change_the_real_tokens_logits(mosaic, mosaic_hf):
    """Each row of a padded batch (attention_mask zeros, rows beyond alibi_starting_size) through the exported
    folder's remote code gives the logits of that row alone, unpadded; so does a batch without token_type_ids."""
    from transformers import AutoModelForMaskedLM

    _, _, tok = mosaic
    hf = AutoModelForMaskedLM.from_pretrained(mosaic_hf, trust_remote_code=True).eval()
    batch = _text_batch(tok)
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        padded = hf(**batch).logits
        for row, mask in enumerate(batch["attention_mask"]):
            n = int(mask.sum())
            alone = hf(**{k: v[row : row + 1, :n] for k, v in batch.items()}).logits[0]
            assert (padded[row, :n] - alone).abs().max().item() <= 1e-5, row
        no_types = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(no_types, padded)  # token type 0 is the default


def test_fill_mask_pipeline_and_model_card(mosaic, mosaic_hf):
    from transformers import pipeline

    _, _, tok = mosaic
    fill = pipeline("fill-mask", model=str(mosaic_hf), trust_remote_code=True)
    preds = fill("The quick brown fox [MASK] over the lazy dog.", top_k=3)
    assert len(preds) == 3 and all(p["token"] < len(tok) for p in preds)
    card = (mosaic_hf / "README.md").read_text()
    for fact in ("MosaicBertForMaskedLM", "Tokens seen | 1,792", "Final training loss | 7.1250 (last logged)",
                 "local: /data/c4", "trust_remote_code=True", "name: mosaic_bert"):  # fmt: skip
        assert fact in card, fact


@pytest.fixture(scope="module")
def glue_ckpt(mosaic, tmp_path_factory, bert_tokenizer_dir):
    """A GLUE classifier (3 labels) around the MosaicBERT encoder, saved as a GLUE job saves it (no recipe)."""
    from llmfoundry_lite.apps.glue.model import GlueClassifier

    _, model, _ = mosaic
    torch.manual_seed(1)
    clf = GlueClassifier(model.encoder, 3, dropout=0.1)
    _perturb(clf, seed=3)
    ckpt = _save_run(tmp_path_factory.mktemp("glue") / "mnli" / "checkpoints", clf, {}, "", recipe=False)
    recipe = tmp_path_factory.mktemp("recipe") / "glue.yaml"
    OmegaConf.save({"model": {"name": "mosaic_bert", **TINY}, "tokenizer": {"path": bert_tokenizer_dir},
                    "glue": {"classifier_dropout": 0.1}}, recipe)  # fmt: skip
    return ckpt, clf.eval(), recipe


def test_glue_checkpoint_exports_as_sequence_classification(glue_ckpt, mosaic, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    ckpt, clf, recipe = glue_ckpt
    with pytest.raises(RecipeError, match="--recipe") as e:  # no recipe.yaml beside a GLUE job's checkpoint
        export_checkpoint(ckpt, tmp_path / "no-recipe")
    assert "\n" not in str(e.value) and not (tmp_path / "no-recipe").exists()
    out = export_checkpoint(ckpt, tmp_path / "hf", recipe=recipe)
    hf, info = AutoModelForSequenceClassification.from_pretrained(
        out, trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values()), info
    batch = _text_batch(mosaic[2])
    with torch.no_grad():
        assert (clf(batch) - hf.eval()(**batch).logits).abs().max().item() <= 1e-5
    # Read back as a pretrained encoder: the task head is dropped, said in one line.
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOG):
        enc = BertEncoder.from_hf(str(out))
    lines = [r.getMessage() for r in caplog.records if r.name == ADAPTER_LOG]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "bert.pooler.* (2 tensors" in lines[0] and "classifier.* (2 tensors" in lines[0]
    assert all(torch.equal(v, clf.encoder.state_dict()[k]) for k, v in enc.state_dict().items())


def test_classic_bert_exports_as_plain_bert_for_masked_lm(tmp_path, bert_tokenizer_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    block = {"name": "bert", **{**TINY, "max_position_embeddings": 64}}
    torch.manual_seed(0)
    model = registry.build("models", block, "model", tokenizer=tok)
    _perturb(model, seed=5)
    out = export_checkpoint(_save_run(tmp_path / "run", model, block, bert_tokenizer_dir), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not (out / "mosaic_bert.py").exists()
    hf, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)  # no remote code
    assert isinstance(hf, BertForMaskedLM) and not any(info.values()), info
    batch = _text_batch(tok)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model.eval()({**batch, "labels": batch["input_ids"]}).logits
        ref = hf.eval()(**batch).logits
    assert ref.shape[-1] == len(tok)  # padding rows cut: transformers' BERT could predict them otherwise
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-5
    cfg, enc, _ = load_hf_bert(str(out))  # back in: equal up to the cut rows, which come back as zeros
    own = model.encoder.state_dict()
    assert all(torch.equal(own[k], enc[k]) for k in own if k != "embeddings.word.weight")
    assert torch.equal(own["embeddings.word.weight"][: len(tok)], enc["embeddings.word.weight"][: len(tok)])
    # A GLUE classifier around it: transformers' BertForSequenceClassification (regression: one label).
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from llmfoundry_lite.apps.glue.model import GlueClassifier

    clf = GlueClassifier(model.encoder, 1, dropout=0.1)
    _perturb(clf.classifier, seed=6)
    glue = _save_run(tmp_path / "glue", clf, block, bert_tokenizer_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(
        export_checkpoint(glue, tmp_path / "hf-glue")
    ).eval()
    assert isinstance(hf, BertForSequenceClassification) and hf.config.problem_type == "regression"
    with torch.no_grad():
        assert (clf.eval()(batch) - hf(**batch).logits).abs().max().item() <= 1e-5


def test_encoder_options_without_a_hf_layout_are_one_line(tmp_path, bert_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    block = {"name": "mosaic_bert", **TINY, "ffn": "mlp"}  # ALiBi with a GELU MLP: neither layout
    model = registry.build("models", block, "model", tokenizer=tok)
    ckpt = _save_run(tmp_path / "run", model, block, bert_tokenizer_dir)
    with pytest.raises(RecipeError) as e:
        export_checkpoint(ckpt, tmp_path / "out")
    assert e.value.key == "model.ffn" and "position: alibi with ffn: mlp" in str(e.value)
    cli = subprocess.run([sys.executable, "-m", "llmfoundry_lite.cli", "export", str(ckpt), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert [ln for ln in cli.stderr.splitlines() if ln.strip()] == [f"error: {e.value}"]


# ---- imports that say what they drop ---------------------------------------------------------------------


def _write(folder, sd, hc):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hc))
    torch.save(sd, folder / "pytorch_model.bin")
    return str(folder)


def test_published_import_names_what_it_drops_in_one_line(tmp_path, caplog):
    sd = published_state_dict(HUB_CONFIG)
    d = HUB_CONFIG["hidden_size"]
    legacy = {**sd, "bert.encoder.alibi": torch.zeros(1, 4, 512, 512), "bert.pooler.dense.weight": torch.zeros(d, d),
              "bert.pooler.dense.bias": torch.zeros(d), "classifier.weight": torch.zeros(2, d),
              "classifier.bias": torch.zeros(2)}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOG):
        enc = BertEncoder.from_hf(
            _write(tmp_path / "legacy", legacy, HUB_CONFIG)
        )  # the old buffer is accepted
    lines = [r.getMessage() for r in caplog.records if r.name == ADAPTER_LOG]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    for part in ("cls.predictions.decoder.weight (1 tensor; tied: equal to the word embedding)",
                 "bert.pooler.* (2 tensors; task head", "classifier.* (2 tensors; task head",
                 "bert.encoder.alibi (1 tensor; legacy ALiBi buffer: recomputed"):  # fmt: skip
        assert part in lines[0], part
    assert torch.equal(enc.embeddings.word.weight[:128], sd["bert.embeddings.word_embeddings.weight"])
    untied = {**sd, "cls.predictions.decoder.weight": sd["cls.predictions.decoder.weight"] + 1}
    with pytest.raises(RecipeError, match="differs from the word embedding") as e:
        BertEncoder.from_hf(_write(tmp_path / "untied", untied, HUB_CONFIG))
    assert "\n" not in str(e.value)


def test_classic_import_names_what_it_drops_in_one_line(tmp_path, caplog):
    from transformers import BertConfig, BertForSequenceClassification

    hc = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=32)  # fmt: skip
    BertForSequenceClassification(hc).save_pretrained(tmp_path / "cls")
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOG):
        _, _, head = load_hf_bert(str(tmp_path / "cls"))
    lines = [r.getMessage() for r in caplog.records if r.name == ADAPTER_LOG]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "bert.pooler.* (2 tensors; task head" in lines[0] and "classifier.* (2 tensors" in lines[0]
    assert head is None  # no MLM head in a classifier checkpoint


def test_both_glue_routes_finetune_with_the_recipes_attention_dropout(tmp_path, bert_tokenizer_dir):
    """glue.init_from_hf and model.init_from_hf: attention dropout is the recipe's (0.0 for mosaic_bert, as the
    reference finetunes), not the 0.1 a checkpoint's config.json may carry."""
    from pathlib import Path

    from llmfoundry_lite.apps.glue.config import load_glue_recipe
    from llmfoundry_lite.apps.glue.model import build_encoder

    hc = {**HUB_CONFIG, "vocab_size": 2048, "attention_probs_dropout_prob": 0.1}
    folder = _write(tmp_path / "mosaic-bert", published_state_dict(hc, seed=5), hc)
    tiny = str(Path(__file__).resolve().parents[1] / "recipes/glue/tiny.yaml")
    common = [f"variables.tokenizer_path={bert_tokenizer_dir}", f"glue.data_dir={tmp_path / 'toy'}"]
    rates = {}
    for route in ("glue.init_from_hf", "model.init_from_hf"):
        cfg, glue = load_glue_recipe(tiny, [*common, f"{route}={folder}"])
        encoder, _ = build_encoder(cfg, glue)
        rates[route] = {layer.attn.attn_dropout for layer in encoder.layers}
    assert rates == {"glue.init_from_hf": {0.0}, "model.init_from_hf": {0.0}}
    cfg, glue = load_glue_recipe(
        tiny, [*common, f"glue.init_from_hf={folder}", "model.attention_dropout=0.05"]
    )
    assert {layer.attn.attn_dropout for layer in build_encoder(cfg, glue)[0].layers} == {0.05}
