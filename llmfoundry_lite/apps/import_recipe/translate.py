"""An llm-foundry (or mosaicml/examples BERT) YAML translated section by section into a recipe here, with every
key that has no equivalent listed with the reason (the model block is :mod:`.models`').

Read from the formats of llm-foundry's ``scripts/train/yamls/pretrain`` (``mpt-*.yaml``, ``hf-llama-*.yaml``:
``variables``, ``model`` with ``mpt_causal_lm`` / ``hf_causal_lm``, ``tokenizer``, loaders with a nested
``dataset:``, ``fsdp_config``, ...) and of mosaicml/examples ``benchmarks/bert/yamls/main`` (``mosaic_bert`` with
``model_config``, the tokenizer named inside the model and dataset blocks, top-level free variables).

What translates and what does not:

* Interpolations (``${variables.x}``, ``${data_local}``) are resolved; the variables themselves are then inlined.
* MPT becomes the LLaMA decoder only in what means the same: width, depth, heads, KV heads, context, vocabulary,
  tied embeddings, init device, RoPE base. MPT's defaults (learned positions or ALiBi, LayerNorm, a GELU MLP with
  biases, dropout, QK clipping) are not LLaMA's; each one the source uses is listed, and the recipe has LLaMA's
  (RoPE, RMSNorm, SwiGLU without biases): it is a LLaMA model of MPT's size, not the same network.
* Nothing is dropped silently: every key is mapped, inlined (a variable) or listed as unmapped with a reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Optional

from llmfoundry_lite.apps.import_recipe.models import MODEL_TRANSLATORS
from llmfoundry_lite.errors import RecipeError, first_line, suggest

# Top-level keys with the same name and meaning here (Composer Trainer arguments, as in llm-foundry).
SAME_TOP_LEVEL = (
    "run_name",
    "seed",
    "max_seq_len",
    "max_duration",
    "eval_interval",
    "eval_first",
    "eval_subset_num_batches",
    "global_train_batch_size",
    "device_train_microbatch_size",
    "device_eval_batch_size",
    "precision",
    "save_folder",
    "save_interval",
    "save_num_checkpoints_to_keep",
    "save_overwrite",
    "save_weights_only",
    "load_path",
    "load_weights_only",
    "load_strict_model_weights",
    "autoresume",
    "console_log_interval",
    "log_to_console",
    "progress_bar",
    "python_log_level",
    "dist_timeout",
)
DURATION_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")
# Top-level keys of llm-foundry with no equivalent here, and why.
UNMAPPED_TOP_LEVEL = {
    "icl_tasks": "in-context-learning evaluation is not part of this framework; export the checkpoint "
    "(llmfoundry-lite export) and run llm-foundry's eval or lm-evaluation-harness on it",
    "eval_gauntlet": "in-context-learning evaluation is not part of this framework (see icl_tasks)",
    "icl_seq_len": "in-context-learning evaluation is not part of this framework (see icl_tasks)",
    "icl_subset_num_batches": "in-context-learning evaluation is not part of this framework (see icl_tasks)",
    "eval_loaders": "one eval_loader here; translate the one you want as eval_loader",
    "save_filename": "checkpoint file names are fixed here (Composer's default ep{epoch}-ba{batch}-rank{rank}.pt)",
    "expandable_segments": "an allocator setting, not a recipe key: export "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before launching",
    "code_paths": "recipes load no extra code files; add components through entry-point plugins",
    "hf_save_path": "export to Hugging Face after training: llmfoundry-lite export CHECKPOINT OUT_DIR",
    "compile_config": "torch.compile is not configured from the recipe here",
    "load_ignore_keys": "no equivalent (load_path loads the whole model state)",
    "metadata": "no equivalent (the resolved recipe is saved next to the checkpoints)",
}
# llm-foundry callbacks without a Composer/llmfoundry_lite counterpart, and why.
UNMAPPED_CALLBACKS = {
    "scheduled_gc": "Composer 0.32 has no scheduled_gc callback; Python's garbage collector runs as usual",
    "hf_checkpointer": "export to Hugging Face after training: llmfoundry-lite export CHECKPOINT OUT_DIR",
    "mono_ckpt_saver": "set fsdp.state_dict_type: full for monolithic checkpoints",
    "generate_callback": "use the `generate` callback (prompts, interval, max_new_tokens)",
    "fdiff_metrics": "no equivalent",
    "eval_output_logging": "no equivalent",
}
# Framework-set or renamed keys of the text loader's dataset block.
DATASET_RENAMED = {
    "mlm_probability": "train_loader.collator.mlm_probability",
    "tokenizer_name": "tokenizer.path",
    "max_seq_len": "max_seq_len",
}


@dataclasses.dataclass
class Translation:
    """A translated recipe (plain data), the keys without an equivalent (key -> reason), and inlined variables."""

    source: str
    kind: str
    recipe: dict
    unmapped: dict[str, str]
    notes: dict[str, str]
    inlined: list[str]
    checked: list[str] = dataclasses.field(default_factory=list)  # what validating the written recipe found

    def report(self, out: Optional[str] = None) -> str:
        """The lines `import-recipe` prints."""
        lines = [f"translated {self.source} ({self.kind})" + (f" -> {out}" if out else "")]
        if self.inlined:
            lines.append(f"variables inlined where they were used: {', '.join(self.inlined)}")
        if self.notes:
            lines.append(f"translated with a difference ({len(self.notes)}):")
            lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        if self.unmapped:
            lines.append(f"no equivalent, not in the recipe ({len(self.unmapped)}):")
            lines += [f"  {k}: {v}" for k, v in self.unmapped.items()]
        else:
            lines.append("every key has an equivalent")
        return "\n".join(lines)


class Translator:
    """Translates the resolved source section by section into ``out``, recording what has no equivalent."""

    def __init__(self, data: dict, referenced: set[str], source: str):
        self.src = data
        self.referenced = referenced
        self.source = source
        self.out: dict[str, Any] = {}
        self.unmapped: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.inlined: list[str] = []
        self.kind = ""
        self.sequence_id = False

    # -- helpers ---------------------------------------------------------------------------------------------

    def _params(self, registry_name: str, entry: str) -> Optional[set[str]]:
        from llmfoundry_lite import registry

        try:
            params, var_kw = registry.signature_params(registry.lookup(registry_name, entry))
        except RecipeError:
            return None
        return None if var_kw else set(params)

    def _component(self, registry_name: str, name: str, block: Any, keypath: str) -> Optional[dict]:
        """``{name, kwargs}`` for an entry that exists here, each unknown argument listed; None if it does not."""
        params = self._params(registry_name, name)
        from llmfoundry_lite import registry

        try:
            registry.lookup(registry_name, name)
        except RecipeError:
            return None
        out: dict[str, Any] = {}
        for k, v in (block or {}).items():
            if k == "name":
                continue
            if params is not None and k not in params:
                self.unmapped[f"{keypath}.{k}"] = f"{name} here takes no {k!r}"
            else:
                out[k] = v
        return out

    # -- sections --------------------------------------------------------------------------------------------

    def run(self) -> None:
        model = self.src.get("model")
        if not isinstance(model, Mapping) or not model.get("name"):
            raise RecipeError(
                "has no model block with a name; is this an llm-foundry training YAML?", key="model"
            )
        name = model["name"]
        if name in MODEL_TRANSLATORS:
            MODEL_TRANSLATORS[name](self, model)
        else:
            raise RecipeError(
                f"model {name!r}{suggest(name, MODEL_TRANSLATORS)} is not one "
                "import-recipe translates; it reads mpt_causal_lm, hf_causal_lm "
                "(llm-foundry) and mosaic_bert (mosaicml/examples)",
                key="model.name",
            )
        self._tokenizer()
        evals = self.src.get("eval_loader")
        if isinstance(evals, list):  # llm-foundry's several labelled eval loaders; one here
            for i, block in enumerate(evals[1:], start=1):
                label = (block or {}).get("label", i)
                self.unmapped[f"eval_loader[{i}]"] = (
                    f"one eval_loader here; {label!r} is left out (the first is kept)"
                )
            if evals and "label" in (evals[0] or {}):
                self.notes["eval_loader[0].label"] = (
                    "the one eval loader here has no label (metrics are eval/...)"
                )
            self.src["eval_loader"] = (
                {k: v for k, v in (evals[0] or {}).items() if k != "label"} if evals else None
            )
        for loader in ("train_loader", "eval_loader"):
            if self.src.get(loader) is not None:
                self._loader(loader, self.src[loader])
        self._optimizer()
        self._scheduler()
        self._multi("algorithms", "algorithms")
        self._multi("callbacks", "callbacks")
        self._multi("loggers", "loggers")
        self._fsdp()
        self._top_level()

    def _tokenizer(self) -> None:
        tok = self.src.get("tokenizer")
        if isinstance(tok, Mapping) and tok.get("name"):
            kwargs = dict(tok.get("kwargs") or {})
            out: dict[str, Any] = {"name": "hf", "path": tok["name"]}
            if "model_max_length" in kwargs:
                out["model_max_length"] = kwargs.pop("model_max_length")
            if kwargs:
                out["kwargs"] = kwargs
            for k in tok:
                if k not in ("name", "kwargs"):
                    self.unmapped[f"tokenizer.{k}"] = "no equivalent in the hf tokenizer block"
            self.out["tokenizer"] = out
            return
        # mosaicml/examples: the tokenizer is named inside the model and dataset blocks.
        name = (self.src.get("model") or {}).get("tokenizer_name") or (
            ((self.src.get("train_loader") or {}).get("dataset") or {}).get("tokenizer_name")
        )
        if not name and (self.src.get("model") or {}).get("name") == "hf_causal_lm":
            name = self.src["model"].get("pretrained_model_name_or_path")
            self.notes["tokenizer"] = "no tokenizer block: the model's own tokenizer is used"
        if not name:
            raise RecipeError("no tokenizer block and no tokenizer_name to take it from", key="tokenizer")
        self.out["tokenizer"] = {"name": "hf", "path": name}

    def _loader(self, section: str, block: Mapping[str, Any]) -> None:
        if block.get("name") != "text":
            raise RecipeError(
                f"loader {block.get('name')!r} is not translated; import-recipe reads pretraining YAMLs (name: text)",
                key=f"{section}.name",
            )
        params = self._params("dataloaders", "text") or set()
        out: dict[str, Any] = {"name": "text"}
        dataset = dict(block.get("dataset") or {})
        mlm_p = dataset.pop("mlm_probability", None)
        seq = dataset.pop("max_seq_len", None)
        if seq is not None:
            top = self.src.get("max_seq_len")
            if top is None:
                self.out["max_seq_len"] = seq
            elif top != seq:
                self.unmapped[f"{section}.dataset.max_seq_len"] = (
                    f"{seq} differs from max_seq_len {top}; a recipe states the sequence length once"
                )
        dataset.pop("tokenizer_name", None)  # the tokenizer block (see tokenizer)
        if dataset.pop("eos_token_id", None) is not None:
            self.unmapped[f"{section}.dataset.eos_token_id"] = (
                "packing separators are written at conversion (data convert --eos/--no-eos), from the tokenizer"
            )
        for k, v in {**dataset, **{k: v for k, v in block.items() if k not in ("name", "dataset")}}.items():
            where = f"{section}.dataset.{k}" if k in dataset else f"{section}.{k}"
            if k == "streams" and isinstance(v, Mapping):
                out["streams"] = self._streams(where, v, weights=section != "eval_loader")
            elif k in params and k not in ("tokenizer", "device_batch_size", "collator", "max_seq_len"):
                out[k] = v
            else:
                self.unmapped[where] = "no equivalent in the text loader"
        if self.out["model"]["name"] == "mosaic_bert":
            out["collator"] = {"name": "mlm", "mlm_probability": 0.15 if mlm_p is None else mlm_p}
        else:
            out["collator"] = {"name": "causal_lm", **({"sequence_id": True} if self.sequence_id else {})}
            if mlm_p is not None:
                self.unmapped[f"{section}.dataset.mlm_probability"] = "a causal LM has no masking"
        self.out[section] = out

    def _streams(self, where: str, streams: Mapping[str, Any], weights: bool) -> dict[str, Any]:
        """llm-foundry's ``dataset.streams`` -> ``streams:`` (same keys: both are streaming's ``Stream``)."""
        from llmfoundry_lite.data.mixture import STREAM_KEYS, WEIGHT_KEYS

        out: dict[str, Any] = {}
        for name, block in streams.items():
            kept: dict[str, Any] = {}
            for k, v in dict(block or {}).items():
                if k in STREAM_KEYS and (weights or k not in WEIGHT_KEYS):
                    kept[k] = v
                elif k in WEIGHT_KEYS:
                    self.unmapped[f"{where}.{name}.{k}"] = "each eval stream is its own evaluator, read whole"
                else:
                    self.unmapped[f"{where}.{name}.{k}"] = "no equivalent per stream here (set on the loader)"
            out[str(name)] = kept
        return out

    def _optimizer(self) -> None:
        opt = dict(self.src.get("optimizer") or {})
        if not opt.get("name"):
            raise RecipeError("missing optimizer block with a name", key="optimizer")
        kwargs = self._component("optimizers", opt["name"], opt, "optimizer")
        if kwargs is None:
            self.notes["optimizer.name"] = (
                f"{opt['name']!r} has no equivalent here; the recipe has decoupled_adamw with its lr, betas and "
                "weight_decay: retune them (see `llmfoundry-lite list optimizers`)"
            )
            kwargs = {k: opt[k] for k in ("lr", "betas", "weight_decay") if k in opt}
            for k in opt:
                if k not in ("name", "lr", "betas", "weight_decay"):
                    self.unmapped[f"optimizer.{k}"] = f"an argument of {opt['name']}"
            self.out["optimizer"] = {"name": "decoupled_adamw", **kwargs}
            return
        self.out["optimizer"] = {"name": opt["name"], **kwargs}

    def _scheduler(self) -> None:
        sch = self.src.get("scheduler")
        if not sch:
            return
        kwargs = self._component("schedulers", sch.get("name", ""), sch, "scheduler")
        if kwargs is None:
            self.unmapped["scheduler"] = (
                f"{sch.get('name')!r} is llm-foundry's; none here (see `llmfoundry-lite list schedulers`): "
                "the run keeps a constant learning rate unless you add one"
            )
            return
        self.out["scheduler"] = {"name": sch["name"], **kwargs}

    def _multi(self, section: str, registry_name: str) -> None:
        value = self.src.get(section)
        if not value:
            return
        items = value.items() if isinstance(value, Mapping) else ((b.get("name"), b) for b in value)
        out: dict[str, Any] = {}
        for name, block in items:
            block = dict(block or {})
            name = block.pop("name", name)
            keypath = f"{section}.{name}"
            if section == "algorithms" and name == "fused_layernorm":
                if self.out["model"]["name"] == "mosaic_bert":
                    self.out["model"]["norm"] = "low_precision_layernorm"
                    self.notes[keypath] = (
                        "apex's fused LayerNorm kernel: the same LayerNorm, here model.norm: "
                        "low_precision_layernorm (LayerNorm in bf16 under autocast)"
                    )
                else:
                    self.unmapped[keypath] = "a LayerNorm kernel; the LLaMA decoder has RMSNorm"
                continue
            if section == "callbacks" and name in UNMAPPED_CALLBACKS:
                self.unmapped[keypath] = UNMAPPED_CALLBACKS[name]
                continue
            kwargs = self._component(registry_name, name, block, keypath)
            if kwargs is None:
                self.unmapped[keypath] = (
                    f"no {registry_name[:-1]} of that name here (llmfoundry-lite list {section})"
                )
                continue
            out[name] = kwargs
        if out:
            self.out[section] = out

    def _fsdp(self) -> None:
        block = self.src.get("fsdp_config")
        if not block:
            return
        from llmfoundry_lite.train.checks import fsdp_keys

        keys = set(fsdp_keys())
        out = {}
        for k, v in block.items():
            if k in keys:
                out[k] = v
            else:
                self.unmapped[f"fsdp_config.{k}"] = "not a field of Composer 0.32's FSDPConfig"
        self.out["fsdp"] = out

    def _top_level(self) -> None:
        handled = {
            "model", "tokenizer", "train_loader", "eval_loader", "optimizer", "scheduler", "algorithms",
            "callbacks", "loggers", "fsdp_config", "variables",
        }  # fmt: skip
        if self.src.get("variables"):
            self.inlined += [f"variables.{k}" for k in self.src["variables"]]
        for k, v in self.src.items():
            if k in handled:
                continue
            if k in SAME_TOP_LEVEL:
                if v is None:
                    continue  # unset: the default here, as there
                if k in DURATION_KEYS and isinstance(v, int) and not isinstance(v, bool):
                    self.notes[k] = f"a bare {v} is {v} epochs to Composer; written as '{v}ep'"
                    v = f"{v}ep"
                if k == "max_seq_len" and "max_seq_len" in self.out and self.out["max_seq_len"] != v:
                    continue
                self.out[k] = v
            elif k == "global_seed":
                self.out.setdefault("seed", v)
                self.inlined.append(k)
            elif k in UNMAPPED_TOP_LEVEL:
                self.unmapped[k] = UNMAPPED_TOP_LEVEL[k]
            elif k in self.referenced:
                self.inlined.append(k)
            else:
                self.unmapped[k] = (
                    "not a training setting of llm-foundry or of this framework, and no ${...} uses it"
                )


_INTERP = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")


def translate(data: Mapping[str, Any], source: str = "<yaml>") -> Translation:
    """Translate a parsed llm-foundry / mosaicml-examples YAML (interpolations unresolved) into a recipe."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw_text = json.dumps(data, default=str)
    referenced = {m.split(".")[0] for m in _INTERP.findall(raw_text)}
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(dict(data)), resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"cannot resolve an interpolation ({first_line(e)})", file=source) from None
    t = Translator(resolved, referenced, source)
    try:
        t.run()
    except RecipeError as e:
        raise RecipeError(e.detail, file=source, key=e.key) from None
    order = [
        "run_name",
        "seed",
        "max_seq_len",
        "tokenizer",
        "model",
        "train_loader",
        "eval_loader",
        "optimizer",
    ]
    recipe = {k: t.out[k] for k in order if k in t.out}
    recipe.update({k: v for k, v in t.out.items() if k not in recipe})
    return Translation(source, t.kind, recipe, t.unmapped, t.notes, t.inlined)
