"""The language backbone: a Hugging Face causal LM whose decoder layers casa runs itself.

We keep the Hugging Face modules (embeddings, projections, norms, MLPs, rotary tables,
lm head) and their state-dict keys, so a pretrained checkpoint loads unchanged, but every
decoder layer is replaced by a `casa.blocks.DecoderBlock` that holds the *same children*
(`self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`) and runs our packed,
fusion-aware forward. Hugging Face's mask logic is never involved.

Families:
    llama, qwen2, qwen3, helium, mistral   -> `<Family>ForCausalLM` (keys `model.*`, `lm_head.*`)
    qwen2_5_vl                             -> the text model of `Qwen2_5_VLForConditionalGeneration`
                                              (keys `model.language_model.*`, `lm_head.*`; M-RoPE)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from casa.attention import BACKENDS
from casa.blocks import DecoderBlock
from casa.family import Family
from casa.rope import rope_tables


def _families() -> dict[str, tuple[Any, Any]]:
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "helium": (tf.HeliumConfig, tf.HeliumForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2_5_vl": (None, None),
    }


FAMILIES = ("llama", "qwen2", "qwen3", "helium", "mistral", "qwen2_5_vl")


def family_table() -> dict[str, Family]:
    """{family: its `Family`}: the rotary function (imported from the family's Hugging Face
    modeling module), its layout, the norm kind and whether q/k carry their own norm. The
    layers receive their family's entry at build time (`Backbone`); tests/test_image_kv.py
    checks each entry against what the modules compute."""
    from transformers.models.helium import modeling_helium
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen3 import modeling_qwen3

    return {
        "llama": Family("llama", modeling_llama.apply_rotary_pos_emb, "half", "rms", qk_norm=False),
        "qwen2": Family("qwen2", modeling_qwen2.apply_rotary_pos_emb, "half", "rms", qk_norm=False),
        "qwen3": Family("qwen3", modeling_qwen3.apply_rotary_pos_emb, "half", "rms", qk_norm=True),
        "helium": Family("helium", modeling_helium.apply_rotary_pos_emb, "interleaved", "rms", qk_norm=False),
        "mistral": Family("mistral", modeling_mistral.apply_rotary_pos_emb, "half", "rms", qk_norm=False),
        # M-RoPE: transformers recomposes the three sections into one [L, D] table (casa.rope),
        # which the text attention applies with the 1-D split-half rotation
        "qwen2_5_vl": Family("qwen2_5_vl", modeling_qwen2_5_vl.apply_rotary_pos_emb, "half", "rms", qk_norm=False),
    }
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _VLTextLM(nn.Module):
    """The Qwen2.5-VL language half with `Qwen2_5_VLForConditionalGeneration`'s key layout
    (`model.language_model.*`, `lm_head.*`) but without the vision tower, which casa owns
    separately (`casa.vision.VisionEncoder`)."""

    def __init__(self, text_config):
        super().__init__()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        self.config = text_config
        self.model = nn.Module()
        self.model.language_model = Qwen2_5_VLTextModel(text_config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        if getattr(text_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.language_model.embed_tokens.weight


def _load_vl_text(path: Path, dtype: torch.dtype) -> _VLTextLM:
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True)
    text_config = config.text_config
    text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False) or
                                           getattr(text_config, "tie_word_embeddings", False))
    lm = _VLTextLM(text_config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            # Older checkpoints store the text model at `model.*`, newer ones at `model.language_model.*`.
            if k.startswith("model.language_model."):
                state[k] = v
            elif k.startswith("model.") and not k.startswith(("model.visual.", "model.vision")):
                state["model.language_model." + k[len("model."):]] = v
            elif k.startswith("lm_head."):
                state[k] = v
    if not state:
        raise FileNotFoundError(f"no Qwen2.5-VL language-model weights (*.safetensors) found in {path}")
    if "lm_head.weight" not in state and text_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match Qwen2.5-VL: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return lm.to(dtype)


class Backbone(nn.Module):
    """A Hugging Face causal LM run by casa over packed streams.

    Args:
        family: one of `FAMILIES`.
        config: config fields for a randomly initialised model (tests, the demo); see
            `casa.tiny.tiny_backbone_config`.
        path: a local directory written by `save_pretrained` (real checkpoints). Exactly one
            of `config` / `path`.
        freeze: freeze every backbone parameter (the CASA-on-frozen-Qwen2.5-VL setup).
        attn_backend: `casa.attention` backend for self-attention (and the default of the
            fusion layers).
        dtype: parameter dtype when loading a checkpoint.
    """

    def __init__(self, family: Literal["llama", "qwen2", "qwen3", "helium", "mistral", "qwen2_5_vl"] = "llama", config: dict[str, Any] | None = None, path: str | None = None,
                 freeze: bool = False, attn_backend: Literal["dense", "sdpa", "eager", "flex", "flash"] = "sdpa",
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"Backbone.family={family!r} is not one of {list(FAMILIES)}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"Backbone.attn_backend={attn_backend!r} is not one of {list(BACKENDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"Backbone.dtype={dtype!r} is not one of {list(DTYPES)}")
        if (config is None) == (path is None):
            raise ValueError("Backbone needs exactly one of `config` (random init) or `path` (local checkpoint)")
        self.family = family
        self.attn_backend = attn_backend
        self.lm = self._build(family, config, path, DTYPES[dtype])
        self.config = self.lm.config
        self.mrope = family == "qwen2_5_vl"
        inner = self._inner()
        self.family_spec = family_table()[family]  # RoPE layout, norm kind, q/k norm: bound here, never probed
        inner.layers = nn.ModuleList(
            DecoderBlock(layer, i, self.family_spec, attn_backend) for i, layer in enumerate(inner.layers)
        )
        # Names of the parameters that come from the checkpoint (before any fusion layer is
        # attached): the optimiser gives them the pretrained learning rate.
        self.pretrained_names = frozenset(n for n, _ in self.named_parameters())
        self.loaded = path is not None  # ... which are pretrained only when loaded (`casa.train.optim`)
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
        self.frozen = freeze

    @staticmethod
    def _build(family: str, config: dict[str, Any] | None, path: str | None, dtype: torch.dtype) -> nn.Module:
        if path is not None:
            p = Path(path)
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"Backbone.path={path!r}: no config.json there (a local save_pretrained directory is required; nothing is downloaded)")
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
            if family == "qwen2_5_vl":
                if model_type != "qwen2_5_vl":
                    raise ValueError(f"Backbone.family='qwen2_5_vl' but {path}/config.json has model_type={model_type!r}")
                return _load_vl_text(p, dtype)
            if model_type != family:
                raise ValueError(f"Backbone.family={family!r} but {path}/config.json has model_type={model_type!r}")
            _, model_cls = _families()[family]
            return model_cls.from_pretrained(p, local_files_only=True, dtype=dtype)
        if family == "qwen2_5_vl":
            from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

            return _VLTextLM(Qwen2_5_VLTextConfig(**config))
        config_cls, model_cls = _families()[family]
        return model_cls(config_cls(**config))

    # ------------------------------------------------------------------ module access
    def _inner(self) -> nn.Module:
        return self.lm.model.language_model if self.family == "qwen2_5_vl" else self.lm.model

    @property
    def layers(self) -> nn.ModuleList:
        return self._inner().layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._inner().embed_tokens

    @property
    def norm(self) -> nn.Module:
        return self._inner().norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.lm.lm_head

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [L] or [3, L] -> cos, sin [L, D] (1-D positions are broadcast to
        the three M-RoPE components: a text token has t = h = w)."""
        if self.mrope and position_ids.dim() == 1:
            position_ids = position_ids.expand(3, -1)
        return rope_tables(self._inner().rotary_emb, position_ids, dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Text-only language modelling over packed samples (no fusion):
        input_ids [T], position_ids [T] (restarting per sample), cu_seqlens [S+1] -> logits [T, V]."""
        from casa.context import StreamContext

        x = self.embed_tokens(input_ids)  # [T, d]
        cos, sin = self.rope(position_ids, x.dtype)
        ctx = StreamContext(cu_seqlens.to(torch.int32), cos, sin)
        images = x.new_zeros(0, x.shape[1])
        for block in self.layers:
            x, _ = block(x, images, ctx)  # no images: nothing to update
        return self.head(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, d] -> [T, V] logits."""
        return self.lm_head(self.norm(hidden))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the language model as a Hugging Face `save_pretrained` directory that
        `Backbone(family, path=directory)` loads back: its checkpoint parameters only (fusion
        layers a strategy attached are not the LM's), into a fresh `<Family>ForCausalLM`, so
        the files are exactly what the Hugging Face class writes."""
        if self.family == "qwen2_5_vl":
            raise ValueError("Backbone.save_pretrained: family 'qwen2_5_vl' is a vision-language checkpoint; "
                             f"save one of {[f for f in FAMILIES if f != 'qwen2_5_vl']}")
        _, model_cls = _families()[self.family]
        hf = model_cls(self.config)
        own = {n[len("lm."):] for n in self.pretrained_names}
        state = {k: v for k, v in self.lm.state_dict().items() if k in own or k not in dict(self.lm.named_parameters())}
        hf.load_state_dict(state, strict=True)  # a key the class does not have is an error, not dropped
        hf.save_pretrained(Path(directory))
