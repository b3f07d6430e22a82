"""Vision encoder against the Hugging Face Qwen2.5-VL tower; loading, trainable tail, projector."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from casa.projector import Projector
from casa.vision import VisionEncoder, tiny_vision_config

PATCH_DIM = 3 * 2 * 14 * 14


def _pixels(grids, seed=0):
    """grids [(h, w)] of t=1 images -> pixel_values [P, PATCH_DIM], image_grid_thw [I, 3]."""
    g = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    return torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=g), thw


def _hf_tower(config: dict, state: dict):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**config)).eval()
    tower.load_state_dict(state)
    return tower


def _tiny_vlm(out_hidden_size=64):
    """A tiny Qwen2.5-VL: M-RoPE sections [2, 3, 3] sum to head_dim / 2 = 8."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=tiny_vision_config(out_hidden_size), image_token_id=150,
                              video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def test_equals_the_hugging_face_tower_and_token_count():
    enc = VisionEncoder(config=tiny_vision_config(48)).eval()
    ref_tower = _hf_tower(tiny_vision_config(48), enc.tower.state_dict())
    # 12x16 patches span 2x2 attention windows of 8x8 patches (with padding); 4x6 fits in one
    pix, thw = _pixels([(12, 16), (4, 6)])
    with torch.no_grad():
        both = enc(pix, thw)
        ref = ref_tower(pix, grid_thw=thw).pooler_output
        first, second = enc(pix[:192], thw[:1]), enc(pix[192:], thw[1:])
    assert both.shape == (int(thw.prod(-1).sum()) // enc.spatial_merge_size ** 2, enc.out_dim) == (54, 48)
    torch.testing.assert_close(both, ref, atol=0, rtol=0)
    # images (and video frames, t=1 each) are independent: one call == one call per image
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_eager_attention_matches_sdpa_and_empty_input():
    sdpa = VisionEncoder(config=tiny_vision_config(), attn_implementation="sdpa").eval()
    eager = VisionEncoder(config=tiny_vision_config(), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    pix, thw = _pixels([(8, 10)])
    with torch.no_grad():
        torch.testing.assert_close(eager(pix, thw), sdpa(pix, thw), atol=1e-5, rtol=1e-5)
        assert sdpa(pix[:0], thw[:0]).shape == (0, sdpa.out_dim)


def test_trainable_tail_and_gradients():
    enc = VisionEncoder(config=tiny_vision_config(), trainable_blocks=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    expected = {n for n, _ in enc.named_parameters() if n.startswith(("tower.blocks.1.", "tower.merger."))}
    assert trainable == expected and expected
    pix, thw = _pixels([(4, 4), (2, 4)])
    enc(pix, thw).square().sum().backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n

    frozen = VisionEncoder(config=tiny_vision_config(), trainable_blocks=0)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in VisionEncoder(config=tiny_vision_config(), freeze=False).parameters())
    # the paper's default (4) on a 2-block tower trains every block
    assert all(p.requires_grad for n, p in VisionEncoder(config=tiny_vision_config()).named_parameters()
               if n.startswith("tower.blocks."))


def test_argument_errors():
    with pytest.raises(ValueError, match=r"trainable_blocks=-1 must be an int >= 0"):
        VisionEncoder(config=tiny_vision_config(), trainable_blocks=-1)
    with pytest.raises(ValueError, match=r"attn_implementation='flash' is not one of \['sdpa', 'eager'"):
        VisionEncoder(config=tiny_vision_config(), attn_implementation="flash")
    with pytest.raises(ValueError, match="exactly one of `config`"):
        VisionEncoder()
    with pytest.raises(ValueError, match="exactly one of `config`"):
        VisionEncoder(config=tiny_vision_config(), path="/nowhere")
    with pytest.raises(ValueError, match=r"unknown fields \['hiden_size'\]"):
        VisionEncoder(config={**tiny_vision_config(), "hiden_size": 8})
    with pytest.raises(ValueError, match=r"fullatt_block_indexes=\[2\] has indexes \[2\] outside .*\[0, depth=2\)"):
        VisionEncoder(config={**tiny_vision_config(), "fullatt_block_indexes": [2]})
    enc = VisionEncoder(config=tiny_vision_config())
    pix, thw = _pixels([(4, 4)])
    with pytest.raises(ValueError, match="gives 16 patches, pixel_values has 15"):
        enc(pix[:15], thw)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        enc(pix[:12], torch.tensor([[1, 3, 4]]))


def test_load_from_a_qwen2_5_vl_checkpoint_and_round_trip(tmp_path):
    vlm = _tiny_vlm()
    # a sharded save: the loader must follow the index and open only the vision shards
    vlm.save_pretrained(tmp_path / "vlm", max_shard_size="100KB")
    assert (tmp_path / "vlm" / "model.safetensors.index.json").is_file()
    pix, thw = _pixels([(8, 8), (4, 6)])
    with torch.no_grad():
        ref = vlm.model.visual(pix, grid_thw=thw).pooler_output
        enc = VisionEncoder(path=str(tmp_path / "vlm")).eval()
        torch.testing.assert_close(enc(pix, thw), ref, atol=0, rtol=0)

        # the in-memory layout (`model.visual.*`), single file
        (tmp_path / "mem").mkdir()
        save_file({k: v.contiguous() for k, v in vlm.state_dict().items()}, str(tmp_path / "mem" / "model.safetensors"))
        (tmp_path / "mem" / "config.json").write_text((tmp_path / "vlm" / "config.json").read_text())
        assert any(k.startswith("model.visual.") for k in vlm.state_dict())
        torch.testing.assert_close(VisionEncoder(path=str(tmp_path / "mem"))(pix, thw), ref, atol=0, rtol=0)

        enc.save_pretrained(tmp_path / "enc")
        again = VisionEncoder(path=str(tmp_path / "enc"), trainable_blocks=0)
        torch.testing.assert_close(again(pix, thw), ref, atol=0, rtol=0)
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["vision_config"]["depth"] == 2


def test_path_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"path='{missing}'.*no config.json.*nothing is downloaded"):
        VisionEncoder(path=str(missing))
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no 'vision_config'"):
        VisionEncoder(path=str(tmp_path / "text_only"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"vision_config": tiny_vision_config()}))
    save_file({"model.layers.0.weight": torch.zeros(2)}, str(tmp_path / "no_weights" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no vision tower weights .*'visual.\*'.*model.safetensors"):
        VisionEncoder(path=str(tmp_path / "no_weights"))


def test_projector_kinds_against_hand_computation():
    x = torch.randn(5, 8)
    mlp = Projector(8, 16, "mlp")
    (w1, b1), (w2, b2) = (mlp.net[0].weight, mlp.net[0].bias), (mlp.net[2].weight, mlp.net[2].bias)
    torch.testing.assert_close(mlp(x), F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))
    assert mlp(x).shape == (5, 16)
    lin = Projector(8, 16, "linear")
    torch.testing.assert_close(lin(x), x @ lin.net.weight.T + lin.net.bias)
    ident = Projector(8, 8, "identity")
    assert torch.equal(ident(x), x) and not list(ident.parameters())


def test_projector_errors():
    with pytest.raises(ValueError, match=r"Projector.kind='conv' is not one of \['mlp', 'linear', 'identity'\]"):
        Projector(8, 8, "conv")
    with pytest.raises(ValueError, match="identity' needs in_dim == out_dim, got in_dim=8 .* out_dim=16"):
        Projector(8, 16, "identity")
    with pytest.raises(ValueError, match="Projector.out_dim=0 must be a positive int"):
        Projector(8, 0)
    with pytest.raises(ValueError, match=r"expected image_embeds \[N, 8\], got \[5, 4\]"):
        Projector(8, 16)(torch.randn(5, 4))


def test_blank_images_hides_every_image_from_the_model():
    """The blind arm (`blank_images`): the tower's output no longer depends on the pixels, and
    is what the same weights make of a zero (mean grey) image of the same size."""
    torch.manual_seed(0)
    seeing = VisionEncoder(config=tiny_vision_config()).eval()
    blind = VisionEncoder(config=tiny_vision_config(), blank_images=True).eval()
    blind.load_state_dict(seeing.state_dict())
    pix, thw = _pixels([(4, 6)])
    with torch.no_grad():
        out, other = blind(pix, thw), blind(torch.randn_like(pix), thw)
        torch.testing.assert_close(out, other, atol=0, rtol=0)
        torch.testing.assert_close(out, seeing(torch.zeros_like(pix), thw), atol=0, rtol=0)
        assert not torch.allclose(seeing(pix, thw), seeing(torch.randn_like(pix), thw))
