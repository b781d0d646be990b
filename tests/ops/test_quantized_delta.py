"""The sparse-delta op on a bitsandbytes-quantized weight against a dense reference: the same output,
input gradient and value gradient as ``F.linear(x, deq(Wq) [+ a U V] + scatter(v))`` with autograd
through a dense weight, and the packed weight untouched."""
import pytest
import torch

from sparse_ft.quant import bnb_status, dequantize, roundtrip

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


def test_layers_on_a_quantized_base():
    """Random Masking's layer takes the dequantize path; LoRA's frozen part is the bnb layer itself."""
    from sparse_ft.methods.lora.layer import LoRALinear
    from sparse_ft.methods.random_mask.layer import SparseDeltaLinear

    base, _ = quantized_linear("nf4")
    x = torch.randn(4, base.in_features)
    with torch.no_grad():
        want = base(x)
    sparse = SparseDeltaLinear(base, sample(base.out_features * base.in_features, 40))
    lora = LoRALinear(base, r=4, alpha=8)
    assert sparse.quantized and lora.quantized
    assert tuple(sparse.delta_weight().shape) == (base.out_features, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)  # zero values: the base layer
        torch.testing.assert_close(lora(x), want, rtol=1e-5, atol=1e-5)  # B = 0: the base layer
