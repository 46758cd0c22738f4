"""
Convert original Dasheng checkpoints into ready-to-upload Hugging Face Hub folders, checked and written atomically.

    python convert_checkpoint.py --checkpoint PATH_OR_URL --output DIR [--labels CSV] [--verify] [--overwrite]
        [--dtype float32|bfloat16|float16] [--push-to-hub REPO_ID]

Inputs: a released encoder (`{"model": state dict with front_end.* buffers, "config": dict}`), a fine-tuned
classifier (a plain state dict that also holds `outputlayer.0.*` and `outputlayer.1.*`), a folder in the first Hub
layout (`encoder.*` weights and a config with `encoder_kwargs`), a URL, or a released name (`dasheng-base`,
`dasheng-0.6B`, `dasheng-1.2B`, `dasheng-audioset`). Pickles are only ever read with `torch.load(weights_only=True)`.

This module runs the conversion (stage, verify, claim the output, under signal handling) and the command line; its
parts live in `conversion/`: reading the input files (`checkpoint_files.py`), deriving the config and checking the
tensors (`checkpoint_contents.py`), the model card (`model_card.py`) and the atomic output folder (`output_folder.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __name__ == "__main__" and not __package__:  # `python convert_checkpoint.py` in a checkout, as in the Hub ports:
    import dasheng_hf  # noqa: F401  the relative imports below then resolve in the installed package (PEP 366)

    __package__ = "dasheng_hf"

# Light imports only at module level, so that `dasheng-convert --help` answers at once: torch, transformers and the
# conversion's parts are imported where they are used, after the command line is parsed.
from .conversion.model_card import build_model_card, file_sha256, released_checkpoint

if TYPE_CHECKING:
    import torch

    from .conversion.checkpoint_contents import LoadedCheckpoint
    from .conversion.checkpoint_files import ConversionError
    from .modeling_dasheng import DashengForAudioClassification, DashengModel

# ConversionError is defined in checkpoint_files.py and exported here too: `convert` raises it.
__all__ = ["ConversionError", "ConversionInterrupted", "build_parser", "convert", "main"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The keys of checkpoint_files.RELEASED_CHECKPOINTS, for --help without importing torch (a test keeps them equal).
RELEASED_NAMES = ("dasheng-base", "dasheng-0.6B", "dasheng-1.2B", "dasheng-audioset")
VERIFY_SECONDS = (1, 25)
FLOAT32_TOLERANCE = 1e-4
MIN_COSINE = 0.999


def __getattr__(name: str) -> Any:
    """`ConversionError`, imported on first use (its module imports torch)."""
    if name == "ConversionError":
        from .conversion.checkpoint_files import ConversionError

        return ConversionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConversionInterrupted(KeyboardInterrupt):
    """Raised by Ctrl-C, SIGTERM or SIGHUP during `convert`, after the staging folder has been cleaned up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _build_model(checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> DashengModel | DashengForAudioClassification:
    """The Transformers model holding the checkpoint's tensors themselves (no copy unless `dtype` differs)."""
    import torch

    from .modeling_dasheng import DashengForAudioClassification, DashengModel

    with torch.device("meta"):
        model_class = DashengForAudioClassification if checkpoint.is_classifier else DashengModel
        model = model_class(checkpoint.config)

    expected = model.state_dict()
    state = {f"encoder.{key}": value for key, value in checkpoint.encoder.items()}
    state.update({f"outputlayer.{key}": value for key, value in checkpoint.head.items()})
    # Weights in `dtype`; a counter such as num_batches_tracked keeps the model's integer dtype.
    state = {
        key: value.to(dtype if expected[key].is_floating_point() else expected[key].dtype).contiguous()
        for key, value in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _reference_model(checkpoint: LoadedCheckpoint) -> torch.nn.Module:
    """The original `dasheng` encoder holding the checkpoint's float32 tensors (and front end, if it has one)."""
    from .conversion.checkpoint_contents import expected_front_end
    from .conversion.checkpoint_files import ConversionError

    try:
        from dasheng.pretrained.pretrained import Dasheng
    except ImportError as error:
        raise ConversionError(
            f"--verify compares against the original implementation, but it cannot be imported ({error}). Install "
            f"it with `pip install dasheng==0.0.9 einops torchaudio`, or convert without --verify."
        ) from error
    config = checkpoint.config
    kwargs = {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "qkv_bias": config.qkv_bias,
        "patch_size": config.patch_size,
        "patch_stride": config.patch_stride,
        "target_length": config.target_length,
        "n_fft": config.n_fft,
        "n_mels": config.num_mel_bins,
        "hop_size": config.hop_length,
        "win_size": config.win_length,
        "f_min": config.f_min,
        "f_max": config.f_max,
        "center": config.center,
        "top_db": config.top_db,
    }
    reference = Dasheng(**kwargs)
    front_end = checkpoint.front_end or expected_front_end(config)
    state = {key: value.float() if value.is_floating_point() else value for key, value in checkpoint.encoder.items()}
    state.update({f"front_end.{key}": value.float() for key, value in front_end.items()})
    reference.load_state_dict(state, strict=True, assign=True)
    return reference.eval()


def _reference_head(checkpoint: LoadedCheckpoint) -> torch.nn.Sequential:
    """The original classifier head: LayerNorm (eps 1e-5) and Linear, in float32."""
    import torch

    hidden = checkpoint.config.hidden_size
    head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, checkpoint.config.num_labels))
    head.load_state_dict({key: value.float() for key, value in checkpoint.head.items()})
    return head.eval()


def _verify(folder: Path, checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> None:
    """Compare the written folder, loaded through the Auto classes, with the original on 1 s and 25 s of audio."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification

    from .conversion.checkpoint_contents import SAMPLING_RATE, sweep_audio
    from .conversion.checkpoint_files import ConversionError

    reference = _reference_model(checkpoint)
    head = _reference_head(checkpoint) if checkpoint.is_classifier else None
    exact = dtype == torch.float32
    auto_class = AutoModelForAudioClassification if head is not None and exact else AutoModel
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    model = auto_class.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    failures = []
    for seconds in VERIFY_SECONDS:
        audio = sweep_audio(seconds)
        inputs = extractor(audio.numpy(), sampling_rate=SAMPLING_RATE, return_tensors="pt")
        with torch.no_grad():
            tokens = reference(audio[None])
            output = model(**inputs)
        if exact:
            what = "logits" if head is not None else "token embeddings"
            with torch.no_grad():
                expected = head(tokens.mean(dim=1)) if head is not None else tokens
            found = output.logits if head is not None else output.last_hidden_state
            difference = float((found.float() - expected).abs().max())
            print(f"verify {seconds:>2} s: max |difference| of the {what} = {difference:.3g}")
            if not difference <= FLOAT32_TOLERANCE:
                failures.append(f"{seconds} s: the {what} differ by {difference:.3g} > {FLOAT32_TOLERANCE}")
        else:
            pooled = output.pooler_output.float()
            cosine = float(torch.nn.functional.cosine_similarity(pooled, tokens.mean(dim=1)).min())
            print(f"verify {seconds:>2} s: cosine similarity of the pooled embeddings = {cosine:.6f}")
            if not cosine >= MIN_COSINE:
                failures.append(f"{seconds} s: cosine similarity {cosine:.6f} < {MIN_COSINE}")
    if failures:
        raise ConversionError("Verification against the original implementation failed: " + "; ".join(failures))


def _check_push(repo_id: str) -> None:
    """Before any work: pushing needs the Hub (not HF_HUB_OFFLINE) and a token."""
    from huggingface_hub import constants, get_token

    from .conversion.checkpoint_files import ConversionError

    later = "convert without --push-to-hub and upload the folder later with `hf upload`"
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if offline or constants.HF_HUB_OFFLINE:
        raise ConversionError(f"Cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it, or {later}.")
    if get_token() is None:
        raise ConversionError(
            f"Cannot push to {repo_id}: no Hugging Face token. Log in with `hf auth login` or set HF_TOKEN, or {later}."
        )


def _push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload the finished folder; on any failure the folder stays as it is and the error says how to retry."""
    from huggingface_hub import HfApi

    from .conversion.checkpoint_files import ConversionError

    retry = f"The converted folder is intact at {folder}; upload it later with `hf upload {repo_id} {folder}`."
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload Dasheng converted checkpoint")
    except Exception as error:  # network, permission and HTTP errors of huggingface_hub
        raise ConversionError(f"Pushing to {repo_id} failed: {error}. {retry}") from error
    print(f"Pushed {folder} to https://huggingface.co/{repo_id}")


class _SignalGuard:
    """Turns SIGINT, SIGTERM and SIGHUP into `ConversionInterrupted` while installed, so `finally` clean-ups run;
    inside `deferred()` a signal waits until the block is done (a rename sequence is never cut in half)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = self.pending or signum
        else:
            raise ConversionInterrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Take over the signals whose handling is Python's default (only possible in the main thread)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                signum = getattr(signal, name, None)
                if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                    previous[signum] = signal.signal(signum, self.handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise ConversionInterrupted(signum)


def _write_folder(
    staging: Path,
    loaded: LoadedCheckpoint,
    dtype: torch.dtype,
    repo_id: str,
    released: str | None,
    source: str,
    verified: bool,
) -> None:
    """Weights, config, preprocessor config, code files and model card, readable by everyone the umask allows."""
    model = _build_model(loaded, dtype)
    model.save_pretrained(staging)
    del model
    card = build_model_card(loaded.config, loaded.is_classifier, repo_id, released, source, verified)
    (staging / "README.md").write_text(card)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp and some writers make owner-only entries
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)


def convert(
    checkpoint: str,
    output: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    verify: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
    push_to_hub: str | None = None,
) -> Path:
    """Convert `checkpoint` into the Hub folder `output` (see the module docstring); returns the folder.

    Raises `ConversionError` for anything wrong with the inputs, options or output path (nothing is left behind),
    and `ConversionInterrupted` on Ctrl-C, SIGTERM or SIGHUP (after removing the staging folder).
    """
    import torch

    from .conversion.checkpoint_contents import load_checkpoint
    from .conversion.checkpoint_files import ConversionError, check_file, read_labels, resolve_source
    from .conversion.output_folder import check_output

    output = Path(os.path.abspath(os.path.expanduser(output)))
    dtypes = {name: getattr(torch, name) for name in DTYPE_NAMES}
    if dtype not in dtypes:
        raise ConversionError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(dtypes)}.")
    guard = _SignalGuard()
    with guard.installed():
        check_output(output, overwrite)
        if labels is not None:
            check_file(Path(labels), "labels CSV")
        if push_to_hub:
            _check_push(push_to_hub)
        source = resolve_source(checkpoint)
        try:
            loaded = load_checkpoint(source)
        except ConversionError as error:
            if source.parent == Path(torch.hub.get_dir()) / "checkpoints":  # a download that is not a checkpoint
                raise ConversionError(
                    f"{error} It was downloaded earlier: delete {source} to fetch it again."
                ) from None
            raise
        for note in loaded.notes:
            print(note)
        if labels is not None:
            if not loaded.is_classifier:
                raise ConversionError(
                    "--labels only applies to classifiers, and this checkpoint has no outputlayer head."
                )
            id2label = read_labels(labels, loaded.config.num_labels)
            loaded.config.id2label = id2label
            loaded.config.label2id = {name: index for index, name in id2label.items()}
        sha256 = file_sha256(source) if source.is_file() else None
        released = released_checkpoint(checkpoint, sha256)
        repo_id = push_to_hub or (f"mispeech/{output.name}" if released else str(output))
        provenance = _describe_source(checkpoint, source, sha256)
        if released is None:
            print("Not one of the released checkpoints (by its checksum): the model card describes this conversion.")
        _stage_and_claim(loaded, output, verify, overwrite, dtypes[dtype], repo_id, released, provenance, guard)
    print(f"Wrote {output}: {', '.join(sorted(path.name for path in output.iterdir()))}")
    if push_to_hub:
        _push_to_hub(output, push_to_hub)
    return output


def _describe_source(checkpoint: str, source: Path, sha256: str | None) -> str:
    """What the input was: its name, where it was downloaded from, its size and checksum (or that it is a folder)."""
    from .conversion.checkpoint_files import RELEASED_CHECKPOINTS

    url = RELEASED_CHECKPOINTS.get(checkpoint, checkpoint)
    parts = [f"downloaded from {url}"] if url.startswith(("http://", "https://")) else []
    if sha256 is None:
        parts.append("a folder in the first Hub layout")
    else:
        parts.append(f"{source.stat().st_size / 1e6:.1f} MB, sha256 {sha256}")
    return f"{source.name} ({'; '.join(parts)})"


def _stage_and_claim(
    loaded: LoadedCheckpoint,
    output: Path,
    verify: bool,
    overwrite: bool,
    dtype: torch.dtype,
    repo_id: str,
    released: str | None,
    provenance: str,
    guard: _SignalGuard,
) -> None:
    """Write the folder into a hidden staging folder beside `output`, verify it, then claim `output` with it."""
    from .conversion.checkpoint_files import ConversionError
    from .conversion.output_folder import claim

    missing_parents = [parent for parent in reversed(output.parents) if not parent.exists()]
    staging = None
    claimed = False
    try:
        with guard.deferred():
            output.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        _write_folder(staging, loaded, dtype, repo_id, released, provenance, verify)
        if verify:
            _verify(staging, loaded, dtype)
        with guard.deferred():
            try:
                claim(staging, output, overwrite)
            except ConversionError:  # the finished folder was kept beside the output; the message says where
                claimed = True
                raise
            claimed = True
    except OSError as error:
        where = error.filename or output.parent
        raise ConversionError(
            f"Could not write the converted folder ({error.strerror or error}: {where}); nothing was left at {output}."
        ) from None
    finally:
        if not claimed:
            with guard.deferred():
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                for parent in reversed(missing_parents):
                    with contextlib.suppress(OSError):
                        parent.rmdir()  # only if empty


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that points to --help."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `dasheng-convert` command line."""
    parser = _Parser(
        prog="dasheng-convert",
        description="Convert an original Dasheng checkpoint (file, URL, released name or Hub-layout folder) into a "
        "Hugging Face Hub folder that loads with the Auto classes and trust_remote_code=True.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=f"a .pt file, an http(s) URL (downloaded once and cached), a Hub-layout folder, or one of "
        f"{', '.join(RELEASED_NAMES)}",
    )
    parser.add_argument("--output", required=True, help="folder to write (written atomically)")
    parser.add_argument("--labels", help="CSV `index,mid,display_name` of a classifier's classes (e.g. AudioSet's)")
    parser.add_argument("--verify", action="store_true", help="compare with the original `dasheng` package")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="dtype of the written weights")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished folder to this Hub repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status: 0 on success, 1 on a conversion error, 2 on a usage error,
    128 + the signal's number when interrupted (130 for Ctrl-C, 143 for SIGTERM)."""
    args = build_parser().parse_args(argv)
    from .conversion.checkpoint_files import ConversionError

    try:
        convert(
            args.checkpoint,
            args.output,
            labels=args.labels,
            verify=args.verify,
            overwrite=args.overwrite,
            dtype=args.dtype,
            push_to_hub=args.push_to_hub,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"error: interrupted by {signal.Signals(signum).name}; no partial output was left.", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
