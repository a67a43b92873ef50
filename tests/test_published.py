"""As published: MosaicBERT's exact layer and checkpoints, LLaMA continued from HF weights, today's transformers.

The MosaicBERT reference forward below is written here from mosaicml/examples' ``bert_layers.py`` (the published
model's code), over a state dict with its names, so it shares nothing with the implementation under test.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.bert import BertConfig, BertEncoder, build_bert, build_mosaic_bert
from llmfoundry_lite.models.bert.layers import GeGLU, LowPrecisionLayerNorm

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny published-style config.json (mosaicml/mosaic-bert-base's keys; its auto_map points at bert_layers.py).
HUB_CONFIG = {
    "_name_or_path": "mosaicml/mosaic-bert",
    "alibi_starting_size": 512,
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_bert.BertConfig",
        "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
    },
    "classifier_dropout": None,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    "transformers_version": "4.26.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 128,
}


# ---- an independent MosaicBERT reference (published names) -------------------------------------------------


def published_state_dict(hc: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published names (norms random too, so a swapped norm cannot hide)."""
    g = torch.Generator().manual_seed(seed)
    d, ff, V = hc["hidden_size"], hc["intermediate_size"], hc["vocab_size"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix):
        return {prefix + ".weight": 1 + r(d, scale=0.1), prefix + ".bias": r(d, scale=0.1)}

    sd = {
        "bert.embeddings.word_embeddings.weight": r(V, d, scale=1.0),
        "bert.embeddings.token_type_embeddings.weight": r(hc["type_vocab_size"], d, scale=1.0),
        **ln("bert.embeddings.LayerNorm"),
    }
    for i in range(hc["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        sd.update({
            p + "attention.self.Wqkv.weight": r(3 * d, d), p + "attention.self.Wqkv.bias": r(3 * d),
            p + "attention.output.dense.weight": r(d, d), p + "attention.output.dense.bias": r(d),
            **ln(p + "attention.output.LayerNorm"),
            p + "mlp.gated_layers.weight": r(2 * ff, d),
            p + "mlp.wo.weight": r(d, ff), p + "mlp.wo.bias": r(d),
            **ln(p + "mlp.layernorm"),
        })  # fmt: skip
    sd.update({
        "cls.predictions.transform.dense.weight": r(d, d), "cls.predictions.transform.dense.bias": r(d),
        **ln("cls.predictions.transform.LayerNorm"),
        "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"],  # tied, as saved
        "cls.predictions.decoder.bias": r(V),
    })  # fmt: skip
    return sd


def reference_slopes(n: int) -> list[float]:
    """ALiBi slopes as bert_layers.py writes them (power-of-two rule, interleaved otherwise)."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + reference_slopes(2 * c)[0::2][: n - c]


def reference_encoder(sd, hc, ids, mask, types, train=False):
    """bert_layers.BertModel's forward (no masked subset): padded embeddings, unpad, N layers, pad with zeros."""
    d, ff, H = hc["hidden_size"], hc["intermediate_size"], hc["num_attention_heads"]
    p_drop, eps = hc["hidden_dropout_prob"], hc["layer_norm_eps"]

    def lin(x, name, bias=True):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def lnorm(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def drop(x):
        return F.dropout(x, p_drop, training=train)

    B, S = ids.shape
    x = (
        sd["bert.embeddings.word_embeddings.weight"][ids]
        + sd["bert.embeddings.token_type_embeddings.weight"][types]
    )
    x = drop(lnorm(x, "bert.embeddings.LayerNorm"))  # on the padded (B, S, d) block, as the reference
    keep = mask.flatten().bool()
    x = x.reshape(B * S, d)[keep]
    pos = torch.arange(S)
    alibi = torch.tensor(reference_slopes(H))[:, None, None] * -(pos[None, :] - pos[:, None]).abs()
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0 + alibi[None]
    for i in range(hc["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        qkv = torch.zeros(B * S, 3 * d)
        qkv[keep] = lin(x, p + "attention.self.Wqkv")
        q, k, v = qkv.view(B, S, 3, H, d // H).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // H) + bias, dim=-1)
        att = (probs @ v).permute(0, 2, 1, 3).reshape(B * S, d)[keep]
        x = lnorm(drop(lin(att, p + "attention.output.dense")) + x, p + "attention.output.LayerNorm")
        h = lin(x, p + "mlp.gated_layers", bias=False)
        h = drop(F.gelu(h[:, :ff]) * h[:, ff:])  # dropout on the gated activation, before wo
        x = lnorm(lin(h, p + "mlp.wo") + x, p + "mlp.layernorm")
    out = torch.zeros(B * S, d)
    out[keep] = x
    return out.view(B, S, d)


def reference_mlm_logits(sd, hc, hidden):
    """cls.predictions: dense -> GELU -> LayerNorm(eps 1e-12) -> tied decoder + bias."""
    c = "cls.predictions."
    h = F.gelu(F.linear(hidden, sd[c + "transform.dense.weight"], sd[c + "transform.dense.bias"]))
    h = F.layer_norm(
        h, h.shape[-1:], sd[c + "transform.LayerNorm.weight"], sd[c + "transform.LayerNorm.bias"], 1e-12
    )
    return F.linear(h, sd[c + "decoder.weight"], sd[c + "decoder.bias"])


def write_published(folder: pathlib.Path, sd: dict, hc: dict, fmt: str) -> pathlib.Path:
    """A checkpoint folder as the hub repo has it: config.json + pytorch_model.bin (or model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hc, indent=2))
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        # safetensors refuses shared storage: the tied decoder weight is left out, as transformers does
        save_file({k: v.contiguous() for k, v in sd.items() if k != "cls.predictions.decoder.weight"},
                  str(folder / "model.safetensors"))  # fmt: skip
    return folder


def _batch(V: int, B: int = 3, S: int = 12, pad: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, S), generator=g)
    lengths = torch.tensor([S, S - 5, 3]) if pad else torch.full((B,), S)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    types = torch.zeros_like(ids)
    types[:, S // 2 :] = 1
    return ids * mask, mask, types


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(state dict, config, {fmt: folder}) of a tiny MosaicBERT checkpoint in the published layout."""
    sd = published_state_dict(HUB_CONFIG)
    root = tmp_path_factory.mktemp("mosaic-bert")
    folders = {fmt: write_published(root / fmt, sd, HUB_CONFIG, fmt) for fmt in ("bin", "safetensors")}
    return sd, HUB_CONFIG, folders


# ---- 1. the GLU feed-forward is the reference's --------------------------------------------------------------


def test_glu_has_no_up_bias_and_drops_out_the_gated_activation_before_wo():
    ff = GeGLU(8, 16, dropout=0.4).train()
    assert ff.up.bias is None and ff.down.bias is not None and ff.up.weight.shape == (32, 8)
    x = torch.randn(5, 8)
    torch.manual_seed(3)
    ours = ff(x)
    torch.manual_seed(3)
    h = x @ ff.up.weight.T
    ref = F.linear(F.dropout(F.gelu(h[:, :16]) * h[:, 16:], 0.4, training=True), ff.down.weight, ff.down.bias)
    assert torch.equal(ours, ref)


def test_mosaicbert_base_has_the_published_parameter_count():
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.meta import count_parameters

    cfg = load_recipe(str(REPO / "recipes/mosaicbert/base.yaml"), overrides=["model.vocab_size=30528"])
    assert count_parameters(cfg)[0] == 137_400_384


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_published_checkpoint_loads_and_matches_the_reference_forward(published, fmt):
    sd, hc, folders = published
    enc = BertEncoder.from_hf(str(folders[fmt])).eval()
    assert enc.cfg.position == "alibi" and enc.cfg.ffn == "geglu" and enc.cfg.unpad
    ids, mask, types = _batch(hc["vocab_size"])
    with torch.no_grad():
        ours = enc(ids, mask, types)
        ref = reference_encoder(sd, hc, ids, mask, types)
    assert (ours - ref).abs().max() <= 1e-4  # padding positions are zeros in both


def test_train_mode_dropout_positions_match_the_reference(published):
    sd, hc, folders = published
    hc = {**hc, "hidden_dropout_prob": 0.3}
    enc = BertEncoder.from_hf(str(folders["bin"]), hidden_dropout=0.3).train()
    # No padding: the reference drops out the padded embedding block, we the unpadded one; same shape then.
    ids, mask, types = _batch(hc["vocab_size"], pad=False)
    torch.manual_seed(11)
    ours = enc(ids, mask, types)
    torch.manual_seed(11)
    ref = reference_encoder(sd, hc, ids, mask, types, train=True)
    torch.manual_seed(12)
    other = reference_encoder(sd, hc, ids, mask, types, train=True)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - other).abs().max() > 1e-2  # the seed (so the dropout mask) matters: the check has teeth


def test_init_from_hf_gives_the_published_mlm_logits(published):
    sd, hc, folders = published
    model = build_mosaic_bert(None, vocab_size=120, init_from_hf=str(folders["safetensors"])).eval()
    ids, mask, types = _batch(120)
    labels = torch.where((ids % 3 == 0) & mask.bool(), ids, -100)
    with torch.no_grad():
        out = model({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels})
        ref = reference_mlm_logits(sd, hc, reference_encoder(sd, hc, ids, mask, types))
    sel = labels != -100
    assert (out.masked_logits - ref[sel][:, :120]).abs().max() <= 1e-4
    # A recipe asking for classic BERT cannot load it: one line, naming the model to use.
    with pytest.raises(RecipeError) as e:
        build_bert(None, vocab_size=120, init_from_hf=str(folders["bin"]))
    assert e.value.key == "model.init_from_hf" and "mosaic_bert" in str(e.value) and "\n" not in str(e.value)


def test_composer_wrapped_names_load_and_unknown_names_are_listed(published, tmp_path):
    sd, hc, _ = published
    wrapped = write_published(tmp_path / "wrapped", {"model." + k: v for k, v in sd.items()}, hc, "bin")
    assert BertEncoder.from_hf(str(wrapped)).cfg.n_layers == 2
    extra = {**sd, "bert.encoder.layer.0.mlp.extra.weight": torch.zeros(2), "bert.pooler.dense.weight": sd[
        "cls.predictions.transform.dense.weight"]}  # fmt: skip
    with pytest.raises(RecipeError) as e:
        BertEncoder.from_hf(str(write_published(tmp_path / "extra", extra, hc, "bin")))
    msg = str(e.value)
    assert "bert.encoder.layer.0.mlp.extra.weight" in msg and "pooler" not in msg and "\n" not in msg
    missing = {k: v for k, v in sd.items() if "layer.1.mlp.wo.bias" not in k}
    with pytest.raises(RecipeError, match=r"lacks 1 .*bert\.encoder\.layer\.1\.mlp\.wo\.bias"):
        BertEncoder.from_hf(str(write_published(tmp_path / "missing", missing, hc, "bin")))


def test_glue_recipe_with_model_init_from_hf_scores_the_published_model(tmp_path, bert_tokenizer_dir):
    """`llmfoundry-lite glue recipes/glue/... model.init_from_hf=mosaicml/mosaic-bert-base`: the encoder GLUE
    finetunes is the published one (here a local folder in the hub repo's layout)."""
    from llmfoundry_lite.apps.glue.config import load_glue_recipe
    from llmfoundry_lite.apps.glue.model import build_encoder, check_starting_weights

    hc = {**HUB_CONFIG, "vocab_size": 2048}  # >= the test tokenizer's 2000 ids
    sd = published_state_dict(hc, seed=5)
    folder = write_published(tmp_path / "mosaic-bert-base", sd, hc, "bin")
    cfg, glue = load_glue_recipe(str(REPO / "recipes/glue/tiny.yaml"), [
        f"variables.tokenizer_path={bert_tokenizer_dir}", f"model.init_from_hf={folder}",
        f"glue.data_dir={tmp_path / 'toy'}", f"glue.dataset_cache_dir={tmp_path / 'hf-cache'}",
    ])  # fmt: skip
    check_starting_weights(cfg, glue)  # init_from_hf counts as pretrained weights
    encoder, _ = build_encoder(cfg, glue)
    ids, mask, types = _batch(2000)
    with torch.no_grad():
        ours = encoder.eval()(ids, mask, types)
    assert (ours - reference_encoder(sd, hc, ids, mask, types)).abs().max() <= 1e-4


# ---- 2. fused_layernorm: the reference YAMLs' name for the low-precision LayerNorm ---------------------------


def test_fused_layernorm_is_the_low_precision_layernorm(bert_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    tiny = dict(d_model=32, n_layers=1, n_heads=4, intermediate_size=48)
    fused = registry.build("models", {"name": "mosaic_bert", "norm": "fused_layernorm", **tiny}, "model",
                           tokenizer=tok)  # fmt: skip
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is LowPrecisionLayerNorm for m in norms)
    lp = build_mosaic_bert(tok, norm="low_precision_layernorm", **tiny)
    lp.load_state_dict(fused.state_dict())
    ids, mask, types = _batch(len(tok), pad=True)
    fused.eval(), lp.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fused.encoder(ids, mask, types), lp.encoder(ids, mask, types)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    BertConfig(norm="fused_layernorm", vocab_size=64, **tiny).validate()  # a choice like any other


# ---- 4. LLaMA: `train ... model.init_from_hf=PATH` continues from a HF checkpoint ------------------------------

QUICK_LLAMA = str(REPO / "recipes/quickstart/llama-tiny.yaml")


def save_tiny_hf_llama(path: pathlib.Path, vocab_size: int):
    """A tiny transformers LlamaForCausalLM with non-default weights, saved with save_pretrained."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)  # far from any fresh init: a run that starts elsewhere cannot match its loss
    model.save_pretrained(path)
    return model


def test_train_continues_pretraining_from_a_hf_llama_checkpoint(
    llama_tokenizer_dir, causal_mds_dir, tmp_path
):
    from streaming import StreamingDataset
    from transformers import AutoTokenizer

    from llmfoundry_lite.cli import main
    from llmfoundry_lite.models.llama.hf_adapter import config_from_hf, state_dict_from_hf

    hf = save_tiny_hf_llama(tmp_path / "hf", len(AutoTokenizer.from_pretrained(llama_tokenizer_dir)))
    rc = main(["train", QUICK_LLAMA, f"variables.tokenizer_path={llama_tokenizer_dir}",
               f"variables.data_local={causal_mds_dir}", f"model.init_from_hf={tmp_path / 'hf'}",
               "train_loader.shuffle=false", "max_duration=1ba", "global_train_batch_size=4",
               "device_train_microbatch_size=4", "device_eval_batch_size=4", "eval_interval=1ba",
               "eval_subset_num_batches=1", "optimizer.lr=1e-12", "optimizer.weight_decay=0.0",
               "callbacks.generate.interval=100ba", "run_name=cont", f"save_folder={tmp_path / 'run'}",
               "save_interval=1ba"])  # fmt: skip
    assert rc == 0
    # The first logged loss is the HF model's loss on the first batch (rows 0-3, unshuffled).
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    rows = StreamingDataset(local=str(pathlib.Path(causal_mds_dir) / "train"), shuffle=False, batch_size=4)
    ids = torch.stack([torch.as_tensor(rows[i]["tokens"], dtype=torch.long) for i in range(4)])
    with torch.no_grad():
        ref = float(hf(ids, labels=ids).loss)
    assert abs(first["loss/train/total"] - ref) <= 1e-4, (first, ref)
    # With lr ~0 the saved weights are the checkpoint's, in our layout and shape (not the recipe's d_model 128).
    saved = torch.load(tmp_path / "run" / "latest-rank0.pt", weights_only=False)["state"]["model"]
    expected = state_dict_from_hf(hf.state_dict(), config_from_hf(hf.config))
    assert all(torch.allclose(saved["model." + k], v, rtol=0, atol=1e-9) for k, v in expected.items())


# ---- 5. a Llama config saved by transformers 5.x ------------------------------------------------------------


def _rewrite_config(folder: pathlib.Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_transformers5_rope_parameters_import_and_unimplemented_scaling_is_refused(
    llama_tokenizer_dir, tmp_path
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    hf = save_tiny_hf_llama(tmp_path / "hf", len(tok))
    # As transformers 5.x writes it: theta only under rope_parameters (4.x would default a missing one to 1e4).
    _rewrite_config(tmp_path / "hf", rope_theta=None, rope_scaling=None, dtype="float32",
                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0})  # fmt: skip
    model = registry.build("models", {"name": "llama", "init_from_hf": str(tmp_path / "hf")}, "model",
                           tokenizer=tok).eval()  # fmt: skip
    assert model.cfg.rope_theta == 50000.0
    ids = torch.randint(0, len(tok), (2, 40))
    with torch.no_grad():
        ours = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        ref = hf(ids).logits
    assert ((ours if isinstance(ours, torch.Tensor) else ours.logits) - ref).abs().max() <= 1e-4
    # linear (and llama3) scaling import, from either layout (tests/test_hf_interop.py compares their logits)
    for field, block in [
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),  # 4.x style
    ]:
        _rewrite_config(tmp_path / "hf", **{"rope_parameters": None, "rope_scaling": None, field: block})
        model = registry.build("models", {"name": "llama", "init_from_hf": str(tmp_path / "hf")}, "model",
                               tokenizer=tok)  # fmt: skip
        assert model.cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    for field, block in [
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0}),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),  # 4.x style
    ]:
        _rewrite_config(tmp_path / "hf", **{"rope_parameters": None, "rope_scaling": None, field: block})
        with pytest.raises(RecipeError) as e:
            registry.build("models", {"name": "llama", "init_from_hf": str(tmp_path / "hf")}, "model",
                           tokenizer=tok)  # fmt: skip
        msg = str(e.value)
        assert e.value.key == "model.init_from_hf" and repr(block["rope_type"]) in msg and "\n" not in msg


# ---- 6. Composer's ALiBi surgery on HF BERT and transformers >= 4.54 -----------------------------------------


def test_alibi_on_hf_bert_is_refused_in_one_line_with_a_newer_transformers():
    from llmfoundry_lite.apps.doctor import _alibi_problem
    from llmfoundry_lite.models.hf import alibi_hf_bert_problem, check_alibi_on_hf_bert
    from llmfoundry_lite.recipe import load_recipe

    assert alibi_hf_bert_problem("4.53.3") is None and alibi_hf_bert_problem("4.51.0") is None
    for v in ("4.54.0", "4.57.6", "5.0.0.dev0"):
        msg = alibi_hf_bert_problem(v)
        assert msg and v in msg and "transformers<4.54" in msg and "\n" not in msg
        assert _alibi_problem(v) == msg  # doctor says the same line
    recipe = load_recipe(str(REPO / "recipes/mosaicbert/hf-bert-mosaic-algorithms.yaml"))
    check_alibi_on_hf_bert(recipe, "4.53.3")
    with pytest.raises(RecipeError) as e:
        check_alibi_on_hf_bert(recipe, "4.57.6")
    assert e.value.key == "algorithms.alibi" and "past_key_values" in str(e.value)
    # Algorithms as a list of named blocks count too; other models and recipes without alibi pass.
    listed = {"model": {"name": "hf_bert"}, "algorithms": [{"name": "alibi", "max_sequence_length": 512}]}
    with pytest.raises(RecipeError):
        check_alibi_on_hf_bert(listed, "4.57.6")
    check_alibi_on_hf_bert({**listed, "model": {"name": "mosaic_bert"}}, "4.57.6")
    check_alibi_on_hf_bert({"model": {"name": "hf_bert"}, "algorithms": {"gated_linear_units": {}}}, "4.57.6")
    check_alibi_on_hf_bert(load_recipe(str(REPO / "recipes/mosaicbert/hf-bert-base.yaml")), "4.57.6")


def test_recipe_validation_runs_the_alibi_check(monkeypatch):
    """`validate` itself refuses the hf-bert + alibi recipe when the installed transformers is too new."""
    import importlib.metadata as md

    from llmfoundry_lite.recipe import load_recipe

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "4.57.6" if name == "transformers" else real(name))
    with pytest.raises(RecipeError) as e:
        load_recipe(str(REPO / "recipes/mosaicbert/hf-bert-mosaic-algorithms.yaml"))
    assert e.value.key == "algorithms.alibi"
