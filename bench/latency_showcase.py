"""A latency budget allocates widths differently from a parameter budget: networks compared at equal measured latency.

    python bench/latency_showcase.py --data /tmp/cifar10-jpeg --subset 5000 --width 0.25 --latency 0.5 \
        --latency-batch 16 --out bench/out-latency

From one dense checkpoint (trained here unless --pretrained), on --latency-device at --latency-batch:
  crl-latency         CRL with --budget latency=L
  crl-params (equal params)   CRL with a parameter budget equal to crl-latency's parameter fraction
  crl-params (tuned)  CRL with the parameter budget rescaled once by L / the measured latency of the row above, so
                      that its latency lands near L (the table is reused; a second budget latency=1 never binds and
                      only makes the run time its network)
  uniform             every layer thinned alike (--width), the widest whose measured latency meets L, trained from
                      scratch for as many epochs as the dense network and CRL's pruning and fine-tuning together
At the end all networks are timed again, in turns, in this one process (the fastest of several rounds' medians),
so that their latencies compare on equal terms. Prints one markdown table: accuracy, params, MACs, predicted and
measured latency, kept widths.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True)
    p.add_argument('--subset', type=int, default=0)
    p.add_argument('--arch', default='vgg16')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--latency', type=float, default=0.5, help='latency budget, a fraction of the dense network')
    p.add_argument('--latency-batch', type=int, default=1)
    p.add_argument('--latency-device', default='cpu')
    p.add_argument('--dense-epochs', type=int, default=30)
    p.add_argument('--prune-epochs', type=int, default=10)
    p.add_argument('--finetune-epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=5, help='rounds of the final timing, in turns')
    p.add_argument('--pretrained')
    p.add_argument('--out', default='bench/out-latency')
    args = p.parse_args()
    common = ['--arch', args.arch, '--data', args.data, '--subset', str(args.subset), '--batch-size',
              str(args.batch_size), '--log-every', '1000000', '--overwrite', '--latency-device', args.latency_device,
              '--latency-batch', str(args.latency_batch)]
    out = lambda name: ['--out', os.path.join(args.out, name)]  # noqa: E731
    dense = args.pretrained or os.path.join(args.out, 'dense', 'dense.pt')
    if not os.path.exists(dense):
        crl.main([*common, '--width', str(args.width), '--dense-epochs', str(args.dense_epochs), '--prune-epochs',
                  '1', '--finetune-epochs', '0', '--budget', 'params=1', *out('dense')])
    after = [*common, '--width', str(args.width), '--pretrained', dense, '--prune-epochs', str(args.prune_epochs),
             '--finetune-epochs', str(args.finetune_epochs)]
    rows = {'crl-latency': crl.main([*after, '--budget', f'latency={args.latency}', *out('crl-latency')])}
    table = os.path.join(args.out, 'crl-latency', 'latency_table.pt')
    params = rows['crl-latency']['pruned']['params_fraction']
    rows['crl-params (equal params)'] = crl.main([*after, '--budget', f'params={params:.4f},latency=1',
                                                  '--latency-table', table, *out('crl-params-equal')])
    tuned = min(params * args.latency / rows['crl-params (equal params)']['fractions']['latency'], 1.0)
    rows['crl-params (tuned)'] = crl.main([*after, '--budget', f'params={tuned:.4f},latency=1',
                                           '--latency-table', table, *out('crl-params-tuned')])

    # uniform: the widest uniformly thinned network whose measured latency meets the budget
    meta = torch.load(table, weights_only=True)
    cost, (reference, _) = crl.Latency(meta, crl.Numerics(torch.device(args.latency_device))), crl.load_pruned(dense)
    width = args.width
    while width > 0.01:
        uniform = crl.build(args.arch, crl.dense_widths(args.arch, width), reference.num_classes)
        (small_ms, dense_ms), _ = cost.measurements(uniform, reference)
        if small_ms / dense_ms <= args.latency:
            break
        width *= 0.97
    total = args.dense_epochs + args.prune_epochs + args.finetune_epochs
    rows['uniform from scratch'] = crl.main([*common, '--width', f'{width:.4f}', '--dense-epochs', str(total),
                                             '--prune-epochs', '1', '--finetune-epochs', '0', '--budget',
                                             'params=1', *out('uniform')])

    # every network timed again, in turns, on equal terms
    folders = ['crl-latency', 'crl-params-equal', 'crl-params-tuned', 'uniform']
    nets = [crl.load_pruned(os.path.join(args.out, f, 'dense.pt' if f == 'uniform' else 'pruned.pt'))[0]
            for f in folders]
    together, _ = cost.measurements(reference, *nets, rounds=args.rounds)

    print(f"\n{args.arch} width {args.width}, latency on {meta['meta']['device']} at batch {args.latency_batch}, "
          f"budget {args.latency} of the dense network; dense {meta['dense_ms']:.3f} ms when its table was built, "
          f"{together[0]:.3f} ms timed with the others at the end\n")
    print('| network | accuracy % | params (fraction) | MACs (fraction) | latency ms: predicted / measured in its run '
          '/ timed together (fraction of dense) | kept widths |')
    print('|---|---|---|---|---|---|')
    dp, dm = rows['crl-latency']['dense']['params'], rows['crl-latency']['dense']['macs']
    for i, (name, r) in enumerate(rows.items(), 1):
        net = nets[i - 1]
        widths = torch.tensor([crl.group_widths(net)])
        (params, macs), acc = crl.count(net), r['pruned']['accuracy']
        if name.startswith('uniform'):  # measured when its width was searched
            acc, measured = r['dense']['accuracy'], small_ms
        else:
            measured = r['latency']['pruned_measured_ms']
        print(f"| {name} | {100 * acc:.2f} | {params:,} ({params / dp:.3f}) | {macs / 1e6:.2f}M ({macs / dm:.3f}) | "
              f"{cost.predict_ms(widths).item():.3f} / {measured:.3f} / {together[i]:.3f} ({together[i] / together[0]:.3f})"
              f" | {' '.join(map(str, crl.group_widths(net)))} |")


if __name__ == '__main__':
    main()
