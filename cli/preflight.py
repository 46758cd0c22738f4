"""
Checks a command makes before any work: the Hub resources it needs (all reported together, offline-aware, without
retries), whether this CPU computes bf16 natively, and an output folder that an early failure does not leave behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DashengPreflightError",
    "HubResource",
    "check_resources",
    "cpu_has_native_bf16",
    "new_output_folder",
    "quiet_optional_kernel_logs",
    "warn_if_bf16_is_emulated",
]

# A Hub repo id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


class DashengPreflightError(ValueError):
    """What a command needs is missing; the message names every missing resource and what to pass instead."""


@dataclass(frozen=True)
class HubResource:
    """A model or dataset a command needs: the flag it came from and what the user passed (a path or a Hub id)."""

    flag: str
    reference: str
    kind: str = "model"  # "model" or "dataset"


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(reference: str) -> bool:
    return (
        reference.startswith(("/", "./", "../", "~", "."))
        or reference.count("/") > 1
        or os.sep != "/"
        and os.sep in reference
        or not _REPO_ID.match(reference)
        or "--" in reference
        or ".." in reference
    )


def _cached(reference: str, kind: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the local Hugging Face cache (or `cache_dir`) holds a snapshot of this repo."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    snapshots = cache / repo_folder_name(repo_id=reference, repo_type=kind) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _ask_hub(resources: list[HubResource], timeout: float) -> dict[HubResource, str]:
    """One request per resource, no retries: the problem with each one the Hub does not serve."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    problems, api = {}, HfApi()
    for resource in resources:
        try:
            api.repo_info(resource.reference, repo_type=resource.kind, timeout=timeout)
        except GatedRepoError:
            problems[resource] = "is gated on the Hub: accept its terms and log in (`hf auth login`)"
        except RepositoryNotFoundError:
            problems[resource] = f"is no {resource.kind} on the Hub (nor a local path)"
        except Exception as error:  # connection refused, DNS, timeout, proxy: the Hub cannot be reached
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            problems[resource] = f"is not in the local cache and the Hub cannot be reached ({reason})"
            break
    if problems and all("cannot be reached" in problem for problem in problems.values()):
        first = next(iter(problems.values()))
        problems = {resource: first for resource in resources}  # unreachable for every one of them
    return problems


def check_resources(
    resources: Iterable[HubResource],
    advice: str = "",
    timeout: float = 10.0,
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """
    Checks every model and dataset a command needs before any work and raises one [`DashengPreflightError`]
    naming all that are missing: local paths must exist; Hub ids must be in the local cache or, unless
    `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set, answer one request each (`timeout` seconds, no retries). When
    every resource is cached but the Hub cannot be reached, the process switches to offline mode (no retries later).

    Args:
        resources: what the command needs.
        advice: what to pass instead of a missing model, appended to the message (for example the converter's command).
        timeout: seconds to wait for the Hub per request.
        cache_dir: the Hugging Face cache the command reads (`cache_dir=` of `from_pretrained`), if not the default.
    """
    problems: dict[HubResource, str] = {}
    remote = []
    for resource in resources:
        reference = resource.reference
        if os.path.exists(os.path.expanduser(reference)):
            continue
        if _looks_like_path(reference):
            problems[resource] = "does not exist (no such file or folder)"
        elif _cached(reference, resource.kind, cache_dir):
            continue
        elif _offline():
            problems[resource] = (
                "is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (no downloads); nor is it a "
                "local path"
            )
        else:
            remote.append(resource)
    if remote:
        problems.update(_ask_hub(remote, timeout))
    if not problems:
        return
    listed = "; ".join(f"{r.flag} {r.reference!r} {problem}" for r, problem in problems.items())
    if all(problem.startswith("does not exist") for problem in problems.values()):
        raise DashengPreflightError(f"{listed}.")
    models = any(resource.kind == "model" for resource in problems)  # the advice is about models
    fix = "pass a local folder or file instead" + (f" ({advice})" if advice and models else "")
    raise DashengPreflightError(f"{listed}. To run without the Hub, {fix}.")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on Arm), from `/proc/cpuinfo` (or the
    text given); None where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in {"flags", "features"}:
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_if_bf16_is_emulated(flag: str = "--bf16", cpuinfo: str | None = None) -> str | None:
    """
    The one-line warning to show when bf16 runs on a CPU without bf16 instructions, where it is emulated (measured at
    0.14x the speed of fp32 on an AVX2 CPU); None where the CPU has them or cannot be read.
    """
    if cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return (
        f"warning: {flag} on this CPU is emulated (no avx512_bf16/amx_bf16 instructions) and runs several times "
        "slower than float32; leave it out here, or use a GPU or a CPU with bf16 instructions."
    )


@contextlib.contextmanager
def new_output_folder(path: str | os.PathLike, remove_partial: bool = True) -> Iterator[Path]:
    """
    The output folder of a command, created if missing. If the block raises (or is interrupted) and the folder did
    not exist before, it is removed: entirely with `remove_partial` (what the block wrote is incomplete), otherwise
    only if it is still empty. A folder that existed before is never removed.
    """
    folder = Path(path)
    existed = folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DashengPreflightError(
            f"cannot create the output folder {str(folder)!r}: {error.strerror or error}; pass a writable path."
        ) from None
    try:
        yield folder
    except BaseException:
        if not existed:
            if remove_partial:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def quiet_optional_kernel_logs() -> None:
    """
    Keep to errors the loggers of `bitsandbytes` and `kernels`: importing Transformers' Trainer with bitsandbytes
    installed makes its CPU backend look for an optional 4-bit kernel on the Hub and print two warnings when it is not
    there (always, offline), about a kernel these tools never use.
    """
    import logging

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
