"""CasaForCausalLM: a thin `PreTrainedModel` around `casa.model.VisionLanguageModel` (see `casa.hf`).

This file is copied into every export directory as its remote code. It imports `casa`: the
model code is casa's own, not a copy, so casa must be importable where the directory is
loaded (`pip install -e .`, or the repository on PYTHONPATH).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    model(batch).logits                 [T, V]: a `casa.batch.PackedBatch` (casa.assistant builds them)
    model(input_ids=ids, pixel_values=pv, image_grid_thw=grids, image_positions=pos).logits
                                        one sample: ids [T], pv [P, 3*2*14*14], grids [I, 3],
                                        pos [I] (the text index each image precedes)
    model.generate(batch, max_new_tokens=16, stop_token_ids=(...))  -> new token ids per sample
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from casa.batch import PackedBatch, build_batch
from casa.generation import GenerationConfig, generate as casa_generate
from casa.rebuild import build_model

from .configuration_casa import CasaConfig


class CasaForCausalLM(PreTrainedModel):
    """config: CasaConfig; model: an already built VisionLanguageModel to wrap (the export),
    else one is built from `config.model_spec` (weights: from_pretrained's)."""

    config_class = CasaConfig
    base_model_prefix = "casa"  # not "model": the wrapped model's own attribute is `model`
    main_input_name = "input_ids"

    def __init__(self, config: CasaConfig, model=None):
        super().__init__(config)
        self.model = model if model is not None else build_model({"model": {"model": config.model_spec}})
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: casa's modules initialise themselves when built, and from_pretrained then
        loads every weight (re-initialising would overwrite a wrapped model's weights)."""

    @property
    def spatial_merge_size(self) -> int:
        return self.model.vision.spatial_merge_size

    def pack(self, input_ids, pixel_values=None, image_grid_thw=None, image_positions=None) -> PackedBatch:
        """One sample (input_ids [T]; pixel_values [P, D], image_grid_thw [I, 3], image_positions
        [I]) -> the PackedBatch the model takes (`casa.batch.build_batch`)."""
        ids = torch.as_tensor(input_ids, device=self.device).reshape(-1)
        grids = [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()
        positions = [] if image_positions is None else torch.as_tensor(image_positions).reshape(-1).tolist()
        if len(grids) != len(positions):
            raise ValueError(f"{len(grids)} images in image_grid_thw but {len(positions)} image_positions")
        if pixel_values is None:
            pixel_values = torch.zeros(0, self.model.vision._patch_dim, device=self.device)
        return build_batch(ids, [0, ids.numel()], pixel_values=pixel_values.to(self.device), image_grid_thw=grids,
                           image_text_position=positions, merge=self.spatial_merge_size)

    def forward(self, batch: PackedBatch | None = None, input_ids=None, pixel_values=None, image_grid_thw=None,
                image_positions=None, **kwargs) -> CausalLMOutput:
        """A PackedBatch, or one sample's tensors (`pack`) -> CausalLMOutput(logits [T, V],
        loss: the batch's answer loss when it has labels)."""
        if batch is None:
            if input_ids is None:
                raise ValueError("CasaForCausalLM.forward needs a PackedBatch (batch=) or input_ids=")
            batch = self.pack(input_ids, pixel_values, image_grid_thw, image_positions)
        out = self.model(batch)
        return CausalLMOutput(loss=out.loss if out.num_targets else None, logits=out.logits)

    @torch.no_grad()
    def generate(self, batch: PackedBatch, generation_config: GenerationConfig | None = None,
                 **kwargs) -> list[list[int]]:
        """casa's generation (`casa.generation.generate`, packed samples, KV cache): a prompt
        batch -> the new token ids of each sample. kwargs: GenerationConfig fields
        (max_new_tokens, stop_token_ids, temperature, ...), used without generation_config."""
        cfg = generation_config or GenerationConfig(**kwargs)
        return casa_generate(self.model, batch.to(self.device), cfg)
