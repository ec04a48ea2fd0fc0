"""Training throughput: features cached once (this package) versus the frozen backbones recomputed at
every step (the published code), measured in the same run on the same frames.

    python bench/train_speed.py [--profiles lite paper] [--images N] [--steps N] [--tile auto|0|S]

Three schemes per profile, all on the same preprocessed synthetic frames:

1. ``reference``: what the published training does per step: both frozen backbones on one image,
   then one Adam step of the heads on the whole 224 x 224 grid (batch 1, no mask, the published
   loss ``LossConfig.reference()``);
2. ``cache, same step``: the same full-grid step on features computed once beforehand (isolates
   what the cache alone saves);
3. ``cache, package default``: the real ``train.train_heads`` with the package's defaults (the
   profile's crop size, crops centred on the part, batch 8, invalid pixels masked, the profile's
   loss).

Throughput is in images per second per epoch (one epoch = every training image once); schemes 2 and
3 are shown in steady state and with the one-off feature caching amortised over the profile's
default schedule (``train.DEFAULT_EPOCHS``). ``--tile``: on a CPU a full-grid step of the paper
heads takes minutes, so by default ("auto": 64 on CPU for the paper profile, off otherwise) the
full-grid steps of schemes 1 and 2 are timed on S x S tiles and scaled by the token count
(224^2 / S^2): the heads are per-pixel MLPs and every loss term is local, so their cost is linear
in the number of pixels (the script also prints this check for the lite profile when asked with
--check-tile). The paper profile uses untrained (random-init) backbones: same compute as the real
weights. On a CUDA GPU everything is measured at full size; training uses bf16 autocast there,
as ``train_heads`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _core_common import machine_info, machine_line, markdown_table, median, synthetic_frames, timed  # noqa: E402,E501

from mafr_ros.core.detector import Detector  # noqa: E402
from mafr_ros.core.losses import LossConfig, mafr_loss  # noqa: E402
from mafr_ros.data.preprocess import preprocess  # noqa: E402
from mafr_ros.train import DEFAULT_EPOCHS, TrainConfig, cache_features, profile_loss, train_heads  # noqa: E402,E501


def reference_step(heads, optimiser, f2d, f3d, tile: int | None, use_amp: bool):
    """One published-style step on a whole grid (or on a tile of it, see --tile); returns seconds
    scaled to the whole grid."""
    grid = f2d.shape[-1]
    if tile:
        f2d, f3d = f2d[..., :tile, :tile].contiguous(), f3d[..., :tile, :tile].contiguous()
    device = f2d.device

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            rec2d, rec3d = heads.forward_grid(f2d, f3d)
        loss, _ = mafr_loss(f2d, rec2d.float(), f3d, rec3d.float(), None, LossConfig.reference())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    _, seconds = timed(step, device)
    return seconds * ((grid / tile) ** 2 if tile else 1.0)


def bench_profile(name: str, inputs, steps: int, tile, device) -> dict:
    detector = Detector.build(name, random_init=True, device=device)
    heads = detector.heads
    heads.train()
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
    use_amp = device.type == "cuda"
    rgb = torch.from_numpy(np.stack([i.rgb for i in inputs]))
    xyz = torch.from_numpy(np.stack([i.xyz for i in inputs]))
    n = len(inputs)

    # warm-up: first calls allocate and pick kernels
    f2d, f3d, _ = detector.extract(rgb[:1], xyz[:1])
    reference_step(heads, optimiser, f2d, f3d, tile, use_amp)

    # 1. reference: backbones + full-grid step, every step
    backbone, ref_step = [], []
    for k in range(steps):
        i = k % n
        (f2d, f3d, _), seconds = timed(lambda: detector.extract(rgb[i:i + 1], xyz[i:i + 1]), device)
        backbone.append(seconds)
        ref_step.append(reference_step(heads, optimiser, f2d, f3d, tile, use_amp))
    reference = median(backbone) + median(ref_step)

    # feature cache: once per image (what `mafr train` does before the first epoch)
    (cached, cache_seconds) = timed(lambda: cache_features(detector, inputs, batch_size=1,
                                                           store_device=device), device)
    f2d_all, f3d_all, mask_all = cached
    cache_per_image = cache_seconds / n

    # 2. cache + the same full-grid step
    same = []
    for k in range(steps):
        i = k % n
        same.append(reference_step(heads, optimiser, f2d_all[i:i + 1].float(), f3d_all[i:i + 1].float(),
                                   tile, use_amp))
    same_step = median(same)

    # 3. cache + the package's default training loop (train.train_heads), one epoch per repeat
    cfg = TrainConfig(profile=name, progress=False, device=str(device), loss=profile_loss(name),
                      loss_from_profile=False)
    cfg.epochs = 1
    if name == "paper" and device.type == "cpu":
        cfg.batch_size = 1  # same tokens per epoch; keeps one CPU step under a minute
    epochs = []
    for _ in range(max(1, steps // n)):
        _, seconds = timed(lambda: train_heads(detector, f2d_all, f3d_all, mask_all, cfg), device)
        epochs.append(seconds / n)
    default_step = median(epochs)
    valid = float(mask_all.flatten(1).float().mean())
    schedule = DEFAULT_EPOCHS[name]
    return {
        "profile": name, "images": n, "steps": steps, "tile": tile, "valid_fraction": valid,
        "backbone_s": median(backbone), "reference_step_s": median(ref_step),
        "reference_s_per_image": reference, "cache_s_per_image": cache_per_image,
        "same_step_s_per_image": same_step, "default_s_per_image": default_step,
        "schedule_epochs": schedule, "batch_size_default": cfg.batch_size,
        "crop_default": cfg.resolved_crop(), "loss_default": cfg.loss.to_dict(),
    }


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        e = r["schedule_epochs"]
        ref = r["reference_s_per_image"]
        amortised = r["cache_s_per_image"] / e
        for label, per_image in (("reference: backbones every step, full grid, batch 1", ref),
                                 ("cache, same full-grid step", r["same_step_s_per_image"]),
                                 (f"cache, package default (crops {r['crop_default']}, batch "
                                  f"{r['batch_size_default']}, masked)", r["default_s_per_image"])):
            cached = label.startswith("cache")
            with_cache = per_image + (amortised if cached else 0.0)
            rows.append([r["profile"], label, f"{per_image:.3f}", f"{1 / per_image:.3g}",
                         f"{1 / with_cache:.3g}" if cached else "–",
                         f"{ref / per_image:.1f}x", f"{ref / with_cache:.1f}x" if cached else "1.0x"])
    return markdown_table(["profile", "scheme", "s per image-epoch", "images/s",
                           f"images/s incl. caching", "speed-up", "speed-up incl. caching"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["lite", "paper"], choices=["lite", "paper"])
    parser.add_argument("--images", type=int, default=4, help="training frames (synthetic, 256 px)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per scheme (medians)")
    parser.add_argument("--tile", default="auto",
                        help="auto (64 on CPU for paper), 0 (full grid) or a tile side in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    frames = synthetic_frames(args.images)
    inputs = [preprocess(rgb, xyz) for rgb, xyz in frames]
    results = []
    for name in args.profiles:
        if args.tile == "auto":
            tile = 64 if (name == "paper" and device.type == "cpu") else None
        else:
            tile = int(args.tile) or None
        steps = args.steps if name == "lite" else max(2, args.steps // 2)
        results.append(bench_profile(name, inputs, steps, tile, device))
        print(f"{name}: done", file=sys.stderr)
    info = machine_info()
    print(table(results))
    print()
    notes = [f"{r['profile']}: {r['images']} synthetic frames (valid fraction {r['valid_fraction']:.2f}), "
             f"medians of {r['steps']} steps; backbones {r['backbone_s']:.3f} s/image, feature "
             f"caching {r['cache_s_per_image']:.3f} s/image, amortised over {r['schedule_epochs']} "
             f"epochs" + (f"; full-grid steps timed on {r['tile']}x{r['tile']} tiles and scaled by "
                          f"(224/{r['tile']})^2" if r["tile"] else "") for r in results]
    print("\n".join(f"- {n}" for n in notes))
    print(f"- {machine_line(info)}; device {device}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "device": str(device), "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
