"""Both model families under FSDP exactly as Composer 0.32 wraps them, on two CPU (gloo) processes.

Composer's ``prepare_fsdp_module`` makes each *child* of the ComposerModel an FSDP root (FULL_SHARD,
``use_orig_params=True``) and asks that child for ``fsdp_wrap_fn`` / ``activation_checkpointing_fn``. We call
that very function; its only CUDA-specific line (``device_id=torch.cuda.current_device()``) is answered
with the CPU device, which FSDP accepts on gloo. Each rank runs the same batch, so the gradient FSDP averages
equals the unwrapped model's: loss and every gradient must match it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch

WORLD = 2
N_LAYERS = 2
SMOE = {"name": "smoe_dropout", "n_experts": 4, "k": 2}

# name -> (family, FSDP settings, model keyword arguments)
CASES: dict[str, tuple[str, dict, dict]] = {
    "bert": ("bert", {}, {}),
    "bert_ac": ("bert", {"activation_checkpointing": True}, {}),
    "llama": ("llama", {}, {}),
    "llama_tied_ac": ("llama", {"activation_checkpointing": True}, {"tie_embeddings": True}),
    # SMoE-Dropout FFNs (models/ffn.py) at k=2 of 4: routed experts stay inside their block's unit
    "llama_smoe_ac": ("llama", {"activation_checkpointing": True}, {"ffn": {**SMOE, "router": "learned"}}),
    "bert_smoe": ("bert", {}, {"ffn": SMOE}),
    # the Hugging Face baselines: BertForMaskedLM (tied decoder) and LlamaForCausalLM
    "hf_bert_ac": ("hf_bert", {"activation_checkpointing": True}, {}),
    "hf_causal_lm": ("hf_causal_lm", {}, {}),
}


def _build(family: str, kw: dict):
    from llmfoundry_lite.models.bert import build_mosaic_bert
    from llmfoundry_lite.models.hf import build_hf_bert, build_hf_causal_lm
    from llmfoundry_lite.models.llama import build_llama

    torch.manual_seed(0)
    if family == "hf_bert":
        shape = dict(d_model=32, n_layers=N_LAYERS, n_heads=4, intermediate_size=48)
        return build_hf_bert(vocab_size=100, attention_dropout=0.0, hidden_dropout=0.0, **shape)
    if family == "hf_causal_lm":
        shape = dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2)
        return build_hf_causal_lm(vocab_size=128, config=dict(intermediate_size=64, **shape))
    if family == "bert":  # tied MLM head, ALiBi, unpadding; no dropout so two forwards agree
        return build_mosaic_bert(
            vocab_size=100,
            d_model=32,
            n_layers=N_LAYERS,
            n_heads=4,
            intermediate_size=48,
            hidden_dropout=0.0,
            **kw,
        )
    return build_llama(
        vocab_size=128, d_model=32, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, max_seq_len=16, **kw
    )


def _batch(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if family.endswith("bert"):
        ids = torch.randint(5, 100, (3, 12), generator=g)
        mask = (torch.arange(12)[None] < torch.tensor([[12], [7], [3]])).long()
        ids = ids * mask
        labels = torch.where((torch.rand(3, 12, generator=g) < 0.4) & mask.bool(), ids, -100)
        labels[0, 0] = ids[0, 0]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "labels": labels,
        }
    ids = torch.randint(0, 128, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _strip(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _run_case(family: str, fsdp: dict, kw: dict) -> dict:
    from composer.distributed.dist_strategy import prepare_fsdp_module
    from composer.utils import FSDPConfig
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.bert.modeling_bert import BertLayer as HFBertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llmfoundry_lite.models.bert import BERT
    from llmfoundry_lite.models.llama import LLAMA

    block = {  # our families' units are the blocks their specs declare
        "bert": BERT.blocks,
        "llama": LLAMA.blocks,
        "hf_bert": HFBertLayer,
        "hf_causal_lm": LlamaDecoderLayer,
    }[family]
    model = _build(family, kw)
    ref = copy.deepcopy(model)
    batch = _batch(family)
    ref_loss = ref.loss(ref(batch), batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}  # not a frozen router
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(batch).logits

    prepare_fsdp_module(model, None, FSDPConfig(**fsdp), precision="fp32", device="cpu")
    units = [m for m in model.modules() if isinstance(m, FSDP)]
    loss = model.loss(model(batch), batch)
    loss.backward()
    with FSDP.summon_full_params(model, with_grads=True):
        grads = {_strip(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        grads = {n: g for n, g in grads.items() if n not in map(_strip, frozen) or bool(g.any())}
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits  # the lazily computed full logits run the head again, outside forward
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    return {
        "blocks": sum(isinstance(m, block) for m in model.modules()),
        "block_units": sum(isinstance(u.module, block) for u in units),
        "roots": sorted(n for n, c in model.named_children() if isinstance(c, FSDP)),
        "checkpointed_blocks": sum(
            isinstance(m, CheckpointWrapper) and isinstance(m._checkpoint_wrapped_module, block)
            for m in model.modules()
        ),
        "loss": float(loss),
        "ref_loss": float(ref_loss),
        "grad_diff": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
        "grad_scale": max(float(g.abs().max()) for g in ref_grads.values()),
        "logits_diff": float((logits - ref_logits).abs().max()),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    # Composer passes device_id=torch.cuda.current_device(); on a CPU machine FSDP's device is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    results = {}
    for name, (family, fsdp, kw) in CASES.items():
        try:
            results[name] = _run_case(family, fsdp, kw)
        except Exception as e:  # reported per case by the tests below (both ranks fail alike: no hang)
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    """Run every case on two gloo ranks once; per-rank results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(port, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP workers did not finish in 240 s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_composer_fsdp_shards_each_block_and_matches_unwrapped_model(fsdp_results, case):
    for rank, results in enumerate(fsdp_results):
        r = results[case]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        family, fsdp, _ = CASES[case]
        assert r["blocks"] == N_LAYERS and r["block_units"] == N_LAYERS, r  # one FSDP unit per block
        expected_roots = ["encoder", "head"] if family == "bert" else ["model"]  # HF: ComposerModel.model
        assert r["roots"] == expected_roots
        assert r["checkpointed_blocks"] == (N_LAYERS if fsdp.get("activation_checkpointing") else 0)
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, r
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), r  # tied embedding: lookup + decoder grads
        assert r["logits_diff"] <= 1e-5, r
