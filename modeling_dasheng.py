"""PyTorch Dasheng: a masked-autoencoder audio encoder (Interspeech 2024) and its audio classifier.

Where things happen:
- the spectrogram: `DashengFeatureExtractor` (feature_extraction_dasheng.py); here it is normalised per mel bin
  (`DashengSpectrogramBatchNorm`) and cut into 40 ms patches (`DashengPatchEmbeddings`);
- chunks: `DashengEncoder.forward` splits the tokens into chunks of `config.chunk_num_tokens` (252 = 10.08 s) that
  the blocks see independently, the last one at its own shorter length;
- attention masking: `DashengEncoder._attention_mask` turns the per-token padding mask into the key mask that
  `DashengSelfAttention` applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.pipelines.audio_classification import AudioClassificationPipeline
from transformers.utils import logging

from .configuration_dasheng import DashengConfig, copy_code_files
from .feature_extraction_dasheng import DashengFeatureExtractor

__all__ = [
    "DashengAudioClassificationPipeline",
    "DashengEncoder",
    "DashengForAudioClassification",
    "DashengModel",
    "DashengModelOutput",
    "DashengPreTrainedModel",
]

logger = logging.get_logger(__name__)


@dataclass
class DashengModelOutput(BaseModelOutputWithPooling):
    """
    Output of [`DashengModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
            Token embeddings after the final LayerNorm, one per 40 ms (25 Hz); padded tokens are zeros.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Mean of the valid tokens of each clip.
        hidden_states (`torch.FloatTensor` or `tuple(torch.FloatTensor)`):
            `last_hidden_state` itself unless `output_hidden_states=True`; then the embeddings and each block's
            output, each `(batch_size, num_tokens, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Per block, `(batch_size, num_chunks, num_heads, chunk_num_tokens, chunk_num_tokens)`; the last chunk is
            zero-padded and padded tokens are masked (zeros).
        logits (`torch.FloatTensor` of shape `(batch_size, hidden_size)` or `(batch_size, outputdim)`):
            `pooler_output` without a head; with `config.outputdim`, the head's output before any sigmoid.
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `config.loss` of the head's logits against `labels`.
    """

    logits: torch.FloatTensor | None = None
    loss: torch.FloatTensor | None = None


class DashengSpectrogramBatchNorm(nn.BatchNorm2d):
    """BatchNorm over mel bins of `(batch, mel bins, 1, frames)` that uses its running statistics by default."""

    def __init__(self, config: DashengConfig):
        super().__init__(config.num_mel_bins, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        self.use_batch_statistics = config.use_batch_statistics

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        if self.training and self.use_batch_statistics and self.weight.requires_grad:
            # The original's training behaviour: normalise by, and update, batch statistics (not when frozen).
            return super().forward(spectrogram.to(self.weight.dtype))
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


class DashengPatchEmbeddings(nn.Module):
    """Cuts a normalised spectrogram `(batch, mel bins, frames)` into tokens `(batch, num_tokens, hidden_size)`."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_stride)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        patches = self.proj(spectrogram.unsqueeze(1).to(self.proj.weight.dtype))  # (batch, hidden, 1, tokens)
        return patches.flatten(2).transpose(1, 2).contiguous()


class DashengSelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; eager or SDPA by `config._attn_implementation`."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_probs_dropout_prob)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: `(sequences, length, hidden_size)`.
            attention_mask: `(sequences, 1, 1, length)` bool, True for keys that may be attended to.
        Returns:
            The attended tokens `(sequences, length, hidden_size)` and, if asked, the weights
            `(sequences, heads, length, length)`.
        """
        sequences, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(sequences, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attn_drop.p if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = (query @ key.transpose(-2, -1)) * self.scale
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=-1)
            context = self.attn_drop(weights) @ value
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=self.scale
            )
        context = context.transpose(1, 2).reshape(sequences, length, width)
        return self.proj_drop(self.proj(context)), weights if output_attentions else None


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
    """Stochastic depth: drops the whole residual branch of a sequence with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        return hidden_states * hidden_states.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class DashengLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: DashengConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = DashengSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DashengMLP(config)
        self.drop_path = DashengDropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(hidden_states), attention_mask, output_attentions)
        hidden_states = hidden_states + self.drop_path(attended)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, weights


class DashengEncoder(nn.Module):
    """
    The original Dasheng encoder, with its parameter names: spectrogram BatchNorm (`init_bn`), patch embedding,
    time and frequency position embeddings, transformer `blocks` and the final `norm`.
    """

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.config = config
        self.chunk_num_tokens = config.chunk_num_tokens
        # (batch, mel, frames) -> (batch, mel, 1, frames) -> BatchNorm2d over mel bins -> (batch, mel, frames).
        self.init_bn = nn.Sequential(
            nn.Unflatten(1, (config.num_mel_bins, 1)), DashengSpectrogramBatchNorm(config), nn.Flatten(1, 2)
        )
        self.patch_embed = DashengPatchEmbeddings(config)
        self.time_pos_embed = nn.Parameter(torch.empty(1, config.hidden_size, 1, self.chunk_num_tokens))
        self.freq_pos_embed = nn.Parameter(torch.empty(1, config.hidden_size, 1, 1))
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(DashengLayer(config, rate) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, input_values: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, mel bins, frames)` to tokens `(batch, num_tokens, hidden_size)` with positions."""
        tokens = self.patch_embed(self.init_bn(input_values))
        tokens = tokens.to(torch.promote_types(tokens.dtype, self.time_pos_embed.dtype))  # fp32 under autocast
        # Positions restart at every chunk: token i has time position i % chunk_num_tokens.
        positions = torch.arange(tokens.shape[1], device=tokens.device) % self.chunk_num_tokens
        return tokens.add_(self.time_pos_embed[0, :, 0, :].T[positions]).add_(self.freq_pos_embed[0, :, 0, 0])

    def forward(
        self,
        input_values: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """
        Args:
            input_values: Log-mel spectrogram `(batch, mel bins, frames)`.
            token_mask: `(batch, num_tokens)` bool, True for tokens of real audio; None if nothing is padded.
        Returns:
            `(last_hidden_state, hidden_states, attentions)`: `(batch, num_tokens, hidden_size)` after the final
            LayerNorm with padded tokens zeroed; per-layer tuples when asked for, else None.
        """
        tokens = self.pos_drop(self.embed(input_values))
        if token_mask is not None:
            tokens = torch.where(token_mask[..., None], tokens, 0.0)
        batch, num_tokens, width = tokens.shape
        chunk = self.chunk_num_tokens
        num_full = num_tokens // chunk
        tail = num_tokens - num_full * chunk
        # Chunks: all full ones stacked as sequences of `chunk` tokens, then the tail chunk at its own length.
        groups = []
        if num_full:
            full = tokens[:, : num_full * chunk].reshape(batch * num_full, chunk, width)
            full_mask = None if token_mask is None else token_mask[:, : num_full * chunk].reshape(-1, chunk)
            groups.append((full, full_mask))
        if tail:
            groups.append((tokens[:, num_full * chunk :], None if token_mask is None else token_mask[:, -tail:]))
        results = [self._run_blocks(x, mask, output_attentions, output_hidden_states) for x, mask in groups]

        def merge(per_group: list[torch.Tensor]) -> torch.Tensor:
            parts = [part.reshape(batch, -1, width) for part in per_group]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        last_hidden_state = merge([result[0] for result in results])
        hidden_states = attentions = None
        if output_hidden_states:
            hidden_states = tuple(merge(layer) for layer in zip(*(result[1] for result in results)))
        if output_attentions:
            attentions = tuple(
                self._merge_attentions(layer, batch) for layer in zip(*(result[2] for result in results))
            )
        if token_mask is not None:
            keep = token_mask[..., None]
            last_hidden_state = torch.where(keep, last_hidden_state, 0.0)
            if hidden_states is not None:
                hidden_states = tuple(torch.where(keep, state, 0.0) for state in hidden_states)
            if attentions is not None:
                query_keep = self._chunked_token_mask(token_mask, batch)[:, :, None, :, None]
                attentions = tuple(torch.where(query_keep, weights, 0.0) for weights in attentions)
        return last_hidden_state, hidden_states, attentions

    @staticmethod
    def _attention_mask(token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """
        Key mask `(sequences, 1, 1, length)` from a token mask `(sequences, length)`; None when nothing is padded.

        A sequence without any real token (a chunk of pure padding) may attend to all of its tokens: its outputs
        are discarded, and this keeps them and their gradients finite.
        """
        if token_mask is None or bool(token_mask.all()):
            return None
        key_mask = token_mask | ~token_mask.any(dim=-1, keepdim=True)
        return key_mask[:, None, None, :]

    def _run_blocks(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Blocks and final norm over sequences of equal length `(sequences, length, hidden_size)`."""
        sequences = hidden_states.shape[0]
        step = sequences if torch.is_grad_enabled() else max(1, self.config.max_chunks_per_pass)
        if step >= sequences:
            return self._blocks_pass(hidden_states, token_mask, output_attentions, output_hidden_states)
        # Without gradients, sequences go through in slices to bound the memory of hours-long inputs; each slice's
        # output replaces its input (the encoder's own tensor) unless the inputs are returned as hidden states.
        output = None
        all_states, all_weights = [], []
        for start in range(0, sequences, step):
            normed, states, weights = self._blocks_pass(
                hidden_states[start : start + step],
                None if token_mask is None else token_mask[start : start + step],
                output_attentions,
                output_hidden_states,
            )
            if output is None:
                reuse = not output_hidden_states and normed.dtype == hidden_states.dtype
                output = hidden_states if reuse else normed.new_empty(hidden_states.shape)
            output[start : start + step] = normed
            all_states.append(states)
            all_weights.append(weights)
        # Per layer, the slices put back together.
        return (
            output,
            [torch.cat(layer) for layer in zip(*all_states)],
            [torch.cat(layer) for layer in zip(*all_weights)],
        )

    def _blocks_pass(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One pass through all blocks: `(normed output, per-layer states if asked, per-layer weights if asked)`."""
        mask = self._attention_mask(token_mask)
        layer_states, layer_weights = [hidden_states], []
        for block in self.blocks:
            hidden_states, weights = block(hidden_states, mask, output_attentions)
            layer_states.append(hidden_states)
            layer_weights.append(weights)
        return (
            self.norm(hidden_states),
            layer_states if output_hidden_states else [],
            layer_weights if output_attentions else [],
        )

    def _merge_attentions(self, per_group: tuple[torch.Tensor, ...], batch: int) -> torch.Tensor:
        """Attention weights of the chunk groups as `(batch, chunks, heads, chunk, chunk)`, the tail zero-padded."""
        chunk = self.chunk_num_tokens
        parts = []
        for weights in per_group:
            length = weights.shape[-1]
            weights = F.pad(weights, (0, chunk - length, 0, chunk - length))
            parts.append(weights.reshape(batch, -1, *weights.shape[1:]))
        return torch.cat(parts, dim=1)

    def _chunked_token_mask(self, token_mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Token mask `(batch, num_tokens)` as `(batch, chunks, chunk)`, the tail padded with False."""
        chunk = self.chunk_num_tokens
        padded = F.pad(token_mask, (0, -token_mask.shape[1] % chunk), value=False)
        return padded.reshape(batch, -1, chunk)


class DashengClassificationHead(nn.Sequential):
    """The original head: LayerNorm then Linear on the pooled embedding (`outputlayer.0`, `outputlayer.1`)."""

    def __init__(self, config: DashengConfig, num_outputs: int):
        super().__init__(
            nn.LayerNorm(config.hidden_size, eps=config.head_layer_norm_eps), nn.Linear(config.hidden_size, num_outputs)
        )


class DashengPreTrainedModel(PreTrainedModel):
    """Weight initialisation, saving and the helpers shared by the Dasheng models."""

    config_class = DashengConfig
    base_model_prefix = "dasheng"
    main_input_name = "input_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DashengLayer"]
    _keep_in_fp32_modules = ["init_bn"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
            nn.init.zeros_(module.num_batches_tracked)
        elif isinstance(module, DashengEncoder):
            nn.init.trunc_normal_(module.time_pos_embed, std=std)
            nn.init.trunc_normal_(module.freq_pos_embed, std=std)

    def num_valid_tokens(self, attention_mask: torch.Tensor | None, num_frames: int | None = None) -> torch.Tensor:
        """
        Number of tokens (40 ms each) that cover real audio in each clip.

        Args:
            attention_mask: `(batch, frames)` frame mask from the feature extractor, or None for unpadded input.
            num_frames: Frames of the input when `attention_mask` is None.
        Returns:
            `(batch,)` int64; token i of a clip is valid iff its last frame `4 * i + 3` is a real frame.
        """
        if attention_mask is None:
            if num_frames is None:
                raise ValueError("Pass an attention_mask or num_frames.")
            frames = torch.tensor([num_frames])
        else:
            frames = attention_mask.sum(dim=-1)
        return self._frames_to_tokens(frames)

    def _frames_to_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Tokens fully covered by `frames` frames: (frames - 4) // 4 + 1 at the defaults, at least 0."""
        width, stride = self.config.patch_size[1], self.config.patch_stride[1]
        return torch.div(frames - width, stride, rounding_mode="floor").clamp(min=-1) + 1

    def _encode(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None, tuple | None]:
        """Validate the inputs, run the encoder and pool: `(last_hidden_state, pooled, hidden_states, attentions)`."""
        self._check_inputs(input_values, attention_mask)
        token_mask = None
        if attention_mask is not None:
            num_tokens = int(self._frames_to_tokens(torch.tensor(input_values.shape[-1])))
            valid = self.num_valid_tokens(attention_mask)
            token_mask = torch.arange(num_tokens, device=valid.device)[None, :] < valid[:, None]
            if bool(token_mask.all()):
                token_mask = None
        last_hidden_state, hidden_states, attentions = self.encoder(
            input_values, token_mask, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        if token_mask is None:
            pooled = last_hidden_state.mean(dim=1)
        else:
            count = token_mask.sum(dim=1, keepdim=True).to(last_hidden_state.dtype)
            pooled = last_hidden_state.sum(dim=1) / count
        return last_hidden_state, pooled, hidden_states, attentions

    def _check_inputs(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        mel_bins, width = self.config.num_mel_bins, self.config.patch_size[1]
        if not isinstance(input_values, torch.Tensor) or input_values.ndim != 3 or input_values.shape[1] != mel_bins:
            shape = tuple(input_values.shape) if hasattr(input_values, "shape") else type(input_values).__name__
            hint = "Compute them with DashengFeatureExtractor."
            if hasattr(input_values, "ndim") and input_values.ndim <= 2:
                hint = "This looks like a waveform: run it through DashengFeatureExtractor first."
            elif hasattr(input_values, "ndim") and input_values.ndim == 3 and input_values.shape[2] == mel_bins:
                hint = "The last two axes look swapped: pass (batch, mel bins, frames)."
            raise ValueError(
                f"input_values must be log-mel features of shape (batch, {mel_bins}, frames), got {shape}. {hint}"
            )
        if input_values.shape[-1] < width:
            raise ValueError(
                f"input_values has {input_values.shape[-1]} frames; Dasheng needs at least {width} "
                f"(480 samples at 16 kHz)."
            )
        if attention_mask is None:
            return
        if attention_mask.shape != (input_values.shape[0], input_values.shape[-1]):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_values {tuple(input_values.shape)} "
                f"needs one of shape {(input_values.shape[0], input_values.shape[-1])} (batch, frames): pass the mask "
                f"the feature extractor returned with these features."
            )
        mask = attention_mask.long()
        if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask must hold 1 for real frames followed by 0 for padding (right padding), as "
                "DashengFeatureExtractor returns it."
            )
        if bool((mask.sum(dim=-1) < width).any()):
            raise ValueError(f"Every clip needs at least {width} real frames in attention_mask (480 samples).")

    def freeze_encoder(self) -> None:
        """Stop gradients to the whole encoder (for linear probing); the head, if any, stays trainable."""
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)

    def freeze_feature_encoder(self) -> None:
        """
        Stop gradients to the spectrogram BatchNorm and the patch embedding (Dasheng's counterpart of wav2vec2's
        convolutional feature encoder); the blocks and the head stay trainable.
        """
        for module in (self.encoder.init_bn, self.encoder.patch_embed):
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding: its output `(batch, tokens, hidden_size)` is the blocks' input."""
        return self.encoder.patch_embed

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True, **kwargs: Any
    ) -> None:
        """
        Save weights and config, plus the three code files and a `preprocessor_config.json` if none is there, so
        the folder loads with every Auto class and `trust_remote_code=True`. `push_to_hub=True` uploads all of it.
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_keys = ("repo_id", "commit_message", "private", "token", "create_pr", "revision", "commit_description")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        copy_code_files(save_directory)
        if not (Path(save_directory) / "preprocessor_config.json").exists():
            DashengFeatureExtractor.from_dasheng_config(self.config).save_pretrained(save_directory)
        if push_to_hub:  # `push_to_hub` saves afresh into a temporary folder through this method, extras included
            self.push_to_hub(hub_kwargs.pop("repo_id", Path(save_directory).name), **hub_kwargs)


class DashengModel(DashengPreTrainedModel):
    """
    Dasheng encoder: log-mel features to 25 Hz token embeddings and their mean.

    With `config.outputdim` set it also carries the original LayerNorm + Linear head (`outputlayer`), whose
    pre-sigmoid output becomes `logits`; `labels` then give a `loss` (`config.loss`).
    """

    def __init__(self, config: DashengConfig):
        super().__init__(config)
        self.encoder = DashengEncoder(config)
        self.outputlayer = DashengClassificationHead(config, config.outputdim) if config.outputdim else None
        self.post_init()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DashengModelOutput | tuple:
        """
        Args:
            input_values: Log-mel features `(batch, 64, frames)` from [`DashengFeatureExtractor`].
            attention_mask: `(batch, frames)`, 1 for real frames and 0 for padding.
            labels: With a head: class indices `(batch,)` or multi-hot targets `(batch, outputdim)`.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        last_hidden_state, pooled, hidden_states, attentions = self._encode(
            input_values, attention_mask, output_attentions, output_hidden_states
        )
        logits = pooled if self.outputlayer is None else self.outputlayer(pooled)
        loss = None
        if labels is not None:
            if self.outputlayer is None:
                raise ValueError("labels need a head: load the model with `outputdim=NUM_CLASSES`.")
            loss = self._head_loss(logits, labels)
        output = DashengModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=hidden_states if output_hidden_states else last_hidden_state,
            attentions=attentions,
            logits=logits,
            loss=loss,
        )
        return output if return_dict else output.to_tuple()

    def _head_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.config.loss == "CrossEntropyLoss":
            if labels.ndim == 1:
                return F.cross_entropy(logits.float(), labels.long())
            return F.cross_entropy(logits.float(), labels.float())
        if self.config.loss != "BCELoss":
            raise ValueError(f"config.loss must be 'BCELoss' or 'CrossEntropyLoss', got {self.config.loss!r}.")
        if labels.ndim == 1:  # class indices with a multi-label loss: one-hot targets
            labels = F.one_hot(labels.long(), logits.shape[-1])
        # BCELoss on sigmoid(logits), computed stably from the logits.
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class DashengForAudioClassification(DashengPreTrainedModel):
    """Dasheng encoder, masked mean pooling and a LayerNorm + Linear head (`outputlayer`) with `num_labels` outputs."""

    def __init__(self, config: DashengConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = DashengEncoder(config)
        self.outputlayer = DashengClassificationHead(config, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """
        Args:
            input_values: Log-mel features `(batch, 64, frames)` from [`DashengFeatureExtractor`].
            attention_mask: `(batch, frames)`, 1 for real frames and 0 for padding.
            labels: Class indices `(batch,)` (single label), multi-hot `(batch, num_labels)` (multi-label), or
                values (regression), as `config.problem_type` says or is inferred from them.
        Returns:
            [`SequenceClassifierOutput`] with `logits` `(batch, num_labels)` before softmax or sigmoid.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _, pooled, hidden_states, attentions = self._encode(
            input_values, attention_mask, output_attentions, output_hidden_states
        )
        logits = self.outputlayer(pooled)
        loss = None if labels is None else self._classification_loss(logits, labels)
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class DashengAudioClassificationPipeline(AudioClassificationPipeline):
    """
    Audio classification pipeline that batches clips of different lengths (`batch_size > 1`).

    Transformers' default collation pads axis 1, which for Dasheng's `(1, mel bins, frames)` features is the mel
    axis; this pipeline pads frames instead and always passes the frame mask.
    """

    def _sanitize_parameters(self, top_k: int | None = None, function_to_apply: str | None = None, **kwargs: Any):
        preprocess, forward, postprocess = super()._sanitize_parameters(
            top_k=top_k, function_to_apply=function_to_apply, **kwargs
        )
        if function_to_apply is None:
            problem_type = getattr(self.model.config, "problem_type", None)
            postprocess["function_to_apply"] = {"multi_label_classification": "sigmoid", "regression": "none"}.get(
                problem_type, "softmax"
            )
        return preprocess, forward, postprocess

    def preprocess(self, inputs: Any) -> dict[str, torch.Tensor]:
        processed = super().preprocess(inputs)
        features = processed["input_values"]
        if "attention_mask" not in processed:
            processed["attention_mask"] = torch.ones(features.shape[0], features.shape[-1], dtype=torch.int32)
        # (1, mel, frames) -> (1, frames, mel) so the pipeline's collation pads frames.
        processed["input_values"] = features.transpose(1, 2)
        return processed

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> SequenceClassifierOutput | DashengModelOutput:
        model_inputs = dict(model_inputs)
        model_inputs["input_values"] = model_inputs["input_values"].transpose(1, 2)
        return self.model(**model_inputs)


DashengModel.register_for_auto_class("AutoModel")
DashengForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
