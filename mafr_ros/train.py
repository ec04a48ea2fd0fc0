"""Training of one MAFR model per object class, on normal ("good") images only.

Differences from the published code, on purpose:
- the frozen backbones run once per image and their features are cached (the reference recomputes
  them at every step of every epoch, which dominates its training time);
- batch size > 1 works; the heads run on valid pixels only when invalid pixels are masked;
- seeded and reproducible (torch, numpy, Python; deterministic algorithms on CPU);
- mixed precision (bf16 autocast) on CUDA;
- thresholds are calibrated on held-out good images and stored in the checkpoint with everything
  needed to rebuild the detector;
- options a profile can switch on (the lite profile does, see core/profiles.py): per-channel
  feature standardisation with training statistics (``FeatureNorm``, stored in the checkpoint),
  the per-pixel MSE restoration term, a cosine learning-rate schedule, profile-specific crop size
  and learning rate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .core.checkpoint import save_checkpoint
from .core.detector import Detector, resolve_device
from .core.losses import LossConfig, mafr_loss
from .core.memory_bank import DEFAULT_POOL, MemoryBank, valid_pixels
from .core.normalization import FeatureNorm
from .core.profiles import get_profile
from .core.scoring import ScoringConfig, Thresholds, score_errors
from .data.augment import quarter_turn
from .data.formats import open_dataset
from .data.preprocess import PreprocessCache, PreprocessConfig, preprocess_sample
from .errors import DatasetError

log = logging.getLogger("mafr_ros.train")

DEFAULT_EPOCHS = {"lite": 50, "paper": 100}
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    profile: str = "lite"
    epochs: int | None = None  # None: the profile's default
    batch_size: int = 8
    lr: float | None = None  # None: the profile's (lite 2e-3, paper 1e-3)
    seed: int = 115
    latent: int | None = None
    target_fpr: float = 0.01  # image-level false-positive rate on good validation images
    pixel_target_fpr: float = 0.001
    shots: int | None = None
    shots_seed: int = 0
    dataset_format: str = "auto"  # mvtec, eyecandies or auto (detected from the folder layout)
    device: str = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    # Train on random crops of the feature grid (pixels per side) instead of whole grids. The heads
    # are per-pixel and every loss term is local (7x7 at most), so crops see the same gradients at a
    # fraction of the memory traffic; an epoch draws as many crops as cover each image's part once.
    # 0 = whole grids (the published scheme); None = the profile's (lite 32, paper 64).
    crop: int | None = None
    backbone_weights: dict = field(default_factory=dict)
    random_init_backbones: bool = False  # paper profile without weight files: benchmarks/tests only
    loss: LossConfig = field(default_factory=LossConfig)
    loss_from_profile: bool = True  # apply the profile's loss_overrides on top of ``loss``
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    cache_dir: str | None = None
    progress: bool = True
    # Standardise every feature channel with training statistics before the heads (FeatureNorm;
    # a departure from the published code, stored in the checkpoint). None: the profile's choice.
    standardize_features: bool | None = None
    # "constant" (the published scheme) or "cosine" (annealed to 0 over the run). None: profile's.
    lr_schedule: str | None = None
    # Score with a nearest-neighbour memory bank of this many (standardised) training pixels per
    # modality (greedy k-center coreset, stored in the checkpoint) instead of the heads'
    # restoration errors (core/memory_bank.py). 0 = off: the heads score.
    memory_bank: int = 0
    # Build the bank from the training images turned by multiples of 360/N degrees as well
    # (N = 1: as they are; 2: and half turns; 4: and every quarter turn; data/augment.py), so that
    # parts in in-plane poses the training set lacks are covered. Needs memory_bank > 0.
    bank_rotations: int = 1
    # The k-center selection of the bank runs on a seeded random pool of at most this many valid
    # training pixels (of all turned copies together); a larger pool keeps rarer normal structure
    # within reach of the selection, at a training cost linear in it (core/memory_bank.py).
    bank_pool: int = DEFAULT_POOL
    # Keyword options of the weight-free extractors, {"rgb": {...}, "xyz": {...}} (e.g.
    # {"rgb": {"hog_invariant": True}}: turn-invariant orientation channels); recorded in the
    # checkpoint through the extractors' configuration. Empty: the profile's descriptors.
    extractor_options: dict = field(default_factory=dict)
    # Image score: 3D errors below this percentile (0-100) of the calibration images' valid-pixel
    # 3D errors are raised to it before fusion (ScoringConfig.floor_3d, set at calibration and
    # stored in the checkpoint). 0 = off.
    floor_3d_percentile: float = 0.0
    # The `mafr train --preset` these settings came from (recorded in the checkpoint's training
    # metadata; the settings themselves are what counts). None: no preset.
    preset: str | None = None

    def __post_init__(self):
        if not 0 <= self.floor_3d_percentile < 100:
            raise ValueError(f"floor_3d_percentile must be in [0, 100) (0: off), got "
                             f"{self.floor_3d_percentile}")
        if self.memory_bank < 0:
            raise ValueError(f"memory_bank must be >= 0 (0: off), got {self.memory_bank}")
        if self.bank_rotations not in (1, 2, 4):
            raise ValueError(f"bank_rotations must be 1, 2 or 4 (quarter turns only), got "
                             f"{self.bank_rotations}")
        if self.bank_pool != DEFAULT_POOL and self.memory_bank <= 0:
            raise ValueError("bank_pool is the pool of the memory bank's coreset selection; it needs "
                             "a memory bank (memory_bank > 0, `--memory-bank N`)")
        if self.bank_pool < max(1, self.memory_bank):
            raise ValueError(f"bank_pool must be >= the memory bank size ({self.memory_bank}) and "
                             f">= 1, got {self.bank_pool}")
        if self.bank_rotations > 1 and self.memory_bank <= 0:
            raise ValueError("bank_rotations > 1 turns the memory bank's training images; it needs "
                             "a memory bank (memory_bank > 0, `--memory-bank N`)")

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.profile, 50)

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else get_profile(self.profile).lr

    def resolved_crop(self) -> int | None:
        """Crop side in pixels, or None for whole grids."""
        crop = self.crop if self.crop is not None else get_profile(self.profile).crop
        return int(crop) if crop else None

    def resolved_standardize(self) -> bool:
        if self.standardize_features is not None:
            return bool(self.standardize_features)
        return get_profile(self.profile).standardize_features

    def resolved_lr_schedule(self) -> str:
        schedule = self.lr_schedule or get_profile(self.profile).lr_schedule
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
        return schedule


def profile_loss(profile: str, loss: LossConfig | None = None) -> LossConfig:
    """LossConfig defaults, then the profile's overrides, then whatever ``loss`` sets to a value
    other than LossConfig's default (to force a default value against the profile, start from
    ``profile_loss(profile)`` and pass ``loss_from_profile=False``, as `mafr train` does)."""
    defaults = LossConfig().to_dict()
    user = {k: v for k, v in (loss or LossConfig()).to_dict().items() if v != defaults[k]}
    return LossConfig.from_dict({**defaults, **dict(get_profile(profile).loss_overrides), **user})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@torch.no_grad()
def cache_features(detector: Detector, inputs, batch_size: int = 4, progress: bool = False,
                   store_device="cpu"):
    """Frozen features of every input, computed once: (f2d, f3d, mask) tensors, features in
    float16 (halves host memory; the heads train in float32/bf16 on a copy of each batch)."""
    f2d_all, f3d_all, mask_all = [], [], []
    batches = range(0, len(inputs), batch_size)
    for start in tqdm(batches, desc="features", disable=not progress, leave=False):
        chunk = inputs[start:start + batch_size]
        rgb = torch.from_numpy(np.stack([i.rgb for i in chunk]))
        xyz = torch.from_numpy(np.stack([i.xyz for i in chunk]))
        f2d, f3d, mask = detector.extract(rgb, xyz)
        f2d_all.append(f2d.to(store_device, torch.float16))
        f3d_all.append(f3d.to(store_device, torch.float16))
        mask_all.append(mask.to(store_device))
    return torch.cat(f2d_all), torch.cat(f3d_all), torch.cat(mask_all)


@torch.no_grad()
def _standardize_cached(norm: FeatureNorm, f2d, f3d, mask, chunk: int = 8):
    """``norm`` applied to the cached features chunk by chunk (computed in float32, stored back
    in the cache's dtype: standardised values are O(1), well inside float16's precision)."""
    out2, out3 = torch.empty_like(f2d), torch.empty_like(f3d)
    for start in range(0, f2d.shape[0], chunk):
        sl = slice(start, start + chunk)
        a, b = norm.apply(f2d[sl].float(), f3d[sl].float(), mask[sl].to(f2d.device))
        out2[sl], out3[sl] = a.to(f2d.dtype), b.to(f3d.dtype)
    return out2, out3


def _random_crops(f2d, f3d, mask, idx, crop: int, generator):
    """crop x crop windows of the given images, each centred (where the border allows) on a random
    pixel with a 3D feature, so that crops land on the part rather than on empty background."""
    grid = f2d.shape[-1]
    half = crop // 2
    out2, out3, outm = [], [], []
    for i in idx.tolist():
        valid = mask[i].flatten().nonzero()
        if valid.numel():
            pick = valid[torch.randint(valid.numel(), (1,), generator=generator)].item()
            cy, cx = divmod(pick, grid)
        else:
            cy, cx = (int(v) for v in torch.randint(grid, (2,), generator=generator))
        y0 = min(max(cy - half, 0), grid - crop)
        x0 = min(max(cx - half, 0), grid - crop)
        out2.append(f2d[i, :, y0:y0 + crop, x0:x0 + crop])
        out3.append(f3d[i, :, y0:y0 + crop, x0:x0 + crop])
        outm.append(mask[i, y0:y0 + crop, x0:x0 + crop])
    return torch.stack(out2), torch.stack(out3), torch.stack(outm)


def train_heads(detector: Detector, f2d, f3d, mask, cfg: TrainConfig):
    """Optimise the heads on cached features. Returns the per-epoch mean losses."""
    device = detector.device
    heads = detector.heads
    heads.train()
    optimiser = torch.optim.Adam(heads.parameters(), lr=cfg.resolved_lr())
    epochs = cfg.resolved_epochs()
    # Cosine annealing per epoch: the short lite runs otherwise end at the full step size, with
    # the restoration error of good pixels still bouncing around its floor.
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
                 if cfg.resolved_lr_schedule() == "cosine" else None)
    use_amp = cfg.amp and device.type == "cuda"
    generator = torch.Generator().manual_seed(cfg.seed)
    n, grid = f2d.shape[0], f2d.shape[-1]
    crop = cfg.resolved_crop()
    crop = crop if crop and crop < grid else None
    # An epoch draws as many crops as it takes to cover the valid (part) pixels of each image once.
    valid_per_image = float(mask.flatten(1).sum(1).float().mean()) if crop else 0.0
    crops_per_image = max(1, round(valid_per_image / crop ** 2)) if crop else 1
    history = []
    bar = tqdm(range(epochs), desc="train", disable=not cfg.progress)
    for _ in bar:
        order = torch.randperm(n, generator=generator).repeat(crops_per_image)
        order = order[torch.randperm(order.numel(), generator=generator)]
        total, steps = 0.0, 0
        for start in range(0, order.numel(), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if crop:
                x2, x3, m = _random_crops(f2d, f3d, mask, idx, crop, generator)
            else:
                x2, x3, m = f2d[idx], f3d[idx], mask[idx]
            x2 = x2.to(device, torch.float32, non_blocking=True)
            x3 = x3.to(device, torch.float32, non_blocking=True)
            m = m.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                rec2d, rec3d = heads.forward_grid(x2, x3, m if cfg.loss.mask_invalid else None)
            loss, _terms = mafr_loss(x2, rec2d.float(), x3, rec3d.float(), m, cfg.loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            steps += 1
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(steps, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    heads.eval()
    return history


@torch.no_grad()
def build_memory_bank(detector: Detector, inputs, f2d, f3d, mask, feature_norm, cfg: TrainConfig
                      ) -> MemoryBank:
    """The memory bank of ``cfg``: valid pixels of the cached (standardised) training features
    and, with ``cfg.bank_rotations`` > 1, of the training inputs turned by each further multiple
    of 360 / bank_rotations degrees (features computed and standardised like the originals, only
    their valid pixels kept, one turn at a time)."""
    x2d, x3d = [valid_pixels(f2d, mask)], [valid_pixels(f3d, mask)]
    step = 4 // cfg.bank_rotations
    for turns in range(step, 4, step):
        turned = [quarter_turn(i, turns) for i in inputs]
        t2, t3, tm = cache_features(detector, turned, progress=cfg.progress)
        if feature_norm is not None:
            t2, t3 = _standardize_cached(feature_norm, t2, t3, tm)
        x2d.append(valid_pixels(t2, tm))
        x3d.append(valid_pixels(t3, tm))
        del t2, t3, tm
    return MemoryBank.from_pixels(torch.cat(x2d), torch.cat(x3d), int(cfg.memory_bank),
                                  seed=cfg.seed, pool=int(cfg.bank_pool),
                                  rotations=int(cfg.bank_rotations))


def floor_from_errors(errors, percentile: float) -> float:
    """The ``percentile`` (0-100) of the 3D errors at the valid pixels of [(r2d, r3d, mask), ...]
    batches (``Detector.input_errors``): ScoringConfig.floor_3d of ``--floor-3d``."""
    values = torch.cat([r3d[mask].float().flatten().cpu() for _, r3d, mask in errors])
    if values.numel() == 0:
        raise ValueError("--floor-3d: the calibration images have no valid pixel")
    return float(np.percentile(values.numpy(), percentile))


#: bf16 inference is allowed when, on the calibration images, no image score moves by more than
#: this fraction of the image threshold ...
HALF_SCORE_TOLERANCE = 0.02
#: ... and at most this fraction of their valid pixels changes its pixel decision.
HALF_PIXEL_FLIP_TOLERANCE = 0.001


@torch.no_grad()
def half_precision_check(detector: Detector, inputs, scores, maps, valid, thresholds: Thresholds,
                         batch_size: int = 8) -> dict:
    """Score the calibration images again with bf16 autocast and compare with the fp32 result:
    the verdict (``half_precision``) is what lets ``precision: auto`` run this checkpoint in bf16
    on a GPU. bf16 rounds the same way on every device, so the check means the same when it runs
    on the CPU that trained the model (there it is slower than fp32, but only a few images)."""
    previous = detector.precision
    detector.set_precision("bf16")
    try:
        half_maps, half_scores = [], []
        for start in range(0, len(inputs), batch_size):
            m, s = detector.score_inputs(inputs[start:start + batch_size])
            half_maps.append(m.float().cpu())
            half_scores.append(s.float().cpu())
    finally:
        detector.precision = previous
    half_maps = torch.cat(half_maps).numpy()
    half_scores = torch.cat(half_scores).numpy()
    score_shift = float(np.max(np.abs(half_scores - scores)) / max(thresholds.image, 1e-12))
    flips = ((half_maps > thresholds.pixel) != (maps > thresholds.pixel))[valid]
    flip_fraction = float(flips.mean()) if flips.size else 0.0
    ok = (math.isfinite(score_shift) and score_shift <= HALF_SCORE_TOLERANCE
          and flip_fraction <= HALF_PIXEL_FLIP_TOLERANCE)
    return {"half_precision": bool(ok), "checked_dtype": "bf16", "checked_on": str(detector.device),
            "images": int(len(scores)), "max_score_shift_of_threshold": round(score_shift, 6),
            "pixel_decision_flips": round(flip_fraction, 6),
            "tolerance": {"score_shift_of_threshold": HALF_SCORE_TOLERANCE,
                          "pixel_decision_flips": HALF_PIXEL_FLIP_TOLERANCE}}


def _file_digest(paths) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(p).encode())
    return digest.hexdigest()[:12]


def train(dataset_root, category: str, out_path, cfg: TrainConfig | None = None) -> dict:
    """Train one class and write the checkpoint. Returns the metadata written."""
    cfg = cfg or TrainConfig()
    if cfg.loss_from_profile:
        cfg.loss = profile_loss(cfg.profile, cfg.loss)
    seed_everything(cfg.seed)
    if resolve_device(cfg.device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.time()
    cache = PreprocessCache(cfg.cache_dir) if cfg.cache_dir is not None else PreprocessCache()

    train_set = open_dataset(dataset_root, category, "train", shots=cfg.shots, seed=cfg.shots_seed,
                             format=cfg.dataset_format)
    try:
        val_set = open_dataset(dataset_root, category, "validation", format=cfg.dataset_format)
    except DatasetError:
        val_set = None
    log.info("training %s on %d images (%s)", category, len(train_set), dataset_root)

    detector = Detector.build(cfg.profile, backbone_weights=cfg.backbone_weights, device=cfg.device,
                              preprocess_cfg=cfg.preprocess, scoring_cfg=cfg.scoring,
                              latent=cfg.latent, random_init=cfg.random_init_backbones,
                              extractor_options=cfg.extractor_options)
    log.info("model: %s (%d-d) + %s (%d-d) -> heads, latent %d\n%s", detector.rgb_extractor.name,
             detector.rgb_extractor.out_dim, detector.xyz_extractor.name,
             detector.xyz_extractor.out_dim, detector.heads.latent,
             detector.heads.parameter_summary())
    train_inputs = [preprocess_sample(train_set[i], cfg.preprocess, cache)
                    for i in tqdm(range(len(train_set)), desc="preprocess", disable=not cfg.progress,
                                  leave=False)]
    t_feat = time.time()
    f2d, f3d, mask = cache_features(detector, train_inputs, progress=cfg.progress)
    feature_seconds = time.time() - t_feat
    feature_norm = None
    if cfg.resolved_standardize():
        feature_norm = FeatureNorm.fit(f2d, f3d, mask)
        f2d, f3d = _standardize_cached(feature_norm, f2d, f3d, mask)
        detector.feature_norm = feature_norm
    t_heads = time.time()
    history = train_heads(detector, f2d, f3d, mask, cfg)
    head_seconds = time.time() - t_heads
    if not all(math.isfinite(v) for v in history):
        raise FloatingPointError(f"training diverged (losses {history[-3:]}); lower --lr")
    memory_bank = None
    bank_seconds = 0.0
    if cfg.memory_bank > 0:
        t_bank = time.time()
        memory_bank = build_memory_bank(detector, train_inputs, f2d, f3d, mask, feature_norm, cfg)
        detector.memory_bank = memory_bank.to(detector.device)
        bank_seconds = time.time() - t_bank

    # Calibrate on held-out good images; without a validation split fall back to the training
    # images (optimistic: said so in the metadata).
    calib_source = "validation" if val_set is not None and len(val_set) > 0 else "train"
    calib_inputs = ([preprocess_sample(val_set[i], cfg.preprocess, cache) for i in range(len(val_set))]
                    if calib_source == "validation" else train_inputs)
    maps, scores, errors = [], [], []
    for start in range(0, len(calib_inputs), cfg.batch_size):
        errors.append(detector.input_errors(calib_inputs[start:start + cfg.batch_size]))
    if cfg.floor_3d_percentile > 0:
        detector.scoring_cfg = dataclasses.replace(
            detector.scoring_cfg, floor_3d=floor_from_errors(errors, cfg.floor_3d_percentile))
    for r2d, r3d, mask in errors:
        m, s = score_errors(r2d, r3d, mask, detector.scoring_cfg)
        maps.append(m.float().cpu())
        scores.append(s.float().cpu())
    del errors
    maps = torch.cat(maps).numpy()
    scores = torch.cat(scores).numpy()
    valid = np.stack([i.valid for i in calib_inputs])
    thresholds = Thresholds.calibrate(scores, maps, cfg.target_fpr, pixel_mask=valid,
                                      pixel_target_fpr=cfg.pixel_target_fpr)

    inference = half_precision_check(detector, calib_inputs, scores, maps, valid, thresholds,
                                     cfg.batch_size)

    files = [str(p) for p in train_set.files()]
    weights = detector.heads.state_dict()
    if memory_bank is not None:
        weights = {**weights, **memory_bank.state_dict()}
    weights_hash = hashlib.sha256(b"".join(
        t.detach().cpu().contiguous().numpy().tobytes() for _, t in sorted(weights.items()))).hexdigest()
    model_id = f"{cfg.profile}-{category}-{weights_hash[:8]}"
    meta = dict(detector.metadata)
    meta.update({
        "scoring": detector.scoring_cfg.to_dict(),  # with the calibrated floor_3d
        "model_id": model_id,
        "category": category,
        "thresholds": thresholds.to_dict(),
        "loss": cfg.loss.to_dict(),
        "feature_norm": feature_norm.to_dict() if feature_norm is not None else None,
        "memory_bank": memory_bank.options if memory_bank is not None else None,
        # what the model summary printed at the start of training (`mafr train` logs it)
        "parameters": {**detector.heads.parameter_counts(),
                       "mac_per_pixel": detector.heads.macs_per_pixel()},
        "training": {
            "dataset": str(dataset_root), "files": files, "files_digest": _file_digest(files),
            "calibration": calib_source, "n_calibration": len(calib_inputs),
            "epochs": cfg.resolved_epochs(), "batch_size": cfg.batch_size, "lr": cfg.resolved_lr(),
            "crop": cfg.resolved_crop(),
            "lr_schedule": cfg.resolved_lr_schedule(),
            "seed": cfg.seed, "shots": cfg.shots, "shots_seed": cfg.shots_seed,
            "target_fpr": cfg.target_fpr, "pixel_target_fpr": cfg.pixel_target_fpr,
            "floor_3d_percentile": cfg.floor_3d_percentile, "preset": cfg.preset,
            "loss_history": [round(v, 6) for v in history],
            "seconds": {"total": round(time.time() - started, 2),
                        "features": round(feature_seconds, 2), "heads": round(head_seconds, 2),
                        **({"memory_bank": round(bank_seconds, 2)}
                           if memory_bank is not None else {})},
            "device": str(detector.device), "amp": bool(cfg.amp and detector.device.type == "cuda"),
            "torch": torch.__version__,
        },
        "calibration_scores": {"good_mean": float(np.mean(scores)), "good_max": float(np.max(scores))},
        "inference": inference,
        "metrics": {},
    })
    save_checkpoint(out_path, weights, meta)
    log.info("wrote %s (%s)", out_path, model_id)
    return meta

