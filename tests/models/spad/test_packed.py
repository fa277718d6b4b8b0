"""Packed variable-length sequences: volumes of different shapes and spacings in one token stream give the
same outputs and gradients as each volume alone, with every attention implementation."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import medfm  # noqa: F401  (registers medfm_varlen)
from medfm.layers import VARLEN_IMPLEMENTATION, block_diagonal_mask
from medfm.layers.varlen_attention import varlen_attention_forward
from medfm.models.spad import SpadViTConfig, SpadViTModel

from ...common.tiny_models import TINY_PACKING_VIT as TINY
from ...common.tiny_models import mixed_volumes


@pytest.mark.parametrize("implementation", ["eager", "sdpa", VARLEN_IMPLEMENTATION])
def test_packed_equals_each_volume_alone(implementation: str) -> None:
    torch.manual_seed(0)
    model = SpadViTModel(SpadViTConfig(**TINY)).eval()
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation  # the switch really applies
    volumes = mixed_volumes()
    calls: list = []

    def spy(*args, **kwargs):  # proves the packed stream reaches the varlen function with its offsets
        calls.append((kwargs.get("cu_seqlens"), kwargs.get("max_seqlen")))
        return varlen_attention_forward(*args, **kwargs)

    AttentionInterface.register(VARLEN_IMPLEMENTATION, spy)
    try:
        with torch.no_grad():
            packed = model.forward_packed(
                [v for v, _ in volumes], spacings=[s for _, s in volumes], output_hidden_states=True
            )
            # A 3D volume becomes (1, C, D, H, W); the 2D image (1, C, H, W), which the model reads as one slice.
            alone = [model(v[None], spacing=s, output_hidden_states=True) for v, s in volumes]
    finally:
        AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)
    if implementation == VARLEN_IMPLEMENTATION:
        assert calls and calls[0][0].tolist() == [0, 25, 34, 47] and calls[0][1] == 25
    else:
        assert not calls
    assert packed.cu_seqlens.tolist() == [0, 25, 34, 47]
    assert packed.grids == ((4, 2, 3), (2, 2, 2), (1, 3, 4))
    for pieces, single in zip(packed.unpack(), alone):
        torch.testing.assert_close(pieces, single.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        packed.pooler_output, torch.cat([a.pooler_output for a in alone]), atol=1e-5, rtol=1e-5
    )
    for layer in range(len(packed.hidden_states)):
        for pieces, single in zip(packed.unpack(packed.hidden_states[layer]), alone):
            torch.testing.assert_close(pieces, single.hidden_states[layer][0], atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_separate_gradients() -> None:
    torch.manual_seed(0)
    model = SpadViTModel(SpadViTConfig(**TINY)).train()
    model.set_attn_implementation(VARLEN_IMPLEMENTATION)
    volumes = mixed_volumes()
    model.forward_packed([v for v, _ in volumes], spacings=[s for _, s in volumes]).last_hidden_state.pow(
        2
    ).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for volume, spacing in volumes:
        model(volume[None], spacing=spacing).last_hidden_state.pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(packed[name], parameter.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_block_diagonal_mask_and_varlen_reference() -> None:
    mask = block_diagonal_mask(torch.tensor([0, 2, 5]))
    blocked = mask[0, 0] < 0
    assert blocked.shape == (5, 5) and not blocked[:2, :2].any() and not blocked[2:, 2:].any()
    assert blocked[:2, 2:].all() and blocked[2:, :2].all()
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    plain, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=8**-0.5)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(plain, reference)
    with pytest.raises(ValueError, match="batch size 1"):
        varlen_attention_forward(
            torch.nn.Module(), q, k, v, None, scaling=1.0, cu_seqlens=torch.tensor([0, 3, 7])
        )
    with pytest.raises(ValueError, match="at least one volume"):
        SpadViTModel(SpadViTConfig(**TINY)).forward_packed([])


def test_varlen_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfm.layers.varlen_attention import VARLEN_BACKEND_ENV, varlen_backend

    query = torch.randn(1, 2, 5, 8)
    assert varlen_backend(query) == "sdpa"  # auto on CPU: exact per-sequence SDPA
    monkeypatch.setenv(VARLEN_BACKEND_ENV, "sdpa")
    assert varlen_backend(query) == "sdpa"
    monkeypatch.setenv(VARLEN_BACKEND_ENV, "triton")
    assert varlen_backend(query) == "triton"
    with pytest.raises(ValueError, match="no attention dropout"):
        varlen_backend(query, dropout=0.1)
    monkeypatch.setenv(VARLEN_BACKEND_ENV, "flash_attn")
    with pytest.raises(RuntimeError, match="flash-attn installed and CUDA"):
        varlen_backend(query)
    monkeypatch.setenv(VARLEN_BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match="must be one of"):
        varlen_backend(query)


def test_fused_rope_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfm.layers.rope import FUSED_ROPE_ENV, _fused_rope_wanted

    x = torch.randn(1, 3, 2, 8)
    assert not _fused_rope_wanted(x)  # auto: CUDA tensors only
    monkeypatch.setenv(FUSED_ROPE_ENV, "1")
    assert _fused_rope_wanted(x)
    monkeypatch.setenv(FUSED_ROPE_ENV, "off")
    assert not _fused_rope_wanted(x)
    monkeypatch.setenv(FUSED_ROPE_ENV, "maybe")
    with pytest.raises(ValueError, match="auto, 1 or 0"):
        _fused_rope_wanted(x)


def _assert_same_packed(a, b) -> None:
    assert a.cu_seqlens.tolist() == b.cu_seqlens.tolist() and a.grids == b.grids
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-6, rtol=1e-6)


def test_packed_takes_a_batched_tensor() -> None:
    """Each sample of a (B, C, D, H, W) batch is one sequence, as in the list form."""
    torch.manual_seed(0)
    model = SpadViTModel(SpadViTConfig(**TINY)).eval()
    batch = torch.randn(2, 3, 16, 32, 48)
    spacings = [(2.0, 0.5, 0.5), (4.0, 0.5, 0.5)]
    with torch.no_grad():
        listed = model.forward_packed(list(batch), spacings=spacings)
        _assert_same_packed(model.forward_packed(batch, spacings=spacings), listed)
        _assert_same_packed(model.forward_packed(batch, spacings=torch.tensor(spacings)), listed)
        # One spacing for every sample.
        same = model.forward_packed(list(batch), spacings=[(2.0, 0.5, 0.5)] * 2)
        _assert_same_packed(model.forward_packed(batch, spacings=(2.0, 0.5, 0.5)), same)
        _assert_same_packed(model.forward_packed(batch, spacings=torch.tensor([2.0, 0.5, 0.5])), same)
        # A (B, C, H, W) image batch: each image one slice.
        images = torch.randn(2, 3, 48, 64)
        _assert_same_packed(model.forward_packed(images), model.forward_packed(list(images)))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) or \(B, C, H, W\)"):
        model.forward_packed(torch.randn(3, 16, 32))
    with pytest.raises(ValueError, match="3 spacings for 2 volumes"):
        model.forward_packed(batch, spacings=[(2.0, 0.5, 0.5)] * 3)


def test_packed_takes_medical_volumes() -> None:
    """A MedicalVolume brings its array and its spacing; mixed with tensors in one list."""
    from medfm.io import MedicalVolume
    from medfm.io.volume import affine_from_spacing

    torch.manual_seed(0)
    model = SpadViTModel(SpadViTConfig(**TINY)).eval()
    volumes = mixed_volumes()
    medical = [MedicalVolume(array=v.numpy(), affine=affine_from_spacing(s)) for v, s in volumes[:2]] + [
        MedicalVolume(array=volumes[2][0][:, None].numpy(), affine=affine_from_spacing((1.0, 0.8, 0.8)))
    ]
    with torch.no_grad():
        listed = model.forward_packed([v for v, _ in volumes], spacings=[s for _, s in volumes])
        _assert_same_packed(model.forward_packed(medical), listed)  # spacings from the volumes
        mixed = [medical[0], volumes[1][0], medical[2]]
        _assert_same_packed(model.forward_packed(mixed, spacings=[None, (1.0, 1.0, 1.0), None]), listed)
        one = model.forward_packed(medical[0])
        _assert_same_packed(one, model.forward_packed([volumes[0][0]], spacings=[volumes[0][1]]))
        # Explicit spacings override the volumes' own: 4 mm slices give another anisotropy level.
        other = model.forward_packed([medical[0]], spacings=[(4.0, 0.5, 0.5)])
        assert other.grids[0] != one.grids[0]
    with pytest.raises(TypeError, match="expected a tensor or a MedicalVolume"):
        model.forward_packed([volumes[0][0].numpy()])
