"""CasaConfig: the Hugging Face config of an exported casa model (see `casa.hf`).

This file is copied into every export directory as its remote code; it imports only
transformers."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class CasaConfig(PretrainedConfig):
    """Args:
        model_spec: the run's `model.model` (class_path + init_args of
            `casa.model.VisionLanguageModel`, every default filled in by the fit CLI's parser):
            backbone, vision tower, projector and fusion strategy. Backbone and tower are given
            by their architecture (`config:`), never by a `path:`: DIR holds all the weights.
        template: the chat template's name (`casa.processing.template.TEMPLATES`).
        inference: what inference needs from the run's data config (`casa.rebuild.DataSettings`
            fields: pixel limits, video frame sampling, packing sizes).
        run_precision: the precision the run validated in (`casa.rebuild.run_precision`).
    `fusion` (the fusion strategy's spec) is derived from `model_spec`, written for readers."""

    model_type = "casa"

    def __init__(self, model_spec: dict[str, Any] | None = None, template: str = "helium",
                 inference: dict[str, Any] | None = None, run_precision: str = "32", **kwargs):
        kwargs.pop("fusion", None)  # derived below: a stale value from a file is not kept
        self.model_spec = dict(model_spec or {})
        self.fusion = (self.model_spec.get("init_args") or {}).get("fusion")
        self.template = template
        self.inference = dict(inference or {})
        self.run_precision = run_precision
        super().__init__(**kwargs)
