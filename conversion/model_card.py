"""
The model card (README.md) of a converted Hub folder: front matter, description, usage, HEAR scores, citation.

The release's facts (its training data, the paper's HEAR scores, the `mispeech/...` id, its license) go only into the
cards of the released checkpoints, recognised by their sha256 (`RELEASED_SHA256`) or by being downloaded from the
release itself; any other checkpoint's card says what the conversion was (the input file, its size and checksum).
Light to import (no torch, no transformers): `dasheng-convert --help` imports this module.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..configuration_dasheng import DashengConfig

__all__ = ["HEAR_SCORES", "RELEASED_SHA256", "build_model_card", "file_sha256", "released_checkpoint"]

# sha256 of the files behind checkpoint_files.RELEASED_CHECKPOINTS' URLs (Zenodo records 11511780 and 13315686), by
# released name. Filled in from a verified download; while a name has none, only a download from the release's own
# URL is recognised as that release (a local copy of it gets the card of an unrecognised checkpoint).
RELEASED_SHA256: dict[str, str] = {}

# HEAR scores (Environment, Speech, Music) of the released encoders, from the paper.
HEAR_SCORES = {
    "dasheng-base": (80.2, 72.5, 84.0),
    "dasheng-0.6B": (82.4, 74.9, 84.0),
    "dasheng-1.2B": (83.2, 75.7, 84.9),
}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks (a 1.2B checkpoint takes seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def released_checkpoint(checkpoint: str, sha256: str | None) -> str | None:
    """The released name (`dasheng-base`, ...) of a conversion's input, or None: by the file's sha256, or because
    `checkpoint` is a released name or its URL (downloaded from the release itself)."""
    from .checkpoint_files import RELEASED_CHECKPOINTS

    for name, known in RELEASED_SHA256.items():
        if sha256 is not None and sha256 == known:
            return name
    for name, url in RELEASED_CHECKPOINTS.items():
        if checkpoint in (name, url):
            return name
    return None


def build_model_card(
    config: DashengConfig,
    classifier: bool,
    repo_id: str,
    released: str | None = None,
    source: str = "",
    verified: bool = False,
) -> str:
    """
    README.md for the Hub: front matter, what the model is, runnable usage, scores and citation.

    Args:
        config: The converted model's config.
        classifier: Whether it has a classification head.
        repo_id: The id (or local path) the usage example loads.
        released: The released name of the input (see [`released_checkpoint`]), or None for any other checkpoint:
            then the card claims nothing of the release (training data, HEAR scores, license).
        source: What the input was (file name, where from, size and sha256), for the card's provenance line.
        verified: Whether the conversion was compared with the original implementation (`--verify`).
    """
    from ..configuration_dasheng import DASHENG_PRESETS

    sizes = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    size = released if released in HEAR_SCORES and DASHENG_PRESETS[released] == sizes else None
    tags = ["audio", "dasheng", "self-supervised-learning"] + (["audio-classification"] if classifier else [])
    title = f"{size or 'Dasheng'}{' audio classifier' if classifier else ''}{'' if released else ' (converted)'}"
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
            if released
            else f"A Dasheng (Deep Audio-Signal Holistic Embeddings) audio encoder: {architecture}."
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
    elif released:
        scores = "This is not one of the released encoder sizes, so the paper reports no HEAR scores for it."
    else:
        scores = "None measured: this is not one of the released checkpoints, so the paper's scores do not apply."
    check = " and checked against the original implementation (`--verify`)" if verified else ""
    if released:
        origin = (
            f"Converted from the original release (https://github.com/RicherMans/Dasheng"
            f"{', ' + source if source else ''}) with `convert_checkpoint.py` of dasheng-hf{check}."
        )
    else:
        origin = (
            f"Converted from {source or 'a checkpoint'} with `convert_checkpoint.py` of dasheng-hf{check}. It is not "
            f"one of the released Dasheng checkpoints (its checksum matches none of them): its training data, quality "
            f"and license are those of whatever produced it."
        )
    license_line = "license: apache-2.0\n" if released else ""
    return f"""---
{license_line}library_name: transformers
pipeline_tag: {"audio-classification" if classifier else "feature-extraction"}
tags:
{chr(10).join(f"- {tag}" for tag in tags)}
---

# {title}

{what}

{origin} Input: 16 kHz mono audio.

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
