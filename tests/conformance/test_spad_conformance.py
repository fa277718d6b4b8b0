"""transformers' common model and config tests on every SPAD class (SPAD-ViT and its heads, SPAD-VT)."""

from __future__ import annotations

import unittest

import torch

from medfm.models.spad import (
    SpadViTConfig,
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTModel,
    SpadVTConfig,
    SpadVTModel,
)

from .harness import MedfmModelTest, ModelTesterMixin, floats_tensor


class SpadViTModelTester:
    """Tiny SPAD-ViT: 2 blocks of width 32, 2 heads (head size 16), on (2, 3, 16, 32, 32) volumes.

    Spacing (2, 1, 1) mm gives anisotropy level 1: the adaptive 16^3 patch becomes 8 x 16 x 16, a 2 x 2 x 2
    token grid. The segmentation head uses upstream's fine-tuning patch (4, 16, 16): a 4 x 2 x 2 grid.
    """

    def __init__(
        self,
        parent,
        batch_size=2,
        num_channels=3,
        volume_shape=(16, 32, 32),
        spacing=(2.0, 1.0, 1.0),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        pos_embed_shape=(2, 2, 2),
        codebook_size=16,
        num_labels=3,
        segmentation=False,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.num_channels = num_channels
        self.volume_shape = volume_shape
        self.spacing = spacing
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.codebook_size = codebook_size
        self.num_labels = num_labels
        self.segmentation = segmentation
        self.is_training = is_training
        self.pos_embed_shape = pos_embed_shape
        if segmentation:
            self.patch_size = (4, 16, 16)
            effective_patch = self.patch_size
        else:
            self.patch_size = patch_size
            level = 1  # floor(log2(2 mm / 1 mm))
            effective_patch = (patch_size >> level, patch_size, patch_size)
        self.grid = tuple(n // p for n, p in zip(volume_shape, effective_patch))
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.seq_length = self.num_patches + 1  # the cls token
        self.encoder_seq_length = self.seq_length
        # bool_masked_pos covers the patch tokens only (not the cls token); the MIM ratio is one half.
        self.mask_length = self.num_patches
        self.num_masks = self.num_patches // 2

    def get_config(self) -> SpadViTConfig:
        extra = {}
        if self.segmentation:
            extra = dict(
                adaptive_patch_embed=False,
                decoder_lateral_channels=(8, 8, 16, 16),
                decoder_full_res_channels=(4, 8),
            )
        return SpadViTConfig(
            in_channels=self.num_channels,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            pos_embed_shape=self.pos_embed_shape,
            codebook_size=self.codebook_size,
            num_labels=self.num_labels,
            initializer_range=0.02,
            **extra,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, *self.volume_shape])
        spacing = torch.tensor([self.spacing] * self.batch_size)  # (B, 3): sliced with the batch
        return self.get_config(), {"pixel_values": pixel_values, "spacing": spacing}

    def labels_for(self, model_class, inputs) -> dict[str, torch.Tensor]:
        batch = inputs["pixel_values"].shape[0]
        generator = torch.Generator().manual_seed(0)  # the same targets on every call
        if model_class is SpadViTForImageClassification:
            return {"labels": torch.arange(batch) % self.num_labels}
        if model_class is SpadViTForSemanticSegmentation:
            shape = (batch, *self.volume_shape)
            return {"labels": torch.randint(0, self.num_labels, shape, generator=generator)}
        if model_class is SpadViTForMaskedImageModeling:
            shape = (batch, self.num_patches, self.codebook_size)
            return {"target_logits": torch.randn(shape, generator=generator)}
        return {}

    def complete_inputs(self, model_class, inputs) -> dict[str, torch.Tensor]:
        batch = inputs["pixel_values"].shape[0]
        if "spacing" not in inputs:
            # Some mixin tests build inputs from pixel_values alone (at their own batch size); an adaptive
            # SPAD-ViT needs the spacing of a 3D input, as the processor always returns it.
            inputs["spacing"] = torch.tensor([self.spacing] * batch)
        if model_class is SpadViTForMaskedImageModeling and "bool_masked_pos" not in inputs:
            # The same half of the tokens in every sample; without a mask the model draws a random one.
            masked = torch.zeros(batch, self.num_patches, dtype=torch.bool)
            masked[:, ::2] = True
            inputs["bool_masked_pos"] = masked
        elif model_class is SpadViTModel:
            # The mixin adds a mask to any model whose forward takes one; a backbone built without
            # use_mask_token has no mask token (and says so with a ValueError).
            inputs.pop("bool_masked_pos", None)
        return inputs


class SpadViTModelTest(MedfmModelTest, ModelTesterMixin, unittest.TestCase):
    """SpadViTModel, SpadViTForMaskedImageModeling and SpadViTForImageClassification (adaptive patch)."""

    all_model_classes = (SpadViTModel, SpadViTForMaskedImageModeling, SpadViTForImageClassification)
    base_model_classes = (SpadViTModel,)
    config_class = SpadViTConfig
    config_tester_kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)

    def setUp(self) -> None:
        self.model_tester = SpadViTModelTester(self)
        super().setUp()

    def test_reverse_loading_mapping(self):
        # SPAD's load-time conversions adapt values under the same key (patch kernel, position table).
        super().test_reverse_loading_mapping(check_keys_were_modified=False)


class SpadViTForSemanticSegmentationTest(MedfmModelTest, ModelTesterMixin, unittest.TestCase):
    """SpadViTForSemanticSegmentation: fixed (4, 16, 16) patch and the UNet decoder, as upstream fine-tunes."""

    all_model_classes = (SpadViTForSemanticSegmentation,)
    base_model_classes = (SpadViTModel,)
    config_class = SpadViTConfig
    config_tester_kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=[4, 16, 16],
        adaptive_patch_embed=False,
    )

    def setUp(self) -> None:
        self.model_tester = SpadViTModelTester(self, segmentation=True)
        super().setUp()

    def test_reverse_loading_mapping(self):
        # SPAD's load-time conversions adapt values under the same key (patch kernel, position table).
        super().test_reverse_loading_mapping(check_keys_were_modified=False)


class SpadVTModelTester:
    """Tiny SPAD-VT tokenizer (total stride 16) on (2, 3, 4, 32, 32) volumes at 4 x 1 x 1 mm (level 2)."""

    def __init__(self, parent, batch_size=2, volume_shape=(4, 32, 32), spacing=(4.0, 1.0, 1.0)):
        self.parent = parent
        self.batch_size = batch_size
        self.volume_shape = volume_shape
        self.spacing = spacing
        self.is_training = True
        # Present for the mixin's generic checks; the tokenizer is convolutional (no blocks, no attention).
        self.num_hidden_layers = 2
        self.hidden_size = 16

    def get_config(self) -> SpadVTConfig:
        return SpadVTConfig(
            downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], codebook_size=12, embedding_dim=16
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 3, *self.volume_shape]) * 2 - 1
        spacing = torch.tensor([self.spacing] * self.batch_size)
        return self.get_config(), {"pixel_values": pixel_values, "spacing": spacing}

    def labels_for(self, model_class, inputs) -> dict[str, torch.Tensor]:
        return {}


class SpadVTModelTest(MedfmModelTest, ModelTesterMixin, unittest.TestCase):
    """The SPAD-VT tokenizer: a convolutional encoder, a soft codebook and a decoder (no attention)."""

    all_model_classes = (SpadVTModel,)
    base_model_classes = (SpadVTModel,)
    config_class = SpadVTConfig
    config_tester_kwargs = dict(
        downsample_channels=[8, 8, 16],
        upsample_channels=[8, 8, 16],
        codebook_size=12,
        embedding_dim=16,
        # A convolutional config: no hidden_size / heads / layers to check.
        common_properties=["in_channels", "codebook_size", "embedding_dim"],
    )
    # Convolutional: there are no attention weights to return (as transformers' conv models set).
    has_attentions = False

    def setUp(self) -> None:
        self.model_tester = SpadVTModelTester(self)
        super().setUp()

    @unittest.skip(
        reason="convolutional tokenizer: no per-block hidden_states, its outputs are codes and a reconstruction"
    )
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="convolutional tokenizer: no hidden_states or attentions to retain gradients on")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="convolutional tokenizer: no input embedding layer and no output vocabulary")
    def test_model_get_set_embeddings(self):
        pass
