"""``llmfoundry-lite generate CHECKPOINT|HF_DIR``: continue prompts with a decoder, or fill ``[MASK]`` with an encoder.

The model comes from a Composer checkpoint (the run's recipe.yaml or ``--recipe`` says what it is) or a Hugging Face
folder, read by our importers (``models/llama/hf_adapter.py``, ``models/bert/hf_adapter.py``) into our own models.
A decoder's tokens are printed as they come; an MLM checkpoint prints the top-k tokens for each ``[MASK]``.

    llmfoundry-lite generate runs/llama-tiny/checkpoints --prompt "Once upon a time" --max-new-tokens 32
    llmfoundry-lite generate hf-out/ --prompt "Paris is the [MASK] of France." --top-k 5
    llmfoundry-lite generate runs/llama-smoe/checkpoints --prompt "Once upon a time" --k 4   # SMoE: 4 experts
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from llmfoundry_lite.apps.chat import ChatPrompt, StopText, chat_prompt
from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.errors import RecipeError

DEFAULT_TOP_K = {"causal": 50, "mlm": 5}


@dataclass
class Generator:
    """A model ready to generate: ``kind`` is ``causal`` (ComposerLlama) or ``mlm`` (BertMLM), eval mode, fp32."""

    kind: str
    model: Any
    tokenizer: Any


# Any of these in a folder makes AutoTokenizer.from_pretrained(folder) work.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _from_hf_folder(folder: pathlib.Path, tokenizer: Optional[str]) -> Generator:
    from llmfoundry_lite.apps.export import _tokenizer
    from llmfoundry_lite.checkpoints import check_hf_folder
    from llmfoundry_lite.models.llama.hf_adapter import LLAMA_MODEL_TYPES

    config = check_hf_folder(str(folder), key="CHECKPOINT") or {}
    model_type = config.get("model_type")
    if model_type not in (*LLAMA_MODEL_TYPES, "bert", "mosaic_bert"):
        arch = ", ".join(config.get("architectures") or []) or "none given"
        raise RecipeError(
            f"{folder}: model_type {model_type!r} (architectures: {arch}) cannot generate here (llama, mistral, "
            "bert and mosaic_bert folders can)",
            key="CHECKPOINT",
        )
    if tokenizer is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); pass --tokenizer DIR",
            key="--tokenizer",
        )
    tok = _tokenizer(tokenizer or str(folder))
    if model_type in LLAMA_MODEL_TYPES:
        from llmfoundry_lite.models.llama import ComposerLlama, load_hf_llama

        cfg, weights = load_hf_llama(str(folder), key="CHECKPOINT")
        model = ComposerLlama(cfg, tok)
        model.model.load_state_dict(weights)
        return Generator("causal", model.eval(), tok)
    from llmfoundry_lite.models.bert import load_hf_bert

    cfg, enc, head = load_hf_bert(str(folder), key="CHECKPOINT")
    return _mlm(cfg, enc, head, tok, str(folder))


def _mlm(cfg: Any, enc: dict, head: Optional[dict], tok: Any, source: str) -> Generator:
    from llmfoundry_lite.models.bert import BertMLM

    if not head:
        raise RecipeError(
            f"{source} has no masked-language-model head (a GLUE classifier?); generate needs a pretraining "
            "checkpoint to fill [MASK]",
            key="CHECKPOINT",
        )
    model = BertMLM(cfg, len(tok))
    model.encoder.load_state_dict(enc)
    model.head.load_state_dict(head)
    return Generator("mlm", model.eval(), tok)


def load_generator(
    source: str, tokenizer: Optional[str] = None, recipe: Optional[str] = None, k: Optional[int] = None
) -> Generator:
    """Our model from a Composer checkpoint (file or save folder) or a Hugging Face folder, with its tokenizer.

    ``k``: an SMoE-Dropout model's experts per token (default: the checkpoint's ``model.ffn.k``).
    """
    gen = _load_generator(source, tokenizer, recipe)
    if k is not None:
        from llmfoundry_lite.models.ffn import choose_active_experts

        choose_active_experts(gen.model, k, source)
    return gen


def _load_generator(source: str, tokenizer: Optional[str], recipe: Optional[str]) -> Generator:
    from llmfoundry_lite.apps import export, export_bert
    from llmfoundry_lite.checkpoints import find_checkpoint, load_model_state

    folder = pathlib.Path(source)
    if folder.is_dir() and (folder / "config.json").is_file():
        return _from_hf_folder(folder, tokenizer)
    path = find_checkpoint(source, key="CHECKPOINT")
    model_sd = load_model_state(path, key="CHECKPOINT")
    run_recipe = export.load_recipe_file(recipe) if recipe is not None else export._recipe_near(path)
    if export_bert.is_bert_state(model_sd):
        enc, head, _ = export_bert.split_state(model_sd)
        cfg = export_bert.bert_config(enc, run_recipe, str(path))
        tok = export._tokenizer(tokenizer or export._recipe_tokenizer(run_recipe))
        return _mlm(cfg, enc, head, tok, str(path))
    from llmfoundry_lite.models.llama import ComposerLlama

    ckpt = export._llama_checkpoint(path, model_sd, run_recipe, tokenizer)
    model = ComposerLlama(ckpt.config, ckpt.tokenizer)
    model.model.load_state_dict(ckpt.weights)
    return Generator("causal", model.eval(), ckpt.tokenizer)


class _Stream:
    """Writes a sequence's text as tokens arrive: re-decodes all new tokens, prints what was not printed yet."""

    def __init__(self, tok: Any, write: Callable[[str], None]):
        self.tok, self.write, self.ids, self.shown = tok, write, [], ""

    def __call__(self, nxt: Any) -> Optional[bool]:
        self.ids.append(int(nxt[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for its end
            return
        new, self.shown = text[len(self.shown) :], text
        return self.write(new) is True  # a stop text's writer says when it has seen it


def complete(
    gen: Generator,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 42,
    write: Optional[Callable[[str], None]] = None,
    chat: Optional[ChatPrompt] = None,
) -> list[int]:
    """New token ids continuing ``prompt`` (batch 1); ``write`` receives the text as it is generated.

    ``chat``: generate the reply to ``prompt`` as a chat turn (:func:`llmfoundry_lite.apps.chat.chat_prompt`),
    ending at the template's end of turn (not written).
    """
    import torch

    ids = torch.tensor([chat.ids if chat else gen.tokenizer(prompt)["input_ids"]], dtype=torch.long)
    stop = StopText(chat.stop_text, write or (lambda _: None)) if chat and chat.stop_text else None
    sink = stop or write
    out = gen.model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=chat.stop_ids if chat else gen.tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(seed),
        on_token=_Stream(gen.tokenizer, sink) if sink is not None else None,
    )
    if stop is not None:
        stop.flush()
    return out[0, ids.shape[1] :].tolist()


def fill_masks(gen: Generator, prompt: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each mask token in ``prompt``, the ``top_k`` (token, probability) pairs, most likely first."""
    import torch

    tok = gen.tokenizer
    if tok.mask_token is None or tok.mask_token not in prompt:
        raise RecipeError(
            f"prompt {prompt!r} has no {tok.mask_token or '[MASK]'} to fill; an MLM checkpoint fills masks",
            key="--prompt",
        )
    enc = tok(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    where = ids[0] == tok.mask_token_id
    with torch.no_grad():
        logits = gen.model({**enc, "labels": torch.where(where[None], ids, IGNORE_INDEX)}).masked_logits
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(tok.convert_ids_to_tokens(int(i)), float(p)) for p, i in zip(ps, ix)]
        for ps, ix in zip(top.values, top.indices)
    ]


def read_prompts(prompts: Optional[Sequence[str]], prompts_file: Optional[str]) -> list[str]:
    """Prompts from ``--prompt`` (repeatable) and ``--prompts-file`` (one per line, blank lines skipped)."""
    out = list(prompts or [])
    if prompts_file is not None:
        path = pathlib.Path(prompts_file)
        if not path.is_file():
            raise RecipeError(f"no such file {prompts_file!r}", key="--prompts-file")
        out += [line for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise RecipeError(
            "no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE", key="--prompt"
        )
    return out


def run_generate(
    source: str,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 42,
    tokenizer: Optional[str] = None,
    recipe: Optional[str] = None,
    stream: Any = None,
    k: Optional[int] = None,
    chat: bool = False,
    system: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> None:
    """The verb: load once, then print each prompt's continuation as it comes (or its masks' top-k fillers).

    ``chat``: each prompt is a user turn (after ``system``) and the model's reply is printed under it.
    """
    stream = stream or sys.stdout
    if not chat and (system is not None or chat_template is not None):
        raise RecipeError(
            f"{'--system' if system is not None else '--chat-template'} shapes a chat turn; add --chat",
            key="--chat",
        )
    if max_new_tokens < 1:
        raise RecipeError(f"must be at least 1, got {max_new_tokens}", key="--max-new-tokens")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise RecipeError(f"must be in (0, 1], got {top_p}", key="--top-p")
    if temperature < 0:  # a negative temperature would silently decode greedily
        raise RecipeError(f"must be >= 0 (0 = greedy), got {temperature}", key="--temperature")
    if top_k is not None and top_k < 0:
        raise RecipeError(f"must be >= 0, got {top_k}", key="--top-k")
    gen = load_generator(source, tokenizer, recipe, k)
    top_k = top_k if top_k is not None else DEFAULT_TOP_K[gen.kind]
    if chat and gen.kind == "mlm":
        raise RecipeError(
            f"{source} is a masked language model (it fills [MASK]); --chat needs a decoder", key="--chat"
        )

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    for prompt in prompts:
        if gen.kind == "mlm":
            masks = fill_masks(gen, prompt, top_k)
            write(f"{prompt}\n")
            for n, fillers in enumerate(masks, 1):
                write(f"  mask {n}: " + "  ".join(f"{t} {p:.3f}" for t, p in fillers) + "\n")
        elif chat:
            turn = chat_prompt(gen.tokenizer, prompt, system, chat_template)
            write(f"{prompt}\n")
            complete(gen, prompt, max_new_tokens, temperature, top_k or None, top_p, seed, write, turn)
            write("\n")
        else:
            write(prompt)
            complete(gen, prompt, max_new_tokens, temperature, top_k or None, top_p, seed, write)
            write("\n")


def register_cli(app: Any) -> None:
    """Add `llmfoundry-lite generate CHECKPOINT|HF_DIR`."""
    import typer

    @app.command("generate")
    def generate_cmd(
        checkpoint: str = typer.Argument(
            ..., help="Composer checkpoint (or its folder) or Hugging Face folder"
        ),
        prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable)"),
        prompts_file: Optional[str] = typer.Option(None, help="a file of prompts, one per line"),
        max_new_tokens: int = typer.Option(64, help="tokens to generate per prompt (decoders)"),
        temperature: float = typer.Option(0.8, help="sampling temperature; 0 = greedy (decoders)"),
        top_k: Optional[int] = typer.Option(
            None,
            help="sample from the k most likely tokens (decoders, default 50); fillers shown (MLM, default 5)",
        ),
        top_p: Optional[float] = typer.Option(
            None, help="nucleus sampling: smallest set reaching this probability"
        ),
        seed: int = typer.Option(42, help="random seed of the sampler"),
        tokenizer: Optional[str] = typer.Option(
            None, help="tokenizer folder (default: the run's or the folder's)"
        ),
        recipe: Optional[str] = typer.Option(
            None, help="the run's recipe, when no recipe.yaml lies beside it"
        ),
        k: Optional[int] = typer.Option(
            None, "--k", help="SMoE-Dropout models: experts per token (default: the checkpoint's model.ffn.k)"
        ),
        chat: bool = typer.Option(
            False, "--chat", help="each prompt is a user turn of a chat-finetuned model; prints its reply"
        ),
        system: Optional[str] = typer.Option(None, help="with --chat: a system turn before each prompt"),
        chat_template: Optional[str] = typer.Option(
            None, help="with --chat, for a tokenizer without one: chatml, llama3, llama2 or zephyr"
        ),
    ) -> None:
        """Generate text from a checkpoint or HF folder (tokens streamed), or fill [MASK] with an MLM."""
        run_generate(
            checkpoint,
            read_prompts(prompt, prompts_file),
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            tokenizer,
            recipe,
            k=k,
            chat=chat,
            system=system,
            chat_template=chat_template,
        )
