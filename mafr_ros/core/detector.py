"""The Detector: (rgb, xyz) arrays in, anomaly score and maps out. No ROS.

One object owns the frozen extractors, the trained heads, the preprocessing and the scoring of a
checkpoint, so training, evaluation, bag replay and the ROS node all run the very same code path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import ModelInput, PreprocessConfig, map_to_input, preprocess
from ..errors import CheckpointError, InputError
from . import extractors as _extractors  # noqa: F401  (registers the built-in extractors)
from .align import feature_valid_mask
from .checkpoint import check_state_dict, load_checkpoint
from .extractors import build_extractor, extractor_options
from .heads import FusionRestorationHeads
from .memory_bank import MemoryBank, split_state
from .normalization import FeatureNorm
from .profiles import get_profile
from .scoring import (ScoringConfig, Thresholds, normalize_score, restoration_errors,
                      score_errors)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    return dev


#: Inference precisions: "fp32", or "bf16" autocast of the extractors and heads (errors, fusion,
#: smoothing and scores always in fp32); "auto" picks bf16 on a CUDA device when the checkpoint's
#: own check passed (``metadata["inference"]["half_precision"]``, see train.half_precision_check),
#: else fp32. No fp16: its 65504 range overflows in the lite descriptors (NaN maps, measured), and
#: bf16 runs at the same speed on the GPUs that have tensor cores for either.
PRECISIONS = ("auto", "fp32", "bf16")
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device, metadata: dict | None) -> str:
    """The precision a detector on ``device`` runs at: explicit values as given, "auto" as above.
    On a CPU "auto" is always fp32 (few CPUs compute bf16 natively; emulated it is slower)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    allowed = bool(((metadata or {}).get("inference") or {}).get("half_precision"))
    if device.type == "cuda" and allowed:
        return "bf16"
    return "fp32"


def resolve_backbone_weights(recorded: str | None, override: str | None, needs_weights: bool):
    """The weight file to build an extractor from when loading a checkpoint: the user's override,
    else the file recorded at training time; None for weight-free extractors and for backbones that
    were trained with random initialisation (benchmarks/tests; the weights hash still has to match)."""
    if not needs_weights:
        return None
    if override:
        return str(override)
    if recorded and not recorded.startswith(("random-init", "none")):
        return recorded
    return None


@dataclass
class Detection:
    """Result of one frame. Maps are (H, W) float32 at the input image resolution."""

    score: float
    normalized_score: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    normalized_map: np.ndarray
    grid_map: np.ndarray
    valid_fraction: float
    timings_ms: dict = field(default_factory=dict)


def check_extractor_options(profile, options: dict | None) -> dict:
    """{"rgb": {...}, "xyz": {...}} of ``options`` (keyword arguments of the profile's extractors),
    refused with a ValueError for unknown modalities, for extractors that take weight files (their
    layers are fixed by the checkpoint) and for keywords the extractor does not have."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"rgb", "xyz"})
    if unknown:
        raise ValueError(f"extractor options for {unknown}: the modalities are rgb and xyz")
    out = {}
    for modality, name in (("rgb", profile.rgb_extractor), ("xyz", profile.xyz_extractor)):
        given = dict(options.get(modality) or {})
        if given and profile.needs_weights:
            raise ValueError(f"extractor options {sorted(given)} for {name}: only the weight-free "
                             "extractors (profile lite) take options")
        if given:
            accepted = extractor_options(name)
            bad = sorted(set(given) - accepted)
            if bad:
                raise ValueError(f"{name} has no option {', '.join(bad)}; its options are "
                                 f"{', '.join(sorted(accepted))}")
        out[modality] = given
    return out


class Detector:
    def __init__(self, heads: FusionRestorationHeads, rgb_extractor, xyz_extractor,
                 preprocess_cfg: PreprocessConfig, scoring_cfg: ScoringConfig,
                 thresholds: Thresholds | None, metadata: dict, device="cpu",
                 feature_norm: FeatureNorm | None = None, memory_bank: MemoryBank | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.heads = heads.to(self.device).eval()
        self.rgb_extractor = rgb_extractor.to(self.device)
        self.xyz_extractor = xyz_extractor.to(self.device)
        self.preprocess_cfg = preprocess_cfg
        self.scoring_cfg = scoring_cfg
        self.thresholds = thresholds
        self.metadata = metadata
        # Per-channel standardisation applied before the heads (None: raw features, as published).
        self.feature_norm = feature_norm
        # Optional nearest-neighbour scorer (``mafr train --memory-bank N``): its distance maps
        # take the place of the heads' restoration errors. None: the heads score (the default).
        self.memory_bank = memory_bank.to(self.device) if memory_bank is not None else None
        self.precision = "fp32"

    def set_precision(self, precision: str = "auto") -> str:
        """Choose the inference precision (``PRECISIONS``); returns the one in effect."""
        self.precision = resolve_precision(precision, self.device, self.metadata)
        return self.precision

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES[self.precision]
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, profile: str, backbone_weights: dict | None = None, device="cpu",
              preprocess_cfg: PreprocessConfig | None = None,
              scoring_cfg: ScoringConfig | None = None, latent: int | None = None,
              random_init: bool = False, extractor_options: dict | None = None) -> "Detector":
        """An untrained detector of a profile (used by training).

        ``extractor_options``: {"rgb": {...}, "xyz": {...}} keyword arguments of the weight-free
        extractors (e.g. ``{"rgb": {"hog_invariant": True}}``); recorded in the metadata through the
        extractors' configuration, so ``from_checkpoint`` rebuilds the same descriptors."""
        prof = get_profile(profile)
        backbone_weights = backbone_weights or {}
        preprocess_cfg = preprocess_cfg or PreprocessConfig()
        options = check_extractor_options(prof, extractor_options)
        kwargs = {"grid": preprocess_cfg.grid}
        if prof.needs_weights:
            kwargs["random_init"] = random_init
        rgb = build_extractor(prof.rgb_extractor, weights=backbone_weights.get("rgb"),
                              **kwargs, **options["rgb"])
        xyz = build_extractor(prof.xyz_extractor, weights=backbone_weights.get("xyz"),
                              **kwargs, **options["xyz"])
        latent = latent or prof.latent or (rgb.out_dim + xyz.out_dim) // 2
        heads_cfg = dict(dim_2d=rgb.out_dim, dim_3d=xyz.out_dim, latent=latent,
                         encoder_layers=prof.encoder_layers, decoder_layers=prof.decoder_layers,
                         dropout=prof.dropout, cbam_reduction=prof.cbam_reduction)
        heads = FusionRestorationHeads(**heads_cfg)
        metadata = {"profile": prof.name, "heads": heads_cfg,
                    "extractors": {"rgb": rgb.describe(), "xyz": xyz.describe()},
                    "preprocess": preprocess_cfg.to_dict(),
                    "scoring": (scoring_cfg or ScoringConfig()).to_dict(), "thresholds": None}
        return cls(heads, rgb, xyz, preprocess_cfg, scoring_cfg or ScoringConfig(), None,
                   metadata, device)

    @classmethod
    def from_checkpoint(cls, path, device="auto", backbone_weights: dict | None = None,
                        precision: str = "auto") -> "Detector":
        """Load a checkpoint written by `mafr train`; every problem is a CheckpointError naming
        the file. ``backbone_weights`` ({"rgb": path, "xyz": path}) overrides the weight files the
        checkpoint was trained with (paper profile); their hash must match the recorded one.
        ``precision``: see ``PRECISIONS`` (checked before anything is loaded)."""
        device = resolve_device(device)
        resolve_precision(precision, device, None)
        state, meta = load_checkpoint(path)
        try:
            prof = get_profile(meta["profile"])
            preprocess_cfg = PreprocessConfig.from_dict(meta["preprocess"])
            scoring_cfg = ScoringConfig.from_dict(meta["scoring"])
            thresholds = Thresholds.from_dict(meta["thresholds"]) if meta["thresholds"] else None
            heads = FusionRestorationHeads(**meta["heads"])
            # Absent in checkpoints written before the option existed: raw features.
            feature_norm = FeatureNorm.from_dict(meta.get("feature_norm"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: incompatible metadata ({exc})") from None
        state, bank_state = split_state(state)
        check_state_dict(heads.state_dict(), state, path, "MAFR heads",
                         "the checkpoint does not match its own metadata: retrain it with `mafr train`")
        heads.load_state_dict(state)
        # Absent in checkpoints without a bank (and in all written before the option existed).
        memory_bank = MemoryBank.from_checkpoint(
            bank_state, meta.get("memory_bank"), (meta["heads"]["dim_2d"], meta["heads"]["dim_3d"]),
            path)
        backbone_weights = backbone_weights or {}
        extractors = {}
        for modality, name in (("rgb", prof.rgb_extractor), ("xyz", prof.xyz_extractor)):
            recorded = meta["extractors"][modality]
            if recorded["name"] != name:
                raise CheckpointError(f"checkpoint {path}: {modality} extractor {recorded['name']!r} "
                                      f"does not belong to profile {prof.name!r}")
            weights = resolve_backbone_weights(recorded.get("weights"), backbone_weights.get(modality),
                                               prof.needs_weights)
            kwargs = {"grid": preprocess_cfg.grid}
            if prof.needs_weights:
                kwargs["random_init"] = weights is None
            else:  # weight-free: the recorded configuration is the extractor (checked by its hash)
                kwargs.update({k: v for k, v in (recorded.get("config") or {}).items()
                               if k not in ("version", "grid")})
            try:
                extractor = build_extractor(name, weights=weights, **kwargs)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint {path}: the recorded {name} configuration cannot "
                                      f"be built by this version ({exc}); retrain it") from None
            if extractor.out_dim != meta["heads"][f"dim_{'2d' if modality == 'rgb' else '3d'}"]:
                raise CheckpointError(f"checkpoint {path}: {name} gives {extractor.out_dim}-d features "
                                      "but the heads were trained on another width")
            if extractor.weights_hash() != recorded.get("weights_hash"):
                raise CheckpointError(
                    f"checkpoint {path}: the {modality} extractor {name} differs from the one the heads "
                    f"were trained with (weights hash {extractor.weights_hash()} != "
                    f"{recorded.get('weights_hash')}); point the configuration at the same backbone "
                    "file that was used for training")
            extractors[modality] = extractor
        detector = cls(heads, extractors["rgb"], extractors["xyz"], preprocess_cfg, scoring_cfg,
                       thresholds, meta, device, feature_norm, memory_bank)
        detector.set_precision(precision)
        return detector

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return self.metadata.get("model_id") or f"{self.metadata.get('profile', '?')}-untrained"

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def extract(self, rgb: torch.Tensor, xyz: torch.Tensor):
        """Frozen features on the grid: f2d (B,C2,S,S), f3d (B,C3,S,S) and the mask of pixels with
        a non-empty 3D feature (B,S,S)."""
        rgb = rgb.to(self.device, non_blocking=True)
        xyz = xyz.to(self.device, non_blocking=True)
        with self._autocast():
            f2d = self.rgb_extractor(rgb)
            f3d = self.xyz_extractor(xyz)
        if self.precision != "fp32":
            f2d, f3d = f2d.float(), f3d.float()
        return f2d, f3d, feature_valid_mask(f3d)

    def normalize_features(self, f2d, f3d, mask):
        """The features the heads restore: standardised when the model has a ``FeatureNorm``."""
        if self.feature_norm is None:
            return f2d, f3d
        return self.feature_norm.apply(f2d, f3d, mask)

    @torch.no_grad()
    def error_maps(self, f2d, f3d, mask):
        """Per-modality error maps (B,S,S) r2d, r3d of extractor outputs f2d, f3d.

        Measured in the space the heads restore (after ``normalize_features``): the restoration
        errors of the heads, or with a memory bank the distances of the same features to their
        nearest bank entries (fp32; the heads do not run)."""
        f2d, f3d = self.normalize_features(f2d, f3d, mask)
        if self.memory_bank is not None:
            return self.memory_bank.distance_maps(f2d.float(), f3d.float(), mask)
        with self._autocast():
            rec2d, rec3d = self.heads.forward_grid(f2d, f3d, mask)
        if self.precision != "fp32":
            rec2d, rec3d = rec2d.float(), rec3d.float()
        return restoration_errors(f2d, rec2d), restoration_errors(f3d, rec3d)

    @torch.no_grad()
    def input_errors(self, inputs: list[ModelInput]):
        """(r2d, r3d, mask), each (B,S,S), of already preprocessed inputs: what ``score_errors``
        turns into maps and scores (so several scoring configurations can share one pass)."""
        rgb = torch.from_numpy(np.stack([i.rgb for i in inputs]))
        xyz = torch.from_numpy(np.stack([i.xyz for i in inputs]))
        f2d, f3d, mask = self.extract(rgb, xyz)
        r2d, r3d = self.error_maps(f2d, f3d, mask)
        return r2d, r3d, mask

    @torch.no_grad()
    def score_inputs(self, inputs: list[ModelInput]):
        """Grid maps (B,S,S) and image scores (B,) of already preprocessed inputs."""
        r2d, r3d, mask = self.input_errors(inputs)
        return score_errors(r2d, r3d, mask, self.scoring_cfg)

    # ------------------------------------------------------------------ one frame
    def detect(self, rgb: np.ndarray, xyz: np.ndarray,
               normalized_out: np.ndarray | None = None) -> Detection:
        """Score one frame: rgb (H,W,3) uint8 RGB, xyz (H,W,3) float metres registered to it
        (invalid = 0 or NaN).

        ``normalized_out``: an (H, W) float32 array to compute the normalised map into (e.g. a
        shared-memory buffer of the detector process); the Detection's ``normalized_map`` is then
        that array. The same values, written where the caller reads them instead of copied there.
        """
        if normalized_out is not None and (normalized_out.shape != rgb.shape[:2]
                                           or normalized_out.dtype != np.float32):
            raise InputError(f"normalized_out must be float32 {rgb.shape[:2]}, got "
                             f"{normalized_out.dtype} {normalized_out.shape}")
        if self.thresholds is None:
            raise CheckpointError("this detector has no calibrated thresholds; train it with `mafr train`")
        t0 = time.perf_counter()
        model_input = preprocess(rgb, xyz, self.preprocess_cfg)
        t1 = time.perf_counter()
        smoothed, scores = self.score_inputs([model_input])
        grid_map = smoothed[0].float().cpu().numpy()
        score = float(scores[0])
        if not np.isfinite(score):
            raise InputError(f"the detector produced a non-finite image score ({score}) at precision "
                             f"{self.precision}; check the input for extreme values, or run with "
                             "precision fp32 if this only happens in bf16")
        t2 = time.perf_counter()
        anomaly_map = map_to_input(grid_map, model_input.frame).astype(np.float32, copy=False)
        th = self.thresholds
        normalized = normalize_score(anomaly_map, th.pixel, th.pixel_scale)
        if normalized_out is None:
            normalized_map = normalized.astype(np.float32)
        else:
            normalized_map = normalized_out
            np.copyto(normalized_map, normalized, casting="same_kind")
        # Far from every valid 3D point the smoothed map is exactly 0: say "nothing measured" (0)
        # there rather than the small positive value the normalisation gives a zero score.
        normalized_map[anomaly_map <= 0] = 0.0
        t3 = time.perf_counter()
        return Detection(
            score=score,
            normalized_score=float(normalize_score(score, th.image, th.image_scale)),
            is_anomalous=score > th.image,
            anomaly_map=anomaly_map,
            normalized_map=normalized_map,
            grid_map=grid_map,
            valid_fraction=float(model_input.valid.mean()),
            timings_ms={"preprocess": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3,
                        "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3},
        )

    def warmup(self, size: int = 64):
        """Run one synthetic frame so that lazy allocations happen before the first real one."""
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        xyz = np.stack([(xx - size / 2) * 1e-3, (yy - size / 2) * 1e-3,
                        0.65 + 1e-4 * rng.standard_normal((size, size))], -1).astype(np.float32)
        return self.score_inputs([preprocess(rgb, xyz, self._warmup_cfg())])

    def _warmup_cfg(self) -> PreprocessConfig:
        # The warm-up frame is a plain tilted sheet: skip plane removal and clustering, which
        # would remove it, but keep the grid and everything after it identical.
        cfg = PreprocessConfig.from_dict(self.preprocess_cfg.to_dict())
        cfg.remove_plane = False
        cfg.cluster = False
        return cfg


def default_model_path() -> Path:
    """The embedded default checkpoint shipped in models/ (lite profile, synthetic parts)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "models" / "lite_synthetic.safetensors"]
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory("mafr_ros")) / "models" /
                          "lite_synthetic.safetensors")
    except Exception:  # not a colcon install: the source-tree copy is the one
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]
