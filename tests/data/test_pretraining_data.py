"""Pre-training data: discovery, bad files, anisotropy-grouped deterministic batches, crops and slices."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medfm.data import (
    AnisotropyBatchSampler,
    PretrainingDataset,
    SampleKey,
    collate_samples,
    discover_volumes,
    probe_volumes,
)
from medfm.errors import DatasetError
from medfm.processing import MedicalImageProcessor

from ..conftest import NIBABEL_DATA

PROCESSOR = MedicalImageProcessor(
    steps=[{"name": "percentile_clip"}, {"name": "repeat_channels", "num_channels": 3}]
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    shutil.copy(NIBABEL_DATA / "anatomical.nii", data / "a.nii")  # 2 mm isotropic: aniso_d 0
    shutil.copy(NIBABEL_DATA / "resampled_anat_moved.nii", data / "sub" / "thick.nii")  # 8 / 4 mm: aniso_d 1
    (data / "bad.nii.gz").write_bytes(b"not a nifti at all")
    (data / "notes.txt").write_text("ignored")
    return data


def test_discovery_and_bad_headers_skipped_with_a_warning(folder: Path) -> None:
    paths = discover_volumes(folder)
    assert sorted(p.name for p in paths) == ["a.nii", "bad.nii.gz", "thick.nii"]
    with pytest.warns(UserWarning, match=r"skipping .*bad\.nii\.gz"):
        infos = probe_volumes(paths)
    assert {i.path.name: i.spacing for i in infos} == {"a.nii": (2.0, 2.0, 2.0), "thick.nii": (8.0, 4.0, 4.0)}
    listing = folder / "dataset.json"
    listing.write_text(
        json.dumps({"training": [{"image": "./a.nii", "label": "x"}], "test": ["./sub/thick.nii"]})
    )
    assert [p.name for p in discover_volumes(listing)] == ["a.nii", "thick.nii"]


def test_empty_sources_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no NIfTI file"):
        discover_volumes(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such folder"):
        discover_volumes(tmp_path / "missing")
    (tmp_path / "junk.nii").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 1 candidate"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe_volumes([tmp_path / "junk.nii"])


def test_batches_are_grouped_deterministic_and_distinct_per_rank(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = probe_volumes(discover_volumes(folder))
    sampler = AnisotropyBatchSampler(infos, batch_size=3, crop_size=32, depth_tokens=2, seed=5)
    assert set(sampler.groups) == {0, 1}
    stream = iter(sampler)
    first = [next(stream) for _ in range(20)]
    for batch in first:
        assert len({k.aniso_d for k in batch}) == 1  # one anisotropy level per batch
        level = batch[0].aniso_d
        assert all(infos[k.index].path.name == ("a.nii" if level == 0 else "thick.nii") for k in batch)
        assert batch[0].crop == (2 * (16 >> level), 32, 32)
    # A pure function of the batch number: resuming at batch 7 continues the same stream.
    sampler.load_state_dict({"batches_drawn": 7})
    assert next(iter(sampler)) == first[7] == sampler.batch(7)
    other_rank = AnisotropyBatchSampler(infos, 3, crop_size=32, depth_tokens=2, seed=5, rank=1, world_size=2)
    this_rank = AnisotropyBatchSampler(infos, 3, crop_size=32, depth_tokens=2, seed=5, rank=0, world_size=2)
    assert [other_rank.batch(i) for i in range(5)] != [this_rank.batch(i) for i in range(5)]


def test_crops_slices_and_corrupt_data_at_load_time(folder: Path, tmp_path: Path) -> None:
    truncated = folder / "truncated.nii.gz"
    whole = (NIBABEL_DATA / "example4d.nii.gz").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])  # the header reads, the voxels do not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = probe_volumes(discover_volumes(folder))
    assert "truncated.nii.gz" in {i.path.name for i in infos}
    dataset = PretrainingDataset(infos, PROCESSOR)
    sampler = AnisotropyBatchSampler(
        infos, batch_size=4, crop_size=32, depth_tokens=2, slice_probability=0.5, seed=1
    )
    seen_two_d = seen_three_d = False
    with pytest.warns(UserWarning, match=r"skipping .*truncated\.nii\.gz"):
        for number in range(12):
            batch = collate_samples([dataset[key] for key in sampler.batch(number)])
            values = batch["pixel_values"]
            assert values.shape[:2] == (4, 3) and torch.isfinite(values).all()
            assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
            if batch["aniso_d"] == 5:
                seen_two_d = True
                assert values.shape[2] == 1 and (batch["spacing"][:, 0] == 1e8).all()
            else:
                seen_three_d = True
    assert seen_two_d and seen_three_d
    assert any(infos[i].path.name == "truncated.nii.gz" for i in dataset.bad)
    # The same key gives the same crop (workers and resumes agree).
    key = sampler.batch(3)[0]
    assert torch.equal(
        dataset[key]["pixel_values"], PretrainingDataset(infos, PROCESSOR)[key]["pixel_values"]
    )
    assert np.isfinite(float(dataset[key]["spacing"].sum()))


def test_hugging_face_dataset_with_a_nifti_column(tmp_path: Path) -> None:
    import datasets

    from medfm.data import volumes_from_hf_dataset

    on_disk = datasets.Dataset.from_dict({"scan": [str(NIBABEL_DATA / "anatomical.nii")], "id": [1]})
    on_disk = on_disk.cast_column("scan", datasets.Nifti())
    assert volumes_from_hf_dataset(on_disk) == [NIBABEL_DATA / "anatomical.nii"]
    # Rows that only carry bytes are written to the cache folder once, then probe like files.
    in_memory = datasets.Dataset.from_dict(
        {"scan": [{"bytes": (NIBABEL_DATA / "anatomical.nii").read_bytes(), "path": None}]}
    ).cast_column("scan", datasets.Nifti())
    paths = volumes_from_hf_dataset(in_memory, cache_dir=tmp_path / "cache")
    assert len(paths) == 1 and paths[0].parent == tmp_path / "cache"
    assert probe_volumes(paths)[0].spacing == (2.0, 2.0, 2.0)
    with pytest.raises(DatasetError, match="no Nifti column"):
        volumes_from_hf_dataset(datasets.Dataset.from_dict({"id": [1]}))


def test_a_broken_volume_is_replaced_from_its_own_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", data / "iso.nii")  # aniso_d 0
    shutil.copy(NIBABEL_DATA / "resampled_anat_moved.nii", data / "thick.nii")  # aniso_d 1
    whole = (NIBABEL_DATA / "resampled_anat_moved.nii").read_bytes()
    (data / "thick_broken.nii").write_bytes(whole[: len(whole) - 2000])  # header fine, voxels cut short
    infos = probe_volumes(discover_volumes(data))
    broken = next(i for i, info in enumerate(infos) if info.path.name == "thick_broken.nii")
    dataset = PretrainingDataset(infos, PROCESSOR)
    with pytest.warns(UserWarning, match="thick_broken"):
        sample = dataset[SampleKey(broken, 1, (16, 32, 32), seed=0)]
    assert sample["spacing"].tolist() == [8.0, 4.0, 4.0]  # thick.nii stood in, not the isotropic volume


def test_weight_decay_groups_and_checkpoint_settings() -> None:
    from medfm.training import TrainingConfig
    from medfm.training.loop import _parameter_groups
    from medfm.training.objectives import build_objective

    tiny_vt = {
        "downsample_channels": [8, 8, 16],
        "upsample_channels": [8, 8, 16],
        "codebook_size": 8,
        "embedding_dim": 16,
    }
    vt = build_objective("spad-vt", model=None, tokenizer=None, tokenizer_config={}, config=tiny_vt)
    decay, no_decay = _parameter_groups(vt, 0.05)
    assert len(decay["params"]) > 0  # conv and linear weights decay although every name starts "tokenizer."
    assert all(p.ndim <= 1 for p in no_decay["params"])
    tiny_vit = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "pos_embed_shape": [2, 2, 2],
    }
    mim = build_objective("spad-vit", model=None, tokenizer=None, config=tiny_vit, tokenizer_config=tiny_vt)
    names = {id(p): n for n, p in mim.named_parameters()}
    excluded = {names[id(p)].rsplit(".", 1)[-1] for p in _parameter_groups(mim, 0.05)[1]["params"]}
    assert {"cls_token", "pos_embed", "mask_token", "bias"} <= excluded
    with pytest.raises(ValueError, match="keep_last"):
        TrainingConfig(keep_last=0)
