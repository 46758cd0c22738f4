"""Configuration of Dasheng audio encoders (base, 0.6B, 1.2B)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig
from transformers.utils import logging

__all__ = ["DASHENG_PRESETS", "DashengConfig", "copy_code_files"]

logger = logging.get_logger(__name__)

# (hidden_size, num_hidden_layers, num_attention_heads) of the released encoders.
DASHENG_PRESETS: dict[str, tuple[int, int, int]] = {
    "dasheng-base": (768, 12, 12),
    "dasheng-0.6B": (1280, 32, 16),
    "dasheng-1.2B": (1536, 40, 24),
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
}
# Keys of the original constructor that change nothing at inference (training-time options).
_IGNORED_ENCODER_KWARGS = {"time_patch_out", "freq_patch_out", "eval_avg", "group_masking", "block_type"}


def _canonical_preset_name(name: str | None) -> str | None:
    """Map spellings such as `mispeech/dasheng-base`, `dasheng_06B` or `dasheng-1.2b` to a preset key."""
    if not name:
        return None
    key = re.sub(r"[^a-z0-9]", "", name.split("/")[-1].lower())
    aliases = {"dashengbase": "dasheng-base", "dasheng06b": "dasheng-0.6B", "dasheng12b": "dasheng-1.2B"}
    return aliases.get(key)


class DashengConfig(PretrainedConfig):
    r"""
    Configuration of a Dasheng encoder ([`DashengModel`]) and its classifier ([`DashengForAudioClassification`]).

    The defaults give `dasheng-base`. `DashengConfig.from_preset("dasheng-0.6B")` (or `name="dasheng-0.6B"`) gives
    the other released sizes. Configs written by the first Hub port (`{"encoder_kwargs": {"embed_dim": ...},
    "name": "dasheng-base", ...}`) are read as well: `encoder_kwargs` define the architecture and `name` fills in
    what they lack.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): Width of the tokens.
        num_hidden_layers (`int`, *optional*, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12): Attention heads per block.
        intermediate_size (`int`, *optional*): Hidden width of the MLP; defaults to `4 * hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact GELU).
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias in the query/key/value projection.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): Epsilon of the blocks' and final LayerNorms.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout after embeddings, attention projection
            and MLP (for fine-tuning).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout on attention weights.
        drop_path_rate (`float`, *optional*, defaults to 0.0): Stochastic depth, rising linearly to this rate over
            the blocks (for fine-tuning).
        num_mel_bins (`int`, *optional*, defaults to 64): Mel bands of the input spectrogram.
        patch_size (`tuple[int, int]`, *optional*, defaults to `(64, 4)`): (mel bins, frames) of one patch.
        patch_stride (`tuple[int, int]`, *optional*, defaults to `(64, 4)`): Stride of the patch embedding.
        target_length (`int`, *optional*, defaults to 1008): Frames per chunk (1008 frames = 10.08 s = 252 tokens).
            Longer inputs are split into chunks that the blocks process independently.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5): Epsilon of the spectrogram BatchNorm.
        batch_norm_momentum (`float`, *optional*, defaults to 0.01): Momentum of the spectrogram BatchNorm.
        use_batch_statistics (`bool`, *optional*, defaults to `False`): Let the spectrogram BatchNorm use and update
            batch statistics in training mode. Off by default: batch statistics mix clips and padding.
        max_chunks_per_pass (`int`, *optional*, defaults to 32): At inference (no gradient), at most this many
            chunks go through the blocks at once, which bounds memory for hours-long audio.
        sampling_rate, n_fft, win_length, hop_length, f_min, f_max, center, top_db: The front end the weights were
            trained with (see [`DashengFeatureExtractor`]); kept here so a checkpoint documents its own features.
        outputdim (`int`, *optional*): If set, [`DashengModel`] gets the original LayerNorm + Linear head
            (`outputlayer`) with this many outputs, and its `logits` are the head's output (before any sigmoid).
        head_layer_norm_eps (`float`, *optional*, defaults to 1e-5): Epsilon of the head's LayerNorm.
        loss (`str`, *optional*, defaults to `"BCELoss"`): Loss of [`DashengModel`] with a head when `labels` are
            given: `"BCELoss"` (multi-label, on sigmoid of the logits) or `"CrossEntropyLoss"` (single label).
        name (`str`, *optional*): Preset name (`dasheng-base`, `dasheng-0.6B`, `dasheng-1.2B`).
        encoder_kwargs (`dict`, *optional*): Constructor arguments of the original encoder (old Hub configs).
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
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        num_mel_bins: int = 64,
        patch_size: tuple[int, int] | list[int] = (64, 4),
        patch_stride: tuple[int, int] | list[int] = (64, 4),
        target_length: int = 1008,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.01,
        use_batch_statistics: bool = False,
        max_chunks_per_pass: int = 32,
        sampling_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 512,
        hop_length: int = 160,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        center: bool = True,
        top_db: float | None = 120.0,
        outputdim: int | None = None,
        head_layer_norm_eps: float = 1e-5,
        loss: str = "BCELoss",
        initializer_range: float = 0.02,
        name: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        # Precedence: encoder_kwargs (old Hub configs) > explicit arguments > preset of `name` > dasheng-base.
        fields = {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "patch_size": patch_size,
            "patch_stride": patch_stride,
            "target_length": target_length,
            "qkv_bias": qkv_bias,
            "num_mel_bins": num_mel_bins,
            "n_fft": n_fft,
            "hop_length": hop_length,
            "win_length": win_length,
            "f_min": f_min,
            "f_max": f_max,
            "center": center,
            "top_db": top_db,
            "hidden_dropout_prob": hidden_dropout_prob,
            "attention_probs_dropout_prob": attention_probs_dropout_prob,
        }
        preset = _canonical_preset_name(name)
        if name and preset is None and encoder_kwargs is None and hidden_size is None:
            logger.warning(f"Unknown Dasheng name {name!r}; using the dasheng-base architecture.")
        for field, value in zip(
            ("hidden_size", "num_hidden_layers", "num_attention_heads"), DASHENG_PRESETS[preset or "dasheng-base"]
        ):
            if fields[field] is None:
                fields[field] = value
        if encoder_kwargs:
            encoder_kwargs = dict(encoder_kwargs)
            mlp_ratio = encoder_kwargs.pop("mlp_ratio", None)
            if mlp_ratio is not None:
                intermediate_size = int(encoder_kwargs.get("embed_dim", fields["hidden_size"]) * mlp_ratio)
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
                    f"{sorted(_ENCODER_KWARGS_TO_FIELDS)}, mlp_ratio, pooling='mean')."
                )
            for key, value in encoder_kwargs.items():
                if key in _ENCODER_KWARGS_TO_FIELDS:
                    fields[_ENCODER_KWARGS_TO_FIELDS[key]] = value

        self.hidden_size = int(fields["hidden_size"])
        self.num_hidden_layers = int(fields["num_hidden_layers"])
        self.num_attention_heads = int(fields["num_attention_heads"])
        self.intermediate_size = int(intermediate_size) if intermediate_size else 4 * self.hidden_size
        self.hidden_act = hidden_act
        self.qkv_bias = bool(fields["qkv_bias"])
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = fields["hidden_dropout_prob"]
        self.attention_probs_dropout_prob = fields["attention_probs_dropout_prob"]
        self.drop_path_rate = drop_path_rate
        self.num_mel_bins = int(fields["num_mel_bins"])
        self.patch_size = [int(v) for v in fields["patch_size"]]
        self.patch_stride = [int(v) for v in fields["patch_stride"]]
        self.target_length = int(fields["target_length"])
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.use_batch_statistics = use_batch_statistics
        self.max_chunks_per_pass = max_chunks_per_pass
        self.sampling_rate = sampling_rate
        self.n_fft = int(fields["n_fft"])
        self.win_length = int(fields["win_length"])
        self.hop_length = int(fields["hop_length"])
        self.f_min = float(fields["f_min"])
        self.f_max = float(fields["f_max"])
        self.center = bool(fields["center"])
        self.top_db = fields["top_db"]
        self.outputdim = outputdim
        self.head_layer_norm_eps = head_layer_norm_eps
        self.loss = loss
        self.initializer_range = initializer_range
        self.name = name if preset is None else preset
        self._validate()
        kwargs.setdefault("custom_pipelines", _CUSTOM_PIPELINES)
        kwargs["auto_map"] = {**_AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.patch_size[0] != self.num_mel_bins or self.patch_stride[0] != self.num_mel_bins:
            raise ValueError(
                f"Dasheng patches span all mel bins: patch_size[0] and patch_stride[0] must equal num_mel_bins "
                f"({self.num_mel_bins}); got patch_size={self.patch_size}, patch_stride={self.patch_stride}."
            )
        if self.target_length % self.patch_stride[1] != 0:
            raise ValueError(
                f"target_length ({self.target_length}) must be a multiple of the time stride ({self.patch_stride[1]})."
            )
        if self.loss not in ("BCELoss", "CrossEntropyLoss"):
            raise ValueError(f"loss must be 'BCELoss' or 'CrossEntropyLoss', got {self.loss!r}.")

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> DashengConfig:
        """Config of a released size: `dasheng-base`, `dasheng-0.6B` or `dasheng-1.2B`."""
        if _canonical_preset_name(name) is None:
            raise ValueError(f"Unknown Dasheng preset {name!r}; choose one of {sorted(DASHENG_PRESETS)}.")
        return cls(name=name, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Save `config.json` and the three code files, so the folder loads with `trust_remote_code=True`."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        copy_code_files(save_directory)

    @property
    def chunk_num_tokens(self) -> int:
        """Tokens per chunk (252 for 1008 frames): the span that attention sees."""
        return self.target_length // self.patch_stride[1]


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
    "AutoFeatureExtractor": "feature_extraction_dasheng.DashengFeatureExtractor",
}
CODE_FILES = ("configuration_dasheng.py", "modeling_dasheng.py", "feature_extraction_dasheng.py")


def copy_code_files(save_directory: str | os.PathLike) -> None:
    """Copy the three Dasheng code files into `save_directory` (those beside this file that exist)."""
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        source, target = here / name, Path(save_directory) / name
        if source.exists() and source != target.resolve():
            shutil.copyfile(source, target)


DashengConfig.register_for_auto_class()
