"""
The heads of the evaluations (`protocol.py`), one held-out fold at a time: a linear head or a small MLP trained with
`Trainer` on frozen embeddings, k-nearest-neighbour voting on them, and end-to-end fine-tuning of an audio classifier
with `Trainer`. Each returns a score per class for every held-out clip (argmax: the predicted class; multi-label:
ranked per class). Trainer's per-step logs go to `log_history.json`, not to the console.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .embeddings import AudioClips, LinearProbeError, featurize, load_encoder

__all__ = [
    "MODE_DEFAULTS",
    "LinearProbeHead",
    "finetune_classifier",
    "knn_predict",
    "knn_scores",
    "multi_process_cpu",
    "train_linear_probe",
]

# Default (epochs, learning rate, batch size) per mode: a frozen-encoder linear head on standardised embeddings, and
# end-to-end fine-tuning of a pretrained encoder.
MODE_DEFAULTS = {"probe": (30, 1e-2, 256), "finetune": (10, 5e-5, 16)}


class LinearProbeHead(nn.Module):
    """
    Logistic regression on embeddings standardised with the training fold's mean and standard deviation; with
    `hidden_size`, a small MLP instead (one hidden ReLU layer with dropout 0.1, HEAR's shallow downstream head).
    Multi-label heads train with a sigmoid per class (binary cross-entropy), single-label with softmax.
    """

    def __init__(
        self, mean: np.ndarray, std: np.ndarray, num_labels: int, hidden_size: int | None = None, multi_label=False
    ):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-6))
        width, self.multi_label = self.mean.numel(), multi_label
        if hidden_size is None:
            self.classifier = nn.Linear(width, num_labels)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(width, hidden_size), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden_size, num_labels)
            )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """`embeddings` `(batch, hidden)`, `labels` `(batch,)` class indices or `(batch, num_labels)` multi-hot;
        logits `(batch, num_labels)`."""
        logits = self.classifier((embeddings - self.mean) / self.std)
        loss = None
        if labels is not None and self.multi_label:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _EmbeddingDataset(torch.utils.data.Dataset):
    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings[index], "labels": self.labels[index]}


class _WaveformDataset(torch.utils.data.Dataset):
    def __init__(self, clips: AudioClips, indices: np.ndarray):
        self.clips, self.indices = clips, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = int(self.indices[index])
        label = self.clips.labels[clip]
        return {"waveform": self.clips.waveform(clip), "labels": label if label.ndim else int(label)}


class _WaveformCollator:
    """Batches whole clips of different lengths through the feature extractor."""

    def __init__(self, feature_extractor: FeatureExtractionMixin):
        self.feature_extractor = feature_extractor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = featurize(self.feature_extractor, [item["waveform"] for item in items])
        labels = np.array([item["labels"] for item in items])
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)
        return batch


def _accuracy(eval_prediction: EvalPrediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if labels.ndim == 2:  # multi-label: the share of correct yes/no decisions at 0.5, for the curve only
        return {"accuracy": float(((logits > 0) == (labels > 0.5)).mean())}
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def multi_process_cpu() -> bool:
    """Several processes without a GPU: Trainer and accelerate only go distributed (gloo) when told to use the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _training_arguments(
    output_dir: Path,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    large_eval_batches: bool = False,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(batch_size, 64) if large_eval_batches else batch_size,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=multi_process_cpu(),
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        log_level="warning",
    )


def _fit_and_predict(trainer: Trainer, eval_dataset: torch.utils.data.Dataset, output_dir: Path) -> np.ndarray:
    """Train quietly, write the log history, and return the scores `(items, classes)` of every evaluation item."""
    trainer.remove_callback(PrinterCallback)  # per-step logs go to log_history.json, not the console
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return np.asarray(trainer.predict(eval_dataset).predictions, dtype=np.float32)


def train_linear_probe(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    eval_embeddings: np.ndarray,
    eval_labels: np.ndarray,
    num_labels: int,
    output_dir: str | Path,
    epochs: float = MODE_DEFAULTS["probe"][0],
    learning_rate: float = MODE_DEFAULTS["probe"][1],
    batch_size: int = MODE_DEFAULTS["probe"][2],
    seed: int = 0,
    hidden_size: int | None = None,
) -> np.ndarray:
    """
    Train a [`LinearProbeHead`] (an MLP with `hidden_size`) with `Trainer` (evaluated on the eval set every epoch,
    for the curve only) and write its training log to `output_dir/log_history.json`. Labels are class indices
    `(num,)` or multi-hot targets `(num, num_labels)` (multi-label).

    Returns:
        `(num_eval, num_labels)` logits of the eval embeddings after the last epoch.
    """
    set_seed(seed)
    mean, std = train_embeddings.mean(axis=0), train_embeddings.std(axis=0)
    head = LinearProbeHead(mean, std, num_labels, hidden_size, multi_label=train_labels.ndim == 2)
    eval_dataset = _EmbeddingDataset(eval_embeddings, eval_labels)
    args = _training_arguments(Path(output_dir), epochs, learning_rate, batch_size, seed, large_eval_batches=True)
    trainer = Trainer(
        model=head,
        args=args,
        train_dataset=_EmbeddingDataset(train_embeddings, train_labels),
        eval_dataset=eval_dataset,
        compute_metrics=_accuracy,
    )
    # The head is tiny: on the CPU, intra-op threads only add synchronisation (several times slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_predict(trainer, eval_dataset, Path(output_dir))
    finally:
        torch.set_num_threads(threads)


def finetune_classifier(
    model_name: str,
    clips: AudioClips,
    train_indices: np.ndarray,
    eval_indices: np.ndarray,
    output_dir: str | Path,
    epochs: float = MODE_DEFAULTS["finetune"][0],
    learning_rate: float = MODE_DEFAULTS["finetune"][1],
    batch_size: int = MODE_DEFAULTS["finetune"][2],
    seed: int = 0,
    freeze_encoder: bool = False,
    trust_remote_code: bool = False,
) -> np.ndarray:
    """
    Fine-tune a fresh classifier on `model_name` (see [`load_encoder`]) with `Trainer` on the clips at
    `train_indices`, whole, and write its training log to `output_dir/log_history.json`; with `freeze_encoder` only
    the head trains. Multi-label clips train with a sigmoid per class.

    Returns:
        `(len(eval_indices), num_labels)` logits of the clips at `eval_indices` after the last epoch.
    """
    set_seed(seed)
    model, feature_extractor = load_encoder(model_name, trust_remote_code, clips.label_names, clips.multi_label)
    if freeze_encoder:
        if not hasattr(model, "freeze_encoder"):
            raise LinearProbeError(f"{type(model).__name__} has no freeze_encoder(); drop --freeze-encoder.")
        model.freeze_encoder()
    eval_dataset = _WaveformDataset(clips, eval_indices)
    trainer = Trainer(
        model=model,
        args=_training_arguments(Path(output_dir), epochs, learning_rate, batch_size, seed),
        train_dataset=_WaveformDataset(clips, train_indices),
        eval_dataset=eval_dataset,
        data_collator=_WaveformCollator(feature_extractor),
        processing_class=feature_extractor,
        compute_metrics=_accuracy,
    )
    return _fit_and_predict(trainer, eval_dataset, Path(output_dir))


def knn_scores(
    train_embeddings: np.ndarray, train_labels: np.ndarray, query_embeddings: np.ndarray, k: int = 10
) -> np.ndarray:
    """
    k-NN by cosine similarity of L2-normalised embeddings (the paper's evaluation: k = 10): `(queries, classes)`.

    Single-label (`train_labels` class indices): each class's votes among the `k` most similar training clips, plus
    its summed similarity scaled below one vote (which breaks ties). Multi-label (multi-hot `train_labels`): the share
    of the `k` neighbours carrying each label, plus the same tie-breaking term.
    """
    train = train_embeddings / np.linalg.norm(train_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    query = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    k = min(k, len(train))
    similarity = query @ train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    nearest_similarity = np.take_along_axis(similarity, nearest, axis=1)
    if train_labels.ndim == 2:
        neighbours = train_labels[nearest]  # (queries, k, classes)
        votes = neighbours.sum(axis=1)
        summed = (neighbours * nearest_similarity[:, :, None]).sum(axis=1)
        # Summed similarity lies in [-k, k], so shifted by k and divided by 2k + 1 it is below one vote.
        return ((votes + (summed + k) / (2 * k + 1)) / k).astype(np.float32)
    num_labels = int(train_labels.max()) + 1
    votes = np.zeros((len(query), num_labels))
    summed = np.zeros((len(query), num_labels))
    rows = np.repeat(np.arange(len(query)), k)
    np.add.at(votes, (rows, train_labels[nearest].ravel()), 1.0)
    np.add.at(summed, (rows, train_labels[nearest].ravel()), nearest_similarity.ravel())
    return (votes + (summed + k) / (2 * k + 1)).astype(np.float32)


def knn_predict(
    train_embeddings: np.ndarray, train_labels: np.ndarray, query_embeddings: np.ndarray, k: int = 10
) -> np.ndarray:
    """
    k-NN classification by cosine similarity of L2-normalised embeddings.

    Each query takes the majority class of its `k` most similar training clips; ties between classes go to the
    class with the larger summed similarity.
    """
    return np.argmax(knn_scores(train_embeddings, train_labels, query_embeddings, k), axis=1)
