"""
Dasheng to deployable graphs: `torch.export`'s `ExportedProgram` (`.pt2`), ONNX (`model.onnx`) and its dynamic int8
version (`model_quantized.onnx`).

Both graphs take `input_values (batch, 64, frames)` and `attention_mask (batch, frames)` with dynamic batch and
frames (at least `MIN_FRAMES`; pad shorter batches with mask 0) and return `last_hidden_state`, `pooler_output` and,
for a model with a head, `logits`. Inside the graph each clip is cut into 10.08 s chunks of 252 tokens with a
key-padding mask (the encoder's export layout), so any length works and a clip's last chunk sees only its real tokens.
In the ONNX graph a batch shorter than 10.08 s runs as one chunk of its own length; the `torch.export` program pads
every batch to whole 252-token chunks (its shape guards refuse the shorter layout), which costs time on short clips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MIN_FRAMES",
    "DashengExportWrapper",
    "export_onnx",
    "export_program",
    "quantize_int8",
]

# torch.export specialises sizes 0 and 1, so the token axis (frames // 4) needs at least 2: 8 frames (80 ms).
MIN_FRAMES = 8
ONNX_OPSET = 18
# Above this, weights go to `model.onnx.data` (protobuf files cannot exceed 2 GB).
_EXTERNAL_DATA_BYTES = 1_800_000_000


class DashengExportWrapper(nn.Module):
    """
    A Dasheng model (`DashengModel` or `DashengForAudioClassification`) with plain tensor inputs and a tuple output:
    `(last_hidden_state, pooler_output)`, plus `logits` when the model has a head.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.head = getattr(model, "outputlayer", None)

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state", "pooler_output"] + ([] if self.head is None else ["logits"])

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.encoder(input_values, attention_mask)
        outputs = (encoded.last_hidden_state, encoded.pooler_output)
        return outputs if self.head is None else (*outputs, self.head(encoded.pooler_output))


def _example_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips, the second shorter (a padded batch) and 2 chunks long: the traced path covers masking."""
    frames = 1100
    input_values = torch.randn(2, model.config.num_mel_bins, frames) * 10 - 40
    attention_mask = torch.ones(2, frames, dtype=torch.long)
    attention_mask[1, 700:] = 0
    return input_values, attention_mask


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    frames = torch.export.Dim("frames", min=MIN_FRAMES, max=2**24)
    return {"input_values": {0: batch, 2: frames}, "attention_mask": {0: batch, 1: frames}}


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """`torch.export` of `DashengExportWrapper(model)` with dynamic batch and frames (>= `MIN_FRAMES`)."""
    wrapper = DashengExportWrapper(model).eval()
    input_values, attention_mask = _example_inputs(model)
    with torch.no_grad():
        return torch.export.export(
            wrapper,
            (),
            {"input_values": input_values, "attention_mask": attention_mask},
            dynamic_shapes=_dynamic_shapes(),
        )


def export_onnx(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """
    Write `model.onnx` (dynamic batch and frames) to `path`, its weights in `path.data` beside it when the model is
    too large for one protobuf (over about 2 GB). `metadata` goes to the model's `metadata_props` as JSON strings.
    """
    path = Path(path)
    wrapper = DashengExportWrapper(model).eval()
    input_values, attention_mask = _example_inputs(model)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (),
            kwargs={"input_values": input_values, "attention_mask": attention_mask},
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(),
            input_names=["input_values", "attention_mask"],
            output_names=wrapper.output_names,
            opset_version=ONNX_OPSET,
            optimize=True,
            verbose=False,
        )
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=weight_bytes > _EXTERNAL_DATA_BYTES)
    return path


def quantize_int8(source: str | Path, target: str | Path) -> Path:
    """
    Dynamic int8 of `source`'s matrix products with constant weights (MatMul and Gemm: the qkv, projection and MLP
    layers; int8 weights per output channel, activations quantised per call), written to `target`. LayerNorm,
    softmax and the attention products of activations stay float32.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantisation
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=Path(str(source) + ".data").exists(),
        )
    finally:
        root.setLevel(level)
    return Path(target)
