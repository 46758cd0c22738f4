"""
What a checkpoint holds: its state dict split into encoder, front end and classifier head, the `DashengConfig` derived
from the tensors' shapes and the original config (or a Hub folder's config.json), and every setting and tensor checked
against the model that will be written, so that bad input is refused before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configuration_dasheng import DASHENG_PRESETS, DashengConfig, front_end_mismatches
from ..feature_extraction_dasheng import DashengFeatureExtractor, htk_mel_filter_bank
from ..modeling_dasheng import DashengForAudioClassification, DashengModel
from .checkpoint_files import ConversionError, load_hub_folder, load_torch_file

__all__ = [
    "SAMPLING_RATE",
    "LoadedCheckpoint",
    "expected_front_end",
    "expected_shapes",
    "load_checkpoint",
    "sweep_audio",
]

# Heads of the released widths: the original's size helpers set them whatever the stored config says.
KNOWN_NUM_HEADS = {hidden: heads for hidden, _, heads in DASHENG_PRESETS.values()}
SAMPLING_RATE = 16000  # of `sweep_audio`, the audio that front ends are tried on and conversions verified with

# Keys of the original constructor that the conversion reads or checks; the original ignores all others
# (`time_patch_out`, `eval_avg`, optimiser settings, ...) at inference, and so does the conversion.
_USED_KEYS = {
    "embed_dim", "depth", "num_heads", "patch_size", "patch_stride", "target_length", "n_fft", "hop_size", "win_size",
    "f_min", "f_max", "center", "top_db", "drop_rate", "attn_drop_rate", "pooling", "init_values", "norm_layer",
    "act_layer", "block_type", "attention_type",
}  # fmt: skip
_HEAD_KEY = re.compile(r"^(?:.*\.)?outputlayer\.(?P<name>[01]\.(?:weight|bias))$")
_ENCODER_ANCHOR = "patch_embed.proj.weight"


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


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint file or Hub folder, derive the config and check every tensor; raises `ConversionError`."""
    hub_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    original_config: dict[str, Any] = {}
    if path.is_dir():
        state, hub_config, preprocessor = load_hub_folder(path)
    else:
        loaded = load_torch_file(path)
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


def _check_front_end_settings(config: DashengConfig, preprocessor: dict[str, Any] | None) -> None:
    """Build the feature extractor the folder will carry and compute features of 1 s of audio with it, and refuse a
    source preprocessor config whose front end differs from the model config's."""
    settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in (
        "sampling_rate", "n_fft", "win_length", "hop_length", "f_min", "f_max", "center", "top_db", "num_mel_bins",
    ))  # fmt: skip
    try:
        extractor = DashengFeatureExtractor.from_dasheng_config(config)
        audio = sweep_audio(1).numpy()
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
    differences = front_end_mismatches(config, theirs)
    if differences:
        raise ConversionError(
            f"The folder's preprocessor_config.json disagrees with its config.json about the front end the weights "
            f"were trained with: {'; '.join(differences)}. Correct whichever file is wrong."
        )


def _check_front_end(front_end: dict[str, torch.Tensor], config: DashengConfig) -> None:
    """Refuse when the checkpoint's own mel filters or window disagree with the settings being written."""
    expected = expected_front_end(config)
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


def expected_front_end(config: DashengConfig) -> dict[str, torch.Tensor]:
    """The original's front-end buffers for `config`: mel filters (n_fft // 2 + 1, num_mel_bins) and Hann window."""
    return {
        "0.mel_scale.fb": htk_mel_filter_bank(
            config.n_fft // 2 + 1, config.num_mel_bins, config.f_min, config.f_max, config.sampling_rate
        ),
        "0.spectrogram.window": torch.hann_window(config.win_length, periodic=True),
    }


def _rounding(dtype: torch.dtype) -> float:
    """Largest rounding error of values in [0, 1] stored in `dtype` (float16 and bfloat16 checkpoints)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def expected_shapes(config: DashengConfig, classifier: bool) -> dict[str, tuple[int, ...]]:
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
    expected = expected_shapes(config, classifier=bool(head))
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


def sweep_audio(seconds: int) -> torch.Tensor:
    """Fixed 16 kHz audio: a 100 Hz to 4 kHz sweep plus seeded noise."""
    time = torch.arange(seconds * SAMPLING_RATE, dtype=torch.float64) / SAMPLING_RATE
    phase = 2 * torch.pi * (100 * time + (3900 / (2 * seconds)) * time**2)
    noise = torch.randn(time.shape, generator=torch.Generator().manual_seed(seconds), dtype=torch.float64)
    return (0.3 * torch.sin(phase) + 0.05 * noise).float()
