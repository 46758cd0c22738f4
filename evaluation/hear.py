"""Dasheng for the HEAR benchmark: the HEAR 2021 common API (`load_model`, timestamp and scene embeddings).

    import dasheng_hf.evaluation.hear as hear

    model = hear.load_model("mispeech/dasheng-base")  # a Hub id, a folder, or a size name such as "dasheng-0.6B"
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")  # audio is moved to the model's device
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)  # audio: (n_sounds, n_samples) at 16 kHz
    scene = hear.get_scene_embeddings(audio, model)

The HEAR evaluation kit takes the module by name: `python -m heareval.embeddings.runner dasheng_hf.evaluation.hear
--model mispeech/dasheng-base --tasks-dir tasks/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli.preflight import HubResource, check_resources
from ..configuration_dasheng import canonical_preset_name
from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..modeling_dasheng import DashengModel

__all__ = ["DashengHearModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

DEFAULT_MODEL = "mispeech/dasheng-base"
HUB_ORGANISATION = "mispeech"


class DashengHearModel(nn.Module):
    """
    A Dasheng encoder with the attributes the HEAR API asks for.

    Embeddings are the encoder's final token embeddings (one per 40 ms); the scene embedding is their mean. Both
    have `hidden_size` dimensions (768 for dasheng-base).
    """

    sample_rate = 16000

    def __init__(self, model: DashengModel, feature_extractor: DashengFeatureExtractor):
        super().__init__()
        if feature_extractor.sampling_rate != self.sample_rate:
            raise ValueError(
                f"HEAR models take {self.sample_rate} Hz audio; the feature extractor expects "
                f"{feature_extractor.sampling_rate} Hz."
            )
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.scene_embedding_size = int(model.config.hidden_size)
        self.timestamp_embedding_size = int(model.config.hidden_size)
        self.hop_size_ms = 1000.0 * model.config.patch_stride[1] * model.config.hop_length / self.sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_batch_samples(self) -> int:
        """
        Samples of audio encoded in one forward pass: as many as `config.max_chunks_per_pass` chunks hold (5.2M,
        322 s, at the defaults). Batches of clips are split to stay under this; a single longer clip goes alone.
        """
        config = self.model.config
        return max(1, config.max_chunks_per_pass) * config.target_length * config.hop_length

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Token embeddings `(n_sounds, tokens, hidden_size)` float32 of audio `(n_sounds, n_samples)` at 16 kHz."""
        audio = _check_audio(audio)
        clips_per_pass = max(1, self.max_batch_samples // audio.shape[1])
        outputs = []
        with torch.no_grad():
            for batch in audio.split(clips_per_pass):
                features = self.feature_extractor(
                    batch, sampling_rate=self.sample_rate, return_tensors="pt", device=self.device
                )
                hidden = self.model(input_values=features["input_values"]).last_hidden_state
                outputs.append(hidden.float())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def timestamps(self, num_sounds: int, num_tokens: int) -> torch.Tensor:
        """Centre of each token in ms, `(num_sounds, num_tokens)`: token i covers [40 i, 40 i + 40) ms."""
        centres = (torch.arange(num_tokens, dtype=torch.float64) + 0.5) * self.hop_size_ms
        return centres.float().to(self.device).repeat(num_sounds, 1)


def _check_audio(audio: Any) -> torch.Tensor:
    """The checks the feature extractor does not make first: type, shape, dtype, and no empty axis."""
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor of shape (n_sounds, n_samples), got {type(audio).__name__}.")
    if audio.ndim != 2:
        hint = " Add a batch axis with audio[None]." if audio.ndim == 1 else " Mix multi-channel audio down to mono."
        raise ValueError(f"audio must have shape (n_sounds, n_samples), got {tuple(audio.shape)}.{hint}")
    if audio.shape[0] == 0:
        raise ValueError(f"audio holds no sounds (shape {tuple(audio.shape)}): pass at least one.")
    if audio.shape[1] == 0:
        raise ValueError(
            f"audio has no samples (shape {tuple(audio.shape)}): Dasheng needs at least 480 samples (30 ms at 16 kHz)."
        )
    if not audio.is_floating_point():
        raise ValueError(f"audio must hold float samples in [-1, 1], got dtype {audio.dtype}.")
    return audio


def _resolve(model_file_path: str) -> str:
    """A folder as it is; a size name (`dasheng-base`, `dasheng-0.6B`, `dasheng-1.2B`) as its Hub id."""
    if not model_file_path:
        return DEFAULT_MODEL
    if Path(model_file_path).exists() or "/" in model_file_path:
        return model_file_path
    preset = canonical_preset_name(model_file_path)
    return f"{HUB_ORGANISATION}/{preset}" if preset else model_file_path


def load_model(model_file_path: str = "", **options: Any) -> DashengHearModel:
    """
    Load a Dasheng encoder for HEAR.

    Args:
        model_file_path: A Hub id (`mispeech/dasheng-base`), a folder saved with `save_pretrained` or
            `dasheng-convert` (the first Hub layout too), or a size name (`dasheng-base`, `dasheng-0.6B`,
            `dasheng-1.2B`). Empty: `mispeech/dasheng-base`.
        options: Passed on to `DashengModel.from_pretrained` (e.g. `revision`, `torch_dtype`, `attn_implementation`).
    Returns:
        A [`DashengHearModel`] in eval mode, on the CPU until moved with `.to(device)`.
    Raises:
        `DashengPreflightError` (a `ValueError`), before any download, when the folder does not exist or a Hub id is
        neither cached nor reachable (offline with `HF_HUB_OFFLINE`, without retries).
    """
    source = _resolve(model_file_path)
    if Path(source).is_file():
        raise ValueError(
            f"{model_file_path!r} is a file; load_model takes a folder or a Hub id. Convert an original Dasheng "
            f"checkpoint first: `dasheng-convert --checkpoint {model_file_path} --output FOLDER`."
        )
    # Before any download: a missing folder is named as such, an unreachable or offline Hub in one line, no retries.
    size = canonical_preset_name(source.rpartition("/")[2]) or "dasheng-base"
    check_resources(
        [HubResource("model_file_path", source)],
        advice=f"a folder written by save_pretrained, or by `dasheng-convert --checkpoint {size} --output FOLDER` "
        "for a released checkpoint",
        cache_dir=options.get("cache_dir"),
    )
    try:
        model = DashengModel.from_pretrained(source, **options)
    except OSError as error:
        raise OSError(
            f"Could not load a Dasheng model from {source!r} (from model_file_path={model_file_path!r}): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. Pass a folder written by "
            f"save_pretrained or dasheng-convert, a Hub id, or a size name (dasheng-base, dasheng-0.6B, dasheng-1.2B)."
        ) from None
    try:
        feature_extractor = DashengFeatureExtractor.from_pretrained(source, revision=options.get("revision"))
    except OSError:  # a folder without preprocessor_config.json: the front end the config documents
        feature_extractor = DashengFeatureExtractor.from_dasheng_config(model.config)
    return DashengHearModel(model, feature_extractor).eval()


def get_timestamp_embeddings(audio: torch.Tensor, model: DashengHearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Embeddings every 40 ms.

    Args:
        audio: `(n_sounds, n_samples)` float samples in [-1, 1] at 16 kHz, any length (hours work, in bounded memory).
        model: From [`load_model`]; computing happens on its device.
    Returns:
        `(embeddings, timestamps)`: `(n_sounds, n_tokens, hidden_size)` float32, and `(n_sounds, n_tokens)` the centre
        of each token in ms (20, 60, 100, ...). A clip of `N` samples has `(N // 160 - 3) // 4 + 1` tokens.
    """
    embeddings = model(audio)
    return embeddings, model.timestamps(embeddings.shape[0], embeddings.shape[1])


def get_scene_embeddings(audio: torch.Tensor, model: DashengHearModel) -> torch.Tensor:
    """One embedding per clip, `(n_sounds, hidden_size)` float32: the mean of its token embeddings."""
    return model(audio).mean(dim=1)
