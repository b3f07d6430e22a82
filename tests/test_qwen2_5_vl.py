"""Token insertion over a tiny Qwen2.5-VL equals `Qwen2_5_VLForConditionalGeneration`:
same logits at every text position, with images (M-RoPE positions, vision tower, merger)."""

import pytest
import torch

from casa.backbone import Backbone
from casa.batch import build_batch, image_token_count
from casa.fusion import Insertion
from casa.model import VisionLanguageModel
from casa.tiny import tiny_backbone_config, tiny_vision_config
from casa.vision import VisionEncoder

VISION_START, VISION_END, IMAGE_PAD = 150, 151, 152


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = tiny_backbone_config("qwen2_5_vl")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=tiny_vision_config(out_hidden_size=text["hidden_size"]),
                              image_token_id=IMAGE_PAD, vision_start_token_id=VISION_START,
                              vision_end_token_id=VISION_END, video_token_id=153, tie_word_embeddings=False)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    hf.save_pretrained(path)
    return hf, str(path)


def _conversation(grids):
    """text ids with vision_start/end around each image; returns (hf_ids, text_ids, image_text_position)."""
    g = torch.Generator().manual_seed(1)
    hf_ids, text_ids, positions = [], [], []
    for h, w in grids:
        chunk = torch.randint(0, 140, (5,), generator=g).tolist() + [VISION_START]
        hf_ids += chunk
        text_ids += chunk
        hf_ids += [IMAGE_PAD] * image_token_count([(1, h, w)], 2)[0]
        positions.append(len(text_ids))  # the image precedes <|vision_end|>
        hf_ids.append(VISION_END)
        text_ids.append(VISION_END)
    tail = torch.randint(0, 140, (7,), generator=g).tolist()
    return hf_ids + tail, text_ids + tail, positions


@pytest.mark.parametrize("grids", [[(4, 4)], [(4, 6), (2, 4)]])
def test_insertion_equals_hugging_face_qwen2_5_vl(checkpoint, grids):
    hf, path = checkpoint
    model = VisionLanguageModel(Backbone("qwen2_5_vl", path=path), VisionEncoder(path=path), Insertion(),
                                projector="identity").eval()
    hf_ids, text_ids, positions = _conversation(grids)
    g = torch.Generator().manual_seed(2)
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    ids = torch.tensor(hf_ids)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid_thw,
                 mm_token_type_ids=(ids == IMAGE_PAD).int()[None]).logits[0]
    T = len(text_ids)
    batch = build_batch(torch.tensor(text_ids), [0, T], position_ids=torch.arange(T), pixel_values=pixels,
                        image_grid_thw=grid_thw, image_text_position=torch.tensor(positions), merge=2)
    # the text before the first image has no image
    assert batch.window_cu_seqlens_text.tolist() == [0] + positions + [T]
    assert batch.window_cu_seqlens_image.tolist() == [0, 0] + (grid_thw.prod(-1) // 4).cumsum(0).tolist()
    batch.validate()
    with torch.no_grad():
        ours = model(batch).logits
    text_mask = ids != IMAGE_PAD
    torch.testing.assert_close(ours, ref[text_mask], atol=1e-4, rtol=1e-4)
