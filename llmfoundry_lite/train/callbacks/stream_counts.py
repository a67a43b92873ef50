"""`stream_counts`: samples and tokens drawn from each stream of a mixture so far, logged to every logger.

Metrics (every batch, summed over all ranks), for each stream ``NAME`` of ``train_loader.streams``:

==========================  ====================================================================
``data/NAME/samples``       samples of stream NAME trained on since the run started
``data/NAME/tokens``        real tokens (padding left out) of those samples
==========================  ====================================================================

The loader's batch transform (``data/mixture.py``) takes each batch's stream ids out before the model sees them
and leaves the batch's counts in ``dataloader.stream_tally``; this callback adds them up. The totals are saved in
checkpoints, so a resumed run goes on counting where the checkpoint left off. ``train`` adds it to every run whose
train loader has ``streams``; on other loaders it logs nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry_lite import registry


@registry.callbacks.register("stream_counts")
class StreamCounts(Callback):
    """Logs samples and tokens seen per stream of a mixture (``data/<stream>/samples``, ``.../tokens``)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self._pending: Optional[tuple[Any, Any]] = None

    @staticmethod
    def _tally(state: State) -> Any:
        return getattr(state.train_dataloader, "stream_tally", None)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Take the counts of the batch just loaded (its stream ids are already out of the batch)."""
        tally = self._tally(state)
        if tally is None or tally.last is None:
            return
        if self.names != tally.names:
            if self.names:  # a checkpoint of another mixture: start over rather than mislabel the counts
                self.samples, self.tokens = [], []
            self.names = list(tally.names)
        if not self.samples:
            self.samples, self.tokens = [0] * len(self.names), [0] * len(self.names)
        self._pending, tally.last = tally.last, None

    def batch_end(self, state: State, logger: Logger) -> None:
        """Add this batch's counts of every rank to the totals and log them."""
        if self._pending is None:
            return
        samples, tokens = self._pending
        self._pending = None
        local = torch.tensor([list(samples), list(tokens)], dtype=torch.int64)
        both = state.device.tensor_to_device(local)
        dist.all_reduce(both)  # sum over ranks: every rank logs (and checkpoints) the same totals
        both = both.cpu().tolist()
        self.samples = [a + b for a, b in zip(self.samples, both[0])]
        self.tokens = [a + b for a, b in zip(self.tokens, both[1])]
        metrics: dict[str, float] = {}
        for name, s, t in zip(self.names, self.samples, self.tokens):
            metrics[f"data/{name}/samples"] = s
            metrics[f"data/{name}/tokens"] = t
        logger.log_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        """The totals so far, saved in checkpoints."""
        return {"names": list(self.names), "samples": list(self.samples), "tokens": list(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from a checkpoint's totals."""
        self.names = list(state.get("names", []))
        self.samples = [int(x) for x in state.get("samples", [])]
        self.tokens = [int(x) for x in state.get("tokens", [])]
