"""The per-file loader that Depth-Anything-V2's metric fine-tuning uses, as the data baseline.

What it does per sample, in the reference's order (its ``dataset/vkitti2.py`` + ``transform.py``):
read the jpg with ``cv2.imread`` (BGR -> RGB, / 255 into float64), read the 16-bit png with
``cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH`` and divide by 100 (cm -> m, float64), resize the
*whole frame* to the 518 lower bound (aspect kept, sides rounded to multiples of 14) with
``INTER_CUBIC`` for the image and ``INTER_NEAREST`` for depth, normalise with ImageNet mean/std in
float64, transpose to CHW float32, then cut a random 518x518 crop; ``valid_mask = depth <= 80``.
Batches go through the default collation as float32. The reference flips the whole batch on the
GPU inside its training loop, so no flip happens here.

This module exists only to be measured against (benchmarks/data_pipeline.py); training never
uses it.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _multiple_of(x: float, m: int, min_val: int) -> int:
    y = int(np.round(x / m) * m)
    if y < min_val:
        y = int(math.ceil(x / m) * m)
    return y


def lower_bound_size(width: int, height: int, net_w: int, net_h: int, multiple_of: int = 14) -> tuple[int, int]:
    """(new_w, new_h) of a keep-aspect lower-bound resize with sides rounded to ``multiple_of``."""
    scale = max(net_w / width, net_h / height)
    return (_multiple_of(scale * width, multiple_of, net_w), _multiple_of(scale * height, multiple_of, net_h))


class ReferenceDataset(Dataset):
    """(jpg, png) file pairs -> {"image" float32 3xSxS normalised, "depth" float32 SxS m, "valid_mask"}."""

    def __init__(self, pairs: Sequence[tuple[str, str]], size: int = 518, max_depth: float = 80.0, seed: int = 0):
        self.pairs = list(pairs)
        self.size = int(size)
        self.max_depth = float(max_depth)
        self.seed = int(seed)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> dict:
        img_path, depth_path = self.pairs[item]
        image = cv2.imread(img_path)
        if image is None:
            raise FileNotFoundError(img_path)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0
        depth = cv2.imread(depth_path, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        if depth is None:
            raise FileNotFoundError(depth_path)
        depth = depth / 100.0

        h, w = depth.shape
        new_w, new_h = lower_bound_size(w, h, self.size, self.size)
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        depth = cv2.resize(depth, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        image = (image - IMAGENET_MEAN) / IMAGENET_STD
        image = np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32)
        depth = np.ascontiguousarray(depth.astype(np.float32))

        rng = np.random.default_rng([self.seed, item, self.calls])
        self.calls += 1
        y0 = int(rng.integers(0, new_h - self.size + 1))
        x0 = int(rng.integers(0, new_w - self.size + 1))
        image = image[:, y0 : y0 + self.size, x0 : x0 + self.size]
        depth = depth[y0 : y0 + self.size, x0 : x0 + self.size]
        image_t = torch.from_numpy(image)
        depth_t = torch.from_numpy(depth)
        return {"image": image_t, "depth": depth_t, "valid_mask": depth_t <= self.max_depth}


def reference_loader(pairs: Sequence[tuple[str, str]], batch_size: int, num_workers: int, num_samples: int,
                     size: int = 518, seed: int = 0) -> DataLoader:
    """The reference's DataLoader settings (pin_memory, drop_last, default prefetch, workers
    restarted each epoch) over ``num_samples`` random draws from ``pairs``."""
    ds = ReferenceDataset(pairs, size=size, seed=seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=num_samples,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True)
