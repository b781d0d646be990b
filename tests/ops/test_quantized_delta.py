"""The sparse-delta op on a bitsandbytes-quantized weight against a dense reference: the same output,
input gradient and value gradient as ``F.linear(x, deq(Wq) [+ a U V] + scatter(v))`` with autograd
through a dense weight, and the packed weight untouched."""
import pytest
import torch

from sparse_ft.errors import ConfigError
from sparse_ft.quant import bnb_status, dequantize, is_repacked_for_cpu, keep_standard_4bit_layout, roundtrip

pytestmark = pytest.mark.skipif(bnb_status() is not None, reason=str(bnb_status()))


def quantized_linear(kind: str, out_f: int = 48, in_f: int = 64, bias: bool = True, seed: int = 0):
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                                  quant_storage=torch.float32)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.float32,
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_f, generator=gen) * 0.1, requires_grad=False)
    return layer.to("cpu"), w


def sample(numel: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].sort().values.int()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("with_fold", [False, True])
def test_matches_dense_reference(kind, with_fold):
    from sparse_ft.ops import quantized_sparse_delta_linear

    layer, _ = quantized_linear(kind)
    m, n = layer.out_features, layer.in_features
    packed_before = layer.weight.data.clone()
    idx = sample(m * n, 150)
    gen = torch.Generator().manual_seed(2)
    values = (0.1 * torch.randn(idx.numel(), generator=gen)).requires_grad_()
    x = torch.randn(3, 5, n, generator=gen).requires_grad_()
    fold = None
    if with_fold:
        fold = (0.1 * torch.randn(m, 4, generator=gen), 0.1 * torch.randn(4, n, generator=gen), 0.7)
    y = quantized_sparse_delta_linear(x, layer.weight, layer.bias, values, idx, fold=fold)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()

    dense = dequantize(layer.weight)
    if with_fold:
        dense = dense + fold[2] * fold[0] @ fold[1]
    dense = dense.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    delta = torch.zeros(m * n).index_put((idx.long(),), values.detach()).view(m, n)
    y_ref = torch.nn.functional.linear(x_ref, dense + delta, layer.bias)
    (y_ref * dy).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[idx.long()], rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None
    # Packed 4-bit bytes in fp32 storage include NaN bit patterns: compare bytes.
    assert torch.equal(layer.weight.data.view(torch.uint8), packed_before.view(torch.uint8)), "packed weight changed"


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_roundtrip_reproduces_the_loaded_weight(kind):
    """Export re-quantizes the unquantized checkpoint: it must land on the very weight that trained."""
    layer, w = quantized_linear(kind)
    spec = {"scheme": "int8"} if kind == "int8" else {"scheme": "nf4", "blocksize": 64, "double_quant": True,
                                                       "quant_storage": "fp32"}
    assert torch.equal(roundtrip(w, spec), dequantize(layer.weight))
    assert not torch.equal(dequantize(layer.weight), w)  # it is a real quantization


def test_layers_on_a_quantized_base(bnb_cpu_path):
    """Random Masking's layer takes the dequantize path; LoRA's frozen part is the bnb layer itself.
    Both, and an untargeted bnb layer in eval mode, compute ``x deq(Wq)^T + b`` on either bitsandbytes
    CPU path, and leave the packed weight in its standard layout."""
    from sparse_ft.methods.lora.layer import LoRALinear
    from sparse_ft.methods.random_mask.layer import SparseDeltaLinear

    base, _ = quantized_linear("nf4")
    untargeted, _ = quantized_linear("nf4", seed=3)
    model = torch.nn.Sequential(base, untargeted).eval()
    assert keep_standard_4bit_layout(model) == (2 if bnb_cpu_path == "avx512bf16" else 0)
    x = torch.randn(4, base.in_features)
    want = torch.nn.functional.linear(x, dequantize(base.weight), base.bias)
    sparse = SparseDeltaLinear(base, sample(base.out_features * base.in_features, 40))
    lora = LoRALinear(base, r=4, alpha=8)
    assert sparse.quantized and lora.quantized
    assert tuple(sparse.delta_weight().shape) == (base.out_features, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)  # zero values: the base layer
        torch.testing.assert_close(lora(x), want, rtol=1e-5, atol=1e-5)  # B = 0: the base layer
        x2 = torch.randn(4, untargeted.in_features)
        torch.testing.assert_close(untargeted(x2), torch.nn.functional.linear(x2, dequantize(untargeted.weight),
                                                                              untargeted.bias), rtol=1e-5, atol=1e-5)
    assert not any(is_repacked_for_cpu(m.weight) for m in model)


# Shapes bitsandbytes' AVX512-BF16 repacking accepts (rows a multiple of 32, input width a multiple
# of the 64-entry block) and one it refuses (the input width of the tiny test model's down_proj).
@pytest.mark.parametrize("out_f,in_f,bnb_accepts", [(64, 128, True), (64, 96, False)])
def test_forced_avx512bf16_path_is_what_sparse_ft_keeps_layers_off(monkeypatch, bnb_cpu_path, out_f, in_f,
                                                                  bnb_accepts):
    """The other tests force bitsandbytes' CPU path by patching its detection; this checks that the
    forcing is real (an eval-mode forward of a bare bnb layer repacks it, or fails as on AVX512-BF16
    CPUs for shapes the repacking cannot take) and that a layer sparse-ft has seen does neither.
    bitsandbytes' native packed kernel is replaced by a recorder: it needs AVX512-BF16 to execute, and
    what is checked here is which path bitsandbytes chooses, not its kernel's arithmetic."""
    import bitsandbytes.functional as F

    calls = []
    monkeypatch.setattr(F, "gemv_4bit", lambda A, B, out=None, state=None, **k: calls.append(B.shape) or
                        torch.zeros(*A.shape[:-1], state.shape[0], dtype=A.dtype))
    bare, _ = quantized_linear("nf4", out_f, in_f)
    guarded, _ = quantized_linear("nf4", out_f, in_f)
    bare.eval(), guarded.eval()
    x = torch.randn(3, in_f)
    want = torch.nn.functional.linear(x, dequantize(guarded.weight), guarded.bias)
    packed_path = bnb_cpu_path == "avx512bf16"
    with torch.no_grad():
        if packed_path and not bnb_accepts:
            with pytest.raises(RuntimeError, match="is invalid for input of size"):
                bare(x)
        else:
            bare(x)
            assert is_repacked_for_cpu(bare.weight) == packed_path and len(calls) == int(packed_path)
        if packed_path and bnb_accepts:
            with pytest.raises(ConfigError, match="repacked this 4-bit weight"):
                keep_standard_4bit_layout(torch.nn.Sequential(bare))
        calls.clear()
        keep_standard_4bit_layout(torch.nn.Sequential(guarded))
        got = guarded(x)
    assert not calls and not is_repacked_for_cpu(guarded.weight)
    # Both sides dequantize the same bytes to the same fp32 weight and run one fp32 matmul of width
    # in_f <= 128: they differ at most by summation order, |err| <= in_f * 2^-24 * sum|x||w| (~1e-6 here).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
