"""Where a pruning step's time goes, training throughput of every phase, and inference of the dense against the
compact network, on synthetic data.

    python bench/speed.py                                   # the run's device (CUDA if there is one), VGG16, ResNet18
    python bench/speed.py --tables inference multiples      # inference only: modes, and channel multiples
    python bench/speed.py --compile both                    # training eager and with torch.compile side by side

Tables (--tables, default all):
  ops         top-level ATen operators (and, on CUDA, kernel launches) of one pruning step's cost evaluation (sample K
              masks -> kept widths -> every cost) and of the whole crl_prune.pruning_step (forward, backward, both
              optimiser steps, dual step)
  training    training images per second of the dense phase, the pruning phase and fine-tuning of a compact network,
              steady state (crl_prune.Progress times from the end of the first 5 steps; their extra time is the
              overhead column: compilation, autotuning)
  inference   dense against compact (crl_prune.inference_speed: the two timed in turns, median of 21 calls, the
              fastest of 3 rounds) in every mode that runs here (eager, BN folded, torch.compile, CUDA graphs on
              CUDA, ONNX Runtime on the CPU), at batch 1 and --batch, with the MAC ratio beside the speed-up
  multiples   the compact network's widths rounded to the nearest multiple of 1, 8, 16, 32 and 64 channels: MACs,
              inference throughput (folded and compiled) and throughput per MAC, to choose --channel-multiple
The compact network keeps the widths that crl_prune.final_mask keeps at --budget from a random policy (seed 0), so
the figures are the networks' own, not a trained run's. Training data are random uint8 images on the device.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402


def synthetic_data(n, numerics):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    d = numerics.device
    return {'train': (x.to(d), y.to(d)), 'test': (x[:1000].to(d), y[:1000].to(d)), 'classes': list(range(10)),
            'mean': torch.full((3,), 0.5), 'std': torch.full((3,), 0.25), 'numerics': numerics}


def count_ops(fn, device):
    """(top-level ATen operators, CUDA kernel launches) of one call of fn, after one warm-up call."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        crl.sync(device)
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith('aten::') and e.cpu_parent is None)
    launches = sum(1 for e in events if e.name in ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel'))
    return ops, launches


def dense_model(arch, args, numerics):
    return numerics.place(crl.build(arch, crl.dense_widths(arch, args.width), 10))


def compact_widths(model, budget):
    """The widths final_mask keeps at `budget` (params=F or macs=F) from a random policy."""
    name, _, value = budget.partition('=')
    costs = crl.make_costs(model, [name])
    policy = crl.Policy(crl.group_widths(model))
    policy.theta.data = torch.randn(len(policy.theta), generator=torch.Generator().manual_seed(0))
    mask = crl.final_mask(policy, costs, torch.tensor([float(value)], dtype=torch.float64))
    return policy.kept(mask[None])[0].tolist()


def ops_per_step(arch, numerics, args):
    model = dense_model(arch, args, numerics)
    device = numerics.device
    costs = crl.make_costs(model, ['params', 'macs'])
    policy = crl.Policy(crl.group_widths(model), 0.9).to(device)
    budget = torch.tensor([0.1, 0.5], dtype=torch.float64, device=device)
    integral, lam = torch.zeros_like(budget), torch.zeros_like(budget)
    opt_w = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    opt_p = torch.optim.Adam(policy.parameters(), 0.1)
    data = synthetic_data(args.batch_size, numerics)
    x, y = next(iter(crl.Batches(data, 'train', args.batch_size // args.samples, train=True)))

    def costs_only():
        kept = policy.kept(policy.sample(args.samples))
        return torch.stack([c(kept) for c in costs.values()], 1)

    def whole_step():
        crl.pruning_step(model, policy, costs, budget, integral, lam, x, y, opt_w, opt_p, args.samples,
                         bf16=numerics.bf16)

    return count_ops(costs_only, device), count_ops(whole_step, device)


def training(arch, numerics, compile_, args):
    """Steady-state images/s and first-steps overhead of the three phases, as crl_prune's command line runs them."""
    if compile_:
        torch._dynamo.reset()
    torch.manual_seed(0)
    data = synthetic_data(args.images, numerics)
    model = dense_model(arch, args, numerics)
    k, device = args.samples, numerics.device

    def timed(name, loop, *a, cost_names=(), **kw):
        progress = crl.Progress(name, 10 ** 9, device, cost_names)
        out = loop(*a, bf16=numerics.bf16, wrap=torch.compile if compile_ else None, callback=progress, **kw)
        return progress.speed(), out

    full = crl.Batches(data, 'train', args.batch_size, train=True)
    dense, _ = timed('dense', crl.train, model, full, 1, phase='dense')
    costs = crl.make_costs(model, ['params'])
    budget = torch.tensor([float(args.budget.partition('=')[2])], dtype=torch.float64, device=device)
    prune, (policy, _) = timed('prune', crl.prune, model, costs, budget, crl.Batches(
        data, 'train', args.batch_size // k, train=True, steps=len(full)), 1, samples=k, cost_names=list(costs))
    small = numerics.place(crl.compact(model, policy.split(crl.final_mask(policy, costs, budget))))
    finetune, _ = timed('finetune', crl.train, small, full, 1, phase='finetune')
    return dense, prune, finetune, crl.group_widths(small)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--archs', nargs='+', default=['vgg16', 'resnet18'])
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--batch-size', type=int, default=256, help='training batch')
    p.add_argument('--batch', type=int, help='the large inference batch (default: 512 on CUDA, 64 on the CPU)')
    p.add_argument('--samples', type=int, default=8)
    p.add_argument('--images', type=int, default=20480, help='synthetic training images (one epoch per phase)')
    p.add_argument('--budget', default='params=0.1')
    p.add_argument('--compile', default='off', choices=['off', 'on', 'both'])
    p.add_argument('--modes', default=','.join(crl.SPEED_MODES), help='inference modes')
    p.add_argument('--multiples', type=int, nargs='+', default=[1, 8, 16, 32, 64])
    p.add_argument('--multiple-modes', default='folded,compiled', help='inference modes of the multiples table')
    p.add_argument('--tables', nargs='+', default=['ops', 'training', 'inference', 'multiples'])
    p.add_argument('--bf16', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--device', default='auto')
    args = p.parse_args()
    device = crl.get_device(args.device, '--device')
    numerics = crl.Numerics(device, args.bf16, args.channels_last)
    batch = args.batch or (512 if device.type == 'cuda' else 64)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f"device {name}, torch {torch.__version__}, width {args.width}, {numerics.describe()}", flush=True)

    if 'ops' in args.tables:
        print('\n| arch | cost evaluation: ATen ops / kernel launches | whole pruning step: ATen ops / kernel '
              'launches |')
        print('|---|---|---|')
        for arch in args.archs:
            (co, cl), (so, sl) = ops_per_step(arch, numerics, args)
            print(f"| {arch} | {co} / {cl} | {so} / {sl} |", flush=True)

    if 'training' in args.tables:
        print(f'\ntraining, batch {args.batch_size}, K {args.samples}\n')
        print('| arch | compile | dense img/s | prune img/s | fine-tune img/s | overhead s (dense/prune/fine-tune) | '
              'compact widths |')
        print('|---|---|---|---|---|---|---|')
        for arch in args.archs:
            for compile_ in {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]:
                d, pr, f, widths = training(arch, numerics, compile_, args)
                print(f"| {arch} | {'on' if compile_ else 'off'} | {d['images_per_s']:,.0f} | "
                      f"{pr['images_per_s']:,.0f} | {f['images_per_s']:,.0f} | {d['overhead_s']:.1f} / "
                      f"{pr['overhead_s']:.1f} / {f['overhead_s']:.1f} | {' '.join(map(str, widths))} |", flush=True)

    if 'inference' in args.tables:
        print(f'\ninference, dense against compact at {args.budget} (widths multiple of 1)\n')
        print('| arch | mode | batch | dense ms | compact ms | speed-up | MAC ratio | speed-up / MAC ratio | '
              'compact img/s |')
        print('|---|---|---|---|---|---|---|---|---|')
        for arch in args.archs:
            model = dense_model(arch, args, numerics).eval()
            small = crl.Prunable(model).shrink(compact_widths(model, args.budget))
            for r in crl.inference_speed(model, small, numerics, (3, 32, 32), (1, batch), args.modes.split(',')):
                print(f"| {arch} | {r['mode']} | {r['batch']} | {r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | "
                      f"{r['speedup']:.2f}x | {r['macs_ratio']:.2f}x | {r['speedup'] / r['macs_ratio']:.2f} | "
                      f"{r['images_per_s']:,.0f} |", flush=True)

    if 'multiples' in args.tables:
        print(f'\ncompact widths at {args.budget} rounded to the nearest multiple (at least one multiple per group), '
              f'batch {batch}: does alignment buy speed per MAC?\n')
        print('| arch | multiple | MACs (M) | mode | ms | img/s | img/s per GMAC | relative to multiple 1 |')
        print('|---|---|---|---|---|---|---|---|')
        for arch in args.archs:
            model = dense_model(arch, args, numerics).eval()
            widths, dense = compact_widths(model, args.budget), crl.group_widths(model)
            x = numerics.random_input(batch, (3, 32, 32))
            first = {}
            for multiple in args.multiples:
                nearest = [min(d, max(multiple, round(w / multiple) * multiple)) for w, d in zip(widths, dense)]
                small = crl.Prunable(model).shrink(nearest)
                macs = crl.count(small)[1]
                for mode in args.multiple_modes.split(','):
                    net = crl.runner(small, mode, numerics, (3, 32, 32))
                    (ms,), _ = crl.time_in_turns([net], x, numerics)
                    per_gmac = 1000 * batch / ms / (macs / 1e9)
                    first.setdefault(mode, per_gmac)
                    print(f"| {arch} | {multiple} | {macs / 1e6:.1f} | {mode} | {ms:.3f} | {1000 * batch / ms:,.0f} | "
                          f"{per_gmac:,.0f} | {per_gmac / first[mode]:.2f} |", flush=True)


if __name__ == '__main__':
    main()
