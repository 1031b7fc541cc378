"""Where a pruning step's time goes, and steady-state training throughput of every phase, on synthetic data.

    python bench/speed.py                         # the run's device (CUDA if there is one), VGG16 and ResNet18
    python bench/speed.py --compile both          # eager and torch.compile side by side

Prints two tables:
  ops per step    top-level ATen operators (and, on CUDA, kernel launches) of one pruning step's cost evaluation
                  (sample K masks -> kept widths -> every cost) and of the whole step (forward, backward, both
                  optimiser steps, dual step)
  throughput      training images per second of the dense phase, the pruning phase and fine-tuning of a compact
                  network (the widths that the final mask keeps at --budget from a random policy), steady state
                  (crl_prune.Progress times from the end of the first 5 steps; their extra time is the overhead
                  column: compilation, autotuning)
The data are random uint8 images on the device, so the figures are the training loops' own, not the data's.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402


def synthetic_data(n, device, args):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {'train': (x.to(device), y.to(device)), 'test': (x[:1000].to(device), y[:1000].to(device)),
            'classes': 10, 'mean': torch.full((3,), 0.5), 'std': torch.full((3,), 0.25),
            **crl.numerics(device, args.bf16, args.channels_last)}


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


def ops_per_step(arch, device, args):
    model = crl.build(arch, crl.dense_widths(arch, args.width), 10).to(device)
    data = synthetic_data(args.batch_size, device, args)
    if data['channels_last']:
        model.to(memory_format=torch.channels_last)
    costs = crl.make_costs(model, ['params', 'macs'])
    policy = crl.Policy(model.widths, 0.9).to(device)
    budget = torch.tensor([0.1, 0.5], dtype=torch.float64, device=device)
    lam = integral = torch.zeros_like(budget)
    opt_w = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    opt_p = torch.optim.Adam(policy.parameters(), 0.1)
    x, y = next(crl.batches(data, 'train', args.batch_size // args.samples, train=True))

    def costs_only():
        kept = policy.kept(policy.sample(args.samples))
        return torch.stack([c(kept) for c in costs.values()], 1)

    def whole_step():
        with crl.autocast(data):
            loss, policy_loss, cost, _ = crl.crl_step(model, policy, costs, budget, lam, x, y, args.samples)
        opt_w.zero_grad(set_to_none=True)
        opt_p.zero_grad(set_to_none=True)
        (loss + policy_loss).backward()
        opt_w.step()
        opt_p.step()
        crl.dual_step(integral, cost.mean(0), budget, 0.01, 10.0)

    return count_ops(costs_only, device), count_ops(whole_step, device)


def throughput(arch, device, compile_, args):
    """Steady-state images/s and first-steps overhead of the three phases, as crl_prune.main runs them."""
    targs = crl.parse_args(['--arch', arch, '--batch-size', str(args.batch_size), '--samples', str(args.samples),
                            '--log-every', '1000000', '--prune-epochs', '1', '--budget', args.budget]
                           + (['--compile'] if compile_ else []))
    if compile_:
        torch._dynamo.reset()
    torch.manual_seed(0)
    data = synthetic_data(args.images, device, args)
    model = crl.build(arch, crl.dense_widths(arch, args.width), 10).to(device)
    fmt = torch.channels_last if data['channels_last'] else torch.contiguous_format
    model.to(memory_format=fmt)
    costs, dense = crl.build_costs(model, targs)
    budget = torch.tensor(list(crl.resolve_budget(targs.budget_parsed, dense).values()), dtype=torch.float64,
                          device=device)
    policy = crl.Policy(model.widths, 0.9).to(device)
    dense = crl.train(model, data, 1, 0.01, targs, 'dense')
    prune, _ = crl.prune(model, policy, costs, budget, data, targs)
    small = crl.compact(model, policy.split(crl.final_mask(policy, costs, budget))).to(memory_format=fmt)
    finetune = crl.train(small, data, 1, 0.01, targs, 'finetune')
    return dense, prune, finetune, small.widths


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--archs', nargs='+', default=['vgg16', 'resnet18'])
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--samples', type=int, default=8)
    p.add_argument('--images', type=int, default=20480, help='synthetic training images (one epoch per phase)')
    p.add_argument('--budget', default='params=0.1')
    p.add_argument('--compile', default='off', choices=['off', 'on', 'both'])
    p.add_argument('--bf16', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'])
    p.add_argument('--device', default='auto')
    args = p.parse_args()
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f"device {name}, torch {torch.__version__}, width {args.width}, batch {args.batch_size}, K {args.samples}, "
          f"{crl.numerics(device, args.bf16, args.channels_last)}", flush=True)

    print('\n| arch | cost evaluation: ATen ops / kernel launches | whole pruning step: ATen ops / kernel launches |')
    print('|---|---|---|')
    for arch in args.archs:
        (co, cl), (so, sl) = ops_per_step(arch, device, args)
        print(f"| {arch} | {co} / {cl} | {so} / {sl} |", flush=True)

    print('\n| arch | compile | dense img/s | prune img/s | fine-tune img/s | overhead s (dense/prune/fine-tune) | '
          'compact widths |')
    print('|---|---|---|---|---|---|---|')
    for arch in args.archs:
        for compile_ in {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]:
            d, pr, f, widths = throughput(arch, device, compile_, args)
            print(f"| {arch} | {'on' if compile_ else 'off'} | {d['images_per_s']:,.0f} | {pr['images_per_s']:,.0f} | "
                  f"{f['images_per_s']:,.0f} | {d['overhead_s']:.1f} / {pr['overhead_s']:.1f} / "
                  f"{f['overhead_s']:.1f} | {' '.join(map(str, widths))} |", flush=True)


if __name__ == '__main__':
    main()
