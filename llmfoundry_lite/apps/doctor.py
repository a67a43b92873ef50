"""``llmfoundry-lite doctor``: versions of the stack, CUDA/GPU info, and the install problems it finds.

The most common breakage on GPU machines is a flash-attn wheel built for another torch/CUDA: importing it fails
with ``undefined symbol`` from its compiled extension. Doctor recognises that and says how to fix it.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
import warnings
from dataclasses import dataclass, field

import typer

from llmfoundry_lite.errors import first_line

# distribution name -> import name
PACKAGES = {
    "torch": "torch",
    "mosaicml": "composer",
    "mosaicml-streaming": "streaming",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "omegaconf": "omegaconf",
    "wandb": "wandb",
    "flash-attn": "flash_attn",
}
REQUIRED = {"torch", "mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "omegaconf"}


@dataclass
class Report:
    """What doctor found: ``(label, value)`` lines, problems (fatal ones make the exit code 1) and notes.

    A problem is something to fix; a note is worth knowing but expected on some machines (a CUDA build of torch
    on a machine without a GPU, which is what a plain ``pip install`` gives on Linux).
    """

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[bool, str]] = field(default_factory=list)  # (fatal, message)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        """Add an information line."""
        self.lines.append((label, value))

    def problem(self, message: str, fatal: bool = False) -> None:
        """Record a problem."""
        self.problems.append((fatal, message))

    def note(self, message: str) -> None:
        """Record a note (not a problem)."""
        self.notes.append(message)

    @property
    def fatal(self) -> bool:
        """True when a problem prevents training."""
        return any(f for f, _ in self.problems)


def explain_import_error(package: str, err: BaseException, torch_version: str | None) -> str:
    """A one-line diagnosis of a failed import; recognises binary mismatches with torch."""
    text = str(err)
    if "undefined symbol" in text or "symbol not found" in text.lower():
        return (
            f"{package} is installed but was built for another torch/CUDA than this torch {torch_version} "
            f"({first_line(text)[:160]}); reinstall it against this torch: "
            f"pip uninstall -y {package} && pip install --no-build-isolation {package}"
        )
    if "libcudart" in text or "libcuda" in text or "cannot open shared object file" in text:
        return f"{package} cannot load a CUDA library ({first_line(text)[:160]}); check the CUDA runtime"
    return f"{package} fails to import: {type(err).__name__}: {first_line(text)[:200]}"


def diagnose() -> Report:
    """Collect versions and problems (imports every package of the stack; no network)."""
    r = Report()
    r.add("python", f"{platform.python_version()} ({sys.executable})")
    if sys.version_info >= (3, 13):
        r.problem("Python 3.13 is untested (3.10-3.12 are supported)")
    r.add("platform", platform.platform())

    torch_version = None
    for dist_name, module in PACKAGES.items():
        try:
            version = md.version(dist_name)
        except md.PackageNotFoundError:
            version = None
        if version is None:
            if dist_name == "flash-attn":
                r.add(dist_name, "not installed (optional; attention falls back to PyTorch SDPA)")
            else:
                r.add(dist_name, "not installed")
                r.problem(
                    f"{dist_name} is not installed: pip install {dist_name}", fatal=dist_name in REQUIRED
                )
            continue
        try:
            with warnings.catch_warnings():  # third-party import-time warnings are not findings
                warnings.simplefilter("ignore")
                importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (any import failure is a finding, not a crash)
            r.add(dist_name, f"{version} (import FAILED)")
            r.problem(explain_import_error(dist_name, e, torch_version), fatal=dist_name in REQUIRED)
            continue
        if dist_name == "torch":
            import torch

            torch_version = torch.__version__
            cuda = torch.version.cuda or "none (CPU build)"
            r.add("torch", f"{version} (CUDA build: {cuda})")
        else:
            r.add(dist_name, version)
    if torch_version is not None:
        _cuda(r)
    _pins(r)
    return r


def _cuda(r: Report) -> None:
    import torch

    if not torch.cuda.is_available():
        r.add("gpu", "none visible (training runs on CPU)")
        if torch.version.cuda:
            r.note(
                "torch is a CUDA build and no GPU is visible: training runs on CPU (expected on a machine without "
                "a GPU; on a GPU machine check the driver and CUDA_VISIBLE_DEVICES)"
            )
        return
    n = torch.cuda.device_count()
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        r.add(f"gpu{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    r.add("cuda runtime", str(torch.version.cuda))
    try:
        r.add("nccl", ".".join(str(x) for x in torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001
        r.problem("NCCL is not available: multi-GPU training will not work")
    if not torch.cuda.is_bf16_supported():
        r.problem("this GPU has no bf16: use precision: amp_fp16")


def _pins(r: Report) -> None:
    """Versions known to break (see DESIGN.md: transformers >= 4.54 breaks Alibi surgery, wandb >= 0.22)."""
    from packaging.version import Version

    checks = {
        "torch": ("2.6", "2.7.1"),
        "transformers": ("4.51", "4.54"),
        "wandb": (None, "0.22"),
        "mosaicml": ("0.32", "0.33"),
    }
    for name, (lo, hi) in checks.items():
        try:
            v = Version(md.version(name).split("+")[0])
        except md.PackageNotFoundError:
            continue
        if (lo and v < Version(lo)) or (hi and v >= Version(hi)):
            r.problem(
                f"{name} {v} is outside the tested range [{lo or 'any'}, {hi}); install the pinned version"
            )
    try:
        transformers_version = md.version("transformers")
    except md.PackageNotFoundError:
        return
    alibi = _alibi_problem(transformers_version)
    if alibi is not None:
        r.problem(alibi)


def _alibi_problem(transformers_version: str) -> str | None:
    """What a newer transformers breaks in Composer's HF-BERT ALiBi surgery (models.hf says; None if fine)."""
    try:
        from llmfoundry_lite.models.hf import alibi_hf_bert_problem
    except Exception:  # noqa: BLE001 (torch/Composer not importable: reported above)
        return None
    return alibi_hf_bert_problem(transformers_version)


def format_report(r: Report) -> str:
    """The report as aligned text."""
    width = max(len(k) for k, _ in r.lines)
    out = [f"{k.ljust(width)}  {v}" for k, v in r.lines]
    if r.problems:
        out.append("problems:")
        out += [f"  - {'FATAL: ' if fatal else ''}{msg}" for fatal, msg in r.problems]
    else:
        out.append("problems: none found")
    if r.notes:
        out.append("notes:")
        out += [f"  - {msg}" for msg in r.notes]
    return "\n".join(out)


def register_cli(app: typer.Typer) -> None:
    """Add ``llmfoundry-lite doctor``."""

    @app.command("doctor")
    def doctor() -> None:
        """Print versions (torch, composer, streaming, flash-attn, ...), GPUs, and install problems found."""
        r = diagnose()
        typer.echo(format_report(r))
        if r.fatal:
            raise typer.Exit(1)
