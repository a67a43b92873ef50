"""Cheap checks that a recipe's data and tokenizer exist and fit it: run by ``validate``, before anything is built.

They read only small files (``index.json``, ``tokenizer_config.json``, ``tokenizer.json`` as JSON) and never load
a tokenizer or a dataset. Relative data and tokenizer paths resolve against the working directory (not the
recipe file, unlike ``base:``); every error names the resolved absolute path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

from llmfoundry_lite import registry
from llmfoundry_lite.batch import check_vocab_fits
from llmfoundry_lite.data.loaders import check_row_length, columns, concat_length, read_index, split_dir
from llmfoundry_lite.data.provenance import read_max_seq_len, read_tokenizer_record, tokenizer_record
from llmfoundry_lite.errors import RecipeError

# Files any Hugging Face tokenizer folder has at least one of.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TRAIN_HINT = "`llmfoundry-lite data tokenizer --train --kind wordpiece|bpe --out DIR` builds one offline"
CONVERT_HINT = "`llmfoundry-lite data convert`"
HUB_PROBE_SECONDS = 2.0
# huggingface_hub's repo-id rule: "name" or "org/name", word characters, '-', '.', no '--' or '..'.
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


def resolve(path: str) -> str:
    """``path`` as the loaders and tokenizers will open it: ``~`` expanded, absolute against the working directory."""
    return os.path.abspath(os.path.expanduser(path))


def relative_note(path: str) -> str:
    """'' for an absolute path; else a note saying that it resolved against the working directory."""
    if os.path.isabs(os.path.expanduser(path)):
        return ""
    return f" ({path!r} is relative to the working directory {os.getcwd()})"


def _is_tokenizer_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def _is_mds_folder(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "index.json")):
        return True
    try:
        subs = os.listdir(path)
    except OSError:
        return False
    return any(os.path.isfile(os.path.join(path, d, "index.json")) for d in subs)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def check_loader(section: str, block: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """Check a ``text`` loader's local split (folder, index.json, shard files); its index, or None for a remote.

    With ``streams:`` every stream's folder is checked, and all must hold the same layout (token rows of one
    length, or raw text); the first local stream's index is returned.
    """
    if block.get("streams") is not None:
        return _check_streams(section, block)
    local, remote, split = block.get("local"), block.get("remote"), block.get("split")
    if local is None and remote is None:
        raise RecipeError(
            "set `local:` (an MDS folder) or `remote:` (s3://..., gs://...)", key=f"{section}.local"
        )
    if remote is not None and "://" in str(remote):
        return None  # streaming downloads it into `local` at train time; nothing to look at here
    # Like the loader: a remote that is a plain path is a local dataset that streaming copies into `local`.
    key = "remote" if remote is not None else "local"
    src = str(remote if remote is not None else local)
    try:
        index = read_index(split_dir(resolve(src), split, key=key))
    except RecipeError as e:
        detail = e.detail
        root = resolve(src)
        if os.path.isdir(root) and _is_tokenizer_folder(root) and not _is_mds_folder(root):
            detail = f"{root!r} is a tokenizer folder, not an MDS dataset; point it at a folder made by {CONVERT_HINT}"
        raise RecipeError(detail + relative_note(src), key=f"{section}.{e.key or key}") from None
    check_row_length(index, block.get("max_seq_len"), resolve(src), key=f"{section}.max_seq_len")
    return index


def _check_streams(section: str, block: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    from llmfoundry_lite.data.mixture import refuse_folder_keys, stream_blocks

    refuse_folder_keys(block, f"{section}.")
    blocks = stream_blocks(block["streams"], f"{section}.streams", weights=section != "eval_loader")
    if section != "eval_loader":
        from llmfoundry_lite.data.mixture import make_streams

        try:  # streaming's own weighting rules (no I/O: the folders are looked at below)
            make_streams(blocks)
        except RecipeError as e:
            raise RecipeError(e.detail, key=f"{section}.{e.key}") from None
    first, layouts = None, {}
    for name, stream in blocks.items():
        index = check_loader(f"{section}.streams.{name}", {**stream, "max_seq_len": block.get("max_seq_len")})
        if index is None:
            continue
        n = concat_length(index)
        layouts[name] = f"{n}-token rows" if "tokens" in columns(index) else "raw text"
        first = first if first is not None else index
    if len(set(layouts.values())) > 1:
        described = ", ".join(f"{k}: {v}" for k, v in layouts.items())
        raise RecipeError(
            f"the streams differ in layout ({described}); convert every source the same way (the same "
            "--tokenizer and --concat-tokens, or all raw text)",
            key=f"{section}.streams",
        )
    return first


def _first_source(section: str, block: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The block naming the data folder (a mixture's first local stream) and its recipe key prefix."""
    streams = block.get("streams")
    if isinstance(streams, Mapping) and streams:
        for name, stream in streams.items():
            if isinstance(stream, Mapping) and "://" not in str(stream.get("remote") or ""):
                return stream, f"{section}.streams.{name}"
    return block, section


def check_loader_fit(
    section: str,
    block: Mapping[str, Any],
    index: Mapping[str, Any],
    model_name: Any = None,
    tokenizer_has_mask: Optional[bool] = None,
) -> None:
    """RecipeError when the shards do not fit the recipe's objective (MLM on token rows, causal LM on raw text)."""
    cols = columns(dict(index))
    rows, text = "tokens" in cols, "text" in cols
    collator = block.get("collator")
    explicit = collator.get("name") if isinstance(collator, Mapping) else None
    model_objective = getattr(registry.model_family(model_name), "objective", None)  # the family's spec
    if explicit in ("mlm", "causal_lm") and model_objective and explicit != model_objective:
        kind = "a masked LM" if model_objective == "mlm" else "a causal (decoder) LM"
        raise RecipeError(
            f"collator {explicit!r} does not fit model {model_name!r}, {kind}; use collator {model_objective!r}",
            key=f"{section}.collator.name",
        )
    objective = explicit or model_objective
    if objective is None and rows:
        objective = "causal_lm"  # the loader's own default for token rows
    if objective is None and text and tokenizer_has_mask is not None:
        objective = "mlm" if tokenizer_has_mask else "causal_lm"
    source, prefix = _first_source(section, block)
    src = str(source.get("remote") or source.get("local"))
    where = repr(os.path.join(resolve(src), source["split"]) if source.get("split") else resolve(src))
    key = (
        f"{section}.collator.name"
        if explicit
        else f"{prefix}.{'remote' if source.get('remote') else 'local'}"
    )
    if objective == "mlm" and rows:
        raise RecipeError(
            f"masked LM on token rows: {where} holds packed token ids (a `tokens` column, made with "
            f"--concat-tokens for causal LM); MLM masks raw text: convert without --tokenizer/--concat-tokens, "
            "or train a decoder with collator causal_lm",
            key=key,
        )
    if objective == "causal_lm" and text:
        raise RecipeError(
            f"causal LM on raw text: {where} holds untokenized text (a `text` column), which would be truncated "
            f"to max_seq_len per document; reconvert to packed rows with {CONVERT_HINT} --tokenizer TOKENIZER "
            "--concat-tokens MAX_SEQ_LEN",
            key=key,
        )


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerFiles:
    """Where a tokenizer's files are: a local folder, or a hub id (with its cached snapshot, if any)."""

    name: str  # as written in the recipe
    local: bool
    folder: Optional[
        str
    ]  # the folder holding the files (local, or the cached hub snapshot); None if not cached


def looks_local(path: str) -> bool:
    """True when ``path`` can only be a local folder, not a hub id (``org/name`` or ``name``).

    ``./tok``, ``/abs/x``, ``~/x``, ``a/b/c``, a Windows path, something that is not a valid hub id, or
    ``data/tok`` when ``data/`` is a local folder. A two-part name whose first part is not a local folder
    (``google-bert/bert-base-uncased``) is a hub id.
    """
    if path.startswith((".", "/", "~")) or "\\" in path or (os.altsep and os.altsep in path):
        return True
    if path.count("/") > 1 or not _REPO_ID.match(path) or "--" in path or ".." in path:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def hub_offline_reason() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached ('HF_HUB_OFFLINE=1', 'no network ...'), or None if it can."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]}"
    hc = sys.modules.get("huggingface_hub.constants")
    if hc is not None and getattr(hc, "HF_HUB_OFFLINE", False):  # set in-process (e.g. by hub_offline())
        return "offline mode"
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return None if _reachable(endpoint) else f"{urlparse(endpoint).netloc} cannot be reached (no network?)"


@contextlib.contextmanager
def hub_access() -> Iterator[Optional[str]]:
    """Around a hub download (``datasets.load_dataset``, ``from_pretrained``): when the hub is offline or cannot be
    reached (one probe, at most 2 s), the hub libraries run in offline mode, so that what is cached still loads and
    what is not fails at once with one error, instead of a minute of retries and multi-line warnings.

    Yields the reason the hub is offline (for the caller's message), or None.
    """
    reason = hub_offline_reason()
    if reason is None:
        yield None
        return
    from llmfoundry_lite.compat import hub_offline

    dc = None
    try:
        import datasets.config as dc
    except ImportError:
        pass
    saved = getattr(dc, "HF_HUB_OFFLINE", None)
    with hub_offline():
        if dc is not None:
            dc.HF_HUB_OFFLINE = True  # datasets keeps its own copy, read at every load
        try:
            yield reason
        finally:
            if dc is not None:
                dc.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=8)
def _reachable(url: str) -> bool:
    # One HEAD request (through HTTPS_PROXY like huggingface_hub) in a daemon thread: name resolution has no
    # timeout of its own, so the join bounds the whole probe; huggingface_hub would retry for ~50 s instead.
    import urllib.error
    import urllib.request

    ok: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(
                urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_SECONDS
            ).close()
            ok.append(True)
        except urllib.error.HTTPError:  # the server answered: it is reachable
            ok.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_SECONDS)
    return bool(ok)


def _hub_snapshot(repo_id: str) -> Optional[str]:
    """The cached snapshot folder of a hub repo holding tokenizer files, or None."""
    from huggingface_hub import try_to_load_from_cache

    for fname in ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "config.json"):
        try:
            found = try_to_load_from_cache(repo_id, fname)
        except Exception:  # an id the hub library rejects: not cached
            return None
        if isinstance(found, str):
            return os.path.dirname(found)
    return None


def locate_tokenizer(path: str, key: str = "tokenizer.path") -> TokenizerFiles:
    """Where the tokenizer ``path`` is; RecipeError (at once, no download) when it cannot be loaded from there.

    A local-looking path must be a tokenizer folder (not a file, not an MDS dataset). A hub id must be in the
    local cache or the hub must be reachable (HF_HUB_OFFLINE unset and a TCP connection within 2 s).
    """
    resolved = resolve(path)
    if os.path.exists(resolved):
        if not os.path.isdir(resolved):
            raise RecipeError(
                f"tokenizer path {resolved!r} is a file; point it at the folder holding tokenizer.json"
                + relative_note(path),
                key=key,
            )
        if not _is_tokenizer_folder(resolved):
            what = (
                "is an MDS dataset folder (it has index.json), not a tokenizer"
                if _is_mds_folder(resolved)
                else f"has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
            )
            raise RecipeError(
                f"tokenizer folder {resolved!r} {what}; point it at the tokenizer folder (the --tokenizer given to "
                f"`data convert`), or {TRAIN_HINT}" + relative_note(path),
                key=key,
            )
        return TokenizerFiles(path, True, resolved)
    if looks_local(path):
        raise RecipeError(
            f"tokenizer folder {resolved!r} does not exist{relative_note(path)}; {TRAIN_HINT}", key=key
        )
    snapshot = _hub_snapshot(path)
    if snapshot is None:
        reason = hub_offline_reason()
        if reason is not None:
            local_too = f" nor a local folder ({resolved!r} does not exist)" if "/" in path else ""
            raise RecipeError(
                f"tokenizer {path!r} is not in the Hugging Face cache{local_too}, and the hub is offline "
                f"({reason}); download it once with network (`hf download {path}`), use a local folder, or "
                f"{TRAIN_HINT}",
                key=key,
            )
    return TokenizerFiles(path, False, snapshot)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tokenizer_vocab_size(folder: str) -> Optional[int]:
    """Token ids a tokenizer folder can produce (largest id + 1), read from its files; None when unknown."""
    ids: list[int] = []
    data = _read_json(os.path.join(folder, "tokenizer.json"))
    if isinstance(data, dict):
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += [v for v in vocab.values() if isinstance(v, int)]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            ids.append(len(vocab) - 1)
        ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t.get("id"), int)]
    else:
        vocab_txt = os.path.join(folder, "vocab.txt")
        if os.path.isfile(vocab_txt):
            with open(vocab_txt, encoding="utf-8") as f:
                ids.append(sum(1 for _ in f) - 1)
        vocab_json = _read_json(os.path.join(folder, "vocab.json"))
        if isinstance(vocab_json, dict):
            ids += [v for v in vocab_json.values() if isinstance(v, int)]
        added = _read_json(os.path.join(folder, "added_tokens.json"))
        if ids and isinstance(added, dict):
            ids += [v for v in added.values() if isinstance(v, int)]
    return max(ids) + 1 if ids else None


def tokenizer_length(folder: str) -> Optional[int]:
    """``len(tokenizer)`` of a folder's ``tokenizer.json`` (its tokens, added ones included) when its ids run
    0..n-1 without a gap or a shared id; None otherwise, or when there is no such file."""
    data = _read_json(os.path.join(folder, "tokenizer.json"))
    if not isinstance(data, dict):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokens = {str(k): v for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        tokens = {str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, (list, tuple)) and p}
    else:
        return None
    for t in data.get("added_tokens") or []:
        if isinstance(t, dict) and "content" in t:
            tokens.setdefault(str(t["content"]), t.get("id"))
    ids = set(tokens.values())
    n = len(tokens)
    return n if n and ids == set(range(n)) else None


def tokenizer_has_mask(folder: str) -> Optional[bool]:
    """Whether the tokenizer defines a mask token (MLM needs one); None when its config files say nothing."""
    found = None
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(os.path.join(folder, fname))
        if isinstance(data, dict):
            if data.get("mask_token"):
                return True
            found = False
    return found


def check_vocab_size(model_block: Mapping[str, Any], folder: Optional[str]) -> None:
    """RecipeError when ``model.vocab_size`` is set smaller than the tokenizer's vocabulary (both known)."""
    vocab = model_block.get("vocab_size")
    if not isinstance(vocab, int) or model_block.get("init_from_hf") or folder is None:
        return  # unset: taken from the tokenizer; init_from_hf: the checkpoint's, checked when it is loaded
    tok_vocab = tokenizer_vocab_size(folder)
    if tok_vocab is not None:
        check_vocab_fits(vocab, tok_vocab, "model.vocab_size", f"the tokenizer in {folder!r}")


def check_tokenizer_matches(
    section: str, block: Mapping[str, Any], tok_path: str, folder: Optional[str]
) -> None:
    """RecipeError when a loader's token rows were made by another tokenizer than the recipe's.

    Compares the split's ``provenance.json`` (written by ``data convert --tokenizer``) with the recipe tokenizer's
    vocabulary; data without the record (older conversions) and tokenizers whose files are not at hand pass.
    """
    if folder is None:
        return
    sources = [(f"{section}.streams.{n}", b) for n, b in (block.get("streams") or {}).items()] or [
        (section, block)
    ]
    ours = None
    for key, src_block in sources:
        if not isinstance(src_block, Mapping):
            continue
        src = src_block.get("remote") or src_block.get("local")
        if src is None or "://" in str(src):
            continue
        split = src_block.get("split")
        split_folder = os.path.join(resolve(str(src)), split) if split else resolve(str(src))
        theirs = read_tokenizer_record(split_folder)
        if theirs is None:
            continue
        ours = ours or tokenizer_record(tok_path, folder=folder)
        if ours is None or ours["vocab_sha256"] == theirs["vocab_sha256"]:
            continue
        raise RecipeError(
            f"the token rows in {split_folder!r} were made with tokenizer {theirs.get('name')!r} "
            f"({theirs.get('vocab_size')} ids, vocabulary {theirs['vocab_sha256'][:8]}), but this recipe's tokenizer "
            f"is {tok_path!r} ({ours['vocab_size']} ids, vocabulary {ours['vocab_sha256'][:8]}): the ids would mean "
            f"other tokens; point tokenizer.path at {theirs.get('name')!r}, or reconvert the data with "
            f"`llmfoundry-lite data convert --tokenizer {tok_path}`",
            key=f"{key}.{'remote' if src_block.get('remote') else 'local'}",
        )


def split_samples(index: Mapping[str, Any]) -> int:
    """Samples in an MDS split, from its index.json."""
    return sum(int(s.get("samples") or 0) for s in index.get("shards") or [])


def check_split_size(
    section: str, block: Mapping[str, Any], index: Mapping[str, Any], batch: int, world: int, setting: str
) -> None:
    """RecipeError when one rank's share of a split is less than one batch under drop_last (no batch, ever).

    The numbers are streaming's: each of ``world`` ranks sees ceil(samples / world). ``setting`` names the batch
    size key for the message. Mixtures are left to the loader, which counts them after weighting.
    """
    if block.get("streams") is not None or batch <= 0:
        return
    total = block.get("epoch_size") or split_samples(index)
    per_rank = -(-int(total) // max(1, world))
    drop_last = block.get("drop_last", True)
    if per_rank >= (batch if drop_last else 1):
        return
    src = str(block.get("remote") or block.get("local"))
    where = f"split {block.get('split')!r} of {resolve(src)!r}" if block.get("split") else repr(resolve(src))
    if per_rank == 0:
        raise RecipeError(
            f"{where} has no samples; check it with `llmfoundry-lite data inspect`", key=section
        )
    ranks = f", {per_rank} per rank on {world} ranks" if world > 1 else ""
    if section == "train_loader":
        what = "no batch could ever be trained"
        fix = f"set global_train_batch_size to at most {per_rank * world}, or use more data"
    else:
        what = "nothing would be evaluated"
        fix = f"set device_eval_batch_size to at most {per_rank}, or {section}.drop_last: false"
    raise RecipeError(
        f"{where} has {total} samples{ranks}, fewer than one batch ({setting}, drop_last: true), so {what}; {fix}",
        key=section,
    )


def check_recipe_data(data: Mapping[str, Any], world: int = 1) -> None:
    """All data and tokenizer checks of a resolved recipe for a run on ``world`` processes: tokenizer found,
    splits there, data fits the model and was made by this tokenizer, each rank gets at least one batch."""
    model = data.get("model") if isinstance(data.get("model"), Mapping) else {}
    tok_block = data.get("tokenizer")
    folder: Optional[str] = None
    tok_path: Optional[str] = None
    if (
        isinstance(tok_block, Mapping)
        and tok_block.get("name") == "hf"
        and isinstance(tok_block.get("path"), str)
    ):
        tok_path = tok_block["path"]
        folder = locate_tokenizer(tok_path).folder
        check_vocab_size(model, folder)
    has_mask = tokenizer_has_mask(folder) if folder else None
    gbs = data.get("global_train_batch_size")
    per_rank = gbs // max(1, world) if isinstance(gbs, int) else 0
    for section in ("train_loader", "eval_loader"):
        block = data.get(section)
        if isinstance(block, Mapping) and block.get("name") in ("text", "finetune"):
            index = check_loader(section, block)
            if index is None:
                continue
            check_loader_fit(section, block, index, model.get("name"), has_mask)
            check_finetune_fit(section, block, index, model.get("name"))
            if tok_path is not None and ("tokens" in columns(index) or "labels" in columns(index)):
                check_tokenizer_matches(section, block, tok_path, folder)
            if section == "train_loader":
                setting = f"global_train_batch_size {gbs}" + (
                    f" = {per_rank} per rank x {world} ranks" if world > 1 else ""
                )
                check_split_size(section, block, index, per_rank, world, setting)
            else:
                eval_batch = data.get("device_eval_batch_size") or per_rank
                check_split_size(
                    section, block, index, eval_batch, world, f"device_eval_batch_size {eval_batch}"
                )


def check_finetune_fit(
    section: str, block: Mapping[str, Any], index: Mapping[str, Any], model_name: Any
) -> None:
    """RecipeError when finetuning data and the loader or model disagree (packed rows need sequence_id)."""
    cols = columns(dict(index))
    src = resolve(str(block.get("remote") or block.get("local")))
    key = f"{section}.{'remote' if block.get('remote') else 'local'}"
    if block.get("name") == "finetune" and "labels" not in cols:
        raise RecipeError(
            f"{src!r} holds no finetuning examples (columns {', '.join(cols)}); convert with {CONVERT_HINT} "
            "--finetune --tokenizer TOK --max-seq-len N",
            key=key,
        )
    made = read_max_seq_len(os.path.join(src, str(block.get("split") or ""))) if "labels" in cols else None
    want = block.get("max_seq_len")
    if (
        made is not None and isinstance(want, int) and made > want
    ):  # the collator would stop at the first batch
        raise RecipeError(
            f"{src!r} holds finetuning rows of up to {made} tokens (data convert --max-seq-len {made}), longer than "
            f"{section}.max_seq_len {want}; reconvert with --max-seq-len {want} or raise max_seq_len",
            key=f"{section}.max_seq_len",
        )
    spec = registry.model_family(model_name)  # the family's spec; None for a plugin model without one
    if "labels" not in cols or spec is None:
        return
    if "sequence_id" in cols and not spec.takes_sequence_id:
        raise RecipeError(
            f"{src!r} holds packed finetuning rows (sequence_id), but model {model_name!r} does not take "
            "sequence_id, so packed examples would attend to each other; reconvert without --pack or use a "
            "model that takes it (llama)",
            key=key,
        )
    if spec.objective != "causal_lm":
        raise RecipeError(
            f"{src!r} holds finetuning examples for a causal (decoder) LM; model {model_name!r} is a masked LM",
            key=key,
        )
