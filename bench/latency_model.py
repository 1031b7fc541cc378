"""How good is crl_prune's latency model? Predicted against measured latency over random width vectors.

    python bench/latency_model.py --arch vgg16 --device cpu --batch 1 --samples 30

Builds the latency table (timing every unit at a grid of widths, as `--budget latency=...` does), then for
`--samples` random width vectors (every group keeps a uniform random fraction in [0.05, 1] of its channels) builds
the network with those widths, times it (eval mode, warm-up, the fastest of 3 medians of 21 runs) and compares with
the prediction.
Prints the table's build time, the median and worst relative error, and every pair.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='vgg16')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--samples', type=int, default=30)
    p.add_argument('--bf16', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    numerics = crl.Numerics(torch.device(args.device), args.bf16, args.channels_last)
    net = crl.network(args.arch, args.width, 10)
    model = net.model
    t0 = time.time()
    table = crl.latency_table(net, numerics, args.batch)
    build_s = time.time() - t0
    cost = crl.Latency(table, numerics)
    g = torch.Generator().manual_seed(args.seed)
    dense = torch.tensor(crl.group_widths(model))
    errors = []
    print(f"{args.arch} width {args.width} on {table['meta']['device']}, batch {args.batch}, bf16 {numerics.bf16}, "
          f"channels_last {numerics.channels_last}, torch {torch.__version__}")
    fit = table['fit']
    print(f"table: {len(table['units'])} units, built in {build_s:.1f} s; dense {table['dense_ms']:.3f} ms measured, "
          f"fit a {fit['coef'][0]:.3f}, b {fit['coef'][1]:.3f} ms, R^2 {fit['r2']:.3f}"
          + (f" (degenerate: {fit['note']})" if fit['degenerate'] else '') + "\n")
    print('| predicted ms | measured ms | relative error | widths |')
    print('|---|---|---|---|')
    for _ in range(args.samples):
        keep = torch.rand(len(dense), generator=g) * 0.95 + 0.05
        widths = (dense * keep).round().clamp(min=1).long()
        predicted = cost.predict_ms(widths[None]).item()
        (measured,), _ = cost.measurements(crl.Prunable(model).shrink(widths.tolist()))
        errors.append((predicted - measured) / measured)
        print(f"| {predicted:.3f} | {measured:.3f} | {100 * errors[-1]:+.1f}% | "
              f"{' '.join(map(str, widths.tolist()))} |", flush=True)
    abs_err = [abs(e) for e in errors]
    print(f"\nmedian |relative error| {100 * statistics.median(abs_err):.1f}%, worst {100 * max(abs_err):.1f}%, "
          f"mean signed {100 * statistics.mean(errors):+.1f}% over {len(errors)} width vectors")


if __name__ == '__main__':
    main()
