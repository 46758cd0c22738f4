"""
Finding, reading and checking the input files of a conversion: checkpoints (local, released names or downloads), the
folders of the first Hub layout, and a classifier's labels CSV.

Every file is checked before it is opened (a FIFO would block forever), files that are not checkpoints are named for
what they are (JSON, text, safetensors), damaged zip checkpoints are caught by their checksums, and pickles are only
ever read with `torch.load(weights_only=True)`; one that refers to code is described, without running anything, by an
unpickler that makes every global inert.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import pickle
import pickletools
import re
import stat
import struct
import unicodedata
import urllib.parse
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RELEASED_CHECKPOINTS",
    "ConversionError",
    "check_file",
    "load_hub_folder",
    "load_torch_file",
    "read_labels",
    "resolve_source",
]

RELEASED_CHECKPOINTS = {
    "dasheng-base": "https://zenodo.org/records/11511780/files/dasheng_base.pt",
    "dasheng-0.6B": "https://zenodo.org/records/11511780/files/dasheng_06b.pt",
    "dasheng-1.2B": "https://zenodo.org/records/11511780/files/dasheng_12b.pt",
    "dasheng-audioset": "https://zenodo.org/records/13315686/files/dasheng_audioset_mAP497.pt",
}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ConversionError(Exception):
    """A checkpoint, option or output folder that cannot be converted; the one-line message says what to do.

    Control characters (say, a newline in a file name) are escaped, so the message stays one line in a terminal.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(repr(char)[1:-1] if unicodedata.category(char) == "Cc" else char for char in message))


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


_MAX_NESTING = 32  # levels of dicts/lists/tuples in a checkpoint; more is not a checkpoint
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


def check_file(path: Path, what: str) -> int:
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
    try:  # incremental: a character cut at the end of `head` is no reason to call the file binary
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= len(head))
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


def load_torch_file(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (memory-mapped for zip checkpoints) of a file checked beforehand.

    Files that are not checkpoints or are damaged, and pickles that refer to code, each get their own message.
    """
    try:
        is_zip = _sniff(path, check_file(path, "checkpoint"))
    except ConversionError:  # a bare pickle of protocol 0 is text, and may still carry code: name it as such
        code = _code_references(path, False) if path.is_file() else []
        if code:
            raise ConversionError(_describe_unsafe_pickle(path, code[0], code, False)) from None
        raise
    if is_zip:
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. about pickle protocols it may not support
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        code = _code_references(path, is_zip)
        if code:
            culprit = refused.group(1) if refused and refused.group(1) in code else code[0]
            raise ConversionError(_describe_unsafe_pickle(path, culprit, code, is_zip)) from None
        if refused:
            raise _damaged(path, "its pickled data is cut short or corrupted") from None
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise _damaged(path, found.group(1).splitlines()[0] if found else str(error)) from None
    except RecursionError:
        raise _damaged(path, "its data is nested too deeply to be a checkpoint") from None
    except OSError as error:
        raise ConversionError(f"Cannot read {path}: {error.strerror or error}.") from None
    except _DAMAGED_FILE_ERRORS as error:
        raise _damaged(path, str(error) or type(error).__name__) from None
    if _nesting_depth(loaded) > _MAX_NESTING:
        raise ConversionError(
            f"{path} nests lists, tuples or dicts more than {_MAX_NESTING} levels deep; a checkpoint holds "
            f"tensors and settings a few levels deep. Re-save it with the state dict and a flat config."
        )
    return loaded


def _nesting_depth(value: Any) -> int:
    """How deeply dicts, lists and tuples nest in `value` (iteratively: any depth is measured without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > _MAX_NESTING:
            return deepest
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _pickle_streams(path: Path, is_zip: bool) -> Iterator[Any]:
    """Binary streams positioned at each pickle of `path` (the data.pkl of a zip; the legacy format's first four)."""
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            with archive.open(name) as stream:
                yield stream
        return
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        # The legacy format: magic number, protocol, system info, then the data, each its own pickle.
        for _ in range(4):
            if handle.tell() >= size:
                break
            yield handle


def _code_references(path: Path, is_zip: bool) -> list[str]:
    """
    The globals (`module.name`) the pickles of `path` refer to that `torch.load(weights_only=True)` does not allow,
    read from the opcodes alone (nothing is built or run); `[]` if there are none or the stream does not parse.
    """
    found: list[str] = []
    try:
        for stream in _pickle_streams(path, is_zip):
            strings: list[str] = []  # recent string constants: STACK_GLOBAL takes its module and name from them
            memo: dict[int, str | None] = {}
            last: str | None = None  # the string the previous opcode pushed, if it pushed one
            for opcode, argument, _ in pickletools.genops(stream):
                name, pushed = None, None
                if opcode.name in ("GLOBAL", "INST"):
                    name = argument.replace(" ", ".", 1)
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                elif "UNICODE" in opcode.name or "STRING" in opcode.name:
                    pushed = str(argument)
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if argument is None else argument] = last
                    pushed = last
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(argument)
                elif opcode.name.startswith("EXT"):
                    name = f"copyreg extension {argument}"
                if pushed is not None and opcode.name not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    strings.append(pushed)
                last = pushed
                if name is not None:
                    name = name.replace("__builtin__.", "builtins.", 1)
                    if not _allowed_global(name) and name not in found:
                        found.append(name)
    except Exception:  # a stream that does not parse to its end: damaged, not code
        return []
    return found


def _allowed_global(name: str) -> bool:
    """Whether `torch.load(weights_only=True)` loads the global `module.name` (its allowlist, where torch has one)."""
    try:
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # private in torch: fall back to what checkpoints hold
        allowed = {"collections.OrderedDict", "_codecs.encode"}
    allowed |= {f"{item.__module__}.{item.__qualname__}" for item in torch.serialization.get_safe_globals()
                if hasattr(item, "__qualname__")}  # fmt: skip
    return name in allowed or name.startswith("torch.")


def _inert_pickles(path: Path, is_zip: bool) -> list[Any]:
    """The pickled objects of `path` with every global made inert; raises whatever a malformed stream raises."""
    return [_InertUnpickler(stream).load() for stream in _pickle_streams(path, is_zip)]


class _Opaque:
    """Stands in for any object of an unpickled file in `_describe_unsafe_pickle`; it runs nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:  # a callable built by the file (`getattr(...)(...)`)
        return self

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


def _describe_unsafe_pickle(path: Path, culprit: str, code: list[str], is_zip: bool) -> str:
    """Say which object made `weights_only=True` refuse `path`, and where it sits (e.g. `config['norm_layer']`)."""
    names = {culprit, f"builtins.{culprit}"}  # torch names builtins without their module (`exec`)
    try:
        roots = _inert_pickles(path, is_zip)
        places = [(where, value.qualname) for root in roots for where, value in _walk(root, "")]
    except Exception:  # nested too deeply to walk, or a structure the inert objects cannot take: say what, not where
        places = []
    places = [place for place in places if place[1] in names] or places
    culprit = places[0][1] if places and places[0][1] in names else culprit
    where = f" at {', '.join(place for place, _ in places[:5])}" if places else ""
    others = [name for name in code if name not in names]
    also = f" (it also refers to {', '.join(f'`{name}`' for name in others[:4])})" if others else ""
    return (
        f"Refusing {path}: it holds an object of type `{culprit}`{where}{also}, and unpickling that could run "
        f"arbitrary code, so it was not loaded (only `torch.load(weights_only=True)` is used). Re-save the checkpoint "
        f"with tensors and plain values only (numbers, strings, lists, dicts), e.g. replace `{culprit}` in the config "
        f"by the setting it stands for."
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
    check_file(path, what)
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
        loaded = load_torch_file(file)
        if not isinstance(loaded, dict):
            raise ConversionError(f"{file} does not hold a state dict (found {type(loaded).__name__}).")
        return loaded
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if check_file(file, "weight file") == 0:
        raise ConversionError(f"{file} is empty (0 bytes); the download or copy did not complete. Fetch it again.")
    try:
        return load_file(file)
    except SafetensorError as error:
        raise ConversionError(
            f"{file} is damaged or not a safetensors file ({error}); it may be truncated. Download or copy it again."
        ) from None
    except OSError as error:
        raise ConversionError(f"Cannot read {file}: {error.strerror or error}.") from None


def load_hub_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
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


def read_labels(path: str | os.PathLike, num_labels: int) -> dict[int, str]:
    """`id2label` from a CSV with columns `index,mid,display_name` (AudioSet's format) covering every output."""
    check_file(Path(path), "labels CSV")
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
