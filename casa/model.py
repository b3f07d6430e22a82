"""The vision-language model: vision encoder + projector + backbone + fusion strategy.

    PackedBatch ──> VisionEncoder(pixel_values) ──> Projector ──> image_embeds [N, d]
                ──> backbone.embed_tokens(input_ids)           ──> text_embeds  [T, d]
                ──> fusion.prepare(...)  -> stream [L, d], images [N', d], StreamContext
                ──> every DecoderBlock(stream, images, ctx)
                ──> fusion.text_states -> [T, d] ──> norm + lm_head -> logits [T, V]
                ──> loss: mean cross-entropy over answer tokens (labels != -100)

The strategy is attached once here, at build time; the forward has no strategy branches.
"""

from __future__ import annotations

from typing import Literal

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from casa.attention import EAGER
from casa.backbone import Backbone
from casa.batch import PackedBatch, build_batch, collate_packed
from casa.context import AttentionRecorder
from casa.fusion.base import FusionStrategy, mark_new, new_parameter_names
from casa.positions import sample_of_text
from casa.projector import Projector
from casa.vision import VisionEncoder


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[T, V] logits at every text position."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over answer tokens (None without labels, 0 with no answer token)."""
    num_targets: int = 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def answer_loss_per_sample(logits: torch.Tensor, labels: torch.Tensor,
                           sample_cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V], labels [T] (-100: no target), sample_cu_seqlens [S+1] -> (sum of the
    answer tokens' cross-entropy [S], their count [S]) per sample: the "sample" loss
    reduction, and the per-task losses of validation (`casa.train.module`)."""
    targets = labels != -100
    per_token = F.cross_entropy(logits[targets].float(), labels[targets], reduction="none")  # [n]
    cu = sample_cu_seqlens.to(logits.device)
    pos = torch.arange(logits.shape[0], device=logits.device)
    sample = torch.searchsorted(cu[1:].contiguous(), pos, right=True)[targets]  # [n] sample of each target
    S = cu.numel() - 1
    return per_token.new_zeros(S).index_add_(0, sample, per_token), torch.bincount(sample, minlength=S)


class VisionLanguageModel(nn.Module):
    """Args:
        backbone: the language model (`casa.backbone.Backbone`).
        vision: the vision tower (`casa.vision.VisionEncoder`).
        fusion: how image tokens reach the LM (a `casa.fusion` strategy).
        projector: "mlp", "linear" or "identity" (vision width -> LM width); new parameters.
        loss_reduction: "token" averages the cross-entropy over all answer tokens of the
            batch (long answers weigh more: the paper's "standard cross-entropy" over answer tokens,
            App. B.1 "Optimization", and the demo's,
            `experiments/configs/demo.yaml`); "sample" averages each sample's answer tokens
            first, then the samples, so a one-word answer counts as much as a caption track.
    """

    def __init__(self, backbone: Backbone, vision: VisionEncoder, fusion: FusionStrategy,
                 projector: Literal["mlp", "linear", "identity"] = "mlp",
                 loss_reduction: Literal["token", "sample"] = "token"):
        super().__init__()
        if loss_reduction not in ("token", "sample"):
            raise ValueError(f"VisionLanguageModel.loss_reduction={loss_reduction!r} is not one of ['token', 'sample']")
        self.loss_reduction = loss_reduction
        self.backbone = backbone
        self.vision = vision
        # new parameters are marked where they are created: the projector and the strategy's own
        # children here, the fusion layers a strategy adds to blocks by the strategy (`mark_new`)
        self.projector = mark_new(Projector(vision.out_dim, backbone.hidden_size, kind=projector))
        self.fusion = mark_new(fusion)
        fusion.attach(backbone, vision.spatial_merge_size)
        self._capture: AttentionRecorder | None = None
        self.set_inference_mask(getattr(fusion, "inference_mask", None))  # a strategy built with a Table 8 mask
        self.activation_checkpointing = False
        self._check_new_parameters_are_marked()

    def _check_new_parameters_are_marked(self) -> None:
        """Every parameter is either the backbone's or the tower's as loaded, or marked new:
        a strategy that forgot `mark_new` would train its layers at the pretrained rate."""
        new = new_parameter_names(self)
        loaded = {f"backbone.{n}" for n in self.backbone.pretrained_names}
        unmarked = sorted(n for n, _ in self.named_parameters()
                          if n not in new and n not in loaded and not n.startswith("vision."))
        if unmarked:
            raise ValueError(f"{type(self.fusion).__name__}.attach added parameters {unmarked[:4]} without "
                             "casa.fusion.base.mark_new (new parameters must be marked where they are created)")

    # ------------------------------------------------------------------ forward
    def encode_images(self, batch: PackedBatch) -> torch.Tensor:
        """-> image_embeds [N, d] in the LM's width ([0, d] for a batch without image)."""
        if batch.num_images == 0:
            return self.backbone.embed_tokens.weight.new_zeros(0, self.backbone.hidden_size)
        return self.projector(self.vision(batch.pixel_values, batch.image_grid_thw))

    def needs_idle_sample(self, batch: PackedBatch, images_on_any_rank: bool = True) -> bool:
        """Whether a forward over `batch` must carry the idle sample (`with_idle_sample`).

        The rule: with several ranks (torch.distributed initialised, world size > 1), every
        forward whose batch has no image runs one, unless the caller knows that no rank's
        batch has an image (`images_on_any_rank=False`: the text-only decoding steps of
        `casa.generation.generate`, identical on every rank, pay no tower forward per token).
        Why: the ranks' collectives must match call for call. Under FSDP2 every vision block
        is its own `fully_shard` unit (an all-gather per forward, a reduce-scatter per
        backward); under DDP every trainable parameter must get a gradient on every rank
        before the bucketed all-reduce. A text-only batch skips the tower and projector, and
        CA / gated CA layers and the Q-Former use none of their parameters without an image,
        so a rank holding one would stall (NCCL) or abort (gloo) the others, in training and
        in no-grad validation alike (FSDP2 all-gathers in no-grad forwards too).
        One process: never (nothing to match), so single-process numbers are unchanged."""
        return batch.num_images == 0 and images_on_any_rank and _world_size() > 1

    def with_idle_sample(self, batch: PackedBatch) -> PackedBatch:
        """batch + one sample [idle image | one text token, id 0] at its end: T+1 text tokens,
        one more window, one image token (`VisionEncoder.idle_image`). Samples never see each
        other (block-diagonal attention), so the first T positions compute what they would
        without it; its one position has no target, so it adds nothing to the loss, but it
        runs every parameter a batch with an image runs (zero gradients)."""
        dev = batch.input_ids.device
        pixel_values, grid = self.vision.idle_image(dev)
        idle = build_batch(torch.zeros(1, dtype=torch.long, device=dev), [0, 1],
                           position_ids=batch.position_ids.new_zeros(*batch.position_ids.shape[:-1], 1),
                           pixel_values=pixel_values.to(batch.pixel_values.dtype), image_grid_thw=grid,
                           image_text_position=[0], merge=self.vision.spatial_merge_size)
        return replace(collate_packed([replace(batch, meta=[]), idle]), meta=[])

    def hidden_states(self, batch: PackedBatch, image_embeds: torch.Tensor | None = None, cache=None,
                      images_on_any_rank: bool = True) -> torch.Tensor:
        """-> [T, d] final hidden states at the text positions (before the final norm).

        `images_on_any_rank=False`: the caller knows that no rank's batch holds an image
        (cached decoding steps), so no idle sample is added (`needs_idle_sample`); with a
        cache the caller adds it itself (`casa.generation.generate`), sizing the cache for it;
        with `image_embeds` given the batch runs as it is (the caller's images)."""
        if images_on_any_rank is False and batch.num_images:
            raise ValueError(f"hidden_states(images_on_any_rank=False) got a batch with {batch.num_images} images")
        T = batch.num_text_tokens
        idle = image_embeds is None and self.needs_idle_sample(batch, images_on_any_rank)
        if idle:
            if cache is not None:
                raise ValueError("hidden_states(cache=...) with several ranks and a batch without image: add "
                                 "`with_idle_sample(batch)` and size the cache for it (see casa.generation.generate), "
                                 "or pass images_on_any_rank=False when no rank has an image")
            batch = self.with_idle_sample(batch)
        if image_embeds is None:
            image_embeds = self.encode_images(batch)
        if cache is not None:
            # a chunk continues cached samples: its local positions start at the cache offsets
            cache.begin(batch.sample_cu_seqlens)
            sample = sample_of_text(batch.sample_cu_seqlens, torch.arange(batch.num_text_tokens, device=batch.input_ids.device))
            batch = replace(batch, position_ids=batch.position_ids + cache.offset.to(sample.device)[sample])
        text_embeds = self.backbone.embed_tokens(batch.input_ids)  # [T, d]
        stream, images, ctx = self.fusion.prepare(batch, text_embeds, image_embeds, self.backbone)
        ctx.capture = self._capture
        ctx.cache = cache
        for block in self.backbone.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the block in backward: activations of one block alive at a time
                stream, updated = torch.utils.checkpoint.checkpoint(block, stream, images, ctx, use_reentrant=False)
            else:
                stream, updated = block(stream, images, ctx)
            images = images if updated is None else updated  # None: the block left the images as they were
        if cache is not None:
            text_pos = batch.position_ids if ctx.text_positions is None else ctx.text_positions
            text_pos = text_pos if text_pos.dim() == 1 else text_pos[0]
            cache.advance(text_pos[batch.sample_cu_seqlens[1:].long() - 1])
        hidden = self.fusion.text_states(stream, ctx)  # [T(+1), d]
        return hidden[:T] if idle else hidden  # the idle sample is last

    def last_logits(self, batch: PackedBatch, cache=None, images_on_any_rank: bool = True) -> torch.Tensor:
        """-> [S, V] logits at the last text position of every sample: one generation step.
        `casa.generation.generate` makes it an FSDP2 forward method of the root, so that the
        root's parameters (embeddings, norm, lm_head, projector) are gathered for it."""
        hidden = self.hidden_states(batch, cache=cache, images_on_any_rank=images_on_any_rank)
        return self.backbone.head(hidden[batch.sample_cu_seqlens[1:].long() - 1])  # [S, V]

    def forward(self, batch: PackedBatch) -> ModelOutput:
        logits = self.backbone.head(self.hidden_states(batch))  # [T, V]
        targets = batch.labels != -100
        n = int(targets.sum())
        if n == 0:
            return ModelOutput(logits, logits.sum() * 0.0, 0)
        if self.loss_reduction == "token":
            per_token = F.cross_entropy(logits[targets].float(), batch.labels[targets], reduction="none")  # [n]
            return ModelOutput(logits, per_token.mean(), n)
        sums, counts = answer_loss_per_sample(logits, batch.labels, batch.sample_cu_seqlens)
        has = counts > 0
        return ModelOutput(logits, (sums[has] / counts[has]).mean(), n)

    # ------------------------------------------------------------------ parameters
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters split into "new" (projector, fusion layers, gates, Q-Former)
        and "pretrained" (backbone and vision weights left trainable), by name so that the
        split survives FSDP2's DTensor conversion. Frozen parameters are in neither."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"new": [], "pretrained": []}
        new = new_parameter_names(self)  # the marked modules' (`casa.fusion.base.mark_new`)
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["new" if name in new else "pretrained"].append((name, p))
        return groups

    # ------------------------------------------------------------------ modes
    def set_capture(self, recorder: AttentionRecorder | None) -> None:
        """Capture mode on (a recorder) or off (None). On, the fusion attention layers run the
        eager backend and append one record per layer call to `recorder` (see
        `casa.fusion.layers.window_attention`); the switch is made here, once, not per call."""
        self._capture = recorder
        self._bind_window_backends()

    def set_inference_mask(self, mask: str | None) -> None:
        """Table 8 masks in the CASA layers ("self", "rnd", "rnd_txt" or None; applied in eval
        mode). While one is set the fusion attention layers run the eager backend, the one
        that hides a key per query. Raises ValueError for another mask or another strategy."""
        from casa.fusion import CASA
        from casa.fusion.windows import INFERENCE_MASKS

        if mask is not None and mask not in INFERENCE_MASKS:
            raise ValueError(f"inference mask {mask!r} is not one of {list(INFERENCE_MASKS)} or None")
        if mask is not None and not isinstance(self.fusion, CASA):
            raise ValueError(f"inference masks apply to CASA layers; this model's fusion is "
                             f"{type(self.fusion).__name__}")
        if isinstance(self.fusion, CASA):
            self.fusion.inference_mask = mask
        self._bind_window_backends()

    def _bind_window_backends(self) -> None:
        """Every windowed attention (modules with a `window_backend`: fusion layers, CASA∨
        blocks) runs eager while capturing or masking, its own bound backend otherwise."""
        eager = self._capture is not None or getattr(self.fusion, "inference_mask", None) is not None
        for m in self.modules():
            if hasattr(m, "window_backend"):
                m.window_backend = EAGER if eager else None

    @contextmanager
    def capture_attention(self):
        """Inside: capture mode (`set_capture`) with a fresh recorder; yields its record list."""
        recorder = AttentionRecorder()
        self.set_capture(recorder)
        try:
            yield recorder.records
        finally:
            self.set_capture(None)
