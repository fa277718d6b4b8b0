"""Segmentation decoders that sit on an encoder's multi-scale feature maps (one module per decoder family).

Import the decoder you need from its module (``medfm.layers.decoders.unetr``...): MONAI, which the UNETR
decoder builds on, is loaded only by the families that use it, so ``import medfm`` stays fast.
"""
