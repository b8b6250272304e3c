"""GenEval scoring with a transformers Mask2Former COCO instance model and a transformers CLIP, from local paths.

`GenevalScorer(detector_path, clip_path)` is a scorer for `flowgrpo.eval.geneval.score_images`: called on one
uint8 [H, W, 3] image and its GenEval entry it returns the same `Verdict` as the Shapes verifier, and
`score_batch(images, entries)` batches the detector and CLIP over many images. The rules live in
`flowgrpo.rewards.geneval_rules`; this module turns model outputs into the detections they read:

- instances follow mmdetection's Mask2Former post-processing, which GenEval's numbers come from: the 100 most
  probable (query, class) pairs (softmax without the no-object class), mask logits upsampled to the padded input
  and then to the image, mask = logit > 0, confidence = class probability x mean sigmoid inside the mask,
  box = the mask's extent. Masks may overlap (unlike transformers' `post_process_instance_segmentation`).
- the detector sees the image resized so its short side is `detector_size` (mmdetection's test scale, 800,
  long side at most 1333), not the 384 x 384 of the processor configs published with the transformers ports;
- colour: the object's pixels inside its mask, on GenEval's grey (#999) elsewhere, cropped to its box, go
  through CLIP against `colour_prompts(class)`.

Everything loads with `local_files_only=True`: a missing directory or file is an error naming it.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
import torch.nn.functional as F

from flowgrpo.rewards.base import require_dir
from flowgrpo.rewards.geneval_rules import (
    COCO_CLASSES,
    COLORS,
    asked_colours,
    colour_from_logits,
    colour_prompts,
    judge,
    keep_detections,
    min_score,
    unscorable_reason,
)
from flowgrpo.rewards.hf_clip import LocalClip
from flowgrpo.shapes.verify import Detection, Verdict

DTYPES = ("float32", "float16", "bfloat16")
TOP_K = 100  # mmdetection's max_per_image for Mask2Former
CROP_FILL = 153  # GenEval's crop background "#999"
DETECTOR_SIZE = 800
MAX_SIZE_RATIO = 1333 / 800  # mmdetection's test scale (1333, 800)

# Label spellings of COCO ports (VOC-style names in some transformers configs) -> GenEval's class names.
_ALIASES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
            "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
            "hairdryer": "hair drier", "doughnut": "donut"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


_CANONICAL = {_key(c): c for c in COCO_CLASSES} | _ALIASES


def coco_label_map(id2label: dict[int, str]) -> dict[int, str]:
    """Model label index -> GenEval class name. Labels outside the 80 classes (stuff, "N/A") are left out; a model
    lacking one of the 80 is not a COCO instance model, and the error names what it lacks."""
    mapping = {int(i): _CANONICAL[_key(n)] for i, n in id2label.items() if _key(n) in _CANONICAL}
    missing = sorted(set(COCO_CLASSES) - set(mapping.values()))
    if missing:
        raise ValueError(f"the detector's labels lack {len(missing)} of the 80 COCO classes, e.g. {missing[:5]}: "
                         "GenEval needs a COCO instance-segmentation model (a COCO model spelling a class another way "
                         "needs that label renamed in the id2label of its config.json)")
    return mapping


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: dict[int, str], floor: float,
              upsample=lambda m: m) -> tuple[list[Detection], list[np.ndarray]]:
    """Detections (Detection.iou = confidence) and their boolean masks from one image's query outputs.

    class_logits [Q, C+1] (last = no object), mask_logits [Q, h, w]; `upsample` maps [K, h, w] logits to the
    image's [K, H, W]. Pairs whose class probability is at most `floor` are dropped before upsampling: the mask
    factor is at most 1, so they could never pass GenEval's threshold.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    n_cls = probs.shape[1]
    top, flat = (t.cpu() for t in probs.flatten().topk(min(TOP_K, probs.numel())))
    pairs = [(float(p), int(i) // n_cls, int(i) % n_cls) for p, i in zip(top, flat)
             if p > floor and int(i) % n_cls in labels]  # (class probability, query, label)
    if not pairs:
        return [], []
    logits = upsample(mask_logits[[q for _, q, _ in pairs]].float())
    binary = logits > 0
    area = binary.flatten(1).sum(1)
    mask_score = ((logits.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)).tolist()
    dets, masks = [], []
    for (prob, _, label), mask, pixels, quality in zip(pairs, binary, area.tolist(), mask_score):
        if not pixels:  # an empty mask has no box and scores 0
            continue
        ys, xs = torch.nonzero(mask.any(1))[:, 0], torch.nonzero(mask.any(0))[:, 0]
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        dets.append(Detection(labels[label], None, box, pixels, prob * quality))
        masks.append(mask.cpu().numpy())
    return dets, masks


def masked_crop(image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The object's pixels inside its mask, GenEval's grey outside it, cropped to its box."""
    x0, y0, x1, y1 = box
    return np.where(mask[..., None], image, np.uint8(CROP_FILL))[y0:y1, x0:x1]


class GenevalScorer:
    """GenEval's protocol on local transformers models; see the module docstring."""

    def __init__(self, detector_path: str, clip_path: str, *, device: str = "cpu", dtype: str = "float32",
                 detector_size: int = DETECTOR_SIZE, batch_size: int = 16, detector_option: str = "detector_path",
                 clip_option: str = "clip_path") -> None:
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if detector_size < 32 or batch_size < 1:
            raise ValueError(f"need detector_size >= 32 and batch_size >= 1, got {detector_size} and {batch_size}")
        what = "Mask2Former COCO instance-segmentation model directory"
        root = require_dir(detector_path, detector_option, what)
        for name in ("config.json", "preprocessor_config.json"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{what} {detector_option}={str(detector_path)!r} has no {name} "
                                        "(save the model and its image processor there with save_pretrained)")
        self.device, self.dtype, self.batch_size = torch.device(device), getattr(torch, dtype), batch_size
        self.processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
        try:
            self.detector = AutoModelForUniversalSegmentation.from_pretrained(root, local_files_only=True)
        except ImportError as err:  # transformers' Mask2Former wants scipy even for inference
            raise ImportError(f"{err}\nInstall the GenEval extra: pip install 'flowgrpo[geneval]'") from err
        if self.detector.config.model_type != "mask2former":
            raise ValueError(f"{detector_option}={str(detector_path)!r} holds a {self.detector.config.model_type!r} "
                             "model; the GenEval scorer reads Mask2Former outputs")
        self.detector = self.detector.to(self.device, self.dtype).eval()
        self.labels = coco_label_map(self.detector.config.id2label)
        self.size = {"shortest_edge": detector_size, "longest_edge": round(detector_size * MAX_SIZE_RATIO)}
        self.clip = LocalClip(clip_path, device=device, dtype=dtype, model_option=clip_option)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, images: list[np.ndarray], floors: list[float]) -> list[tuple[list[Detection], list[np.ndarray]]]:
        """Per image: all detections above its confidence floor, with their masks (see `instances`)."""
        out = []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s : s + self.batch_size]
            inputs = self.processor(images=chunk, size=self.size, input_data_format="channels_last", return_tensors="pt")
            pred = self.detector(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                 pixel_mask=inputs["pixel_mask"].to(self.device))
            padded = inputs["pixel_values"].shape[-2:]
            for b, image in enumerate(chunk):
                valid = inputs["pixel_mask"][b].bool()
                h, w = int(valid.any(1).sum()), int(valid.any(0).sum())

                def upsample(m, h=h, w=w, image=image):  # as mmdetection: padded input, crop, image size
                    m = F.interpolate(m[None], size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
                    return F.interpolate(m, size=image.shape[:2], mode="bilinear", align_corners=False)[0]

                out.append(instances(pred.class_queries_logits[b], pred.masks_queries_logits[b], self.labels,
                                     floors[s + b], upsample))
        return out

    @torch.no_grad()
    def classifier(self, cls: str) -> torch.Tensor:
        """[10, D] unit rows: per colour, the renormalised mean of its three prompts' CLIP text embeddings."""
        if cls not in self._classifiers:
            prompts = colour_prompts(cls)
            emb = self.clip.text_embeds([p for per_colour in prompts for p in per_colour])
            self._classifiers[cls] = F.normalize(emb.view(len(prompts), -1, emb.shape[-1]).mean(1), dim=-1)
        return self._classifiers[cls]

    @torch.no_grad()
    def colour_logits(self, crops: list[np.ndarray], classes: list[str]) -> torch.Tensor:
        """[N, 10] CLIP similarities of each crop to its class's colour classifier."""
        rows = []
        for s in range(0, len(crops), self.batch_size):
            pixels = self.clip.image_processor(images=crops[s : s + self.batch_size], input_data_format="channels_last",
                                               return_tensors="pt")
            pooled = self.clip.model.vision_model(pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
            emb = F.normalize(self.clip.model.visual_projection(pooled.pooler_output).float(), dim=-1)
            rows += [e @ self.classifier(c).T for e, c in zip(emb, classes[s : s + self.batch_size])]
        return torch.stack(rows) if rows else torch.zeros(0, len(COLORS))

    def score_batch(self, images: list[np.ndarray], entries: list[dict]) -> list[Verdict]:
        """GenEval verdicts for uint8 [H, W, 3] images and their entries (ValueError for an unscorable entry)."""
        for n, entry in enumerate(entries):
            if reason := unscorable_reason(entry):
                raise ValueError(f"entry {n} ({entry.get('prompt')!r}) cannot be scored by GenEval's rules: {reason}")
        # One detector batch at a time, so only that batch's full-size masks are held.
        return [v for s in range(0, len(images), self.batch_size)
                for v in self._score_chunk(images[s : s + self.batch_size], entries[s : s + self.batch_size])]

    def _score_chunk(self, images: list[np.ndarray], entries: list[dict]) -> list[Verdict]:
        kept = []
        for (dets, masks), entry in zip(self.detect(images, [min_score(e["tag"]) for e in entries]), entries):
            idx = keep_detections(dets, entry["tag"])
            kept.append(([dets[i] for i in idx], [masks[i] for i in idx]))
        asks = [(b, i) for b, ((dets, _), e) in enumerate(zip(kept, entries)) for i in asked_colours(dets, e)]
        crops = [masked_crop(images[b], kept[b][1][i], kept[b][0][i].box) for b, i in asks]
        logits = self.colour_logits(crops, [kept[b][0][i].shape for b, i in asks])
        for (b, i), row in zip(asks, logits):
            kept[b][0][i] = dataclasses.replace(kept[b][0][i], color=colour_from_logits(row.cpu().numpy()))
        return [judge(dets, entry) for (dets, _), entry in zip(kept, entries)]

    def __call__(self, image: np.ndarray, entry: dict) -> Verdict:
        return self.score_batch([image], [entry])[0]
