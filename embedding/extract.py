"""
From audio parts to Dasheng embeddings: features computed in dataloader workers, padding-free batches of segments
through the model, and per-segment outputs that the writer (`embedding/store.py`) sums into clip embeddings.

A clip's log-mel features are computed whole (the front end floors each clip at 120 dB below its own peak) and cut
into segments of [`SEGMENT_CHUNKS`] attention chunks (161.28 s). Dasheng encodes every 10.08 s chunk on its own, so a
segment's tokens equal the whole clip's tokens at the same place, and an hour-long file costs the memory of one
segment in the model. Workers gather a part's segments into batches of up to `batch_seconds` of audio, so the main
process does nothing but run the model; the encoder packs the real tokens of a batch and never computes padding.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..audio.datasets import MIN_SAMPLES, SAMPLING_RATE, DashengAudioError, DashengAudioPart
from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..modeling_dasheng import DashengModel

__all__ = [
    "FRAME_RATE",
    "SEGMENT_CHUNKS",
    "DashengEmbedder",
    "DashengFeatureStream",
    "SegmentOutput",
    "frame_times",
    "weights_fingerprint",
]

FRAME_RATE = 25  # tokens per second: 4 frames of 10 ms each
SEGMENT_CHUNKS = 16  # chunks of 252 tokens (10.08 s) per segment: 161.28 s


def frame_times(first_token: int, num_tokens: int) -> np.ndarray:
    """Centre times in seconds of tokens `first_token ...`: token i spans frames 4i..4i+3 (10 ms apart), centre
    `0.04 i + 0.015` s."""
    return (np.arange(first_token, first_token + num_tokens) * 0.04 + 0.015).astype(np.float64)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes, dtypes and values), independent of file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class DashengFeatureStream(torch.utils.data.IterableDataset):
    """
    The clips of `parts` as batches of features, for a `DataLoader` with `batch_size=None`: each worker reads whole
    parts in turn, computes features and gathers segments into batches of up to `batch_frames` frames (a longer
    segment alone), so the main process only runs the model and workers keep decoding meanwhile.

    Each batch is `{"part", "events", "features", "lengths", "owners", "last"}`:

    - `events`: the clips this batch introduces, in order: `{"kind": "clip", "index", "file", "key", "labels",
      "duration", "num_segments"}` for a usable clip (`index` counts the part's clips), `{"kind": "skipped", "file",
      "reason"}` for one that cannot be used;
    - `features`: `(64, frames)` float32, the batch's segments side by side, `lengths` frames each;
    - `owners`: the `index` of each segment's clip (a clip's segments come in order, possibly over several batches);
    - `last`: the part ends with this batch.
    """

    def __init__(
        self,
        parts: Sequence[DashengAudioPart],
        feature_extractor: DashengFeatureExtractor,
        chunk_frames: int,
        batch_frames: int,
    ):
        self.parts, self.feature_extractor = list(parts), feature_extractor
        self.segment_frames, self.batch_frames = SEGMENT_CHUNKS * chunk_frames, batch_frames

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
            _quiet_worker_signals()
        for part in self.parts[worker::workers]:
            yield from self._batches(part)

    def _batches(self, part: DashengAudioPart) -> Iterator[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        segments: list[torch.Tensor] = []
        owners: list[int] = []
        frames = clips = 0
        for record in part.records():
            event, clip_segments = self._clip(record, clips)
            events.append(event)
            clips += event["kind"] == "clip"
            for segment in clip_segments:
                if segments and frames + segment.shape[-1] > self.batch_frames:
                    yield _batch(part.number, events, segments, owners, last=False)
                    events, segments, owners, frames = [], [], [], 0
                segments.append(segment)
                owners.append(event["index"])
                frames += segment.shape[-1]
        yield _batch(part.number, events, segments, owners, last=True)

    def _clip(self, record: Any, index: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The event of one record, and its feature segments `(64, <= segment_frames)`."""
        if isinstance(record, DashengAudioError):
            return {"kind": "skipped", "file": str(record).split(": ")[0], "reason": str(record)}, []
        file = record.path or record.origin
        try:
            audio = record.decode(SAMPLING_RATE)
            if len(audio) < MIN_SAMPLES:
                raise DashengAudioError(
                    f"{record.origin}: {len(audio)} samples at {SAMPLING_RATE} Hz, shorter than the {MIN_SAMPLES} "
                    f"(30 ms) the encoder needs."
                )
            try:
                features = self.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
            except ValueError as error:  # unnormalised samples beyond float32's range
                raise DashengAudioError(f"{record.origin}: {error}") from error
        except DashengAudioError as error:
            return {"kind": "skipped", "file": file, "reason": str(error)}, []
        except Exception as error:  # whatever else one file brings (a decoder's own failure): that file, not the run
            first = (str(error).strip().splitlines() or [""])[0]
            return {"kind": "skipped", "file": file, "reason": f"{record.origin}: {type(error).__name__}: {first}"}, []
        values = features["input_values"][0]
        segments = list(values.split(self.segment_frames, dim=-1))
        if len(segments) > 1 and segments[-1].shape[-1] < 4:  # frames that end no token
            segments.pop()
        event = {
            "kind": "clip",
            "index": index,
            "file": file,
            "key": record.key,
            "labels": record.labels,
            "duration": len(audio) / SAMPLING_RATE,
            "num_segments": len(segments),
        }
        return event, segments


def _quiet_worker_signals() -> None:
    """
    In a dataloader worker: Ctrl-C and SIGHUP, which reach the whole process group, are left to the main process
    (it stops the workers); SIGTERM ends the worker at once with status 0, so that a SIGTERM sent to the group does
    not also make the DataLoader report a worker "killed by signal" while the main process stops.
    """
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    sys.excepthook = _quiet_broken_connections


def _quiet_broken_connections(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    """`sys.excepthook` in a worker: the thread that hands a batch's shared memory to the main process (it reports
    through this hook) meets a closed connection when the main process stopped (an interrupt): no error of the
    worker's, and not printed."""
    if not issubclass(kind, (BrokenPipeError, ConnectionResetError, EOFError)):
        sys.__excepthook__(kind, error, traceback)


def _batch(
    part: int, events: list[dict[str, Any]], segments: list[torch.Tensor], owners: list[int], last: bool
) -> dict[str, Any]:
    features = torch.cat(segments, dim=-1) if segments else torch.empty(0, 0)
    lengths = [segment.shape[-1] for segment in segments]
    return {"part": part, "events": events, "features": features, "lengths": lengths, "owners": owners, "last": last}


@dataclass
class SegmentOutput:
    """
    What the model gives for one segment of a clip.

    Attributes:
        num_tokens: Real tokens of the segment.
        token_sum: `(hidden,)` float64 sum of its `last_hidden_state` tokens.
        layer_sums: `(layers, hidden)` float64 sums of the chosen `hidden_states`, or None.
        tokens: `(num_tokens, hidden)` float32 `last_hidden_state`, with frames; else None.
        layer_tokens: `(layers, num_tokens, hidden)` float32, with frames and layers; else None.
    """

    num_tokens: int
    token_sum: np.ndarray
    layer_sums: np.ndarray | None = None
    tokens: np.ndarray | None = None
    layer_tokens: np.ndarray | None = None


class DashengEmbedder:
    """
    Runs batches of feature segments through a [`DashengModel`] (eval mode, no gradients).

    Args:
        model: The encoder.
        layers: Indices into the model's `hidden_states` (0 the patch embeddings, i the output of block i, -1 the
            last block's, before the final LayerNorm) whose token means (and frames) are kept; None for none.
        frames: Keep every token (25 Hz), not only their sums.
        bf16: Compute under bfloat16 autocast.
        device: Where the model runs.
    """

    def __init__(
        self,
        model: DashengModel,
        layers: Sequence[int] | None = None,
        frames: bool = False,
        bf16: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.layers, self.frames, self.bf16 = list(layers) if layers else None, frames, bf16

    @torch.inference_mode()
    def forward(self, segments: Sequence[torch.Tensor]) -> list[SegmentOutput]:
        """Encode feature segments `(64, frames)` of any lengths together; one output per segment, in order."""
        lengths = [segment.shape[-1] for segment in segments]
        values = torch.empty(len(segments), segments[0].shape[0], max(lengths))
        mask = torch.zeros(len(segments), max(lengths), dtype=torch.long)
        for row, segment in enumerate(segments):
            values[row, :, : lengths[row]] = segment
            values[row, :, lengths[row] :] = segment.min()  # never computed: the mask marks it
            mask[row, : lengths[row]] = 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model(
                input_values=values.to(self.device),
                attention_mask=mask.to(self.device),
                output_hidden_states=self.layers is not None,
            )
        valid = self.model.num_valid_tokens(mask).tolist()
        last = outputs.last_hidden_state.float()
        states = None
        if self.layers is not None:
            states = torch.stack([outputs.hidden_states[layer] for layer in self.layers], dim=1).float()
        results = []
        for row, count in enumerate(valid):
            tokens = last[row, :count]
            result = SegmentOutput(count, tokens.double().sum(0).cpu().numpy())
            if states is not None:
                result.layer_sums = states[row, :, :count].double().sum(1).cpu().numpy()
            if self.frames:
                result.tokens = tokens.cpu().numpy()
                if states is not None:
                    result.layer_tokens = states[row, :, :count].cpu().numpy()
            results.append(result)
        return results
