"""Inference latency per stage at batch 1, end-to-end frames per second, peak memory, and the heads on
valid pixels only versus the full grid, for the ``lite`` and ``paper`` profiles.

    python bench/inference.py [--profiles lite paper] [--repeats N] [--precisions fp32 bf16]
                              [--memory-bank N]

Every (profile, device, precision) runs in a child process of its own so that its peak host memory
(ru_maxrss) and GPU memory (torch.cuda.max_memory_allocated) are its own. Frame: the first test
image of the real MVTec 3D-AD cable_gland subset in ../shared/data when present (400 x 400, cut
defect), else a synthetic part. The paper profile uses untrained (random-init) backbones: the same
compute as the real weights. Precisions: fp32 everywhere; on CUDA also bf16 autocast (the
Detector's ``precision`` option: extractors and heads in bf16, scoring in fp32).

Stages (each timed with the device synchronised, medians over the repeats):

- preprocess: ``data.preprocess.preprocess`` (background plane, largest cluster, square pad, resize);
- 2D features: the RGB backbone (DINO ViT-B/8 tokens; lite: colour/texture descriptors);
- 2D alignment: patch tokens upsampled to the grid (paper; lite computes on the grid);
- 3D features: Point-MAE including farthest-point sampling and the 128-neighbour grouping (lite:
  the surface descriptors), with FPS and grouping also shown alone for the paper profile;
- 3D alignment: group features spread onto the pixels (3 nearest centres) + 3x3 mean (paper);
- heads: the fusion encoder and both decoders on the pixels with a 3D feature (the node's path);
- scoring: restoration errors, fusion, smoothing, image score; map back to the input resolution;
- end to end: ``Detector.detect`` on the raw frame (everything above), as frames per second;
- with ``--memory-bank N``: the opt-in memory-bank scorer (``mafr train --memory-bank N``) in place
  of the heads, alone on the valid pixels and end to end. Its banks are N seeded random rows per
  modality: the same compute as a trained bank of that size (the distance search does not depend
  on the values).

Heads on valid pixels only versus the full grid: both are timed, and their outputs compared with
torch.allclose on the valid pixels together with the fused (zeroed) anomaly maps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _core_common import (machine_info, machine_line, markdown_table, median, peak_rss_mib,  # noqa: E402
                          synthetic_frames, timed)

REPO = Path(__file__).resolve().parents[1]
CABLE_GLAND = REPO.parent / "shared" / "data" / "mvtec3d" / "cable_gland"
STAGES = ("preprocess", "2D features", "2D alignment", "3D features", "  of which FPS",
          "  of which grouping (KNN)", "3D alignment", "heads (valid pixels)",
          "memory bank (valid pixels)", "scoring", "map to input")


def load_frame():
    try:
        from mafr_ros.data.mvtec import MVTecDataset

        sample = MVTecDataset(CABLE_GLAND.parent, CABLE_GLAND.name, "test")[0]
        return sample.rgb, sample.xyz, f"MVTec 3D-AD cable_gland test {sample.rgb_path.parent.parent.name}/" \
                                       f"{sample.rgb_path.name} ({sample.rgb.shape[1]}x{sample.rgb.shape[0]})"
    except Exception as exc:  # no shared data on this machine: a synthetic part instead
        rgb, xyz = synthetic_frames(1)[0]
        return rgb, xyz, f"synthetic gland part 256x256 (shared data unavailable: {exc})"


def run_child(profile: str, device_name: str, precision: str, repeats: int, full_repeats: int,
              bank_size: int = 0, extractor_options: dict | None = None) -> dict:
    import torch

    from mafr_ros.core.align import feature_valid_mask, spread_group_features, upsample_patch_features
    from mafr_ros.core.detector import Detector
    from mafr_ros.core.extractors.base import valid_mask_from_xyz
    from mafr_ros.core.memory_bank import MemoryBank
    from mafr_ros.core.scoring import Thresholds, fuse_maps, restoration_errors, score_errors
    from mafr_ros.data.preprocess import map_to_input, preprocess

    device = torch.device(device_name)
    rgb_np, xyz_np, frame_name = load_frame()
    detector = Detector.build(profile, random_init=True, device=device,
                              extractor_options=extractor_options)
    detector.thresholds = Thresholds(image=1.0, pixel=1.0, image_scale=1.0, pixel_scale=1.0)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    detector.set_precision(precision)  # what `detect` runs at (end-to-end row)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)

    rgb_ext, xyz_ext, heads = detector.rgb_extractor, detector.xyz_extractor, detector.heads
    paper = profile == "paper"
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    times["heads (full grid)"] = []
    times["end to end"] = []
    times["end to end, memory bank"] = []
    bank = None
    if bank_size > 0:
        g = torch.Generator().manual_seed(0)
        dims = (detector.heads.dim_2d, detector.heads.dim_3d)
        bank = MemoryBank(*(torch.randn(bank_size, d, generator=g) for d in dims),
                          {"size": bank_size, "method": "random (benchmark)"}).to(device)
    check = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def stage(name, fn):
        with torch.no_grad(), autocast():
            result, seconds = timed(fn, device)
        times[name].append(seconds)
        return result

    for rep in range(repeats + 1):  # repeat 0 warms up (allocations, kernel selection) and is dropped
        model_input = stage("preprocess", lambda: preprocess(rgb_np, xyz_np, detector.preprocess_cfg))
        rgb = torch.from_numpy(model_input.rgb[None]).to(device)
        xyz = torch.from_numpy(model_input.xyz[None]).to(device)
        if paper:
            vit = rgb_ext.vit
            tokens = stage("2D features", lambda: vit.forward_features(rgb.to(vit.cls_token.dtype)))
            side = rgb_ext.input_size // vit.patch_embed.patch_size[0]
            f2d = stage("2D alignment", lambda: upsample_patch_features(
                tokens[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, side, side),
                rgb_ext.grid).float())
            # 3D: the extractor's own steps, one by one (same calls as PointMAEExtractor.extract)
            valid = valid_mask_from_xyz(xyz).flatten(1)
            count = int(valid.sum())
            points = xyz.flatten(2).transpose(1, 2)[valid][None]
            points_valid = torch.ones(1, count, dtype=torch.bool, device=device)

            def three_d():
                names = {"FPS": "  of which FPS", "KNN": "  of which grouping (KNN)"}
                return xyz_ext.group_features(points, points_valid,
                                              run_stage=lambda name, fn: stage(names[name], fn))

            centres, group_feats = stage("3D features", three_d)
            f3d = stage("3D alignment", lambda: spread_group_features(xyz, centres, group_feats.float(),
                                                                      k=3, smooth=True).float())
        else:
            f2d = stage("2D features", lambda: rgb_ext(rgb))
            times["2D alignment"].append(float("nan"))
            f3d = stage("3D features", lambda: xyz_ext(xyz))
            for name in ("  of which FPS", "  of which grouping (KNN)", "3D alignment"):
                times[name].append(float("nan"))
        mask = feature_valid_mask(f3d)
        rec2d, rec3d = stage("heads (valid pixels)", lambda: heads.forward_grid(f2d, f3d, mask))
        if bank is not None:
            stage("memory bank (valid pixels)",
                  lambda: bank.distance_maps(f2d.float(), f3d.float(), mask))
        else:
            times["memory bank (valid pixels)"].append(float("nan"))

        def scoring():
            r2d, r3d = restoration_errors(f2d, rec2d.float()), restoration_errors(f3d, rec3d.float())
            return (r2d, r3d, *score_errors(r2d, r3d, mask, detector.scoring_cfg))

        r2d, r3d, smoothed, _ = stage("scoring", scoring)
        stage("map to input", lambda: map_to_input(smoothed[0].float().cpu().numpy(), model_input.frame))
        if rep <= full_repeats:  # full grid: timed fewer times on slow devices (see --full-repeats)
            full2d, full3d = stage("heads (full grid)", lambda: heads.forward_grid(f2d, f3d))
            if rep == 1 or (repeats == 0 and rep == 0):
                fused = fuse_maps(r2d, r3d, detector.scoring_cfg.fusion, mask)
                fused_full = fuse_maps(restoration_errors(f2d, full2d.float()),
                                       restoration_errors(f3d, full3d.float()),
                                       detector.scoring_cfg.fusion, mask)
                tol = dict(rtol=1e-4, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=2e-2)
                m = mask[0]
                check = {
                    "restored_allclose": bool(torch.allclose(rec2d[0][:, m].float(), full2d[0][:, m].float(), **tol)
                                              and torch.allclose(rec3d[0][:, m].float(), full3d[0][:, m].float(), **tol)),
                    "fused_map_allclose": bool(torch.allclose(fused.float(), fused_full.float(), **tol)),
                    "max_abs_diff": float(max((rec2d[0][:, m] - full2d[0][:, m]).abs().max(),
                                              (rec3d[0][:, m] - full3d[0][:, m]).abs().max())),
                    "tolerance": tol, "valid_fraction": float(mask.float().mean()),
                }
        _, seconds = timed(lambda: detector.detect(rgb_np, xyz_np), device)
        times["end to end"].append(seconds)
        if bank is not None:
            detector.memory_bank = bank
            _, seconds = timed(lambda: detector.detect(rgb_np, xyz_np), device)
            detector.memory_bank = None
        else:
            seconds = float("nan")
        times["end to end, memory bank"].append(seconds)
    result = {"profile": profile, "device": str(device), "precision": precision, "frame": frame_name,
              "extractor_options": extractor_options or {},
              "repeats": repeats, "memory_bank": bank_size, "median_ms": {k: median(v[1:] if len(v) > 1 else v) * 1e3
                                                 for k, v in times.items()},
              "check": check, "peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def fmt(value: float) -> str:
    if value != value:  # NaN: the stage does not exist in this profile
        return "–"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def tables(results: list[dict]) -> str:
    columns = [f"{r['profile']} {r['device'].split(':')[0]} {r['precision']}" for r in results]
    rows = []
    names = STAGES + ("heads (full grid)", "end to end", "end to end, memory bank")
    for name in names:
        if name.startswith(("memory bank", "end to end, memory")) and \
                not any(r.get("memory_bank") for r in results):
            continue
        rows.append([name] + [fmt(r["median_ms"][name]) for r in results])
    rows.append(["frames/s end to end"] + [f"{1e3 / r['median_ms']['end to end']:.2f}" for r in results])
    rows.append(["peak host RSS MiB"] + [f"{r['peak_rss_mib']:.0f}" for r in results])
    rows.append(["peak GPU MiB"] + [f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "–"
                                    for r in results])
    latency = markdown_table(["stage (median ms, batch 1)"] + columns, rows)
    rows = []
    for r, col in zip(results, columns):
        ms = r["median_ms"]
        c = r["check"]
        rows.append([col, f"{c.get('valid_fraction', float('nan')):.3f}", fmt(ms["heads (valid pixels)"]),
                     fmt(ms["heads (full grid)"]),
                     f"{ms['heads (full grid)'] / ms['heads (valid pixels)']:.1f}x",
                     "yes" if c.get("restored_allclose") and c.get("fused_map_allclose") else "NO",
                     f"{c.get('max_abs_diff', float('nan')):.1e}"])
    heads = markdown_table(["profile", "valid fraction", "valid-only ms", "full grid ms", "ratio",
                            "identical (allclose)", "max abs diff"], rows)
    return latency + "\n\n" + heads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["lite", "paper"], choices=["lite", "paper"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats after one warm-up (default: 5 lite, 3 paper on CPU, 20 on GPU)")
    parser.add_argument("--full-repeats", type=int, default=None,
                        help="repeats of the full-grid heads (default: all; 1 for paper on CPU)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="default: fp32 on CPU; fp32 bf16 on CUDA")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    parser.add_argument("--memory-bank", type=int, default=0, metavar="N",
                        help="also time the memory-bank scorer with N entries per modality (default 0: "
                             "not timed)")
    parser.add_argument("--extractor-option", action="append", default=[], metavar="MOD.KEY=VALUE",
                        help="an option of the lite extractors, as `mafr train --extractor-option` "
                             "(e.g. rgb.hog_bins=0); applies to --profiles lite only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=7,
                        metavar=("PROFILE", "DEVICE", "PRECISION", "REPEATS", "FULL", "BANK", "OPTIONS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        profile, device, precision, repeats, full, bank, options = args.child
        print(json.dumps(run_child(profile, device, precision, int(repeats), int(full), int(bank),
                                   json.loads(options))))
        return 0
    from mafr_ros.cli import parse_extractor_options
    try:
        options = parse_extractor_options(args.extractor_option, "lite")
    except ValueError as exc:
        parser.error(str(exc))

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    results = []
    for device in devices:
        precisions = args.precisions or (["fp32", "bf16"] if device.startswith("cuda") else ["fp32"])
        for profile in args.profiles:
            slow = profile == "paper" and device == "cpu"
            repeats = args.repeats if args.repeats is not None else (
                20 if device.startswith("cuda") else (3 if slow else 5))
            full = args.full_repeats if args.full_repeats is not None else (1 if slow else repeats)
            for precision in precisions:
                cmd = [sys.executable, __file__, "--child", profile, device, precision, str(repeats), str(full),
                       str(args.memory_bank), json.dumps(options if profile == "lite" else {})]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if out.returncode != 0:
                    print(f"{profile} {device} {precision} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                    continue
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{profile} {device} {precision}: done", file=sys.stderr)
    if not results:
        return 1
    info = machine_info()
    print(tables(results))
    print()
    print(f"- frame: {results[0]['frame']}; repeats after one warm-up: "
          + ", ".join(f"{r['profile']} {r['device']} {r['precision']} {r['repeats']}" for r in results))
    print(f"- {machine_line(info)}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
