"""Recipe sections -> Composer objects (tokenizer, model, loaders refused when they could never yield a batch,
optimizer, scheduler, algorithms, callbacks, loggers), and the built-in registry entries wrapping Composer and torch."""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer import algorithms as ca
from composer import callbacks as cc
from composer import loggers as cl
from composer import metrics as cm
from composer import optim as co
from omegaconf import DictConfig

from llmfoundry_lite import registry
from llmfoundry_lite.batch import check_vocab_fits
from llmfoundry_lite.data.checks import check_finetune_fit, check_loader, check_loader_fit
from llmfoundry_lite.data.loaders import SplitTooSmall
from llmfoundry_lite.errors import RecipeError, first_line
from llmfoundry_lite.recipe import COMPONENT_SECTIONS, MULTI_SECTIONS, iter_multi
from llmfoundry_lite.recipe import section as recipe_section
from llmfoundry_lite.train.checks import WANDB_FIX
from llmfoundry_lite.train.optim import DecoupledAdamW

# Names follow llm-foundry's, so recipes written for it read the same here.
for _name, _obj in {
    "decoupled_adamw": DecoupledAdamW,  # Composer's, with torch's fused update (train/optim.py)
    "decoupled_sgdw": co.DecoupledSGDW,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}.items():
    registry.optimizers.register(_name, func=_obj)

for _name, _obj in {
    "constant": co.ConstantScheduler,
    "constant_with_warmup": co.ConstantWithWarmupScheduler,
    "cosine_decay": co.CosineAnnealingScheduler,
    "cosine_with_warmup": co.CosineAnnealingWithWarmupScheduler,
    "cosine_warm_restarts": co.CosineAnnealingWarmRestartsScheduler,
    "linear_decay": co.LinearScheduler,
    "linear_decay_with_warmup": co.LinearWithWarmupScheduler,
    "multistep": co.MultiStepScheduler,
    "multistep_with_warmup": co.MultiStepWithWarmupScheduler,
    "polynomial": co.PolynomialScheduler,
    "polynomial_with_warmup": co.PolynomialWithWarmupScheduler,
    "exponential": co.ExponentialScheduler,
    "step": co.StepScheduler,
}.items():
    registry.schedulers.register(_name, func=_obj)

for _name, _obj in {
    "alibi": ca.Alibi,
    "ema": ca.EMA,
    "gated_linear_units": ca.GatedLinearUnits,
    "gradient_clipping": ca.GradientClipping,
    "label_smoothing": ca.LabelSmoothing,
    "layer_freezing": ca.LayerFreezing,
    "low_precision_layernorm": ca.LowPrecisionLayerNorm,
    "sam": ca.SAM,
    "seq_length_warmup": ca.SeqLengthWarmup,
    "stochastic_depth": ca.StochasticDepth,
    "swa": ca.SWA,
}.items():
    registry.algorithms.register(_name, func=_obj)

for _name, _obj in {
    "activation_monitor": cc.ActivationMonitor,
    "early_stopper": cc.EarlyStopper,
    "lr_monitor": cc.LRMonitor,
    "memory_monitor": cc.MemoryMonitor,
    "nan_monitor": cc.NaNMonitor,
    "optimizer_monitor": cc.OptimizerMonitor,
    "runtime_estimator": cc.RuntimeEstimator,
    "speed_monitor": cc.SpeedMonitor,
    "system_metrics_monitor": cc.SystemMetricsMonitor,
    "threshold_stopper": cc.ThresholdStopper,
}.items():
    registry.callbacks.register(_name, func=_obj)


class WandBLogger(cl.WandBLogger):
    """Weights & Biases logger (Composer's); the resolved recipe becomes the run config."""

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
    ) -> None:
        """Fetch an artifact; 'not found' before ``init`` so autoresume's first look does not crash."""
        # Composer's autoresume asks every logger for a checkpoint before the run is initialised, and
        # WandBLogger then raises RuntimeError (no entity yet) instead of FileNotFoundError.
        if not self.entity or not self.project:
            raise FileNotFoundError(remote_file_name)
        super().download_file(remote_file_name, destination, overwrite, progress_bar)

    def init(self, state: Any, logger: Any) -> None:
        """Start the wandb run; a missing login or an unreachable server is one line naming the fix."""
        import wandb

        try:
            super().init(state, logger)
        except wandb.errors.Error as e:  # e.g. UsageError: api_key not configured (no-tty)
            first = first_line(e)
            raise RecipeError(f"wandb cannot start ({first}); {WANDB_FIX}", key="loggers.wandb") from None


for _name, _obj in {
    "file": cl.FileLogger,
    "inmemory": cl.InMemoryLogger,
    "mlflow": cl.MLFlowLogger,
    "tensorboard": cl.TensorboardLogger,
    "wandb": WandBLogger,
}.items():
    registry.loggers.register(_name, func=_obj)

for _name, _obj in {
    "language_cross_entropy": cm.LanguageCrossEntropy,
    "language_perplexity": cm.LanguagePerplexity,
    "masked_accuracy": cm.MaskedAccuracy,
    "cross_entropy": cm.CrossEntropy,
    "loss": cm.LossMetric,
}.items():
    registry.metrics.register(_name, func=_obj)


def build_tokenizer(cfg: Any) -> Any:
    """The recipe's tokenizer (a Hugging Face ``PreTrainedTokenizerBase``)."""
    return registry.build(COMPONENT_SECTIONS["tokenizer"], recipe_section(cfg, "tokenizer"), "tokenizer")


def build_model(cfg: Any, tokenizer: Any = None) -> Any:
    """The recipe's Composer model (builds the tokenizer first unless given)."""
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg)
    block = recipe_section(cfg, "model")
    vocab = block.get("vocab_size") if isinstance(block, dict) else None
    if isinstance(vocab, int) and tokenizer is not None and not block.get("init_from_hf"):
        check_vocab_fits(vocab, len(tokenizer), "model.vocab_size")
    return registry.build("models", block, "model", tokenizer=tokenizer)


def compile_model(cfg: Any, model: torch.nn.Module) -> list[Any]:
    """Apply the recipe's ``compile:`` to each block of ``model`` in place; the callbacks that report on it."""
    from llmfoundry_lite.recipe import compile_settings
    from llmfoundry_lite.train.compile import CompileMonitor, apply_compile

    settings = compile_settings(recipe_section(cfg, "compile"))
    if settings is None:
        return []
    apply_compile(model, settings, (recipe_section(cfg, "model") or {}).get("name", "model"))
    return [CompileMonitor(settings.warn_recompiles)]


def build_dataloader(cfg: Any, section: str, tokenizer: Any, device_batch_size: int) -> Any:
    """A train or eval dataloader (DataSpec or DataLoader) from a recipe section."""
    block = recipe_section(cfg, section)
    if isinstance(block, dict) and block.get("name") in ("text", "finetune"):
        # The same checks as `validate`, so `train` never runs on data that does not fit the recipe.
        index = check_loader(section, block)
        if index is not None:
            model_name = (recipe_section(cfg, "model") or {}).get("name")
            has_mask = None if tokenizer is None else getattr(tokenizer, "mask_token", None) is not None
            check_loader_fit(section, block, index, model_name, has_mask)
            check_finetune_fit(section, block, index, model_name)
    return registry.build(
        "dataloaders",
        block,
        section,
        tokenizer=tokenizer,
        device_batch_size=device_batch_size,
    )


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return registry.build("optimizers", recipe_section(cfg, "optimizer"), "optimizer", params=params)


def build_scheduler(cfg: Any) -> Any:
    """The LR scheduler, or None."""
    block = recipe_section(cfg, "scheduler")
    return None if block is None else registry.build("schedulers", block, "scheduler")


def build_multi(cfg: Any, section: str) -> list[Any]:
    """All algorithms, callbacks or loggers of a recipe section."""
    out = []
    for keypath, default_name, block in iter_multi(section, recipe_section(cfg, section)):
        out.append(registry.build(MULTI_SECTIONS[section], block or {}, keypath, default_name))
    if section == "callbacks":
        from llmfoundry_lite.train.callbacks.smoe_schedule import recipe_callbacks

        out += loader_callbacks(cfg, out) + recipe_callbacks(recipe_section(cfg, "model"), out)
    return out


def loader_callbacks(cfg: Any, callbacks: list[Any]) -> list[Any]:
    """Callbacks a loader needs: ``stream_counts`` for a mixture (``train_loader.streams``) unless listed."""
    from llmfoundry_lite.train.callbacks.stream_counts import StreamCounts

    block = recipe_section(cfg, "train_loader")
    if (
        not isinstance(block, dict)
        or not block.get("streams")
        or any(isinstance(c, StreamCounts) for c in callbacks)
    ):
        return []
    return [StreamCounts()]


def build_loader(cfg: DictConfig, section: str, tokenizer: Any, device_batch_size: int, world: int) -> Any:
    """The ``train_loader``/``eval_loader`` of a recipe, refused when it could never yield a batch.

    An ``eval_loader`` with ``streams`` gives a list of Composer Evaluators, one per stream, labelled
    ``eval/<stream>`` (metrics ``metrics/eval/<stream>/LanguageCrossEntropy``, ...).
    """
    block = recipe_section(cfg, section)
    if section == "eval_loader" and isinstance(block, dict) and block.get("streams") is not None:
        return build_stream_evaluators(cfg, block, tokenizer, device_batch_size, world)
    try:
        loader = build_dataloader(cfg, section, tokenizer, device_batch_size)
    except SplitTooSmall as e:  # the text loader checks before it starts any worker
        message = too_few_samples(cfg, section, e.per_rank, e.batch, e.total, world)
        raise RecipeError(message, key=section) from None
    check_loader_batches(cfg, section, loader, world)
    return loader


def build_stream_evaluators(
    cfg: DictConfig, block: dict, tokenizer: Any, device_batch_size: int, world: int
) -> list[Any]:
    """One Evaluator per ``eval_loader.streams`` entry: the loader block with that stream's folder."""
    from composer.core import Evaluator

    from llmfoundry_lite.data.mixture import refuse_folder_keys, stream_blocks

    if block.get("name") != "text":
        raise RecipeError("streams are a `text` loader setting", key="eval_loader.streams")
    refuse_folder_keys(block, "eval_loader.")
    evaluators = []
    for name, stream in stream_blocks(block["streams"], "eval_loader.streams", weights=False).items():
        keypath = f"eval_loader.streams.{name}"
        one = {**{k: v for k, v in block.items() if k != "streams"}, **stream}
        index = check_loader(keypath, one)
        if index is not None:
            model_name = (recipe_section(cfg, "model") or {}).get("name")
            has_mask = None if tokenizer is None else getattr(tokenizer, "mask_token", None) is not None
            check_loader_fit(keypath, one, index, model_name, has_mask)
        try:
            loader = registry.build(
                "dataloaders", one, keypath, tokenizer=tokenizer, device_batch_size=device_batch_size
            )
        except SplitTooSmall as e:
            message = too_few_samples(cfg, "eval_loader", e.per_rank, e.batch, e.total, world, one)
            raise RecipeError(message, key=keypath) from None
        check_loader_batches(cfg, "eval_loader", loader, world, one, keypath)
        evaluators.append(Evaluator(label=f"eval/{name}", dataloader=loader))
    return evaluators


def check_loader_batches(
    cfg: DictConfig,
    section: str,
    loader: Any,
    world: int,
    block: Optional[dict] = None,
    key: Optional[str] = None,
) -> None:
    """RecipeError naming ``section`` when one rank's share of its split is less than one batch under drop_last.

    Such a loader yields no batch at all: Composer would loop over empty epochs forever (train) or evaluate
    nothing. For any registered loader; datasets that cannot tell their size (iterable ones without
    ``__len__``) are left to ``EmptyEpochGuard``.
    """
    dl = getattr(loader, "dataloader", loader)  # a DataSpec or a DataLoader
    dataset, batch = getattr(dl, "dataset", None), getattr(dl, "batch_size", None)
    if dataset is None or not batch:
        return
    try:
        per_rank = len(dl.sampler)  # a map-style dataset: the sampler decides what a rank sees
    except (AttributeError, TypeError):
        try:
            per_rank = len(dataset)  # streaming: already this rank's share
        except TypeError:
            return
    drop_last = bool(getattr(dl, "drop_last", False))
    if per_rank >= (batch if drop_last else 1):
        return
    total = getattr(dataset, "epoch_size", None) or per_rank * world
    message = too_few_samples(cfg, section, per_rank, batch, int(total), world, block)
    raise RecipeError(message, key=key or section)


def too_few_samples(
    cfg: DictConfig,
    section: str,
    per_rank: int,
    batch: int,
    total: int,
    world: int,
    block: Optional[dict] = None,
) -> str:
    """The message for a split with fewer samples per rank than one batch: the numbers and the fix.

    ``block``: the loader block read from (an eval stream's), else the recipe's ``section``.
    """
    block = block if block is not None else (cfg.get(section) or {})
    where = f"split {block.get('split')!r} of " if block.get("split") else ""
    if block.get("streams"):
        where += f"the mixture of {', '.join(map(str, block['streams']))}"
    else:
        where += repr(str(block.get("remote") or block.get("local") or "the dataset"))
    if per_rank == 0:
        return f"{where} has no samples; check it with `llmfoundry-lite data inspect`"
    ranks = f", {per_rank} per rank on {world} ranks" if world > 1 else ""
    if section == "train_loader":
        setting = f"global_train_batch_size {cfg.global_train_batch_size}"
        if world > 1:
            setting += f" = {batch} per rank x {world} ranks"
        fix = f"set global_train_batch_size to at most {per_rank * world}, or use more data"
        what = "no batch could ever be trained"
    else:
        setting = f"device_eval_batch_size {batch}"
        fix = f"set device_eval_batch_size to at most {per_rank}, or {section}.drop_last: false"
        what = "nothing would be evaluated"
    return f"{where} has {total} samples{ranks}, fewer than one batch ({setting}, drop_last: true), so {what}; {fix}"
