"""Hugging Face checkpoints the project did not write, at its borders (``model.init_from_hf``, ``generate HF_DIR``,
``export``): what imports matches transformers exactly; what does not is refused in one line naming the folder.

Every checkpoint is a tiny model built from a transformers config and saved locally (nothing downloads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_published import HUB_CONFIG, published_state_dict, write_published

from llmfoundry_lite import registry
from llmfoundry_lite.apps.export import export_checkpoint
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.bert import load_hf_bert
from llmfoundry_lite.models.llama import load_hf_llama

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add noise on a shared box
    yield
    torch.set_num_threads(threads)


def _save(folder, model, tok=None, **save_kw):
    model.save_pretrained(folder, **save_kw)
    if tok is not None:
        tok.save_pretrained(folder)
    return folder


def _llama(tok, seed: int = 0, model_type: str = "llama", **config):
    """A tiny randomly initialised transformers causal LM of ``model_type`` (llama, mistral, qwen2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {**SHAPE, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, **config}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()


# name -> (model_type, config, save_pretrained kwargs, dtype the weights are saved in)
SUPPORTED = {
    "gqa": ("llama", dict(num_key_value_heads=2), {}, None),
    "mqa": ("llama", dict(num_key_value_heads=1), {}, None),
    "tied": ("llama", dict(tie_word_embeddings=True), {}, None),
    "rope-theta-eps": ("llama", dict(rope_theta=500000.0, rms_norm_eps=3e-4), {}, None),
    "bf16-saved": ("llama", dict(num_key_value_heads=2), {}, torch.bfloat16),
    "sharded": ("llama", {}, dict(max_shard_size="20KB"), None),
    "pytorch-bin": ("llama", {}, dict(safe_serialization=False), None),
    "mistral-no-window": ("mistral", dict(num_key_value_heads=2, sliding_window=None), {}, None),
    "rope-llama3": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        {},
        None,
    ),  # fmt: skip
    "rope-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 4.0}), {}, None),
    "head-dim-16": ("llama", dict(head_dim=16, num_key_value_heads=2), {}, None),  # 4 x 16 != hidden 32
    "mistral-head-dim": ("mistral", dict(head_dim=4, num_key_value_heads=1, sliding_window=None), {}, None),
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_supported_checkpoint_matches_transformers_and_exports_back(
    name, tmp_path, llama_tok, llama_tokenizer_dir
):
    """Our logits == transformers' (1e-5); greedy tokens == HF ``generate``; our export loads with the same logits."""
    from transformers import AutoModelForCausalLM

    model_type, config, save_kw, dtype = SUPPORTED[name]
    hf = _llama(llama_tok, model_type=model_type, **config)
    if dtype is not None:  # the reference is what the file holds: rounded weights, computed in fp32
        hf = hf.to(dtype)
        _save(tmp_path / "hf", hf, llama_tok)
        hf = hf.float()
    else:
        _save(tmp_path / "hf", hf, llama_tok, **save_kw)
    if name == "sharded":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = registry.build(
        "models", {"name": "llama", "init_from_hf": str(tmp_path / "hf")}, "model", tokenizer=llama_tok
    ).eval()
    ids = torch.tensor([llama_tok("The quick brown fox jumps over the lazy dog, then")["input_ids"]])
    rows = torch.randint(0, len(llama_tok), (2, SHAPE["max_position_embeddings"]), generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        logits = ours({"input_ids": ids})
        assert (logits - hf(ids).logits).abs().max().item() <= 1e-5
        assert (ours({"input_ids": rows}) - hf(rows).logits).abs().max().item() <= 1e-5  # every position
        if "rope_scaling" in config:  # the scaling is seen: unscaled RoPE gives other logits
            unscaled = _llama(llama_tok, **{**config, "rope_scaling": None})
            assert (unscaled(rows).logits - hf(rows).logits).abs().max().item() > 1e-3
    hf.generation_config.eos_token_id = None  # 16 tokens on both sides, whatever they are
    ref = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ours.generate(ids, max_new_tokens=16, temperature=0), ref)

    torch.save({"state": {"model": ours.state_dict()}}, tmp_path / "run.pt")
    out = export_checkpoint(tmp_path / "run.pt", tmp_path / "exported", tokenizer=llama_tokenizer_dir)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(ids).logits - logits).abs().max().item() <= 1e-5
        assert (back(rows).logits - hf(rows).logits).abs().max().item() <= 1e-5


# name -> (model_type, config, words the one-line refusal must hold)
REFUSED = {
    "rope-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["'dynamic'"]),
    "rope-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ["'yarn'"]),
    "attention-bias": ("llama", dict(attention_bias=True), ["attention_bias"]),
    "mlp-bias": ("llama", dict(mlp_bias=True), ["mlp_bias"]),
    "gelu": ("llama", dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    "mistral-window": ("mistral", dict(sliding_window=16), ["sliding_window=16", "MistralForCausalLM"]),
    "qwen2": ("qwen2", {}, ["model_type='qwen2'", "Qwen2ForCausalLM"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_checkpoint_is_refused_in_one_line_naming_the_folder(name, tmp_path, llama_tok):
    model_type, config, words = REFUSED[name]
    folder = _save(tmp_path / f"ckpt-{name}", _llama(llama_tok, model_type=model_type, **config), llama_tok)
    with pytest.raises(RecipeError) as e:
        load_hf_llama(str(folder))
    msg = str(e.value)
    assert e.value.key == "model.init_from_hf" and str(folder) in msg and "\n" not in msg, msg
    assert all(w in msg for w in words), msg


def test_gpt2_and_bert_folders_are_refused_as_llama(tmp_path, llama_tok, bert_tok):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    gpt2 = _save(
        tmp_path / "gpt2",
        GPT2LMHeadModel(GPT2Config(vocab_size=len(llama_tok), n_embd=32, n_layer=1, n_head=4)),
    )
    bert = _save(tmp_path / "bert", BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=48)))  # fmt: skip
    for folder, arch in ((gpt2, "GPT2LMHeadModel"), (bert, "BertForMaskedLM")):
        with pytest.raises(
            RecipeError, match=rf"^model\.init_from_hf: {folder}: not a Llama checkpoint .*{arch}"
        ):
            load_hf_llama(str(folder))


@pytest.fixture
def good_llama(tmp_path, llama_tok):
    return _save(tmp_path / "good", _llama(llama_tok), llama_tok)


def _broken(kind: str, good, tmp_path):
    """A folder (or file) that is not a usable HF Llama checkpoint, and the words its one-line error holds."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    if kind == "composer-file":
        torch.save({"state": {"model": {}}}, tmp_path / "latest-rank0.pt")
        return tmp_path / "latest-rank0.pt", ["Composer checkpoint file", "llmfoundry-lite export"]
    shutil.copytree(good, folder)
    weights = folder / "model.safetensors"
    if kind == "no-weights":
        weights.unlink()
        return folder, ["has a config.json but no weights"]
    if kind == "missing-tensor":  # transformers would fill it with random values and only warn
        sd = load_file(weights)
        del sd["model.layers.1.mlp.down_proj.weight"]
        save_file(sd, weights, metadata={"format": "pt"})
        return folder, ["lacks 1 of the model's weights", "model.layers.1.mlp.down_proj.weight"]
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        return folder, ["cannot load the weights", "SafetensorError"]
    if kind == "composer-folder":
        (folder / "config.json").unlink()
        weights.unlink()
        torch.save({"state": {"model": {}}}, folder / "ep0-ba2-rank0.pt")
        return folder, ["Composer checkpoint folder", "llmfoundry-lite export"]
    if kind == "missing-shard":
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
        )
        weights.unlink()
        return folder, ["model-00002-of-00002.safetensors", "not in the folder"]
    if kind in (
        "unknown-model-type",
        "incomplete-rope-scaling",
    ):  # transformers: a page-long error, a KeyError
        config = json.loads((folder / "config.json").read_text())
        if kind == "unknown-model-type":
            config.update(model_type="fancy_lm", architectures=["FancyForCausalLM"])
            words = ["not a Llama checkpoint", "'fancy_lm'", "FancyForCausalLM"]
        else:
            config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
            words = ["its config.json", "low_freq_factor"]
        (folder / "config.json").write_text(json.dumps(config))
        return folder, words
    if kind == "no-model-type":
        config = json.loads((folder / "config.json").read_text())
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
        return folder, ["has no model_type"]
    raise AssertionError(kind)


BROKEN = ["composer-file", "composer-folder", "no-weights", "missing-tensor", "truncated", "missing-shard", "no-model-type",
          "unknown-model-type", "incomplete-rope-scaling"]  # fmt: skip


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_hf_folder_is_one_line_naming_it(kind, good_llama, tmp_path, llama_tok):
    path, words = _broken(kind, good_llama, tmp_path)
    with pytest.raises(RecipeError) as e:
        registry.build("models", {"name": "llama", "init_from_hf": str(path)}, "model", tokenizer=llama_tok)
    msg = str(e.value)
    assert e.value.key == "model.init_from_hf" and str(path) in msg and "\n" not in msg, msg
    assert all(w in msg for w in words), msg


def test_bert_checkpoints_missing_a_weight_are_refused(tmp_path, bert_tok):
    """Classic BERT (transformers would initialise the weight randomly) and MosaicBERT (a load_state_dict traceback)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    classic = _save(tmp_path / "classic", BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)))  # fmt: skip
    sd = load_file(classic / "model.safetensors")
    del sd["bert.encoder.layer.1.output.dense.weight"]
    save_file(sd, classic / "model.safetensors", metadata={"format": "pt"})
    hc = {**HUB_CONFIG, "hidden_size": 32, "intermediate_size": 48}
    sd = published_state_dict(hc)
    mosaic = write_published(tmp_path / "mosaic", {k: v for k, v in sd.items() if "layer.1.mlp.wo.weight" not in k}, hc, "bin")  # fmt: skip
    for folder, name in ((classic, "bert.encoder.layer.1.output.dense.weight"), (mosaic, "bert.encoder.layer.1.mlp.wo.weight")):  # fmt: skip
        with pytest.raises(
            RecipeError, match=rf"{folder}' lacks 1 of the model's weights \(e\.g\. '{name}'\)"
        ):
            load_hf_bert(str(folder), key="model.init_from_hf")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmfoundry_lite.cli", *args], capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_errors_at_the_hf_border_are_one_line_exit_2(good_llama, tmp_path, llama_tok):
    """generate on a tokenizer-less folder and on an incomplete one; export given an HF folder for a checkpoint."""
    bare = _save(tmp_path / "no-tokenizer", _llama(llama_tok))
    incomplete, _ = _broken("no-weights", good_llama, tmp_path)
    runs = [
        (("generate", str(bare), "--prompt", "Hi"), [str(bare), "has no tokenizer", "--tokenizer DIR"]),
        (("generate", str(incomplete), "--prompt", "Hi"), [str(incomplete), "no weights"]),
        (
            ("export", str(good_llama), str(tmp_path / "out")),
            [str(good_llama), "is a Hugging Face model folder"],
        ),
    ]
    for args, words in runs:
        r = _cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_hf_baselines_refuse_incomplete_checkpoints(good_llama, tmp_path, llama_tok, bert_tok):
    """hf_causal_lm / hf_bert's init_from_hf: transformers would initialise a missing weight randomly and warn."""
    from transformers import BertConfig, BertModel

    incomplete, _ = _broken("missing-tensor", good_llama, tmp_path)
    with pytest.raises(
        RecipeError, match=r"lacks 1 of the model's weights .*model\.layers\.1\.mlp\.down_proj"
    ):
        registry.build("models", {"name": "hf_causal_lm", "init_from_hf": str(incomplete)}, "model", tokenizer=llama_tok)  # fmt: skip
    composer, _ = _broken("composer-folder", good_llama, tmp_path)
    with pytest.raises(RecipeError, match="is a Composer checkpoint folder"):
        registry.build("models", {"name": "hf_causal_lm", "init_from_hf": str(composer)}, "model", tokenizer=llama_tok)  # fmt: skip
    # A BertModel checkpoint (no MLM head) still starts hf_bert: the head is trained fresh.
    trunk = _save(tmp_path / "trunk", BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=48)))  # fmt: skip
    model = registry.build(
        "models", {"name": "hf_bert", "init_from_hf": str(trunk)}, "model", tokenizer=bert_tok
    )
    assert model.model.config.hidden_size == 32


def test_a_cached_hub_name_with_an_organisation_imports(good_llama, tmp_path):
    """`model.init_from_hf: org/name` is a Hub id, not a missing local folder: offline, the cached copy loads."""
    import shutil

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(good_llama, repo / "snapshots" / "abc123")
    code = "from llmfoundry_lite.models.llama import load_hf_llama; print(load_hf_llama('tiny-org/tiny-llama')[0].n_layers)"  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr[-2000:]


def test_rope_scaling_in_a_recipe_is_checked(llama_tok):
    """``model.rope_scaling`` (what init_from_hf sets) names the key for a scaling not implemented or incomplete."""
    block = {"name": "llama", "d_model": 32, "n_layers": 1, "n_heads": 4, "ffn_hidden_size": 48}
    for scaling, key in (({"rope_type": "yarn", "factor": 2.0}, "model.rope_scaling"),
                         ({"rope_type": "llama3", "factor": 8.0}, "model.rope_scaling.low_freq_factor")):  # fmt: skip
        with pytest.raises(RecipeError) as e:
            registry.build("models", {**block, "rope_scaling": scaling}, "model", tokenizer=llama_tok)
        assert e.value.key == key, str(e.value)
    model = registry.build("models", {**block, "rope_scaling": {"rope_type": "linear", "factor": 2}}, "model", tokenizer=llama_tok)  # fmt: skip
    assert model.model.rotary.scaling == {"rope_type": "linear", "factor": 2}


@pytest.mark.parametrize("kind", ["no-weights", "truncated"])
def test_eval_on_a_broken_hf_folder_is_one_line(kind, good_llama, tmp_path):
    """`eval HF_DIR` hands the folder to lm-eval's HFLM; what transformers would raise is said in one line first."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the eval extra has it)")
    from llmfoundry_lite.apps.evaluate.harness import build_lm

    path, _ = _broken(kind, good_llama, tmp_path)
    with pytest.raises(RecipeError) as e:
        build_lm(str(path), device="cpu")
    assert e.value.key == "CHECKPOINT" and str(path) in str(e.value) and "\n" not in str(e.value), str(
        e.value
    )
