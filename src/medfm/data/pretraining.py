"""Random crops for pre-training, sampled in batches that share an anisotropy level and a crop shape.

The sampler, not the workers, draws every random choice: each batch is a list of :class:`SampleKey` whose
seeds are a pure function of ``(seed, batch number, rank)``. The data stream is therefore the same whatever
the number of workers, distinct per rank, and resumable exactly from a batch count.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MedfmError
from ..io import load_volume
from ..layers.anisotropy import TWO_D_ANISO_D, grid_anisotropy
from ..processing import MedicalImageProcessor
from .sources import VolumeInfo

__all__ = ["AnisotropyBatchSampler", "PretrainingDataset", "SampleKey", "anisotropy_level", "collate_samples"]


@dataclass(frozen=True)
class SampleKey:
    """One sample to draw: which volume, at which anisotropy level and crop shape, with which seed.

    ``two_d`` takes one random slice of the volume as a 2D image.
    """

    index: int
    aniso_d: int
    crop: tuple[int, int, int]
    seed: int
    two_d: bool = False


def _stable_seed(*parts: int) -> int:
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def anisotropy_level(info: VolumeInfo, patch: int = 16) -> int:
    """The SPAD ``aniso_d`` a volume is sampled at; a real 2D image (one slice) is 2D whatever its z-spacing."""
    return grid_anisotropy(info.shape[0], info.spacing, max_stride=patch)


class AnisotropyBatchSampler:
    """An endless stream of batches of :class:`SampleKey`, each batch from one anisotropy group.

    Volumes are grouped by their SPAD ``aniso_d``; a batch picks a group (weighted by its size) and draws its
    volumes from it. With ``slice_probability`` a batch is instead a batch of 2D slices (``aniso_d`` 5) from
    any volumes. The crop depth follows upstream: ``depth_tokens * max(patch >> aniso_d, 1)`` slices (one
    token deep for 2D), in-plane ``crop_size``.

    Args:
        infos: The probed volumes.
        batch_size: Samples per batch (per process).
        crop_size: In-plane crop size.
        depth_tokens: Tokens along depth in a crop.
        patch: The network's total stride (16 for SPAD).
        slice_probability: Fraction of batches made of 2D slices.
        seed: Seed of the whole stream.
        rank, world_size: This process and the number of processes; each rank draws its own batches.
        cubic: Crops are ``crop_size`` along every axis whatever the anisotropy (MiM's fixed 3D crops).
    """

    def __init__(
        self,
        infos: Sequence[VolumeInfo],
        batch_size: int,
        crop_size: int = 160,
        depth_tokens: int = 5,
        patch: int = 16,
        slice_probability: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cubic: bool = False,
    ):
        self.cubic = cubic
        self.batch_size, self.crop_size, self.depth_tokens, self.patch = (
            batch_size,
            crop_size,
            depth_tokens,
            patch,
        )
        self.slice_probability, self.seed, self.rank, self.world_size = (
            slice_probability,
            seed,
            rank,
            world_size,
        )
        groups: dict[int, list[int]] = defaultdict(list)
        for index, info in enumerate(infos):
            groups[anisotropy_level(info, patch)].append(index)
        self.groups = dict(sorted(groups.items()))
        self.num_volumes = len(infos)
        self.batches_drawn = 0  # set by load_state_dict to resume the stream

    def crop_for(self, aniso_d: int) -> tuple[int, int, int]:
        if self.cubic:
            return (self.crop_size, self.crop_size, self.crop_size)
        if aniso_d >= TWO_D_ANISO_D:
            return (1, self.crop_size, self.crop_size)
        return (self.depth_tokens * max(self.patch >> aniso_d, 1), self.crop_size, self.crop_size)

    def batch(self, number: int) -> list[SampleKey]:
        """Batch ``number`` of this rank's stream (a pure function of the seed, the number and the rank)."""
        rng = np.random.default_rng(_stable_seed(self.seed, number, self.rank, self.world_size))
        if rng.random() < self.slice_probability:
            aniso_d, members, two_d = TWO_D_ANISO_D, list(range(self.num_volumes)), True
        else:
            sizes = np.array([len(v) for v in self.groups.values()], dtype=float)
            aniso_d = list(self.groups)[int(rng.choice(len(sizes), p=sizes / sizes.sum()))]
            members, two_d = self.groups[aniso_d], False
        picks = rng.choice(members, size=self.batch_size, replace=True)
        crop = self.crop_for(aniso_d)
        return [SampleKey(int(i), aniso_d, crop, int(rng.integers(2**62)), two_d) for i in picks]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        number = self.batches_drawn
        while True:
            yield self.batch(number)
            number += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_drawn = int(state["batches_drawn"])


class PretrainingDataset(Dataset):
    """Random crops (with random flips) of pre-processed volumes, keyed by :class:`SampleKey`.

    Each volume goes through ``processor`` once (cached in float16, least recently used first out); crops are
    padded with the volume's minimum where the volume is smaller. A volume that fails to load is reported once
    by name and replaced by another volume of the key's anisotropy group (any volume for a 2D slice), so a
    corrupt file never stops a run and a batch never mixes levels.

    Args:
        infos: The probed volumes.
        processor: Intensity preprocessing (e.g. percentile clip to [0, 1] and grey to RGB).
        cache_size: Processed volumes kept in memory per worker.
        flips: Flip each crop along each axis with probability 1/2.
    """

    def __init__(
        self,
        infos: Sequence[VolumeInfo],
        processor: MedicalImageProcessor,
        cache_size: int = 4,
        patch: int = 16,
        flips: bool = True,
    ):
        self.flips = flips
        self.infos = list(infos)
        self.levels = [anisotropy_level(info, patch) for info in self.infos]
        self.processor = processor
        self.cache_size = cache_size
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.infos)

    def _volume(self, index: int) -> torch.Tensor:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        tensor, _ = self.processor.process_volume(load_volume(self.infos[index].path))
        tensor = tensor.to(torch.float16)  # half the memory; crops go back to float32
        self._cache[index] = tensor
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tensor

    def _load(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        # The key's volume first, then the others of its group (any volume for a 2D slice) in a fixed order.
        pool = (
            list(range(len(self.infos)))
            if key.two_d
            else [i for i, lv in enumerate(self.levels) if lv == key.aniso_d]
        )
        start = pool.index(key.index) if key.index in pool else 0
        for index in pool[start:] + pool[:start]:
            if index in self.bad:
                continue
            try:
                return self._volume(index), index
            except (MedfmError, OSError, ValueError, EOFError) as error:
                self.bad.add(index)
                warnings.warn(f"skipping {self.infos[index].path}: {error}", stacklevel=3)
        raise MedfmError(f"every volume of anisotropy group {key.aniso_d} failed to load")

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        volume, index = self._load(key)
        generator = torch.Generator().manual_seed(key.seed)
        if key.two_d:
            depth = int(torch.randint(volume.shape[1], (1,), generator=generator))
            volume = volume[:, depth : depth + 1]
        crop = _random_crop(volume, key.crop, generator).float()
        for axis in (1, 2, 3) if self.flips else ():
            if crop.shape[axis] > 1 and bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(axis)
        spacing = (1e8, *self.infos[index].spacing[1:]) if key.two_d else self.infos[index].spacing
        return {
            "pixel_values": crop.contiguous(),
            "spacing": torch.tensor(spacing, dtype=torch.float32),
            "aniso_d": key.aniso_d,
        }


def _random_crop(volume: torch.Tensor, crop: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    pads: list[int] = []
    for n, c in reversed(list(zip(volume.shape[1:], crop))):
        extra = max(c - n, 0)
        pads += [extra // 2, extra - extra // 2]
    if any(pads):
        volume = torch.nn.functional.pad(volume, pads, value=float(volume.min()))
    starts = [
        int(torch.randint(n - c + 1, (1,), generator=generator)) for n, c in zip(volume.shape[1:], crop)
    ]
    return volume[(slice(None), *(slice(s, s + c) for s, c in zip(starts, crop)))]


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; the batch shares one ``aniso_d`` (the sampler guarantees it)."""
    levels = {s["aniso_d"] for s in samples}
    if len(levels) != 1:
        raise ValueError(f"a batch mixes anisotropy levels {sorted(levels)}")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "spacing": torch.stack([s["spacing"] for s in samples]),
        "aniso_d": levels.pop(),
    }
