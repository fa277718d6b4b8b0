"""Packing helpers: inputs of every accepted form, the packed stream, its offsets and attention arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.io import MedicalVolume
from medfm.layers.varlen_attention import (
    VARLEN_IMPLEMENTATION,
    PackedSequenceOutput,
    block_diagonal_mask,
    pack_sequences,
    packed_inputs,
)


def test_packed_inputs_accepts_lists_batches_and_volumes() -> None:
    batch = torch.randn(2, 1, 4, 8, 8)
    pairs = packed_inputs(batch, spacings=(2.0, 1.0, 1.0))
    assert [v.shape for v, _ in pairs] == [(1, 4, 8, 8)] * 2 and [s for _, s in pairs] == [
        (2.0, 1.0, 1.0)
    ] * 2
    volume = MedicalVolume.from_array(np.ones((3, 8, 8), dtype=np.float32), spacing=(3.0, 0.5, 0.5))
    image = torch.randn(1, 8, 8)  # (C, H, W): one slice
    (v1, s1), (v2, s2) = packed_inputs([volume, image])
    assert s1 == (3.0, 0.5, 0.5) and v1.shape == (1, 3, 8, 8) and s2 is None and v2.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="2 spacings for 1 volumes"):
        packed_inputs([image], spacings=[None, None])
    with pytest.raises(TypeError, match="expected a tensor or a MedicalVolume"):
        packed_inputs(["ct.nii.gz"])
    with pytest.raises(ValueError, match="at least one volume"):
        packed_inputs([])


def test_pack_sequences_offsets_and_attention_arguments() -> None:
    sequences = [torch.randn(3, 4), torch.randn(5, 4)]
    hidden, cu_seqlens, kwargs = pack_sequences(sequences, "sdpa")
    assert hidden.shape == (1, 8, 4) and cu_seqlens.tolist() == [0, 3, 8]
    torch.testing.assert_close(kwargs["attention_mask"], block_diagonal_mask(cu_seqlens))
    _, _, varlen = pack_sequences(sequences, VARLEN_IMPLEMENTATION)
    assert varlen["max_seqlen"] == 5 and varlen["cu_seqlens"].tolist() == [0, 3, 8]
    output = PackedSequenceOutput(last_hidden_state=hidden[0], cu_seqlens=cu_seqlens)
    assert [torch.equal(a, b) for a, b in zip(output.unpack(), sequences)] == [True, True]
