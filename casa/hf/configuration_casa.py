"""CasaConfig: the Hugging Face config of an exported casa model (see `casa.hf`).

This file is copied into every export directory as its remote code. It checks at construction
that the spec's classes are ones this code builds (`parts.resolve`); that import also makes the
config's remote-code module differ between exports of different strategies: transformers keys
its auto-class registrations on the config class, so two such exports loaded in one process
would otherwise share the first one's model class."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .parts import resolve


def class_paths(spec: Any) -> list[str]:
    """Every class_path of a nested spec."""
    if isinstance(spec, dict):
        own = [spec["class_path"]] if "class_path" in spec else []
        return own + [p for v in spec.values() for p in class_paths(v)]
    if isinstance(spec, list):
        return [p for v in spec for p in class_paths(v)]
    return []


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
        image_token_id: the placeholder of an image in input_ids (`<|image_pad|>`); the model
            takes it out and opens the image's window at the text token it precedes.
        video_token_id: the placeholder of one video frame (`<|video_pad|>`).
        vocab_size: the language model's vocabulary (logits' last dimension).
    `fusion` (the fusion strategy's spec) is derived from `model_spec`, written for readers."""

    model_type = "casa"

    def __init__(self, model_spec: dict[str, Any] | None = None, template: str = "helium",
                 inference: dict[str, Any] | None = None, run_precision: str = "32",
                 image_token_id: int | None = None, video_token_id: int | None = None,
                 vocab_size: int | None = None, use_cache: bool = True, **kwargs):
        kwargs.pop("fusion", None)  # derived below: a stale value from a file is not kept
        kwargs.setdefault("tie_word_embeddings", False)  # casa ties (or not) inside its backbone
        self.model_spec = dict(model_spec or {})
        for path in class_paths(self.model_spec):
            resolve(path)  # ValueError naming it, and the classes this code has
        self.fusion = (self.model_spec.get("init_args") or {}).get("fusion")
        self.template = template
        self.inference = dict(inference or {})
        self.run_precision = run_precision
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        super().__init__(**kwargs)
