"""Tiny random Mask2Former (COCO labels) and CLIP checkpoints built from config and saved as a user's local
directories, for the GenEval detector scorer. Nothing is downloaded; each builds in about a second."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    SwinConfig,
)

from flowgrpo.pretrain.components import build_tokenizer
from flowgrpo.rewards.geneval_rules import COCO_CLASSES, COLORS

# Spellings of some transformers COCO ports, which the scorer maps back to GenEval's names.
PORT_SPELLINGS = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor",
                  "potted plant": "pottedplant", "dining table": "diningtable"}


@torch.no_grad()
def tiny_detector(root: Path, confident: dict[str, float] | None = None, *, seed: int = 0) -> Path:
    """A Mask2Former whose 8 queries all give each class in `confident` the logit set there (others 0), with
    mask logits scaled so masks are crisp (mean sigmoid inside a mask near 1)."""
    labels = [PORT_SPELLINGS.get(c, c) for c in COCO_CLASSES]
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"], image_size=64)
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               encoder_layers=1, decoder_layers=2, num_queries=8, num_attention_heads=2,
                               dim_feedforward=64, encoder_feedforward_dim=64,
                               id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    if confident:
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        for cls, logit in confident.items():
            model.class_predictor.bias[COCO_CLASSES.index(cls)] = logit
        last = model.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
        last.weight.mul_(1000.0)
        last.bias.mul_(1000.0)
    model.save_pretrained(root)
    Mask2FormerImageProcessor().save_pretrained(root)
    return root


def tiny_clip(root: Path, *, seed: int = 0) -> Path:
    """A random CLIP (32 px images, 77 tokens) with a tokenizer that keeps GenEval's prompt words whole."""
    tokenizer = build_tokenizer(["a", "photo", "of", "colored", "object", *COLORS])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(root)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root
