"""Every fusion strategy against references: packed vs alone, causality, gated init vs
backbone, parameter accounting, trainable sets."""

import functools

import pytest
import torch

from casa.backbone import Backbone
from casa.blocks import Replace
from casa.fusion import CASA, CASAShared, CrossAttention, GatedCrossAttention, Insertion
from casa.fusion.perceiver import PerceiverCrossAttention
from casa.tiny import random_packed_batch, tiny_backbone_config, tiny_model
from experiments.strategies import build_fusion, names


# three samples: image mid-text, two image windows with consecutive images, text only
SAMPLES = [
    [("text", 5), ("image", (4, 4)), ("text", 7)],
    [("image", (2, 4)), ("text", 3), ("image", (4, 2)), ("image", (2, 2)), ("text", 6)],
    [("text", 9)],
]


def _perturb_gates(model):
    """Trained gated models have non-zero gates; test them in that state too."""
    for name, p in model.named_parameters():
        if name.endswith("fusion_attn.gate"):
            p.data.fill_(0.7)


@pytest.mark.parametrize("name", names())
def test_packing_invariance(name):
    model = tiny_model(build_fusion(name)).eval()
    _perturb_gates(model)
    packed = random_packed_batch(SAMPLES, seed=1)
    with torch.no_grad():
        out = model(packed).logits
        for s, spec in enumerate(SAMPLES):
            alone = random_packed_batch([spec], seed=1)
            # same content as in the packed batch: copy it over from the packed one
            lo, hi = packed.sample_cu_seqlens[s].item(), packed.sample_cu_seqlens[s + 1].item()
            alone.input_ids = packed.input_ids[lo:hi].clone()
            img = [i for i in range(packed.num_images) if lo <= packed.image_text_position[i] < hi]
            patches = (packed.image_grid_thw.prod(-1)).cumsum(0)
            p_lo = int(patches[img[0] - 1]) if img and img[0] > 0 else 0
            p_hi = int(patches[img[-1]]) if img else 0
            alone.pixel_values = packed.pixel_values[p_lo:p_hi].clone()
            torch.testing.assert_close(model(alone).logits, out[lo:hi], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", names())
def test_causality(name):
    model = tiny_model(build_fusion(name)).eval()
    _perturb_gates(model)
    spec = [[("text", 4), ("image", (2, 4)), ("text", 6), ("image", (4, 2)), ("text", 5)]]
    batch = random_packed_batch(spec, seed=2)
    with torch.no_grad():
        ref = model(batch).logits
        # a later text token
        changed = random_packed_batch(spec, seed=2)
        changed.input_ids[8] = (changed.input_ids[8] + 1) % 100
        out = model(changed).logits
        torch.testing.assert_close(out[:8], ref[:8], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[8:], ref[8:])
        # the second image (before text index 10) must not change anything before it
        changed = random_packed_batch(spec, seed=2)
        changed.pixel_values[8:] += 1.0
        out = model(changed).logits
        torch.testing.assert_close(out[:10], ref[:10], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[10:], ref[10:])


GATED = {"gated_cross_attention": lambda placement: GatedCrossAttention(placement=placement),
         "perceiver_gated_cross_attention": lambda placement: PerceiverCrossAttention(num_latents=3, depth=1,
                                                                                      placement=placement)}


@pytest.mark.parametrize("placement", ["parallel", "before"])
@pytest.mark.parametrize("gated", list(GATED))
def test_gated_cross_attention_at_init_is_the_backbone(gated, placement):
    """tanh gates at 0: the model is its backbone exactly, until the gates open."""
    model = tiny_model(GATED[gated](placement)).eval()
    batch = random_packed_batch(SAMPLES, seed=3)
    # the plain backbone with the same pretrained weights: fused keys are extra, none missing
    plain = Backbone("llama", config=tiny_backbone_config("llama")).eval()
    missing, unexpected = plain.lm.load_state_dict(model.backbone.lm.state_dict(), strict=False)
    assert not missing and unexpected and all(".fusion_attn." in k for k in unexpected)
    with torch.no_grad():
        fused = model(batch).logits
        ref = plain(batch.input_ids, batch.position_ids, batch.sample_cu_seqlens)
    assert torch.equal(fused, ref)
    for name, p in model.named_parameters():  # open the gates: the images now reach the text
        if name.endswith("fusion_attn.gate"):
            p.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.allclose(model(batch).logits, ref)


@pytest.mark.parametrize("mode", ["plus", "before"])
def test_eq3_indicator_text_before_the_first_image_is_the_backbone(mode):
    """Paper eq. 3's 1[i > K]: CASA⊕/→ give text before a sample's first image no update, so
    with random (non-zero) fused weights a text-only input runs exactly as the backbone, and
    so does the text of a sample before its image; the text after the image does not."""
    model = tiny_model(CASA(mode)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".fusion_attn." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    plain = Backbone("llama", config=tiny_backbone_config("llama")).eval()
    missing, unexpected = plain.lm.load_state_dict(model.backbone.lm.state_dict(), strict=False)
    assert not missing and unexpected and all(".fusion_attn." in k for k in unexpected)
    text_only = random_packed_batch([[("text", 9)], [("text", 4)]], seed=3)
    mixed = random_packed_batch([[("text", 5), ("image", (4, 4)), ("text", 7)]], seed=3)
    with torch.no_grad():
        for batch in (text_only, mixed):
            fused = model(batch).logits
            ref = plain(batch.input_ids, batch.position_ids, batch.sample_cu_seqlens)
            K = 5 if batch is mixed else batch.num_text_tokens  # text before the first image
            assert torch.equal(fused[:K], ref[:K])
        assert not torch.allclose(fused[K:], ref[K:])  # after the image, CASA updates the text


def _count(model, prefix=""):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_parameter_accounting():
    base = tiny_model(Insertion())
    sa = _count(base, "backbone.lm.model.layers.0.self_attn.")
    norm = _count(base, "backbone.lm.model.layers.0.input_layernorm.")
    L = len(base.backbone.layers)
    total = _count(base)
    assert _count(tiny_model(CASA("replace", "every_k", 2))) == total  # CASA∨ adds nothing
    assert _count(tiny_model(CASA("plus"))) == total + L * sa
    assert _count(tiny_model(CASA("before"))) == total + L * (sa + norm)
    assert _count(tiny_model(CrossAttention())) == total + L * sa
    assert _count(tiny_model(GatedCrossAttention())) == total + L * (sa + 1)
    assert _count(tiny_model(CASA("plus", "first_last_k", 1))) == total + 2 * sa


@pytest.mark.parametrize("name", names())
def test_forward_backward_and_trainable_sets(name):
    model = tiny_model(build_fusion(name), freeze_backbone=True)
    out = model(random_packed_batch(SAMPLES, seed=4))
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.backbone.named_parameters():
        if n in model.backbone.pretrained_names:
            assert p.grad is None, f"frozen backbone parameter {n} received a gradient"
    groups = model.parameter_groups()
    new = {n for n, _ in groups["new"]}
    assert all(n.startswith(("projector.", "fusion.", "backbone.")) for n in new)
    assert not any(n.startswith("backbone.") and n[len("backbone."):] in model.backbone.pretrained_names for n in new)
    assert any(p.grad is not None for _, p in groups["new"])


def test_capture_records_probabilities():
    model = tiny_model(CASA("plus")).eval()
    with torch.no_grad(), model.capture_attention() as records:
        model(random_packed_batch(SAMPLES, seed=5))
    assert len(records) == len(model.backbone.layers)
    for r in records:
        for p in r["probs"]:
            if p.shape[-1]:
                torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=1e-5)
    assert model._capture is None


@pytest.mark.parametrize("name", ["casa_plus", "casa_before", "casa_replace", "cross_attention",
                                  "gated_cross_attention", "perceiver_gated_cross_attention"])
def test_captured_probabilities_reproduce_the_fusion_layer_output(name, monkeypatch):
    """The recorded maps are the attention the layer computed: per window, probs @ V (V as
    the layer attended to it, GQA heads expanded) then `o_proj` gives the output of
    `window_attention`, and that output is the one the layer gives without capture (the
    eager capture path changes no number). Sums to 1 alone would pass for probabilities of
    the wrong window, before the mask, or at another scale."""
    import casa.fusion.layers as layers

    model = tiny_model(build_fusion(name)).eval()
    _perturb_gates(model)
    batch = random_packed_batch(SAMPLES, seed=5)
    calls = []  # per window_attention call: {"attn", "out", "v", "cu_k"}
    window_attention, varlen_attention = layers.window_attention, layers.varlen_attention

    def recording_window_attention(attn, *args, **kwargs):
        calls.append({"attn": attn})
        calls[-1]["out"] = out = window_attention(attn, *args, **kwargs)
        return out

    def recording_varlen_attention(q, k, v, cu_q, cu_k, *args, **kwargs):
        calls[-1].update(v=v, cu_k=cu_k, cu_q=cu_q)
        return varlen_attention(q, k, v, cu_q, cu_k, *args, **kwargs)

    # the fusion layers call window_attention through their module; a CASA∨ block's `Replace`
    # step holds the function the strategy gave it at attach time, so it is re-pointed too
    monkeypatch.setattr(layers, "window_attention", recording_window_attention)
    monkeypatch.setattr(layers, "varlen_attention", recording_varlen_attention)
    for block in model.backbone.layers:
        if isinstance(block.attention, Replace):
            monkeypatch.setattr(block.attention, "windowed_attention",
                                functools.partial(recording_window_attention, kind="casa"))
    with torch.no_grad():
        model(batch)
        plain = [c["out"] for c in calls]
        calls.clear()
        with model.capture_attention() as records:
            model(batch)
    assert len(records) == len(calls) == len(plain) == len(model.fusion.fused_layers()) > 0
    for r, c, ref in zip(records, calls, plain):
        torch.testing.assert_close(c["out"], ref, atol=1e-5, rtol=1e-5)  # capture changes nothing
        attn, v, cu_k, cu_q = c["attn"], c["v"], c["cu_k"].tolist(), c["cu_q"].tolist()
        assert r["window_cu_text"] == cu_q and len(r["probs"]) == len(cu_q) - 1
        H = r["probs"][0].shape[0]
        o = torch.cat([torch.einsum("hqk,khd->qhd", p, v[cu_k[w]:cu_k[w + 1]].repeat_interleave(H // v.shape[1], 1))
                       for w, p in enumerate(r["probs"])])  # [T, H, D]
        torch.testing.assert_close(attn.o_proj(o.reshape(o.shape[0], -1)), c["out"], atol=1e-5, rtol=1e-5)


def test_table8_masks_change_casa_outputs_in_eval_only():
    model = tiny_model(CASA("plus"))
    batch = random_packed_batch(SAMPLES, seed=6)
    model.eval()
    with torch.no_grad():
        ref = model(batch).logits
        model.set_inference_mask("self")  # a mode of the model: its windows run eager from here on
        masked = model(batch).logits
        model.train()
        train_mode = model(batch).logits
    assert not torch.allclose(masked, ref)
    torch.testing.assert_close(train_mode, ref, atol=1e-5, rtol=1e-5)


def test_config_errors_name_field_and_choices():
    with pytest.raises(ValueError, match=r"CASA.mode='sum' is not one of \['plus', 'before', 'replace'\]"):
        CASA("sum")
    with pytest.raises(ValueError, match=r"CASA.placement='last' is not one of"):
        CASA("replace", "last")
    with pytest.raises(ValueError, match=r"CrossAttention.placement='after' is not one of"):
        CrossAttention("after")
    with pytest.raises(ValueError, match=r"CASA.inference_mask='none' is not one of"):
        CASA(inference_mask="none")
    with pytest.raises(ValueError, match=r"CASA.k=9 must be between 1 and"):
        tiny_model(CASA("replace", "first_k", 9))


def test_sample_loss_reduction_weighs_every_sample_equally():
    """`loss_reduction="sample"`: the mean over samples of each sample's mean answer-token
    cross-entropy, computed here by hand from the logits; "token" is the plain mean."""
    model = tiny_model(CASA("plus")).eval()
    batch = random_packed_batch([[("text", 3), ("image", (2, 2)), ("text", 12)], [("text", 4)],
                                 [("image", (2, 4)), ("text", 6)]], seed=5)
    with torch.no_grad():
        out = model(batch)
        model.loss_reduction = "sample"
        by_sample = model(batch)
    logits, labels, cu = out.logits, batch.labels, batch.sample_cu_seqlens.tolist()
    per = []
    for s in range(len(cu) - 1):
        lab = labels[cu[s]:cu[s + 1]]
        keep = lab != -100
        if keep.any():
            per.append(torch.nn.functional.cross_entropy(logits[cu[s]:cu[s + 1]][keep], lab[keep]))
    assert len(per) == 3
    torch.testing.assert_close(by_sample.loss, torch.stack(per).mean())
    keep = labels != -100
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    assert not torch.allclose(out.loss, by_sample.loss)


@pytest.mark.parametrize("name", ["casa_plus", "casa_plus_ffn_updates", "insertion", "casa_shared"])
def test_fsdp2_blocks_match_the_plain_model_and_return_no_views(name, tmp_path):
    """FSDP2 (one gloo process) around every block and the model, activation checkpointing on
    as in `experiments/configs/trainer/fsdp2_h100.yaml`: the same loss and gradients as the
    plain model, and no "returned a view tensor" warning. FSDP2 hands a wrapped block its
    inputs as views and hooks every tensor the block returns; a block that passed its images
    back out unchanged returned such a view, once per block."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    batch = random_packed_batch(SAMPLES, seed=1)
    plain, wrapped = tiny_model(build_fusion(name)), tiny_model(build_fusion(name))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for block in wrapped.backbone.layers:
            fully_shard(block)
        fully_shard(wrapped)
        wrapped.activation_checkpointing = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = wrapped(batch).loss
            loss.backward()
        ref = plain(batch).loss
        ref.backward()
        assert not [str(w.message) for w in caught if "view tensor" in str(w.message)]
        torch.testing.assert_close(loss, ref)
        grads = {n: p.grad for n, p in plain.named_parameters()}
        checked = 0
        for n, p in wrapped.named_parameters():
            assert (p.grad is None) == (grads[n] is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad.full_tensor(), grads[n], atol=1e-5, rtol=1e-4, msg=n)
                checked += 1
        assert checked > 10
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["plus", "before"])
def test_casa_shared_is_casa_with_the_sa_weights_tied(mode):
    """CASA initialises its layer as a copy of the block's SA, so at init CASA and CASA-Shared
    compute the same thing; the tie then shows in the gradients: the shared projection's
    gradient is the sum of the SA's and the copy's (both paths land in one `.grad`). No
    `fusion_attn.attn.*` keys: a checkpoint is the backbone's keys (+ CASA→'s own pre-norm)."""
    batch = random_packed_batch(SAMPLES, seed=7)
    copied, shared = tiny_model(CASA(mode)), tiny_model(CASAShared(mode))
    for block in shared.backbone.layers:
        assert block.fusion_attn.attn is block.self_attn
    keys = {k for k in copied.state_dict() if ".fusion_attn.attn." not in k}
    assert set(shared.state_dict()) == keys
    norm = _count(shared, "backbone.lm.model.layers.0.input_layernorm.")
    extra = len(shared.backbone.layers) * norm if mode == "before" else 0
    assert _count(shared) == _count(tiny_model(Insertion())) + extra
    loss_c, loss_s = copied(batch).loss, shared(batch).loss
    torch.testing.assert_close(loss_s, loss_c, atol=0, rtol=0)
    loss_c.backward()
    loss_s.backward()
    for i, block in enumerate(copied.backbone.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected = getattr(block.self_attn, proj).weight.grad + getattr(block.fusion_attn.attn, proj).weight.grad
            got = getattr(shared.backbone.layers[i].self_attn, proj).weight.grad
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=f"block {i} {proj}")


def test_casa_shared_replace_points_to_casa_replace():
    with pytest.raises(ValueError, match=r"CASAShared.mode='replace' is not one of \['plus', 'before'\].*CASA∨ already"):
        CASAShared("replace")
