"""Configuration of Dasheng audio encoders (base, 0.6B, 1.2B)."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

__all__ = [
    "DASHENG_DECODER_PRESETS",
    "DASHENG_PRESETS",
    "DashengConfig",
    "canonical_preset_name",
    "copy_code_files",
    "front_end_mismatches",
    "json_object",
]

logger = logging.get_logger(__name__)

# (hidden_size, num_hidden_layers, num_attention_heads) of the released encoders.
DASHENG_PRESETS: dict[str, tuple[int, int, int]] = {
    "dasheng-base": (768, 12, 12),
    "dasheng-0.6B": (1280, 32, 16),
    "dasheng-1.2B": (1536, 40, 24),
}
# (decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads) of their pretraining decoders.
DASHENG_DECODER_PRESETS: dict[str, tuple[int, int, int]] = {
    "dasheng-base": (512, 8, 16),
    "dasheng-0.6B": (512, 8, 16),
    "dasheng-1.2B": (768, 8, 24),
}

# Keys of the original encoder's constructor (as stored in `encoder_kwargs` of the first Hub configs) and the
# field of this config that each one sets.
_ENCODER_KWARGS_TO_FIELDS = {
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "patch_size": "patch_size",
    "patch_stride": "patch_stride",
    "target_length": "target_length",
    "qkv_bias": "qkv_bias",
    "n_mels": "num_mel_bins",
    "n_fft": "n_fft",
    "hop_size": "hop_length",
    "win_size": "win_length",
    "f_min": "f_min",
    "f_max": "f_max",
    "center": "center",
    "top_db": "top_db",
    "drop_rate": "hidden_dropout_prob",
    "attn_drop_rate": "attention_probs_dropout_prob",
    "mlp_ratio": "intermediate_size",
}
# Keys of the original constructor that change nothing at inference (training-time options).
_IGNORED_ENCODER_KWARGS = {"time_patch_out", "freq_patch_out", "eval_avg", "group_masking", "block_type"}
# The keys that saved configs mirror, read by code written for the first Hub port (e.g. `encoder_kwargs["embed_dim"]`).
_MIRRORED_ENCODER_KWARGS = ("embed_dim", "depth", "num_heads", "patch_size", "patch_stride", "target_length")
# Defaults of the fields that `encoder_kwargs` may set; their arguments default to `_DEFAULT` so that a field given
# explicitly can be told apart from one left at its default.
_FIELD_DEFAULTS: dict[str, Any] = {
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "num_mel_bins": 64,
    "patch_size": (64, 4),
    "patch_stride": (64, 4),
    "target_length": 1008,
    "n_fft": 512,
    "win_length": 512,
    "hop_length": 160,
    "f_min": 0.0,
    "f_max": 8000.0,
    "center": True,
    "top_db": 120.0,
}


class _Default:
    """The default of an argument that was not given (see `_FIELD_DEFAULTS`)."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()


def canonical_preset_name(name: str | None) -> str | None:
    """Map spellings such as `mispeech/dasheng-base`, `dasheng_06B` or `dasheng-1.2b` to a preset key."""
    if not name:
        return None
    key = re.sub(r"[^a-z0-9]", "", name.split("/")[-1].lower())
    aliases = {"dashengbase": "dasheng-base", "dasheng06b": "dasheng-0.6B", "dasheng12b": "dasheng-1.2B"}
    return aliases.get(key)


def _integer(what: str, value: Any, minimum: int = 1, fix: str = "") -> int:
    """`value` as an int >= `minimum` (integral floats such as 768.0 are accepted), or a ValueError naming `what`."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {allowed}, got {value!r} ({type(value).__name__}). {fix}".rstrip())
    return int(value)


def _number(
    what: str, value: Any, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, fix=""
) -> float:
    """`value` as a finite float in the interval, or a ValueError naming `what` and the interval."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if is_real and math.isfinite(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return float(value)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
    raise ValueError(f"{what} must be a finite number in {interval}, got {value!r}. {fix}".rstrip())


def _flag(what: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be true or false, got {value!r} ({type(value).__name__}).")
    return bool(value)


def _pair(what: str, value: Any, fix: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{what} must be a pair [mel bins, frames] of positive integers, got {value!r}. {fix}")
    return [_integer(f"{what}[{index}]", item, fix=fix) for index, item in enumerate(value)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # values that cannot be compared (e.g. arrays) count as different
        return False


class DashengConfig(PretrainedConfig):
    r"""
    Configuration of a Dasheng encoder ([`DashengModel`]) and its classifier ([`DashengForAudioClassification`]),
    and of the masked-autoencoder decoder used in pretraining ([`DashengForPreTraining`]).

    The defaults give `dasheng-base`. `DashengConfig.from_preset("dasheng-0.6B")` (or `name="dasheng-0.6B"`) gives
    the other released sizes; arguments given explicitly override the preset. Every value is checked here: a bad one
    raises a `ValueError` naming the field, the value, what is allowed and how to fix it.

    `encoder_kwargs`, the constructor arguments of the original encoder, is how the first Hub port stored the
    architecture (`{"encoder_kwargs": {"embed_dim": ...}, "name": "dasheng-base", ...}`); such configs are read as
    they are: `encoder_kwargs` set every field that the config does not give itself, and `name` fills in what they
    lack. Configs written by this class carry the fields and, for code written against the first port, a read-only
    mirror `encoder_kwargs` (`embed_dim`, `depth`, `num_heads`, `patch_size`, `patch_stride`, `target_length`),
    recomputed from the fields on every save. When a field and an `encoder_kwargs` entry disagree, the field wins
    and a warning names both; `from_pretrained(folder, hidden_size=...)` overrides both.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): Width of the tokens (preset of `name`).
        num_hidden_layers (`int`, *optional*, defaults to 12): Number of transformer blocks (preset of `name`).
        num_attention_heads (`int`, *optional*, defaults to 12): Attention heads per block (preset of `name`); must
            divide `hidden_size`.
        intermediate_size (`int`, *optional*): Hidden width of the MLP; defaults to `4 * hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact GELU).
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias in the query/key/value projection.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): Epsilon of the blocks' and final LayerNorms (> 0).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout after embeddings, attention projection
            and MLP (for fine-tuning), in [0, 1].
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout on attention weights, in [0, 1].
        drop_path_rate (`float`, *optional*, defaults to 0.0): Stochastic depth, rising linearly to this rate over
            the blocks (for fine-tuning), in [0, 1].
        num_mel_bins (`int`, *optional*, defaults to 64): Mel bands of the input spectrogram.
        patch_size (`tuple[int, int]`, *optional*, defaults to `(64, 4)`): (mel bins, frames) of one patch; the
            first equals `num_mel_bins`.
        patch_stride (`tuple[int, int]`, *optional*, defaults to `(64, 4)`): Stride of the patch embedding; the
            first equals `num_mel_bins`.
        target_length (`int`, *optional*, defaults to 1008): Frames per chunk (1008 frames = 10.08 s = 252 tokens),
            a multiple of `patch_stride[1]`. Longer inputs are split into chunks that the blocks process independently.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5): Epsilon of the spectrogram BatchNorm (> 0).
        batch_norm_momentum (`float`, *optional*, defaults to 0.01): Momentum of the spectrogram BatchNorm, in
            [0, 1] (or None for a cumulative average).
        use_batch_statistics (`bool`, *optional*, defaults to `False`): Let the spectrogram BatchNorm use and update
            batch statistics in training mode. Off by default: batch statistics mix clips and padding.
        max_chunks_per_pass (`int`, *optional*, defaults to 32): At inference (no gradient), at most this many
            chunks go through the blocks at once, which bounds memory for hours-long audio.
        sampling_rate, n_fft, win_length, hop_length, f_min, f_max, center, top_db: The front end the weights were
            trained with (16000 Hz, 512, 512, 160, 0 Hz, 8000 Hz, `True`, 120 dB; see [`DashengFeatureExtractor`]);
            kept here so a checkpoint documents its own features. Sizes are positive integers with
            `win_length <= n_fft`, `0 <= f_min < f_max <= sampling_rate / 2`, and `top_db` is positive or None.
        outputdim (`int`, *optional*): If set, [`DashengModel`] gets the original LayerNorm + Linear head
            (`outputlayer`) with this many outputs, and its `logits` are the head's output (before any sigmoid).
        head_layer_norm_eps (`float`, *optional*, defaults to 1e-5): Epsilon of the head's LayerNorm (> 0).
        loss (`str`, *optional*, defaults to `"BCELoss"`): Loss of [`DashengModel`] with a head when `labels` are
            given: `"BCELoss"` (multi-label, on sigmoid of the logits) or `"CrossEntropyLoss"` (single label).
        initializer_range (`float`, *optional*, defaults to 0.02): Standard deviation of the initial weights (>= 0).
        decoder_hidden_size (`int`, *optional*, defaults to 512): Width of the pretraining decoder's tokens (512 for
            dasheng-base and dasheng-0.6B, 768 for dasheng-1.2B).
        decoder_num_hidden_layers (`int`, *optional*, defaults to 8): Transformer blocks of the decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 16): Attention heads per decoder block (24 for
            dasheng-1.2B); must divide `decoder_hidden_size`.
        decoder_intermediate_size (`int`, *optional*): Hidden width of the decoder's MLP; defaults to
            `4 * decoder_hidden_size`.
        mask_ratio (`float`, *optional*, defaults to 0.75): Fraction of tokens masked in pretraining, in (0, 1).
        mask_group_size (`int`, *optional*, defaults to 2): Tokens masked together as one group (consecutive in
            time), at most the tokens of a chunk.
        norm_pix_loss (`bool`, *optional*, defaults to `True`): Reconstruct each patch normalised to zero mean and
            unit variance (the original's training target).
        name (`str`, *optional*): Preset name (`dasheng-base`, `dasheng-0.6B`, `dasheng-1.2B`).
        encoder_kwargs (`dict`, *optional*): Constructor arguments of the original encoder (first Hub configs). Read
            back as a read-only mirror of the fields (`config.encoder_kwargs["embed_dim"]`).
    """

    model_type = "dasheng"
    # Trainer's predictions and metrics see only `logits` (and the loss), not the per-token tensors.
    keys_to_ignore_at_inference = ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]

    def __init__(
        self,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        qkv_bias: bool = _DEFAULT,
        layer_norm_eps: float = 1e-6,
        hidden_dropout_prob: float = _DEFAULT,
        attention_probs_dropout_prob: float = _DEFAULT,
        drop_path_rate: float = 0.0,
        num_mel_bins: int = _DEFAULT,
        patch_size: tuple[int, int] | list[int] = _DEFAULT,
        patch_stride: tuple[int, int] | list[int] = _DEFAULT,
        target_length: int = _DEFAULT,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float | None = 0.01,
        use_batch_statistics: bool = False,
        max_chunks_per_pass: int = 32,
        sampling_rate: int = 16000,
        n_fft: int = _DEFAULT,
        win_length: int = _DEFAULT,
        hop_length: int = _DEFAULT,
        f_min: float = _DEFAULT,
        f_max: float = _DEFAULT,
        center: bool = _DEFAULT,
        top_db: float | None = _DEFAULT,
        outputdim: int | None = None,
        head_layer_norm_eps: float = 1e-5,
        loss: str = "BCELoss",
        initializer_range: float = 0.02,
        decoder_hidden_size: int | None = None,
        decoder_num_hidden_layers: int | None = None,
        decoder_num_attention_heads: int | None = None,
        decoder_intermediate_size: int | None = None,
        mask_ratio: float = 0.75,
        mask_group_size: int = 2,
        norm_pix_loss: bool = True,
        name: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a preset name such as 'dasheng-base' or None, got {name!r}.")
        preset = canonical_preset_name(name)
        if name and preset is None and encoder_kwargs is None and hidden_size is None:
            logger.warning(f"Unknown Dasheng name {name!r}; using the dasheng-base architecture.")
        # Precedence: explicit arguments > encoder_kwargs (first Hub configs) > preset of `name` > dasheng-base.
        arguments = {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "intermediate_size": intermediate_size,
            "qkv_bias": qkv_bias,
            "hidden_dropout_prob": hidden_dropout_prob,
            "attention_probs_dropout_prob": attention_probs_dropout_prob,
            "num_mel_bins": num_mel_bins,
            "patch_size": patch_size,
            "patch_stride": patch_stride,
            "target_length": target_length,
            "n_fft": n_fft,
            "win_length": win_length,
            "hop_length": hop_length,
            "f_min": f_min,
            "f_max": f_max,
            "center": center,
            "top_db": top_db,
        }
        fields = {key: value for key, value in arguments.items() if value is not _DEFAULT}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if fields[key] is None:
                del fields[key]
        # Where each value came from, for error messages.
        what = {key: key for key in arguments}
        original = {key: kwargs.pop(key) for key in list(kwargs) if key in _ENCODER_KWARGS_TO_FIELDS}
        if original:  # the original encoder's own names given directly: DashengConfig(embed_dim=64, depth=2)
            self._merge_encoder_kwargs(original, fields, what, source="")
        if encoder_kwargs is not None:
            self._merge_encoder_kwargs(encoder_kwargs, fields, what)
        for field, value in zip(
            ("hidden_size", "num_hidden_layers", "num_attention_heads"), DASHENG_PRESETS[preset or "dasheng-base"]
        ):
            fields.setdefault(field, value)
        for field, value in _FIELD_DEFAULTS.items():
            fields.setdefault(field, value)

        self.hidden_size = _integer(what["hidden_size"], fields["hidden_size"], fix=_SIZES_FIX)
        self.num_hidden_layers = _integer(what["num_hidden_layers"], fields["num_hidden_layers"], fix=_SIZES_FIX)
        self.num_attention_heads = _integer(what["num_attention_heads"], fields["num_attention_heads"], fix=_SIZES_FIX)
        mlp_ratio = fields.get("intermediate_size")
        if what["intermediate_size"] != "intermediate_size":  # from encoder_kwargs["mlp_ratio"]
            mlp_ratio = _number(what["intermediate_size"], mlp_ratio, 0.0, low_open=True, fix="The original uses 4.")
            fields["intermediate_size"] = int(self.hidden_size * mlp_ratio)
        size, fix = fields.get("intermediate_size", 4 * self.hidden_size), "Leave it out (None) for 4 * hidden_size."
        self.intermediate_size = _integer(what["intermediate_size"], size, fix=fix)
        if not isinstance(hidden_act, str) or hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act must name an activation of transformers' ACT2FN (Dasheng uses 'gelu'), got {hidden_act!r}."
            )
        self.hidden_act = hidden_act
        self.qkv_bias = _flag(what["qkv_bias"], fields["qkv_bias"])
        self.layer_norm_eps = _number("layer_norm_eps", layer_norm_eps, 0.0, low_open=True, fix=_EPS_FIX)
        self.hidden_dropout_prob = _number(what["hidden_dropout_prob"], fields["hidden_dropout_prob"], 0.0, 1.0)
        self.attention_probs_dropout_prob = _number(
            what["attention_probs_dropout_prob"], fields["attention_probs_dropout_prob"], 0.0, 1.0
        )
        self.drop_path_rate = _number("drop_path_rate", drop_path_rate, 0.0, 1.0)
        self.num_mel_bins = _integer(what["num_mel_bins"], fields["num_mel_bins"], fix="The released models use 64.")
        self.patch_size = _pair(what["patch_size"], fields["patch_size"], fix="The released models use [64, 4].")
        self.patch_stride = _pair(what["patch_stride"], fields["patch_stride"], fix="The released models use [64, 4].")
        self.target_length = _integer(
            what["target_length"], fields["target_length"], fix="The released models use 1008 frames (10.08 s)."
        )
        self.batch_norm_eps = _number("batch_norm_eps", batch_norm_eps, 0.0, low_open=True, fix=_EPS_FIX)
        if batch_norm_momentum is not None:
            batch_norm_momentum = _number("batch_norm_momentum", batch_norm_momentum, 0.0, 1.0)
        self.batch_norm_momentum = batch_norm_momentum
        self.use_batch_statistics = _flag("use_batch_statistics", use_batch_statistics)
        self.max_chunks_per_pass = _integer(
            "max_chunks_per_pass", max_chunks_per_pass, fix="E.g. 32; lower it to use less memory on long audio."
        )
        self.sampling_rate = _integer("sampling_rate", sampling_rate, fix="Dasheng was trained at 16000 Hz.")
        self.n_fft = _integer(what["n_fft"], fields["n_fft"], fix="Dasheng was trained with 512.")
        self.win_length = _integer(what["win_length"], fields["win_length"], fix="Dasheng was trained with 512.")
        self.hop_length = _integer(what["hop_length"], fields["hop_length"], fix="Dasheng was trained with 160.")
        self.f_min = _number(what["f_min"], fields["f_min"], 0.0, fix="Dasheng was trained with 0 Hz.")
        self.f_max = _number(what["f_max"], fields["f_max"], 0.0, low_open=True, fix="Dasheng uses 8000 Hz.")
        self.center = _flag(what["center"], fields["center"])
        top_db = fields["top_db"]
        if top_db is not None:
            top_db = _number(what["top_db"], top_db, 0.0, low_open=True, fix="Dasheng uses 120; None keeps all.")
        self.top_db = top_db
        if outputdim is not None:
            outputdim = _integer("outputdim", outputdim, fix="Use None for no head, or the number of classes.")
        self.outputdim = outputdim
        self.head_layer_norm_eps = _number("head_layer_norm_eps", head_layer_norm_eps, 0.0, low_open=True)
        if loss not in ("BCELoss", "CrossEntropyLoss"):
            raise ValueError(
                f"loss must be 'BCELoss' (multi-label) or 'CrossEntropyLoss' (single label), got {loss!r}."
            )
        self.loss = loss
        self.initializer_range = _number("initializer_range", initializer_range, 0.0, fix="Transformers uses 0.02.")
        decoder = dict(
            zip(
                ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads"),
                DASHENG_DECODER_PRESETS[preset or "dasheng-base"],
            )
        )
        for key, value in (
            ("decoder_hidden_size", decoder_hidden_size),
            ("decoder_num_hidden_layers", decoder_num_hidden_layers),
            ("decoder_num_attention_heads", decoder_num_attention_heads),
        ):
            setattr(self, key, _integer(key, decoder[key] if value is None else value, fix=_DECODER_FIX))
        if decoder_intermediate_size is None:
            decoder_intermediate_size = 4 * self.decoder_hidden_size
        self.decoder_intermediate_size = _integer(
            "decoder_intermediate_size", decoder_intermediate_size, fix="Leave it out for 4 * decoder_hidden_size."
        )
        self.mask_ratio = _number(
            "mask_ratio", mask_ratio, 0.0, 1.0, low_open=True, high_open=True, fix="Dasheng was trained with 0.75."
        )
        self.mask_group_size = _integer("mask_group_size", mask_group_size, fix="Dasheng was trained with 2.")
        self.norm_pix_loss = _flag("norm_pix_loss", norm_pix_loss)
        self.name = name if preset is None else preset
        self._check_consistency(what)
        kwargs.setdefault("custom_pipelines", _CUSTOM_PIPELINES)
        kwargs["auto_map"] = {**_auto_map(), **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)

    @staticmethod
    def _merge_encoder_kwargs(encoder_kwargs: Any, fields: dict, what: dict, source: str = "encoder_kwargs") -> None:
        """Fill `fields` not given explicitly from `encoder_kwargs` (the original's names: `source` "" when given as
        arguments); warn where a given field disagrees."""
        if not isinstance(encoder_kwargs, Mapping):
            raise ValueError(
                f"encoder_kwargs must be a mapping of the original encoder's arguments (e.g. {{'embed_dim': 768}}) "
                f"or None, got {encoder_kwargs!r}."
            )
        unsupported = {
            key: value
            for key, value in encoder_kwargs.items()
            if key not in _ENCODER_KWARGS_TO_FIELDS
            and key not in _IGNORED_ENCODER_KWARGS
            and not (key == "pooling" and value == "mean")
            and not (key in ("init_values", "norm_layer", "act_layer") and value is None)
            and not (key == "attention_type" and value == "Attention")
        }
        if unsupported:
            raise ValueError(
                f"encoder_kwargs {unsupported} are not supported by DashengConfig (supported: "
                f"{sorted(_ENCODER_KWARGS_TO_FIELDS)}, pooling='mean'). Remove them or set the matching fields."
            )
        disagreements = []
        for key, value in encoder_kwargs.items():
            field, name = _ENCODER_KWARGS_TO_FIELDS.get(key), f"{source}[{key!r}]" if source else key
            if field is None:
                continue
            if field not in fields:
                fields[field] = value
                what[field] = f"{field} (from {name})"
            elif field != "intermediate_size" and not _same(fields[field], value):
                disagreements.append(f"{field}={fields[field]!r} vs {name}={value!r}")
        if disagreements:
            logger.warning(
                f"The config's fields and {source or 'the original names given'} (the first Hub port's) disagree: "
                + "; ".join(disagreements)
                + ". Using the fields; encoder_kwargs is rewritten from them on save."
            )

    def _check_consistency(self, what: dict[str, str]) -> None:
        """Rules between fields (each field alone is checked where it is set)."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"{what['hidden_size']} ({self.hidden_size}) must be divisible by {what['num_attention_heads']} "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads channels. "
                f"Choose e.g. num_attention_heads={_divisor_near(self.hidden_size, self.num_attention_heads)}."
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by decoder_num_attention_heads "
                f"({self.decoder_num_attention_heads}). Choose e.g. decoder_num_attention_heads="
                f"{_divisor_near(self.decoder_hidden_size, self.decoder_num_attention_heads)}."
            )
        if self.patch_size[0] != self.num_mel_bins or self.patch_stride[0] != self.num_mel_bins:
            raise ValueError(
                f"Dasheng patches span all mel bins: patch_size[0] and patch_stride[0] must equal num_mel_bins "
                f"({self.num_mel_bins}); got patch_size={self.patch_size}, patch_stride={self.patch_stride}."
            )
        if self.target_length % self.patch_stride[1] != 0:
            raise ValueError(
                f"{what['target_length']} ({self.target_length}) must be a multiple of the time stride "
                f"patch_stride[1] ({self.patch_stride[1]}), e.g. {self.patch_stride[1] * 252}."
            )
        if self.target_length < self.patch_size[1]:
            raise ValueError(
                f"{what['target_length']} ({self.target_length}) must be at least one patch, "
                f"patch_size[1] = {self.patch_size[1]} frames."
            )
        if self.mask_group_size > self.chunk_num_tokens:
            raise ValueError(
                f"mask_group_size ({self.mask_group_size}) must not exceed the tokens of one chunk "
                f"({self.chunk_num_tokens}); Dasheng was trained with 2."
            )
        if self.win_length > self.n_fft:
            raise ValueError(
                f"{what['win_length']} ({self.win_length}) must not exceed {what['n_fft']} ({self.n_fft}): the "
                f"window is zero-padded to the FFT size. Dasheng uses 512 for both."
            )
        nyquist = self.sampling_rate / 2
        if not self.f_min < self.f_max <= nyquist:
            raise ValueError(
                f"The mel band edges must satisfy 0 <= f_min < f_max <= sampling_rate / 2 ({nyquist:g} Hz); got "
                f"{what['f_min']}={self.f_min:g}, {what['f_max']}={self.f_max:g}, sampling_rate={self.sampling_rate}."
                f" Dasheng uses f_min=0, f_max=8000 at 16000 Hz."
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DashengConfig:
        """Build a config from a `config.json` object. Arguments of `__init__` among `kwargs` (as in
        `from_pretrained(folder, hidden_size=...)`) go through `__init__` like the file's values, so they are
        checked and override what `encoder_kwargs` of an old config says about the same field."""
        config_dict = dict(json_object(config_dict, "config.json"))
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in _init_arguments(cls)}
        encoder_kwargs = config_dict.get("encoder_kwargs")
        if overrides and isinstance(encoder_kwargs, Mapping):
            config_dict["encoder_kwargs"] = {
                key: value
                for key, value in encoder_kwargs.items()
                if _ENCODER_KWARGS_TO_FIELDS.get(key) not in overrides
            }
        config_dict.update(overrides)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        return dict(json_object(super()._dict_from_json_file(json_file), json_file))

    @property
    def encoder_kwargs(self) -> Mapping[str, Any]:
        """Read-only view of the architecture in the original encoder's argument names, as the first Hub port."""
        return MappingProxyType(
            {
                "embed_dim": self.hidden_size,
                "depth": self.num_hidden_layers,
                "num_heads": self.num_attention_heads,
                "patch_size": list(self.patch_size),
                "patch_stride": list(self.patch_stride),
                "target_length": self.target_length,
            }
        )

    @encoder_kwargs.setter
    def encoder_kwargs(self, value: Any) -> None:
        raise AttributeError(
            "encoder_kwargs is a read-only mirror of hidden_size, num_hidden_layers, num_attention_heads, "
            "patch_size, patch_stride and target_length: set those fields instead."
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["encoder_kwargs"] = dict(self.encoder_kwargs)
        return output

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> DashengConfig:
        """Config of a released size: `dasheng-base`, `dasheng-0.6B` or `dasheng-1.2B`."""
        if not isinstance(name, str) or canonical_preset_name(name) is None:
            raise ValueError(f"Unknown Dasheng preset {name!r}; choose one of {sorted(DASHENG_PRESETS)}.")
        return cls(name=name, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Save `config.json` and the code files, so the folder loads with `trust_remote_code=True`."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        copy_code_files(save_directory)

    @property
    def chunk_num_tokens(self) -> int:
        """Tokens per chunk (252 for 1008 frames): the span that attention sees."""
        return self.target_length // self.patch_stride[1]


_SIZES_FIX = (
    "The released sizes are (hidden_size, num_hidden_layers, num_attention_heads) = "
    + ", ".join(f"{sizes} ({name})" for name, sizes in DASHENG_PRESETS.items())
    + "."
)
_DECODER_FIX = "The released decoders are 512 wide, 8 blocks, 16 heads (768 wide, 24 heads for dasheng-1.2B)."
_EPS_FIX = "It must be positive; Dasheng uses 1e-6 in the LayerNorms and 1e-5 in the BatchNorm."


def _divisor_near(total: int, wanted: int) -> int:
    """The divisor of `total` closest to `wanted` (ties: the smaller)."""
    return min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: (abs(d - wanted), d))


def _init_arguments(cls: type) -> frozenset[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")


# `pipeline("audio-classification", model=..., trust_remote_code=True)` uses this class, which batches
# (batch, mel bins, frames) features of different lengths correctly.
_CUSTOM_PIPELINES = {
    "audio-classification": {
        "impl": "modeling_dasheng.DashengAudioClassificationPipeline",
        "pt": ["AutoModelForAudioClassification"],
        "type": "audio",
    }
}

# Every Auto class resolves to this project's code in a saved folder, whichever class saved it.
_AUTO_MAP = {
    "AutoConfig": "configuration_dasheng.DashengConfig",
    "AutoModel": "modeling_dasheng.DashengModel",
    "AutoModelForAudioClassification": "modeling_dasheng.DashengForAudioClassification",
    "AutoModelForPreTraining": "modeling_dasheng_pretraining.DashengForPreTraining",
    "AutoFeatureExtractor": "feature_extraction_dasheng.DashengFeatureExtractor",
}
CODE_FILES = (
    "configuration_dasheng.py",
    "modeling_dasheng.py",
    "modeling_dasheng_layers.py",
    "feature_extraction_dasheng.py",
    "modeling_dasheng_pretraining.py",
)


def _auto_map() -> dict[str, str]:
    """`_AUTO_MAP` less the classes whose code file is not beside this one: a folder never names a missing file."""
    here = Path(__file__).resolve().parent
    return {auto: target for auto, target in _AUTO_MAP.items() if (here / f"{target.split('.')[0]}.py").exists()}


def json_object(value: Any, source: Any) -> Mapping[str, Any]:
    """`value`, read from the JSON file `source`, if it is an object; else a one-line `ValueError` naming the file."""
    if not isinstance(value, Mapping):
        kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        raise ValueError(f"{source} holds {kind}, not a JSON object {{...}} of settings; fix or re-save the folder.")
    return value


def front_end_mismatches(config: Any, feature_extractor: Any) -> list[str]:
    """
    Every front-end setting on which a [`DashengConfig`] (what the weights were trained with) and a
    [`DashengFeatureExtractor`] disagree, in words; an empty list when they match.
    """
    fields = [
        ("sampling rate", "sampling_rate", "sampling_rate"),
        ("FFT size", "n_fft", "n_fft"),
        ("window length", "win_length", "win_size"),
        ("hop length", "hop_length", "hop_size"),
        ("lowest mel frequency", "f_min", "f_min"),
        ("highest mel frequency", "f_max", "f_max"),
        ("centring (reflect padding)", "center", "center"),
        ("dB range below the peak", "top_db", "top_db"),
        ("number of mel bins", "num_mel_bins", "feature_size"),
    ]
    mismatches = []
    for words, config_field, extractor_field in fields:
        expected, found = getattr(config, config_field, None), getattr(feature_extractor, extractor_field, None)
        if not expected == found:
            mismatches.append(
                f"{words}: the model's config has {config_field}={expected!r}, the feature extractor "
                f"{extractor_field}={found!r}"
            )
    return mismatches


def copy_code_files(save_directory: str | os.PathLike) -> None:
    """Copy the Dasheng code files into `save_directory` (those beside this file that exist)."""
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        source, target = here / name, Path(save_directory) / name
        if source.exists() and source != target.resolve():
            shutil.copyfile(source, target)


DashengConfig.register_for_auto_class()
