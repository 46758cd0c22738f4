"""The model card (README.md) of a converted Hub folder: front matter, description, usage, HEAR scores, citation."""

from __future__ import annotations

from ..configuration_dasheng import DASHENG_PRESETS, DashengConfig

__all__ = ["HEAR_SCORES", "build_model_card"]

# HEAR scores (Environment, Speech, Music) of the released encoders, from the paper.
HEAR_SCORES = {
    "dasheng-base": (80.2, 72.5, 84.0),
    "dasheng-0.6B": (82.4, 74.9, 84.0),
    "dasheng-1.2B": (83.2, 75.7, 84.9),
}


def build_model_card(config: DashengConfig, classifier: bool, repo_id: str) -> str:
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
