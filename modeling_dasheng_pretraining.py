"""PyTorch Dasheng masked-autoencoder pretraining: the encoder of `modeling_dasheng.py` plus the original decoder.

Where things happen (`DashengForPreTraining.forward`):
- tokens: `DashengEncoder.embed` (spectrogram BatchNorm, patches, positions); inputs longer than a chunk (252 tokens)
  are cut into chunks that become separate sequences, as at inference;
- masking: `DashengGroupMasking` picks the visible tokens of each sequence (the original's group masking);
- blocks: every transformer block, the encoder's on the visible tokens and the decoder's on all tokens, runs in
  `DashengForPreTraining._run_stack`;
- loss: `DashengForPreTraining._reconstruction_loss`, on the dB mel patches before BatchNorm, removed tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, logging

from .configuration_dasheng import DashengConfig

# Transformers 4.57 copies only a remote-code file's direct relative imports into its module cache, and
# modeling_dasheng needs this one (and modeling_dasheng_layers, imported below).
from .feature_extraction_dasheng import DashengFeatureExtractor  # noqa: F401
from .modeling_dasheng import DashengEncoder, DashengPreTrainedModel
from .modeling_dasheng_layers import DashengLayer, DashengPackedSequences, run_blocks

__all__ = ["DashengDecoder", "DashengForPreTraining", "DashengForPreTrainingOutput", "DashengGroupMasking"]

logger = logging.get_logger(__name__)


@dataclass
class DashengForPreTrainingOutput(ModelOutput):
    """
    Output of [`DashengForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean squared error between predicted and target patches over the removed tokens of real audio (float32).
        logits (`torch.FloatTensor` of shape `(batch_size, num_tokens, 256)`):
            Predicted patches, 64 mel bins x 4 frames each, flattened as `mel_bin * 4 + frame`; zeros at padding.
        mask (`torch.FloatTensor` of shape `(batch_size, num_tokens)`):
            1 for tokens hidden from the encoder (removed, and padding), 0 for visible ones.
        ids_restore (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            Per chunk of `config.chunk_num_tokens` tokens, the place of each token in the chunk's shuffled order
            (visible tokens first); for inputs of at most one chunk, as in `ViTMAEForPreTraining`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The encoder's visible-token embeddings and each block's output, `(sequences, visible, hidden_size)`: one
            sequence per chunk of real audio, the visible tokens in shuffled order, padded with zeros.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The encoder's attention weights per block, `(sequences, heads, visible, visible)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class _DerivedConfig:
    """A config with some fields replaced; all others (the attention implementation included) are read live."""

    def __init__(self, parent: DashengConfig, **overrides: Any):
        self._parent = parent
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        if name == "_parent" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._parent, name)


class _SequencePacking(DashengPackedSequences):
    """
    The packing of `DashengForPreTraining`'s stacks, where each sequence is a batch row of one chunk: a block's
    attention weights are kept as `(sequences, heads, length, length)` (`attention_weights`) and handed to the block
    as its `(sequences, 1, heads, length, length)` view, so the returned tensors are those the blocks read back (on
    the path to the loss: `retain_grad()` works on them).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.attention_weights: list[torch.Tensor] = []

    def attention_weights_buffer(self, num_heads: int, like: torch.Tensor) -> torch.Tensor:
        weights = like.new_zeros(self.batch_size, num_heads, self.chunk_num_tokens, self.chunk_num_tokens)
        self.attention_weights.append(weights)
        return weights.unsqueeze(1)


class DashengGroupMasking(nn.Module):
    """
    The original's group masking: one noise value per group of `mask_group_size` consecutive tokens, groups sorted
    ascending (small = visible), and the first `int(real_tokens * (1 - mask_ratio))` tokens of the sorted groups kept.

    Padded tokens are never kept and come last in the shuffled order; an odd last token is a group of its own.
    """

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.config = config

    def forward(
        self, noise: torch.Tensor, lengths: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            noise: `(sequences, ceil(length / mask_group_size))`, one value per group.
            lengths: `(sequences,)` real tokens of each sequence (at least 1), right-padded to `length`.
            length: Tokens per sequence.
        Returns:
            `(ids_shuffle, ids_restore, num_keep, mask)`: the shuffled order `(sequences, length)` (visible tokens
            first), its inverse, the visible tokens per sequence `(sequences,)` (at least 1) and the mask
            `(sequences, length)` float32, 1 = removed or padding, in the original token order.
        """
        group = self.config.mask_group_size
        positions = torch.arange(noise.shape[1] * group, device=noise.device)
        real_groups = torch.div(lengths + group - 1, group, rounding_mode="floor")
        group_noise = noise.masked_fill(positions[None, : noise.shape[1]] >= real_groups[:, None], math.inf)
        order = torch.argsort(group_noise, dim=1)  # ascending: small is keep, large is remove
        token_ids = (order[..., None] * group + positions[None, None, :group]).flatten(1)
        # Real tokens first in the order of their groups, then padding by position; ids past `length` fall off.
        sort_key = torch.where(token_ids < lengths[:, None], 0, token_ids + 1)
        ids_shuffle = token_ids.gather(1, torch.argsort(sort_key, dim=1, stable=True))[:, :length]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        # int(n * (1 - ratio)) as the original computes it (in double precision), at least one visible token.
        num_keep = (lengths.cpu().double() * (1.0 - self.config.mask_ratio)).floor().long().clamp(min=1)
        num_keep = torch.minimum(num_keep, lengths.cpu()).to(lengths.device)
        removed = (positions[None, :length] >= num_keep[:, None]).float()
        return ids_shuffle, ids_restore, num_keep, removed.gather(1, ids_restore)


class DashengDecoder(nn.Module):
    """
    The original MAE decoder with its parameter names: `input_proj`, `mask_token`, `pos_embed`, `blocks` (the
    encoder's `DashengLayer` at the decoder's width), `norm` and `outputlayer` (one 64 x 4 patch per token).
    """

    def __init__(self, config: DashengConfig):
        super().__init__()
        width = config.decoder_hidden_size
        block_config = _DerivedConfig(
            config,
            hidden_size=width,
            num_attention_heads=config.decoder_num_attention_heads,
            intermediate_size=config.decoder_intermediate_size,
            qkv_bias=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.input_proj = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.chunk_num_tokens + 1, width))
        self.blocks = nn.ModuleList(DashengLayer(block_config) for _ in range(config.decoder_num_hidden_layers))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.outputlayer = nn.Linear(width, config.patch_size[0] * config.patch_size[1])

    def embed(self, latent: torch.Tensor, ids_restore: torch.Tensor, num_keep: torch.Tensor) -> torch.Tensor:
        """
        Args:
            latent: Encoded visible tokens `(sequences, max visible, encoder hidden)` in shuffled order.
            ids_restore: `(sequences, length)` inverse of the shuffle.
            num_keep: `(sequences,)` visible tokens of each sequence; later rows of `latent` are padding.
        Returns:
            The decoder's input `(sequences, length, decoder hidden)` in token order: projected visible tokens and
            `mask_token` elsewhere, plus positions.
        """
        projected = self.input_proj(latent)
        projected = projected.to(torch.promote_types(projected.dtype, self.mask_token.dtype))  # fp32 under autocast
        sequences, visible, width = projected.shape
        length = ids_restore.shape[1]
        mask_token = self.mask_token.to(projected.dtype)
        shuffled = torch.cat([projected, mask_token.expand(sequences, length - visible, width)], dim=1)
        if bool((num_keep < visible).any()):
            is_visible = torch.arange(length, device=shuffled.device)[None, :, None] < num_keep[:, None, None]
            shuffled = torch.where(is_visible, shuffled, mask_token)
        tokens = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, width))
        return tokens + self.pos_embed[:, :length]


class DashengForPreTraining(DashengPreTrainedModel):
    """
    Dasheng with the masked-autoencoder decoder and loss it was pretrained with (Interspeech 2024): the encoder sees
    a random `1 - config.mask_ratio` of each clip's tokens (in groups of `config.mask_group_size`), the decoder
    predicts every token's 64 x 4 patch of the dB mel spectrogram, and the loss is taken on the removed tokens.

    `encoder.*` parameters are those of [`DashengModel`], so any Dasheng checkpoint loads into it (the decoder is
    then newly initialised); `decoder.*` are those of the original `AudioTransformerMAE`.
    """

    def __init__(self, config: DashengConfig):
        super().__init__(config)
        if list(config.patch_stride) != list(config.patch_size):
            raise ValueError(
                f"Pretraining predicts non-overlapping patches: patch_stride {config.patch_stride} must equal "
                f"patch_size {config.patch_size}."
            )
        self.encoder = DashengEncoder(config)
        self.masking = DashengGroupMasking(config)
        self.decoder = DashengDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The original decoder's initialisation: normal(0.02) linear weights, mask token normal(0.02), zero positions.
        if isinstance(module, DashengDecoder):
            nn.init.normal_(module.mask_token, std=self.config.initializer_range)
            nn.init.zeros_(module.pos_embed)
        elif isinstance(module, nn.Linear) and any(module is inner for inner in self.decoder.modules()):
            nn.init.trunc_normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> DashengForPreTraining | tuple:
        """As `PreTrainedModel.from_pretrained`; says so clearly when the checkpoint has no decoder (encoder only)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in loading_info["missing_keys"] if key.startswith("decoder."))
        if missing:
            total = len([key for key in model.state_dict() if key.startswith("decoder.")])
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            logger.warning(
                f"{source} holds {'no' if len(missing) == total else 'only part of the'} masked-autoencoder decoder "
                f"(released Dasheng checkpoints are encoder-only): the encoder was loaded, and "
                f"{len(missing)} of the decoder's {total} tensors are newly initialised. Pretraining trains them "
                f"from scratch."
            )
        return (model, loading_info) if output_loading_info else model

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DashengForPreTrainingOutput | tuple:
        """
        Args:
            input_values: Log-mel features `(batch, 64, frames)` in dB from [`DashengFeatureExtractor`]; the
                reconstruction target is these values (before the spectrogram BatchNorm).
            attention_mask: `(batch, frames)`, 1 for real frames and 0 for padding.
            noise: `(batch, ceil(num_tokens / config.mask_group_size))` values in [0, 1), one per group of tokens,
                that fix the masking (smallest visible); `torch.rand` when not given.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        input_values, attention_mask = self.encoder.check_inputs(input_values, attention_mask)
        tokens = self.encoder.embed(input_values, attention_mask)
        batch, num_tokens, width = tokens.shape
        if attention_mask is None:
            num_valid = torch.full((batch,), num_tokens, device=tokens.device)
        else:
            num_valid = self.num_valid_tokens(attention_mask).to(tokens.device).clamp(max=num_tokens)

        # Chunks of real audio become sequences of `length` tokens, the last one of each clip right-padded.
        length = min(num_tokens, self.config.chunk_num_tokens)
        num_chunks = -(-num_tokens // length)
        starts = torch.arange(num_chunks, device=tokens.device) * length
        lengths = (num_valid[:, None] - starts).clamp(0, length).flatten()
        noise = self._sequence_noise(noise, batch, num_tokens, length, num_chunks, tokens.device)
        tokens = F.pad(tokens, (0, 0, 0, num_chunks * length - num_tokens)).reshape(-1, length, width)
        present = None if bool((lengths > 0).all()) else (lengths > 0).nonzero().squeeze(1)
        if present is not None:
            tokens, lengths, noise = tokens[present], lengths[present], noise[present]

        ids_shuffle, ids_restore, num_keep, mask = self.masking(noise, lengths, length)
        visible = int(num_keep.max())
        kept = tokens.gather(1, ids_shuffle[:, :visible, None].expand(-1, -1, width))
        latent, hidden_states, attentions = self._run_stack(
            self.encoder.blocks,
            self.encoder.norm,
            self.encoder.pos_drop(kept),
            num_keep,
            output_attentions,
            output_hidden_states,
        )
        decoded, _, _ = self._run_stack(
            self.decoder.blocks, self.decoder.norm, self.decoder.embed(latent, ids_restore, num_keep), lengths
        )
        predicted = self.decoder.outputlayer(decoded)

        # Back to (batch, num_tokens): sequences of pure padding were never built.
        if present is not None:
            predicted = predicted.new_zeros(batch * num_chunks, *predicted.shape[1:]).index_copy(0, present, predicted)
            mask = mask.new_ones(batch * num_chunks, length).index_copy(0, present, mask)
            identity = torch.arange(length, device=ids_restore.device).expand(batch * num_chunks, length)
            ids_restore = identity.index_copy(0, present, ids_restore)
        logits = predicted.reshape(batch, num_chunks * length, -1)[:, :num_tokens]
        mask = mask.reshape(batch, -1)[:, :num_tokens]
        ids_restore = ids_restore.reshape(batch, -1)[:, :num_tokens]
        real = torch.arange(num_tokens, device=tokens.device)[None, :] < num_valid[:, None]
        if attention_mask is not None:
            logits = torch.where(real[..., None], logits, 0.0)
        loss = self._reconstruction_loss(input_values, logits, mask.bool() & real)

        output = DashengForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=mask,
            ids_restore=ids_restore,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()

    def _sequence_noise(
        self,
        noise: torch.Tensor | None,
        batch: int,
        num_tokens: int,
        length: int,
        num_chunks: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The clip-level noise `(batch, groups)` as one row per chunk `(batch * chunks, ceil(length / group))`."""
        group = self.config.mask_group_size
        expected = (batch, -(-num_tokens // group))
        if noise is None:
            noise = torch.rand(*expected, device=device)
        elif tuple(noise.shape) != expected:
            raise ValueError(
                f"noise must have shape (batch, ceil(num_tokens / mask_group_size)) = {expected} for these "
                f"input_values ({num_tokens} tokens, groups of {group}), got {tuple(noise.shape)}."
            )
        noise = noise.to(device)
        if num_chunks == 1:
            return noise
        if length % group:
            raise ValueError(
                f"Inputs longer than a chunk ({length} tokens) need chunk_num_tokens to be a multiple of "
                f"mask_group_size ({group}), so that groups do not straddle chunks."
            )
        return F.pad(noise, (0, num_chunks * length // group - noise.shape[1]), value=1.0).reshape(-1, length // group)

    def _run_stack(
        self,
        blocks: nn.ModuleList,
        norm: nn.LayerNorm,
        hidden_states: torch.Tensor,
        lengths: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """
        Every transformer block of this model runs here: `blocks` then `norm` over the real tokens only, packed.

        Args:
            hidden_states: `(sequences, length, width)`; the first `lengths[i]` tokens of sequence i are real.
            lengths: `(sequences,)`, each at least 1. Padded tokens are never computed nor attended to.
        Returns:
            `(normed output, per-layer states if asked, per-layer attention weights if asked)`, padded tokens zeroed;
            states are `(sequences, length, width)`, weights `(sequences, heads, length, length)`.
        """
        length = hidden_states.shape[1]
        packing = _SequencePacking.split_into_chunks(lengths.tolist(), length, length, hidden_states.device)
        packed, states, _ = run_blocks(
            blocks, packing.pack(hidden_states), packing, output_attentions, output_hidden_states
        )
        hidden_states = packing.unpack(norm(packed))
        return hidden_states, states, tuple(packing.attention_weights) if output_attentions else None

    def patchify(self, input_values: torch.Tensor) -> torch.Tensor:
        """
        Log-mel `(batch, mel bins, frames)` in dB to the patches the decoder predicts, `(batch, frames // 4, 256)`:
        each token's 64 x 4 patch with values ordered `mel_bin * 4 + frame` (as `torch.nn.functional.unfold`).
        Frames after the last whole patch are dropped, as the patch embedding drops them.
        """
        if input_values.ndim != 3:
            raise ValueError(f"patchify takes (batch, mel bins, frames), got shape {tuple(input_values.shape)}.")
        frames = self.config.patch_size[1]
        num_tokens = input_values.shape[-1] // frames
        patches = input_values[..., : num_tokens * frames].unflatten(-1, (num_tokens, frames))
        return patches.transpose(1, 2).flatten(2)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """
        The inverse of [`patchify`]: `(batch, tokens, 256)` patches (e.g. `logits`) to a spectrogram
        `(batch, mel bins, tokens * 4)`. With `config.norm_pix_loss`, `logits` are per-patch normalised values.
        """
        mel_bins, frames = self.config.patch_size
        if patches.ndim != 3 or patches.shape[-1] != mel_bins * frames:
            raise ValueError(
                f"unpatchify takes (batch, tokens, {mel_bins * frames}) patches, got shape {tuple(patches.shape)}."
            )
        spectrogram = patches.unflatten(-1, (mel_bins, frames)).permute(0, 2, 1, 3)  # (batch, mel, tokens, frames)
        return spectrogram.flatten(2)

    def _reconstruction_loss(
        self, input_values: torch.Tensor, logits: torch.Tensor, removed: torch.Tensor
    ) -> torch.Tensor:
        """
        Mean squared error over the removed real tokens `removed` `(batch, num_tokens)` bool, in float32, against
        the dB mel patches (`mel_bin * 4 + frame`), each normalised by its mean and unbiased variance when
        `config.norm_pix_loss`.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            target = self.patchify(input_values.float().to(logits.device))
            if self.config.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                variance = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (variance + 1e-6) ** 0.5
            per_token = (logits.float() - target).pow(2).mean(dim=-1)
            per_token = torch.where(removed, per_token, 0.0)
            return per_token.sum() / removed.sum().clamp(min=1)


DashengForPreTraining.register_for_auto_class("AutoModelForPreTraining")
