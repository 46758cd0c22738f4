"""Dasheng's layers, in the order data flows: the spectrogram BatchNorm, the patch embedding, then the transformer
blocks on packed sequences (the packing of real tokens, attention, MLP and the block).

Every block of Dasheng (the encoder's, and the pretraining decoder's) reads tokens packed back to back, padding
removed: `DashengPackedSequences` says where each sequence (a chunk of a clip) lies, `DashengSelfAttention` attends
within each sequence through Transformers' attention interface, and `run_blocks` runs a stack of `DashengLayer`s.
Under `torch.export` and ONNX export, where no shape may depend on the data, `encode_in_fixed_chunks` uses fixed-size
chunks with a key-padding mask instead (`DashengChunkedSequences`), which computes the same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dasheng import DashengConfig

__all__ = [
    "DashengChunkedSequences",
    "DashengDropPath",
    "DashengLayer",
    "DashengMLP",
    "DashengPackedSequences",
    "DashengPatchEmbeddings",
    "DashengSelfAttention",
    "DashengSpectrogramBatchNorm",
    "attention_bias",
    "eager_attention_forward",
    "encode_in_fixed_chunks",
    "is_exporting",
    "run_blocks",
]


class DashengSpectrogramBatchNorm(nn.BatchNorm2d):
    """BatchNorm over mel bins of `(batch, mel bins, 1, frames)` that uses its running statistics by default."""

    def __init__(self, config: DashengConfig):
        super().__init__(config.num_mel_bins, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        self.use_batch_statistics = config.use_batch_statistics

    def forward(self, spectrogram: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`frame_mask` `(batch, frames)`, True for real frames: padded frames never enter batch statistics."""
        if self.training and self.use_batch_statistics and self.weight.requires_grad:
            # The original's training behaviour: normalise by, and update, batch statistics (not when frozen).
            if frame_mask is None or bool(frame_mask.all()):
                return super().forward(spectrogram.to(self.weight.dtype))
            return self._normalise_by_real_frames(spectrogram.to(self.weight.dtype), frame_mask)
        # Running statistics, in float32 whatever the weights' dtype: dB values span about 120 dB.
        return F.batch_norm(
            spectrogram.float(),
            self.running_mean.float(),
            self.running_var.float(),
            self.weight.float(),
            self.bias.float(),
            training=False,
            eps=self.eps,
        )

    def _normalise_by_real_frames(self, spectrogram: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """
        BatchNorm2d's training step with mean and variance over the real frames only, computed in float32 whatever
        the weights' dtype (sums over many frames overflow float16); the output has the weights' dtype.
        """
        real = frame_mask[:, None, None, :].float()
        count = real.sum()
        mean = (spectrogram.float() * real).sum(dim=(0, 2, 3)) / count
        centred = spectrogram.float() - mean[None, :, None, None]
        variance = (centred.square() * real).sum(dim=(0, 2, 3)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = variance * count / (count - 1).clamp(min=1)
            self.running_mean.copy_(self.running_mean.float().lerp(mean, factor))
            self.running_var.copy_(self.running_var.float().lerp(unbiased, factor))
        scale = self.weight.float() * torch.rsqrt(variance + self.eps)
        normalised = centred * scale[None, :, None, None] + self.bias.float()[None, :, None, None]
        return normalised.to(self.weight.dtype)


class DashengPatchEmbeddings(nn.Module):
    """Cuts a normalised spectrogram `(batch, mel bins, frames)` into tokens `(batch, num_tokens, hidden_size)`."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_stride)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        patches = self.proj(spectrogram.unsqueeze(1).to(self.proj.weight.dtype))  # (batch, hidden, 1, tokens)
        return patches.squeeze(2).transpose(1, 2).contiguous()


def is_exporting() -> bool:
    """True while `torch.export` (hence the ONNX exporter) or `torch.jit.trace` records the model."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting is not None and exporting()) or torch.jit.is_tracing()


class DashengPackedSequences:
    """
    The blocks' view of a batch: sequences of real tokens packed back to back along one axis, longest first.

    A sequence is what attention sees on its own: a chunk of one clip (inference), or the kept tokens of a chunk
    (pretraining). Per-token layers run on the packed `(total_tokens, hidden_size)` tensor, so padding costs nothing;
    attention runs per run of equal-length sequences (`groups`), or on all of them at once through `cu_seqlens`.

    Args:
        lengths: Tokens per sequence, non-increasing.
        clip_index, chunk_index: The clip and chunk of each sequence (where its attention weights are reported).
        token_index: `(total_tokens,)` flat index `clip * num_tokens + position` of each packed token in the
            `(batch_size, num_tokens)` source, or None when the packed order is the source's own order.
        batch_size, num_tokens: Shape of the source.
        chunk_num_tokens: Longest possible sequence (the attention span).
    """

    def __init__(
        self,
        lengths: list[int],
        clip_index: list[int],
        chunk_index: list[int],
        token_index: torch.Tensor | None,
        batch_size: int,
        num_tokens: int,
        chunk_num_tokens: int,
    ):
        self.lengths, self.clip_index, self.chunk_index = lengths, clip_index, chunk_index
        self.token_index = token_index
        self.batch_size, self.num_tokens, self.chunk_num_tokens = batch_size, num_tokens, chunk_num_tokens
        self.total_tokens = sum(lengths)
        self.key_padding_mask: torch.Tensor | None = None  # every packed token is real
        # (first sequence, number of sequences, length) of each run of equal lengths.
        self.groups: list[tuple[int, int, int]] = []
        for position, length in enumerate(lengths):
            if self.groups and self.groups[-1][2] == length:
                first, count, _ = self.groups[-1]
                self.groups[-1] = (first, count + 1, length)
            else:
                self.groups.append((position, 1, length))

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[tuple[int, int, torch.Tensor]],
        batch_size: int,
        num_tokens: int,
        chunk_num_tokens: int,
    ) -> DashengPackedSequences:
        """Pack `(clip, chunk, flat token indices)` per sequence, longest first (stable within a length)."""
        ordered = sorted(sequences, key=lambda sequence: -len(sequence[2]))
        return cls(
            [len(indices) for _, _, indices in ordered],
            [clip for clip, _, _ in ordered],
            [chunk for _, chunk, _ in ordered],
            torch.cat([indices for _, _, indices in ordered]),
            batch_size,
            num_tokens,
            chunk_num_tokens,
        )

    @classmethod
    def split_into_chunks(
        cls, valid_tokens: Sequence[int], num_tokens: int, chunk_num_tokens: int, device: torch.device
    ) -> DashengPackedSequences:
        """
        Chunks of each clip's first `valid_tokens[clip]` tokens: full chunks of `chunk_num_tokens`, the last one at
        its own length, as the original encodes a clip alone. Tokens past a clip's valid count are never packed.
        """
        spans = [
            (clip, chunk, clip * num_tokens + start, min(chunk_num_tokens, count - start))
            for clip, count in enumerate(valid_tokens)
            for chunk, start in enumerate(range(0, count, chunk_num_tokens))
        ]
        ordered = sorted(spans, key=lambda span: -span[3])
        starts = [span[2] for span in ordered]
        if sum(valid_tokens) == len(valid_tokens) * num_tokens and starts == sorted(starts):
            # Nothing padded and the chunks already longest first (one clip, or no short last chunk).
            lengths, clips, chunks = [span[3] for span in ordered], [s[0] for s in ordered], [s[1] for s in ordered]
            return cls(lengths, clips, chunks, None, len(valid_tokens), num_tokens, chunk_num_tokens)
        sequences = [
            (clip, chunk, torch.arange(start, start + length, device=device)) for clip, chunk, start, length in spans
        ]
        return cls.from_sequences(sequences, len(valid_tokens), num_tokens, chunk_num_tokens)

    def __len__(self) -> int:
        return len(self.lengths)

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_tokens, hidden)` to the packed real tokens `(total_tokens, hidden)`."""
        flat = tokens.reshape(self.batch_size * self.num_tokens, tokens.shape[-1])
        return flat if self.token_index is None else flat.index_select(0, self.token_index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed tokens `(total_tokens, hidden)` back to `(batch_size, num_tokens, hidden)`, zeros elsewhere."""
        if self.token_index is not None:
            flat = packed.new_zeros(self.batch_size * self.num_tokens, packed.shape[-1])
            packed = flat.index_copy(0, self.token_index, packed)
        return packed.reshape(self.batch_size, self.num_tokens, packed.shape[-1])

    def select(self, first: int, last: int) -> DashengPackedSequences:
        """Sequences `first:last` in packed order, for a pass of the blocks over part of the batch."""
        return DashengPackedSequences(
            self.lengths[first:last],
            self.clip_index[first:last],
            self.chunk_index[first:last],
            None,
            self.batch_size,
            self.num_tokens,
            self.chunk_num_tokens,
        )

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """Cumulative lengths `(num_sequences + 1,)` int32, as FlashAttention's variable-length kernels take them."""
        return F.pad(torch.tensor(self.lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)

    def sequence_of_tokens(self, device: torch.device) -> torch.Tensor:
        """`(total_tokens,)` index of the sequence each packed token belongs to."""
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def attention_weights_buffer(self, num_heads: int, like: torch.Tensor) -> torch.Tensor:
        """Zeros `(batch_size, num_chunks, num_heads, chunk, chunk)` to hold one block's attention weights."""
        num_chunks = -(-self.num_tokens // self.chunk_num_tokens)
        chunk = self.chunk_num_tokens
        return like.new_zeros(self.batch_size, num_chunks, num_heads, chunk, chunk)


class DashengChunkedSequences(DashengPackedSequences):
    """
    The export layout of a batch: every clip cut into `ceil(num_tokens / length)` chunks of exactly `length` tokens
    (padding included) with a key-padding mask, so that no shape depends on the data. `length` is `chunk_num_tokens`,
    or with `trim_short` `min(num_tokens, chunk_num_tokens)`, which spares a batch of short clips the padding to a
    whole chunk (the ONNX exporter accepts the resulting shape formulas; `torch.export`'s guards do not).

    A real token attends only to the real tokens of its chunk, which is what the padding-free layout computes; padded
    tokens are computed too and zeroed by `unpack`. `torch.export` and the ONNX exporter trace this layout.

    Args:
        valid_tokens: `(batch_size,)` int64 tokens of real audio per clip.
        batch_size, num_tokens: Shape of the source `(batch_size, num_tokens, hidden)`.
        chunk_num_tokens: Longest chunk (the attention span).
        trim_short: Chunks of `min(num_tokens, chunk_num_tokens)` tokens.
    """

    def __init__(
        self,
        valid_tokens: torch.Tensor,
        batch_size: int,
        num_tokens: int,
        chunk_num_tokens: int,
        trim_short: bool = False,
    ):
        self.batch_size, self.num_tokens = batch_size, num_tokens
        length = torch.sym_min(num_tokens, chunk_num_tokens) if trim_short else chunk_num_tokens
        self.chunk_num_tokens = length
        self.num_chunks = (num_tokens + length - 1) // length
        self.padded_tokens = self.num_chunks * length
        device = valid_tokens.device
        self.real = torch.arange(num_tokens, device=device)[None, :] < valid_tokens[:, None]  # (batch, num_tokens)
        # Built per sequence rather than reshaped from `real`: a reshape would make the exporter guard on sizes.
        sequence = torch.arange(batch_size * self.num_chunks, device=device)
        num_chunks = torch.scalar_tensor(self.num_chunks, dtype=torch.long, device=device)  # tensor arithmetic: ONNX
        clip = torch.div(sequence, num_chunks, rounding_mode="floor")
        first = (sequence - clip * num_chunks) * torch.scalar_tensor(length, dtype=torch.long, device=device)
        self.key_padding_mask = torch.arange(length, device=device)[None, :] < (valid_tokens[clip] - first)[:, None]
        self.token_index = None
        self.total_tokens = batch_size * self.padded_tokens
        self.groups = [(0, batch_size * self.num_chunks, length)]

    def __len__(self) -> int:
        raise TypeError("DashengChunkedSequences has a symbolic number of sequences; use num_chunks * batch_size.")

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_tokens, hidden)` to `(batch_size * padded_tokens, hidden)`, each clip padded at its end."""
        # A gather, not F.pad: no shape comparison for the exporter to guard on; the padding repeats the last token.
        source = torch.arange(self.padded_tokens, device=tokens.device).clamp(max=self.num_tokens - 1)
        return tokens.index_select(1, source).reshape(-1, tokens.shape[-1])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(batch_size * padded_tokens, hidden)` to `(batch_size, num_tokens, hidden)`, zeros at padding."""
        tokens = packed.reshape(-1, self.padded_tokens, packed.shape[-1])
        tokens = tokens.index_select(1, torch.arange(self.num_tokens, device=packed.device))
        return torch.where(self.real[..., None], tokens, torch.zeros((), dtype=packed.dtype))


def attention_bias(key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """
    Additive `(sequences, 1, 1, length)` mask from a key-padding mask (True = real key): 0 or the dtype's lowest
    value, which keeps a sequence with no real key finite (uniform weights) where -inf would give NaN.
    """
    if key_padding_mask is None:
        return None
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(~key_padding_mask, torch.finfo(dtype).min)[:, None, None, :]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Softmax attention in plain PyTorch, as in Transformers' attention interface.

    Args:
        query, key, value: `(sequences, heads, length, head_dim)`.
        attention_mask: Additive `(sequences, 1, length, length)` float mask, or None (Dasheng never needs one).
    Returns:
        The attended values `(sequences, length, heads, head_dim)` and the weights `(sequences, heads, length, length)`.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1)  # PyTorch's softmax kernels accumulate bf16/fp16 inputs in float32
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), weights


def _is_cpu_bf16_training(module: nn.Module, query: torch.Tensor) -> bool:
    # Training mode, not `requires_grad`: a reentrant checkpoint's forward (no grad) and recompute use one kernel.
    return module.training and query.device.type == "cpu" and query.dtype == torch.bfloat16


class DashengSelfAttention(nn.Module):
    """
    Multi-head self-attention within each packed sequence, with the original fused `qkv` projection.

    The kernel is `config._attn_implementation` through Transformers' `ALL_ATTENTION_FUNCTIONS` (`eager`, `sdpa`,
    `flex_attention`, `flash_attention_2/3`, Hub kernels), switchable with `model.set_attn_implementation(...)`.
    One exception: `sdpa` in training mode on CPU with bf16 inputs (bf16 mixed-precision training) runs the eager
    kernel: there PyTorch's CPU flash-attention backward is 1.5-4x slower at Dasheng's sequence lengths
    (`benchmarks/pretrain_speed.py`; measured with AVX512-BF16; float16 keeps SDPA, which is faster for it).
    """

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_probs_dropout_prob)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        sequences: DashengPackedSequences,
        attention_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: Packed tokens `(total_tokens, hidden_size)`.
            sequences: How the tokens are packed.
            attention_weights: If given, a `(batch, chunks, heads, chunk, chunk)` buffer that receives the weights,
                computed eagerly; the output is computed from the buffer, so gradients reach it.
        Returns:
            `(total_tokens, hidden_size)`.
        """
        qkv = self.qkv(hidden_states).view(-1, 3, self.num_heads, self.head_dim)
        if attention_weights is not None:
            context = self._attend_with_weights(qkv, sequences, attention_weights)
        elif "flash" in self.config._attn_implementation and sequences.key_padding_mask is None:
            context = self._attend_variable_length(qkv, sequences)
        else:
            context = self._attend_by_length(qkv, sequences)
        return self.proj_drop(self.proj(context.reshape(hidden_states.shape)))

    def _attention_function(self, query: torch.Tensor, masked: bool = False):
        implementation = self.config._attn_implementation
        if implementation == "eager" or (implementation == "sdpa" and _is_cpu_bf16_training(self, query)):
            return eager_attention_forward
        if masked and implementation != "sdpa":  # the export layout's additive mask: eager and SDPA take it
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # Transformers 5
            return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

    @staticmethod
    def _split_heads(qkv: torch.Tensor, sequences: int, length: int) -> tuple[torch.Tensor, ...]:
        """Packed `(sequences * length, 3, heads, head_dim)` to query, key, value `(sequences, heads, length, dim)`."""
        return qkv.view(-1, length, *qkv.shape[1:]).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend_by_length(self, qkv: torch.Tensor, sequences: DashengPackedSequences) -> torch.Tensor:
        """One batched call per run of equal-length sequences: no padding, no mask (a key-padding mask for export)."""
        masked = sequences.key_padding_mask is not None
        attention, dropout = self._attention_function(qkv, masked), self.attn_drop.p if self.training else 0.0
        mask = attention_bias(sequences.key_padding_mask, qkv.dtype)
        outputs, offset = [], 0
        for _, count, length in sequences.groups:
            query, key, value = self._split_heads(qkv[offset : offset + count * length], count, length)
            output, _ = attention(self, query, key, value, mask, dropout=dropout, scaling=self.scaling)
            outputs.append(output.reshape(count * length, -1))
            offset += count * length
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _attend_variable_length(self, qkv: torch.Tensor, sequences: DashengPackedSequences) -> torch.Tensor:
        """All sequences in one FlashAttention call through its variable-length entry (`cu_seqlens`)."""
        query, key, value = self._split_heads(qkv, 1, qkv.shape[0])
        cu_seqlens = sequences.cu_seqlens(qkv.device)
        longest = max(sequences.lengths)
        output, _ = self._attention_function(query)(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attn_drop.p if self.training else 0.0,
            scaling=self.scaling,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=longest,
            max_length_k=longest,
        )
        return output.reshape(qkv.shape[0], -1)

    def _attend_with_weights(
        self, qkv: torch.Tensor, sequences: DashengPackedSequences, attention_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager attention that writes each sequence's weights to its `(clip, chunk)` slot and reads them back."""
        offsets, offset = [], 0
        for first, count, length in sequences.groups:
            query, key, value = self._split_heads(qkv[offset : offset + count * length], count, length)
            _, weights = eager_attention_forward(self, query, key, value, None, scaling=self.scaling)
            clips, chunks = self._slots(sequences, first, count, qkv.device)
            attention_weights[clips, chunks, :, :length, :length] = weights
            offsets.append(offset)
            offset += count * length
        outputs = []
        for (first, count, length), offset in zip(sequences.groups, offsets):
            _, _, value = self._split_heads(qkv[offset : offset + count * length], count, length)
            clips, chunks = self._slots(sequences, first, count, qkv.device)
            weights = self.attn_drop(attention_weights[clips, chunks, :, :length, :length])
            outputs.append(torch.matmul(weights, value).transpose(1, 2).reshape(count * length, -1))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @staticmethod
    def _slots(sequences: DashengPackedSequences, first: int, count: int, device: torch.device):
        clips = torch.tensor(sequences.clip_index[first : first + count], device=device)
        chunks = torch.tensor(sequences.chunk_index[first : first + count], device=device)
        return clips, chunks


class DashengMLP(nn.Module):
    """Two-layer MLP with exact GELU: hidden_size -> intermediate_size -> hidden_size."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(hidden_states)))))


class DashengDropPath(nn.Module):
    """Stochastic depth: drops the residual branch of a whole sequence with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor, sequences: DashengPackedSequences) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        kept_sequences = hidden_states.new_empty(len(sequences)).bernoulli_(keep)
        return hidden_states * (kept_sequences[sequences.sequence_of_tokens(hidden_states.device)] / keep)[:, None]

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class DashengLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block on packed tokens: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: DashengConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = DashengSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DashengMLP(config)
        self.drop_path = DashengDropPath(drop_path)

    def forward(
        self,
        hidden_states: torch.Tensor,
        sequences: DashengPackedSequences,
        attention_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(total_tokens, hidden_size)` to `(total_tokens, hidden_size)`; see `DashengSelfAttention.forward`."""
        attended = self.attn(self.norm1(hidden_states), sequences, attention_weights)
        hidden_states = hidden_states + self.drop_path(attended, sequences)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)), sequences)


def run_blocks(
    blocks: nn.ModuleList,
    hidden_states: torch.Tensor,
    sequences: DashengPackedSequences,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
    """
    Packed tokens `(total_tokens, hidden)` through `blocks` (encoder or decoder).

    Returns the output, the per-layer states (input and each block's output, as `(batch, tokens, hidden)`) and the
    attention weights when asked. The returned states and weights are the tensors the next block reads, so gradients
    reach them (`retain_grad()` works).
    """
    states = [] if output_hidden_states else None
    weights = []
    for block in blocks:
        if states is not None:
            states.append(sequences.unpack(hidden_states))
            hidden_states = sequences.pack(states[-1])
        buffer = None
        if output_attentions:
            buffer = sequences.attention_weights_buffer(block.attn.num_heads, hidden_states)
            weights.append(buffer)
        hidden_states = block(hidden_states, sequences, buffer)
    if states is not None:
        states.append(sequences.unpack(hidden_states))
        hidden_states = sequences.pack(states[-1])
    return hidden_states, None if states is None else tuple(states), tuple(weights) if output_attentions else None


def encode_in_fixed_chunks(
    blocks: nn.ModuleList,
    norm: nn.Module,
    tokens: torch.Tensor,
    valid_tokens: torch.Tensor | None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
) -> BaseModelOutputWithPooling:
    """
    The encoder's blocks, final norm and mean pooling for `torch.export` and ONNX, where no shape may depend on the
    data: tokens `(batch, num_tokens, hidden)` in fixed chunks with a key-padding mask (`DashengChunkedSequences`),
    so each real token attends to the same tokens as in the padding-free layout and the outputs are the same.
    `valid_tokens` `(batch,)` counts each clip's real tokens (None: all are real).
    """
    if output_attentions:
        raise ValueError("output_attentions=True cannot be exported: export the model without it.")
    batch, num_tokens, _ = tokens.shape
    if valid_tokens is None:
        valid_tokens = torch.full((batch,), num_tokens, dtype=torch.long, device=tokens.device)
    chunk_num_tokens = blocks[0].attn.config.chunk_num_tokens
    trim = torch.onnx.is_in_onnx_export()  # short batches: chunks only as long as the batch
    sequences = DashengChunkedSequences(valid_tokens, batch, num_tokens, chunk_num_tokens, trim_short=trim)
    hidden_states, all_states, _ = run_blocks(blocks, sequences.pack(tokens), sequences, False, output_hidden_states)
    last_hidden_state = sequences.unpack(norm(hidden_states))
    pooled = last_hidden_state.sum(dim=1) / valid_tokens.clamp(min=1).to(last_hidden_state.dtype)[:, None]
    return BaseModelOutputWithPooling(
        last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states
    )
