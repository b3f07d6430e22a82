"""Mixed precision reaches every attention kernel in one dtype (issue 14, item 6).

Under `precision: bf16-mixed` (torch.autocast bf16 over fp32 weights) the projections give
bf16 while the RoPE tables, the image-token norm and Qwen3's q/k norms used to give fp32:
q and k came out fp32 next to a bf16 v, and CASA's window layout refused the mix."""

import inspect

import pytest
import torch

from casa.fusion import CASA
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion, fusion_class, names
from tests.builders import flash_stand_in, strict_flash_attn_varlen_func

LAYOUT = [[("text", 5), ("image", (4, 4)), ("text", 7)], [("image", (2, 4)), ("text", 6), ("image", (2, 2)), ("text", 3)]]


def _dtypes_seen(monkeypatch):
    """Record (q, k, v) dtypes of every attention call (every layer calls its bound backend)."""
    from casa.attention import AttentionBackend

    seen, depth = [], [0]
    inner = AttentionBackend.__call__

    def spy(self, q, k, v, *args, **kwargs):
        if not depth[0]:  # the layers' calls, not the fp32 reference inside the flash stand-in
            k0, v0 = (k, v) if isinstance(k, torch.Tensor) else (k[0], v[0])
            seen.append((q.dtype, k0.dtype, v0.dtype))
        depth[0] += 1
        try:
            return inner(self, q, k, v, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(AttentionBackend, "__call__", spy)
    return seen


# every strategy on Llama; the family-specific paths (Qwen3's q/k norms, Helium's interleaved
# RoPE, Qwen2's biases) are shared by the windowed strategies, so two of them cover those
CASES = [(s, "llama") for s in names()] + [(s, f) for s in ("casa_plus", "cross_attention")
                                              for f in ("qwen3", "helium", "qwen2")]


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("strategy,family", CASES)
def test_training_step_under_bf16_autocast(strategy, family, backend, monkeypatch):
    """Forward + backward of every strategy under CPU bf16 autocast: finite loss, fp32 gradients
    on the fp32 weights, and every attention call gets q, k, v in bf16 (the strict flash
    stand-in refuses anything else)."""
    # a strategy with a `backend` of its own runs on `backend` too (CASA/CA's default follows the
    # backbone anyway; the Q-Former's default is sdpa, so its flash path is reached this way)
    own = {"backend": backend} if "backend" in inspect.signature(fusion_class(strategy)).parameters else {}
    model = tiny_model(build_fusion(strategy, **own), family=family, num_layers=2, attn_backend=backend)
    batch = random_packed_batch(LAYOUT)
    seen = _dtypes_seen(monkeypatch)
    with flash_stand_in(model=model), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_loss_is_close_to_fp32():
    """The casts are where autocast would put them: the bf16 loss is the fp32 loss to bf16 rounding."""
    model = tiny_model(CASA(mode="plus"), num_layers=2)
    batch = random_packed_batch(LAYOUT)
    with torch.no_grad():
        ref = model(batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(batch).loss
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=2e-2)


def test_image_kv_returns_one_dtype_under_autocast():
    from casa.backbone import Backbone
    from casa.image_kv import image_kv
    from casa.tiny import tiny_backbone_config

    bb = Backbone("llama", config=tiny_backbone_config("llama"))
    block = bb.layers[0]
    x = torch.randn(6, bb.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = bb.rope(torch.arange(6), x.dtype)
        k, v = image_kv(block.self_attn, block.input_layernorm, x, cos, sin, block.family)
    assert cos.dtype == k.dtype == v.dtype == torch.bfloat16
    (k.float().sum() + v.float().sum()).backward()
    assert x.grad.dtype == torch.float32 and block.self_attn.k_proj.weight.grad.dtype == torch.float32


def test_flash_takes_the_autocast_dtype_and_refuses_plain_fp32():
    """fp32 q/k/v go down to the autocast dtype (as Hugging Face's flash path does); without
    autocast the error names the settings that give half precision."""
    from casa.attention import varlen_attention

    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with flash_stand_in():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = varlen_attention(q, k, v, cu, cu, True, "flash")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), varlen_attention(q, k, v, cu, cu, True, "dense"), atol=3e-2, rtol=0)
        with pytest.raises(ValueError, match=r"backend='flash' takes.*float32.*trainer.precision.*bf16-mixed"
                                             r".*fsdp_param_dtype.*Backbone.dtype"):
            varlen_attention(q, k, v, cu, cu, True, "flash")


CONTRACT = {  # what the strict stand-in refuses, as flash-attn's kernel does
    "fp32": (lambda q, k, v, cq, ck: (q.float(), k.float(), v.float(), cq, ck, 3, 3), "fp16 and bf16"),
    "mixed dtypes": (lambda q, k, v, cq, ck: (q, k.half(), v, cq, ck, 3, 3), "same dtype"),
    "int64 cu_seqlens": (lambda q, k, v, cq, ck: (q, k, v, cq.long(), ck, 3, 3), "int32"),
    "strided rows": (lambda q, k, v, cq, ck: (q, k.transpose(0, 2).contiguous().transpose(0, 2), v, cq, ck, 3, 3),
                     "contiguous last dimension"),
    "tensor max_seqlen": (lambda q, k, v, cq, ck: (q, k, v, cq, ck, torch.tensor(3), 3),
                          "max_seqlen_q must be a Python int"),
    "cu_seqlens elsewhere": (lambda q, k, v, cq, ck: (q, k, v, cq, ck.to("meta"), 3, 3), "cu_seqlens_k must be on q's"),
    "dropout": (lambda q, k, v, cq, ck: (q, k, v, cq, ck, 3, 3, 0.1), "dropout"),
    "short max_seqlen": (lambda q, k, v, cq, ck: (q, k, v, cq, ck, 2, 3), "below the longest"),
    "gqa": (lambda q, k, v, cq, ck: (q, k[:, :1].expand(-1, 3, -1).contiguous(), v[:, :1].expand(-1, 3, -1)
                                     .contiguous(), cq, ck, 3, 3), "must divide"),
    "head dim": (lambda q, k, v, cq, ck: (q.repeat(1, 1, 40), k.repeat(1, 1, 40), v.repeat(1, 1, 40), cq, ck, 3, 3),
                 "at most|<= 256"),
}


@pytest.mark.parametrize("case", list(CONTRACT))
def test_strict_flash_stand_in_enforces_the_contract(case):
    q = torch.randn(5, 4, 8, dtype=torch.bfloat16)
    k, v = torch.randn(5, 2, 8, dtype=torch.bfloat16), torch.randn(5, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    strict_flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, causal=True)  # the valid call runs
    make, message = CONTRACT[case]
    with pytest.raises(RuntimeError, match=message):
        strict_flash_attn_varlen_func(*make(q, k, v, cu, cu), causal=True)


# ---------------------------------------------------------------------- through experiments.fit
def test_fit_with_bf16_mixed_precision_trains_the_tiny_config(in_tmp):
    """`--trainer.precision bf16-mixed` (what trainer/ddp.yaml sets) on the tiny config: trains
    and validates, on CPU autocast. It raised in CASA's window layout before."""
    from experiments.fit import main
    from tests.test_configs import DEMO, TINY, finished, fit_args

    main(fit_args([DEMO, TINY], in_tmp / "run", "--trainer.precision", "bf16-mixed"))
    assert "val/loss" in finished(in_tmp / "run", 2)["metrics"]


def test_fit_runs_flash_under_bf16_mixed_and_refuses_it_in_fp32(in_tmp, capsys):
    """The paper configs' `attn_backend: flash` (CPU stand-in here): bf16-mixed reaches the
    kernel in bf16 through fit; 32-true fails at startup naming the fields and choices."""
    from experiments.fit import main
    from tests.test_configs import DEMO, TINY, finished, fit_args

    flash = ["--model.model.init_args.backbone.init_args.attn_backend", "flash"]
    with flash_stand_in():
        main(fit_args([DEMO, TINY], in_tmp / "bf16", *flash, "--trainer.precision", "bf16-mixed"))
        finished(in_tmp / "bf16", 2)
        with pytest.raises(SystemExit) as exit_:
            main(fit_args([DEMO, TINY], in_tmp / "fp32", *flash, "--trainer.precision", "32-true"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for needle in ("backend='flash'", "fp16/bf16 only", "trainer.precision='32-true'", "bf16-mixed",
                   "fsdp_param_dtype"):
        assert needle in err, err[-2000:]
    with pytest.raises(SystemExit):  # no stand-in, no CUDA: flash cannot run here at all
        main(fit_args([DEMO, TINY], in_tmp / "cpu", *flash, "--trainer.precision", "bf16-mixed"))
    assert "needs CUDA" in capsys.readouterr().err


def test_inference_picks_bf16_for_flash_on_cuda():
    from casa.rebuild import resolve_precision, run_precision

    flash, sdpa = (tiny_model(CASA(mode="plus"), num_layers=2, attn_backend=b) for b in ("flash", "sdpa"))
    assert resolve_precision("32", {}, flash, "cuda") == "bf16-true"  # flash-attn takes no fp32
    assert resolve_precision("32", {}, flash, "cpu") == "32" and resolve_precision("32", {}, sdpa, "cuda") == "32"
    # "run": the precision the run validated in
    fsdp = {"model": {"fsdp_param_dtype": "bfloat16"},
            "trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}}}
    assert run_precision(fsdp) == "bf16-true" and run_precision({"trainer": {"precision": "bf16-mixed"}}) == "bf16-mixed"
    assert run_precision({"model": {"fsdp_param_dtype": "bfloat16"}}) == "32"  # fsdp_param_dtype without FSDP2
    assert resolve_precision("run", {"trainer": {"precision": "bf16"}}, sdpa, "cpu") == "bf16-mixed"
    with pytest.raises(ValueError, match="precision='fp8' is not one of"):
        resolve_precision("fp8", {}, sdpa, "cpu")


def test_vision_flash_attention_2_without_flash_attn_fails_naming_the_field():
    import importlib.util

    from casa.vision import VisionEncoder, tiny_vision_config

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: the tower builds")  # the GPU lane
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' needs the flash-attn.*'sdpa'"):
        VisionEncoder(config=tiny_vision_config(), attn_implementation="flash_attention_2")


@pytest.fixture
def in_tmp(tmp_path, tmp_path_factory, monkeypatch):
    from tests.test_configs import in_tmp as fixture

    return fixture.__wrapped__(tmp_path, tmp_path_factory, monkeypatch)
