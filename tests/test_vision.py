"""Vision encoder against the Hugging Face tower; loading, trainable tail, projector."""

import pytest
import torch

from casa.projector import Projector
from casa.vision import VisionEncoder, tiny_vision_config


def _pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    return torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g), thw


def test_tokens_and_equality_with_the_hf_tower_per_image():
    enc = VisionEncoder(config=tiny_vision_config(48)).eval()
    pix, thw = _pixels([(8, 8), (4, 6)])
    with torch.no_grad():
        both = enc(pix, thw)
        first = enc(pix[:64], thw[:1])
        second = enc(pix[64:], thw[1:])
        hf = enc.tower(pix, grid_thw=thw).pooler_output
    assert both.shape == (64 // 4 + 24 // 4, 48)
    torch.testing.assert_close(both, hf)
    # images are independent: encoding them together equals encoding them one by one (video frames)
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_trainable_tail():
    enc = VisionEncoder(config=tiny_vision_config(), trainable_blocks=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("tower.blocks.1.", "tower.merger.")) for n in trainable)
    pix, thw = _pixels([(4, 4)])
    enc(pix, thw).sum().backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert not any(p.requires_grad for p in VisionEncoder(config=tiny_vision_config(), trainable_blocks=0).parameters())
    assert all(p.requires_grad for p in VisionEncoder(config=tiny_vision_config(), freeze=False).parameters())
    with pytest.raises(ValueError, match="trainable_blocks=-1 must be >= 0"):
        VisionEncoder(config=tiny_vision_config(), trainable_blocks=-1)


def test_load_from_a_qwen2_5_vl_checkpoint_and_round_trip(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from casa.testing import tiny_backbone_config

    text = tiny_backbone_config("qwen2_5_vl")
    vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=tiny_vision_config(64))).eval()
    vlm.save_pretrained(tmp_path / "vlm")
    enc = VisionEncoder(path=str(tmp_path / "vlm")).eval()
    pix, thw = _pixels([(4, 4), (2, 4)])
    with torch.no_grad():
        ref = vlm.model.visual(pix, grid_thw=thw).pooler_output
        torch.testing.assert_close(enc(pix, thw), ref, atol=0, rtol=0)
        enc.save_pretrained(tmp_path / "enc")
        torch.testing.assert_close(VisionEncoder(path=str(tmp_path / "enc"))(pix, thw), ref, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VisionEncoder(path=str(tmp_path / "nowhere"))


def test_projector_kinds():
    x = torch.randn(5, 8)
    assert Projector(8, 16, "mlp")(x).shape == (5, 16)
    assert Projector(8, 16, "linear")(x).shape == (5, 16)
    assert torch.equal(Projector(8, 8, "identity")(x), x)
    with pytest.raises(ValueError, match=r"Projector.kind='conv' is not one of \['mlp', 'linear', 'identity'\]"):
        Projector(8, 8, "conv")
    with pytest.raises(ValueError, match="needs equal widths"):
        Projector(8, 16, "identity")
