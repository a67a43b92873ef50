"""lm-evaluation-harness ``LM`` over our decoders: lm-eval's tasks score a ComposerLlama directly (no export).

``DecoderLM`` answers lm-eval's three request types:

- ``loglikelihood(context, continuation)``: requests are sorted longest first, batched, right-padded (causal
  attention never looks right, so padding needs no mask), and the LM head runs only on the positions that
  predict continuation tokens: the last ``len(continuation)`` positions of each row's own length.
- ``loglikelihood_rolling(text)``: lm-eval's rolling windows (each token predicted once, with as much context as
  fits), scored as above and summed per text.
- ``generate_until(context, {until, max_gen_toks})``: greedy, through the model's ``generate`` when it has one,
  in steps of a few tokens so that a stop string ends generation early.

Tokenization follows lm-eval's own ``HFLM``: the tokenizer's BOS in front (as ``data convert`` packs documents),
context and continuation encoded together and split at the context's length, so a folder exported from the
same checkpoint and scored with ``hf`` gets the same log-likelihoods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

GENERATE_STEP = (
    16  # tokens generated between checks for stop strings (each chunk prefills once, then a KV cache)
)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


class DecoderLM(TemplateLM):
    """lm-eval ``LM`` over a Composer decoder: ``model({"input_ids": ids})`` gives logits (B, S, vocab).

    For our ``llama`` model the LM head runs only on the scored positions (``model.model.hidden_states`` and
    ``.head``); any other ComposerModel returning logits works through its forward.
    """

    backend = "causal"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        device: Optional[torch.device | str] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        cfg = getattr(model, "cfg", None)
        self._max_length = int(max_length or getattr(cfg, "max_seq_len", 0) or 2048)
        self._device = torch.device(device) if device is not None else next(model.parameters()).device

    # -- what lm-eval reads ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """End of text: generation stops here."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling window's first token) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """The model's context: longer inputs are truncated from the left."""
        return self._max_length

    @property
    def batch_size(self) -> int:
        """Rows per forward pass."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer for lm-eval's request caches."""
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: Optional[bool] = None,
        left_truncate_len: Optional[int] = None,
        **kw,
    ) -> list[int]:
        """Token ids of ``string``, BOS first (unless ``add_special_tokens`` is False or the text starts with it)."""
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        bos, bos_text = self.tokenizer.bos_token_id, self.tokenizer.bos_token
        if (
            add_special_tokens is not False
            and bos is not None
            and not (bos_text and string.startswith(bos_text))
        ):
            ids = [bos, *ids]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------------------------------------
    def _hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(per-position features, head) for ids (B, S): final hidden states and the LM head, or logits and id."""
        decoder = getattr(self.model, "model", None)
        if hasattr(decoder, "hidden_states") and hasattr(decoder, "head"):
            return decoder.hidden_states(ids), decoder.head
        out = self.model({"input_ids": ids})
        return (out if isinstance(out, torch.Tensor) else out.logits), (lambda x: x)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        pad = self.eot_token_id if self.eot_token_id is not None else 0
        # Longest first: a batch's padding is set by its first row, and memory problems show up at once.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens; it must be 1..{self.max_length}")
                # The last token is never an input; too long a pair loses context tokens on the left.
                inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(len(x) for x in inputs)
            ids = torch.full((len(inputs), width), pad, dtype=torch.long)
            for r, x in enumerate(inputs):
                ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            # Position p predicts token p + 1: a row of length n scores its continuation at n - len(cont) .. n - 1.
            rows = torch.cat([torch.full((len(c),), r) for r, c in enumerate(conts)])
            cols = torch.cat([torch.arange(len(x) - len(c), len(x)) for x, c in zip(inputs, conts)])
            targets = torch.tensor([t for c in conts for t in c], dtype=torch.long, device=self._device)
            with torch.no_grad():
                feats, head = self._hidden(ids.to(self._device))
                logits = head(feats[rows.to(self._device), cols.to(self._device)])
            logp = F.log_softmax(logits.float(), dim=-1)
            token_lp = logp.gather(1, targets[:, None]).squeeze(1).cpu()  # one device sync per batch
            hit = (logp.argmax(-1) == targets).cpu()
            offset = 0
            for i, c in zip(chunk, conts):
                n = len(c)
                results[i] = (
                    float(token_lp[offset : offset + n].sum()),
                    bool(hit[offset : offset + n].all()),
                )
                offset += n
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, each conditioned on the prefix token only (perplexity tasks)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------------
    def _greedy(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """``ids`` (B, S) extended by ``n`` greedy tokens (rows that reached EOS continue with EOS)."""
        generate = getattr(self.model, "generate", None)
        if generate is not None:
            return generate(ids, max_new_tokens=n, temperature=0.0, eos_token_id=self.eot_token_id)
        for _ in range(n):
            feats, head = self._hidden(ids[:, -self.max_length :])
            ids = torch.cat((ids, head(feats[:, -1]).argmax(-1, keepdim=True)), dim=1)
        return ids

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at EOS and at the first stop string (``until``)."""
        eot = self.eot_token_id
        jobs = []
        for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ctx = self.tok_encode(context, left_truncate_len=max(1, self.max_length - max_gen))
            jobs.append((n, ctx, until, max_gen))
        out: list[str] = [""] * len(requests)
        # Rows of one batch must share a length (generate takes no padding): group by context length.
        jobs.sort(key=lambda j: (-len(j[1]), j[3]))
        groups: dict[tuple[int, int], list[Any]] = {}
        for job in jobs:
            groups.setdefault((len(job[1]), job[3]), []).append(job)
        for (length, max_gen), group in groups.items():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                ids = torch.tensor([j[1] for j in batch], dtype=torch.long, device=self._device)
                texts = [""] * len(batch)
                while ids.shape[1] - length < max_gen:
                    with torch.no_grad():
                        ids = self._greedy(ids, min(GENERATE_STEP, max_gen - (ids.shape[1] - length)))
                    # A text ends at EOS (rows that reached it were padded with more EOS).
                    new = [row[length:].tolist() for row in ids]
                    new = [toks[: toks.index(eot)] if eot in toks else toks for toks in new]
                    texts = [self.tok_decode(toks) for toks in new]
                    ended = [
                        len(toks) < ids.shape[1] - length or any(s in t for s in until)
                        for toks, t, (_, _, until, _) in zip(new, texts, batch)
                    ]
                    if all(ended):
                        break
                for (n, _, until, _), text in zip(batch, texts):
                    for stop in until:
                        text = text.split(stop)[0]
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out
