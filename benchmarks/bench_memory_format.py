"""Benchmark: why infer_volume and training run models in channels_last — one U-Net forward (or
training step), both formats.

For each encoder, the same model (random weights, seed 0, eval, torch.inference_mode) runs a
(batch, in_chans, tile, tile) float32 batch in the default (contiguous) memory format and in
torch.channels_last (model and input converted, as vessel_kit.infer does). Reported: best and
median seconds per forward over --repeat runs after one warm-up each, the speed-up, and the
largest |difference| of the two outputs. ``--mode train`` times a training step instead (train
mode, forward, BCE loss against a fixed random target, backward, AdamW step), as ``train`` runs
it; the output difference is then that of the first step's logits.

    python benchmarks/bench_memory_format.py                     # resnet18 and convnext_tiny, ~1 min on 2 cores
    python benchmarks/bench_memory_format.py --encoders resnet18 --tile 128 --json /tmp/mf.json
    python benchmarks/bench_memory_format.py --mode train --encoders mobilenet_v2 --batch 16 --tile 128 \
        --decoder-channels 128,64,32,16,8                        # the demo's model and batch
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
    parser.add_argument("--mode", choices=("forward", "train"), default="forward",
                        help="time an inference forward (default) or a training step")
    parser.add_argument("--decoder-channels", type=lambda text: [int(c) for c in text.split(",")],
                        help="U-Net decoder channels, e.g. 128,64,32,16,8 (default: smp's)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)

    import torch

    from vessel_kit.models import build_model

    print(_common.describe_machine(_common.machine_info()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.mode}; batch ({args.batch}, "
          f"{args.in_chans}, {args.tile}, {args.tile})")
    kwargs = {"decoder_channels": args.decoder_channels} if args.decoder_channels else {}
    rows, results = [], {}
    for encoder in args.encoders.split(","):
        batch = torch.randn(args.batch, args.in_chans, args.tile, args.tile, generator=torch.Generator().manual_seed(1))
        target = (torch.rand(args.batch, 1, args.tile, args.tile, generator=torch.Generator().manual_seed(2)) > 0.9).float()
        timings, outputs = {}, {}
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            torch.manual_seed(0)  # the same weights in both formats
            model = build_model("unet", encoder, in_chans=args.in_chans, **kwargs).to(memory_format=fmt)
            x = batch.contiguous(memory_format=fmt)
            if args.mode == "train":
                step = _training_step(model.train(), x, target)
                outputs[name] = step()  # warm-up: the first step's logits
                times, _ = _common.time_repeated(step, args.repeat)
            else:
                model.eval()
                with torch.inference_mode():
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


def _training_step(model, x, target):
    """One training step of ``model`` on ``x``: forward, BCE, backward, AdamW; returns the logits."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits.detach()

    return step


if __name__ == "__main__":
    raise SystemExit(main())
