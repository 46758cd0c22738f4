"""
Convert original Dasheng checkpoints into ready-to-upload Hugging Face Hub folders, checked and written atomically.

    python convert_checkpoint.py --checkpoint PATH_OR_URL --output DIR [--labels CSV] [--verify] [--overwrite]
        [--dtype float32|bfloat16|float16] [--push-to-hub REPO_ID]

Inputs: a released encoder (`{"model": state dict with front_end.* buffers, "config": dict}`), a fine-tuned
classifier (a plain state dict that also holds `outputlayer.0.*` and `outputlayer.1.*`), a folder in the first Hub
layout (`encoder.*` weights and a config with `encoder_kwargs`), a URL, or a released name (`dasheng-base`,
`dasheng-0.6B`, `dasheng-1.2B`, `dasheng-audioset`). Pickles are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import urllib.parse
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dasheng_hf.configuration_dasheng import DASHENG_PRESETS, DashengConfig
from dasheng_hf.feature_extraction_dasheng import DashengFeatureExtractor, htk_mel_filter_bank
from dasheng_hf.modeling_dasheng import DashengForAudioClassification, DashengModel

__all__ = [
    "RELEASED_CHECKPOINTS",
    "ConversionError",
    "ConversionInterrupted",
    "LoadedCheckpoint",
    "build_parser",
    "convert",
    "load_checkpoint",
    "main",
    "read_labels",
    "resolve_source",
]

RELEASED_CHECKPOINTS = {
    "dasheng-base": "https://zenodo.org/records/11511780/files/dasheng_base.pt",
    "dasheng-0.6B": "https://zenodo.org/records/11511780/files/dasheng_06b.pt",
    "dasheng-1.2B": "https://zenodo.org/records/11511780/files/dasheng_12b.pt",
    "dasheng-audioset": "https://zenodo.org/records/13315686/files/dasheng_audioset_mAP497.pt",
}
# HEAR scores (Environment, Speech, Music) of the released encoders, from the paper.
HEAR_SCORES = {
    "dasheng-base": (80.2, 72.5, 84.0),
    "dasheng-0.6B": (82.4, 74.9, 84.0),
    "dasheng-1.2B": (83.2, 75.7, 84.9),
}
# Heads of the released widths: the original's size helpers set them whatever the stored config says.
KNOWN_NUM_HEADS = {hidden: heads for hidden, _, heads in DASHENG_PRESETS.values()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING_RATE = 16000
VERIFY_SECONDS = (1, 25)
FLOAT32_TOLERANCE = 1e-4
MIN_COSINE = 0.999

# Keys of the original constructor that the conversion reads or checks; the original ignores all others
# (`time_patch_out`, `eval_avg`, optimiser settings, ...) at inference, and so does the conversion.
_USED_KEYS = {
    "embed_dim", "depth", "num_heads", "patch_size", "patch_stride", "target_length", "n_fft", "hop_size", "win_size",
    "f_min", "f_max", "center", "top_db", "drop_rate", "attn_drop_rate", "pooling", "init_values", "norm_layer",
    "act_layer", "block_type", "attention_type",
}  # fmt: skip
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HEAD_KEY = re.compile(r"^(?:.*\.)?outputlayer\.(?P<name>[01]\.(?:weight|bias))$")
_ENCODER_ANCHOR = "patch_embed.proj.weight"


class ConversionError(Exception):
    """A checkpoint, option or output folder that cannot be converted; the one-line message says what to do."""


class ConversionInterrupted(KeyboardInterrupt):
    """Raised by Ctrl-C, SIGTERM or SIGHUP during `convert`, after the staging folder has been cleaned up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass
class LoadedCheckpoint:
    """A checkpoint split into its parts, with the config that will be written."""

    config: DashengConfig
    encoder: dict[str, torch.Tensor]  # original names (`blocks.0.attn.qkv.weight`, ...)
    head: dict[str, torch.Tensor]  # `0.weight`, `0.bias`, `1.weight`, `1.bias` for classifiers, else empty
    front_end: dict[str, torch.Tensor]  # the checkpoint's `front_end.*` buffers (without the prefix), if any
    notes: list[str] = field(default_factory=list)

    @property
    def is_classifier(self) -> bool:
        return bool(self.head)


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading the checkpoint
# ----------------------------------------------------------------------------------------------------------------


def resolve_source(source: str) -> Path:
    """A local file or folder for `source`: a path, a released name, or an http(s) URL (downloaded and cached)."""
    source = RELEASED_CHECKPOINTS.get(source, source)
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return _download(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConversionError(
            f"Checkpoint {source!r} does not exist. Pass a .pt file, a Hub-layout folder, an http(s) URL or one of "
            f"{sorted(RELEASED_CHECKPOINTS)}."
        )
    return path


def _download(url: str) -> Path:
    """Download `url` once into Torch Hub's checkpoint cache (`$TORCH_HOME/hub/checkpoints`), with a progress bar."""
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint.pt"
    # The full URL's hash keeps different URLs with the same file name apart.
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = Path(torch.hub.get_dir()) / "checkpoints" / f"{digest}-{name}"
    if target.exists():
        print(f"Using cached {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {url} to {target}")
    try:
        # Writes to a temporary file beside the target and renames it when complete.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors; a malformed URL a ValueError
        raise ConversionError(f"Could not download {url}: {error}. Check the URL and your connection.") from None
    return target


_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
# Errors that reading a damaged file can raise inside the weights-only unpickler and torch's readers.
_DAMAGED_FILE_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    OverflowError, MemoryError, UnicodeDecodeError, zipfile.BadZipFile, struct.error,
)  # fmt: skip


def _check_file(path: Path, what: str) -> int:
    """Refuse a missing, unreadable or non-regular `path` (a FIFO would block forever) before opening it; its size."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ConversionError(f"The {what} {path} does not exist.") from None
    except OSError as error:
        raise ConversionError(f"Cannot read the {what} {path}: {error.strerror}.") from None
    if stat.S_ISDIR(status.st_mode):
        raise ConversionError(f"The {what} {path} is a folder; pass a file.")
    if not stat.S_ISREG(status.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(status.st_mode), "not a regular file")
        raise ConversionError(f"The {what} {path} is {kind}, not a regular file; pass a file saved on disk.")
    if not os.access(path, os.R_OK):
        raise ConversionError(f"Cannot read the {what} {path}: permission denied.")
    return status.st_size


def _damaged(path: Path, detail: str) -> ConversionError:
    detail = " ".join(detail.split())
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    return ConversionError(
        f"{path} is damaged or not a PyTorch checkpoint ({detail}). Download or copy it again; a checkpoint is the "
        f"file written by `torch.save`."
    )


def _sniff(path: Path, size: int) -> bool:
    """Name files that are not checkpoints at all (JSON, text, safetensors, other formats); whether it is a zip."""
    if size == 0:
        raise ConversionError(f"{path} is empty (0 bytes); the download or copy did not complete. Fetch it again.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as error:
        raise ConversionError(f"Cannot read {path}: {error.strerror}.") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return head.startswith(b"PK")  # a zip archive (torch.save's format) or a pickle (the legacy format)
    if size >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        raise ConversionError(
            f"{path} is a safetensors file, not a PyTorch checkpoint: pass the folder that holds it with its "
            f"config.json (the Hub layout) instead."
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        kind = "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"
        raise ConversionError(
            f"{path} is {kind}, not a PyTorch checkpoint. Pass the .pt file written by `torch.save`, or the folder "
            f"that holds a config.json and its weights."
        )
    raise _damaged(path, f"it starts with bytes {head[:8].hex(' ')}, neither a zip archive nor a pickle")


def _check_zip(path: Path) -> None:
    """Refuse a truncated or corrupted zip checkpoint: torch does not check the CRCs of the tensor data."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise ConversionError(f"{path} is a zip archive, not a PyTorch checkpoint (it holds no data.pkl).")
            bad = archive.testzip()
    except zipfile.BadZipFile as error:
        raise _damaged(path, f"its zip structure is broken: {error}; the file may be truncated") from None
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as error:
        raise _damaged(path, str(error)) from None
    if bad is not None:
        raise _damaged(path, f"the checksum of {bad} does not match its data")


def _torch_load(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (memory-mapped for zip checkpoints) of a file checked beforehand.

    Files that are not checkpoints or are damaged, and pickles that refer to code, each get their own message.
    """
    is_zip = _sniff(path, _check_file(path, "checkpoint"))
    if is_zip:
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. about pickle protocols it may not support
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            try:
                roots = _inert_pickles(path, is_zip)
            except Exception:  # a stream that does not parse: damaged, not code
                roots = None
            if roots is not None:
                raise ConversionError(_describe_unsafe_pickle(path, refused.group(1), roots)) from None
            raise _damaged(path, "its pickled data is cut short or corrupted") from None
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise _damaged(path, found.group(1).splitlines()[0] if found else str(error)) from None
    except OSError as error:
        raise ConversionError(f"Cannot read {path}: {error.strerror or error}.") from None
    except _DAMAGED_FILE_ERRORS as error:
        raise _damaged(path, str(error) or type(error).__name__) from None


def _inert_pickles(path: Path, is_zip: bool) -> list[Any]:
    """The pickled objects of `path` with every global made inert; raises whatever a malformed stream raises."""
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            return [_InertUnpickler(archive.open(name)).load()]
    roots = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        # The legacy format: magic number, protocol, system info, then the data, each its own pickle.
        while len(roots) < 4 and handle.tell() < size:
            roots.append(_InertUnpickler(handle).load())
    return roots


class _Opaque:
    """Stands in for any object of an unpickled file in `_describe_unsafe_pickle`; it runs nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """Unpickles the structure of a file with every global and storage replaced by a `_Opaque` class."""

    def find_class(self, module: str, name: str) -> type:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 spelling, as pickle maps it
        return type("Opaque", (_Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> _Opaque:
        return _Opaque(pid)


def _describe_unsafe_pickle(path: Path, culprit: str, roots: list[Any]) -> str:
    """Say which object made `weights_only=True` refuse `path`, and where it sits (e.g. `config['norm_layer']`)."""
    names = {culprit, f"builtins.{culprit}"}  # torch names builtins without their module (`exec`)
    places = [(where, value.qualname) for root in roots for where, value in _walk(root, "") if value.qualname in names]
    culprit = places[0][1] if places else culprit
    where = f" at {', '.join(place for place, _ in places[:5])}" if places else ""
    return (
        f"Refusing {path}: it holds an object of type `{culprit}`{where}, and unpickling that could run arbitrary "
        f"code, so it was not loaded (only `torch.load(weights_only=True)` is used). Re-save the checkpoint with "
        f"tensors and plain values only (numbers, strings, lists, dicts), e.g. replace `{culprit}` in the config by "
        f"the setting it stands for."
    )


def _walk(value: Any, where: str) -> Iterator[tuple[str, _Opaque]]:
    """The outermost `_Opaque` objects inside nested dicts, lists and tuples, with their places."""
    if isinstance(value, _Opaque):
        yield where or "the top level", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`, or a `ConversionError` saying why it is not one."""
    _check_file(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"The {what} {path} is not UTF-8 text; it must be a JSON object.") from None
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"The {what} {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
        ) from None
    except OSError as error:
        raise ConversionError(f"Cannot read the {what} {path}: {error.strerror}.") from None
    if not isinstance(value, dict):
        raise ConversionError(f"The {what} {path} holds a JSON {type(value).__name__}; it must be an object {{...}}.")
    return value


def _shard_files(folder: Path, index_file: Path) -> list[Path]:
    """The weight files named by a sharded folder's index, each checked to be a file inside the folder."""
    weight_map = _read_json_object(index_file, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(
            f"{index_file} has no `weight_map` object (tensor name -> shard file); rewrite the index or pass the "
            f"folder's weights unsharded."
        )
    names = set(weight_map.values())
    odd = sorted(repr(name) for name in names if not isinstance(name, str) or Path(name).name != name or name in "..")
    if odd:
        raise ConversionError(
            f"{index_file} names shards that are not file names inside the folder: {', '.join(odd[:5])}."
        )
    missing = sorted(name for name in names if not (folder / name).exists())
    if missing:
        raise ConversionError(
            f"{index_file} names shard files that are not in {folder}: {missing[:5]}; copy them there or fix the index."
        )
    return [folder / name for name in sorted(names)]


def _load_weight_file(file: Path) -> dict[str, Any]:
    """The tensors of one .safetensors or .bin weight file."""
    if file.suffix != ".safetensors":
        loaded = _torch_load(file)
        if not isinstance(loaded, dict):
            raise ConversionError(f"{file} does not hold a state dict (found {type(loaded).__name__}).")
        return loaded
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if _check_file(file, "weight file") == 0:
        raise ConversionError(f"{file} is empty (0 bytes); the download or copy did not complete. Fetch it again.")
    try:
        return load_file(file)
    except SafetensorError as error:
        raise ConversionError(
            f"{file} is damaged or not a safetensors file ({error}); it may be truncated. Download or copy it again."
        ) from None
    except OSError as error:
        raise ConversionError(f"Cannot read {file}: {error.strerror or error}.") from None


def _load_hub_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """State dict, config dict and preprocessor config dict (or None) of a folder in the Hub layout."""
    config_file = folder / "config.json"
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).exists()]
    if not config_file.exists() or not weights:
        raise ConversionError(
            f"{folder} is not a Hub-layout folder: it needs config.json and one of {', '.join(_WEIGHT_FILES)}."
        )
    config = _read_json_object(config_file, "model config")
    preprocessor_file = folder / "preprocessor_config.json"
    preprocessor = _read_json_object(preprocessor_file, "preprocessor config") if preprocessor_file.exists() else None
    files = _shard_files(folder, weights[0]) if weights[0].name.endswith(".index.json") else [weights[0]]
    state: dict[str, Any] = {}
    for file in files:
        state.update(_load_weight_file(file))
    return state, config, preprocessor


# ----------------------------------------------------------------------------------------------------------------
# Splitting, deriving the config and checking the tensors
# ----------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint file or Hub folder, derive the config and check every tensor; raises `ConversionError`."""
    hub_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    original_config: dict[str, Any] = {}
    if path.is_dir():
        state, hub_config, preprocessor = _load_hub_folder(path)
    else:
        loaded = _torch_load(path)
        if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
            state, original_config = loaded["model"], loaded.get("config") or {}
            if not isinstance(original_config, dict):
                raise ConversionError(f"The 'config' of {path} is a {type(original_config).__name__}, not a dict.")
        elif isinstance(loaded, dict):
            state = loaded
        else:
            raise ConversionError(
                f"{path} holds a {type(loaded).__name__}; expected a state dict or {{'model': ..., 'config': ...}}."
            )
    odd = sorted(repr(key) for key, value in state.items() if not isinstance(key, str) or not _is_dense(value))
    if odd:
        raise ConversionError(
            f"{path}: these entries of the state dict are not named dense tensors: {', '.join(odd[:10])}."
        )
    encoder, front_end, head, notes = _split_state_dict(state)
    if hub_config is not None:
        config = _config_from_hub(hub_config, head)
    else:
        config = _config_from_original(encoder, head, original_config, notes)
    _check_front_end_settings(config, preprocessor)
    if front_end:
        _check_front_end(front_end, config)
        notes.append("front end: the checkpoint's mel filters and window match the settings being written")
    _check_tensors(encoder, head, config)
    notes.append(f"all {len(encoder)} encoder tensors matched the model's names and shapes")
    return LoadedCheckpoint(config=config, encoder=encoder, head=head, front_end=front_end, notes=notes)


def _is_dense(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized


def _split_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(encoder, front_end, head, notes): the encoder found by its patch embedding, whatever prefix it has."""
    anchors = [key for key in state if key == _ENCODER_ANCHOR or key.endswith("." + _ENCODER_ANCHOR)]
    if len(anchors) != 1:
        raise ConversionError(
            f"Expected exactly one `{_ENCODER_ANCHOR}` in the checkpoint (the Dasheng encoder's patch embedding), "
            f"found {len(anchors)}: {anchors[:5]}. Is this a Dasheng checkpoint?"
        )
    prefix = anchors[0][: -len(_ENCODER_ANCHOR)]
    encoder, front_end, head, unexpected = {}, {}, {}, []
    for key, tensor in state.items():
        match = _HEAD_KEY.match(key)
        if match:
            head[match.group("name")] = tensor
        elif key.startswith(prefix + "front_end."):
            front_end[key[len(prefix) + len("front_end.") :]] = tensor
        elif key.startswith(prefix):
            encoder[key[len(prefix) :]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise ConversionError(
            f"Unexpected tensors outside the encoder (prefix {prefix!r}) and the head (`outputlayer.0/1`): "
            + ", ".join(f"{key} {tuple(state[key].shape)}" for key in sorted(unexpected)[:20])
        )
    notes = [f"encoder: {len(encoder)} tensors" + (f" under the prefix {prefix!r}" if prefix else "")]
    head_keys = {"0.weight", "0.bias", "1.weight", "1.bias"}
    if head and set(head) != head_keys:
        raise ConversionError(
            f"The classifier head is incomplete: missing {sorted('outputlayer.' + k for k in head_keys - set(head))}."
        )
    if head:
        notes.append(f"classifier head: {', '.join(f'outputlayer.{name}' for name in sorted(head))}")
    return encoder, front_end, head, notes


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(
            f"The encoder has no `{key}`, which every Dasheng encoder has; is the checkpoint complete?"
        )
    return tuple(state[key].shape)


def _check_original_types(kwargs: dict[str, Any]) -> None:
    """Refuse values of the original constructor's keys that are not of the type the original takes."""
    odd_keys = sorted(repr(key) for key in kwargs if not isinstance(key, str))
    if odd_keys:
        raise ConversionError(f"The checkpoint's config has keys that are not strings: {', '.join(odd_keys[:5])}.")
    problems = [
        f"{key}={kwargs[key]!r} (expected {_ORIGINAL_KEY_TYPES[key][0]})"
        for key in sorted(set(kwargs) & set(_ORIGINAL_KEY_TYPES))
        if not _ORIGINAL_KEY_TYPES[key][1](kwargs[key])
    ]
    if problems:
        raise ConversionError(
            f"The checkpoint's config has values of the wrong type: {'; '.join(problems)}. Fix them in the "
            f"checkpoint's 'config' dict."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_or_pair(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_ORIGINAL_KEY_TYPES = {
    **dict.fromkeys(("embed_dim", "depth", "num_heads", "target_length", "n_fft", "hop_size", "win_size"),
                    ("an integer", _is_int)),
    **dict.fromkeys(("patch_size", "patch_stride"), ("an integer or a pair of integers", _is_int_or_pair)),
    **dict.fromkeys(("f_min", "f_max", "drop_rate", "attn_drop_rate"), ("a number", _is_number)),
    **dict.fromkeys(("top_db", "init_values"), ("a number or None", lambda value: value is None or _is_number(value))),
    **dict.fromkeys(("pooling", "block_type", "attention_type"), ("a string", lambda value: isinstance(value, str))),
    "center": ("true or false", lambda value: isinstance(value, bool)),
}  # fmt: skip
# Config fields and the original constructor's names for them, to name the key a user has to fix.
_ORIGINAL_NAMES = {
    "hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
    "hop_length": "hop_size", "win_length": "win_size", "num_mel_bins": "n_mels", "hidden_dropout_prob": "drop_rate",
    "attention_probs_dropout_prob": "attn_drop_rate",
}  # fmt: skip
# What building a config, feature extractor or model from bad values raises.
_BAD_VALUE_ERRORS = (ValueError, TypeError, ArithmeticError, AttributeError, KeyError, IndexError)


def _config_from_original(
    encoder: dict[str, torch.Tensor], head: dict[str, torch.Tensor], kwargs: dict[str, Any], notes: list[str]
) -> DashengConfig:
    """The config of an original checkpoint: architecture from shapes and known sizes, maths from its kwargs."""
    _check_original_types(kwargs)
    problems = []
    if kwargs.get("pooling", "mean") != "mean":
        problems.append(f"pooling={kwargs['pooling']!r} (only 'mean' pooling is supported)")
    if kwargs.get("init_values"):
        problems.append(f"init_values={kwargs['init_values']!r} (LayerScale is not supported)")
    for key in ("norm_layer", "act_layer"):
        if kwargs.get(key) is not None:
            problems.append(f"{key}={kwargs[key]!r} (only the default LayerNorm(eps=1e-6) and GELU are supported)")
    for key, default in (("block_type", "Block"), ("attention_type", "Attention")):
        if kwargs.get(key, default) != default:
            problems.append(f"{key}={kwargs[key]!r} (only {default!r} is supported)")
    if problems:
        raise ConversionError(
            "The checkpoint's config asks for what Dasheng for Transformers does not support: "
            + "; ".join(problems)
            + "."
        )

    hidden, _, patch_height, patch_width = _shape(encoder, _ENCODER_ANCHOR)
    depth = len({key.split(".")[1] for key in encoder if key.startswith("blocks.")})
    num_heads = KNOWN_NUM_HEADS.get(hidden, kwargs.get("num_heads"))
    if num_heads is None:
        raise ConversionError(
            f"Width {hidden} is not a released Dasheng size ({sorted(KNOWN_NUM_HEADS)}), so the number of attention "
            f"heads cannot be told from the tensors: put `num_heads` into the checkpoint's config."
        )
    if "num_heads" in kwargs and kwargs["num_heads"] != num_heads:
        notes.append(f"config says num_heads={kwargs['num_heads']}; using {num_heads}, the released width's heads")
    for key, value in (("embed_dim", hidden), ("depth", depth)):
        if key in kwargs and kwargs[key] != value:
            notes.append(f"config says {key}={kwargs[key]}; the tensors say {value}, which is used")
    patch_stride = kwargs.get("patch_stride", (patch_height, patch_width))
    ignored = sorted(set(kwargs) - _USED_KEYS)
    if ignored:
        notes.append(f"ignored config keys (training settings the original ignores at inference): {ignored}")
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": depth,
        "num_attention_heads": num_heads,
        "intermediate_size": _shape(encoder, "blocks.0.mlp.fc1.weight")[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in encoder,
        "num_mel_bins": _shape(encoder, "init_bn.1.weight")[0],
        "patch_size": [patch_height, patch_width],
        "patch_stride": [patch_stride] * 2 if _is_int(patch_stride) else list(patch_stride),
        "target_length": kwargs.get("target_length", 1008),
        "n_fft": kwargs.get("n_fft", 512),
        "hop_length": kwargs.get("hop_size", 160),
        "win_length": kwargs.get("win_size", 512),
        "f_min": kwargs.get("f_min", 0.0),
        "f_max": kwargs.get("f_max", 8000.0),
        "center": kwargs.get("center", True),
        "top_db": kwargs.get("top_db", 120.0),
        "hidden_dropout_prob": kwargs.get("drop_rate", 0.0),
        "attention_probs_dropout_prob": kwargs.get("attn_drop_rate", 0.0),
    }
    preset = next((name for name, sizes in DASHENG_PRESETS.items() if sizes == (hidden, depth, num_heads)), None)
    try:
        config = _make_config(fields, head, name=preset)
    except _BAD_VALUE_ERRORS as error:
        hints = [f"`{name}` is `{original}` there" for name, original in _ORIGINAL_NAMES.items() if name in str(error)]
        raise ConversionError(
            f"The checkpoint's config (or its tensors' shapes) cannot make a valid DashengConfig: {error}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + ". Fix the value in the checkpoint's 'config' dict."
        ) from None
    positions = _shape(encoder, "time_pos_embed")[-1]
    if positions * config.patch_stride[1] != config.target_length:
        raise ConversionError(
            f"time_pos_embed has {positions} positions but target_length={config.target_length} needs "
            f"{config.target_length // config.patch_stride[1]} (target_length / time stride "
            f"{config.patch_stride[1]}). Set target_length in the checkpoint's config to "
            f"{positions * config.patch_stride[1]}."
        )
    return config


def _config_from_hub(hub_config: dict[str, Any], head: dict[str, torch.Tensor]) -> DashengConfig:
    """The config of a Hub-layout folder, rewritten with the current fields and `auto_map`."""
    stale = {"auto_map", "custom_pipelines", "architectures", "transformers_version", "dtype", "torch_dtype"}
    fields = {key: value for key, value in hub_config.items() if key not in stale}
    fields.pop("model_type", None)
    fields.pop("outputdim", None)  # a head becomes DashengForAudioClassification's num_labels
    try:
        return _make_config(fields, head)
    except _BAD_VALUE_ERRORS as error:
        raise ConversionError(f"The folder's config.json cannot be read as a DashengConfig: {error}") from None


def _make_config(fields: dict[str, Any], head: dict[str, torch.Tensor], name: str | None = None) -> DashengConfig:
    if head:
        num_labels = int(head["1.weight"].shape[0])
        fields = {**fields, "num_labels": num_labels, "problem_type": "multi_label_classification"}
        if "id2label" in fields and len(fields["id2label"]) != num_labels:
            fields.pop("id2label")
            fields.pop("label2id", None)
    if name is not None:
        fields = {**fields, "name": name}
    return DashengConfig(**fields)


_FRONT_END_FIELDS = (
    "feature_size",
    "sampling_rate",
    "n_fft",
    "win_size",
    "hop_size",
    "f_min",
    "f_max",
    "center",
    "top_db",
)


def _check_front_end_settings(config: DashengConfig, preprocessor: dict[str, Any] | None) -> None:
    """Build the feature extractor the folder will carry and compute features of 1 s of audio with it, and refuse a
    source preprocessor config whose front end differs from the model config's."""
    settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in (
        "sampling_rate", "n_fft", "win_length", "hop_length", "f_min", "f_max", "center", "top_db", "num_mel_bins",
    ))  # fmt: skip
    try:
        extractor = DashengFeatureExtractor.from_dasheng_config(config)
        audio = _test_signal(1).numpy()
        features = extractor(audio, sampling_rate=config.sampling_rate, return_tensors="np")["input_values"]
    except (*_BAD_VALUE_ERRORS, RuntimeError) as error:
        raise ConversionError(f"The front-end settings cannot compute features ({settings}): {error}") from None
    if not np.isfinite(features).all():
        raise ConversionError(f"The front-end settings give non-finite features ({settings}); fix them in the config.")
    if preprocessor is None:
        return
    fields = {key: value for key, value in preprocessor.items() if key not in ("auto_map", "processor_class")}
    try:
        theirs = DashengFeatureExtractor(**fields)
    except _BAD_VALUE_ERRORS as error:
        raise ConversionError(f"The folder's preprocessor_config.json cannot be used: {error}") from None
    differences = [
        f"{name}={getattr(theirs, name)!r} there, {getattr(extractor, name)!r} in config.json"
        for name in _FRONT_END_FIELDS
        if getattr(theirs, name) != getattr(extractor, name)
    ]
    if differences:
        raise ConversionError(
            f"The folder's preprocessor_config.json disagrees with its config.json about the front end the weights "
            f"were trained with: {'; '.join(differences)}. Correct whichever file is wrong."
        )


def _check_front_end(front_end: dict[str, torch.Tensor], config: DashengConfig) -> None:
    """Refuse when the checkpoint's own mel filters or window disagree with the settings being written."""
    expected = {
        "0.mel_scale.fb": htk_mel_filter_bank(
            config.n_fft // 2 + 1, config.num_mel_bins, config.f_min, config.f_max, config.sampling_rate
        ),
        "0.spectrogram.window": torch.hann_window(config.win_length, periodic=True),
    }
    settings = (
        f"n_fft={config.n_fft}, win_size={config.win_length}, n_mels={config.num_mel_bins}, f_min={config.f_min}, "
        f"f_max={config.f_max}, sampling rate {config.sampling_rate}"
    )
    problems = [f"front_end.{key} is unexpected" for key in sorted(set(front_end) - set(expected))]
    for key, reference in expected.items():
        found = front_end.get(key)
        if found is None:
            problems.append(f"front_end.{key} is missing")
        elif found.shape != reference.shape:
            problems.append(f"front_end.{key} has shape {tuple(found.shape)}, expected {tuple(reference.shape)}")
        elif not torch.allclose(found.float(), reference, rtol=0.0, atol=max(1e-6, _rounding(found.dtype))):
            difference = float((found.float() - reference).abs().max())
            problems.append(f"front_end.{key} differs from the expected one by up to {difference:.3g}")
    if problems:
        raise ConversionError(
            f"The checkpoint's front end does not match the settings being written ({settings}): "
            + "; ".join(problems)
            + ". Fix the front-end settings in the checkpoint's config so they describe how it was trained."
        )


def _rounding(dtype: torch.dtype) -> float:
    """Largest rounding error of values in [0, 1] stored in `dtype` (float16 and bfloat16 checkpoints)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _expected_shapes(config: DashengConfig, classifier: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (`encoder.*` and `outputlayer.*`) of the model for `config`, built on the meta device."""
    try:
        with torch.device("meta"):
            model = DashengForAudioClassification(config) if classifier else DashengModel(config)
    except (*_BAD_VALUE_ERRORS, RuntimeError) as error:
        raise ConversionError(f"The config cannot build a Dasheng model: {error}") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor_problem(key: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with the values of a tensor of the right shape: dtype, NaN/inf, negative variances."""
    if key.endswith("num_batches_tracked"):
        return None  # a counter that inference never reads
    if tensor.dtype not in _FLOAT_DTYPES:
        return f"{key} has dtype {tensor.dtype}, expected floating point (float32, float16, bfloat16 or float64)"
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        return f"{key} has {bad} NaN or infinite values"
    if key.endswith("running_var") and bool((tensor < 0).any()):
        return f"{key} has negative variances"
    return None


def _check_tensors(encoder: dict[str, torch.Tensor], head: dict[str, torch.Tensor], config: DashengConfig) -> None:
    """Refuse missing, unexpected, misshapen and bad-valued tensors, listing each with the shapes found and expected."""
    expected = _expected_shapes(config, classifier=bool(head))
    found = {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"outputlayer.{k}": v for k, v in head.items()}}
    problems = [f"missing {key} (expected {expected[key]})" for key in sorted(set(expected) - set(found))]
    problems += [f"unexpected {key} {tuple(found[key].shape)}" for key in sorted(set(found) - set(expected))]
    problems += [
        f"misshapen {key}: found {tuple(found[key].shape)}, expected {expected[key]}"
        for key in sorted(set(found) & set(expected))
        if tuple(found[key].shape) != expected[key]
    ]
    if not problems:
        problems = [problem for key in sorted(found) if (problem := _tensor_problem(key, found[key])) is not None]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ConversionError(
            f"The checkpoint's tensors do not fit a Dasheng model with hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, num_attention_heads={config.num_attention_heads}, "
            f"intermediate_size={config.intermediate_size}, target_length={config.target_length} "
            f"({len(problems)} problems; names as in the converted model): {shown}."
        )


# ----------------------------------------------------------------------------------------------------------------
# Writing, verifying, pushing
# ----------------------------------------------------------------------------------------------------------------


def read_labels(path: str | os.PathLike, num_labels: int) -> dict[int, str]:
    """`id2label` from a CSV with columns `index,mid,display_name` (AudioSet's format) covering every output."""
    _check_file(Path(path), "labels CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise ConversionError(f"Cannot read the labels CSV {path}: {error.strerror or error}.") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConversionError(f"The labels CSV {path} is not a UTF-8 CSV file ({error}).") from None
    if not rows or not {"index", "display_name"} <= set(rows[0]):
        raise ConversionError(f"{path} needs a header `index,mid,display_name` and one row per class.")
    try:
        id2label = {int(row["index"]): row["display_name"] for row in rows}
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path}: every `index` must be an integer ({error}).") from None
    unnamed = sorted(index for index, name in id2label.items() if not name or not name.strip())
    if unnamed:
        raise ConversionError(f"{path}: the rows with indices {unnamed[:5]} have no display_name.")
    if len(id2label) != len(rows) or sorted(id2label) != list(range(num_labels)):
        raise ConversionError(
            f"{path} has {len(rows)} rows with indices {min(id2label)}..{max(id2label)}, but the classifier has "
            f"{num_labels} outputs: the CSV must list each index 0..{num_labels - 1} exactly once."
        )
    return id2label


def _build_model(checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> DashengModel | DashengForAudioClassification:
    """The Transformers model holding the checkpoint's tensors themselves (no copy unless `dtype` differs)."""
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


def _test_signal(seconds: int) -> torch.Tensor:
    """Fixed 16 kHz audio: a 100 Hz to 4 kHz sweep plus seeded noise."""
    time = torch.arange(seconds * SAMPLING_RATE, dtype=torch.float64) / SAMPLING_RATE
    phase = 2 * torch.pi * (100 * time + (3900 / (2 * seconds)) * time**2)
    noise = torch.randn(time.shape, generator=torch.Generator().manual_seed(seconds), dtype=torch.float64)
    return (0.3 * torch.sin(phase) + 0.05 * noise).float()


def _reference_model(checkpoint: LoadedCheckpoint) -> torch.nn.Module:
    """The original `dasheng` encoder holding the checkpoint's float32 tensors (and front end, if it has one)."""
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
    front_end = checkpoint.front_end or {
        "0.mel_scale.fb": htk_mel_filter_bank(
            config.n_fft // 2 + 1, config.num_mel_bins, config.f_min, config.f_max, config.sampling_rate
        ),
        "0.spectrogram.window": torch.hann_window(config.win_length, periodic=True),
    }
    state = {key: value.float() if value.is_floating_point() else value for key, value in checkpoint.encoder.items()}
    state.update({f"front_end.{key}": value.float() for key, value in front_end.items()})
    reference.load_state_dict(state, strict=True, assign=True)
    return reference.eval()


def _reference_head(checkpoint: LoadedCheckpoint) -> torch.nn.Sequential:
    """The original classifier head: LayerNorm (eps 1e-5) and Linear, in float32."""
    hidden = checkpoint.config.hidden_size
    head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, checkpoint.config.num_labels))
    head.load_state_dict({key: value.float() for key, value in checkpoint.head.items()})
    return head.eval()


def _verify(folder: Path, checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> None:
    """Compare the written folder, loaded through the Auto classes, with the original on 1 s and 25 s of audio."""
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification

    reference = _reference_model(checkpoint)
    head = _reference_head(checkpoint) if checkpoint.is_classifier else None
    exact = dtype == torch.float32
    auto_class = AutoModelForAudioClassification if head is not None and exact else AutoModel
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    model = auto_class.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    failures = []
    for seconds in VERIFY_SECONDS:
        audio = _test_signal(seconds)
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


def _model_card(config: DashengConfig, classifier: bool, repo_id: str) -> str:
    """README.md for the Hub: front matter, what the model is, runnable usage, HEAR scores and citation."""
    sizes = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    size = config.name if config.name in HEAR_SCORES and DASHENG_PRESETS[config.name] == sizes else None
    tags = ["audio", "dasheng", "self-supervised-learning"] + (["audio-classification"] if classifier else [])
    title = f"{size or 'Dasheng'}{' audio classifier' if classifier else ''}"
    architecture = (
        f"{config.num_hidden_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads, "
        f"{config.num_mel_bins}-band log-mel input at {config.sampling_rate} Hz, one embedding per 40 ms"
    )
    if classifier:
        what = (
            f"A Dasheng encoder ({architecture}) with a classification head over {config.num_labels} classes: mean of "
            f"the token embeddings, LayerNorm, Linear, and a sigmoid for each class (multi-label)."
        )
        usage = f"""```python
import numpy as np
from transformers import pipeline

model_id = "{repo_id}"
classifier = pipeline("audio-classification", model=model_id, trust_remote_code=True)

audio = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32)  # 2 s of 16 kHz mono audio
print(classifier({{"raw": audio, "sampling_rate": 16000}}, top_k=5))  # [{{"label": ..., "score": sigmoid}}, ...]
```

The pipeline also takes a path or URL of an audio file (read with ffmpeg and resampled to 16 kHz)."""
    else:
        what = (
            f"Dasheng (Deep Audio-Signal Holistic Embeddings) is an audio encoder trained with masked autoencoding on "
            f"272k hours of general audio. This is {size or 'a Dasheng encoder'}: {architecture}."
        )
        usage = f"""```python
import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel

model_id = "{repo_id}"
feature_extractor = AutoFeatureExtractor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()

audio = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32)  # 2 s of 16 kHz mono audio
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
print(outputs.last_hidden_state.shape)  # (1, 50, {config.hidden_size}): one embedding per 40 ms
print(outputs.pooler_output.shape)  # (1, {config.hidden_size}): the clip's embedding
```"""
    if size:
        environment, speech, music = HEAR_SCORES[size]
        scores = (
            f"HEAR benchmark scores of the pre-trained {size} encoder, from the paper:\n\n"
            f"| Environment | Speech | Music |\n|---|---|---|\n| {environment} | {speech} | {music} |"
        )
    else:
        scores = "This is not one of the released sizes, so the paper reports no HEAR scores for it."
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: {"audio-classification" if classifier else "feature-extraction"}
tags:
{chr(10).join(f"- {tag}" for tag in tags)}
---

# {title}

{what}

Converted from the original release (https://github.com/RicherMans/Dasheng) with `convert_checkpoint.py` of
dasheng-hf and checked against the original implementation. Input: 16 kHz mono audio.

## Usage

{usage}

## Results

{scores}

## Citation

```bibtex
@inproceedings{{dinkel2024dasheng,
  title     = {{Scaling up masked audio encoder learning for general audio classification}},
  author    = {{Dinkel, Heinrich and Yan, Zhiyong and Wang, Yongqing and Zhang, Junbo and Wang, Yujun and Wang, Bin}},
  booktitle = {{Interspeech 2024}},
  year      = {{2024}}
}}
```
"""


def _push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload the finished folder; on any failure the folder stays as it is and the error says how to retry."""
    from huggingface_hub import HfApi, constants, get_token

    retry = f"The converted folder is intact at {folder}; upload it later with `hf upload {repo_id} {folder}`."
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if offline or constants.HF_HUB_OFFLINE:
        raise ConversionError(f"Cannot push to {repo_id}: HF_HUB_OFFLINE is set. {retry}")
    if get_token() is None:
        raise ConversionError(
            f"Cannot push to {repo_id}: no Hugging Face token. Log in with `hf auth login` or set HF_TOKEN. {retry}"
        )
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


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_OCCUPIED = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux `renameat2(2)`; False where the system or the file system lacks it (the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc before 2.28, or another C library
        return False
    at_cwd = -100
    if function(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), ctypes.c_uint(flags)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with an `OSError` (EEXIST, ENOTEMPTY, ...) if anything is there."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):  # fallback: only an empty folder appearing in between could still be replaced
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _swap_in(staging: Path, output: Path) -> None:
    """Replace the folder `output` by `staging` atomically (exchange, or a rename sequence that restores it)."""
    if _renameat2(staging, output, _RENAME_EXCHANGE):
        shutil.rmtree(staging)  # now the previous folder
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    old = holder / output.name
    os.rename(output, old)
    try:
        _rename_noreplace(staging, output)
    except OSError as error:
        try:
            _rename_noreplace(old, output)
        except OSError:
            raise ConversionError(
                f"Could not move the converted folder to {output} ({error.strerror}), nor the previous folder back: "
                f"the previous folder is safe at {old}, the converted one at {staging}."
            ) from None
        holder.rmdir()
        raise
    shutil.rmtree(holder)


def _claim(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished `staging` folder to `output` in one step; with something at `output` that appeared while
    converting (and no --overwrite), refuse, keeping both."""
    if output.is_dir() and not output.is_symlink():
        if overwrite:
            return _swap_in(staging, output)
        with contextlib.suppress(OSError):
            output.rmdir()  # an empty folder, as checked at the start; fails if anything was put into it since
    try:
        return _rename_noreplace(staging, output)
    except OSError as error:
        if error.errno not in _OCCUPIED:
            raise
    kept = output.with_name(f"{output.name}.converted-{staging.name.rsplit('-', 1)[-1]}")
    try:
        _rename_noreplace(staging, kept)
    except OSError:
        kept = staging
    raise ConversionError(
        f"{output} appeared while converting (another process?) and --overwrite was not given: it was left as it "
        f"is, and the converted folder was kept at {kept}. Move it into place yourself, or convert again with "
        f"--overwrite."
    )


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written, before any expensive work: a file, a symbolic link, a folder that is
    not empty (without --overwrite) or cannot be read, a parent that is a file, no permission, a read-only disk."""
    if not output.name or output.name == "..":
        raise ConversionError(f"The output {output} does not name a folder; pass a path such as hub/dasheng-base.")
    if output.is_symlink():
        raise ConversionError(f"The output {output} is a symbolic link; pass the path of the folder itself.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"The output {output} is a file; pass a folder path.")
    if output.is_dir():
        try:
            occupied = any(output.iterdir())
        except OSError as error:
            raise ConversionError(f"Cannot read the output folder {output}: {error.strerror}.") from None
        if occupied and not overwrite:
            raise ConversionError(f"The output folder {output} is not empty; pass --overwrite to replace it.")
    parent = output.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"Cannot create {output}: {parent} is a file, not a folder. Choose another output path.")
    if hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise ConversionError(f"Cannot write {output}: {parent} is on a read-only file system.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(
            f"Cannot write {output}: permission denied in {parent}. Choose a folder you can write to."
        )


def _write_folder(staging: Path, loaded: LoadedCheckpoint, dtype: torch.dtype, repo_id: str) -> None:
    """Weights, config, preprocessor config, code files and model card, readable by everyone the umask allows."""
    model = _build_model(loaded, dtype)
    model.save_pretrained(staging)
    del model
    (staging / "README.md").write_text(_model_card(loaded.config, loaded.is_classifier, repo_id))
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
    output = Path(os.path.abspath(os.path.expanduser(output)))
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    guard = _SignalGuard()
    with guard.installed():
        _check_output(output, overwrite)
        if labels is not None:
            _check_file(Path(labels), "labels CSV")
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
        _stage_and_claim(loaded, output, verify, overwrite, DTYPES[dtype], push_to_hub, guard)
    print(f"Wrote {output}: {', '.join(sorted(path.name for path in output.iterdir()))}")
    if push_to_hub:
        _push_to_hub(output, push_to_hub)
    return output


def _stage_and_claim(
    loaded: LoadedCheckpoint,
    output: Path,
    verify: bool,
    overwrite: bool,
    dtype: torch.dtype,
    push_to_hub: str | None,
    guard: _SignalGuard,
) -> None:
    """Write the folder into a hidden staging folder beside `output`, verify it, then claim `output` with it."""
    missing_parents = [parent for parent in reversed(output.parents) if not parent.exists()]
    staging = None
    claimed = False
    try:
        with guard.deferred():
            output.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        _write_folder(staging, loaded, dtype, push_to_hub or f"mispeech/{output.name}")
        if verify:
            _verify(staging, loaded, dtype)
        with guard.deferred():
            try:
                _claim(staging, output, overwrite)
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
    parser = _Parser(
        prog="dasheng-convert",
        description="Convert an original Dasheng checkpoint (file, URL, released name or Hub-layout folder) into a "
        "Hugging Face Hub folder that loads with the Auto classes and trust_remote_code=True.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=f"a .pt file, an http(s) URL (downloaded once and cached), a Hub-layout folder, or one of "
        f"{', '.join(RELEASED_CHECKPOINTS)}",
    )
    parser.add_argument("--output", required=True, help="folder to write (written atomically)")
    parser.add_argument("--labels", help="CSV `index,mid,display_name` of a classifier's classes (e.g. AudioSet's)")
    parser.add_argument("--verify", action="store_true", help="compare with the original `dasheng` package")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished folder to this Hub repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status: 0 on success, 1 on a conversion error, 2 on a usage error,
    128 + the signal's number when interrupted (130 for Ctrl-C, 143 for SIGTERM)."""
    args = build_parser().parse_args(argv)
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
