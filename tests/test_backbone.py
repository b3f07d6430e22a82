"""The backbone adapter against the Hugging Face models it wraps: same logits, same keys."""

import pytest
import torch

from casa.backbone import FAMILIES, Backbone
from casa.tiny import tiny_backbone_config

TEXT_FAMILIES = ["llama", "qwen2", "qwen3", "helium", "mistral"]


def _hf_logits(backbone: Backbone, ids: torch.Tensor) -> torch.Tensor:
    """The wrapped HF model's own forward (its attention, masks and decoder layers), with
    our blocks swapped back out for the original HF layers."""
    from casa.backbone import _families

    _, model_cls = _families()[backbone.family]
    ref = model_cls(backbone.config)
    ref.load_state_dict(backbone.lm.state_dict(), strict=True)
    ref.eval()
    with torch.no_grad():
        return ref(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_logits_equal_hugging_face(family):
    torch.manual_seed(0)
    bb = Backbone(family, config=tiny_backbone_config(family)).eval()
    ids = torch.randint(0, bb.vocab_size, (23,))
    with torch.no_grad():
        ours = bb(ids, torch.arange(23), torch.tensor([0, 23]))
    torch.testing.assert_close(ours, _hf_logits(bb, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_samples_do_not_see_each_other(family):
    torch.manual_seed(0)
    bb = Backbone(family, config=tiny_backbone_config(family)).eval()
    a, b = torch.randint(0, bb.vocab_size, (9,)), torch.randint(0, bb.vocab_size, (14,))
    with torch.no_grad():
        packed = bb(torch.cat([a, b]), torch.cat([torch.arange(9), torch.arange(14)]), torch.tensor([0, 9, 23]))
        alone_a = bb(a, torch.arange(9), torch.tensor([0, 9]))
        alone_b = bb(b, torch.arange(14), torch.tensor([0, 14]))
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b]), atol=1e-5, rtol=1e-5)


def test_state_dict_keys_are_hugging_face_keys(tmp_path):
    bb = Backbone("llama", config=tiny_backbone_config("llama"))
    import transformers as tf

    hf = tf.LlamaForCausalLM(bb.config)
    assert set(bb.lm.state_dict()) == set(hf.state_dict())
    hf.save_pretrained(tmp_path)
    loaded = Backbone("llama", path=str(tmp_path))
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(loaded.lm.state_dict()[k], v, atol=0, rtol=0)


def test_freeze_and_errors(tmp_path):
    bb = Backbone("qwen2", config=tiny_backbone_config("qwen2"), freeze=True)
    assert not any(p.requires_grad for p in bb.parameters())
    with pytest.raises(ValueError, match="family='gpt9' is not one of"):
        Backbone("gpt9", config={})
    with pytest.raises(ValueError, match="attn_backend='nope' is not one of"):
        Backbone("llama", config=tiny_backbone_config("llama"), attn_backend="nope")
    with pytest.raises(ValueError, match="exactly one of"):
        Backbone("llama")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Backbone("llama", path=str(tmp_path / "missing"))
    assert set(FAMILIES) >= set(TEXT_FAMILIES) | {"qwen2_5_vl"}
