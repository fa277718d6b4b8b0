"""Attention over packed variable-length sequences (several volumes' tokens in one stream).

A packed batch is ``(1, total_tokens, ...)`` with ``cu_seqlens`` (cumulative sequence lengths, ``[0, n1,
n1 + n2, ...]``); tokens attend only within their own sequence. Two ways to run it:

* ``block_diagonal_mask(cu_seqlens)``: an additive mask for transformers' ``eager`` and ``sdpa``
  implementations (memory quadratic in the total length: a reference path);
* the ``"medfm_varlen"`` implementation registered with transformers' ``AttentionInterface``
  (``attn_implementation="medfm_varlen"``), linear in memory. Its backend (``MEDFM_VARLEN_BACKEND``):

  - ``auto`` (default): for fp16/bf16 CUDA tensors, flash-attn's ``flash_attn_varlen_func`` when flash-attn
    is installed, else medfm's own Triton kernel (:func:`medfm.kernels.flash_attention_varlen`; it has no
    dropout, so attention dropout in training falls back to SDPA); everything else runs SDPA on each
    sequence in turn (exact);
  - ``flash_attn``, ``triton`` or ``sdpa``: that backend, or an error saying why it cannot run.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.utils import ModelOutput

from ..kernels import flash_attention_varlen, triton_available

__all__ = [
    "VARLEN_BACKENDS",
    "VARLEN_BACKEND_ENV",
    "VARLEN_IMPLEMENTATION",
    "PackedSequenceOutput",
    "block_diagonal_mask",
    "pack_sequences",
    "packed_inputs",
    "register_varlen_attention",
    "varlen_attention_forward",
    "varlen_backend",
]

VARLEN_IMPLEMENTATION = "medfm_varlen"
VARLEN_BACKEND_ENV = "MEDFM_VARLEN_BACKEND"
VARLEN_BACKENDS = ("auto", "flash_attn", "triton", "sdpa")


def block_diagonal_mask(cu_seqlens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``(1, 1, T, T)`` mask: 0 within a sequence, the dtype's minimum across sequences."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=cu_seqlens.device), torch.tensor(lengths, device=cu_seqlens.device)
    )
    same = ids[:, None] == ids[None, :]
    mask = torch.zeros(same.shape, dtype=dtype, device=cu_seqlens.device)
    mask.masked_fill_(~same, torch.finfo(dtype).min)
    return mask[None, None]


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def varlen_backend(query: torch.Tensor, dropout: float = 0.0) -> str:
    """The backend ``medfm_varlen`` uses for ``query``: ``flash_attn``, ``triton`` or ``sdpa`` (see the module)."""
    choice = os.environ.get(VARLEN_BACKEND_ENV, "auto").strip().lower()
    if choice not in VARLEN_BACKENDS:
        raise ValueError(f"{VARLEN_BACKEND_ENV} must be one of {', '.join(VARLEN_BACKENDS)}; got {choice!r}")
    if choice == "flash_attn" and not (_flash_attn_installed() and query.is_cuda):
        raise RuntimeError(f"{VARLEN_BACKEND_ENV}=flash_attn needs flash-attn installed and CUDA tensors")
    if choice == "triton" and dropout > 0:
        raise ValueError(
            f"{VARLEN_BACKEND_ENV}=triton: medfm's kernel has no attention dropout (got {dropout})"
        )
    if choice != "auto":
        return choice
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_installed():
            return "flash_attn"
        if triton_available() and dropout == 0:
            return "triton"
    return "sdpa"


def _token_major(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``(1, heads, total, head_dim)`` to the varlen kernels' ``(total, heads, head_dim)`` (views)."""
    return [t[0].transpose(0, 1) for t in tensors]


def _triton_varlen(query, key, value, cu_seqlens, max_seqlen, scaling):
    q, k, v = _token_major(query, key, value)
    return flash_attention_varlen(q, k, v, cu_seqlens, scale=scaling, max_seqlen=max_seqlen)[None]


def _flash_varlen(query, key, value, cu_seqlens, max_seqlen, scaling, dropout):
    from flash_attn import flash_attn_varlen_func

    q, k, v = _token_major(query, key, value)  # flash-attn also takes int32 offsets
    offsets = cu_seqlens.to(torch.int32)
    longest = max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(
        q, k, v, offsets, offsets, longest, longest, dropout_p=dropout, softmax_scale=scaling
    )
    return out[None]  # (1, total, heads, head_dim)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed sequence; ``query``/``key``/``value`` are ``(1, heads, total, head_dim)``.

    ``cu_seqlens`` marks the sequences; ``max_seqlen``, their longest length when known on the host, spares the
    GPU kernels a read-back. Without ``cu_seqlens`` (an ordinary batch) this is plain SDPA. Returns
    ``(1, total, heads, head_dim)``.
    """
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(
            f"a packed batch has batch size 1 (all sequences in one stream); got {query.shape[0]}"
        )
    backend = varlen_backend(query, dropout)
    if backend == "flash_attn":
        return _flash_varlen(query, key, value, cu_seqlens, max_seqlen, scaling, dropout), None
    if backend == "triton":
        return _triton_varlen(query, key, value, cu_seqlens, max_seqlen, scaling), None
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        piece = [t[:, :, start:end] for t in (query, key, value)]
        outputs.append(F.scaled_dot_product_attention(*piece, dropout_p=dropout, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> None:
    """Make ``attn_implementation="medfm_varlen"`` available to every model (idempotent)."""
    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)


@dataclass
class PackedSequenceOutput(ModelOutput):
    """Output of a model run on a packed token stream (several sequences, no padding).

    Attributes:
        last_hidden_state: ``(total_tokens, E)``: each sequence's tokens in turn.
        pooler_output: ``(num_sequences, E)``: each sequence's pooled token.
        cu_seqlens: ``(num_sequences + 1,)`` offsets of the sequences in ``last_hidden_state``.
        grids: Token grid of each sequence.
        hidden_states: Per block (and the embeddings), ``(total_tokens, E)``, when asked.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    grids: tuple[tuple[int, ...], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def unpack(self, tensor: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Split a packed ``(total_tokens, ...)`` tensor (default: ``last_hidden_state``) into sequences."""
        tensor = self.last_hidden_state if tensor is None else tensor
        bounds = self.cu_seqlens.tolist()
        return [tensor[start:end] for start, end in itertools.pairwise(bounds)]


def pack_sequences(
    sequences: list[torch.Tensor], attn_implementation: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """Concatenate ``(L_i, E)`` sequences into one ``(1, T, E)`` stream.

    Returns the stream, ``cu_seqlens`` and the attention keyword arguments that keep attention within each
    sequence: ``cu_seqlens`` and ``max_seqlen`` (from the host, so no kernel reads offsets back from the GPU)
    for :data:`VARLEN_IMPLEMENTATION`, else a block-diagonal ``attention_mask`` for ``eager``/``sdpa`` (a
    reference path whose memory grows with the square of the total length).
    """
    if not sequences:
        raise ValueError("nothing to pack: at least one sequence is needed")
    hidden = torch.cat(sequences)[None]
    lengths = torch.tensor([len(s) for s in sequences], device=hidden.device)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    if attn_implementation == VARLEN_IMPLEMENTATION:
        kwargs: dict[str, object] = {"cu_seqlens": cu_seqlens, "max_seqlen": max(len(s) for s in sequences)}
    else:
        kwargs = {"attention_mask": block_diagonal_mask(cu_seqlens, hidden.dtype)}
    return hidden, cu_seqlens, kwargs


def packed_inputs(volumes: Any, spacings: Any = None) -> list[tuple[torch.Tensor, Any]]:
    """What a packed forward takes, as ``(volume, spacing)`` pairs with ``(C, D, H, W)`` volumes.

    ``volumes``: a list of tensors ``(C, D, H, W)`` / ``(C, H, W)``, a batched tensor ``(B, C, D, H, W)`` /
    ``(B, C, H, W)`` (each sample a sequence), a :class:`~medfm.io.MedicalVolume` (recognised by its ``array`` and
    ``spacing``) or a list mixing them. ``spacings``: one per volume (``None`` entries for 2D images or to take a
    volume's own), a ``(B, 3)`` tensor, or one ``(z, y, x)`` for all; explicit values override a volume's own.

    Raises:
        ValueError: No volume, a wrong shape, or as many spacings as volumes missing.
        TypeError: A volume that is neither a tensor nor a MedicalVolume.
    """
    if isinstance(volumes, torch.Tensor):
        if volumes.ndim not in (4, 5):
            raise ValueError(
                "a batched tensor of volumes must be (B, C, D, H, W) or (B, C, H, W); "
                f"got {tuple(volumes.shape)} (pass a list for volumes of different shapes)"
            )
        volumes = list(volumes.unbind(0))
    elif hasattr(volumes, "array") and hasattr(volumes, "spacing"):  # one MedicalVolume
        volumes = [volumes]
    volumes = list(volumes)
    if not volumes:
        raise ValueError("nothing to pack: at least one volume is needed")
    one_tensor = isinstance(spacings, torch.Tensor) and spacings.ndim == 1
    three_numbers = (
        spacings is not None
        and not isinstance(spacings, torch.Tensor)
        and len(spacings) == 3
        and all(value is not None and not hasattr(value, "__len__") for value in spacings)
    )
    if one_tensor or three_numbers:
        spacings = [spacings] * len(volumes)
    if spacings is not None and len(spacings) != len(volumes):
        raise ValueError(f"got {len(spacings)} spacings for {len(volumes)} volumes")
    pairs = []
    for index, volume in enumerate(volumes):
        spacing = spacings[index] if spacings is not None else None
        if not isinstance(volume, torch.Tensor):
            if not (hasattr(volume, "array") and hasattr(volume, "spacing")):
                raise TypeError(
                    f"volume {index} is a {type(volume).__name__}; expected a tensor or a MedicalVolume"
                )
            if spacing is None:
                spacing = tuple(float(value) for value in volume.spacing)
            volume = torch.tensor(volume.array)  # a copy, (C, D, H, W); a 2D image has D == 1
        if volume.ndim == 3:
            volume = volume.unsqueeze(1)  # (C, H, W): one slice
        if volume.ndim != 4:
            raise ValueError(f"volume {index} must be (C, D, H, W) or (C, H, W); got {tuple(volume.shape)}")
        pairs.append((volume, spacing))
    return pairs
