"""MiM (Mask in Mask): a hybrid 3D ConvViT encoder with hierarchical masked pre-training (Zhuang et al., IEEE TMI
2025, arXiv 2404.15580)."""

from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from ..family import ModelFamily, PeftPreset
from .configuration_mim import MiMConfig
from .convert_mim import register_mim_weight_adaptation
from .modeling_mim import (
    MiMForImageClassification,
    MiMForSemanticSegmentation,
    MiMModel,
    MiMModelOutput,
    MiMPreTrainedModel,
    resize_position_embeddings,
)
from .modeling_mim_pretraining import MiMForPreTraining, MiMForPreTrainingOutput, MiMNoise, mim_loss_weights

__all__ = [
    "FAMILY",
    "MiMConfig",
    "MiMForImageClassification",
    "MiMForPreTraining",
    "MiMForPreTrainingOutput",
    "MiMForSemanticSegmentation",
    "MiMModel",
    "MiMModelOutput",
    "MiMNoise",
    "MiMPreTrainedModel",
    "mim_loss_weights",
    "resize_position_embeddings",
]

# LoRA/DoRA adapt the stage-4 transformer blocks' attention and MLP projections. The pattern is anchored on
# blocks4: the convolutional stages also have mlp.fc1/fc2 (1x1x1 Conv3d) and a depthwise conv named attn.
_STAGE4_LINEARS = r"(.*\.)?blocks4\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

_CITATION = """@article{zhuang2025mim,
  title   = {MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis},
  author  = {Zhuang, Jiaxin and Wu, Linshan and Wang, Qiong and Fei, Peng and Vardhanabhuti, Varut and
             Luo, Lin and Chen, Hao},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {44},
  number  = {9},
  pages   = {3727--3740},
  year    = {2025},
  doi     = {10.1109/TMI.2025.3564382}
}"""

FAMILY = ModelFamily(
    name="mim",
    title="MiM, Mask in Mask (Zhuang et al., IEEE TMI 2025)",
    configs={
        MiMConfig: {
            AutoModel: MiMModel,
            AutoModelForPreTraining: MiMForPreTraining,
            AutoModelForImageClassification: MiMForImageClassification,
            AutoModelForSemanticSegmentation: MiMForSemanticSegmentation,
        },
    },
    converter="medfm.models.mim.convert_mim:convert_mim_checkpoint",
    objectives={"mim": "medfm.training.objectives.mim:MiMPretraining"},
    presets=(
        "mim-pretrain",
        "mim-btcv",
        "mim-amos",
        "mim-flare22",
        "mim-mmwhs",
        "mim-spleen",
        "mim-liver",
        "mim-lung",
        "mim-pancreas",
        "mim-hepatic-vessel",
        "mim-colon",
        "mim-covid19-20",
        "mim-brats",
        "mim-cc-ccii",
    ),
    peft={
        MiMModel: PeftPreset(_STAGE4_LINEARS),
        MiMForPreTraining: PeftPreset(_STAGE4_LINEARS, ("decoder_embed", "decoder_blocks", "decoder_pred")),
        MiMForImageClassification: PeftPreset(_STAGE4_LINEARS, ("classifier",)),
        # The fpn stage and the UNETR decoder are new at fine-tuning (upstream initialises them fresh).
        MiMForSemanticSegmentation: PeftPreset(_STAGE4_LINEARS, ("fpn", "decoder")),
    },
    # Upstream fine-tunes with stochastic depth 0.2 over all 17 blocks (spec §1.2); pre-training uses none.
    task_defaults={
        AutoModelForSemanticSegmentation: {"drop_path_rate": 0.2},
        AutoModelForImageClassification: {"drop_path_rate": 0.2},
    },
    model_cards=("mim-base",),
    load_hooks=(register_mim_weight_adaptation,),
    citation=_CITATION,
    # The original repository has no LICENSE file: no license is stated for its code or weights.
    license_name="upstream-unspecified",
    license_link="https://github.com/JiaxinZhuang/MiM",
)
