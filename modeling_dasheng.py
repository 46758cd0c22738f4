"""PyTorch Dasheng: a masked-autoencoder audio encoder (Interspeech 2024) and its audio classifier.

Where things happen, in the order the data flows:
- the spectrogram: `DashengFeatureExtractor` (feature_extraction_dasheng.py) turns 16 kHz audio into 64-band log-mel
  frames (10 ms); here they are normalised per mel bin (`DashengSpectrogramBatchNorm`) and cut into 40 ms patches
  (`DashengPatchEmbeddings`), one token each;
- chunks: `DashengEncoder.forward` has `DashengPackedSequences.split_into_chunks` (modeling_dasheng_layers.py) cut
  each clip's real tokens into chunks of `config.chunk_num_tokens` (252 = 10.08 s), the last one at its own length,
  and pack all chunks of the batch back to back: padding is dropped there, once, and never computed; `unpack` puts
  the tokens back as `(batch, tokens, hidden)` with zeros at padding;
- blocks and attention: `run_blocks` and `DashengLayer` (modeling_dasheng_layers.py); each chunk attends only to
  itself (`DashengSelfAttention`), so no attention mask exists: equal-length chunks are batched for eager, SDPA and
  flex attention, FlashAttention gets them all at once through `cu_seqlens`;
- pooling and heads: `DashengEncoder.forward` averages each clip's real tokens; the heads sit on that mean.
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
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.pipelines.audio_classification import AudioClassificationPipeline
from transformers.utils import logging

from .configuration_dasheng import DashengConfig, copy_code_files, front_end_mismatches
from .feature_extraction_dasheng import DashengFeatureExtractor
from .modeling_dasheng_layers import (
    DashengLayer,
    DashengPackedSequences,
    DashengPatchEmbeddings,
    DashengSpectrogramBatchNorm,
    eager_attention_forward,
    encode_in_fixed_chunks,
    is_exporting,
    run_blocks,
)

__all__ = [
    "DashengAudioClassificationPipeline",
    "DashengEncoder",
    "DashengForAudioClassification",
    "DashengLayer",
    "DashengModel",
    "DashengModelOutput",
    "DashengPackedSequences",
    "DashengPreTrainedModel",
    "DashengWeightShapeError",
    "eager_attention_forward",
    "run_blocks",
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


class DashengEncoder(nn.Module):
    """
    The original Dasheng encoder, with its parameter names: spectrogram BatchNorm (`init_bn`), patch embedding,
    time and frequency position embeddings, transformer `blocks` and the final `norm`; plus masked mean pooling.
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

    def embed(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Log-mel `(batch, mel bins, frames)` to tokens `(batch, num_tokens, hidden_size)` with positions;
        `attention_mask` `(batch, frames)` keeps padded frames out of BatchNorm's batch statistics in training.
        """
        to_4d, batch_norm, to_3d = self.init_bn
        frame_mask = None if attention_mask is None else attention_mask.bool()
        tokens = self.patch_embed(to_3d(batch_norm(to_4d(input_values), frame_mask)))
        tokens = tokens.to(torch.promote_types(tokens.dtype, self.time_pos_embed.dtype))  # fp32 under autocast
        # Positions restart at every chunk: token i has time position i % chunk_num_tokens.
        positions = torch.arange(tokens.shape[1], device=tokens.device) % self.chunk_num_tokens
        position_embeddings = (self.time_pos_embed[0, :, 0, :].T + self.freq_pos_embed[0, :, 0, 0])[positions]
        if torch.is_grad_enabled():  # out of place: a hook (PEFT's input grads) may have made `tokens` a leaf
            return tokens + position_embeddings
        return tokens.add_(position_embeddings)  # in place saves a copy of hours-long inputs

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        """
        Args:
            input_values: Log-mel spectrogram `(batch, mel bins, frames)`.
            attention_mask: `(batch, frames)`, 1 for real frames then 0 for padding; None if nothing is padded.
        Returns:
            `last_hidden_state` `(batch, num_tokens, hidden_size)` after the final LayerNorm, zeros at padding;
            `pooler_output` `(batch, hidden_size)`, the mean of each clip's real tokens; per-layer `hidden_states`
            and `attentions` when asked, else None.
        """
        input_values, attention_mask = self.check_inputs(input_values, attention_mask)
        tokens = self.pos_drop(self.embed(input_values, attention_mask))
        batch, num_tokens, _ = tokens.shape
        if is_exporting():  # no shape may depend on the mask's values: fixed chunks with a key-padding mask
            valid = None if attention_mask is None else self.num_valid_tokens(attention_mask)
            return encode_in_fixed_chunks(
                self.blocks, self.norm, tokens, valid, output_attentions, output_hidden_states
            )
        valid_tokens = (
            [num_tokens] * batch if attention_mask is None else self.num_valid_tokens(attention_mask).tolist()
        )
        sequences = DashengPackedSequences.split_into_chunks(
            valid_tokens, num_tokens, self.chunk_num_tokens, tokens.device
        )
        hidden_states = sequences.pack(tokens)
        step = max(1, self.config.max_chunks_per_pass)
        if torch.is_grad_enabled() or output_attentions or output_hidden_states or len(sequences) <= step:
            hidden_states, all_states, all_weights = run_blocks(
                self.blocks, hidden_states, sequences, output_attentions, output_hidden_states
            )
            hidden_states = self.norm(hidden_states)
        else:
            hidden_states, all_states, all_weights = (
                self._run_blocks_in_slices(hidden_states, sequences, step),
                None,
                None,
            )
        last_hidden_state = sequences.unpack(hidden_states)
        if sequences.token_index is None:
            pooled = last_hidden_state.mean(dim=1)
        else:
            counts = torch.tensor(valid_tokens, device=last_hidden_state.device, dtype=last_hidden_state.dtype)
            pooled = last_hidden_state.sum(dim=1) / counts[:, None]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states, attentions=all_weights
        )

    def _run_blocks_in_slices(self, packed: torch.Tensor, sequences: DashengPackedSequences, step: int) -> torch.Tensor:
        """
        Without gradients, `step` sequences at a time through all blocks and the final norm, which bounds memory for
        hours-long inputs; each slice's output overwrites its input.
        """
        output, offset = None, 0
        for first in range(0, len(sequences), step):
            part = sequences.select(first, first + step)
            end = offset + part.total_tokens
            normed = self.norm(run_blocks(self.blocks, packed[offset:end], part)[0])
            if output is None:
                output = packed if normed.dtype == packed.dtype else normed.new_empty(packed.shape)
            output[offset:end] = normed
            offset = end
        return output

    def num_valid_tokens(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(batch,)` int64 tokens of real audio per clip: token i is valid iff its last frame `4 * i + 3` is real."""
        width, stride = self.config.patch_size[1], self.config.patch_stride[1]
        frames = attention_mask.sum(dim=-1, dtype=torch.long)
        return torch.div(frames - width, stride, rounding_mode="floor").clamp(min=-1) + 1

    def check_inputs(self, input_values: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refuse what would give wrong or cryptic results; arrays and lists become tensors."""
        mel_bins, width = self.config.num_mel_bins, self.config.patch_size[1]
        device = self.norm.weight.device
        if not isinstance(input_values, torch.Tensor) and hasattr(input_values, "__array__"):
            input_values = torch.as_tensor(input_values, dtype=torch.float32, device=device)
        if not isinstance(input_values, torch.Tensor) or input_values.ndim != 3 or input_values.shape[1] != mel_bins:
            shape = tuple(input_values.shape) if hasattr(input_values, "shape") else type(input_values).__name__
            hint = "Compute them with DashengFeatureExtractor(..., return_tensors='pt')."
            if hasattr(input_values, "ndim") and input_values.ndim <= 2:
                hint = "This looks like a waveform: run it through DashengFeatureExtractor first."
            elif hasattr(input_values, "ndim") and input_values.ndim == 3 and input_values.shape[2] == mel_bins:
                hint = "The last two axes look swapped: pass (batch, mel bins, frames)."
            raise ValueError(
                f"input_values must be log-mel features of shape (batch, {mel_bins}, frames), got {shape}. {hint}"
            )
        if input_values.shape[0] == 0:
            raise ValueError("input_values is an empty batch (batch size 0): pass at least one clip.")
        if not input_values.is_floating_point():
            raise ValueError(f"input_values must be floating point log-mel features, got {input_values.dtype}.")
        if input_values.shape[-1] < width:
            raise ValueError(
                f"input_values has {input_values.shape[-1]} frames; Dasheng needs at least {width} "
                f"(480 samples at 16 kHz)."
            )
        if attention_mask is None:
            return input_values, None
        attention_mask = torch.as_tensor(attention_mask, device=input_values.device)
        if attention_mask.shape != (input_values.shape[0], input_values.shape[-1]):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_values {tuple(input_values.shape)} "
                f"needs one of shape {(input_values.shape[0], input_values.shape[-1])} (batch, frames): pass the mask "
                f"the feature extractor returned with these features."
            )
        if is_exporting():  # the checks below read the mask's values, which an exported graph cannot branch on
            return input_values, attention_mask.to(torch.long)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(
                "attention_mask must hold only 0 and 1 (1 = real frame, 0 = padding), in any dtype; got other values."
            )
        mask = attention_mask.to(torch.long)
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask must hold 1 for real frames followed by 0 for padding (right padding), as "
                "DashengFeatureExtractor returns it."
            )
        if bool((mask.sum(dim=-1) < width).any()):
            raise ValueError(f"Every clip needs at least {width} real frames in attention_mask (480 samples).")
        return input_values, mask


class DashengWeightShapeError(ValueError, RuntimeError):
    """
    Weights whose shapes disagree with the config. A `ValueError` like this project's other errors, and the
    `RuntimeError` that Transformers raises for size mismatches, so code written for either catches it.
    """


class DashengClassificationHead(nn.Sequential):
    """The original head: LayerNorm then Linear on the pooled embedding (`outputlayer.0`, `outputlayer.1`)."""

    def __init__(self, config: DashengConfig, num_outputs: int):
        super().__init__(
            nn.LayerNorm(config.hidden_size, eps=config.head_layer_norm_eps), nn.Linear(config.hidden_size, num_outputs)
        )


class DashengPreTrainedModel(PreTrainedModel):
    """Weight initialisation, saving and the helpers shared by the Dasheng models."""

    config_class = DashengConfig
    base_model_prefix = "encoder"
    main_input_name = "input_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["DashengLayer"]
    _keep_in_fp32_modules = ["init_bn"]
    head_is_trained = True  # False when from_pretrained found no head in the folder: it starts from random weights

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

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, check_front_end: bool = True, **kwargs
    ):
        """
        As `PreTrainedModel.from_pretrained`, then two checks that turn silently wrong outputs into errors: every
        weight must be finite and BatchNorm variances non-negative (`check_weights`), and the folder's
        `preprocessor_config.json`, if any, must compute the features the weights were trained on (the front end
        in the config). Pass `check_front_end=False` to load a model whose feature extractor differs on purpose.
        A classification head missing from the folder (an encoder-only checkpoint) starts from random weights: one
        warning line says so, `head_is_trained` is then False, and the audio-classification pipeline refuses it.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ == "SafetensorError":
                raise ValueError(
                    f"The weights file of {pretrained_model_name_or_path} is damaged or truncated ({error}): "
                    f"download or save it again."
                ) from error
            if not isinstance(error, RuntimeError) or "mismatch" not in str(error):
                raise
            raise DashengWeightShapeError(
                f"The weights of {pretrained_model_name_or_path} do not have the shapes its config describes "
                f"(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, "
                f"target_length, num_labels/outputdim): config.json was edited or belongs to another checkpoint. "
                f"Restore it, or pass ignore_mismatched_sizes=True to re-initialise the differing tensors. "
                f"({error})"
            ) from error
        model.check_weights()
        if check_front_end:
            model._check_front_end(pretrained_model_name_or_path, kwargs)
        missing_head = [key for key in loading_info["missing_keys"] if key.startswith("outputlayer.")]
        if missing_head and getattr(model, "outputlayer", None) is not None:
            model.head_is_trained = False
            logger.warning(
                f"{type(model).__name__}: {pretrained_model_name_or_path} holds no classification head "
                f"({len(missing_head)} outputlayer tensors missing), so its {model.outputlayer[-1].out_features} "
                f"outputs are random until it is fine-tuned; for embeddings use DashengModel's pooler_output."
            )
        return (model, loading_info) if wants_loading_info else model

    def check_weights(self) -> None:
        """Raise `ValueError` naming the first tensor that holds NaN or infinity, or a negative BatchNorm variance."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.device.type == "meta" or not tensor.is_floating_point():
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"Weight {name} holds NaN or infinite values: the checkpoint is damaged or was saved from a "
                    f"diverged run. Load another checkpoint."
                )
            if name.endswith("running_var") and bool((tensor < 0).any()):
                raise ValueError(
                    f"BatchNorm statistic {name} holds negative variances: the checkpoint is damaged. Load another "
                    f"checkpoint."
                )

    def _check_front_end(self, source: str | os.PathLike, kwargs: dict[str, Any]) -> None:
        """Refuse a folder whose preprocessor config disagrees with the front end the weights were trained on."""
        from transformers.utils import cached_file

        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
        try:
            path = cached_file(
                source,
                "preprocessor_config.json",
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **{key: kwargs[key] for key in hub_keys if key in kwargs},
            )
        except OSError:
            return
        if path is None:
            return
        try:
            feature_extractor = DashengFeatureExtractor.from_json_file(path)
        except ValueError as error:  # unreadable JSON or settings DashengFeatureExtractor refuses
            raise ValueError(f"The preprocessor_config.json of {source} is not usable: {error}") from error
        mismatches = front_end_mismatches(self.config, feature_extractor)
        if mismatches:
            raise ValueError(
                f"The preprocessor_config.json of {source} computes other features than this model was trained "
                f"on: {'; '.join(mismatches)}. Fix preprocessor_config.json (DashengFeatureExtractor."
                f"from_dasheng_config(model.config) writes the right one), or pass check_front_end=False to "
                f"from_pretrained to load it anyway."
            )

    def num_valid_tokens(self, attention_mask: Any, num_frames: int | None = None) -> torch.Tensor:
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
            attention_mask = torch.ones(1, num_frames, dtype=torch.long)
        return self.encoder.num_valid_tokens(torch.as_tensor(attention_mask))

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
        Save weights and config, plus the code files and a `preprocessor_config.json` if none is there, so the
        folder loads with every Auto class and `trust_remote_code=True`. `push_to_hub=True` uploads all of it.
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
        self.encoder = DashengEncoder(self.config)
        self.outputlayer = DashengClassificationHead(self.config, config.outputdim) if config.outputdim else None
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
        encoded = self.encoder(input_values, attention_mask, output_attentions, output_hidden_states)
        logits = encoded.pooler_output if self.outputlayer is None else self.outputlayer(encoded.pooler_output)
        loss = None
        if labels is not None:
            if self.outputlayer is None:
                raise ValueError("labels need a head: load the model with `outputdim=NUM_CLASSES`.")
            loss = self._head_loss(logits, labels)
        output = DashengModelOutput(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=encoded.pooler_output,
            # The first port's contract: `hidden_states` is the last hidden state unless all of them are asked for.
            hidden_states=encoded.hidden_states if output_hidden_states else encoded.last_hidden_state,
            attentions=encoded.attentions,
            logits=logits,
            loss=loss,
        )
        return output if return_dict else output.to_tuple()

    def _head_loss(self, logits: torch.Tensor, labels: Any) -> torch.Tensor:
        """`config.loss` of the head's logits: `BCELoss` (on their sigmoid, computed stably) or `CrossEntropyLoss`."""
        labels = torch.as_tensor(labels, device=logits.device)
        if self.config.loss == "CrossEntropyLoss":
            target = labels.long() if not labels.is_floating_point() else labels.float()
            return F.cross_entropy(logits.float(), target)
        if self.config.loss != "BCELoss":
            raise ValueError(f"config.loss must be 'BCELoss' or 'CrossEntropyLoss', got {self.config.loss!r}.")
        if labels.ndim == 1 and not labels.is_floating_point():  # class indices with a multi-label loss: one-hot
            labels = F.one_hot(labels.long(), logits.shape[-1])
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class DashengForAudioClassification(DashengPreTrainedModel):
    """Dasheng encoder, masked mean pooling and a LayerNorm + Linear head (`outputlayer`) with `num_labels` outputs."""

    loss_type = "ForSequenceClassification"

    def __init__(self, config: DashengConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = DashengEncoder(self.config)
        self.outputlayer = DashengClassificationHead(self.config, config.num_labels)
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
        encoded = self.encoder(input_values, attention_mask, output_attentions, output_hidden_states)
        logits = self.outputlayer(encoded.pooler_output)
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device)
            if not labels.is_floating_point():  # class indices (int32 too) or multi-hot targets
                multi_label = self.config.problem_type == "multi_label_classification"
                labels = labels.float() if multi_label else labels.long()
            loss = self.loss_function(labels=labels, pooled_logits=logits.float(), config=self.config)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return output if return_dict else output.to_tuple()


class DashengAudioClassificationPipeline(AudioClassificationPipeline):
    """
    Audio classification pipeline that batches clips of different lengths (`batch_size > 1`).

    Transformers' default collation pads axis 1, which for Dasheng's `(1, mel bins, frames)` features is the mel
    axis; this pipeline pads frames instead and always passes the frame mask. It refuses a classifier whose head was
    never trained (loaded from an encoder-only folder): its labels would be random.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.model, "head_is_trained", True) is False:
            raise ValueError(
                f"{getattr(self.model.config, '_name_or_path', '') or 'This model'} has no trained classification "
                f"head (an encoder-only checkpoint), so its labels would be random: fine-tune it first, or load a "
                f"classifier (e.g. `dasheng-convert --checkpoint dasheng-audioset`); for embeddings use AutoModel "
                f"and pooler_output."
            )

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
