"""`generate` callback: sample continuations of fixed prompts during training and log them.

Recipe block::

    callbacks:
      generate:
        prompts: ["The meaning of life is", "def fibonacci(n):"]
        interval: 500ba          # any Composer duration: ba, sp, tok, ep, dur
        max_new_tokens: 48
        temperature: 0.8         # 0 = greedy
        top_k: 50

Output goes to the console (rank 0) and to every logger as a table ``generations`` (columns step, prompt,
generation), e.g. a wandb Table. Works with models that have ``generate(input_ids, ...)`` and a ``tokenizer``
(the ``llama`` model); under FSDP every rank runs the same number of forward passes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError


def _unwrap(model: Any) -> Any:
    """The ComposerModel under DDP (FSDP wraps children, not the ComposerModel itself)."""
    return getattr(model, "module", model) if not hasattr(model, "generate") else model


@registry.callbacks.register("generate")
class Generate(Callback):
    """Sample text from prompts every `interval` and log it to the console and loggers."""

    def __init__(
        self,
        prompts: list[str],
        interval: str = "1000ba",
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: Optional[int] = 50,
        seed: int = 17,
        at_end: bool = True,
    ):
        if not prompts:
            raise RecipeError("give at least one prompt", key="callbacks.generate.prompts")
        try:
            Time.from_timestring(interval)
        except Exception:
            raise RecipeError(
                f"malformed interval {interval!r}; use e.g. '500ba', '0.25dur' or '1ep'",
                key="callbacks.generate.interval",
            ) from None
        if max_new_tokens <= 0:
            raise RecipeError(
                f"must be positive, got {max_new_tokens}", key="callbacks.generate.max_new_tokens"
            )
        if temperature < 0:
            raise RecipeError(f"must be >= 0, got {temperature}", key="callbacks.generate.temperature")
        self.prompts = list(prompts)
        self.interval = interval
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._check = create_interval_scheduler(
            interval, include_end_of_training=at_end, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.history: list[tuple[int, str, str]] = []  # (batch, prompt, generation), for inspection

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Generate on BATCH_END events that fall on the interval."""
        if event == Event.BATCH_END and self._check(state, event):
            self.generate(state, logger)

    def generate(self, state: State, logger: Logger) -> list[str]:
        """Sample one continuation per prompt, log them, and return the generated texts."""
        from composer.core.precision import get_precision_context

        model = _unwrap(state.model)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or not hasattr(model, "generate"):
            if dist.get_global_rank() == 0:
                print("[generate] skipped: the model has no tokenizer/generate()", flush=True)
            return []
        device = next(model.parameters()).device
        # Same seed on every rank: identical samples, identical number of forward passes under FSDP.
        gen = torch.Generator().manual_seed(self.seed + int(state.timestamp.batch))
        eos = getattr(tokenizer, "eos_token_id", None)
        was_training = model.training
        model.eval()
        texts = []
        try:
            with torch.no_grad(), get_precision_context(state.precision):
                for prompt in self.prompts:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                    if eos is not None and ids.shape[1] > 1 and ids[0, -1].item() == eos:
                        ids = ids[:, :-1]  # tokenizers that append </s> would end the prompt as a document
                    out = model.generate(
                        ids.to(device),
                        max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        eos_token_id=eos,
                        generator=gen,
                        stop_early=dist.get_world_size() == 1,
                    )
                    texts.append(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
        finally:
            model.train(was_training)
        step = int(state.timestamp.batch)
        rows = [[step, p, t] for p, t in zip(self.prompts, texts)]
        self.history.extend((step, p, t) for p, t in zip(self.prompts, texts))
        if dist.get_global_rank() == 0:
            for p, t in zip(self.prompts, texts):
                print(f"[generate] ba {step}: {p!r} -> {t!r}", flush=True)
        logger.log_table(columns=["step", "prompt", "generation"], rows=rows, name="generations", step=step)
        return texts
