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
import csv
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dasheng_hf.configuration_dasheng import DASHENG_PRESETS, DashengConfig
from dasheng_hf.feature_extraction_dasheng import htk_mel_filter_bank
from dasheng_hf.modeling_dasheng import DashengForAudioClassification, DashengModel

__all__ = [
    "RELEASED_CHECKPOINTS",
    "ConversionError",
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
    """A checkpoint, option or output folder that cannot be converted; the message says what to do."""


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
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise ConversionError(f"Could not download {url}: {error}. Check the URL and your connection.") from error
    return target


def _torch_load(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (memory-mapped where the format allows); unsafe pickles are refused."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise ConversionError(_describe_unsafe_pickle(path, str(error))) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {error}") from error


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


def _describe_unsafe_pickle(path: Path, torch_message: str) -> str:
    """Say which object made `weights_only=True` refuse `path`, and where it sits (e.g. `config['norm_layer']`)."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    culprit = found.group(1) if found else None
    places: list[str] = []
    if culprit and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if pickles:
                try:
                    root = _InertUnpickler(archive.open(pickles[0])).load()
                except Exception:  # a malformed pickle: fall back to torch's description
                    root = None
                # torch names builtins without their module (`exec` for `builtins.exec`).
                names = {culprit, f"builtins.{culprit}"}
                places = [where for where, value in _walk(root, "") if value.qualname in names]
                culprit = next((value.qualname for _, value in _walk(root, "") if value.qualname in names), culprit)
    what = f"an object of type `{culprit}`" if culprit else "objects other than tensors and plain containers"
    where = f" at {', '.join(places[:5])}" if places else ""
    return (
        f"Refusing {path}: it holds {what}{where}, and unpickling that could run arbitrary code, so it was not "
        f"loaded (only `torch.load(weights_only=True)` is used). Re-save the checkpoint with tensors and plain "
        f"values only (numbers, strings, lists, dicts), e.g. replace `{culprit or 'the object'}` in the config by "
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


def _load_hub_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and config dict of a folder in the Hub layout (safetensors or .bin, sharded or not)."""
    config_file = folder / "config.json"
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).exists()]
    if not config_file.exists() or not weights:
        raise ConversionError(
            f"{folder} is not a Hub-layout folder: it needs config.json and one of {', '.join(_WEIGHT_FILES)}."
        )
    with open(config_file) as handle:
        config = json.load(handle)
    files = [weights[0]]
    if weights[0].name.endswith(".index.json"):
        with open(weights[0]) as handle:
            files = [folder / name for name in sorted(set(json.load(handle)["weight_map"].values()))]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(file))
        else:
            loaded = _torch_load(file)
            if not isinstance(loaded, dict):
                raise ConversionError(f"{file} does not hold a state dict (found {type(loaded).__name__}).")
            state.update(loaded)
    return state, config


# ----------------------------------------------------------------------------------------------------------------
# Splitting, deriving the config and checking the tensors
# ----------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint file or Hub folder, derive the config and check every tensor; raises `ConversionError`."""
    hub_config: dict[str, Any] | None = None
    original_config: dict[str, Any] = {}
    if path.is_dir():
        state, hub_config = _load_hub_folder(path)
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
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        odd = sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor))
        raise ConversionError(f"{path}: these entries of the state dict are not tensors: {odd[:10]}.")
    encoder, front_end, head, notes = _split_state_dict(state)
    if hub_config is not None:
        config = _config_from_hub(hub_config, head)
    else:
        config = _config_from_original(encoder, head, original_config, notes)
    if front_end:
        _check_front_end(front_end, config)
        notes.append("front end: the checkpoint's mel filters and window match the settings being written")
    _check_tensors(encoder, head, config)
    notes.append(f"all {len(encoder)} encoder tensors matched the model's names and shapes")
    return LoadedCheckpoint(config=config, encoder=encoder, head=head, front_end=front_end, notes=notes)


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


def _config_from_original(
    encoder: dict[str, torch.Tensor], head: dict[str, torch.Tensor], kwargs: dict[str, Any], notes: list[str]
) -> DashengConfig:
    """The config of an original checkpoint: architecture from shapes and known sizes, maths from its kwargs."""
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
    patch_stride = list(kwargs.get("patch_stride", (patch_height, patch_width)))
    target_length = int(kwargs.get("target_length", 1008))
    positions = _shape(encoder, "time_pos_embed")[-1]
    if positions * patch_stride[1] != target_length:
        raise ConversionError(
            f"time_pos_embed has {positions} positions but target_length={target_length} needs "
            f"{target_length // patch_stride[1]} (target_length / time stride {patch_stride[1]}). Set target_length "
            f"in the checkpoint's config to {positions * patch_stride[1]}."
        )
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
        "patch_stride": patch_stride,
        "target_length": target_length,
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
    return _make_config(fields, head, name=preset)


def _config_from_hub(hub_config: dict[str, Any], head: dict[str, torch.Tensor]) -> DashengConfig:
    """The config of a Hub-layout folder, rewritten with the current fields and `auto_map`."""
    stale = {"auto_map", "custom_pipelines", "architectures", "transformers_version", "dtype", "torch_dtype"}
    fields = {key: value for key, value in hub_config.items() if key not in stale}
    fields.pop("model_type", None)
    fields.pop("outputdim", None)  # a head becomes DashengForAudioClassification's num_labels
    try:
        return _make_config(fields, head)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"The folder's config.json cannot be read as a DashengConfig: {error}") from error


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
        elif not torch.allclose(found.float(), reference, rtol=0.0, atol=1e-6):
            difference = float((found.float() - reference).abs().max())
            problems.append(f"front_end.{key} differs from the expected one by up to {difference:.3g}")
    if problems:
        raise ConversionError(
            f"The checkpoint's front end does not match the settings being written ({settings}): "
            + "; ".join(problems)
            + ". Fix the front-end settings in the checkpoint's config so they describe how it was trained."
        )


def _expected_shapes(config: DashengConfig, classifier: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (`encoder.*` and `outputlayer.*`) of the model for `config`, built on the meta device."""
    with torch.device("meta"):
        model = DashengForAudioClassification(config) if classifier else DashengModel(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check_tensors(encoder: dict[str, torch.Tensor], head: dict[str, torch.Tensor], config: DashengConfig) -> None:
    """Refuse missing, unexpected and misshapen tensors, listing each with the shapes found and expected."""
    expected = _expected_shapes(config, classifier=bool(head))
    found = {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"outputlayer.{k}": v for k, v in head.items()}}
    problems = [f"missing {key} (expected {expected[key]})" for key in sorted(set(expected) - set(found))]
    problems += [f"unexpected {key} {tuple(found[key].shape)}" for key in sorted(set(found) - set(expected))]
    problems += [
        f"misshapen {key}: found {tuple(found[key].shape)}, expected {expected[key]}"
        for key in sorted(set(found) & set(expected))
        if tuple(found[key].shape) != expected[key]
    ]
    if problems:
        raise ConversionError(
            f"The checkpoint's tensors do not fit a Dasheng model with hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, num_attention_heads={config.num_attention_heads}, "
            f"intermediate_size={config.intermediate_size}, target_length={config.target_length} "
            f"({len(problems)} problems; names as in the converted model):\n  " + "\n  ".join(problems)
        )


# ----------------------------------------------------------------------------------------------------------------
# Writing, verifying, pushing
# ----------------------------------------------------------------------------------------------------------------


def read_labels(path: str | os.PathLike, num_labels: int) -> dict[int, str]:
    """`id2label` from a CSV with columns `index,mid,display_name` (AudioSet's format) covering every output."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise ConversionError(f"Cannot read the labels CSV {path}: {error}") from error
    if not rows or not {"index", "display_name"} <= set(rows[0]):
        raise ConversionError(f"{path} needs a header `index,mid,display_name` and one row per class.")
    try:
        id2label = {int(row["index"]): row["display_name"] for row in rows}
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path}: every `index` must be an integer ({error}).") from error
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

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()

    state = {f"encoder.{key}": cast(value) for key, value in checkpoint.encoder.items()}
    state.update({f"outputlayer.{key}": cast(value) for key, value in checkpoint.head.items()})
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


def _replace_folder(source: Path, target: Path) -> None:
    """Move the finished `source` folder to `target`, swapping out an existing `target` only at the very end."""
    if not target.exists():
        os.rename(source, target)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, holder / target.name)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(holder / target.name, target)
        holder.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)


def convert(
    checkpoint: str,
    output: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    verify: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
    push_to_hub: str | None = None,
) -> Path:
    """Convert `checkpoint` into the Hub folder `output` (see the module docstring); returns the folder."""
    output = Path(output).expanduser().absolute()
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"The output {output} is a file; pass a folder path.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"The output folder {output} is not empty; pass --overwrite to replace it.")
    loaded = load_checkpoint(resolve_source(checkpoint))
    for note in loaded.notes:
        print(note)
    if labels is not None:
        if not loaded.is_classifier:
            raise ConversionError("--labels only applies to classifiers, and this checkpoint has no outputlayer head.")
        id2label = read_labels(labels, loaded.config.num_labels)
        loaded.config.id2label = id2label
        loaded.config.label2id = {name: index for index, name in id2label.items()}

    missing_parents = [parent for parent in reversed(output.parents) if not parent.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model = _build_model(loaded, DTYPES[dtype])
        model.save_pretrained(staging)
        del model
        repo_id = push_to_hub or f"mispeech/{output.name}"
        (staging / "README.md").write_text(_model_card(loaded.config, loaded.is_classifier, repo_id))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp and some writers make owner-only entries
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)
        if verify:
            _verify(staging, loaded, DTYPES[dtype])
        _replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(missing_parents):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    print(f"Wrote {output}: {', '.join(sorted(path.name for path in output.iterdir()))}")
    if push_to_hub:
        _push_to_hub(output, push_to_hub)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    """Command line entry point; returns the exit status (0 on success, 1 on a conversion error)."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
