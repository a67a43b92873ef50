"""The one checkpoint locator and loader (llmfoundry_lite/checkpoints.py) that `glue` and `export` share; both
verbs' tests run it on real Composer checkpoints, this file covers the folder layouts and the errors."""

from __future__ import annotations

import os
import time

import pytest
import torch

from llmfoundry_lite.checkpoints import find_checkpoint, load_model_state
from llmfoundry_lite.errors import RecipeError


def _save(path, model_state, **state):
    torch.save({"state": {"model": model_state, **state}}, path)
    return path


def test_a_save_folder_means_its_latest_complete_checkpoint(tmp_path):
    old = _save(tmp_path / "ep0-ba2-rank0.pt", {"w": torch.zeros(1)})
    assert find_checkpoint(old) == old  # a file is itself
    assert find_checkpoint(tmp_path) == old  # the only one
    new = _save(tmp_path / "ep0-ba4-rank0.pt", {"w": torch.ones(1)})
    os.utime(old, (time.time() - 60, time.time() - 60))
    (tmp_path / "latest-rank0.pt").symlink_to(old.name)
    assert find_checkpoint(tmp_path) == old  # Composer's pointer wins over modification times
    (tmp_path / "latest-rank0.pt").unlink()
    assert find_checkpoint(tmp_path) == new  # else the newest
    # A kill while saving: the pointer dangles and the newest file is cut short; the last whole one is used.
    (tmp_path / "latest-rank0.pt").symlink_to("ep0-ba6-rank0.pt")
    (tmp_path / "ep0-ba6-rank0.pt").write_bytes(new.read_bytes()[:100])
    assert find_checkpoint(tmp_path) == new
    (tmp_path / "ep0-ba6-rank0.pt").unlink()  # and a pointer to a file that is gone
    assert find_checkpoint(tmp_path) == new
    assert float(load_model_state(tmp_path)["w"]) == 1.0


def test_locator_errors_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"no such checkpoint .*missing\.pt.*does not exist") as e:
        find_checkpoint(tmp_path / "missing.pt", key="glue.checkpoint")
    assert e.value.key == "glue.checkpoint"
    with pytest.raises(RecipeError, match=r"no Composer checkpoint \(\*\.pt\) in folder"):
        find_checkpoint(tmp_path, key="CHECKPOINT")
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / ".metadata").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"sharded \(FSDP\) checkpoint.*state_dict_type: full"):
        find_checkpoint(tmp_path / "sharded")


def test_model_state_without_wrapper_prefixes(tmp_path):
    ckpt = _save(
        tmp_path / "c.pt",
        {
            "module.encoder.weight": torch.ones(2),  # DDP
            "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.w": torch.zeros(1),
            "_orig_mod.head.bias": torch.zeros(3),  # torch.compile
            "_extra_state": {"family": "llama"},
        },
        optimizers={"adam": {}},
    )
    state = load_model_state(ckpt)
    assert sorted(state) == ["_extra_state", "encoder.weight", "head.bias", "model.layers.0.w"]
    assert state["_extra_state"] == {"family": "llama"}


def test_loader_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(RecipeError, match=r"cannot read checkpoint .*junk\.pt"):
        load_model_state(junk, key="CHECKPOINT")
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, other)  # a bare state dict, not a Composer checkpoint
    with pytest.raises(RecipeError, match=r"not a Composer checkpoint \(no state\['model'\]\)"):
        load_model_state(other)
