"""Benchmark: why infer_volume runs models in channels_last — one U-Net forward, both formats.

For each encoder, the same model (random weights, seed 0, eval, torch.inference_mode) runs a
(batch, in_chans, tile, tile) float32 batch in the default (contiguous) memory format and in
torch.channels_last (model and input converted, as vessel_kit.infer does). Reported: best and
median seconds per forward over --repeat runs after one warm-up each, the speed-up, and the
largest |difference| of the two outputs.

    python benchmarks/bench_memory_format.py                     # resnet18 and convnext_tiny, ~1 min on 2 cores
    python benchmarks/bench_memory_format.py --encoders resnet18 --tile 128 --json /tmp/mf.json
"""

from __future__ import annotations

import argparse

import _common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="resnet18,tu-convnext_tiny", help="comma-separated (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)

    import torch

    from vessel_kit.models import build_model

    print(_common.describe_machine(_common.machine_info()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch ({args.batch}, {args.in_chans}, "
          f"{args.tile}, {args.tile})")
    rows, results = [], {}
    for encoder in args.encoders.split(","):
        torch.manual_seed(0)
        model = build_model("unet", encoder, in_chans=args.in_chans).eval()
        batch = torch.randn(args.batch, args.in_chans, args.tile, args.tile, generator=torch.Generator().manual_seed(1))
        timings, outputs = {}, {}
        with torch.inference_mode():
            for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                model = model.to(memory_format=fmt)
                x = batch.contiguous(memory_format=fmt)
                model(x)  # warm-up
                times, outputs[name] = _common.time_repeated(lambda: model(x), args.repeat)
                timings[name] = _common.summarize(times)
        difference = float((outputs["contiguous"] - outputs["channels_last"]).abs().max())
        speedup = timings["contiguous"]["best_s"] / timings["channels_last"]["best_s"]
        results[encoder] = {**timings, "speedup": speedup, "max_abs_difference": difference}
        rows.append([encoder, timings["contiguous"]["best_s"], timings["channels_last"]["best_s"], f"{speedup:.2f}x",
                     f"{difference:.2e}"])
    _common.print_table(["encoder", "contiguous best s", "channels_last best s", "speed-up", "max |diff|"], rows)
    _common.write_json(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
