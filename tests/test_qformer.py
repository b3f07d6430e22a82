"""The Q-Former's two forms: the paper's joint block (§4.4) against PyTorch's plain
transformer layer applied to [image tokens; queries], queries sliced; BLIP-2's kept."""

import pytest
import torch
from torch import nn

from casa.fusion import QFormer
from casa.fusion.qformer import JointBlock, QFormerLayer
from casa.tiny import random_packed_batch, tiny_model

COUNTS = [6, 3, 10]  # image tokens of three images


def _reference_layer(block: JointBlock, d: int, heads: int) -> nn.TransformerEncoderLayer:
    """torch's pre-norm transformer layer holding `block`'s weights."""
    ref = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(block.out.weight)
        ref.self_attn.out_proj.bias.copy_(block.out.bias)
        ref.linear1.load_state_dict(block.mlp[0].state_dict())
        ref.linear2.load_state_dict(block.mlp[2].state_dict())
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
    return ref


@pytest.mark.parametrize("depth", [1, 2])
def test_the_joint_form_is_a_transformer_over_image_tokens_and_queries(depth):
    """Per image: cat([image_i, queries]) through `depth` plain transformer layers, the last Q
    rows, the final norm. Images never see each other."""
    d, heads, Q = 32, 4, 5
    model = tiny_model(QFormer(num_queries=Q, depth=depth, heads=heads, form="joint"), hidden_size=d)
    qf = model.fusion
    assert all(isinstance(b, JointBlock) for b in qf.layers) and len(qf.layers) == depth
    torch.manual_seed(0)
    with torch.no_grad():
        qf.queries.normal_()  # queries unlike each other and the image tokens
    image = torch.randn(sum(COUNTS), d, dtype=torch.float64)
    qf.double()
    counts = torch.tensor(COUNTS)
    with torch.no_grad():
        out, new_counts = qf.compress(image, counts)
        refs = [_reference_layer(b, d, heads).double() for b in qf.layers]
        want = []
        for x in image.split(COUNTS):
            h = torch.cat([x, qf.queries])[None]  # [1, n_i + Q, d]
            for ref in refs:
                h = ref(h)
            want.append(qf.norm_out(h[0, -Q:]))
    assert out.shape == (len(COUNTS) * Q, d) and new_counts.tolist() == [Q] * len(COUNTS)
    torch.testing.assert_close(out, torch.cat(want), atol=1e-10, rtol=1e-10)


def test_the_forms_differ_and_blip2_stays_an_option():
    joint = tiny_model(QFormer(num_queries=4, depth=1, heads=4, form="joint"))
    blip2 = tiny_model(QFormer(num_queries=4, depth=1, heads=4, form="blip2"))
    assert isinstance(blip2.fusion.layers[0], QFormerLayer) and isinstance(joint.fusion.layers[0], JointBlock)
    # the joint block: one attention over [image | queries] (qkv) and an MLP; BLIP-2's adds a
    # cross-attention with its own norms
    n_joint = sum(p.numel() for p in joint.fusion.parameters())
    n_blip2 = sum(p.numel() for p in blip2.fusion.parameters())
    assert n_joint < n_blip2
    batch = random_packed_batch([[("text", 3), ("image", (4, 4)), ("text", 5)]], seed=0)
    out = joint(batch)  # the queries reach the loss: they train
    out.loss.backward()
    assert joint.fusion.queries.grad is not None and joint.fusion.queries.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"QFormer.form='perceiver' is not one of \['joint', 'blip2'\]"):
        QFormer(form="perceiver")
