"""SPAD / PUMIT: SPAD-ViT and the SPAD-VT tokenizer (Luo et al., arXiv 2312.07630)."""

from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForSemanticSegmentation,
)

from ..family import ConverterOption, ModelFamily, PeftPreset
from .configuration_spad import SpadViTConfig, SpadVTConfig
from .convert_spad import register_spad_weight_adaptation
from .modeling_spad import (
    SpadViTForImageClassification,
    SpadViTForMaskedImageModeling,
    SpadViTForSemanticSegmentation,
    SpadViTMaskedImageModelingOutput,
    SpadViTModel,
    SpadViTPackedOutput,
    SpadViTPreTrainedModel,
    SpadViTSegmentationOutput,
)
from .modeling_spad_vt import SpadVTEncoderOutput, SpadVTModel, SpadVTOutput, SpadVTPreTrainedModel
from .spad_conv import aniso_d_from_spacing

__all__ = [
    "FAMILY",
    "SpadVTConfig",
    "SpadVTEncoderOutput",
    "SpadVTModel",
    "SpadVTOutput",
    "SpadVTPreTrainedModel",
    "SpadViTConfig",
    "SpadViTForImageClassification",
    "SpadViTForMaskedImageModeling",
    "SpadViTForSemanticSegmentation",
    "SpadViTMaskedImageModelingOutput",
    "SpadViTModel",
    "SpadViTPackedOutput",
    "SpadViTPreTrainedModel",
    "SpadViTSegmentationOutput",
    "aniso_d_from_spacing",
]

# LoRA/DoRA adapt the attention and SwiGLU projections of the transformer blocks.
_BLOCK_LINEARS = r".*blocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|proj)|mlp\.(w1|w2|w3))"

_CITATION = """@article{luo2023spadnets,
  title   = {Building Universal Foundation Models for Medical Image Analysis with Spatially Adaptive Networks},
  author  = {Luo, Lingxiao and Chen, Xuanzhong and Tang, Bingda and Chen, Xinsheng and Han, Rong and
             Hu, Chengpeng and Li, Yujiang and Chen, Ting},
  journal = {arXiv preprint arXiv:2312.07630},
  year    = {2023}
}"""

FAMILY = ModelFamily(
    name="spad",
    title="SPAD / PUMIT (Luo et al., arXiv 2312.07630)",
    configs={
        SpadViTConfig: {
            AutoModel: SpadViTModel,
            AutoModelForMaskedImageModeling: SpadViTForMaskedImageModeling,
            AutoModelForImageClassification: SpadViTForImageClassification,
            AutoModelForSemanticSegmentation: SpadViTForSemanticSegmentation,
        },
        SpadVTConfig: {AutoModel: SpadVTModel},
    },
    converter="medfm.models.spad.convert_spad:convert_spad_checkpoint",
    converter_options=(
        ConverterOption("tokenizer", "the SPAD-VT tokenizer checkpoint (simple-soft.ckpt)"),
        ConverterOption(
            "reference",
            "outputs of the original code to verify the conversion against (.safetensors with pixel_values, "
            "spacing and last_hidden_state); the card states parity only then",
        ),
    ),
    objectives={
        "spad-vit": "medfm.training.objectives.spad:SpadMaskedImageModeling",
        "spad-vt": "medfm.training.objectives.spad:SpadTokenizerTraining",
    },
    presets=("spad-pretrain", "spad-vt", "spad-btcv", "spad-chaos", "spad-medmnist-3d", "spad-medmnist-2d"),
    peft={
        SpadViTModel: PeftPreset(_BLOCK_LINEARS),
        SpadViTForMaskedImageModeling: PeftPreset(_BLOCK_LINEARS, ("mim_head",)),
        SpadViTForImageClassification: PeftPreset(_BLOCK_LINEARS, ("classifier",)),
        SpadViTForSemanticSegmentation: PeftPreset(_BLOCK_LINEARS, ("pyramid", "decoder")),
    },
    # Upstream fine-tunes segmentation with a fixed (4, 16, 16) patch; the pre-trained adaptive kernel is
    # adapted at load time (convert_spad.register_spad_weight_adaptation).
    task_defaults={
        AutoModelForSemanticSegmentation: {"patch_size": [4, 16, 16], "adaptive_patch_embed": False},
    },
    model_cards=("spad-vit-base", "spad-vt"),
    load_hooks=(register_spad_weight_adaptation,),
    citation=_CITATION,
    # The original repository states no license for its code or weights.
    license_name="upstream-unspecified",
    license_link="https://github.com/function2-llx/PUMIT",
)
